"""`make gpu-check`: the README recipe's shape on one GPU, measured against bench/gpu_memory.py's prediction.

    python bench/gpu_check.py                         # Qwen3-1.7B shape, 3 steps, 4 sequences x 2048 tokens (< 8 min)
    python bench/gpu_check.py --max_new_tokens 512    # shorter rollouts
    python bench/gpu_check.py --smoke                 # 2 narrow blocks, 16 tokens: the plumbing, on a CPU too

What it runs: train.py itself (a subprocess), with one GPU's share of the README's DASD + ATESD command (32 prompts
over 8 ranks: 4 prompts per rank, 2048 new tokens, bf16, chunked loss, its other flags as written there), HF
rollouts (vLLM is not assumed installed), 3 steps. The model is a random-weight Qwen3 built from the repo's
bench/configs/qwen3-1.7b.json (nothing is downloaded); the tokenizer is a word-level one built here with the full
151,936-entry vocabulary and Qwen3's special tokens at their ids, so the shapes are the real ones. A random model
never samples its end-of-turn token, so every response runs to the cap: the largest batch the recipe allows.

What it prints, per step and at the end:
  - the peak of torch.cuda.max_memory_allocated over the training phase and over the rollout phase (train.py logs
    both as memory/*_peak_gib), next to bench/gpu_memory.py's prediction of the same configuration (one process,
    no vLLM share, runtime and slack terms left out: what torch's allocator itself counts);
  - the step time, split into rollout and training;
  - the training phase's share of the GPU's dense bf16 peak: model FLOPs / (time of the training phase x peak),
    model FLOPs = 6 N (student forward and backward) + 2 N (teacher forward) per token, N = the parameters a token
    passes through (the blocks' linear layers and the lm_head), plus attention's 4 L S d per token and pass pair
    (causal: half of S^2), counted without the recomputation of gradient checkpointing (the usual MFU convention).
Results go to results/bench/gpu_check.json as well.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# dense bf16 peak of the card, FLOP/s (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "B200": 2250e12}
# Qwen3's special tokens and their ids (tokenizer_config.json of the Qwen3 models)
QWEN3_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
                 "</think>": 151668}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
          "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def readme_recipe():
    """The first `torchrun ... train.py` command of README.md (the DASD + ATESD one): (nproc, its train.py flags)."""
    import gpu_memory

    cmds = gpu_memory.readme_commands()
    if not cmds:
        raise SystemExit("gpu_check: no torchrun command found in README.md")
    _, nproc, flags = cmds[0]
    return nproc, flags


def qwen3_template():
    """Qwen3's own chat template from trl's copy when trl is installed, else a ChatML template with the same
    generation prompts (thinking off: an empty think block)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "chat_templates", "qwen3.jinja")
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
    return CHATML


def build_tokenizer(vocab_size, out):
    """A word-level tokenizer over vocab_size entries, Qwen3's special tokens at their ids, saved into out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {t: i for t, i in QWEN3_SPECIAL.items() if i < vocab_size}
    taken = set(special.values())
    vocab = {"[UNK]": 0, **special}
    words = iter(f"w{i}" for i in range(vocab_size))
    for i in range(1, vocab_size):
        if i not in taken:
            vocab[next(words)] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=list(special))
    fast.chat_template = qwen3_template()
    fast.save_pretrained(out)


SMOKE_WIDTHS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def build_model(config_path, out, layers=None, widths=None):
    """A random-weight Qwen3 from a config.json (optionally fewer blocks, other widths), saved in bf16 with the
    tokenizer. The vocabulary is always the config's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(config_path) as f:
        raw = json.load(f)
    if layers:
        raw["num_hidden_layers"] = layers
        raw.pop("layer_types", None)
    raw.update(widths or {})
    cfg = AutoConfig.for_model(**raw)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer(cfg.vocab_size, out)
    del model
    return cfg


def model_flops_per_token(cfg, seq):
    """Forward FLOPs of one token at sequence length seq: 2 x (linear parameters of the blocks + lm_head), plus
    attention's scores and weighted sum over the causal half of the sequence."""
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    d = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    linear = L * (H * q + 2 * H * kv + q * H + 3 * H * cfg.intermediate_size) + V * H
    return 2 * linear + 2 * 2 * L * q * seq / 2


