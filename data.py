"""Math problems for on-policy self-distillation: an embedded offline generator and a loader for user data.

Papers served: "Self-Distilled Reasoner: On-Policy Self-Distillation for LLMs" (arXiv 2601.18734)
and "Adaptive Teacher Exposure for Self-Distillation in LLM Reasoning" (arXiv 2605.11458). Both
need rows of (problem x, reference solution y*, final answer): the student sees x, the teacher
sees x plus (part of) y* plus the answer.

Every row, whatever its source, is a dict

    {"id": str, "problem": str, "solution": str, "answer": str, "level": int}

where `solution` holds one reasoning step per line and ends with a line containing \\boxed{answer}
(the segmentation `teacher.split_steps` relies on), and `level` is the difficulty (0 = unknown).

The embedded generator (no download needed) writes multi-step arithmetic word problems and
"think of a number" algebra problems. Difficulty level L means L computation steps, with larger
numbers as L grows:

    level 1: one addition or subtraction, numbers up to 20
    level 2: two steps (adds, subtracts, doubles, halves) or a two-step equation, numbers up to 50
    level 3: three steps (also triples), numbers up to 100
    level 4: four steps, numbers up to 200

Train/test disjointness by construction:
    sig(row)  = (level, kind, the sequence of (operation, operand) pairs)   # names/objects excluded
    split(row) = "test" if sha256(sig) mod 5 == 0 else "train"
so a test problem never shares its mathematical content with a train problem, even under other
names; both splits are deterministic functions of their seeds.

Choices (the papers use existing datasets; all of this is ours, with its reasons in docs/choices.md):
  - Solutions are written one computation per line and end with "Answer: \\boxed{19}", so exposure truncation cuts
    between whole computations (docs/choices.md, choice 58).
  - About 20% of signatures are test (a hash bucket), the rest train (docs/choices.md, choice 59).
  - User data: fields are detected unless given by flags; the answer is the answer field, else the solution's last
    box, by grader.last_boxed (docs/choices.md, choice 60).
  - A bad row is an error naming file, line and field, or skipped and counted with skip_bad_rows=True
    (docs/choices.md, choice 61).
  - An optional "reader_alpha" (a number in [0, 1]) makes an SFT row train from the teacher's prompt at that exposure:
    the reader warm start's rows (docs/choices.md, choice 24); other methods refuse such rows.

The embedded SmolLM2-135M-Instruct rarely writes \\boxed{} and is weak at arithmetic: its accuracy on
the test split, as evaluate.py grades it, is in docs/results.md ("The demo"), with the command that measures it.

Examples:
    python data.py                      # prints a few embedded problems per level and split sizes
    python data.py --export siyanzhao/Openthoughts_math_30k_opsd --out openthoughts_math.jsonl   # hub -> local file
"""

import hashlib
import json
import os
import random
import re
import sys

from grader import last_boxed  # the one answer extractor: a user solution's answer is its last box

# ---------------------------------------------------------------------------------------------
# the embedded generator
# ---------------------------------------------------------------------------------------------

NAMES = ["Mia", "Noah", "Ava", "Liam", "Emma", "Omar", "Sara", "Leo", "Nina", "Ravi", "Lena", "Tom",
         "Yuki", "Ana", "Ben", "Zoe", "Ivan", "Maya", "Kofi", "Elif"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps",
         "cookies", "beads", "toy cars"]

# per level: (largest start value, largest operand, operations allowed)
LEVELS = {
    1: (20, 20, ("add", "sub")),
    2: (50, 30, ("add", "sub", "double", "half")),
    3: (100, 60, ("add", "sub", "double", "half", "triple")),
    4: (200, 100, ("add", "sub", "double", "half", "triple")),
}



