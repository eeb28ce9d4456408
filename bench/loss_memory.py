"""Peak extra memory and forward+backward time of the distillation loss: plain, chunked, and TRL's generalized JSD.

Every variant starts from the same inputs (student and teacher final hidden states (1, T, H), both lm_head weights
(V, H), the mask) and includes the lm_head matmuls, so the comparison is whole:
  trl           logits = h @ W.T for both sides, then GKDTrainer.generalized_jsd_loss (beta=0, forward KL) on the
                full (T, V) logits in the model dtype, as a trainer handing it a bf16 model's logits does
  plain-opsd    the same logits, then losses.opsd_loss (float32 softmax math, per-entry clip)
  plain-dasd    the same logits, then losses.dasd_loss
  chunked-opsd  chunked_loss.chunked_distill_loss(method="opsd"): at most chunk_size x V logits at a time
  chunked-dasd  chunked_loss.chunked_distill_loss(method="dasd")
  *-topK        a plain or chunked variant with topk=K: the divergence on the teacher's K most likely entries,
                both sides renormalized over them (OPSD's top_k_loss). The default runs chunked-opsd-top50 and
                chunked-dasd-top50: K = 50 is the value of OPSD's own top-k script (scripts/run_opsd_topkloss.sh).
                Any K can be named, e.g. --variants chunked-opsd-top1000 plain-dasd-top20 (a wide support
                shows how the cost of the selection, torch.topk over V per row, grows with K).

Each variant runs in its own process (a fresh allocator, so one variant's peak cannot hide in another's cache):
after a small warm-up and after building the inputs, the process resets its peak-RSS counter
(echo 5 > /proc/self/clear_refs), runs forward+backward once, and reads VmHWM from /proc/self/status.
  peak extra = VmHWM - RSS before the step - size of the lm_head weight gradient (every variant must produce it)
Time is the wall time of forward + backward (best of --repeat runs). CPU only; Linux only (/proc).

Defaults are Qwen3-1.7B's sizes (T = 2048 response tokens, V = 151,936, H = 2048) in bf16, the fast dtype on
this CPU. The full size needs about 8 GB free for TRL and more for the plain variants; --T/--V/--H shrink it.

    python bench/loss_memory.py --quick                       # tiny sizes, seconds
    python bench/loss_memory.py --T 512 --V 32768 --H 1024    # medium
    python bench/loss_memory.py                               # full size, every variant
    python bench/loss_memory.py --variants trl chunked-opsd chunked-dasd
    python bench/loss_memory.py --variants chunked-opsd chunked-opsd-top50 chunked-dasd chunked-dasd-top50
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["trl", "plain-opsd", "plain-dasd", "chunked-opsd", "chunked-dasd", "chunked-opsd-top50",
            "chunked-dasd-top50"]
VARIANT_RE = re.compile(r"trl|(plain|chunked)-(opsd|dasd)(?:-top([1-9][0-9]*))?")


def variant_name(name):
    """argparse type: trl, plain-opsd, chunked-dasd, ..., each of the last four optionally with -topK."""
    if not VARIANT_RE.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{name!r}: trl or (plain|chunked)-(opsd|dasd)[-topK], e.g. plain-dasd-top50")
    return name


def parse_variant(name):
    """'chunked-dasd-top50' -> ('chunked', 'dasd', 50); 'plain-opsd' -> ('plain', 'opsd', None); 'trl' -> trl."""
    if name == "trl":
        return "trl", None, None
    m = VARIANT_RE.fullmatch(name)
    return m.group(1), m.group(2), int(m.group(3)) if m.group(3) else None


def proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def make_inputs(T, V, H, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # logits = h W^T with h ~ N(0, 1) and W ~ N(0, (2/sqrt(H))^2): logit std about 2, a realistic spread
    h_s = torch.randn(1, T, H, generator=g).to(dtype).requires_grad_(True)  # (1, T, H)
    W_s = (torch.randn(V, H, generator=g) * (2 / H**0.5)).to(dtype).requires_grad_(True)  # (V, H)
    h_t = (h_s.detach().float() + 0.5 * torch.randn(1, T, H, generator=g)).to(dtype)  # (1, T, H) teacher
    W_t = (W_s.detach().float() + torch.randn(V, H, generator=g) * (0.5 / H**0.5)).to(dtype)  # (V, H)
    mask = torch.ones(1, T, dtype=torch.bool)  # (1, T) every position is a response token
    return h_s, W_s, h_t, W_t, mask


def step(variant, h_s, W_s, h_t, W_t, mask, chunk_size, math_rows=16):
    """One forward + backward of the variant; leaves the gradients in h_s.grad and W_s.grad."""
    import torch

    import chunked_loss
    import losses

    kind, method, topk = parse_variant(variant)
    if kind == "chunked":
        loss, _ = chunked_loss.chunked_distill_loss(h_s, W_s, h_t, W_t, mask, method=method, chunk_size=chunk_size,
                                                    math_rows=math_rows, topk=topk)
    else:
        z_s = h_s @ W_s.T  # (1, T, V) student logits, in the graph
        with torch.no_grad():
            z_t = h_t @ W_t.T  # (1, T, V) teacher logits, no graph
        if kind == "trl":
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            try:
                from trl.experimental.gkd.gkd_trainer import GKDTrainer
            except ImportError:
                from trl.trainer.gkd_trainer import GKDTrainer
            labels = torch.where(mask, 0, -100)  # (1, T) TRL masks with -100 labels
            loss = GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=labels, beta=0.0, temperature=1.0)
        elif method == "opsd":
            loss, _ = losses.opsd_loss(z_s, z_t, mask, topk=topk)
        else:
            loss, _ = losses.dasd_loss(z_s, z_t, mask, topk=topk)
        del z_t
    loss.backward()
    return loss.item()


def worker(args):
    import gc

    import torch

    sys.path.insert(0, ROOT)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    # warm-up on tiny sizes: loads libraries, kernels and (for trl) the trainer module outside the measurement
    step(args.variant, *make_inputs(16, 256, 32, dtype), chunk_size=8, math_rows=4)
    h_s, W_s, h_t, W_t, mask = make_inputs(args.T, args.V, args.H, dtype)
    gc.collect()
    best, loss = float("inf"), None
    for r in range(args.repeat):
        h_s.grad, W_s.grad = None, None
        gc.collect()
        rss0 = proc_status_kb("VmRSS")
        if r == 0:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        t0 = time.perf_counter()
        loss = step(args.variant, h_s, W_s, h_t, W_t, mask, args.chunk_size, args.math_rows)
        dt = time.perf_counter() - t0
        best = min(best, dt)
        if r == 0:
            hwm = proc_status_kb("VmHWM")
            grad_W_mb = W_s.grad.numel() * W_s.grad.element_size() / 2**20
            peak_extra_mb = (hwm - rss0) / 1024 - grad_W_mb
    assert W_s.grad is not None and h_s.grad is not None
    print(json.dumps({"variant": args.variant, "loss": loss, "peak_extra_mb": peak_extra_mb, "time_s": best,
                      "grad_W_mb": grad_W_mb, "rss_before_mb": rss0 / 1024}))


def driver(args):
    if args.quick:
        args.T, args.V, args.H = 256, 8192, 256
    sizes = (f"T={args.T} V={args.V} H={args.H} dtype={args.dtype} chunk_size={args.chunk_size} "
             f"math_rows={args.math_rows} repeat={args.repeat}")
    print(sizes, flush=True)
    results = {}
    for v in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--T", str(args.T), "--V", str(args.V),
               "--H", str(args.H), "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
               "--math-rows", str(args.math_rows), "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(f"{v:20s} FAILED (exit {out.returncode}):\n{out.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[v] = r
        print(f"{v:20s} peak extra {r['peak_extra_mb']:9.1f} MiB   fwd+bwd {r['time_s']:7.2f} s   "
              f"loss {r['loss']:.5f}", flush=True)
    if "trl" in results:
        trl = results["trl"]
        for v, r in results.items():
            if v != "trl":
                print(f"{v} / trl: memory {r['peak_extra_mb'] / trl['peak_extra_mb']:.3f}   "
                      f"time {r['time_s'] / trl['time_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": sizes, "results": results}, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", type=variant_name, help="run one variant in this process (used by the driver)")
    p.add_argument("--variants", nargs="+", type=variant_name, default=VARIANTS,
                   help="variants the driver runs: trl or (plain|chunked)-(opsd|dasd)[-topK]")
    p.add_argument("--T", type=int, default=2048, help="response tokens")
    p.add_argument("--V", type=int, default=151936, help="vocabulary size")
    p.add_argument("--H", type=int, default=2048, help="hidden size")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of hidden states and weights")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk of the chunked path")
    p.add_argument("--math-rows", type=int, default=16, help="rows of float32 loss math at a time (chunked)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per variant (memory from the first)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (T=256, V=8192, H=256)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    worker(a) if a.variant else driver(a)
