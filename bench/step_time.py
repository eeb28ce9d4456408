"""Where the time of one training step goes, and how close the model math runs to the machine's matmul peak.

Measured in one run, side by side:
  1. the machine's bf16 and fp32 matmul rates (2048^3 matmuls), the reference for every fraction below,
     and its memory bandwidth (a 256 MiB tensor copy);
  2. on the embedded model with a batch shaped like `make demo`'s (B sequences, prompt + T response tokens):
     rollout (HF generate, under autocast as in train.py), teacher forward (no grad), student forward +
     backward with the DASD loss (the plain path on (B, T, V) logits, and train.py --chunk_size's path on hidden
     states), the model's forward + backward alone, optimizer step; each phase's seconds, and for the
     forward/backward phases the achieved FLOP rate as a fraction of (1); the teacher forward and the chunked
     student step again with eager attention (train.py --attn auto on a CPU) instead of torch's sdpa kernel;
  3. the step's limit: the time the rollout, teacher and student phases would take at the measured peaks,
     next to their measured time (the student phase on the loss path train.py takes by default: chunked with
     --chunk_size > 0 here, as train.py's auto does on a CPU; the plain one with --chunk_size 0);
  4. `make demo`'s own step (SFT: no rollout, no teacher; --sft_B reference solutions of the training split,
     capped at --sft_T tokens, in micro-batches of --sft_micro, through train.microbatch_loss on the plain and
     the chunked loss path, in the batch's order and grouped by length, with sdpa and with eager attention, then
     the gradient clip and the fused AdamW step, as train.py runs them), measured and beside its limit. The
     optimizer row of (2) shows torch's per-parameter AdamW loop beside the fused kernel.

FLOP counts (per sequence of S = prompt + response tokens, T response tokens, n_layers L, width d):
  forward  = 2 * N_body * S  +  2 * L * S^2 * d  (causal attention: QK^T and AV, each S^2 d / 2 MACs)
           + 2 * d * V * T   (the lm_head, applied to response positions only)
  backward = 2 * forward
where N_body counts the parameters of the transformer blocks (embedding lookups are free).

The limit (a lower bound on the step's time on this machine, from two measured peaks):
  compute limit = (teacher forward FLOPs + student forward/backward FLOPs) / matmul rate of the dtype in use
  decode limit  = n_decode x W / bandwidth
      n_decode  = decoding steps of the rollout = the longest sampled response (generate runs one batched
                  forward per new token until every sequence has stopped; the prompt's forward is the first)
      W         = bytes of weights read per decoding step, once for the whole batch: every parameter once
                  (the tied embedding is read in full as the lm_head; the input lookup reads B rows only) x
                  2 bytes in bf16 (autocast casts each fp32 weight once per generate call and caches the bf16
                  copy) or 4 in fp32
      bandwidth = 2 x 256 MiB / (time of one 256 MiB tensor copy: a read and a write of every byte)
  step limit    = compute limit + decode limit;  measured step = rollout + teacher forward + student fwd+bwd
The SFT step's limit: its forward/backward FLOPs at the matmul rate, plus the AdamW update at the measured
bandwidth (28 bytes per parameter: parameter, gradient and two moments read, three of them written).
Decoding is taken as memory-bound: each step multiplies B rows by every weight matrix, 2 * N * B FLOPs, far
below what the machine computes in the time it reads N weights at small B (the compute time of decoding is
printed beside it to check). Left out of the limit: the KV-cache reads of decoding, the softmax / loss passes
(elementwise, memory-bound) and the optimizer step (not a matmul; printed on its own).

Run:
    python bench/step_time.py                 # B=8, T=128, dtype = the faster matmul of bf16 / fp32
    python bench/step_time.py --B 4 --T 64 --dtype float32
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import chunked_loss  # noqa: E402
import losses  # noqa: E402
import model as modellib  # noqa: E402
import plumbing  # noqa: E402
import rollout  # noqa: E402
import teacher as teacherlib  # noqa: E402
import train  # noqa: E402


def matmul_rate(dtype):
    """model.matmul_rate (what --dtype auto compares) on larger matrices: a steadier peak for the FLOP limit."""
    return modellib.matmul_rate(dtype, n=2048, reps=5)


def copy_bandwidth(nbytes=2**28, reps=5):
    """Bytes per second moved by a large tensor copy (each copy reads and writes nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: the first touch of fresh pages costs page faults, not bandwidth
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    return 2 * nbytes * reps / (time.perf_counter() - t)


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
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: the faster of the bf16 and fp32 matmul rates measured at the start")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk_size", type=int, default=256,
                    help="token rows per chunk of the chunked DASD loss (train.py's CPU default); 0: the step "
                         "limit's row uses the plain loss on full logits")
    ap.add_argument("--sft_B", type=int, default=16, help="sequences of the SFT step (make demo: 16 prompts per step)")
    ap.add_argument("--sft_T", type=int, default=96, help="cap on reference-solution tokens (make demo: 96)")
    ap.add_argument("--sft_micro", type=int, default=8, help="micro-batch of the SFT step (make demo: 8)")
    args = ap.parse_args()
    torch.manual_seed(0)

    peak = matmul_rate(torch.bfloat16)
    peak32 = matmul_rate(torch.float32)
    bandwidth = copy_bandwidth()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if peak > peak32 else "float32"
    print(f"machine: bf16 matmul {peak / 1e9:.0f} GFLOP/s, fp32 matmul {peak32 / 1e9:.0f} GFLOP/s, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads) -> dtype {args.dtype}")

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
    with autocast():  # warm-up: first-call costs (allocator, kernel selection) stay out of the timing
        engine.generate(s_prompts[:1], n=1, max_new_tokens=2, temperature=1.0, seed=0)
    t = time.perf_counter()
    with autocast():  # as train.py's sample_batch: bf16 matmuls over the fp32 weights
        samples = engine.generate(s_prompts, n=1, max_new_tokens=args.T, temperature=1.0, seed=0)
    t_roll = time.perf_counter() - t
    gen_tokens = sum(len(s.token_ids) for s in samples)
    n_decode = max(len(s.token_ids) for s in samples)  # decoding steps: generate runs until all have stopped
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

    def teacher_hidden():
        with torch.no_grad(), autocast():
            return teacherlib.teacher_logits(teacher_model, t_prompts, responses, hidden=True)

    def student_fwd_bwd_chunked():
        # train.py --chunk_size C: hidden states out of the model, the loss and its logits gradient from
        # chunked_loss.chunked_distill_loss (at most C x V logits alive, the softmax Jacobian written out by hand)
        student.zero_grad(set_to_none=True)
        with autocast():
            h_s, mask = teacherlib.response_forward(student, s_prompts, responses, hidden=True)
        W_t = teacher_model.get_output_embeddings().weight.detach()
        # as in train.py: outside autocast, on the fp32 master weight of the lm_head, its matmuls in bf16 when the
        # model's are (matmul_dtype)
        W_s = student.get_output_embeddings().weight
        loss, _ = chunked_loss.chunked_distill_loss(h_s.float(), W_s, t_hid[0].float(), W_t, mask, method="dasd",
                                                    chunk_size=args.chunk_size,
                                                    matmul_dtype=torch.bfloat16 if bf16 else None)
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
    t_hid = teacher_hidden()
    t_chunked, _ = timed(student_fwd_bwd_chunked, args.reps)
    set_attn([student, teacher_model], "eager")  # train.py --attn auto on a CPU: eager attention
    t_teacher_eager, _ = timed(teacher_fwd, args.reps)
    t_chunked_eager, _ = timed(student_fwd_bwd_chunked, args.reps)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7)  # torch's default on a CPU: a loop over parameters
    t_opt, _ = timed(opt.step, args.reps)
    del opt
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7, fused=True)  # train.py --fused_adamw (the default)
    t_opt_fused, _ = timed(opt.step, args.reps)
    del opt

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
                          ("student fwd+bwd (model only)", t_model, f_student),
                          (f"  ... + chunked DASD loss, C={args.chunk_size}", t_chunked, f_student),
                          ("teacher forward, eager attention", t_teacher_eager, f_teacher),
                          ("  ... chunked DASD, eager attention", t_chunked_eager, f_student)]:
        print(f"{name:34s} {sec:8.2f} {fl / 1e9:8.1f} {fl / sec / 1e9:8.1f} {fl / sec / ref:8.1%}")
    print(f"the DASD loss's cost above the model's own forward/backward: plain {t_student - t_model:+.2f} s, "
          f"chunked {t_chunked - t_model:+.2f} s (chunked / plain step: {t_chunked / t_student:.2f}x)")
    print(f"eager attention / sdpa: teacher forward {t_teacher_eager / t_teacher:.2f}x, chunked student "
          f"fwd+bwd {t_chunked_eager / t_chunked:.2f}x")
    print(f"{'optimizer step (AdamW fp32, loop)':34s} {t_opt:8.2f}")
    print(f"{'optimizer step (AdamW fp32, fused)':34s} {t_opt_fused:8.2f}   ({t_opt_fused / t_opt:.2f}x the loop)")
    print(f"targets: student fwd+bwd >= 35% of peak, teacher forward >= 45% of peak "
          f"(peak = measured {args.dtype} matmul rate)")

    # the limit: compute phases at the measured matmul rate, decoding at the measured memory bandwidth
    n_params = sum(p.numel() for p in student.parameters())  # unique parameters: the tied lm_head counted once
    w_bytes = n_params * (2 if bf16 else 4)  # weights read per decoding step, once for the whole batch
    lim_roll = n_decode * w_bytes / bandwidth
    lim_teacher, lim_student = f_teacher / ref, f_student / ref
    decode_compute = n_decode * 2 * n_params * args.B / ref  # the decoding matmuls at the peak rate
    # the student step train.py takes on a CPU (--attn auto: eager; the plain loss's row stays on sdpa)
    t_default = t_chunked_eager if args.chunk_size > 0 else t_student
    loss_name = f"chunked DASD, C={args.chunk_size}, eager" if args.chunk_size > 0 else "DASD on full logits"
    measured = t_roll + t_teacher_eager + t_default
    limit = lim_roll + lim_teacher + lim_student
    print(f"\nlimit (compute at {ref / 1e9:.0f} GFLOP/s {args.dtype}, decoding at {bandwidth / 1e9:.1f} GB/s: "
          f"{n_decode} steps x {w_bytes / 2**20:.0f} MiB of weights)")
    print(f"{'phase':40s} {'measured':>8s} {'limit':>8s} {'ratio':>8s}")
    for name, sec, lim in [("rollout (decode, memory-bound)", t_roll, lim_roll),
                           ("teacher forward (eager attention)", t_teacher_eager, lim_teacher),
                           (f"student fwd+bwd ({loss_name})", t_default, lim_student),
                           ("step (the three above)", measured, limit)]:
        print(f"{name:40s} {sec:8.2f} {lim:8.2f} {sec / lim:8.1f}x")
    print(f"(decoding's matmuls at the peak rate would take {decode_compute:.2f} s: "
          f"{'below' if decode_compute < lim_roll else 'ABOVE'} the memory term; the optimizer step is not in the limit)")

    sft_step(args, student, tok, n_body, n_params, ref, bandwidth, autocast)