def story_problem(rng, level):
    """A count of objects changed by `level` operations. Returns (signature, problem, steps, answer)."""
    top, top_b, ops = LEVELS[level]
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x = x0 = rng.randint(2, top)
    sentences = [f"{name} has {x} {item}."]
    steps, trace = [], []
    for _ in range(level):
        op = rng.choice([op for op in ops if not (op == "sub" and x < 2) and not (op == "half" and x % 2)])
        if op == "add":
            b = rng.randint(1, top_b)
            sentences.append(rng.choice([f"Then {name} gets {b} more {item}.",
                                         f"Then {friend} gives {name} {b} more {item}."]))
            steps.append(f"{name} gets {b} more {item}: {x} + {b} = {x + b}.")
            x = x + b
        elif op == "sub":
            b = rng.randint(1, min(top_b, x - 1))
            sentences.append(rng.choice([f"Then {name} gives {b} {item} to {friend}.",
                                         f"Then {name} loses {b} {item}."]))
            steps.append(f"{name} has {b} fewer {item}: {x} - {b} = {x - b}.")
            x = x - b
        elif op in ("double", "triple"):
            b = 2 if op == "double" else 3
            sentences.append(f"Then the number of {item} {name} has {op}s.")
            steps.append(f"The number of {item} {op}s: {x} * {b} = {x * b}.")
            x = x * b
        else:  # half
            b = 2
            sentences.append(f"Then {name} gives half of the {item} to {friend}.")
            steps.append(f"{name} keeps half of the {item}: {x} / 2 = {x // 2}.")
            x = x // 2
        trace.append((op, b))
    sentences.append(f"How many {item} does {name} have now?")
    return (level, "story", x0, tuple(trace)), " ".join(sentences), steps, x


def equation_problem(rng, level):
    """'Think of a number' with `level` operations applied to it, solved by undoing them in reverse."""
    top, top_b, _ = LEVELS[level]
    name = rng.choice(NAMES)
    x = x0 = rng.randint(2, max(12, top // 4))
    trace = []
    for _ in range(level):
        op = rng.choice(["add", "sub", "mul"] if x >= 2 else ["add", "mul"])
        b = rng.randint(2, 5) if op == "mul" else rng.randint(1, top_b if op == "add" else min(top_b, x - 1))
        x = x + b if op == "add" else x - b if op == "sub" else x * b
        trace.append((op, b))
    verbs = {"add": "adds {b}", "sub": "subtracts {b}", "mul": "multiplies it by {b}"}
    said = ", then ".join(verbs[op].format(b=b) for op, b in trace)
    problem = f"{name} thinks of a number, {said}, and gets {x}. What number did {name} think of?"
    steps = []
    for op, b in reversed(trace):  # undo the last operation first
        if op == "add":
            steps.append(f"Undo adding {b}: {x} - {b} = {x - b}.")
            x = x - b
        elif op == "sub":
            steps.append(f"Undo subtracting {b}: {x} + {b} = {x + b}.")
            x = x + b
        else:
            steps.append(f"Undo multiplying by {b}: {x} / {b} = {x // b}.")
            x = x // b
    assert x == x0
    return (level, "equation", x0, tuple(trace)), problem, steps, x0


def signature_split(signature):
    """'test' for about a fifth of all problem signatures (fixed by a hash), 'train' for the rest."""
    h = int(hashlib.sha256(repr(signature).encode()).hexdigest(), 16)  # stable across runs, unlike hash()
    return "test" if h % 5 == 0 else "train"


def generate_problems(n, *, seed, levels=(1, 2, 3), split=None, max_tries=2000):
    """n problems cycling through `levels`, deterministic in seed; split='train'|'test' keeps only
    problems whose signature hashes into that split (None keeps all). Signatures are unique in the list."""
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"level {level} not in {sorted(LEVELS)}")
    rng = random.Random(seed)
    rows, seen, exhausted = [], set(), set()
    i = 0
    while len(rows) < n:
        if len(exhausted) == len(set(levels)):
            raise ValueError(f"only {len(rows)} distinct problems of levels {levels} in split {split}, asked for {n}")
        level = levels[i % len(levels)]
        i += 1
        if level in exhausted:
            continue
        for _ in range(max_tries):
            if level >= 2 and rng.random() < 1 / 3:  # a third of the problems from level 2 on are equations
                sig, problem, steps, answer = equation_problem(rng, level)
            else:
                sig, problem, steps, answer = story_problem(rng, level)
            if sig not in seen and (split is None or signature_split(sig) == split):
                break
        else:
            exhausted.add(level)  # this level has (almost) no new signatures left in this split
            continue
        seen.add(sig)
        solution = "\n".join(steps + [f"Answer: \\boxed{{{answer}}}"])
        rows.append({"id": f"gen{seed}-{len(rows)}", "problem": problem, "solution": solution,
                     "answer": str(answer), "level": level})
    return rows


EMBEDDED_SEEDS = {"train": 1234, "test": 5678}
# test: 100 per level, its first 150 rows are the 150-row split (docs/choices.md, choice 14)
EMBEDDED_SIZES = {"train": 3000, "test": 300}


def embedded_split(split, n=None, *, levels=(1, 2, 3)):
    """The embedded train or test split (disjoint signatures), n rows (default: EMBEDDED_SIZES)."""
    if split not in EMBEDDED_SEEDS:
        raise ValueError(f"embedded split must be 'train' or 'test', got {split!r}")
    n = EMBEDDED_SIZES[split] if n is None else n
    rows = generate_problems(n, seed=EMBEDDED_SEEDS[split], levels=levels, split=split)
    for k, row in enumerate(rows):
        row["id"] = f"embedded-{split}-{k}"
    return rows


# ---------------------------------------------------------------------------------------------
# user data: JSONL / JSON / Parquet / Hugging Face hub
# ---------------------------------------------------------------------------------------------


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, line (or row) and field."""


PROBLEM_FIELDS = ("problem", "question", "prompt")
SOLUTION_FIELDS = ("solution", "privileged_context")  # or GSM8K's "answer" when it holds "#### n"


def _read_jsonl(path):
    """(line number, record) for each non-blank line of a JSONL file."""
    with open(path, "rb") as f:  # bytes, so that an encoding error can name its line
        for lineno, raw in enumerate(f, 1):
            line = _decode_utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def _decode_utf8(raw, path, first_line=1):
    """bytes -> str; a byte sequence that is not UTF-8 is a DataError naming the line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1  # in bytes, 1-based
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at column {col}); "
                        "save the file as UTF-8") from None


