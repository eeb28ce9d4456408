"""Is a bf16 loss the teacher's doing or bf16 rounding's? Masked OPSD's update, measured against the bf16 grid.

Under --dtype bfloat16 the master weights are fp32, but the rollout engine and the evaluation hold the weights in
bf16. At lr 1e-5 one AdamW step moves a weight by about 1e-5, while the bf16 spacing at a typical weight of this
model (|w| ~ 0.1) is about 5e-4: most weights never change in bf16, and a few jump by a whole spacing, many times
the update. The evaluated change is then the update plus rounding noise. This script separates the two, from one
trained unit of a miniature folder (masked OPSD by default, with that folder's budget and its start build):

  trained_bf16     the trained weights, evaluated in bf16 (what the miniature reports)
  trained_fp32     the same weights, evaluated in fp32 (no rounding of the update)
  scrambled_bf16   the start plus the update with the sign of every element drawn at random (seeded): the same
                   sizes and the same rounding, no direction; evaluated in bf16
  start_fp32       the start evaluated in fp32 (start_bf16 is the miniature's evaluation of this build, or made here)

Each is paired problem by problem with the start evaluated in the same dtype (runner.paired). update.json holds the
update's size against the bf16 grid: the share of weights whose bf16 value the update changes, and the median of
|update| / bf16 spacing over the weights it moved.

    python experiments/rounding.py --miniature results/controls --seeds 0 --out results/rounding

Output: <out>/seed<s>/{train/, update.json, <arm>/report.json ...} and <out>/summary.json. Steps already done are
skipped; the trained and scrambled model folders are deleted at the end unless --keep_models.
"""

import argparse
import copy
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import miniature  # noqa: E402  (experiments/miniature.py)
import runner  # noqa: E402  (experiments/runner.py)
import variant  # noqa: E402  (experiments/variant.py: a miniature folder's settings)

# evaluated in this order (the bf16 pair first: it needs only the miniature's bf16 start)
ARMS = {"trained_bf16": ("trained", "bfloat16"), "scrambled_bf16": ("scrambled", "bfloat16"),
        "trained_fp32": ("trained", "float32"), "start_fp32": ("start", "float32")}


def bf16_spacing(w):
    """The distance between w's bf16 neighbours (an exponent's unit in the last of bf16's 8 significand bits)."""
    e = torch.frexp(w.float().abs().clamp_min(torch.finfo(torch.float32).tiny))[1]  # |w| = m * 2**e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(w, dtype=torch.float32), e - 8)


def update_stats(start, trained):
    """The update d = trained - start against the bf16 grid, over every floating tensor of two state dicts, and the
    update a bf16 copy sees, e = bf16(trained) - bf16(start): their sizes and the cosine between them."""
    n = moved = changed = 0
    ratios, dd, ee, de = [], 0.0, 0.0, 0.0
    for k, w0 in start.items():
        if not w0.is_floating_point():
            continue
        w0, d = w0.float(), trained[k].float() - w0.float()
        e = (trained[k].bfloat16().float() - w0.bfloat16().float()).double()
        n += w0.numel()
        dd, ee, de = dd + float((d.double() ** 2).sum()), ee + float((e ** 2).sum()), de + float((d.double() * e).sum())
        nz = d != 0
        moved += int(nz.sum())
        changed += int((e != 0).sum())
        ratios.append((d[nz].abs() / bf16_spacing(w0[nz])).flatten()[::101])  # a sample, for the median
    r = torch.cat(ratios) if ratios else torch.zeros(1)
    return {"weights": n, "moved": moved / n, "bf16_changed": changed / n, "update_rms": (dd / n) ** 0.5,
            "bf16_update_rms": (ee / n) ** 0.5,
            "cosine_bf16_update_vs_update": de / (dd * ee) ** 0.5 if dd * ee else 0.0,
            "median_update_over_bf16_spacing": float(r.median()) if r.numel() else 0.0}


