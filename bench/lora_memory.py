"""Peak memory and step time of LoRA against full fine-tuning, side by side in one run, on the embedded model.

Each configuration runs train.py in its own subprocess: plain OPSD with the frozen teacher, 3 steps of 4 prompts x 64
new tokens, float32, HF rollouts, CPU. Memory is the process's peak resident set size, measured twice:
  whole run    ru_maxrss of that child alone (os.wait4), the final checkpoint included
  steps        the kernel's high-water mark VmHWM, read as soon as the last step's metrics line is written
               (before the final checkpoint; polled every 20 ms, so a little of the checkpoint may leak in)
Step times are the means of time/step, time/rollout and time/train over the steps after the first (the first
pays one-off costs); on a shared machine they move with the load of other jobs, so the CPU time of the whole run
(user + system, from the same rusage) is printed too: it moves much less. What differs: full fine-tuning keeps a frozen copy of the weights for the teacher, and a
gradient and two AdamW moments for every weight; LoRA keeps them for A and B only, and its teacher is the same
network with the adapter off. Saving a LoRA checkpoint also builds the merged projections (W + s B A) once.

Run:
    python bench/lora_memory.py                    # LoRA r64 / alpha 128 against full fine-tuning
    python bench/lora_memory.py --lora_r 16 --steps 4
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count_lines(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for l in f if l.strip())


def vm_hwm_mib(pid):
    """The process's peak resident set so far (Linux /proc), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def measure(args, out, steps):
    """Run train.py once; returns its peak memory (MiB: whole run, through the steps), step timings and log lines."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "stdout_stderr.txt"), "w")
    p = subprocess.Popen([sys.executable, "train.py", "--out_dir", out, *args], cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT)
    metrics, peak_steps = os.path.join(out, "metrics.jsonl"), None
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)  # this child's own rusage, not every child's maximum
        if pid:
            break
        if peak_steps is None and count_lines(metrics) >= steps:
            peak_steps = vm_hwm_mib(p.pid)
        time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    with open(os.path.join(out, "stdout_stderr.txt")) as f:
        text = f.read()
    if p.returncode != 0:
        raise SystemExit(f"train.py {' '.join(args)} failed:\n{text[-3000:]}")
    with open(metrics) as f:
        recs = [json.loads(l) for l in f if l.strip()]
    later = recs[1:] or recs
    mean = lambda k: sum(r[k] for r in later) / len(later)  # noqa: E731
    return {"peak_run": usage.ru_maxrss / 1024, "peak_steps": peak_steps, "cpu": usage.ru_utime + usage.ru_stime,
            "step": mean("time/step"),
            "rollout": mean("time/rollout"), "train": mean("time/train"), "loss": recs[-1]["loss/total"],
            "info": [l for l in text.splitlines() if l.startswith("LoRA r")]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora_r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    a = ap.parse_args()
    common = ["--method", "opsd", "--exposure", "full", "--teacher", "frozen", "--steps", str(a.steps),
              "--prompts_per_step", str(a.prompts), "--max_new_tokens", str(a.max_new_tokens), "--micro_batch",
              str(a.prompts), "--dtype", "float32", "--rollout", "hf", "--seed", "0"]
    configs = {"full fine-tuning": ["--lr", "1e-5"],
               f"LoRA r{a.lora_r}": ["--lr", "2e-4", "--lora_r", str(a.lora_r)]}  # OPSD's LoRA lr; alpha = 2 r
    print(f"train.py {' '.join(common)}  (threads: {os.environ.get('OMP_NUM_THREADS', 'default')})", flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, args) in enumerate(configs.items()):
            res[name] = measure(common + args, os.path.join(tmp, str(i)), a.steps)
            for line in res[name]["info"]:
                print("  " + line)
            print(f"  {name}: done", flush=True)
    full, lo = res["full fine-tuning"], res[f"LoRA r{a.lora_r}"]
    print(f"\n| | peak RSS, whole run (MiB) | peak RSS, through the steps (MiB) | step (s) | rollout (s) | train (s) |"
          f" CPU, whole run (s) | last loss |\n|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['peak_run']:.0f} | {r['peak_steps']:.0f} | {r['step']:.2f} | {r['rollout']:.2f} |"
              f" {r['train']:.2f} | {r['cpu']:.0f} | {r['loss']:.4f} |")
    ratio = {k: lo[k] / full[k] for k in ("peak_run", "peak_steps", "step", "rollout", "train", "cpu")}
    print(f"| LoRA / full | {ratio['peak_run']:.2f} | {ratio['peak_steps']:.2f} | {ratio['step']:.2f} |"
          f" {ratio['rollout']:.2f} | {ratio['train']:.2f} | {ratio['cpu']:.2f} | |")


if __name__ == "__main__":
    main()