def _read_json(path, split):
    """(line number, record) for a JSON file holding a list of records (or {split: [...]}/{"data": [...]}).
    Records are decoded one by one so each error can name the line the record starts on."""
    with open(path, "rb") as f:
        text = _decode_utf8(f.read(), path)
    decoder = json.JSONDecoder()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(whole, dict):
        key = split if split in whole else "data" if "data" in whole else None
        if key is None or not isinstance(whole[key], list):
            raise DataError(f"{path}, line 1: expected a list of records, or an object with a "
                            f"{split!r} or 'data' list; found keys {sorted(whole)[:10]}")
        records, base = whole[key], text.find("[", text.find(json.dumps(key)))
    elif isinstance(whole, list):
        records, base = whole, text.find("[")
    else:
        raise DataError(f"{path}, line 1: expected a list of records, found {type(whole).__name__}")
    # re-scan the list to learn where each record starts (the values are already known)
    pos = base + 1
    for record in records:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, record
        pos = end


def _read_parquet(path):
    """(row number, record) for a Parquet file."""
    import pyarrow.parquet as pq  # optional dependency, only needed for Parquet

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    for k, record in enumerate(table.to_pylist()):
        yield k + 1, record


def _read_hub(name, split):
    """(row number, record) from a Hugging Face hub dataset 'owner/name' or 'owner/name:config'."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a local file and the `datasets` package is not installed") from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:
        raise DataError(f"{name!r} is not a local file, and loading it from the Hugging Face hub failed "
                        f"(offline? wrong name?): {type(e).__name__}: {str(e)[:300]}") from None
    for k, record in enumerate(ds):
        yield k + 1, record


def _pick(record, given, candidates):
    """The field name to use: the one given by flag, else the first candidate present in the record."""
    if given is not None:
        return given
    return next((c for c in candidates if c in record), None)


def to_row(record, *, where, problem_field=None, solution_field=None, answer_field=None):
    """Map one raw record to a row dict; raises DataError(where + field) when it cannot."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(record).__name__}")
    pf = _pick(record, problem_field, PROBLEM_FIELDS)
    if pf is None or pf not in record:
        raise DataError(f"{where}, field {pf or '/'.join(PROBLEM_FIELDS)!r}: missing (fields present: {sorted(record)})")
    problem = record[pf]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}, field {pf!r}: expected non-empty text, got {problem!r:.80}")
    sf = _pick(record, solution_field, [c for c in SOLUTION_FIELDS if c not in (pf, "answer")])
    if sf is None and "####" in str(record.get("answer", "")):  # GSM8K: the answer field is the worked solution
        sf = "answer"
    af = answer_field if answer_field is not None else ("answer" if "answer" in record and sf != "answer" else None)
    if solution_field is not None and sf not in record:
        raise DataError(f"{where}, field {sf!r}: missing (fields present: {sorted(record)})")
    if answer_field is not None and af not in record:
        raise DataError(f"{where}, field {af!r}: missing (fields present: {sorted(record)})")
    solution = record.get(sf) if sf is not None else None
    if solution is not None and not isinstance(solution, str):
        raise DataError(f"{where}, field {sf!r}: expected text, got {type(solution).__name__}")
    answer = record.get(af) if af is not None else None
    if answer is not None and not isinstance(answer, str):
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        else:
            raise DataError(f"{where}, field {af!r}: expected text or a number, got {type(answer).__name__}")
    solution = (solution or "").strip()
    if "####" in solution:  # GSM8K: "worked solution ... #### 42"
        solution, _, tail = solution.rpartition("####")
        if answer is None:
            answer = tail.strip().replace(",", "")
        solution = re.sub(r"<<[^>]*>>", "", solution).strip()  # drop the calculator annotations
    if answer is None or not answer.strip():
        answer = last_boxed(solution) if solution else None
    if answer is None or not answer.strip():
        field = af or sf or "answer"
        raise DataError(f"{where}, field {field!r}: no answer (no answer field and no \\boxed{{}} in the solution)")
    answer = answer.strip()
    if "\\boxed{" not in solution:
        solution = (solution + "\n" if solution else "") + f"Answer: \\boxed{{{answer}}}"
    level = record.get("level", 0)
    row = {"id": str(record.get("id", where)), "problem": problem.strip(), "solution": solution,
           "answer": answer, "level": int(level) if isinstance(level, (int, float)) else 0}
    if record.get("reader_alpha") is not None:  # an SFT row trained from the teacher's prompt (train.sample_batch)
        a = record["reader_alpha"]
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise DataError(f"{where}, field 'reader_alpha': expected a number in [0, 1], got {a!r:.80}")
        row["reader_alpha"] = float(a)
    return row