# What the time estimate assumes on one H100 (the check's phases; the whole `make gpu-check` adds tests/test_gpu.py,
# about 3 minutes): HF generate is bound by Python and kernel launches, not FLOPs, at about DECODE_S per new token of
# a 28-block model (batch 4, bf16 autocast over fp32 weights); the training phase runs at TRAIN_MFU of the bf16 peak
# (with gradient checkpointing's recomputation on top); writing and reading the model go at DISK_GBS; starting
# Python, torch and transformers takes START_S per process.
DECODE_S, TRAIN_MFU, DISK_GBS, START_S, H100_BF16 = 0.03, 0.25, 1.0, 15.0, 989e12
ESTIMATE_BASIS = (f"HF generate {1000 * DECODE_S:.0f} ms per token for 28 blocks, training at {100 * TRAIN_MFU:.0f}% "
                  f"of the bf16 peak, disk {DISK_GBS:g} GB/s")


def estimate(cfg, B, T, steps, ps, pt):
    """Seconds per phase of this check on an H100, from the constants above (the model's shape scales them)."""
    params = model_flops_per_token(cfg, 0) / 2  # the linear parameters a token passes through
    write = params * 2 / (DISK_GBS * 1e9)  # bf16 files
    per_token = model_flops_per_token(cfg, T + ps)
    train = B * T * (4 * per_token + model_flops_per_token(cfg, T + pt)) / (TRAIN_MFU * H100_BF16)  # + recompute
    rollout = T * DECODE_S * cfg.num_hidden_layers / 28
    return {"build the model": START_S + write, "start train.py": START_S + 2 * write,
            f"rollouts ({steps} steps)": steps * rollout, f"training ({steps} steps)": steps * train,
            "total": 2 * START_S + 3 * write + steps * (rollout + train)}


def prompt_lengths(model_dir, train_flags):
    """The longest student prompt and the longest teacher prompt (full exposure, answer shown) among the problems the
    run's steps draw (train.step_rows): the padded lengths of its largest micro-batch."""
    from transformers import AutoTokenizer

    import data
    import teacher
    import train

    cfg = train.parse_config(train_flags)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = data.load_dataset(cfg.data, split="train")
    used = [r for step in range(cfg.steps) for r in train.step_rows(rows, cfg, step, 0, 1)]
    ps = max(len(teacher.student_prompt_ids(tok, r["problem"], enable_thinking=cfg.student_thinking)) for r in used)
    pt = max(len(teacher.teacher_prompt_ids(tok, r["problem"], r["solution"], r["answer"], alpha=1.0,
                                            enable_thinking=cfg.teacher_thinking)) for r in used)
    return ps, pt


