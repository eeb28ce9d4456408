"""Tests for data.py: the embedded generator (determinism, disjoint splits, correct arithmetic) and the loader."""

import json
import os
import re

import pytest

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"id", "problem", "solution", "answer", "level"}


# ------------------------------------------------------------------ embedded generator


def test_generator_is_deterministic_in_its_seed():
    a = data.generate_problems(60, seed=7, levels=(1, 2, 3, 4))
    b = data.generate_problems(60, seed=7, levels=(1, 2, 3, 4))
    c = data.generate_problems(60, seed=8, levels=(1, 2, 3, 4))
    assert a == b
    assert [r["problem"] for r in a] != [r["problem"] for r in c]
    assert [r["level"] for r in a] == [1, 2, 3, 4] * 15


def check_line(line):
    """Recompute 'x op y = z' on a solution line with Python integers."""
    m = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$", line)
    assert m, line
    x, op, y, z = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
    assert op != "/" or x % y == 0, line
    assert value == z, line
    return z


def test_solutions_are_correct_one_step_per_line():
    for row in data.generate_problems(200, seed=3, levels=(1, 2, 3, 4)):
        assert set(row) == KEYS
        lines = row["solution"].split("\n")
        assert len(lines) == row["level"] + 1  # one line per computation, then the answer line
        assert lines[-1] == f"Answer: \\boxed{{{row['answer']}}}"
        results = [check_line(line) for line in lines[:-1]]
        assert str(results[-1]) == row["answer"]
        assert data.last_boxed(row["solution"]) == row["answer"]
        # the chain of computations starts from a number in the problem and feeds each result forward
        nums = [int(n) for n in re.findall(r"\d+", row["problem"])]
        first = int(re.match(r".*?(\d+) [-+*/]", lines[0]).group(1))
        assert first in nums
        for prev, line in zip(results, lines[1:-1]):
            assert line.split(": ", 1)[1].startswith(f"{prev} "), line
        if "thinks of a number" not in row["problem"]:
            assert nums[0] == first  # story problems: the start count comes first


def normalized(row):
    """The solution with names and objects blanked out: it determines the problem's signature."""
    text = row["solution"]
    for word in data.NAMES + data.ITEMS:
        text = re.sub(rf"\b{re.escape(word)}\b", "_", text)
    return text


def test_embedded_splits_are_disjoint():
    train = data.embedded_split("train")
    test = data.embedded_split("test")
    assert len(train) == data.EMBEDDED_SIZES["train"] and len(test) == data.EMBEDDED_SIZES["test"]
    assert {r["level"] for r in test} == {1, 2, 3}
    train_sigs = {normalized(r) for r in train}
    test_sigs = {normalized(r) for r in test}
    assert len(test_sigs) == len(test)  # no duplicates inside a split either
    assert not train_sigs & test_sigs
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    assert len({r["id"] for r in train + test}) == len(train) + len(test)
    # the same split, asked again or asked for fewer rows, is the same prefix
    assert data.embedded_split("test", 20) == test[:20]
    with pytest.raises(ValueError):
        data.embedded_split("validation")


def test_a_level_runs_out_of_distinct_problems():
    with pytest.raises(ValueError, match="distinct problems"):
        data.generate_problems(5000, seed=0, levels=(1,), split="test", max_tries=200)


def test_last_boxed():
    assert data.last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert data.last_boxed("no box") is None
    assert data.last_boxed("\\boxed{3} then \\boxed{4") == "3"  # an unclosed box is skipped


# How the one extractor (grader.last_boxed, for data.py and evaluate.py alike) reads a box, as LaTeX does: boxes of
# either kind, arguments without braces, empty boxes, escaped braces and line ends.
BOXES = [
    ("\\fbox{7}", "7"),  # \fbox is a box too
    ("\\boxed{5} then \\fbox{6}", "6"),  # the last box of either kind
    ("\\boxed 5", "5"),  # no braces, the run up to the next space
    ("\\boxed5", "5"),  # likewise, with no space
    ("$\\boxed 5$", "5"),  # likewise, up to the `$`
    ("\\boxed {5}", "5"),  # spaces before the group are skipped
    ("\\boxed 12", "12"),  # the whole run, as the MATH graders read it (TeX boxes the 1)
    ("\\boxed -3", "-3"),  # likewise
    ("\\boxed \\pi", "\\pi"),  # a control word is one token
    ("\\boxed \\frac12", "\\frac12"),  # the run up to the next space, control word included
    ("\\boxed{}", None),  # an empty box holds no answer
    ("\\boxed{ }", None),  # nor does a box of spaces
    ("\\boxed{4} and \\boxed{}", "4"),  # an empty last box is skipped
    ("\\boxed{a \\{ b}", "a \\{ b"),  # \{ is not a brace
    ("\\boxed{a\\\\}", "a\\\\"),  # \\ is a line break, the } after it closes the box
    ("\\boxed\n5", "5"),  # one line end is a space to LaTeX
    ("\\boxed\n\n5", None),  # a blank line is a paragraph break, not an argument
    ("\\boxed}", None),
    ("\\boxed$5$", None),
    ("the answer is \\boxed", None),
    ("\\boxed\\", None),
]


