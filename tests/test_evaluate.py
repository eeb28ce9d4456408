"""evaluate.py: Pass@k against subset enumeration, extraction, math-verify checking, health metrics, plots, CLI."""

import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest
import torch

import evaluate as ev
import grader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Pass@k, Avg@k, maj@k
# ---------------------------------------------------------------------------------------------


def brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) that contain a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_matches_exact_binomials():
    # n = 1000: C(n, k) has hundreds of digits; compare with exact rational arithmetic
    for n, c, k in [(1000, 1, 1), (1000, 3, 500), (1000, 990, 5), (400, 100, 200), (64, 0, 16)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert ev.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)
    assert ev.pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(n, c, k)


def test_avg_and_pass_curve_by_hand():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    # Avg: (1/4 + 1 + 0) / 3
    assert ev.avg_at_k(correct) == pytest.approx((0.25 + 1 + 0) / 3)
    curve = ev.pass_at_k_curve(correct)
    assert sorted(curve) == [1, 2, 4]
    # problem 1 with k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2
    assert curve[1] == pytest.approx((0.25 + 1 + 0) / 3)
    assert curve[2] == pytest.approx((0.5 + 1 + 0) / 3)
    assert curve[4] == pytest.approx((1 + 1 + 0) / 3)
    assert ev.pass_at_k_curve([[1, 0, 0, 0, 1, 0]]) == {
        1: pytest.approx(2 / 6), 2: pytest.approx(1 - 6 / 15), 4: pytest.approx(1 - 1 / 15), 6: 1.0}


def test_majority_vote_by_hand():
    # "1/2" and "\frac{1}{2}" are different strings: grouping is by normalized string (docs/choices.md, choice 53);
    # "\dfrac{1}{2}" normalizes to "\frac{1}{2}", "$7$" to "7"
    assert ev.majority_vote(["\\frac{1}{2}", "\\dfrac{1}{2}", "7", None], [True, True, False, False]) == 1.0
    assert ev.majority_vote(["7", "$7$", "\\frac{1}{2}"], [False, False, True]) == 0.0
    # a tie between one correct and one wrong group: the expected score of a random tie-break
    assert ev.majority_vote(["3", "4"], [True, False]) == 0.5
    assert ev.majority_vote(["3", "4", "5", "5", "3", "4"], [1, 0, 0, 0, 1, 0]) == pytest.approx(1 / 3)
    assert ev.majority_vote([None, None], [False, False]) == 0.0
    answers = [["3", "3", "4"], ["1", "2", "2"]]
    correct = [[True, True, False], [True, False, False]]
    assert ev.maj_at_k(answers, correct) == 0.5
    assert ev.maj_at_k(answers, correct, k=1) == 1.0  # first samples only: "3" right, "1" right


def test_macro_average_by_hand():
    per = {"a": {"avg_at_k": 10.0, "maj_at_k": 20.0, "pass_at_k": {"1": 10.0, "2": 15.0, "4": 30.0}},
           "b": {"avg_at_k": 30.0, "maj_at_k": 0.0, "pass_at_k": {"1": 30.0, "2": 45.0}}}
    m = ev.macro(per)
    assert m == {"avg_at_k": 20.0, "maj_at_k": 10.0, "pass_at_k": {"1": 20.0, "2": 30.0}}


# ---------------------------------------------------------------------------------------------
# answer extraction
# ---------------------------------------------------------------------------------------------

