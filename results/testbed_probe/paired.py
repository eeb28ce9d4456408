"""Paired Avg@k difference of evaluation reports against the first, over their common first problems.

    python results/testbed_probe/paired.py START_report.json[:i] A_report.json [B_report.json ...]

Each file is an evaluate.py report.json on embedded:test; the last model in it is used, or the i-th (from 0)
when the name ends in :i (results/demo/report.json:0 is the demo's start point on 200 problems); the
interval is evaluate.paired_bootstrap's (10,000 resamples of problems, seed 0), in percentage points.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import evaluate  # noqa: E402


def per_problem(path):
    path, _, i = path.partition(":")
    with open(path) as f:
        results = json.load(f)["results"]
    return results[list(results)[int(i) if i else -1]]["embedded:test"]["accuracy_per_problem"]  # (P,) c_i / k


if __name__ == "__main__":
    start = per_problem(sys.argv[1])
    for path in sys.argv[2:]:
        new = per_problem(path)
        n = min(len(start), len(new))
        diff, (lo, hi) = evaluate.paired_bootstrap(start[:n], new[:n])
        print(f"{os.path.basename(path)}: {n} problems, {100 * sum(start[:n]) / n:.2f} -> {100 * sum(new[:n]) / n:.2f}, "
              f"diff {100 * diff:+.2f} points, 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}]")