@pytest.mark.parametrize("text,expected", BOXES)
def test_last_boxed_cases(text, expected):
    assert data.last_boxed(text) == expected


@pytest.mark.parametrize("solution,answer", [("so \\fbox{7}", "7"), ("so \\boxed 5.", "5"),
                                             ("\\boxed{4}, not \\boxed{}", "4")])
def test_to_row_takes_the_answer_with_the_same_extractor(solution, answer):
    row = data.to_row({"problem": "p", "solution": solution}, where="t")
    assert row["answer"] == answer
    if "\\boxed{" not in solution:  # the canonical answer line is appended
        assert row["solution"] == solution + f"\nAnswer: \\boxed{{{answer}}}"


def test_data_imports_no_project_module_or_heavy_package():
    import subprocess
    import sys

    code = ("import sys, data; heavy = {'torch', 'transformers', 'math_verify', 'numpy', 'teacher', 'evaluate',"
            " 'model', 'rollout', 'train'}; print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_cycle_among_the_project_modules():
    """Every import of a project module (top level or inside a function) is an edge; no cycles."""
    import ast
    import os

    mods = ["data", "teacher", "evaluate", "losses", "entropy", "exposure", "rollout", "model", "train"]
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(ROOT, m + ".py")).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = (names & set(mods)) - {m}
    done, on_path = set(), []

    def visit(m):
        assert m not in on_path, "import cycle: " + " -> ".join(on_path[on_path.index(m):] + [m])
        if m in done:
            return
        on_path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        on_path.pop()
        done.add(m)

    for m in mods:
        visit(m)


# ------------------------------------------------------------------ loader


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


ROWS = [{"problem": "What is 2 + 3?", "solution": "2 + 3 = 5\n\\boxed{5}", "answer": "5"},
        {"problem": "What is 4 * 3?", "solution": "4 * 3 = 12\n\\boxed{12}", "answer": "12"}]


def test_load_embedded_names():
    assert data.load_dataset("embedded", limit=5) == data.embedded_split("train")[:5]
    assert data.load_dataset("embedded:test") == data.embedded_split("test")
    assert data.load_dataset("embedded", split="test", limit=3) == data.embedded_split("test")[:3]


