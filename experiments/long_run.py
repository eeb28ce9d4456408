"""Long runs: does accuracy rise and then collapse? One train.py run, evaluated every --every steps.

The demo trains 8 steps. Here a method trains --steps steps (default 40, five times the demo) from a cached warm
start, and the model after every --every steps is evaluated on the same test problems with the same sampling seeds
as the start point, so that each point of the curve is a paired difference against the start with its 95%
bootstrap interval (evaluate.paired_bootstrap). The run is one train.py run cut into segments: each segment resumes
the previous one's checkpoint with a larger --steps (train.py's learning rate is constant after warm-up and its
resume is bit-exact, so the segments train exactly what one uninterrupted run would).

    python experiments/long_run.py --name opsd --warm_start reader --train_args "--method opsd --exposure full"
    python experiments/long_run.py --name opsd_mask --warm_start reader \\
        --train_args "--method opsd --exposure full --distill_mask_answer true"
    python experiments/long_run.py --report --out results/long_runs    # curves.png and curves.json from the runs there

Layout: <out>/<name>/train/ (metrics.jsonl, train.log, ckpt/ while training), <out>/<name>/eval_step<s>/report.json
(the model after s steps; the start point is step 0, cached with the warm start). An interrupted run resumes:
finished evaluations are kept, training resumes from its checkpoint.
"""

import argparse
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo  # noqa: E402  (experiments/demo.py: warm starts, the start point's cached evaluation, pairing)
from disagreement import consistency  # noqa: E402  (box/chain consistency of samples)
import runner  # noqa: E402

ROOT = demo.ROOT
BENCH = "embedded:test"


def eval_args(args):
    return ["--n_problems", str(args.n_problems), "--k", str(args.k), "--max_new_tokens", str(args.max_new_tokens),
            "--rollout", "vllm", "--dtype", args.dtype, "--batch_problems", str(args.n_problems), "--no_entropy"]


def point(start_report, report_path):
    """(trained Avg@k, paired difference against the start, its 95% interval) of one evaluation."""
    with open(report_path) as f:
        paired = demo.paired_report(start_report, json.load(f))
    (diff,) = paired["paired"].values()
    return paired["results"]["trained"][BENCH]["avg_at_k"], diff["diff"], diff["ci95"]


def run(args):
    py = sys.executable
    args.dtype = demo.resolve_dtype(args.dtype)
    folder = os.path.join(os.path.abspath(args.out), args.name)
    os.makedirs(folder, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "report")}
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != settings:
                raise SystemExit(f"long_run: {folder} holds a run with other settings; choose another --name")
    else:
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)
    kind = {"sft": "format", "reader": "reader"}[args.warm_start]
    start = demo.ensure_warm_start(py, demo.warm_start_recipe(args.dtype, kind))
    start_report = demo.ensure_start_eval(py, start, eval_args(args))
    with open(os.path.join(folder, "start_report.json"), "w") as f:
        json.dump(start_report, f)  # the step-0 point of curves(), kept with the run
    os.makedirs(os.path.join(folder, "start"), exist_ok=True)
    shutil.copy(os.path.join(demo.start_eval_dir(start, eval_args(args)), "samples.jsonl"),
                os.path.join(folder, "start", "samples.jsonl"))
    train_dir = os.path.join(folder, "train")
    for s in range(args.every, args.steps + 1, args.every):
        report = os.path.join(folder, f"eval_step{s}", "report.json")
        if os.path.exists(report):
            continue
        resume = ["--resume"] if os.path.isdir(os.path.join(train_dir, "ckpt")) else []
        runner.run([py, "train.py", "--model", start, *args.train_args.split(), "--steps", str(s),
                    "--dtype", args.dtype, "--rollout", "vllm", "--save_every", str(args.every),
                    "--out_dir", train_dir, *resume], os.path.join(folder, "train.log"))
        runner.run([py, "evaluate.py", "--model", os.path.join(train_dir, "final"), *eval_args(args),
                    "--out", os.path.dirname(report)], os.path.join(folder, "eval.log"))
        avg, diff, (lo, hi) = point(start_report, report)
        print(f"{args.name} after {s} steps: Avg@{args.k} {avg:.2f}, vs start {diff:+.2f} [{lo:+.2f}, {hi:+.2f}]",
              flush=True)
    shutil.rmtree(os.path.join(train_dir, "final"), ignore_errors=True)
    shutil.rmtree(os.path.join(train_dir, "ckpt"), ignore_errors=True)


def box_chain(folder):
    """(share of boxed answers equal to their chain's last number, count of chains that end at the gold answer with
    another number boxed, count of chains that end at the gold answer) of the samples.jsonl in an evaluation folder;
    Nones without one."""
    path = os.path.join(folder, "samples.jsonl")
    if not os.path.exists(path):
        return None, None, None
    with open(path) as f:
        c = consistency([json.loads(line) for line in f if line.strip()])
    return c["box_equals_chain"] / max(c["with_box_and_chain"], 1), c["chain_right_box_not"], c["chain_right"]


