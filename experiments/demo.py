"""`make demo`: the main job on the embedded default, timed, with a paired confidence interval.

Set-up (once; cached under ~/.cache/opsd like the model conversion, not part of the timed run):
    1. the *format warm start*. SmolLM2-135M-Instruct rarely ends with an answer in \\boxed{} (Avg@4 ~0 on the
       embedded test split); the papers start from instruct models that already do. A short SFT on
       training-split reference solutions (never the test split) gives a start point that succeeds sometimes
       (Avg@4 ~40), so that gains and losses are both visible. --warm_start none starts from the model itself.
    2. evaluate.py on the start point: the first --n_problems embedded test problems, k samples each, vLLM.
    Both run in the dtype whose matmuls are faster on this CPU (--dtype auto, measured): bf16 on CPUs with bf16
    units, fp32 on the many without them, where bf16 is emulated and ~100x slower. The dtype is part of both
    cache keys.

Timed (what `minutes` in summary.json measures):
    1. train.py --method <method> from the warm start, --steps steps (default sft: see below);
    2. evaluate.py on the trained model with the start point's evaluation flags (same problems, k, seeds);
    3. the paired Avg@k difference (trained - start) over problems with its 95% bootstrap interval
       (evaluate.paired_bootstrap), printed and written to <out>/summary.json, with both reports in
       <out>/report.json. Evaluating the start point once, not in every demo, halves the timed sampling at the
       same statistical power: the pairs are the same problems under the same seeds.

    python experiments/demo.py                       # what `make demo` runs
    python experiments/demo.py --method dasd --out runs/demo_dasd     # the project's method, DASD + ATESD
    python experiments/demo.py --method opsd --steps 12 --out runs/demo_opsd
    python experiments/demo.py --method opsd --warm_start reader --out runs/demo_reader   # the answer leak

Why the default method is SFT (docs/results.md, "The answer leak"): the demo must show a paired interval that excludes
zero on 200 problems within 15 minutes, and on this 135M testbed SFT at lr 1e-5 is the method measured to do it
(+7.6 [+4.3, +11.0] Avg@4 points). Every self-distillation variant measured loses accuracy, from the format warm
start (DASD + ATESD -28.8 [-33.8, -23.9], OPSD -14.8), whose teacher does not read its reference, and from the reader
warm start (--warm_start reader: OPSD -4.5, with the answer leak removed -3.5 or -4.0), whose teacher does. Every demo
prints the box/chain consistency of the start point and the trained model (experiments/disagreement.py), so that
--method opsd --warm_start reader shows the leak beside the interval.

An interrupted run resumes: the warm start from its checkpoint, training with train.py --resume, and a
finished stage (final/, report.json) is not run again.
"""

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
import runner  # noqa: E402  (experiments/runner.py)
import model as modellib  # noqa: E402
from disagreement import consistency  # noqa: E402  (experiments/disagreement.py: box/chain consistency)

# The warm-start recipe (flags of train.py --method sft) with the dtype of the machine at hand (warm_start_recipe):
# bf16 where its matmuls are faster, fp32 elsewhere (CPUs without bf16 units emulate it ~100x slower). The recipe,
# dtype included, is the cache key: a bf16 build and an fp32 build are two cache entries, never mixed.
WARM_START = ["--method", "sft", "--steps", "30", "--prompts_per_step", "16", "--micro_batch", "8",
              "--lr", "1e-4", "--max_new_tokens", "128"]
# The *reader* warm start (docs/choices.md, choice 24): twice the steps, and half the rows trained from the teacher's
# prompt (the training-split reference revealed at an alpha in READER_ALPHAS) to the same reference. Its teacher
# reads the context it is shown, as a large model's does: the testbed where the answer leak shows
# (results/leak_reader_start/). --sft_reader_share is the recipe's flag, not train.py's: train_flags makes it data.
READER_START = [*WARM_START[:WARM_START.index("--steps")], "--steps", "60",
                *WARM_START[WARM_START.index("--steps") + 2:], "--sft_reader_share", "0.5"]