def test_load_jsonl_problem_solution_answer(tmp_path):
    rows = data.load_dataset(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert [r["problem"] for r in rows] == ["What is 2 + 3?", "What is 4 * 3?"]
    assert [r["answer"] for r in rows] == ["5", "12"]
    assert rows[0]["solution"] == "2 + 3 = 5\n\\boxed{5}" and set(rows[0]) == KEYS
    assert rows[1]["id"].endswith("line 2")
    assert len(data.load_dataset(str(tmp_path / "d.jsonl"), limit=1)) == 1


def test_load_gsm8k_style(tmp_path):
    rec = {"question": "Tom has 3 packs of 400 pens. How many?",
           "answer": "3 packs of 400 is 3*400=<<3*400=1200>>1200 pens.\nSo he has 1,200.\n#### 1,200"}
    (row,) = data.load_dataset(write_jsonl(tmp_path / "gsm.jsonl", [rec]))
    assert row["problem"] == rec["question"]
    assert row["answer"] == "1200"
    assert row["solution"] == "3 packs of 400 is 3*400=1200 pens.\nSo he has 1,200.\nAnswer: \\boxed{1200}"


def test_load_prompt_privileged_context_and_boxed_answer(tmp_path):
    rec = {"prompt": "Solve x + 1 = 3.", "privileged_context": "x = 3 - 1\nso \\boxed{2}"}
    (row,) = data.load_dataset(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert (row["problem"], row["answer"], row["solution"]) == ("Solve x + 1 = 3.", "2", rec["privileged_context"])


def test_load_field_flags(tmp_path):
    rec = {"q": "What is 6 / 2?", "worked": "6 / 2 = 3", "final": 3, "answer": "ignored"}
    (row,) = data.load_dataset(write_jsonl(tmp_path / "f.jsonl", [rec]), problem_field="q",
                               solution_field="worked", answer_field="final")
    assert (row["problem"], row["answer"]) == ("What is 6 / 2?", "3")
    assert row["solution"] == "6 / 2 = 3\nAnswer: \\boxed{3}"  # a solution without a box gets one


def test_load_json_list_and_split_object(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS, indent=2))
    assert [r["answer"] for r in data.load_dataset(str(p))] == ["5", "12"]
    q = tmp_path / "s.json"
    q.write_text(json.dumps({"train": ROWS[:1], "test": ROWS[1:]}))
    assert [r["answer"] for r in data.load_dataset(str(q), split="test")] == ["12"]


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    rows = data.load_dataset(str(p))
    assert [(r["problem"], r["answer"]) for r in rows] == [(r["problem"], r["answer"]) for r in ROWS]


def test_broken_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"problem": "x", "solution": \n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        data.load_dataset(str(p))


def test_missing_field_names_file_line_and_field(tmp_path):
    recs = [ROWS[0], {"problem": "no answer anywhere", "solution": "just words"}, {"text": "hi"}]
    path = write_jsonl(tmp_path / "m.jsonl", recs)
    with pytest.raises(data.DataError, match=r"m\.jsonl, line 2, field 'solution'.*no answer"):
        data.load_dataset(path)
    with pytest.raises(data.DataError, match=r"m\.jsonl, line 1, field 'nope': missing"):
        data.load_dataset(path, answer_field="nope")
    with pytest.raises(data.DataError, match=r"line 1, field 'problem': expected non-empty text"):
        data.load_dataset(write_jsonl(tmp_path / "e.jsonl", [{"problem": " ", "answer": "1"}]))


def test_skip_bad_rows_counts_them(tmp_path, capsys):
    recs = [ROWS[0], {"problem": "no answer", "solution": "words"}, {"text": "hi"}, ROWS[1]]
    rows = data.load_dataset(write_jsonl(tmp_path / "m.jsonl", recs), skip_bad_rows=True)
    assert [r["answer"] for r in rows] == ["5", "12"]
    assert "skipped 2 bad rows" in capsys.readouterr().out


def test_broken_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"problem": "a", "answer": "1"},\n  {"problem": "b" "answer": "2"}\n]')
    with pytest.raises(data.DataError, match=r"bad\.json, line 3: not valid JSON"):
        data.load_dataset(str(p))
    q = tmp_path / "rec.json"
    q.write_text('[\n  {"problem": "a", "answer": "1"},\n\n  {"question": 5,\n   "answer": "2"}\n]')
    with pytest.raises(data.DataError, match=r"rec\.json, line 4, field 'question'"):
        data.load_dataset(str(q))
    r = tmp_path / "obj.json"
    r.write_text('{"rows": []}')
    with pytest.raises(data.DataError, match="expected a list"):
        data.load_dataset(str(r))


def test_non_utf8_file_names_file_line_and_column(tmp_path):
    # a UTF-16 byte-order mark (\xff\xfe) is what a file saved as "Unicode" on Windows starts with
    p = tmp_path / "bom.jsonl"
    p.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"problem": "\xff\xfe", "answer": "1"}\n')
    with pytest.raises(data.DataError, match=r"bom\.jsonl, line 2: not UTF-8 text \(byte 0xff at column 14\)"):
        data.load_dataset(str(p))
    q = tmp_path / "bom.json"
    q.write_bytes(b'[\n  {"problem": "a", "answer": "1"},\n  {"problem": "\xff\xfe"}\n]')
    with pytest.raises(data.DataError, match=r"bom\.json, line 3: not UTF-8 text \(byte 0xff at column 16\)"):
        data.load_dataset(str(q))
    r = tmp_path / "start.jsonl"
    r.write_bytes(b"\xff\xfe" + json.dumps(ROWS[0]).encode("utf-16-le"))
    with pytest.raises(data.DataError, match=r"start\.jsonl, line 1: not UTF-8 text \(byte 0xff at column 1\)"):
        data.load_dataset(str(r))