def peak_flops(arg):
    import torch

    if arg:
        return arg * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "bench", "configs", "qwen3-1.7b.json"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default: the README command's")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks than the config's (default: all)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    ap.add_argument("--smoke", action="store_true", help="2 narrow blocks (hidden 256), the full vocabulary, 16 new "
                                                          "tokens, 2 steps: the plumbing only, in a minute on a CPU")
    ap.add_argument("--out", default=None, help="default: results/bench/gpu_check.json (--smoke: runs/gpu_check_smoke.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.max_new_tokens, args.steps = args.layers or 2, args.max_new_tokens or 16, 2
    args.out = args.out or os.path.join(ROOT, *(("runs", "gpu_check_smoke.json") if args.smoke else
                                                ("results", "bench", "gpu_check.json")))

    import torch

    import gpu_memory

    nproc, flags = readme_recipe()
    # one GPU's share of the command: its prompts per rank, HF rollouts, no vLLM, this many steps
    kv = dict(zip(flags[::2], flags[1::2])) if all(f.startswith("--") for f in flags[::2]) else None
    if kv is None:
        raise SystemExit(f"gpu_check: cannot read the README command's flags as pairs: {flags}")
    kv["--prompts_per_step"] = str(int(kv.get("--prompts_per_step", "8")) // nproc)
    # --save_every -1: no checkpoint and no final/ (a full one is ~31 GB at the Qwen3-1.7B shape, minutes of disk)
    kv.update({"--rollout": "hf", "--steps": str(args.steps), "--save_every": "-1", "--data": "embedded"})
    kv.pop("--vllm_gpu_memory_utilization", None)
    kv.pop("--out_dir", None)
    if args.max_new_tokens:
        kv["--max_new_tokens"] = str(args.max_new_tokens)
    if not torch.cuda.is_available():
        kv["--dtype"] = "float32"  # the smoke run on a CPU: never bf16 there
    # the random model and the run's logs are removed on every exit, a failure or Ctrl-C included
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        model_dir = os.path.join(work, "model")
        t0 = t_all = time.time()
        mcfg = build_model(args.config, model_dir, args.layers, SMOKE_WIDTHS if args.smoke else None)
        t_build = time.time() - t0
        print(f"built a random {os.path.basename(args.config)} ({mcfg.num_hidden_layers} blocks) in {time.time() - t0:.0f} s",
              flush=True)
        kv["--model"] = model_dir
        train_flags = [x for k, v in kv.items() for x in (k, v)]

        ps, pt = prompt_lengths(model_dir, train_flags)
        pred_flags = [*train_flags, "--model_config", os.path.join(model_dir, "config.json"), "--nproc", "1",
                      "--prompt_tokens", str(ps), "--teacher_prompt_tokens", str(pt)]
        setup, _ = gpu_memory.make_setup(pred_flags, device="cuda" if torch.cuda.is_available() else "cpu")
        pred = gpu_memory.predict(setup)
        print(gpu_memory.report(pred, f"prediction for this run (1 process, prompts {ps} / teacher {pt} tokens)")[0])
        est = estimate(mcfg, int(kv["--prompts_per_step"]), int(kv["--max_new_tokens"]), args.steps, ps, pt)
        print("estimate on an H100 (" + ESTIMATE_BASIS + "), seconds: "
              + ", ".join(f"{k} {v:.0f}" for k, v in est.items()), flush=True)

        out_dir = os.path.join(work, "run")
        cmd = [sys.executable, "train.py", *train_flags, "--out_dir", out_dir]
        print("$ " + shlex.join(cmd), flush=True)
        t0 = time.time()
        p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        wall = time.time() - t0
        if p.returncode:
            raise SystemExit(f"gpu_check: train.py failed (exit {p.returncode})")
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]

        peak = peak_flops(args.peak_tflops)
        B = int(kv["--prompts_per_step"])
        rows = []
        for r in recs:
            T = r["rollout/response_len"]
            seq = T + ps
            flops = B * T * (3 * model_flops_per_token(mcfg, seq) + model_flops_per_token(mcfg, T + pt))
            rows.append({"step": r["step"], "time_step_s": r["time/step"], "time_rollout_s": r["time/rollout"],
                         "time_train_s": r["time/train"], "train_peak_gib": r.get("memory/train_peak_gib"),
                         "rollout_peak_gib": r.get("memory/rollout_peak_gib"), "response_len": T,
                         "train_tflops": flops / r["time/train"] / 1e12,
                         "mfu_train": flops / r["time/train"] / peak if peak else None})
        st = pred["static"]
        # what torch's allocator counts: everything but the CUDA/NCCL allowance, vLLM's share and the allocator's slack
        predicted = (pred["total"] - st.get("runtime (CUDA, NCCL)", 0) - st.get("vLLM engine", 0) - pred["slack"]) / 2**30
        measured = max((x["train_peak_gib"] or 0) for x in rows) if torch.cuda.is_available() else None
        summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                   "model": os.path.basename(args.config), "layers": mcfg.num_hidden_layers, "train_flags": train_flags,
                   "predicted_gib": predicted, "measured_train_peak_gib": measured,
                   "ratio": measured / predicted if measured else None, "steps": rows, "wall_s": wall,
                   "prompt_tokens": ps, "teacher_prompt_tokens": pt,
                   "prediction_gib": {k: v / 2**30 for k, v in {**st, "step peak": pred["dynamic"]}.items()},
                   "peak_moment": pred["peak_moment"]}
        print("\nstep  time(s) rollout  train  train peak GiB  rollout peak GiB  train TFLOP/s  MFU")
        for x in rows:
            tp = "-" if x["train_peak_gib"] is None else f"{x['train_peak_gib']:.2f}"
            rp = "-" if x["rollout_peak_gib"] is None else f"{x['rollout_peak_gib']:.2f}"
            mfu = "-" if x["mfu_train"] is None else f"{100 * x['mfu_train']:.1f}%"
            print(f"{x['step']:>4}  {x['time_step_s']:7.1f} {x['time_rollout_s']:7.1f} {x['time_train_s']:6.1f}  "
                  f"{tp:>14}  {rp:>16}  {x['train_tflops']:13.1f}  {mfu}")
        took = {"build the model": t_build, "start train.py": wall - sum(x["time_step_s"] for x in rows),
                f"rollouts ({args.steps} steps)": sum(x["time_rollout_s"] for x in rows),
                f"training ({args.steps} steps)": sum(x["time_train_s"] for x in rows), "total": time.time() - t_all}
        print("\nphase               estimate (H100)  measured  (seconds)")
        for k, v in est.items():
            print(f"{k:20s} {v:15.0f} {took[k]:9.0f}")
        summary["phases_s"] = {"estimate_h100": est, "measured": took}
        print(f"\npredicted peak (torch allocator, 1 GPU, no vLLM): {predicted:.2f} GiB; measured: "
              + (f"{measured:.2f} GiB (ratio {measured / predicted:.3f})" if measured else "- (no GPU)"))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
