"""Rollout throughput: generated tokens per second, transformers vs vLLM, on the embedded model.

Both engines live in one process and sample the same prompts with the same settings (temperature
1, stop at <|im_end|>), one after the other for each batch size, after one untimed warm-up call
each. Tokens counted are the tokens actually generated (stop tokens included), so a batch whose
samples stop early counts fewer tokens. Batch = number of sequences (prompts x samples per prompt).

    python bench/rollout_speed.py                                  # 4, 16, 32 sequences x 128 tokens
    python bench/rollout_speed.py --batch-sizes 8 64 --max-new-tokens 256 --dtype float32
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_lib  # noqa: E402
import rollout  # noqa: E402

QUESTIONS = [
    "What is 12 + 30?", "Tom has 5 apples and buys 7 more. How many apples does he have?",
    "What is 9 times 8?", "A train travels 60 km in one hour. How far does it go in 3 hours?",
    "Write the number 1000 in words.", "What is half of 86?",
    "Sara reads 12 pages a day. How many pages does she read in a week?", "What is 100 - 37?",
]


def timed_generate(engine, prompts, max_new_tokens, seed):
    t0 = time.perf_counter()
    samples = engine.generate(prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    dt = time.perf_counter() - t0
    tokens = sum(len(s.token_ids) for s in samples)
    return tokens, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: the faster matmul of this machine (model.pick_dtype)")
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--model", default=None, help="name or path; default: the embedded SmolLM2-135M-Instruct")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = model_lib.pick_dtype(args.dtype, device)
    path = model_lib.resolve(args.model)
    policy, tok = model_lib.load(path, dtype=getattr(torch, args.dtype), device=device)
    policy.eval()
    engines = {}
    for backend in args.backends:
        t0 = time.perf_counter()
        engines[backend] = rollout.make_rollout(backend, model=policy, model_path=path, tokenizer=tok,
                                                dtype=args.dtype, max_model_len=1024)
        print(f"{backend}: engine ready in {time.perf_counter() - t0:.1f} s", flush=True)

    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"] for q in QUESTIONS]
    for backend, engine in engines.items():  # warm-up: first-call allocations, kernel selection
        timed_generate(engine, chats[:2], 8, seed=0)

    rows = []
    for B in args.batch_sizes:
        prompts = [chats[i % len(chats)] for i in range(B)]
        row = {"B": B}
        for backend, engine in engines.items():
            tokens, dt = timed_generate(engine, prompts, args.max_new_tokens, seed=B)
            row[backend] = (tokens, dt)
            print(f"  B={B:3d} {backend:5s} {tokens:6d} tokens in {dt:7.2f} s = {tokens / dt:8.1f} tok/s", flush=True)
        rows.append(row)

    print(f"\ntokens/s, {args.dtype}, {device}, {torch.get_num_threads()} threads, "
          f"up to {args.max_new_tokens} new tokens per sequence, temperature 1")
    header = f"{'sequences':>9} | " + " | ".join(f"{b:>12}" for b in engines)
    if len(engines) == 2:
        header += " | vllm/hf"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['B']:>9} | " + " | ".join(f"{row[b][0] / row[b][1]:>12.1f}" for b in engines)
        if len(engines) == 2:
            line += f" | {(row['vllm'][0] / row['vllm'][1]) / (row['hf'][0] / row['hf'][1]):7.2f}"
        print(line)


if __name__ == "__main__":
    main()