WARM_STARTS = {"format": WARM_START, "reader": READER_START}
READER_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the exposures a reader row's prompt is drawn from
# Pinned when the warm start is built, outside the cache key (runner.PINNED: the plain loss path, optimizer,
# micro-batch order and attention), so one key keeps building the same model (docs/choices.md, choice 13).
WARM_START_PINNED = runner.PINNED
SUMMARY_KEYS = ("start_avg", "trained_avg", "diff", "ci95", "n_problems", "k", "method", "minutes", "machine")


@functools.lru_cache(maxsize=None)
def machine_dtype():
    """bfloat16 or float32: the one whose matmuls are faster on this CPU (model.pick_dtype, measured once)."""
    return modellib.pick_dtype("auto", "cpu")


def resolve_dtype(dtype):
    return machine_dtype() if dtype in (None, "auto") else dtype


def warm_start_recipe(dtype=None, kind="format"):
    """The warm start's train.py flags in a dtype (default: this machine's faster one). kind: "format" (WARM_START)
    or "reader" (READER_START)."""
    if kind not in WARM_STARTS:
        raise ValueError(f"warm start {kind!r}: choose {', '.join(WARM_STARTS)}")
    return [*WARM_STARTS[kind], "--dtype", resolve_dtype(dtype), "--seed", "0"]


def recipe_value(recipe, flag, default=None):
    return recipe[recipe.index(flag) + 1] if flag in recipe else default


def reader_mix(rows, share, *, seed, steps, prompts_per_step):
    """The reader warm start's training rows (docs/choices.md, choice 24): every row, and each one the SFT run meets
    (train.step_rows, step by step) drawn with probability `share` as a reader row, whose "reader_alpha" (an exposure
    from READER_ALPHAS) makes train.py train it from the teacher's prompt. One seeded draw per (step, slot), so the
    mix is a function of the recipe. A row met twice (more slots than rows) would need two draws: refused."""
    cfg = types.SimpleNamespace(seed=seed, prompts_per_step=prompts_per_step)
    alphas = {}
    for step in range(steps):
        for i, r in enumerate(train.step_rows(rows, cfg, step, 0, 1)):
            if r["id"] in alphas:
                raise ValueError(f"reader_mix: {steps} x {prompts_per_step} rows exceed the {len(rows)} training rows")
            g = np.random.default_rng([seed, step, 0, i])
            alphas[r["id"]] = float(g.choice(READER_ALPHAS)) if g.random() < share else None
    return [dict(r, reader_alpha=alphas[r["id"]]) if alphas.get(r["id"]) is not None else r for r in rows]


def warm_start_dir(recipe=None):
    key = hashlib.sha256(json.dumps(recipe or warm_start_recipe()).encode()).hexdigest()[:10]
    return os.path.join(modellib.cache_root(), f"warmstart-{key}")


