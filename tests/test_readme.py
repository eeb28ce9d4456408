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
TOP_LEVEL = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))  # every module of the repository's root


def test_the_readers_files_fit_one_sitting():
    # what a paper reader opens: the README and the files that hold the methods, at most 2,200 lines together
    n = {f: len(read(f).splitlines()) for f in READER_FILES}
    assert sum(n.values()) <= 2200, n


def test_no_top_level_function_is_longer_than_80_lines():
    assert "chunked_loss.py" in TOP_LEVEL and "plumbing.py" in TOP_LEVEL
    long = [f"{f}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for f in TOP_LEVEL
            for node in ast.walk(ast.parse(read(f))) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long


def test_train_py_functions_use_every_parameter():
    # a parameter a step function takes and never reads misleads the reader about what the step depends on
    unused = []
    for node in ast.walk(ast.parse(read("train.py"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            unused += [f"{node.name}({p})" for p in params if p not in used]
    assert not unused, f"train.py: parameters never read: {unused}"


def test_every_results_folder_has_a_readme():
    # results/: each committed folder says what it holds, the command that made it and the doc that cites it
    results = os.path.join(ROOT, "results")
    missing = [d for d in sorted(os.listdir(results))
               if os.path.isdir(os.path.join(results, d)) and not os.path.isfile(os.path.join(results, d, "README.md"))]
    assert not missing, f"results/ folders without a README.md: {missing}"