def swap_references(rows, seed=0):
    """The wrong-reference control: each row gains "reference", the (solution, answer) of another row whose solution
    and answer both differ from its own (an equal answer would hand the teacher the right one). The partner is the
    next such row after a seeded cyclic shift, so the pairing is a function of (rows, seed) alike on every rank."""
    n = len(rows)
    shift = 1 + (seed * 7919) % max(n - 1, 1)  # in [1, n - 1]: never the row itself first
    out = []
    for i, r in enumerate(rows):
        for j in range(n):  # every other row once, starting at i + shift
            o = rows[(i + shift + j) % n]
            if o["solution"] != r["solution"] and o["answer"] != r["answer"]:
                out.append({**r, "reference": (o["solution"], o["answer"])})
                break
        else:
            raise ValueError(f"--teacher_context wrong: no other row has a different solution and answer than row {i}")
    return out


def load_dataset(name_or_path, *, split="train", problem_field=None, solution_field=None,
                 answer_field=None, skip_bad_rows=False, limit=None):
    """Rows from 'embedded' / 'embedded:test', a .jsonl/.json/.parquet file, or a hub dataset name.

    Bad rows raise DataError naming file, line and field; with skip_bad_rows=True they are skipped
    and counted (the count is printed). An empty result is a DataError, never a silent no-op.
    """
    name = str(name_or_path)
    if name == "embedded" or name.startswith("embedded:"):
        which = name.partition(":")[2] or split
        rows = embedded_split(which)
        return rows[:limit] if limit is not None else rows
    ext = os.path.splitext(name)[1].lower()
    if os.path.exists(name):
        if os.path.isdir(name):
            raise DataError(f"{name}: is a directory; give a .jsonl, .json or .parquet file")
        if ext == ".jsonl":
            records = _read_jsonl(name)
        elif ext == ".json":
            records = _read_json(name, split)
        elif ext == ".parquet":
            records = _read_parquet(name)
        else:
            raise DataError(f"{name}: unknown file type {ext!r}; use .jsonl, .json or .parquet")
        unit = "row" if ext == ".parquet" else "line"
    elif ext in (".jsonl", ".json", ".parquet") or name.startswith((".", "/")):
        raise DataError(f"{name}: file not found")
    else:
        records, unit = _read_hub(name, split), "row"
    rows, bad = [], 0
    for k, record in records:
        try:
            rows.append(to_row(record, where=f"{name}, {unit} {k}", problem_field=problem_field,
                               solution_field=solution_field, answer_field=answer_field))
        except DataError:
            if not skip_bad_rows:
                raise
            bad += 1
        if limit is not None and len(rows) >= limit:
            break
    if bad:
        print(f"[data] {name}: skipped {bad} bad rows, kept {len(rows)}")
    if not rows:
        raise DataError(f"{name}: no usable rows" + (f" ({bad} bad rows skipped)" if bad else ""))
    return rows