EXTRACTION = [
    # (response, strict answer (no fallback), answer with fallback)
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("first \\boxed{3}, then after checking \\boxed{4}", "4", "4"),
    ("\\boxed{1} and at last \\fbox{2}", "2", "2"),
    ("The answer is \\boxed 5.", "5", "5"),
    ("The answer is \\boxed 5", "5", "5"),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", "\\text{Evelyn}"),
    ("\\boxed{10\\text{ cm}}", "10\\text{ cm}", "10\\text{ cm}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "\\{1, 2\\}"),
    ("\\boxed{ 12 }", "12", "12"),
    ("\\boxed{(1, 2)} but then \\boxed{", "(1, 2)", "(1, 2)"),  # an unclosed last box is skipped
    ("\\boxed{}", None, None),
    ("\\boxedfoo{3}", None, None),  # not a box command
    ("We add 12 and 30 and get 42.", None, None),  # no declared answer: the last number is not taken
    ("2. Compute the total of", None, None),  # list numbering in a truncated response
    ("The answer is 1,000 apples, not 7.", None, "1,000"),
    ("So the answer is $\\frac{3}{4}$. Check: 3 and 4.", None, "\\frac{3}{4}"),
    ("Answer: -2.5 (it was 3 before)", None, "-2.5"),
    ("so the final answer is 3 / 4", None, "3/4"),
    ("the answer is below. 7", None, None),  # the number must follow the phrase
    ("The answer is 5. No wait, the answer is 6", None, "6"),
    ("The final answer is: **12**", None, "12"),
    ("So the final answer is 2 + 2 = 4. Then 7", None, "4"),
    ("the answer is 1.5 and 3 = 3", None, "3"),  # one sentence: the number after its last "="
    ("Answer: $x = 4$", None, "x = 4"),
    ("I do not know.", None, None),
]


@pytest.mark.parametrize("text,strict,loose", EXTRACTION)
def test_extraction_table(text, strict, loose):
    assert grader.extract_answer(text, fallback=False) == strict
    assert grader.extract_answer(text, fallback=True) == loose
    assert grader.extract_answer(text) == loose  # the fallback is on by default


def test_one_extractor_for_grading_and_for_loading():
    import data

    assert grader.last_boxed is data.last_boxed


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{a\\\\}", "a\\\\"),  # \\ is a line break, not an escaped brace: the } closes the box
    ("\\boxed\n5", "5"),  # one line end is a space, skipped before the argument as TeX does
])
def test_extraction_changes_from_the_former_grader(text, expected):
    assert grader.extract_answer(text, fallback=False) == expected


# ---------------------------------------------------------------------------------------------
# answer checking
# ---------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{x = 3}", "3"),
    ("\\boxed{10\\text{ cm}}", "10"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
    ("\\boxed{(1,2)}", "(1, 2)"),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2"),
    ("the answer is 42", "42"),
    ("\\boxed{3}", "\\boxed{3}"),  # a gold that already carries its box
    ("\\boxed{3}", "$3$"),
]

WRONG = [
    ("\\boxed{0.6}", "\\frac{1}{2}"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
    ("\\boxed{3.14159}", "\\pi"),
    ("\\boxed{-3}", "3"),
    ("\\boxed{(1, 3)}", "(1, 2)"),
    ("\\boxed{\\text{Evelyn}}", "\\text{Bob}"),
    ("I cannot solve it.", "3"),
    ("\\boxed{9^{9^{9^{9}}}}", "5"),  # a power tower: never evaluated (too_costly)
]


@pytest.mark.parametrize("response,gold", EQUIVALENT)
def test_equivalent_forms_verify(response, gold):
    assert grader.check_answer(response, gold)


@pytest.mark.parametrize("response,gold", WRONG)
def test_wrong_answers_fail(response, gold):
    assert not grader.check_answer(response, gold)


def test_no_fallback_needs_a_box():
    assert grader.check_answer("the answer is 42", "42", fallback=True)
    assert not grader.check_answer("the answer is 42", "42", fallback=False)


def test_normalize_answer_table():
    cases = {"$\\dfrac{1}{2}$": "\\frac{1}{2}", "\\text{ Evelyn }": "evelyn", "x = 3": "3", "1,000,000": "1000000",
             "2.50": "2.5", "3.0": "3", "45^{\\circ}": "45", "50\\%": "50", "\\left( 1, 2 \\right)": "(1,2)", "7.": "7"}
    for raw, want in cases.items():
        assert grader.normalize_answer(raw) == want, raw


def test_too_costly_table():
    costly = ["9^{9^{9^{9}}}", "9^9^9", "8**8**8", "10^{1000000}", "(10^5)!", "20000!", "2^{3!}"]
    cheap = ["2^{10}", "x^2+y^2", "5!", "\\frac{2^{3}}{4}", "e^{i\\pi}", "2^{100}", "\\sqrt{8}"]
    assert all(grader.too_costly(s) for s in costly)
    assert not any(grader.too_costly(s) for s in cheap)


def test_check_answer_in_worker_threads_agrees_with_main_thread():
    # math-verify's own timeout uses SIGALRM, which raises ValueError outside the main thread;
    # check_answer must give the same verdicts from a thread pool (a reward worker)
    cases = EQUIVALENT + WRONG
    # a generous deadline: on a busy machine two threads share the GIL, and a slow sympy check must not
    # time out into a False here (the deadline itself is tested below)
    main = [grader.check_answer(r, g, timeout=60) for r, g in cases]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda rg: grader.check_answer(*rg, timeout=60), cases))
    assert threaded == main
    assert main == [True] * len(EQUIVALENT) + [False] * len(WRONG)