def train_flags(recipe, work):
    """train.py's flags for a recipe: itself, except that the reader recipe's --sft_reader_share (the recipe's own
    flag, not train.py's) becomes its data, reader_mix's rows written to work/reader_rows.jsonl."""
    if "--sft_reader_share" not in recipe:
        return recipe
    at = recipe.index("--sft_reader_share")
    rows = reader_mix(data.embedded_split("train"), float(recipe[at + 1]), seed=int(recipe_value(recipe, "--seed", 0)),
                      steps=int(recipe_value(recipe, "--steps")),
                      prompts_per_step=int(recipe_value(recipe, "--prompts_per_step")))
    path = os.path.join(work, "reader_rows.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return [*recipe[:at], *recipe[at + 2:], "--data", path]


def ensure_warm_start(py, recipe=None):
    """The cached warm-start model folder; trained once (resumable) when missing. warm_start.json beside the
    weights records the recipe (its dtype included) and the machine that built it."""
    recipe = recipe or warm_start_recipe()
    final = warm_start_dir(recipe)
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    work = final + ".run"
    os.makedirs(work, exist_ok=True)
    kind = "reader" if "--sft_reader_share" in recipe else "format"
    print(f"set-up: {kind} warm start (SFT on training-split solutions, once) -> {final}", flush=True)
    resume = ["--resume"] if os.path.isdir(os.path.join(work, "ckpt")) else []
    runner.run([py, "train.py", *train_flags(recipe, work), *WARM_START_PINNED, "--save_every", "5", "--out_dir", work,
                *resume], os.path.join(work, "train.log"))
    shutil.copytree(os.path.join(work, "final"), final + ".tmp", dirs_exist_ok=True)
    dtype = recipe_value(recipe, "--dtype", "auto")
    with open(os.path.join(final + ".tmp", "warm_start.json"), "w") as f:
        json.dump({"recipe": recipe, "pinned": WARM_START_PINNED, "dtype": dtype, "machine": machine()}, f, indent=2)
    os.replace(final + ".tmp", final)
    shutil.rmtree(work, ignore_errors=True)
    return final


def start_eval_dir(start, eval_args):
    key = hashlib.sha256(json.dumps([os.path.abspath(start), eval_args]).encode()).hexdigest()[:10]
    return os.path.join(modellib.cache_root(), f"start-eval-{key}")


def ensure_start_eval(py, start, eval_args):
    """evaluate.py's report on the start point, cached beside the warm start: it depends only on the model, the
    evaluation flags (problems, k, cap, backend, dtype, seed) and the machine, so a demo evaluates only the trained
    model in its timed part and pairs it with this one. Written once, atomically."""
    folder = start_eval_dir(start, eval_args)
    path = os.path.join(folder, "report.json")
    if not os.path.exists(path):
        print(f"set-up: the start point's evaluation (once) -> {folder}", flush=True)
        os.makedirs(folder + ".tmp", exist_ok=True)
        runner.run([py, "evaluate.py", "--model", start, *eval_args, "--out", folder + ".tmp"],
                   os.path.join(folder + ".tmp", "eval.log"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(folder + ".tmp", folder)
    with open(path) as f:
        return json.load(f)


def samples_consistency(folder):
    """Box/chain consistency (disagreement.consistency) of the samples.jsonl in an evaluation folder."""
    with open(os.path.join(folder, "samples.jsonl")) as f:
        return consistency([json.loads(line) for line in f if line.strip()])


def paired_report(start_report, trained_report):
    """One report of the start point and the trained model from their separate evaluations, with evaluate.py's paired
    difference. Both must have evaluated the same problems with the same k."""
    (start,), (trained,) = start_report["results"].values(), trained_report["results"].values()
    for bench in start:
        a, b = start[bench], trained.get(bench)
        if b is None or len(a["accuracy_per_problem"]) != len(b["accuracy_per_problem"]) or a["k"] != b["k"]:
            raise ValueError(f"demo: the start point's and the trained model's evaluations of {bench} differ in "
                             f"problems or k; delete the start-eval cache folder and rerun")
    results = {"start": start, "trained": trained}
    return {"config": trained_report["config"], "results": results, "paired": evaluate.paired_differences(results),
            "models": {"start": start_report["models"], "trained": trained_report["models"]}}


def machine():
    """CPU model and the matmul rates that decide --dtype auto, measured now."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    bf16, fp32 = modellib.matmul_rate(torch.bfloat16), modellib.matmul_rate(torch.float32)
    return {"cpu": cpu, "cores": os.cpu_count(), "bf16_matmul_gflops": round(bf16 / 1e9, 1),
            "fp32_matmul_gflops": round(fp32 / 1e9, 1), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def make_summary(report, *, method, steps, minutes, machine_info, start_label, trained_label, bench="embedded:test"):
    """summary.json from evaluate.py's report.json: the start point, the trained model, their paired difference."""
    res = report["results"]
    paired = report["paired"][f"{trained_label} - {start_label} | {bench}"]
    return {
        "start_avg": res[start_label][bench]["avg_at_k"],
        "trained_avg": res[trained_label][bench]["avg_at_k"],
        "diff": paired["diff"],
        "ci95": paired["ci95"],
        "n_problems": paired["n_problems"],
        "k": report["config"]["k"],
        "method": method,
        "steps": steps,
        "minutes": round(minutes, 2),
        "machine": machine_info,
        "start_pass_at_k": res[start_label][bench]["pass_at_k"],
        "trained_pass_at_k": res[trained_label][bench]["pass_at_k"],
    }


def check_summary(s):
    """Raises ValueError naming the first field that is missing or malformed."""
    for k in SUMMARY_KEYS:
        if k not in s:
            raise ValueError(f"summary.json: missing field {k!r}")
    for k in ("start_avg", "trained_avg", "diff", "minutes"):
        if not isinstance(s[k], (int, float)):
            raise ValueError(f"summary.json: {k} must be a number, got {s[k]!r}")
    for k in ("start_avg", "trained_avg"):
        if not 0 <= s[k] <= 100:
            raise ValueError(f"summary.json: {k} is a percentage, got {s[k]}")
    lo, hi = s["ci95"] if isinstance(s["ci95"], list) and len(s["ci95"]) == 2 else (None, None)
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi):
        raise ValueError(f"summary.json: ci95 must be [lo, hi] with lo <= hi, got {s['ci95']!r}")
    if abs(s["diff"] - (s["trained_avg"] - s["start_avg"])) > 1e-6:
        raise ValueError(f"summary.json: diff {s['diff']} is not trained_avg - start_avg")
    if not lo - 1e-9 <= s["diff"] <= hi + 1e-9:
        raise ValueError(f"summary.json: diff {s['diff']} lies outside ci95 {s['ci95']}")
    for k in ("n_problems", "k"):
        if not (isinstance(s[k], int) and s[k] >= 1):
            raise ValueError(f"summary.json: {k} must be a positive integer, got {s[k]!r}")
    if not isinstance(s["method"], str) or not s["method"]:
        raise ValueError("summary.json: method must name the trained method")
    m = s["machine"]
    if not (isinstance(m, dict) and {"cpu", "bf16_matmul_gflops", "fp32_matmul_gflops"} <= set(m)):
        raise ValueError("summary.json: machine needs cpu, bf16_matmul_gflops and fp32_matmul_gflops")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="sft",
                    help="train.py --method, with its default exposure (dasd: ATESD). Default sft: the method measured "
                         "to gain on this testbed (see the module docstring)")
    ap.add_argument("--steps", type=int, default=8, help="training steps")
    ap.add_argument("--train_args", default="--prompts_per_step 16 --micro_batch 8 --lr 1e-5 --max_new_tokens 96",
                    help="further train.py flags")
    ap.add_argument("--warm_start", default="sft", choices=["sft", "reader", "none"],
                    help="start from the cached format warm start (sft), the cached reader warm start (reader: its "
                         "teacher reads the reference; docs/choices.md, choice 24), or the embedded model itself")
    ap.add_argument("--n_problems", type=int, default=200, help="embedded test problems evaluated")
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--max_new_tokens", type=int, default=96, help="evaluation response cap")
    ap.add_argument("--rollout", default="vllm", choices=["vllm", "hf"], help="backend of rollouts and evaluation")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="of the warm start, training and evaluation; auto: this CPU's faster matmul, measured once")
    ap.add_argument("--out", default="runs/demo", help="output folder")
    args = ap.parse_args(argv)
    args.dtype = resolve_dtype(args.dtype)  # recorded in demo_args.json: a resumed demo keeps it

    py = sys.executable
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # a run continues only with the settings it was started with: finished stages are reused, not redone
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings_path = os.path.join(out, "demo_args.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            before = json.load(f)
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise SystemExit(f"demo: {out} holds a run with other settings ({', '.join(changed)}); "
                             f"choose another --out or delete that folder")
    else:
        with open(settings_path, "w") as f:
            json.dump(settings, f, indent=2)
    t_setup = time.time()
    kind = {"sft": "format", "reader": "reader"}.get(args.warm_start)
    start = ensure_warm_start(py, warm_start_recipe(args.dtype, kind)) if kind else modellib.embedded_model_dir()
    eval_args = ["--n_problems", str(args.n_problems), "--k", str(args.k), "--max_new_tokens", str(args.max_new_tokens),
                 "--rollout", args.rollout, "--dtype", args.dtype, "--batch_problems", str(args.n_problems),
                 "--no_entropy"]
    start_report = ensure_start_eval(py, start, eval_args)
    setup_minutes = (time.time() - t_setup) / 60

    t0 = time.time()
    info = machine()
    print(f"machine: {info['cpu']}, bf16 matmul {info['bf16_matmul_gflops']:.0f} GFLOP/s, "
          f"fp32 {info['fp32_matmul_gflops']:.0f} GFLOP/s; dtype {args.dtype}", flush=True)
    train_dir = os.path.join(out, "train")
    if not os.path.exists(os.path.join(train_dir, "final", "config.json")):
        resume = ["--resume"] if os.path.isdir(os.path.join(train_dir, "ckpt")) else []
        runner.run([py, "train.py", "--model", start, "--method", args.method, "--steps", str(args.steps),
                    *args.train_args.split(), "--rollout", args.rollout, "--dtype", args.dtype, "--save_every", "4",
                    "--out_dir", train_dir, *resume], os.path.join(out, "train.log"))
    eval_dir = os.path.join(out, "eval")
    if not os.path.exists(os.path.join(eval_dir, "report.json")):
        # the same problems, k, sampling seeds and dtype as the start point's cached evaluation: the difference is
        # paired exactly as if both models were evaluated in one run
        runner.run([py, "evaluate.py", "--model", os.path.join(train_dir, "final"), *eval_args,
                    "--plot_train", os.path.join(train_dir, "metrics.jsonl"), "--out", eval_dir],
                   os.path.join(out, "eval.log"))
    minutes = (time.time() - t0) / 60  # of the stages this call ran (all of them in a run that was not interrupted)

    with open(os.path.join(eval_dir, "report.json")) as f:
        report = paired_report(start_report, json.load(f))
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    summary = make_summary(report, method=args.method, steps=args.steps, minutes=minutes, machine_info=info,
                           start_label="start", trained_label="trained")
    summary["setup_minutes"] = round(setup_minutes, 2)  # 0 when the warm start and its evaluation were cached
    summary["dtype"] = args.dtype
    summary["warm_start"] = args.warm_start
    # the answer leak, visible beside the interval: does each boxed answer still follow from its own chain?
    summary["box_follows_chain"] = {"start": samples_consistency(start_eval_dir(start, eval_args)),
                                    "trained": samples_consistency(eval_dir)}
    check_summary(summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lo, hi = summary["ci95"]
    print(f"\nAvg@{args.k} on {summary['n_problems']} test problems: start {summary['start_avg']:.2f} -> "
          f"{args.method} {summary['trained_avg']:.2f}; paired difference {summary['diff']:+.2f} points, "
          f"95% CI [{lo:+.2f}, {hi:+.2f}]" + (" (includes 0)" if lo <= 0 <= hi else "")
          + "\nbox = the chain's last number: " + ", ".join(
              f"{who} {c['box_equals_chain']}/{c['with_box_and_chain']} ({c['chain_right_box_not']} chains end at the "
              f"gold answer with another number boxed)" for who, c in summary["box_follows_chain"].items())
          + f"\n{minutes:.1f} min after set-up; {out}/summary.json")


if __name__ == "__main__":
    main()
