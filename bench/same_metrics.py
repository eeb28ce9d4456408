"""Behaviour check for refactors of train.py: every method writes the same metrics as a reference revision.

For each configuration below, train.py runs 3 steps (same seed, float32, HF rollouts) once from a
reference git revision and once from the working tree; the metrics.jsonl lines must be identical,
timing keys (time/*, train/tokens_per_s) aside. Exact equality, not a tolerance: the same code path in
the same process layout gives bit-identical floats on one machine, so any difference is a change of
behaviour.

Run:
    python bench/same_metrics.py --ref HEAD         # working tree against the last commit
    python bench/same_metrics.py --ref main~2 --only dasd_atesd grpo
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--steps", "3", "--prompts_per_step", "2", "--max_new_tokens", "16", "--micro_batch", "2",
          "--dtype", "float32", "--rollout", "hf", "--seed", "3", "--lr", "1e-5"]
CONFIGS = {
    "opsd_full": ["--method", "opsd", "--exposure", "full"],
    "opsd_fixed_ema": ["--method", "opsd", "--exposure", "fixed", "--alpha", "0.5", "--teacher", "ema"],
    "opsd_chunked_live": ["--method", "opsd", "--exposure", "full", "--chunk_size", "8", "--teacher", "live"],
    "dasd_atesd": ["--method", "dasd", "--exposure", "atesd", "--hold", "1", "--lookahead", "1",
                   "--batch_decisions", "2"],
    "dasd_random": ["--method", "dasd", "--exposure", "random"],
    "dasd_adv": ["--method", "dasd_adv", "--exposure", "full", "--samples_per_prompt", "2"],
    "grpo": ["--method", "grpo", "--samples_per_prompt", "2"],
    "sft": ["--method", "sft"],
}
VOLATILE = ("time/", "train/tokens_per_s")


def run(src, out, args):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "train.py", "--out_dir", out, *COMMON, *args], cwd=src, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"train.py failed in {src}:\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items() if not k.startswith(VOLATILE)} for l in f if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default="HEAD", help="git revision to compare the working tree with")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {sorted(CONFIGS)}")
    a = ap.parse_args()
    names = a.only or list(CONFIGS)
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_src = os.path.join(tmp, "ref")
        os.makedirs(ref_src)
        # the reference revision's files, exactly as committed (no worktree bookkeeping left behind)
        archive = subprocess.run(["git", "archive", a.ref], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", ref_src], input=archive, check=True)
        for name in names:
            old = run(ref_src, os.path.join(tmp, "old", name), CONFIGS[name])
            new = run(ROOT, os.path.join(tmp, "new", name), CONFIGS[name])
            same = old == new
            print(f"{name:20s} {'identical' if same else 'DIFFERENT'} ({len(new)} steps, {len(new[0])} keys each)",
                  flush=True)
            if not same:
                for step, (o, n) in enumerate(zip(old, new), 1):
                    for k in sorted(set(o) | set(n)):
                        if o.get(k) != n.get(k):
                            print(f"    step {step} {k}: {o.get(k)!r} -> {n.get(k)!r}")
                bad.append(name)
    print("all identical" if not bad else f"different: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