def test_deadline_stops_a_runaway_check_in_a_thread(monkeypatch):
    stopped = threading.Event()

    def runaway(pred, gold, seconds):  # stands in for a sympy simplification that never ends
        try:
            while True:
                sum(range(100))
        finally:
            stopped.set()

    monkeypatch.setattr(grader, "_math_equal", runaway)
    with ThreadPoolExecutor(max_workers=1) as pool:
        verdict = pool.submit(grader.check_answer, "\\boxed{x + 1}", "y", timeout=0.2).result()
    assert verdict is False
    assert stopped.wait(30), "the runaway check was not interrupted"


def test_gold_parse_is_cached():
    grader._parse.cache_clear()
    grader._math_equal.cache_clear()
    for pred in ["0.5", "0.25", "\\frac{2}{4}", "0.75"]:
        grader.check_answer(f"\\boxed{{{pred}}}", "\\frac{1}{2}")
    info = grader._parse.cache_info()
    # 4 distinct predictions + 1 gold parsed once; the gold is a cache hit 3 times
    assert info.misses == 5 and info.hits == 3


# ---------------------------------------------------------------------------------------------
# reasoning health
# ---------------------------------------------------------------------------------------------

RESPONSES = [
    "We have 3 apples. Wait, that is wrong. Let me check again: 4 apples. So \\boxed{4}",  # 16 words, 2 markers
    "Alternatively, hmm, the answer is 7",  # 6 words, 2 markers ("Alternatively", "hmm")
    "a b c d a b c d",  # 8 words, no markers, no answer
    "I think the answer is 10 here",  # 7 words, no box; fallback: 10
]


def test_revision_markers_by_hand():
    assert [ev.count_revisions(r) for r in RESPONSES] == [2, 2, 0, 0]
    assert ev.count_revisions("Awaiting the hmmm; sandwich") == 0  # whole words only
    assert ev.count_revisions("WAIT. Let me double-check. Let me re-check") == 3
    words = [len(r.split()) for r in RESPONSES]
    assert words == [16, 6, 8, 7]
    assert ev.revision_density(RESPONSES) == pytest.approx(1000 * 4 / 37)
    assert ev.revision_density(RESPONSES, n_tokens=[100, 100, 100, 100]) == pytest.approx(1000 * 4 / 400)


def test_ngram_repetition_by_hand():
    # 4-grams of "a b c d a b c d": abcd bcda cdab dabc abcd -> 5 grams, 4 distinct
    assert ev.ngram_repetition("a b c d a b c d", n=4) == pytest.approx(1 - 4 / 5)
    assert ev.ngram_repetition([1, 1, 1, 1, 1], n=2) == pytest.approx(1 - 1 / 4)
    assert ev.ngram_repetition([1, 2, 3], n=4) == 0.0  # too short to repeat
    assert ev.ngram_repetition_rate([[1, 2, 1, 2], [5, 6, 7, 8]], n=2) == pytest.approx((1 - 2 / 3 + 0) / 2)


def test_rates_and_length_stats_by_hand():
    assert ev.no_answer_rate(RESPONSES, fallback=False) == 3 / 4
    assert ev.no_answer_rate(RESPONSES, fallback=True) == 1 / 4
    assert ev.truncation_rate([True, False, False, False]) == 0.25
    s = ev.length_stats([10, 20, 30, 40], bins=3)
    assert s["mean"] == 25 and s["min"] == 10 and s["max"] == 40 and s["p50"] == 25
    assert s["std"] == pytest.approx(math.sqrt((225 + 25 + 25 + 225) / 4))
    assert sum(s["hist_counts"]) == 4 and s["hist_edges"][0] == 10 and s["hist_edges"][-1] == 40
    h = ev.health_metrics(RESPONSES, [r.split() for r in RESPONSES], [False, False, False, True])
    assert h["no_box_rate"] == 0.75 and h["no_answer_rate"] == 0.25 and h["truncation_rate"] == 0.25
    assert h["length"]["mean"] == 37 / 4
    assert h["revisions_per_1k_tokens"] == pytest.approx(1000 * 4 / 37)