def test_broken_parquet(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(data.DataError, match=r"bad\.parquet: cannot read as Parquet"):
        data.load_dataset(str(p))


def test_empty_dataset_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(data.DataError, match="no usable rows"):
        data.load_dataset(str(p))
    only_bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(data.DataError, match=r"no usable rows \(1 bad rows skipped\)"):
        data.load_dataset(only_bad, skip_bad_rows=True)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.load_dataset(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "d.csv"
    p.write_text("problem,answer\n")
    with pytest.raises(data.DataError, match="unknown file type"):
        data.load_dataset(str(p))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DataError, match="Hugging Face hub"):
        data.load_dataset("someone/no-such-dataset-for-opsd-tests")


def test_answer_only_row_gets_a_boxed_solution(tmp_path):
    (row,) = data.load_dataset(write_jsonl(tmp_path / "a.jsonl", [{"problem": "What is 1 + 1?", "answer": 2}]))
    assert (row["answer"], row["solution"]) == ("2", "Answer: \\boxed{2}")


# ------------------------------------------------------------------ export of a hub dataset to a local JSONL

OPSD_HUB = "siyanzhao/Openthoughts_math_30k_opsd"
HUB_RECORDS = [  # the fields of the OPSD training set: problem, solution (its final answer is the last box)
    {"problem": "Compute 1/2 + 1/4.", "solution": "First \\boxed{2/4} is wrong.\n\nSo the sum is $\\boxed{\\frac{3}{4}}$."},
    {"problem": "Find x if 2x = 10.", "solution": "Divide by 2: x = 5.\n\n\\boxed{5}"},
    {"problem": "What is 3^2 + 4^2?", "solution": "9 + 16 = 25, so $\\boxed{25}$.", "Extra": "ignored"},
]


def fake_hub(records, calls):
    def read_hub(name, split):
        calls.append((name, split))
        yield from enumerate(records, 1)
    return read_hub


def test_export_writes_a_jsonl_that_loads_offline(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(data, "_read_hub", fake_hub(HUB_RECORDS, calls))
    out = tmp_path / "openthoughts_math.jsonl"
    assert data.main(["--export", OPSD_HUB, "--out", str(out)]) == 0
    assert calls == [(OPSD_HUB, "train")]
    assert f"wrote 3 rows of {OPSD_HUB} (train) to {out}" in capsys.readouterr().out
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in written] == [{"problem", "solution", "answer"}] * 3
    assert [r["answer"] for r in written] == ["\\frac{3}{4}", "5", "25"]  # the last box of each solution
    assert [r["solution"] for r in written] == [r["solution"] for r in HUB_RECORDS]
    monkeypatch.setattr(data, "_read_hub", fake_hub([], calls))  # from here on, no hub
    rows = data.load_dataset(str(out))
    assert [(r["problem"], r["solution"], r["answer"]) for r in rows] == \
        [(r["problem"], r["solution"], a) for r, a in zip(HUB_RECORDS, ["\\frac{3}{4}", "5", "25"])]
    assert len(calls) == 1 and not os.path.exists(str(out) + ".tmp")


def test_export_errors_are_one_line_and_leave_no_file(tmp_path, monkeypatch, capsys):
    bad = HUB_RECORDS[:1] + [{"problem": "No box here.", "solution": "It is 7."}]
    monkeypatch.setattr(data, "_read_hub", fake_hub(bad, []))
    out = tmp_path / "o.jsonl"
    assert data.main(["--export", OPSD_HUB, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{OPSD_HUB}, row 2, field 'solution': no answer" in err
    assert not out.exists()
    assert data.main(["--export", OPSD_HUB, "--out", str(out), "--skip_bad_rows"]) == 0  # training's flag, too
    assert len(out.read_text().splitlines()) == 1
    assert data.main(["--export", OPSD_HUB, "--out", str(tmp_path / "o.json")]) == 2
    assert "--out" in capsys.readouterr().err
    assert data.main(["--export", OPSD_HUB, "--out", str(tmp_path / "no" / "dir" / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot write" in err
    (tmp_path / "d.jsonl").mkdir()  # the write itself fails: no half file is left behind
    assert data.main(["--export", OPSD_HUB, "--out", str(tmp_path / "d.jsonl"), "--skip_bad_rows"]) == 2
    assert "cannot write" in capsys.readouterr().err and not (tmp_path / "d.jsonl.tmp").exists()
