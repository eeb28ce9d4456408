"""experiments/long_run.py: the curve of a long run, each point paired against the start point."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import evaluate  # noqa: E402
import long_run  # noqa: E402


def report(label, counts, k=4):
    acc = [c / k for c in counts]
    return {"config": {"k": k}, "models": {label: label},
            "results": {label: {"embedded:test": {"avg_at_k": 100 * sum(acc) / len(acc), "accuracy_per_problem": acc,
                                                  "k": k, "n_problems": len(acc)}}}}


def test_curves_pair_every_evaluation_with_the_start(tmp_path):
    start = [0, 1, 2, 4, 0, 3] * 10
    later = {8: [1, 1, 3, 4, 2, 3] * 10, 16: [0, 0, 1, 2, 0, 1] * 10}
    run = tmp_path / "opsd"
    run.mkdir()
    (run / "start_report.json").write_text(json.dumps(report("warmstart", start)))
    for s, counts in later.items():
        (run / f"eval_step{s}").mkdir()
        (run / f"eval_step{s}" / "report.json").write_text(json.dumps(report("final", counts)))
    samples = [{"response": "9 - 7 = 2.\nAnswer: \\boxed{1.33}", "gold": "2"},  # a box cut loose from its chain
               {"response": "4 + 3 = 7.\nAnswer: \\boxed{7}", "gold": "7"}]
    (run / "eval_step16" / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    c = long_run.curves(str(tmp_path))["opsd"]
    assert c["box_chain"] == [None, None, 0.5] and c["cut_loose"] == [None, None, 1]
    assert c["chain_right"] == [None, None, 2] and c["n_samples"] == 240
    assert c["steps"] == [0, 8, 16]
    for i, s in enumerate((8, 16), start=1):
        assert c["diff"][i] == pytest.approx(100 * (sum(later[s]) - sum(start)) / (4 * len(start)))
        d, (lo, hi) = evaluate.paired_bootstrap([x / 4 for x in start], [x / 4 for x in later[s]])
        assert (c["lo"][i], c["hi"][i]) == pytest.approx((100 * lo, 100 * hi))
    assert c["avg"][0] == pytest.approx(100 * sum(start) / 240) and c["diff"][0] == 0.0


def test_steps_must_be_a_multiple_of_the_evaluation_period():
    with pytest.raises(SystemExit):
        long_run.main(["--name", "x", "--steps", "40", "--every", "6"])


def test_a_curve_contained_in_a_longer_run_is_recognized_and_styles_follow_the_settings():
    short = {"steps": [0, 8], "diff": [0.0, -3.5], "lo": [0.0, -6.0], "hi": [0.0, -1.0]}
    longer = {"steps": [0, 8, 16], "diff": [0.0, -3.5, -7.9], "lo": [0.0, -6.0, -11.5], "hi": [0.0, -1.0, -4.2]}
    assert long_run.is_prefix(short, longer) and not long_run.is_prefix(longer, short)
    assert not long_run.is_prefix(short, dict(longer, diff=[0.0, -3.25, -7.9]))  # another run that starts alike
    assert not long_run.is_prefix(short, short)
    masked = {"train_args": "--lr 1e-5 --method dasd --distill_mask_answer true"}
    assert long_run.style(masked) == ("dasd atesd", "--")  # train.py's default exposure is the controller
    assert long_run.style({"train_args": "--method opsd --exposure full --distill_mask_answer false"}) == \
        ("opsd full", "-")
