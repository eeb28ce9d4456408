"""experiments/miniature.py: the bookkeeping that makes the side-by-side comparison trustworthy.

No training here (the runs take minutes each): every method's command must be one train.py accepts
with the intended settings, the budget guard must refuse mixing budgets, the validation slice must be
disjoint from the training rows, and the report must aggregate seeds correctly and never silently
replace an earlier summary.
"""

import hashlib
import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import evaluate  # noqa: E402
import miniature  # noqa: E402
import plumbing  # noqa: E402
import train  # noqa: E402


def args_for(tmp_path, *extra):
    args = miniature.build_parser().parse_args(["--out", str(tmp_path / "mini"), *extra])
    args.dtype = miniature.demo.resolve_dtype(args.dtype)  # as main() does: measured once, then fixed
    return args


@pytest.mark.parametrize("method", list(miniature.METHODS))
def test_every_method_command_is_valid_train_config(tmp_path, method):
    args = args_for(tmp_path, "--fixed_alpha", "0.25")
    cmd = miniature.train_cmd(args, method, 1, 3e-5, "d.jsonl", str(tmp_path / "run"))
    assert cmd[1] == "train.py" and "--resume" not in cmd
    cfg = train.parse_config(cmd[2:])
    plumbing.check_config(cfg)  # raises SystemExit on a bad combination
    # the shared budget is what the flags say, for every method alike
    assert (cfg.steps, cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.lr, cfg.seed) == \
        (args.steps, args.prompts_per_step, args.samples_per_prompt, args.max_new_tokens, 3e-5, 1)
    expected = {"sft": ("sft", "full"), "grpo": ("grpo", "full"), "opsd": ("opsd", "full"),
                "opsd_fixed": ("opsd", "fixed"), "dasd": ("dasd", "full"), "dasd_adv": ("dasd_adv", "full"),
                "atesd": ("opsd", "atesd"), "dasd_atesd": ("dasd", "atesd"),
                "opsd_random": ("opsd", "random"), "no_reference": ("opsd", "fixed"),
                "wrong_reference": ("opsd", "full"), "teacher_free": ("teacher_free", "full"),
                "dasd_pull": ("dasd", "full"), "dasd_push": ("dasd", "full")}[method]
    assert (cfg.method, cfg.exposure) == expected
    # each control differs from its method by exactly what it says (docs/choices.md, choice 25)
    assert (cfg.alpha == 0 and not cfg.teacher_show_answer) == (method == "no_reference")
    assert (cfg.teacher_context == "wrong") == (method == "wrong_reference")
    assert (cfg.push_weight, cfg.pull_weight) == {"dasd_pull": (0, 1), "dasd_push": (1, 0)}.get(method, (1, 1))
    # every run starts from the same model in the same dtype: the cached warm start unless --model says otherwise
    assert (cfg.model, cfg.dtype, cfg.micro_batch) == (
        miniature.demo.warm_start_dir(miniature.demo.warm_start_recipe(args.dtype)), args.dtype, args.micro_batch)
    if method == "opsd_fixed":
        assert cfg.alpha == 0.25
    if cfg.exposure == "atesd":
        assert [cfg.hold, cfg.lookahead, cfg.batch_decisions] == args.atesd
    if cfg.exposure == "random":  # the ablation draws as often as the controller decides
        assert cfg.hold == args.atesd[0]


@pytest.mark.parametrize("method", list(miniature.METHODS))
def test_distill_args_reach_the_methods_with_a_teacher_only(tmp_path, method):
    args = args_for(tmp_path, "--model", "reader", "--fixed_alpha", "0.25",
                    "--distill_args", "--distill_mask_answer true --clip none")
    cfg = train.parse_config(miniature.train_cmd(args, method, 0, 1e-5, "d.jsonl", str(tmp_path / "run"))[2:])
    plumbing.check_config(cfg)
    on_samples = method not in ("sft", "grpo")  # the losses on the student's samples: the teacher's, and teacher_free
    assert (cfg.distill_mask_answer, cfg.clip == 0 or cfg.clip is None) == (on_samples, on_samples)
    assert cfg.model == miniature.demo.warm_start_dir(miniature.demo.warm_start_recipe(args.dtype, "reader"))
    assert miniature.budget(args)["distill_args"] == "--distill_mask_answer true --clip none"
    assert "distill_args" not in miniature.budget(args_for(tmp_path))  # older folders keep their recorded budget