def curves(out):
    """{name: {"steps": [...], "avg": [...], "diff": [...], "lo": [...], "hi": [...], "box_chain": [...],
    "cut_loose": [...], "chain_right": [...], "n_samples": problems x k, "train": metrics,
    "settings": settings.json}} from every run in `out`, the start point as step 0 (its box/chain
    consistency from start/samples.jsonl when the run kept a copy)."""
    result = {}
    for folder in sorted(glob.glob(os.path.join(out, "*", "start_report.json"))):
        folder = os.path.dirname(folder)
        with open(os.path.join(folder, "start_report.json")) as f:
            start_report = json.load(f)
        (start,) = start_report["results"].values()
        share, loose, right = box_chain(os.path.join(folder, "start"))
        c = {"steps": [0], "avg": [start[BENCH]["avg_at_k"]], "diff": [0.0], "lo": [0.0], "hi": [0.0],
             "box_chain": [share], "cut_loose": [loose], "chain_right": [right],
             "n_samples": start[BENCH]["n_problems"] * start[BENCH]["k"]}
        reports = glob.glob(os.path.join(folder, "eval_step*", "report.json"))
        for report in sorted(reports, key=lambda p: int(p.split("eval_step")[1].split(os.sep)[0])):
            avg, diff, (lo, hi) = point(start_report, report)
            c["steps"].append(int(report.split("eval_step")[1].split(os.sep)[0]))
            share, loose, right = box_chain(os.path.dirname(report))
            for key, v in zip(("avg", "diff", "lo", "hi", "box_chain", "cut_loose", "chain_right"),
                              (avg, diff, lo, hi, share, loose, right)):
                c[key].append(v)
        metrics = os.path.join(folder, "train", "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            c["train"] = {k: [r.get(k) for r in rows] for k in ("step", "entropy/student", "exposure/alpha_used")}
        if os.path.exists(os.path.join(folder, "settings.json")):
            with open(os.path.join(folder, "settings.json")) as f:
                c["settings"] = json.load(f)
        result[os.path.basename(folder)] = c
    return result


def is_prefix(a, b):
    """Run a's curve is the start of run b's (the same evaluations, equal to the bit, and b goes further)."""
    n = len(a["steps"])
    return len(b["steps"]) > n and all(a[k] == b[k][:n] for k in ("steps", "diff", "lo", "hi"))


def style(settings):
    """One colour per method, dashed where the answer span is masked: (key of the colour, line style)."""
    args = settings.get("train_args", "").split()
    masked = any(a == "--distill_mask_answer" and b == "true" for a, b in zip(args, args[1:]))
    method = args[args.index("--method") + 1] if "--method" in args else "?"
    exposure = args[args.index("--exposure") + 1] if "--exposure" in args else "atesd"  # train.py's default
    return f"{method} {exposure}", "--" if masked else "-"


def report(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = curves(out)
    with open(os.path.join(out, "curves.json"), "w") as f:
        json.dump(cs, f, indent=1)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (ax, ax5, ax3), (ax2, ax4, legend) = axes
    colours = {}
    for name, c in cs.items():
        print(f"{name}: " + ", ".join(f"step {s} {d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                                      for s, d, lo, hi in zip(c["steps"][1:], c["diff"][1:], c["lo"][1:], c["hi"][1:])))
        longer = [other for other, d in cs.items() if is_prefix(c, d)]
        if longer:  # drawn as part of the longer run
            print(f"  (the first {c['steps'][-1]} steps of {longer[0]}, to the bit: not drawn)")
            continue
        key, ls = style(c.get("settings", {}))
        kw = {"color": colours.setdefault(key, f"C{len(colours)}"), "linestyle": ls, "label": name}
        ax.plot(c["steps"], c["diff"], marker="o", **kw)
        ax.fill_between(c["steps"], c["lo"], c["hi"], color=kw["color"], alpha=0.12)
        if "train" in c:
            ax2.plot(c["train"]["step"], c["train"]["entropy/student"], **kw)
            ax4.plot(c["train"]["step"], c["train"]["exposure/alpha_used"], **kw)
        pts = [(s, 100 * v) for s, v in zip(c["steps"], c["box_chain"]) if v is not None]
        if pts:
            ax3.plot(*zip(*pts), marker="o", **kw)
        pts = [(s, 100 * v / c["n_samples"]) for s, v in zip(c["steps"], c["chain_right"]) if v is not None]
        if pts:
            ax5.plot(*zip(*pts), marker="o", **kw)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="training step", ylabel="Avg@k minus the start (points), 95% CI", title="accuracy along the run")
    ax2.set(xlabel="training step", ylabel="student entropy (nats/token)", title="student entropy")
    ax3.set(xlabel="training step", ylabel="% of boxes = the chain's last number", title="box/chain consistency")
    ax4.set(xlabel="training step", ylabel="alpha (share of the reference shown)", title="teacher exposure", ylim=(0, 1.05))
    ax5.set(xlabel="training step", ylabel="% of samples", title="the work: chains that end at the gold answer")
    legend.axis("off")
    legend.legend(*ax.get_legend_handles_labels(), loc="center", title="dashed: answer span masked")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    print(f"wrote {out}/curves.png, curves.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", help="the run's folder under --out")
    ap.add_argument("--train_args", default="--method opsd --exposure full",
                    help="train.py flags of the method (the budget flags below are added)")
    ap.add_argument("--budget", default="--prompts_per_step 16 --micro_batch 8 --lr 1e-5 --max_new_tokens 96 "
                                        "--clip none", help="train.py flags shared by every long run")
    ap.add_argument("--warm_start", default="reader", choices=["sft", "reader"], help="the cached start point")
    ap.add_argument("--steps", type=int, default=40, help="training steps (the demo trains 8)")
    ap.add_argument("--every", type=int, default=8, help="evaluate the model after every this many steps")
    ap.add_argument("--n_problems", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=96, help="evaluation response cap")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--out", default="results/long_runs")
    ap.add_argument("--report", action="store_true", help="only draw curves.png from the finished runs in --out")
    args = ap.parse_args(argv)
    if args.report:
        report(args.out)
        return
    if not args.name:
        ap.error("--name is required to run")
    if args.steps % args.every:
        ap.error(f"--steps {args.steps} must be a multiple of --every {args.every}")
    args.train_args = f"{args.budget} {args.train_args}"
    run(args)
    report(args.out)


if __name__ == "__main__":
    main()
