"""One miniature method with a flag changed, paired against the miniature's own units: a controlled ablation.

The miniature (experiments/miniature.py) runs every method under one budget. To ask which setting causes a
result, this script reruns one of its methods with extra train.py flags and nothing else changed: the same
start model, training data, learning rate, exposure, budget, seeds and test problems, read from the miniature's
folder. Each variant unit is paired problem by problem (evaluate.paired_bootstrap) with the miniature's unit of
the same method and seed when both started from the same build of the start model (see
miniature.weights_fingerprint), and with the start point of its own build.

    python experiments/variant.py --method opsd_fixed --name clip_none --extra="--clip none" --seeds 2 0

Output: <miniature>/variants/<method>.<name>/seed<s>/ (train/metrics.jsonl, eval/report.json, start.json) and
<miniature>/variants/<method>.<name>/summary.json. Finished units are skipped; an interrupted one resumes.
"""

import argparse
import json
import os
import shlex
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import miniature  # noqa: E402  (experiments/miniature.py)
import runner  # noqa: E402  (experiments/runner.py)


def miniature_args(folder):
    """The miniature's settings as it ran them: its budget (config.json) and the chosen lr and exposure."""
    with open(os.path.join(folder, "config.json")) as f:
        budget = json.load(f)
    args = miniature.build_parser().parse_args(["--out", folder])
    for key, value in budget.items():
        if key != "warm_start_recipe":
            setattr(args, key, value)
    for what, flag in (("lr", "lr"), ("alpha", "fixed_alpha")):
        path = os.path.join(folder, f"{what}_selection.json")
        if getattr(args, flag) is None and os.path.exists(path):
            with open(path) as f:
                setattr(args, flag, json.load(f)["chosen"])
    if args.lr is None:
        sys.exit(f"{folder}: no learning rate chosen yet (lr_selection.json); run the miniature first")
    return args


def run_variant_unit(args, method, seed, extra, folder, env):
    """Train the method with the extra flags and evaluate it, as miniature.run_unit does; skipped when done."""
    report = os.path.join(folder, "eval", "report.json")
    if os.path.exists(report):
        return report
    os.makedirs(folder, exist_ok=True)
    start = miniature.start_model(args)
    start_json = os.path.join(folder, "start.json")
    if not os.path.exists(start_json):
        miniature.write_json(start_json, {"start": start, "weights_sha256": miniature.weights_fingerprint(start)})
    tdir = os.path.join(folder, "train")
    final = os.path.join(tdir, "final")
    if not os.path.isdir(final):
        os.makedirs(tdir, exist_ok=True)
        cmd = miniature.train_cmd(args, method, seed, args.lr, os.path.join(args.out, "data", "train.jsonl"), tdir)
        # argparse: the last flag wins
        runner.run(cmd + extra, os.path.join(tdir, "train.log"), env=env, echo=False)
    tmp = os.path.join(folder, "eval.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    runner.run(miniature.eval_cmd(args, final, seed, "embedded:test", tmp, args.n_problems),
               os.path.join(tmp, "eval.log"), env=env, echo=False)
    shutil.rmtree(os.path.join(folder, "eval"), ignore_errors=True)
    os.replace(tmp, os.path.join(folder, "eval"))
    for sub in ("final", "ckpt"):
        shutil.rmtree(os.path.join(tdir, sub), ignore_errors=True)
    return report


def compare(args, method, seeds, out):
    """Per seed: the variant's Avg@k, the miniature unit's, the start's (same build), and the paired differences."""
    runs = os.path.join(args.out, "runs")
    starts = miniature.start_evals(runs)
    rows = []
    for seed in seeds:
        vfolder = os.path.join(out, f"seed{seed}")
        variant = miniature.bench_result(os.path.join(vfolder, "eval", "report.json"))
        build = miniature.start_build(vfolder)
        row = {"seed": seed, "build": build, "variant_avg": variant["avg_at_k"]}
        start = [(avg, pp) for s, avg, pp in starts.get(build, []) if s == seed]  # this build, this seed
        if start:
            row["start_avg"] = start[0][0]
            row["vs_start"] = runner.paired(start[0][1], variant.get("accuracy_per_problem"))
        mfolder = os.path.join(runs, method, f"seed{seed}")
        mreport = os.path.join(mfolder, "eval", "report.json")
        if os.path.exists(mreport):
            base = miniature.bench_result(mreport)
            row["miniature_avg"] = base["avg_at_k"]
            row["miniature_build"] = miniature.start_build(mfolder)
            if row["miniature_build"] == build:  # a pair only when both trained from the same weights
                row["vs_miniature"] = runner.paired(base.get("accuracy_per_problem"),
                                                    variant.get("accuracy_per_problem"))
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--miniature", default="results/miniature_testbed", help="the miniature's output folder")
    ap.add_argument("--method", required=True, choices=[m for m in miniature.ORDER if m != "base"])
    ap.add_argument("--name", required=True, help="the variant's name (its folder: variants/<method>.<name>)")
    ap.add_argument("--extra", required=True, help='train.py flags appended to the miniature\'s, e.g. "--clip none"')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = ap.parse_args(argv)
    args = miniature_args(os.path.abspath(a.miniature))
    extra = shlex.split(a.extra)
    out = os.path.join(args.out, "variants", f"{a.method}.{a.name}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for i, seed in enumerate(a.seeds):
        print(f"[{i + 1}/{len(a.seeds)}] {a.method} {' '.join(extra)}, seed {seed}", flush=True)
        run_variant_unit(args, a.method, seed, extra, os.path.join(out, f"seed{seed}"), env)
    rows = compare(args, a.method, a.seeds, out)
    miniature.write_json(os.path.join(out, "summary.json"),
                         {"method": a.method, "extra": extra, "lr": args.lr, "fixed_alpha": args.fixed_alpha,
                          "seeds": rows})
    for r in rows:
        line = f"seed {r['seed']} (build {r['build']}): {a.name} {r['variant_avg']:.1f}"
        if "miniature_avg" in r:
            line += f", miniature {r['miniature_avg']:.1f}"
        if "start_avg" in r:
            line += f", start {r['start_avg']:.1f}"
        for key in ("vs_miniature", "vs_start"):
            if r.get(key):
                line += f"; {key} {miniature.fmt_paired(r[key])}"
        print(line)
    print(f"wrote {os.path.join(out, 'summary.json')}")


if __name__ == "__main__":
    main()