def export_jsonl(name, out, **kw):
    """Rows of any source load_dataset reads (fields mapped and checked as for training), written to a JSONL file
    of problem/solution/answer records that load_dataset reads back offline. Returns the number of rows."""
    if not out.endswith(".jsonl"):
        raise DataError(f"--out {out}: must end in .jsonl")
    if not os.path.isdir(os.path.dirname(out) or "."):  # before a long download, not after
        raise DataError(f"--out {out}: cannot write (no folder {os.path.dirname(out)})")
    rows = load_dataset(name, **kw)
    tmp = out + ".tmp"  # a failed write leaves no half file under the final name
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"problem": r["problem"], "solution": r["solution"], "answer": r["answer"]},
                                   ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"--out {out}: cannot write ({e.strerror or e})") from None
    return len(rows)


def demo():
    train, test = embedded_split("train"), embedded_split("test")
    print(f"embedded train: {len(train)} rows, test: {len(test)} rows")
    for level in (1, 2, 3, 4):
        row = generate_problems(1, seed=level, levels=(level,))[0]
        print(f"\n--- level {level} ---\nproblem:  {row['problem']}\nsolution:\n{row['solution']}\nanswer:   {row['answer']}")
    # the first row of a GSM8K-style record, as the loader maps it
    print("\nGSM8K-style:", to_row({"question": "Tom has 3 pens and buys 4. How many?",
                                    "answer": "3 + 4 = <<3+4=7>>7 pens\n#### 7"}, where="example"))


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Print embedded problems, or export a dataset to a local JSONL file.")
    p.add_argument("--export", metavar="NAME", help="hub dataset (owner/name[:config]) or file to export")
    p.add_argument("--out", help="the JSONL file --export writes")
    p.add_argument("--split", default="train", help="split of the exported dataset")
    p.add_argument("--problem_field", help="field holding the problem (default: guessed, as for training)")
    p.add_argument("--solution_field", help="field holding the reference solution (default: guessed)")
    p.add_argument("--answer_field", help="field holding the final answer (default: answer, else the last \\boxed)")
    p.add_argument("--skip_bad_rows", action="store_true", help="skip and count unusable rows instead of failing")
    args = p.parse_args(argv)
    if args.export is None:
        if args.out:
            p.error("--out needs --export NAME")
        demo()
        return 0
    if not args.out:
        p.error("--export needs --out FILE.jsonl")
    try:
        n = export_jsonl(args.export, args.out, split=args.split, problem_field=args.problem_field,
                         solution_field=args.solution_field, answer_field=args.answer_field,
                         skip_bad_rows=args.skip_bad_rows)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows of {args.export} ({args.split}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