def set_attn(models, kind):
    """Switch transformers' attention kernel in place (train.py --attn; the weights are untouched)."""
    for m in models:
        m.set_attn_implementation(kind)


def sft_step(args, student, tok, n_body, n_params, ref, bandwidth, autocast):
    """make demo's step: train.py --method sft on --sft_B reference solutions, measured against its limit."""
    cfg = train.parse_config(["--method", "sft", "--max_new_tokens", str(args.sft_T),
                              "--micro_batch", str(args.sft_micro), "--dtype", args.dtype])
    cfg_chunked = train.parse_config(["--method", "sft", "--max_new_tokens", str(args.sft_T), "--micro_batch",
                                      str(args.sft_micro), "--dtype", args.dtype, "--chunk_size", str(args.chunk_size)])
    cfg.chunk_size = 0  # the plain loss on full logits
    rows = data.embedded_split("train")[: args.sft_B]
    batch = []
    for r in rows:  # as train.sample_batch builds SFT's batch: the solution's tokens + end of sequence, capped
        resp = tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        batch.append({"student_prompt": teacherlib.student_prompt_ids(tok, r["problem"]),
                      "response": resp[: args.sft_T]})
    n_tok = sum(len(b["response"]) for b in batch)
    lm_head = student.get_output_embeddings()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-7, fused=True)  # as train.py builds it

    def fwd_bwd(c, grouped):  # train.train_on_batch's loop: token-mean weights per micro-batch, one backward each
        opt.zero_grad(set_to_none=True)
        for mb in plumbing.micro_batches(batch, args.sft_micro, grouped):
            loss, n_mb, _ = train.microbatch_loss(c, student, None, lm_head, mb, autocast)
            (loss * (n_mb / n_tok)).backward()

    def update():
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    set_attn([student], "sdpa")
    t_plain, _ = timed(lambda: fwd_bwd(cfg, False), args.reps)
    t_chunk, _ = timed(lambda: fwd_bwd(cfg_chunked, False), args.reps)
    t_sdpa, _ = timed(lambda: fwd_bwd(cfg_chunked, True), args.reps)
    set_attn([student], "eager")  # train.py's CPU defaults: --chunk_size > 0, grouped, --attn eager
    t_fb, _ = timed(lambda: fwd_bwd(cfg_chunked, True), args.reps)
    t_up, _ = timed(update, args.reps)
    f_fb = 3 * forward_flops(student.config, n_body, [len(b["student_prompt"]) + len(b["response"]) for b in batch],
                             [len(b["response"]) for b in batch])
    lim_fb, lim_up = f_fb / ref, 28 * n_params / bandwidth
    print(f"\nmake demo's step (SFT): {args.sft_B} reference solutions, {n_tok} response tokens, mean prompt "
          f"{sum(len(b['student_prompt']) for b in batch) / len(batch):.0f} tokens, micro-batch {args.sft_micro}")
    print(f"{'phase':40s} {'measured':>8s} {'limit':>8s} {'ratio':>8s}")
    for name, sec, lim in [("forward + backward, NLL on full logits", t_plain, lim_fb),
                           (f"  ... chunked NLL, C={args.chunk_size}", t_chunk, lim_fb),
                           ("  ... chunked, grouped by length", t_sdpa, lim_fb),
                           ("  ... and eager attention", t_fb, lim_fb),
                           ("gradient clip + fused AdamW update", t_up, lim_up),
                           ("step (chunked, grouped, eager, update)", t_fb + t_up, lim_fb + lim_up)]:
        print(f"{name:40s} {sec:8.2f} {lim:8.2f} {sec / lim:8.1f}x")
    print(f"forward + backward at {f_fb / t_fb / 1e9:.0f} GFLOP/s, {f_fb / t_fb / ref:.0%} of the measured peak; "
          f"target: the demo step <= 2x its limit")


if __name__ == "__main__":
    main()
