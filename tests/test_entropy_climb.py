"""experiments/entropy_climb.py: every run is a valid train.py config that changes one thing, and the report
reads the trajectories it says it reads (no training here)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import entropy_climb  # noqa: E402
import plumbing  # noqa: E402
import train  # noqa: E402


def test_each_run_is_a_valid_config_changing_one_ingredient():
    cfgs = {}
    for name, (_, flags) in entropy_climb.RUNS.items():
        cfg = train.parse_config([*entropy_climb.BASE, *flags, "--out_dir", "x"])
        plumbing.check_config(cfg)
        cfgs[name] = cfg
    ref = cfgs["opsd_fkl_lr1e-5"]
    changed = {name: [k for k in ("method", "exposure", "alpha", "beta", "lr") if getattr(c, k) != getattr(ref, k)]
               for name, c in cfgs.items()}
    assert changed == {"opsd_fkl_lr1e-5": [], "opsd_rkl_lr1e-5": ["beta"], "opsd_fkl_lr3e-5": ["lr"],
                       "dasd_lr1e-5": ["method"], "opsd_fkl_a0_lr1e-5": ["exposure", "alpha"],
                       "opsd_fkl_lr0": ["lr"]}
    assert {(c.model, c.steps, c.seed, c.clip) for c in cfgs.values()} == {("embedded", entropy_climb.STEPS, 0, None)}


def test_report_table_from_finished_runs_only(tmp_path):
    def write(name, n):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step in range(1, n + 1):
                f.write(json.dumps({"step": step, "entropy/student": 1.0 + 0.25 * step, "entropy/teacher": 2.0,
                                    "kl/teacher_student": 0.1 * step, "rollout/response_len": 90.0}) + "\n")

    write("opsd_fkl_lr1e-5", 8)
    write("dasd_lr1e-5", 3)  # still running: left out
    entropy_climb.report(str(tmp_path))
    table = open(tmp_path / "table.md").read()
    # step 1, then the mean of steps 5-8: entropy 1 + 0.25 * (5..8) -> 2.625, KL 0.1 * (5..8) -> 0.65
    assert "| opsd_fkl_lr1e-5 | reference: OPSD, forward KL | 1.25 -> 2.62 | 2.00 -> 2.00 | 0.100 -> 0.650 | 90 -> 90 |" \
        in table
    assert "dasd" not in table
    assert os.path.exists(tmp_path / "entropy_climb.png")
