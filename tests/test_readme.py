"""README.md and docs/: the equation table names code that exists, every relative link points at a file, and the
reader's files stay within one sitting (line budgets)."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def defined_names(path):
    """Top-level functions and classes of a Python file, and the methods of its classes as Class.method."""
    names = set()
    for node in ast.parse(read(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_every_file_function_in_the_equation_table_exists():
    text = read("README.md")
    table = text[text.index("### Where each equation lives"):]
    table = table[: table.index("\n## ")]
    refs = re.findall(r"`([\w/]+\.py):([\w.]+)`", table)
    assert len(refs) >= 30, refs  # the table is found and parsed
    missing = [f"{f}:{name}" for f, name in refs
               if not os.path.exists(os.path.join(ROOT, f)) or name not in defined_names(f)]
    assert not missing, f"README's equation table names code that does not exist: {missing}"


def test_every_file_function_named_in_the_docs_exists():
    # `file.py:function` anywhere in README.md or docs/: the code a reader is sent to must be there
    missing = []
    for doc in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]:
        for f, name in re.findall(r"`([\w/]+\.py):([A-Za-z_][\w.]*)`", read(doc)):
            if not os.path.exists(os.path.join(ROOT, f)) or name not in defined_names(f):
                missing.append(f"{doc}: {f}:{name}")
    assert not missing, missing


def test_relative_links_resolve():
    for doc in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", read(doc)):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
            assert os.path.exists(path), f"{doc}: link to {target} points at nothing"


def test_readme_fits_one_sitting():
    assert len(read("README.md").splitlines()) <= 300


READER_FILES = ["README.md", "entropy.py", "losses.py", "teacher.py", "exposure.py", "train.py"]
CONCEPT_FILES = ["entropy.py", "teacher.py", "losses.py", "exposure.py", "rollout.py", "train.py", "evaluate.py"]


def test_the_readers_files_fit_one_sitting():
    # what a paper reader opens: the README and the files that hold the methods, at most 2,200 lines together
    n = {f: len(read(f).splitlines()) for f in READER_FILES}
    assert sum(n.values()) <= 2200, n


def test_no_concept_file_function_is_longer_than_80_lines():
    long = [f"{f}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for f in CONCEPT_FILES
            for node in ast.walk(ast.parse(read(f))) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
