"""experiments/demo.py: the summary.json it writes (format, consistency with evaluate.py's report)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import demo  # noqa: E402
import evaluate  # noqa: E402

MACHINE = {"cpu": "some CPU", "cores": 2, "bf16_matmul_gflops": 390.0, "fp32_matmul_gflops": 176.0, "gpu": None}


def fake_report(start, trained, k=4):
    """A report.json as evaluate.py writes it for two models, from per-problem correct counts out of k."""
    def result(counts):
        acc = [c / k for c in counts]
        return {"embedded:test": {"avg_at_k": 100 * sum(acc) / len(acc), "pass_at_k": {"1": 100 * sum(acc) / len(acc)},
                                  "accuracy_per_problem": acc, "k": k, "n_problems": len(acc)}}

    results = {"warmstart": result(start), "final": result(trained)}
    return {"config": {"k": k}, "results": results, "paired": evaluate.paired_differences(results)}


def test_summary_from_a_report_has_the_fields_and_consistent_numbers():
    start, trained = [0, 1, 2, 4, 0, 3] * 10, [1, 1, 3, 4, 2, 3] * 10
    s = demo.make_summary(fake_report(start, trained), method="sft", steps=8, minutes=12.34, machine_info=MACHINE,
                          start_label="warmstart", trained_label="final")
    demo.check_summary(s)
    assert set(demo.SUMMARY_KEYS) <= set(s)
    # independent: the means of the counts, in percent
    assert s["start_avg"] == pytest.approx(100 * sum(start) / (4 * 60))
    assert s["trained_avg"] == pytest.approx(100 * sum(trained) / (4 * 60))
    assert s["diff"] == pytest.approx(100 * (sum(trained) - sum(start)) / (4 * 60))
    assert s["n_problems"] == 60 and s["k"] == 4 and s["method"] == "sft"
    assert s["ci95"][0] > 0  # trained >= start on every problem and better on half of them
    json.dumps(s)  # serializable as written


@pytest.mark.parametrize("field, value, message", [
    ("ci95", [3.0, 1.0], "lo <= hi"),
    ("diff", 99.0, "is not trained_avg - start_avg"),
    ("start_avg", 140.0, "percentage"),
    ("n_problems", 0, "n_problems"),
    ("machine", {"cpu": "x"}, "machine"),
])
def test_check_summary_names_the_bad_field(field, value, message):
    s = demo.make_summary(fake_report([0, 1, 2, 3], [1, 2, 3, 4]), method="sft", steps=1, minutes=1.0,
                          machine_info=MACHINE, start_label="warmstart", trained_label="final")
    s[field] = value
    with pytest.raises(ValueError, match=message):
        demo.check_summary(s)
    del s[field]
    with pytest.raises(ValueError, match=f"missing field '{field}'"):
        demo.check_summary(s)


@pytest.mark.parametrize("folder", ["demo", "demo_fp32"])
def test_committed_demo_summary_is_well_formed(folder):
    path = os.path.join(ROOT, "results", folder, "summary.json")
    if not os.path.exists(path):
        pytest.skip("no results/demo/summary.json committed")
    with open(path) as f:
        s = json.load(f)
    demo.check_summary(s)
    assert s["n_problems"] >= 200


@pytest.mark.e2e
def test_warm_start_is_built_once_and_then_reused(tmp_path, monkeypatch, embedded_dir):
    # the set-up path of `make demo` with a 1-step recipe: a model folder appears in the cache, the work folder is
    # gone, and a second call returns the same folder without training again
    monkeypatch.setattr(demo.modellib, "cache_root", lambda: str(tmp_path))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    recipe = ["--method", "sft", "--steps", "1", "--prompts_per_step", "2", "--micro_batch", "2",
              "--max_new_tokens", "8", "--dtype", "float32", "--rollout", "hf"]
    out = demo.ensure_warm_start(sys.executable, recipe)
    assert out == demo.warm_start_dir(recipe) and out.startswith(str(tmp_path))
    assert os.path.exists(os.path.join(out, "config.json")) and os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(out + ".run")
    stamp = os.path.getmtime(os.path.join(out, "config.json"))
    assert demo.ensure_warm_start(sys.executable, recipe) == out
    assert os.path.getmtime(os.path.join(out, "config.json")) == stamp
    assert demo.warm_start_dir(recipe[:-2]) != out  # another recipe, another cache entry


def test_demo_refuses_to_continue_a_run_with_other_settings(tmp_path):
    # finished stages are reused, so a folder started with other settings would mix two runs in one summary
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_args.json").write_text(json.dumps({"method": "opsd", "steps": 8}))
    with pytest.raises(SystemExit, match="other settings .*method"):
        demo.main(["--out", str(out), "--method", "dasd"])


def test_separate_evaluations_pair_like_one_joint_run():
    # the start point is evaluated once in the set-up and the trained model in the timed part; pairing their two
    # reports gives what one evaluate.py run of both models reports
    start, trained = [0, 1, 2, 4, 0, 3] * 10, [1, 1, 3, 4, 2, 3] * 10
    joint = fake_report(start, trained)
    one = lambda label: {"config": {"k": 4}, "models": {label: label}, "results": {label: joint["results"][label]}}  # noqa: E731
    merged = demo.paired_report(one("warmstart"), one("final"))
    assert list(merged["paired"].values()) == list(joint["paired"].values())
    s = demo.make_summary(merged, method="sft", steps=8, minutes=1.0, machine_info=MACHINE, start_label="start",
                          trained_label="trained")
    demo.check_summary(s)
    assert s["diff"] == pytest.approx(100 * (sum(trained) - sum(start)) / (4 * 60))
    fewer = {"config": {"k": 4}, "models": {}, "results": {"final": fake_report(start[:30], trained[:30])["results"]["final"]}}
    with pytest.raises(ValueError, match="differ in problems or k"):
        demo.paired_report(one("warmstart"), fewer)


def test_warm_start_recipe_takes_the_measured_dtype_and_keys_the_cache_by_it():
    # never bf16 pinned: the recipe carries the dtype asked for (default: this CPU's faster matmul), and a bf16 and
    # an fp32 build are two cache entries
    r16, r32 = demo.warm_start_recipe("bfloat16"), demo.warm_start_recipe("float32")
    assert r16[r16.index("--dtype") + 1] == "bfloat16" and r32[r32.index("--dtype") + 1] == "float32"
    assert demo.warm_start_dir(r16) != demo.warm_start_dir(r32)
    assert demo.warm_start_recipe() == demo.warm_start_recipe(demo.machine_dtype())
    assert demo.machine_dtype() in ("bfloat16", "float32")