def test_resume_flag_when_a_checkpoint_exists(tmp_path):
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    cmd = miniature.train_cmd(args_for(tmp_path), "dasd", 0, 1e-5, "d.jsonl", str(run))
    assert cmd[-1] == "--resume"


def test_budget_guard_refuses_a_different_budget(tmp_path):
    miniature.check_budget(args_for(tmp_path, "--steps", "8"))
    miniature.check_budget(args_for(tmp_path, "--steps", "8"))  # same budget: fine
    with pytest.raises(SystemExit, match="--steps was 8 now 9"):
        miniature.check_budget(args_for(tmp_path, "--steps", "9"))


def test_skipping_the_entropy_pass_reaches_evaluate_and_keeps_the_budget(tmp_path):
    plain, lean = args_for(tmp_path), args_for(tmp_path, "--no_entropy")
    assert not evaluate.build_parser().parse_args(miniature.eval_cmd(plain, "m", 0, "b", "o", 5)[2:]).no_entropy
    assert evaluate.build_parser().parse_args(miniature.eval_cmd(lean, "m", 0, "b", "o", 5)[2:]).no_entropy
    miniature.check_budget(plain)
    miniature.check_budget(lean)  # the same folder: only a health column differs, not the comparison


def test_validation_slice_is_disjoint_and_mixed(tmp_path):
    args = args_for(tmp_path, "--n_val", "30")
    train_path, val_path = miniature.prepare_data(args)
    tr = [json.loads(x) for x in open(train_path)]
    va = [json.loads(x) for x in open(val_path)]
    assert len(va) == 30 and len(tr) + len(va) == 3000
    assert not {r["id"] for r in tr} & {r["id"] for r in va}
    assert not {r["problem"] for r in tr} & {r["problem"] for r in va}
    assert {r["level"] for r in va} == {1, 2, 3}
    miniature.prepare_data(args)  # a second call finds the same files and accepts them
    with open(val_path, "a") as f:
        f.write(json.dumps(tr[0]) + "\n")
    with pytest.raises(SystemExit, match="val.jsonl"):
        miniature.prepare_data(args)