def scramble(start, trained, seed):
    """start + |trained - start| with a random sign per element: the update's sizes without its direction."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w0 in start.items():
        if not w0.is_floating_point():
            out[k] = trained[k]
            continue
        d = trained[k].float() - w0.float()
        sign = torch.randint(0, 2, d.shape, generator=g).float() * 2 - 1
        out[k] = (w0.float() + sign * d.abs()).to(w0.dtype)
    return out


def model_folder(src, state, dst):
    """A copy of the model folder src (config, tokenizer, train_config.json) with state as its weights."""
    if os.path.exists(os.path.join(dst, "model.safetensors")):
        return dst
    shutil.copytree(src, dst + ".tmp", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(dst + ".tmp", "model.safetensors"))
    os.replace(dst + ".tmp", dst)
    return dst


def evaluate_arm(args, model, dtype, seed, folder, env):
    report = os.path.join(folder, "report.json")
    if not os.path.exists(report):
        a = copy.copy(args)
        a.dtype, a.no_entropy = dtype, True  # Avg@k only: no entropy pass (a teacher-forced forward per sample)
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        runner.run(miniature.eval_cmd(a, model, seed, "embedded:test", tmp, args.n_problems),
                   os.path.join(tmp, "eval.log"), env=env, echo=False)
        os.replace(tmp, folder)
    return miniature.bench_result(report)


def run_seed(args, method, seed, out, env, keep):
    """One seed: train (kept), measure the update, scramble it, evaluate every arm; returns the seed's rows."""
    folder = os.path.join(out, f"seed{seed}")
    start = miniature.start_model(args)
    build = miniature.weights_fingerprint(start)
    tdir, final = os.path.join(folder, "train"), os.path.join(folder, "train", "final")
    done = all(os.path.exists(os.path.join(folder, a, "report.json")) for a in ARMS)
    if not done and not os.path.isdir(final):
        os.makedirs(tdir, exist_ok=True)
        runner.run(miniature.train_cmd(args, method, seed, args.lr, os.path.join(args.out, "data", "train.jsonl"),
                                       tdir), os.path.join(tdir, "train.log"), env=env, echo=False)
    if not done:
        s0 = load_file(os.path.join(start, "model.safetensors"))
        s1 = load_file(os.path.join(final, "model.safetensors"))
        if not os.path.exists(os.path.join(folder, "update.json")):
            miniature.write_json(os.path.join(folder, "update.json"), update_stats(s0, s1))
        models = {"start": start, "trained": final,
                  "scrambled": model_folder(final, scramble(s0, s1, seed), os.path.join(folder, "scrambled_model"))}
        for arm, (which, dtype) in ARMS.items():
            print(f"  seed {seed}: {arm}", flush=True)
            evaluate_arm(args, models[which], dtype, seed, os.path.join(folder, arm), env)
    if not keep:
        for sub in (os.path.join(tdir, "final"), os.path.join(tdir, "ckpt"), os.path.join(folder, "scrambled_model")):
            shutil.rmtree(sub, ignore_errors=True)
    res = {a: miniature.bench_result(os.path.join(folder, a, "report.json")) for a in ARMS}
    starts = [pp for s, _, pp in miniature.start_evals(os.path.join(args.out, "runs")).get(build, []) if s == seed]
    if starts:
        start_bf16 = {"avg_at_k": sum(starts[0]) / len(starts[0]) * 100, "accuracy_per_problem": starts[0]}
    else:  # this build and seed were never evaluated in the miniature folder: here, once
        start_bf16 = evaluate_arm(args, start, "bfloat16", seed, os.path.join(folder, "start_bf16"), env)
    res["start_bf16"] = start_bf16
    with open(os.path.join(folder, "update.json")) as f:
        row = {"seed": seed, "build": build, "update": json.load(f),
               "avg_at_k": {a: r["avg_at_k"] for a, r in res.items()}, "vs_start": {}}
    for arm, (_, dtype) in ARMS.items():
        if arm != f"start_{'fp32' if dtype == 'float32' else 'bf16'}":
            ref = res["start_fp32" if dtype == "float32" else "start_bf16"]
            row["vs_start"][arm] = runner.paired(ref.get("accuracy_per_problem"), res[arm].get("accuracy_per_problem"))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--miniature", default="results/controls", help="a miniature folder: its budget and start build")
    ap.add_argument("--method", default="opsd", choices=[m for m in miniature.METHODS if m not in ("sft", "grpo")])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="results/rounding")
    ap.add_argument("--keep_models", action="store_true")
    a = ap.parse_args(argv)
    args = variant.miniature_args(os.path.abspath(a.miniature))
    miniature.prepare_data(args)
    out = os.path.abspath(a.out)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    for seed in a.seeds:
        print(f"seed {seed}: {a.method} from {miniature.start_model(args)}", flush=True)
        rows.append(run_seed(args, a.method, seed, out, env, a.keep_models))
        miniature.write_json(os.path.join(out, "summary.json"),
                             {"miniature": os.path.relpath(args.out, miniature.ROOT), "method": a.method,
                              "arms": {k: {"model": m, "eval_dtype": d} for k, (m, d) in ARMS.items()}, "seeds": rows})
        r = rows[-1]
        print(f"seed {seed}: update moves {100 * r['update']['moved']:.1f}% of weights, changes "
              f"{100 * r['update']['bf16_changed']:.1f}% in bf16 (median |update| / spacing "
              f"{r['update']['median_update_over_bf16_spacing']:.3f})")
        for arm, p in r["vs_start"].items():
            print(f"  {arm}: {r['avg_at_k'][arm]:.2f} Avg@k, vs its start {miniature.fmt_paired(p)}")


if __name__ == "__main__":
    main()
