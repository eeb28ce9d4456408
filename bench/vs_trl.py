"""train.py against TRL's `trl.experimental.sdft` trainer at equal settings: seconds per step and response tokens/s.

Both trainers run the same OPSD-style step on the embedded SmolLM2-135M-Instruct, one after the other in one
invocation, each in its own subprocess (so neither inherits the other's allocator, threads or warm caches):

    step = the student samples y ~ p_S(. | x)                        (transformers `generate`, both sides)
           teacher forward on [x + reference solution | y]  (no grad, frozen initial weights)
           student forward + backward of  mean_t KL(p_T(.|t) || p_S(.|t))  over the full vocabulary
           gradient-norm clip at 1.0, one AdamW step

    tokens/s = (response tokens sampled in the measured steps) / (their wall seconds); the stop token counts.
    ratio    = train.py tokens/s / TRL tokens/s   (printed, not asserted; the project's target is >= 3 at the
               full demo settings)

train.py runs twice (--ours_rollout hf vllm): with transformers `generate` rollouts, the equal-settings row,
and with vLLM rollouts, its own default where vLLM is installed (one more copy of the weights, a weight sync
after every step, counted in its step time). TRL's sdft trainer decodes with `generate` on a CPU.

What is EQUAL on the two sides
  1. Model and weights: the embedded model, float32 master weights, loaded the same way (model.load).
  2. Data: the same prompts at every step. The TRL dataset is train.py's own step order (train.step_rows with
     the same seed) laid out step by step, with TRL's shuffling off.
  3. Batch: --prompts prompts per step, 1 sample per prompt, one micro-batch (train.py --micro_batch = prompts;
     TRL per_device_train_batch_size = prompts, num_generations = 1, gradient_accumulation_steps = 1, one
     generation per optimizer step, so TRL's importance-sampling correction is never computed).
  4. Sampling: transformers `generate`, temperature 1.0, no top-k / top-p, at most --max_new_tokens tokens, the
     same stop tokens (TRL's eos list is set to rollout.stop_token_ids: <|im_end|> and <|endoftext|>).
  5. Loss: forward KL(p_T || p_S) on the full vocabulary at every response token (train.py --method opsd
     --beta 0 --clip 0, on its default loss path: chunked from hidden states on a CPU, docs/choices.md, choice 16; TRL distillation_mode="full_logits", distillation_alpha=0.0, distillation_is_clip=None).
     TRL's compute_divergence(student, teacher, alpha=0) is F.kl_div(log p_S, log p_T) = sum_v p_T (log p_T -
     log p_S): the same direction.
  6. Teacher: frozen at the initial weights (train.py --teacher frozen, a deep copy; TRL
     teacher_model_kind="base", a second copy loaded from the same folder), shown the full reference solution
     and its answer (train.py --exposure full, alpha = 1).
  7. Optimizer: torch AdamW, --lr, betas (0.9, 0.999), no weight decay, constant learning rate, no warm-up,
     gradient-norm clip 1.0.
  8. Dtype: each side gets the dtype picked by --dtype (auto: the faster of bf16 / fp32 2048^3 matmuls measured
     at the start of the run); bf16 means autocast over the fp32 weights on both sides (train.py --dtype
     bfloat16; TRL bf16=True, i.e. accelerate's mixed precision). --ours_dtype / --trl_dtype override one side.
  9. Threads and machine: the same torch thread count (the default), one side at a time.

What DIFFERS (inherent to the trainers, not chosen here)
  1. Teacher prompt wording. TRL builds the teacher turn as teacher_prompt_template.format(prompt=<the student's
     user text>, privileged_context=...) and requires both placeholders, so the student's instruction line stays
     in it. privileged_context = our teacher turn (teacher.teacher_messages) after the problem: header, reference,
     answer and transition. TRL's teacher prompt is therefore ours plus the student's instruction line (19
     tokens longer: the mean teacher prompt lengths of both sides are printed), a slightly larger teacher
     forward for TRL.
  2. Reduction: train.py takes the token mean over the whole batch; TRL the token mean per sequence, then the
     mean over sequences. Same work, different weighting of long and short responses.
  3. Per-step extras, each part of its trainer's step: train.py records sampling log-probs in generate (one
     log_softmax per decoding step), grades every response, and logs the student's entropy and the unclipped KL
     (two more (B, T, V) passes); TRL divides both logits by the temperature (a (B, T, V) copy each) and, in
     bf16, accelerate casts every forward's output logits to fp32 (another copy).
  4. Autocast scope (bf16 only): train.py enters autocast once around the whole generate call and once around
     each forward, so torch's autocast weight cache casts each fp32 weight to bf16 once per call; TRL's autocast
     comes from accelerate wrapping model.forward, so generate re-enters it (and re-casts the weights) at every
     decoding step.
  5. The samples themselves: the two trainers seed their samplers differently, so response lengths differ
     (hence tokens/s, not steps/s, is the compared rate; the step time of both is dominated by max_new_tokens
     decoding steps whenever one response of the batch runs to the cap).
  6. Timing: train.py's own time/step (rollout to metrics, metrics.jsonl); TRL's is the wall time between
     consecutive on_step_end callbacks (the whole Trainer loop, logging included). Both leave out model loading,
     the first --warmup steps and the final checkpoint. TRL's rollout seconds are taken between its
     on_generation_prompts_selected and on_self_distillation_batch_prepared callbacks.

Run:
    python bench/vs_trl.py                                   # 8 prompts x 64 new tokens, 1 warm-up + 3 steps
    python bench/vs_trl.py --prompts 8 --max_new_tokens 128 --steps 3 --json /tmp/vs_trl.json
    python bench/vs_trl.py --dtype float32                   # both sides in float32
    python bench/vs_trl.py --ours_rollout hf                 # the equal-settings row only
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from step_time import matmul_rate  # noqa: E402  (bench/ is on sys.path as the script's folder)


# -----------------------------------------------------------------------------------------------
# The TRL side (runs in its own process: python bench/vs_trl.py --side trl ...)


def trl_teacher_context(problem, solution, answer):
    """Our full-exposure teacher turn minus its leading problem text: what TRL appends after the student prompt."""
    import teacher as teacherlib

    content = teacherlib.teacher_messages(problem, solution, answer, alpha=1.0)[0]["content"]
    head = problem + "\n\n"
    assert content.startswith(head), "teacher.teacher_messages no longer starts with the problem"
    return content[len(head):]


def run_trl(args, dtype):
    import datasets
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    import data
    import model as modellib
    import rollout
    import teacher as teacherlib
    import train

    n_steps = args.warmup + args.steps
    rows = data.load_dataset("embedded", split="train")
    order = argparse.Namespace(prompts_per_step=args.prompts, seed=args.seed)
    picked = [r for s in range(n_steps) for r in train.step_rows(rows, order, s, 0, 1)]  # train.py's prompts
    ds = datasets.Dataset.from_list([
        {"prompt": teacherlib.student_messages(r["problem"]),
         "privileged_context": trl_teacher_context(r["problem"], r["solution"], r["answer"])} for r in picked])

    student, tok = modellib.load(dtype=torch.float32)
    student.generation_config.eos_token_id = rollout.stop_token_ids(tok, student.config)  # same stops as ours

    class Clock(TrainerCallback):
        """Wall time of each optimizer step, its rollout part, and its response tokens (from the step's log)."""

        def __init__(self):
            self.t_end, self.t_gen, self.rollout, self.steps = None, None, 0.0, []

        def on_train_begin(self, args, state, control, **kw):
            self.t_end = time.perf_counter()

        def on_generation_prompts_selected(self, args, state, control, **kw):
            self.t_gen = time.perf_counter()

        def on_self_distillation_batch_prepared(self, args, state, control, **kw):
            self.rollout = time.perf_counter() - self.t_gen

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter()
            self.steps.append({"step": state.global_step, "seconds": t - self.t_end, "rollout": self.rollout})
            self.t_end = t

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.steps[-1]["tokens"] = logs["completions/mean_length"] * args.per_device_train_batch_size

    clock = Clock()
    out = tempfile.TemporaryDirectory(prefix="vs_trl_")  # TRL writes nothing here (save_strategy="no")
    cfg = SDFTConfig(
        output_dir=out.name, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=args.seed,
        max_steps=n_steps, per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1,
        num_generations=1, shuffle_dataset=False, max_prompt_length=None, dataloader_num_workers=0,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, use_vllm=False,
        teacher_model_kind="base", distillation_mode="full_logits", distillation_alpha=0.0,
        distillation_is_clip=None, distillation_add_tail=False, num_loss_tokens_to_skip=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, bf16=dtype == "bfloat16", use_cpu=True,
    )
    trainer = SDFTTrainer(model=student, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
    # the teacher prompt TRL builds (its DemonstrationTeacherContextBuilder), tokenized as it does
    teacher_lens = [len(teacherlib.chat_ids(tok, [{"role": "user", "content": cfg.teacher_prompt_template.format(
        prompt=r["prompt"][-1]["content"], privileged_context=r["privileged_context"])}]))
        for r in ds.select(range(args.prompts))]
    trainer.train()
    out.cleanup()
    return {"steps": clock.steps, "teacher_prompt_len": sum(teacher_lens) / len(teacher_lens)}


# -----------------------------------------------------------------------------------------------
# The train.py side: train.py itself in its own process, read back from its metrics.jsonl


def run_ours(args, dtype, backend="hf"):
    import data
    import model as modellib
    import teacher as teacherlib
    import train

    with tempfile.TemporaryDirectory(prefix="vs_trl_ours_") as out:
        cmd = [sys.executable, "train.py", "--out_dir", out, "--method", "opsd", "--exposure", "full",
               "--teacher", "frozen", "--beta", "0", "--clip", "0", "--steps", str(args.warmup + args.steps),
               "--prompts_per_step", str(args.prompts), "--samples_per_prompt", "1", "--micro_batch",
               str(args.prompts), "--max_new_tokens", str(args.max_new_tokens), "--temperature", "1.0",
               "--top_p", "1.0", "--top_k", "-1", "--optimizer", "adamw", "--lr", str(args.lr),
               "--weight_decay", "0", "--warmup_steps", "0", "--grad_clip", "1.0", "--rollout", backend,
               "--dtype", dtype, "--seed", str(args.seed)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"train.py failed:\n{p.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(l) for l in f if l.strip()]
    from transformers import AutoTokenizer

    rows = data.load_dataset("embedded", split="train")
    tok = AutoTokenizer.from_pretrained(modellib.resolve(None))
    first = train.step_rows(rows, argparse.Namespace(prompts_per_step=args.prompts, seed=args.seed), 0, 0, 1)
    t_lens = [len(teacherlib.teacher_prompt_ids(tok, r["problem"], r["solution"], r["answer"])) for r in first]
    steps = [{"step": r["step"], "seconds": r["time/step"], "rollout": r["time/rollout"],
              "tokens": r["rollout/response_len"] * args.prompts} for r in recs]
    return {"steps": steps, "teacher_prompt_len": sum(t_lens) / len(t_lens)}


# -----------------------------------------------------------------------------------------------
# Driver: pick the dtypes, run each side in its own process, print the comparison


def summarize(res, warmup):
    m = res["steps"][warmup:]
    sec, tok, roll = sum(s["seconds"] for s in m), sum(s["tokens"] for s in m), sum(s["rollout"] for s in m)
    return {"s_per_step": sec / len(m), "rollout_s_per_step": roll / len(m), "tokens_per_step": tok / len(m),
            "tokens_per_s": tok / sec, "teacher_prompt_len": res["teacher_prompt_len"], "steps": res["steps"]}


def side_in_subprocess(args, side, dtype):
    with tempfile.TemporaryDirectory(prefix="vs_trl_side_") as d:
        path = os.path.join(d, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--dtype", dtype, "--result", path,
               "--prompts", str(args.prompts), "--max_new_tokens", str(args.max_new_tokens),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr),
               "--seed", str(args.seed)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{side} side failed:\n{p.stderr[-4000:]}")
        with open(path) as f:
            return json.load(f)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (1 sample each)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    ap.add_argument("--lr", type=float, default=2e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="both sides; auto = the faster 2048^3 matmul of bf16 and fp32, measured now")
    ap.add_argument("--ours_dtype", default=None, choices=["bfloat16", "float32"], help="override for train.py")
    ap.add_argument("--trl_dtype", default=None, choices=["bfloat16", "float32"], help="override for TRL")
    ap.add_argument("--ours_rollout", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"],
                    help="train.py's rollout backends, each measured in turn: hf is the equal-settings comparison "
                         "(both sides decode with transformers generate), vllm is train.py's own default where "
                         "vLLM is installed (TRL's sdft trainer decodes with generate on a CPU)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--side", default=None, choices=["trl"], help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side is not None:  # worker: one side, result to a file
        res = run_trl(args, args.dtype)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return

    rates = {"bfloat16": matmul_rate(torch.bfloat16), "float32": matmul_rate(torch.float32)}
    fastest = max(rates, key=rates.get)
    dtype = {"ours": args.ours_dtype, "trl": args.trl_dtype}
    for side in dtype:
        dtype[side] = dtype[side] or (fastest if args.dtype == "auto" else args.dtype)
    with open("/proc/cpuinfo") as f:
        cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "unknown")
    print(f"machine: {cpu}, {torch.get_num_threads()} threads; matmul 2048^3: bf16 {rates['bfloat16'] / 1e9:.0f}, "
          f"fp32 {rates['float32'] / 1e9:.0f} GFLOP/s -> train.py {dtype['ours']}, TRL {dtype['trl']}")
    print(f"settings: {args.prompts} prompts x 1 sample, <= {args.max_new_tokens} new tokens, temperature 1, "
          f"forward KL full vocabulary, frozen teacher, AdamW lr {args.lr}, {args.warmup} warm-up + "
          f"{args.steps} measured steps", flush=True)

    results, loads = {}, {}
    sides = [(f"ours_{b}", f"train.py {b}") for b in args.ours_rollout] + [("trl", "TRL sdft")]
    for side, name in sides:
        before = loadavg()
        t = time.perf_counter()
        if side == "trl":
            res = side_in_subprocess(args, side, dtype["trl"])
        else:
            res = run_ours(args, dtype["ours"], backend=side[len("ours_"):])
        results[side] = summarize(res, args.warmup)
        loads[side] = [before, loadavg()]
        print(f"  {name:13s} done in {time.perf_counter() - t:.0f} s (load average {before[0]:.1f} -> "
              f"{loads[side][1][0]:.1f})", flush=True)

    print(f"\n{'side':14s} {'dtype':9s} {'s/step':>7s} {'rollout s':>9s} {'tok/step':>8s} {'tok/s':>7s} "
          f"{'teacher prompt':>14s}")
    for side, name in sides:
        r = results[side]
        print(f"{name:14s} {dtype['trl' if side == 'trl' else 'ours']:9s} {r['s_per_step']:7.2f} "
              f"{r['rollout_s_per_step']:9.2f} {r['tokens_per_step']:8.1f} {r['tokens_per_s']:7.1f} "
              f"{r['teacher_prompt_len']:11.0f} tok")
    ratios = {side: results[side]["tokens_per_s"] / results["trl"]["tokens_per_s"] for side, _ in sides[:-1]}
    for side, name in sides[:-1]:
        print(f"ratio {name} / TRL tokens/s: {ratios[side]:.2f}")
    print("(project target >= 3; noisy on a shared machine: the load averages are printed above)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "threads": torch.get_num_threads(), "matmul_flops": rates, "dtype": dtype,
                       "settings": {k: getattr(args, k) for k in ("prompts", "max_new_tokens", "steps", "warmup",
                                                                  "lr", "seed", "ours_rollout")},
                       "loadavg_before_after": loads, "results": results, "ratio_tokens_per_s": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