def test_mean_token_entropy_matches_unpadded_forward(tiny_llama):
    prompts = [[1, 5, 6, 7], [1, 9], [1, 3, 4]]
    responses = [[10, 11, 12], [20, 21, 22, 23, 24], []]  # an empty response has nothing to score
    mean, per_seq = ev.mean_token_entropy(tiny_llama, prompts, responses, batch_size=2)
    # independent: each sequence alone (no padding), entropy written out from the softmax
    ents = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            if not r:
                continue
            logits = tiny_llama(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) - 1 + len(r)].double()  # (T, V)
            prob = logits.softmax(-1)
            ents.append(-(prob * prob.log()).sum(-1))  # (T,)
    assert per_seq[0] == pytest.approx(float(ents[0].mean()), abs=1e-4)
    assert per_seq[1] == pytest.approx(float(ents[1].mean()), abs=1e-4)
    assert math.isnan(per_seq[2])
    assert mean == pytest.approx(float(torch.cat(ents).mean()), abs=1e-4)  # pooled over 8 tokens


# ---------------------------------------------------------------------------------------------
# benchmarks, plots
# ---------------------------------------------------------------------------------------------


def test_benchmark_names_and_aliases():
    assert ev.benchmark_name("aime24") == "AIME 2024"
    assert ev.benchmark_name("math500") == "MATH-500"
    assert ev.benchmark_name("HMMT Feb 2025") == "HMMT Feb 2025"
    assert ev.benchmark_name("embedded:test") is None
    assert set(ev.BENCHMARKS) == {"MATH-500", "AIME 2024", "AIME 2025", "HMMT Feb 2025", "AMC 2023",
                                  "Minerva Math", "OlympiadBench"}


def test_benchmark_without_datasets_package_is_a_named_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ev.BenchmarkUnavailable, match="AIME 2025"):
        ev.load_benchmark("aime25")


def test_offline_benchmark_is_a_clear_cli_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "evaluate.py", "--data", "AIME 2024", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "AIME 2024" in proc.stderr and "HuggingFaceH4/aime_2024" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_local_jsonl_goes_through_data_py(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"problem": "What is 2+3?", "solution": "2 + 3 = 5", "answer": "5"}) + "\n")
    rows = ev.load_problems(str(f))
    assert rows[0]["problem"] == "What is 2+3?" and rows[0]["answer"] == "5"