def fake_report(path, avg, pass_k, no_answer, length, per_problem=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    res = {"avg_at_k": avg, "maj_at_k": avg, "pass_at_k": {"1": avg, "2": pass_k},
           "health": {"length": {"mean": length}, "truncation_rate": 0.5, "no_box_rate": 0.9,
                      "no_answer_rate": no_answer, "entropy": 1.5, "revisions_per_1k_tokens": 0.1, "rep4": 0.05}}
    if per_problem is not None:
        res["accuracy_per_problem"] = per_problem
    with open(path, "w") as f:
        json.dump({"results": {"m": {"embedded:test": res}}}, f)


def test_report_means_spread_and_no_silent_overwrite(tmp_path):
    args = args_for(tmp_path, "--k", "2")
    runs = os.path.join(args.out, "runs")
    fake_report(os.path.join(runs, "opsd", "seed0", "eval", "report.json"), 2.0, 4.0, 0.5, 100)
    fake_report(os.path.join(runs, "opsd", "seed1", "eval", "report.json"), 4.0, 8.0, 0.3, 120)
    fake_report(os.path.join(runs, "base", "seed0", "eval", "report.json"), 0.0, 0.0, 0.9, 128)
    # a run without its report (still training) is not counted
    os.makedirs(os.path.join(runs, "dasd", "seed0", "train"))
    metrics = os.path.join(runs, "opsd", "seed0", "train", "metrics.jsonl")
    os.makedirs(os.path.dirname(metrics))
    with open(metrics, "w") as f:
        f.write('{"step": 1, "entropy/student": 2.0}\n{"step": 2, "entropy/student": 3.0}\n{"step": 3, "entr')
    metrics1 = metrics.replace("seed0", "seed1")
    os.makedirs(os.path.dirname(metrics1))
    with open(metrics1, "w") as f:
        f.write('{"step": 1, "entropy/student": 4.0}\n{"step": 2, "entropy/student": 5.0}\n')
    os.makedirs(args.out, exist_ok=True)
    s = miniature.write_report(args)
    assert list(s["methods"]) == ["base", "opsd"]
    e = s["methods"]["opsd"]
    assert e["seeds"] == [0, 1]
    assert e["mean"]["avg_at_k"] == 3.0 and e["sd"]["avg_at_k"] == pytest.approx(statistics.stdev([2.0, 4.0]))
    assert e["mean"]["pass@2"] == 6.0 and e["mean"]["length"] == 110
    assert e["curves"]["entropy/student"] == {"steps": [1, 2], "mean": [3.0, 4.0]}
    table = open(os.path.join(args.out, "table.md")).read()
    assert "| opsd | 2 | 3.0 ± 1.4 |" in table and "| base | 1 | 0.0 ± 0.0 |" in table
    assert os.path.exists(os.path.join(args.out, "pass_at_k.png"))
    assert os.path.exists(os.path.join(args.out, "train_curves.png"))
    # the same inputs give the same summary: nothing is set aside
    miniature.write_report(args)
    assert [f for f in os.listdir(args.out) if f.startswith("summary.")] == ["summary.json"]
    # a new finished run changes the summary: the old one is kept under its time
    fake_report(os.path.join(runs, "base", "seed1", "eval", "report.json"), 0.0, 0.0, 0.8, 128)
    miniature.write_report(args)
    kept = [f for f in os.listdir(args.out) if f.startswith("summary.") and f != "summary.json"]
    assert len(kept) == 1
    assert json.load(open(os.path.join(args.out, kept[0])))["methods"]["base"]["seeds"] == [0]
    assert json.load(open(os.path.join(args.out, "summary.json")))["methods"]["base"]["seeds"] == [0, 1]


def test_selection_rule_and_ties(tmp_path):
    """Highest Avg@k, then Pass@k, then fewest missing answers; the first candidate wins a full tie."""
    args = args_for(tmp_path, "--k", "2")
    reports = {1: (0.0, 0.0, 0.9), 2: (0.0, 0.0, 0.7), 3: (0.0, 0.0, 0.8)}

    def run(v):
        path = str(tmp_path / f"r{v}" / "report.json")
        fake_report(path, reports[v][0], reports[v][1], reports[v][2], 100)
        return path

    out = str(tmp_path / "sel.json")
    assert miniature.select(args, "lr", [1, 2, 3], "x{}", run, out, lambda _: None) == 2
    assert json.load(open(out))["chosen"] == 2
    reports[3] = (0.0, 4.0, 1.0)  # a higher Pass@k beats fewer missing answers
    assert miniature.select(args, "lr", [1, 2, 3], "x{}", run, out, lambda _: None) == 3
    reports[1] = (2.0, 0.0, 1.0)  # and a higher Avg@k beats both
    assert miniature.select(args, "lr", [1, 2, 3], "x{}", run, out, lambda _: None) == 1
    reports.update({1: (0.0, 0.0, 0.5), 2: (0.0, 0.0, 0.5), 3: (0.0, 0.0, 0.5)})
    assert miniature.select(args, "lr", [3, 1, 2], "x{}", run, out, lambda _: None) == 3


def test_paired_comparisons_average_seeds_per_problem(tmp_path):
    """vs start / vs OPSD: per-problem accuracy averaged over each method's seeds, then the paired bootstrap."""
    import numpy as np

    import evaluate

    args = args_for(tmp_path, "--k", "2")
    runs = os.path.join(args.out, "runs")
    rows = {("base", 0): [0.0, 0.5, 1.0, 0.5], ("base", 1): [0.5, 0.5, 1.0, 0.0],
            ("opsd", 0): [0.5, 0.5, 0.5, 0.5], ("grpo", 0): [1.0, 1.0, 1.0, 0.5], ("grpo", 1): [0.5, 1.0, 1.0, 1.0],
            ("grpo", 2): [1.0, 0.5, 1.0, 1.0]}
    for (m, seed), acc in rows.items():
        fake_report(os.path.join(runs, m, f"seed{seed}", "eval", "report.json"), 0.0, 0.0, 0.0, 50, per_problem=acc)
    fake_report(os.path.join(runs, "sft", "seed0", "eval", "report.json"), 0.0, 0.0, 0.0, 50)  # an old report
    os.makedirs(args.out, exist_ok=True)
    summary = miniature.write_report(args)
    base = np.mean([rows["base", 0], rows["base", 1]], axis=0)  # per problem
    grpo = np.mean([rows["grpo", seed] for seed in range(3)], axis=0)
    opsd = np.array(rows["opsd", 0])
    p = summary["methods"]["grpo"]["paired"]
    assert p["base"]["diff"] == pytest.approx(100 * (grpo - base).mean())  # +37.5 points by hand
    assert p["base"]["diff"] == pytest.approx(37.5)
    assert p["opsd"]["diff"] == pytest.approx(100 * (grpo - opsd).mean())
    _, (lo, hi) = evaluate.paired_bootstrap(list(base), list(grpo))
    assert p["base"]["ci95"] == pytest.approx([100 * lo, 100 * hi]) and lo <= (grpo - base).mean() <= hi
    assert p["base"]["n_problems"] == 4
    assert "base" not in summary["methods"]["base"]["paired"] and list(summary["methods"]["opsd"]["paired"]) == ["base"]
    assert summary["methods"]["sft"]["paired"] == {"base": None, "opsd": None}  # no per-problem accuracy: no pairing
    table = open(os.path.join(args.out, "table.md")).read()
    line = next(x for x in table.splitlines() if x.startswith("| grpo |"))
    assert f"{p['base']['diff']:+.1f} [{p['base']['ci95'][0]:+.1f}, {p['base']['ci95'][1]:+.1f}]" in line
    assert summary["contrasts"] == {}  # none of the contrasted pairs ran


def test_contrasts_are_first_minus_second_paired_over_problems(tmp_path):
    """atesd - opsd_random and the others under the table: per-problem means over seeds, then the bootstrap."""
    import numpy as np

    import evaluate

    args = args_for(tmp_path, "--k", "2")
    runs = os.path.join(args.out, "runs")
    rows = {("atesd", 0): [1.0, 0.5, 0.5, 0.0, 1.0], ("atesd", 1): [0.5, 0.5, 1.0, 0.0, 1.0],
            ("opsd_random", 0): [0.5, 0.5, 0.0, 0.0, 1.0], ("dasd", 0): [0.0, 0.0, 0.5, 0.5, 0.0]}
    for (m, seed), acc in rows.items():
        fake_report(os.path.join(runs, m, f"seed{seed}", "eval", "report.json"), 0.0, 0.0, 0.0, 50, per_problem=acc)
    os.makedirs(args.out, exist_ok=True)
    summary = miniature.write_report(args)
    assert list(summary["contrasts"]) == ["atesd - opsd_random"]  # dasd_atesd did not run
    c = summary["contrasts"]["atesd - opsd_random"]
    atesd = np.mean([rows["atesd", 0], rows["atesd", 1]], axis=0)
    rand = np.array(rows["opsd_random", 0])
    assert c["diff"] == pytest.approx(100 * (atesd - rand).mean()) and c["diff"] == pytest.approx(20.0)
    _, (lo, hi) = evaluate.paired_bootstrap(list(rand), list(atesd))
    assert c["ci95"] == pytest.approx([100 * lo, 100 * hi]) and c["n_problems"] == 5
    table = open(os.path.join(args.out, "table.md")).read()
    assert f"atesd - opsd_random: {c['diff']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]" in table


def test_start_build_fingerprint_is_recorded_and_a_mixed_table_says_so(tmp_path):
    # the fingerprint is the sha256 of the weight files, computed here independently with hashlib
    a, b = tmp_path / "a", tmp_path / "b"
    for d, payload in ((a, b"\x00\x01" * 1000), (b, b"\x00\x01" * 999 + b"\x00\x02")):
        d.mkdir()
        (d / "model.safetensors").write_bytes(payload)
        (d / "config.json").write_text("{}")  # not a weight file: left out
    expect = hashlib.sha256(b"\x00\x01" * 1000).hexdigest()[:12]
    assert miniature.weights_fingerprint(str(a)) == expect
    assert miniature.weights_fingerprint(str(b)) != expect
    args = args_for(tmp_path, "--k", "2")
    runs = os.path.join(args.out, "runs")
    for method, seed, build in (("base", 0, None), ("opsd", 0, "abc"), ("opsd", 1, "abc")):
        folder = os.path.join(runs, method, f"seed{seed}")
        fake_report(os.path.join(folder, "eval", "report.json"), 2.0, 4.0, 0.5, 100)
        if build:
            miniature.write_json(os.path.join(folder, "start.json"), {"start": "x", "weights_sha256": build})
    s = miniature.write_report(args)
    assert s["methods"]["opsd"]["start_builds"] == ["abc", "abc"] and s["methods"]["base"]["start_builds"] == [None]
    table = open(os.path.join(args.out, "table.md")).read()
    assert "Start-model builds (sha256 of the weights): abc: opsd/seed0, opsd/seed1; not recorded: base/seed0" in table
    # one build everywhere: no line
    miniature.write_json(os.path.join(runs, "base", "seed0", "start.json"), {"start": "x", "weights_sha256": "abc"})
    assert "Start-model builds" not in miniature.table(miniature.summarize(args), 2)


def test_vs_start_pairs_each_unit_with_its_own_builds_start_point(tmp_path):
    """Units trained from two builds of the start model: 'vs start' subtracts, per unit, its own build's start."""
    import numpy as np

    args = args_for(tmp_path, "--k", "2")
    runs = os.path.join(args.out, "runs")
    rows = {("base", 0, None): [0.0, 0.5, 1.0, 0.5],  # the first build, recorded before start.json existed
            ("start_builds/abc", 0, "abc"): [0.5, 0.5, 0.5, 0.0],  # a later build, evaluated on its own
            ("sft", 0, None): [1.0, 1.0, 1.0, 0.5],
            ("opsd", 0, "abc"): [0.0, 0.5, 0.0, 0.0], ("opsd", 1, "abc"): [0.5, 0.0, 0.5, 0.5],
            ("grpo", 0, None): [0.5, 0.5, 1.0, 1.0], ("grpo", 1, "abc"): [1.0, 1.0, 0.5, 0.5],
            ("dasd", 0, "zzz"): [0.5, 0.5, 0.5, 0.5]}  # a build whose start point was never evaluated
    for (unit, seed, build), acc in rows.items():
        folder = os.path.join(runs, unit, f"seed{seed}")
        fake_report(os.path.join(folder, "eval", "report.json"), 100 * float(np.mean(acc)), 0.0, 0.0, 50,
                    per_problem=acc)
        if build:
            miniature.write_json(os.path.join(folder, "start.json"), {"start": "x", "weights_sha256": build})
    s = miniature.write_report(args)
    a = {k[:2]: np.array(v) for k, v in rows.items()}
    old, new = a["base", 0], a["start_builds/abc", 0]
    by_hand = {"sft": (a["sft", 0] - old).mean(),
               "opsd": ((a["opsd", 0] - new) + (a["opsd", 1] - new)).mean() / 2,
               "grpo": ((a["grpo", 0] - old) + (a["grpo", 1] - new)).mean() / 2}
    for m, d in by_hand.items():
        assert s["methods"][m]["paired"]["base"]["diff"] == pytest.approx(100 * d)
    assert s["methods"]["opsd"]["paired"]["base"]["diff"] == pytest.approx(-12.5)  # 0.25 per problem - (0.5, 0.5, 0.5, 0)
    assert s["methods"]["dasd"]["paired"]["base"] is None  # no start point of its build: no comparison
    # the extra start evaluation is not a 'base' seed, and the table names both start points
    assert s["methods"]["base"]["seeds"] == [0]
    assert s["start_points"] == {"not recorded": {"seeds": [0], "avg_at_k": [50.0]},
                                 "abc": {"seeds": [0], "avg_at_k": [37.5]}}
    table = open(os.path.join(args.out, "table.md")).read()
    assert "abc: 0: 37.5; not recorded: 0: 50.0" in table


def test_vs_start_without_a_base_unit_pairs_with_the_builds_own_start_evaluation(tmp_path):
    """A folder that trains no 'base' unit (the controls) still pairs each unit with its build's start point."""
    args = args_for(tmp_path, "--k", "2", "--methods", "opsd", "teacher_free")
    runs = os.path.join(args.out, "runs")
    rows = {("start_builds/abc", 0): [0.5, 0.5, 0.5, 0.0], ("opsd", 0): [0.0, 0.5, 0.0, 0.0],
            ("teacher_free", 0): [1.0, 0.5, 0.5, 0.5]}
    for (unit, seed), acc in rows.items():
        folder = os.path.join(runs, unit, f"seed{seed}")
        fake_report(os.path.join(folder, "eval", "report.json"), 100 * statistics.mean(acc), 0.0, 0.0, 50,
                    per_problem=acc)
        miniature.write_json(os.path.join(folder, "start.json"), {"start": "x", "weights_sha256": "abc"})
    s = miniature.write_report(args)
    assert "base" not in s["methods"]
    assert s["methods"]["opsd"]["paired"]["base"]["diff"] == pytest.approx(-25.0)  # (-0.5, 0, -0.5, 0) / 4
    assert s["methods"]["teacher_free"]["paired"]["base"]["diff"] == pytest.approx(25.0)  # (0.5, 0, 0, 0.5) / 4
    assert s["methods"]["teacher_free"]["paired"]["opsd"]["diff"] == pytest.approx(50.0)  # (1, 0, 0.5, 0.5) / 4
    table = open(os.path.join(args.out, "table.md")).read()
    assert "| opsd | 1 | 12.5 ± 0.0 | -25.0 [" in table
    assert "Each build's start point, Avg@k per evaluation (seed: value): abc: 0: 37.5." in table


def test_a_new_build_gets_its_start_point_evaluated_before_training(tmp_path, monkeypatch):
    args = miniature.build_parser().parse_args(["--out", str(tmp_path / "m"), "--methods", "base", "opsd"])
    args.out = str(tmp_path / "m")
    runs = os.path.join(args.out, "runs")
    fake_report(os.path.join(runs, "base", "seed0", "eval", "report.json"), 50.0, 0.0, 0.0, 50, per_problem=[0.5])
    calls = []
    monkeypatch.setattr(miniature, "weights_fingerprint", lambda path: "new")
    monkeypatch.setattr(miniature, "run_unit", lambda args, unit, method, seed, *a, **k: calls.append((unit, seed)))
    miniature.ensure_start_eval(args, 0, {})
    assert calls == [("base", 0), ("start_builds/new", 0)]  # base is done (run_unit skips it); the build is not
    miniature.write_json(os.path.join(runs, "base", "seed0", "start.json"), {"start": "x", "weights_sha256": "new"})
    calls.clear()
    miniature.ensure_start_eval(args, 0, {})
    assert calls == [("base", 0)]  # 'base' already evaluated this build


def test_one_start_evaluation_per_build_and_seed(tmp_path):
    """A 'base' unit and an extra evaluation of the same build and seed: the base unit counts, once."""
    runs = tmp_path / "runs"
    for folder, acc in (("base/seed0", [1.0, 0.0]), ("start_builds/x/seed0", [0.0, 0.0]),
                        ("start_builds/x/seed1", [0.5, 0.5])):
        fake_report(str(runs / folder / "eval" / "report.json"), 50.0 * sum(acc), 0.0, 0.0, 50, per_problem=acc)
        miniature.write_json(str(runs / folder / "start.json"), {"start": "m", "weights_sha256": "x"})
    assert miniature.start_evals(str(runs)) == {"x": [(0, 50.0, [1.0, 0.0]), (1, 50.0, [0.5, 0.5])]}


def test_variant_reruns_the_miniature_with_one_flag_changed_and_pairs_within_a_build(tmp_path, monkeypatch):
    """experiments/variant.py: the miniature's budget, lr and exposure are read back; the extra flag is the only
    change in the train.py config; the pair with the miniature's unit exists only when both share a build."""
    import numpy as np

    import variant

    args = args_for(tmp_path, "--steps", "5", "--k", "2")
    miniature.check_budget(args)  # writes config.json
    miniature.write_json(os.path.join(args.out, "lr_selection.json"), {"chosen": 3e-5})
    miniature.write_json(os.path.join(args.out, "alpha_selection.json"), {"chosen": 0.25})
    got = variant.miniature_args(args.out)
    assert (got.steps, got.k, got.lr, got.fixed_alpha) == (5, 2, 3e-5, 0.25)
    cmds = []
    monkeypatch.setattr(miniature.runner, "run", lambda cmd, log, env=None, echo=True: cmds.append(cmd))
    monkeypatch.setattr(miniature, "weights_fingerprint", lambda path: "abc")
    folder = os.path.join(args.out, "variants", "opsd_fixed.clip_none", "seed0")
    report = variant.run_variant_unit(got, "opsd_fixed", 0, ["--clip", "none"], folder, {})
    assert [c[1] for c in cmds] == ["train.py", "evaluate.py"] and not os.path.exists(report)  # faked: no report
    assert cmds[1][cmds[1].index("--model") + 1] == os.path.join(folder, "train", "final")
    base = train.parse_config(miniature.train_cmd(got, "opsd_fixed", 0, 3e-5, "d.jsonl", "o")[2:])
    cfg = train.parse_config(cmds[0][2:])
    assert cfg.clip is None and base.clip == 0.05 and (cfg.alpha, cfg.lr, cfg.steps) == (0.25, 3e-5, 5)
    changed = {k for k in vars(cfg) if getattr(cfg, k) != getattr(base, k)}
    assert changed == {"clip", "out_dir", "data"}
    # pairing: seed 0 shares build abc with the miniature's unit, seed 1 does not
    runs = os.path.join(args.out, "runs")
    acc = {"start": [0.5, 0.5, 0.0], "mini0": [0.0, 0.5, 0.0], "mini1": [1.0, 0.0, 0.0],
           "var0": [0.5, 1.0, 0.0], "var1": [0.5, 0.5, 0.5]}
    for unit, seed, key, build in (("base", 0, "start", "abc"), ("base", 1, "start", "abc"),
                                   ("opsd_fixed", 0, "mini0", "abc"), ("opsd_fixed", 1, "mini1", "old"),
                                   ("../variants/opsd_fixed.clip_none", 0, "var0", "abc"),
                                   ("../variants/opsd_fixed.clip_none", 1, "var1", "abc")):
        f = os.path.normpath(os.path.join(runs, unit, f"seed{seed}"))
        fake_report(os.path.join(f, "eval", "report.json"), 100 * float(np.mean(acc[key])), 0.0, 0.0, 50,
                    per_problem=acc[key])
        miniature.write_json(os.path.join(f, "start.json"), {"start": "x", "weights_sha256": build})
    rows = variant.compare(got, "opsd_fixed", [0, 1], os.path.join(args.out, "variants", "opsd_fixed.clip_none"))
    assert rows[0]["vs_miniature"]["diff"] == pytest.approx(100 * np.mean([0.5, 0.5, 0.0]))
    assert rows[0]["vs_start"]["diff"] == pytest.approx(100 * np.mean([0.0, 0.5, 0.0]))
    assert "vs_miniature" not in rows[1] and rows[1]["miniature_build"] == "old"
    assert rows[1]["vs_start"]["diff"] == pytest.approx(100 * np.mean([0.0, 0.0, 0.5]))


def test_combine_gives_per_seed_differences_and_contrasts_arms_that_differ_in_one_dtype(tmp_path):
    """results/numerics: each arm's per-seed trained-minus-start, and the gain of one arm minus another's, paired over
    problems, only between arms that differ in exactly one dtype, or in added distill flags (masked minus plain)."""
    import numpy as np

    import evaluate

    acc = {  # per arm: the start per seed, then OPSD per seed (4 problems, k = 2)
        ("bf16_start_bf16_train", "bfloat16", "bfloat16"): ([[0.5, 0.5, 0.0, 1.0], [0.5, 0.0, 0.5, 1.0]],
                                                            [[0.0, 0.5, 0.0, 1.0], [0.5, 0.0, 0.0, 0.5]]),
        ("bf16_start_fp32_train", "bfloat16", "float32"): ([[0.5, 0.5, 0.5, 1.0], [0.5, 0.5, 0.5, 1.0]],
                                                           [[1.0, 0.5, 0.5, 1.0], [1.0, 1.0, 0.5, 1.0]]),
        ("fp32_start_fp32_train", "float32", "float32"): ([[0.0, 0.0, 0.5, 0.5], [0.0, 0.5, 0.5, 0.5]],
                                                          [[0.5, 0.0, 0.5, 0.5], [0.0, 0.5, 1.0, 0.5]]),
        ("bf16_start_bf16_train_plain", "bfloat16", "bfloat16"): ([[0.5, 0.5, 0.0, 1.0], [0.5, 0.0, 0.5, 1.0]],
                                                                  [[0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.5]]),
    }
    folders = []
    for (name, start_dtype, dtype), (starts, trained) in acc.items():
        flags = "--clip none" if name.endswith("_plain") else "--distill_mask_answer true --clip none"
        args = args_for(tmp_path, "--k", "2", "--model", "reader", "--dtype", dtype, "--start_dtype", start_dtype,
                        "--distill_args", flags, "--out", str(tmp_path / name))
        runs = os.path.join(args.out, "runs")
        for seed in (0, 1):
            for unit, rows in (("base", starts), ("opsd", trained)):
                folder = os.path.join(runs, unit, f"seed{seed}")
                fake_report(os.path.join(folder, "eval", "report.json"), 100 * float(np.mean(rows[seed])), 0, 0, 50,
                            per_problem=rows[seed])
                miniature.write_json(os.path.join(folder, "start.json"), {"start": "x", "weights_sha256": name})
        miniature.check_budget(args)
        miniature.write_report(args)
        folders.append(args.out)
    s = miniature.combine(folders, str(tmp_path / "numerics"))
    e = s["arms"]["bf16_start_fp32_train"]["methods"]["opsd"]
    assert e["start_avg_at_k"] == [62.5, 62.5] and e["trained_avg_at_k"] == [75.0, 87.5]
    assert e["diff_per_seed"] == [12.5, 25.0]
    assert s["arms"]["bf16_start_fp32_train"]["start_dtype"] == "bfloat16"
    assert s["arms"]["bf16_start_fp32_train"]["dtype"] == "float32"
    gain = {name: np.mean(t, axis=0) - np.mean(st, axis=0) for (name, _, _), (st, t) in acc.items()}
    # bf16/bf16 and fp32/fp32 differ in both dtypes, plain bf16/bf16 in a dtype and the flags: not contrasted
    assert set(s["contrasts"]) == {"opsd: bf16_start_fp32_train - bf16_start_bf16_train",  # float32 first
                                   "opsd: fp32_start_fp32_train - bf16_start_fp32_train",
                                   "opsd: bf16_start_bf16_train - bf16_start_bf16_train_plain"}  # masked first
    masked = s["contrasts"]["opsd: bf16_start_bf16_train - bf16_start_bf16_train_plain"]
    by_hand = gain["bf16_start_bf16_train"] - gain["bf16_start_bf16_train_plain"]  # same starts: trained minus trained
    assert masked["diff"] == pytest.approx(100 * by_hand.mean()) and masked["diff"] == pytest.approx(18.75)
    c = s["contrasts"]["opsd: bf16_start_fp32_train - bf16_start_bf16_train"]
    by_hand = gain["bf16_start_fp32_train"] - gain["bf16_start_bf16_train"]
    assert c["diff"] == pytest.approx(100 * by_hand.mean()) and c["diff"] == pytest.approx(37.5)
    _, (lo, hi) = evaluate.paired_bootstrap(list(gain["bf16_start_bf16_train"]), list(gain["bf16_start_fp32_train"]))
    assert c["ci95"] == pytest.approx([100 * lo, 100 * hi])
    assert "| bf16_start_fp32_train | bfloat16 | float32 | opsd | 2 | 62.50, 62.50 | 75.00, 87.50 | 12.50, 25.00 |" in \
        open(tmp_path / "numerics" / "table.md").read()
