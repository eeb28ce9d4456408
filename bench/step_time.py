"""Where the time of one training step goes, and how close the model math runs to the machine's matmul peak.

Measured in one run, side by side:
  1. the machine's bf16 matmul rate (2048^3 matmuls), the reference for every fraction below;
  2. on the embedded model with a batch shaped like `make demo`'s (B sequences, prompt + T response tokens):
     rollout (HF generate), teacher forward (no grad), student forward + backward with the DASD loss,
     optimizer step; each phase's seconds, and for the forward/backward phases the achieved FLOP rate
     as a fraction of (1).

FLOP counts (per sequence of S = prompt + response tokens, T response tokens, n_layers L, width d):
  forward  = 2 * N_body * S  +  2 * L * S^2 * d  (causal attention: QK^T and AV, each S^2 d / 2 MACs)
           + 2 * d * V * T   (the lm_head, applied to response positions only)
  backward = 2 * forward
where N_body counts the parameters of the transformer blocks (embedding lookups are free).

Run:
    python bench/step_time.py                 # B=8, T=128, bf16 autocast
    python bench/step_time.py --B 4 --T 64 --dtype float32
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import losses  # noqa: E402
import model as modellib  # noqa: E402
import rollout  # noqa: E402
import teacher as teacherlib  # noqa: E402


def matmul_rate(dtype, n=2048, reps=5):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def forward_flops(cfg, n_body, seq_lens, resp_lens):
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    f = 0
    for S, T in zip(seq_lens, resp_lens):
        f += 2 * n_body * S + 2 * L * S * S * d + 2 * d * V * T
    return f


def timed(fn, reps):
    fn()  # warm-up (allocator, kernels' first-call costs)
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - t) / reps, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=8, help="sequences per step")
    ap.add_argument("--T", type=int, default=128, help="response tokens per sequence")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)

    peak = matmul_rate(torch.bfloat16)
    peak32 = matmul_rate(torch.float32)
    print(f"machine: bf16 matmul {peak / 1e9:.0f} GFLOP/s, fp32 matmul {peak32 / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")

    student, tok = modellib.load(dtype=torch.float32)
    teacher_model = teacherlib.make_teacher(student, mode="frozen")
    cfg = student.config
    n_body = sum(p.numel() for n, p in student.named_parameters() if "embed" not in n and "lm_head" not in n)
    bf16 = args.dtype == "bfloat16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    rows = data.embedded_split("train")[: args.B]
    s_prompts = [teacherlib.student_prompt_ids(tok, r["problem"]) for r in rows]
    t_prompts = [teacherlib.teacher_prompt_ids(tok, r["problem"], r["solution"], r["answer"]) for r in rows]

    # rollout phase: the HF backend generating T tokens per prompt (min_new_tokens keeps lengths fixed)
    engine = rollout.make_rollout("hf", model=student, tokenizer=tok, seed=0, dtype=args.dtype)
    t = time.perf_counter()
    samples = engine.generate(s_prompts, n=1, max_new_tokens=args.T, temperature=1.0, seed=0)
    t_roll = time.perf_counter() - t
    gen_tokens = sum(len(s.token_ids) for s in samples)
    # fixed-length responses for the forward/backward phases so every variant sees the same shapes
    responses = [torch.randint(3, cfg.vocab_size, (args.T,)).tolist() for _ in rows]

    def teacher_fwd():
        with autocast():
            return teacherlib.teacher_logits(teacher_model, t_prompts, responses)

    def student_fwd_bwd():
        student.zero_grad(set_to_none=True)
        with autocast():
            s_logits, mask = teacherlib.response_forward(student, s_prompts, responses)
        t_logits = t_out[0]
        loss, _ = losses.dasd_loss(s_logits, t_logits, mask)
        loss.backward()
        return loss

    def student_fwd_bwd_model_only():
        # the same forward + backward with a trivial loss: the model math alone, without the loss's softmaxes
        student.zero_grad(set_to_none=True)
        with autocast():
            s_logits, mask = teacherlib.response_forward(student, s_prompts, responses)
        s_logits.float().mean().backward()

    t_teacher, t_out = timed(teacher_fwd, args.reps)
    t_student, _ = timed(student_fwd_bwd, args.reps)
    t_model, _ = timed(student_fwd_bwd_model_only, args.reps)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7)
    t_opt, _ = timed(opt.step, args.reps)

    f_teacher = forward_flops(cfg, n_body, [len(p) + args.T for p in t_prompts], [args.T] * args.B)
    f_student = 3 * forward_flops(cfg, n_body, [len(p) + args.T for p in s_prompts], [args.T] * args.B)
    ref = peak if bf16 else peak32
    print(f"batch: B={args.B}, T={args.T}, mean prompt {sum(map(len, s_prompts)) / args.B:.0f} (student) / "
          f"{sum(map(len, t_prompts)) / args.B:.0f} (teacher) tokens, dtype {args.dtype}")
    print(f"{'phase':34s} {'seconds':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'of peak':>8s}")
    print(f"{'rollout (hf generate, %d tok)' % gen_tokens:34s} {t_roll:8.2f} {'':>8s} {'':>8s} {'':>8s}"
          f"   {gen_tokens / t_roll:.0f} tok/s")
    for name, sec, fl in [("teacher forward", t_teacher, f_teacher),
                          ("student fwd+bwd (model + DASD loss)", t_student, f_student),
                          ("student fwd+bwd (model only)", t_model, f_student)]:
        print(f"{name:34s} {sec:8.2f} {fl / 1e9:8.1f} {fl / sec / 1e9:8.1f} {fl / sec / ref:8.1%}")
    print(f"{'optimizer step (AdamW fp32)':34s} {t_opt:8.2f}")
    print(f"targets: student fwd+bwd >= 35% of peak, teacher forward >= 45% of peak "
          f"(peak = measured {args.dtype} matmul rate)")


if __name__ == "__main__":
    main()