def test_plot_train_draws_the_keys_that_exist(tmp_path):
    a, b = tmp_path / "opsd" / "metrics.jsonl", tmp_path / "dasd" / "metrics.jsonl"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_text("".join(json.dumps({"step": s, "loss/total": 1 / (s + 1), "entropy/student": 0.5,
                                     "rollout/accuracy": s / 10}) + "\n" for s in range(5)))
    b.write_text("".join(json.dumps({"step": s, "loss/total": 2 / (s + 1), "loss/pull": 0.1, "loss/push": 0.05,
                                     "dasd/frac_pushed": 0.2}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    png = tmp_path / "train_curves.png"
    keys = ev.plot_train([str(a), str(b)], str(png))
    assert keys == ["loss/total", "loss/pull", "loss/push", "entropy/student", "dasd/frac_pushed", "rollout/accuracy"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ev._labels([str(a), str(b)]) == {str(a): "opsd/metrics.jsonl", str(b): "dasd/metrics.jsonl"}


def test_plot_train_cli(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "exposure/alpha": 0.5 + s / 20}) + "\n" for s in range(4)))
    assert ev.main(["--plot_train", str(m), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "train_curves.png").stat().st_size > 0


def test_plot_pass_at_k(tmp_path):
    results = {m: {"b1": {"pass_at_k": {"1": 10 + d, "2": 20 + d, "4": 30 + d}},
                   "b2": {"pass_at_k": {"1": 5 + d, "2": 8 + d}},
                   "macro": {"pass_at_k": {"1": 7.5 + d, "2": 14 + d}}} for m, d in [("base", 0), ("opsd", 5)]}
    png = tmp_path / "pass_at_k.png"
    ev.plot_pass_at_k(results, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# end to end: the embedded model, a few problems, k = 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_evaluate_end_to_end(embedded_dir, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "evaluate.py", "--n_problems", "2", "--k", "2", "--max_new_tokens", "24",
           "--rollout", "hf", "--entropy_batch", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(samples) == 4
    for s in samples:
        assert {"model", "problem_id", "response", "answer", "correct", "length", "truncated"} <= set(s)
        assert 1 <= s["length"] <= 24
        # the recorded verdict is the checker's verdict on the recorded response
        assert s["correct"] == grader.check_answer(s["response"], s["gold"])
        assert s["answer"] == grader.extract_answer(s["response"])
    (label, per), = report["results"].items()
    r = per["embedded:test"]
    assert r["n_problems"] == 2 and r["k"] == 2
    by_problem = {}
    for s in samples:
        by_problem.setdefault(s["problem_id"], []).append(s["correct"])
    assert r["avg_at_k"] == pytest.approx(100 * sum(sum(c) / 2 for c in by_problem.values()) / 2)
    assert r["pass_at_k"]["2"] == pytest.approx(100 * sum(any(c) for c in by_problem.values()) / 2)
    h = r["health"]
    assert h["truncation_rate"] == pytest.approx(sum(s["truncated"] for s in samples) / 4)
    assert h["length"]["mean"] == pytest.approx(sum(s["length"] for s in samples) / 4)
    assert 0 < h["entropy"] < math.log(49152)
    assert "avg@2" in proc.stdout  # the printed table


def test_paired_bootstrap_matches_exhaustive_enumeration():
    # With P = 5 problems there are 5^5 = 3125 equally likely resamples: enumerate them all for the exact
    # bootstrap distribution of the mean difference, and compare its 2.5% / 97.5% quantiles (inverse CDF)
    # with the sampled bootstrap's interval.
    import itertools

    base = [0.0, 0.25, 0.5, 1.0, 0.75]
    new = [0.5, 0.25, 1.0, 0.75, 1.0]
    d = [b - a for a, b in zip(base, new)]
    means = sorted(sum(d[i] for i in pick) / len(d) for pick in itertools.product(range(len(d)), repeat=len(d)))

    def inverse_cdf(q):
        x = means[math.ceil(q * len(means)) - 1]
        below, upto = sum(m < x for m in means) / len(means), sum(m <= x for m in means) / len(means)
        # guard the test itself: q must sit well inside the atom's CDF step, not near a jump, where a sampled
        # bootstrap (standard error ~3e-4 in the CDF here) could land on the neighbouring value
        assert below + 2e-3 < q < upto - 2e-3, (q, below, upto)
        return x

    diff, (lo, hi) = ev.paired_bootstrap(base, new, n_boot=400_000, seed=1)
    assert diff == pytest.approx(sum(d) / len(d))
    assert lo == pytest.approx(inverse_cdf(0.025), abs=1e-9)
    assert hi == pytest.approx(inverse_cdf(0.975), abs=1e-9)
    # identical models: a zero difference with a zero-width interval
    assert ev.paired_bootstrap(base, base) == (0.0, (0.0, 0.0))


def test_paired_differences_of_a_report():
    results = {"a": {"x": {"accuracy_per_problem": [0.0, 0.5, 1.0, 0.0]}},
               "b": {"x": {"accuracy_per_problem": [1.0, 1.0, 1.0, 1.0]}, "macro": {"avg_at_k": 100.0}}}
    p = ev.paired_differences(results)
    assert list(p) == ["b - a | x"]
    assert p["b - a | x"]["diff"] == pytest.approx(62.5) and p["b - a | x"]["n_problems"] == 4
    lo, hi = p["b - a | x"]["ci95"]
    assert 0.0 <= lo <= 62.5 <= hi <= 100.0
    assert "includes 0" not in ev.format_paired(p, 4)[0]


# ---------------------------------------------------------------------------------------------
# the thinking mode of the prompts follows training's (docs/choices.md, choice 57), with Qwen3's real chat template
# ---------------------------------------------------------------------------------------------

QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EMPTY_THINK = "<think>\n\n</think>"


def qwen3_template():
    """trl's copy of Qwen3's chat template (trl is in requirements.txt)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    assert spec is not None and spec.origin, "trl is not installed"
    with open(os.path.join(os.path.dirname(spec.origin), "chat_templates", "qwen3.jinja")) as f:
        return f.read()


def qwen3_model_dir(path, student_thinking="absent"):
    """A model folder without weights: a byte-level tokenizer (every byte a token, so decoding gives back the exact
    text, newlines included) with Qwen3's special tokens and chat template, and train.py's train_config.json
    recording student_thinking (no file for "absent")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(QWEN3_SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = qwen3_template()
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(path)
    if student_thinking != "absent":
        with open(os.path.join(path, ev.TRAIN_CONFIG), "w") as f:
            json.dump({"method": "opsd", "student_thinking": student_thinking, "teacher_thinking": True}, f)
    return str(path)


PROBLEMS = {"bench": [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "Solve x + 1 = 4.", "answer": "3"}]}


@pytest.mark.parametrize("recorded, think_block", [(False, True), (True, False), (None, False), ("absent", False)])
def test_prompts_follow_the_recorded_student_thinking(tmp_path, recorded, think_block):
    from transformers import AutoTokenizer

    import teacher

    folder = qwen3_model_dir(tmp_path / "final", recorded)
    enable, source, warning = ev.thinking_mode("auto", folder)
    assert enable == (None if recorded == "absent" else recorded) and warning is None
    assert source == ("template default" if recorded == "absent" else ev.TRAIN_CONFIG)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = ev.student_prompts(tok, PROBLEMS, enable)["bench"]
    for row, ids in zip(PROBLEMS["bench"], prompts):
        assert ids == teacher.student_prompt_ids(tok, row["problem"], enable_thinking=enable)
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>user\n" + row["problem"]) and "<|im_start|>assistant\n" in text
        assert (EMPTY_THINK in text) == think_block
        assert text.endswith("<|im_start|>assistant\n" + (EMPTY_THINK + "\n\n" if think_block else ""))
    if recorded is False:  # what train.py's --student_thinking false student saw, not the template's default
        assert prompts != ev.student_prompts(tok, PROBLEMS)["bench"]


@pytest.mark.parametrize("flag, recorded, enable, warns", [
    ("true", False, True, True), ("false", False, False, False), ("false", True, False, True),
    ("default", False, None, True), ("default", None, None, False), ("true", None, True, True),
    ("false", "absent", False, False), ("true", "absent", True, False),
])
def test_explicit_thinking_wins_and_warns_when_it_contradicts_the_checkpoint(tmp_path, flag, recorded, enable, warns):
    folder = tmp_path / "m"
    folder.mkdir()
    if recorded != "absent":
        (folder / ev.TRAIN_CONFIG).write_text(json.dumps({"student_thinking": recorded}))
    got, source, warning = ev.thinking_mode(flag, str(folder))
    assert (got, source) == (enable, f"--thinking {flag}")
    assert (warning is not None) == warns
    if warns:  # one line naming both values and the file
        assert "\n" not in warning and f"--thinking {flag}" in warning
        assert f"student_thinking={json.dumps(recorded)}" in warning and ev.TRAIN_CONFIG in warning


def test_thinking_without_a_model_folder():
    assert ev.thinking_mode("auto", None) == (None, "template default", None)  # the embedded model
    assert ev.thinking_mode("auto", "Qwen/Qwen3-1.7B") == (None, "template default", None)  # a hub name
    assert ev.thinking_mode("false", None) == (False, "--thinking false", None)


def test_a_broken_train_config_is_a_one_line_error(tmp_path):
    (tmp_path / ev.TRAIN_CONFIG).write_text('{"student_thinking": fals')
    with pytest.raises(ValueError, match="train_config.json: cannot read as JSON"):
        ev.thinking_mode("auto", str(tmp_path))
    (tmp_path / ev.TRAIN_CONFIG).write_text('{"student_thinking": "no"}')
    with pytest.raises(ValueError, match="field 'student_thinking'"):
        ev.thinking_mode("auto", str(tmp_path))


def test_main_warns_and_reports_the_thinking_mode_of_every_model(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a" / "final", tmp_path / "b" / "final"
    for folder, recorded in ((a, False), (b, True)):
        folder.mkdir(parents=True)
        (folder / ev.TRAIN_CONFIG).write_text(json.dumps({"student_thinking": recorded}))
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    seen = {}

    def fake_evaluate_model(path, label, benches, args, out_samples, enable_thinking=None):  # no model is loaded
        seen[path] = enable_thinking
        return {"x": {"avg_at_k": 0.0, "pass_at_k": {"1": 0.0}, "maj_at_k": 0.0, "accuracy_per_problem": [0.0]}}

    monkeypatch.setattr(ev, "evaluate_model", fake_evaluate_model)
    monkeypatch.setattr(ev, "plot_pass_at_k", lambda results, path: None)
    base = ["--model", str(a), "--model", str(b), "--data", str(problems), "--rollout", "hf", "--k", "1"]
    assert ev.main(base + ["--out", str(tmp_path / "auto")]) == 0
    assert seen == {str(a): False, str(b): True}
    assert "warning" not in capsys.readouterr().err
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["thinking"] == {"a/final": {"enable_thinking": False, "source": ev.TRAIN_CONFIG},
                                  "b/final": {"enable_thinking": True, "source": ev.TRAIN_CONFIG}}

    assert ev.main(base + ["--thinking", "true", "--out", str(tmp_path / "forced")]) == 0
    assert seen == {str(a): True, str(b): True}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(a) in err[0] and "student_thinking=false" in err[0]  # only a contradicts it
    report = json.loads((tmp_path / "forced" / "report.json").read_text())
    assert report["thinking"]["a/final"] == {"enable_thinking": True, "source": "--thinking true"}


def test_bad_flags_and_paths_are_one_line_errors_before_any_model_loads(tmp_path, monkeypatch):
    import model as model_lib

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    def no_hub(name, **kwargs):  # a hub name that does not exist, without asking the hub
        raise FileNotFoundError(f"cannot load model {name!r}: not a local folder and not reachable on the hub")

    monkeypatch.setattr(ev, "evaluate_model", no_model)
    monkeypatch.setattr(model_lib, "load_tokenizer_and_config", no_hub)
    missing, out = tmp_path / "runs" / "nope" / "final", tmp_path / "out"
    for argv, start in [
        (["--model", str(missing)], f"evaluate.py: --model {missing}: no such folder; give a model folder"),
        (["--model", "nobody/nothing"], "evaluate.py: --model nobody/nothing: no such folder, and no model of that "
                                        "name on the hub"),
        (["--k", "0"], "evaluate.py: --k 0: must be >= 1"),
        (["--n_problems", "0"], "evaluate.py: --n_problems 0: must be >= 1"),
        (["--max_new_tokens", "0"], "evaluate.py: --max_new_tokens 0: must be >= 1"),
        (["--temperature", "-0.5"], "evaluate.py: --temperature -0.5: must be a finite number >= 0"),
        (["--top_p", "0"], "evaluate.py: --top_p 0.0: must be in (0, 1]"),
        (["--top_p", "1.5"], "evaluate.py: --top_p 1.5: must be in (0, 1]"),
        (["--batch_problems", "0"], "evaluate.py: --batch_problems 0: must be >= 1"),
        (["--gpu_memory_utilization", "0"], "evaluate.py: --gpu_memory_utilization 0.0: must be in (0, 1]"),
        (["--data", str(tmp_path / "gone.jsonl")], f"evaluate.py: --data {tmp_path / 'gone.jsonl'}: no such file"),
        (["--data", str(tmp_path)], f"evaluate.py: --data {tmp_path}: a folder"),
    ]:
        with pytest.raises(SystemExit) as e:
            ev.main(argv + ["--out", str(out)])
        lines = str(e.value).splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (argv, str(e.value))
        assert "Traceback" not in str(e.value)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(SystemExit) as e:  # every bad flag at once, one line each
        ev.main(["--k", "0", "--top_p", "2", "--out", str(out)])
    assert str(e.value).splitlines() == ["evaluate.py: --k 0: must be >= 1",
                                         "evaluate.py: --top_p 2.0: must be in (0, 1] (1: off)"]
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    ok = ["--model", str(tmp_path), "--data", str(problems), "--data", "embedded:test", "--data", "aime24", "--k", "1",
          "--temperature", "0", "--top_p", "1", "--gpu_memory_utilization", "1"]
    assert ev.check_args(ev.build_parser().parse_args(ok)) is None  # the edges of each range are allowed


def test_readme_evaluate_command_parses():
    import shlex

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("python evaluate.py --model runs/")
    cmd = text[start:text.index("\n```", start)].replace("\\\n", " ")
    args = ev.build_parser().parse_args(shlex.split(cmd, comments=True)[2:])
    assert args.data == ["aime24", "aime25"] and args.model[0].endswith("/final")
    assert args.thinking == "auto"  # the checkpoint's own student_thinking (false in that recipe)
