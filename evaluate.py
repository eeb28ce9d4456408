"""Evaluate math reasoning: Avg@k, unbiased Pass@k, maj@k, math-verify answer checking, reasoning health, plots.

Papers served: "Self-Distilled Reasoner: On-Policy Self-Distillation for LLMs" (arXiv 2601.18734),
"Tailoring Teaching to Aptitude: Direction-Adaptive Self-Distillation for LLM Reasoning"
(arXiv 2605.22263) and "Adaptive Teacher Exposure for Self-Distillation in LLM Reasoning"
(arXiv 2605.11458) all report Avg@k at temperature ~1.0 / top-p 0.95, plus Pass@k curves and
"reasoning health" analyses. Pass@k is the unbiased estimator of "Evaluating Large Language Models
Trained on Code" (Chen et al. 2021, arXiv 2107.03374).

For problem i we draw n samples, c_i of them correct (answer = last \\boxed{...}, checked by
math-verify). With P problems:

    Avg@k  = 100 * (1/P) sum_i c_i / n                           (mean accuracy over the k samples)
    Pass@k = 100 * (1/P) sum_i [ 1 - C(n - c_i, k) / C(n, k) ]    (unbiased, for every k <= n)
           where  C(n - c, k) / C(n, k) = prod_{j = n-c+1 .. n} (1 - k / j)   (no huge binomials)
    maj@k  = 100 * (1/P) sum_i 1[ the most frequent extracted answer of problem i is correct ]
    paired difference of two models A, B on the same problems (a_i = c_i^A / n, b_i = c_i^B / n):
           diff = 100 * (1/P) sum_i (b_i - a_i),  95% CI = the 2.5% and 97.5% quantiles of diff over
           problem sets resampled with replacement (percentile bootstrap, 10,000 resamples)
    macro  = mean over benchmarks of each of the above

Reasoning health, per model and benchmark (all from the k samples of every problem):

    length         mean / std / quantiles / histogram of response length (tokens)
    truncated      fraction of samples stopped by max_new_tokens
    no_box         fraction of samples with no \\boxed{} (or \\fbox{})
    no_answer      fraction with nothing extracted even after the fallback (docs/choices.md, choice 10)
    entropy        mean over response tokens of H_t = -sum_v p(v|x,y<t) log p(v|x,y<t) (nats),
                   p = the evaluated model, teacher-forced over [prompt | response]
    revisions/1k   1000 * (# self-revision markers such as "wait", "let me check") / (# tokens):
                   an exploration density in the spirit of DASD's E(y)
    rep4           n-gram repetition rate 1 - (# distinct 4-grams) / (# 4-grams), mean over responses

Choices (the papers are silent on these; each is ours, with its reasons in docs/choices.md):
  - Answer extraction, the fallback, checking and its time limit: grader.py, shared with training
    (docs/choices.md, choice 10; docs/choices.md, choice 51; docs/choices.md, choice 52).
  - maj@k groups answers by their normalized string; a tie scores the expected random tie-break
    (docs/choices.md, choice 53).
  - Token entropy at temperature 1 unless `--entropy_temperature` says otherwise (docs/choices.md, choice 54).
  - Revision markers counted at word boundaries, the density pooled over responses (docs/choices.md, choice 55).
  - Benchmarks by name through `datasets`, else a BenchmarkUnavailable error (docs/choices.md, choice 56).
  - The student prompt's thinking mode is the one the model was trained in, `--thinking auto`
    (docs/choices.md, choice 57).

Examples:
    python evaluate.py --demo                                                # toy values of every metric
    python evaluate.py --n_problems 20 --k 4 --max_new_tokens 256           # embedded model and test split
    python evaluate.py --model out/step_0 --model out/step_100 --data MATH-500 --data "AIME 2024" --k 16
    python evaluate.py --model runs/qwen3/final --data aime24 --thinking false   # force non-thinking prompts
    python evaluate.py --plot_train runs/opsd/metrics.jsonl runs/dasd/metrics.jsonl --out plots
"""

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from collections import Counter

import data
from grader import DEFAULT_TIMEOUT, check_answer, extract_answer, grade, normalize_answer  # noqa: F401 (grader.py)

# ---------------------------------------------------------------------------------------------
# metrics: Pass@k, Avg@k, maj@k
# ---------------------------------------------------------------------------------------------


def pass_at_k(n, c, k):
    """Unbiased P(at least one of k samples drawn without replacement from n is correct), c correct.

    1 - C(n-c, k)/C(n, k) = 1 - prod_{j=n-c+1..n} (1 - k/j): a product of numbers in [0, 1],
    no factorials, stable for any n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    q = 1.0
    for j in range(n - c + 1, n + 1):
        q *= 1.0 - k / j
    return 1.0 - q


def pass_at_k_curve(correct, ks=None):
    """{k: mean over problems of pass_at_k} for correct: list (problems) of lists (samples) of bool.

    Default ks: 1, 2, 4, ... up to the smallest n, plus that n itself.
    """
    n_min = min(len(c) for c in correct)
    if ks is None:
        ks = sorted({2**i for i in range(int(math.log2(n_min)) + 1)} | {n_min})
    return {k: sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct) for k in ks}


def avg_at_k(correct):
    """Mean over problems of the fraction of correct samples (in [0, 1]; reports multiply by 100)."""
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def paired_bootstrap(base, new, *, n_boot=10000, level=0.95, seed=0):
    """Paired difference of two models' accuracy on the same problems, with its bootstrap interval.

    base, new: (P,) per-problem accuracies c_i / k of two models on the same P problems, in the same order.
    diff = mean_i (new_i - base_i). The interval resamples the P problems with replacement n_boot times and
    takes the (1 - level)/2 and (1 + level)/2 quantiles of the resampled mean differences (percentile
    bootstrap; pairing removes the problem-difficulty variance both models share). Returns (diff, (lo, hi))."""
    import numpy as np

    d = np.asarray(new, dtype=np.float64) - np.asarray(base, dtype=np.float64)  # (P,)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))  # (n_boot, P)
    lo, hi = np.quantile(d[idx].mean(1), [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), (float(lo), float(hi))


def majority_vote(answers, correct):
    """Score in [0, 1] of the majority answer of one problem (docs/choices.md, choice 53); 0 if nothing was
    extracted."""
    votes, verdict = Counter(), {}
    for a, ok in zip(answers, correct):
        if a is None:
            continue
        key = normalize_answer(a)
        votes[key] += 1
        verdict.setdefault(key, bool(ok))
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [key for key, v in votes.items() if v == top]
    return sum(verdict[key] for key in tied) / len(tied)


def maj_at_k(answers, correct, k=None):
    """Mean over problems of majority_vote over the first k samples (all samples if k is None)."""
    return sum(majority_vote(a[:k], c[:k]) for a, c in zip(answers, correct)) / len(answers)


# ---------------------------------------------------------------------------------------------
# reasoning health
# ---------------------------------------------------------------------------------------------

REVISION_MARKERS = (
    "wait", "hmm", "actually", "alternatively", "let me check", "let me verify", "let me re-check",
    "let me recheck", "let me double-check", "double-check", "double check", "let me reconsider",
    "on second thought", "i made a mistake", "that's not right", "that is not right",
    "re-examine", "recheck", "re-check", "let me try again",
)
_MARKER_RE = re.compile(
    r"(?<![a-z])(?:" + "|".join(re.escape(m) for m in sorted(REVISION_MARKERS, key=len, reverse=True)) + r")(?![a-z])",
    re.IGNORECASE,
)


def length_stats(lengths, bins=10):
    """Mean, std, quantiles and a histogram (bin edges and counts) of response lengths."""
    import numpy as np

    x = np.asarray(lengths, dtype=np.float64)  # (N,)
    counts, edges = np.histogram(x, bins=bins)
    q = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max()),
        "p10": float(q[0]), "p25": float(q[1]), "p50": float(q[2]), "p75": float(q[3]), "p90": float(q[4]),
        "hist_edges": [float(e) for e in edges], "hist_counts": [int(c) for c in counts],
    }


def truncation_rate(truncated):
    """Fraction of samples stopped by the token limit."""
    return sum(bool(t) for t in truncated) / len(truncated)


def no_answer_rate(responses, *, fallback=True):
    """Fraction of responses with no extracted answer (fallback=False: the no-box rate)."""
    return sum(extract_answer(r, fallback=fallback) is None for r in responses) / len(responses)


def count_revisions(text):
    """Number of self-revision markers ("wait", "let me check", ...) in one response."""
    return len(_MARKER_RE.findall(text))


def revision_density(responses, n_tokens=None):
    """Revision markers per 1000 tokens, pooled over responses (docs/choices.md, choice 55).

    n_tokens: token count of each response; default: whitespace-separated words.
    """
    if n_tokens is None:
        n_tokens = [len(r.split()) for r in responses]
    total = sum(n_tokens)
    return 1000.0 * sum(count_revisions(r) for r in responses) / total if total else 0.0


def ngram_repetition(seq, n=4):
    """1 - distinct n-grams / all n-grams of one sequence (a string is split on whitespace)."""
    toks = seq.split() if isinstance(seq, str) else list(seq)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def ngram_repetition_rate(seqs, n=4):
    """Mean over sequences of ngram_repetition (token-id lists or strings)."""
    return sum(ngram_repetition(s, n) for s in seqs) / len(seqs)


def mean_token_entropy(model, prompt_ids, response_ids, *, batch_size=4, temperature=1.0):
    """Entropy (nats) of the model's next-token distribution at every response token.

    Teacher-forced pass over [prompt | response] per sequence (teacher.response_forward).
    Returns (pooled mean over all response tokens, list of per-response means).
    """
    import torch
    from tqdm import tqdm

    import entropy
    import teacher

    per_seq, total, count = [], 0.0, 0
    for b in tqdm(range(0, len(prompt_ids), batch_size), desc="  entropy pass", unit="batch", leave=False):
        p_ids, r_ids = prompt_ids[b:b + batch_size], response_ids[b:b + batch_size]
        keep = [i for i, r in enumerate(r_ids) if len(r) > 0]  # an empty response has no tokens to score
        ent_b = [float("nan")] * len(r_ids)
        if keep:
            with torch.no_grad():  # evaluation only: no graph
                logits, mask = teacher.response_forward(model, [p_ids[i] for i in keep], [r_ids[i] for i in keep])
                ent = entropy.token_entropy(logits, temperature=temperature).float()  # (B, T)
                mask = mask.to(ent.dtype)  # (B, T)
                sums, lens = (ent * mask).sum(-1), mask.sum(-1)  # (B,), (B,)
            for j, i in enumerate(keep):
                ent_b[i] = float(sums[j] / lens[j].clamp(min=1))
            total += float(sums.sum())
            count += int(lens.sum())
            del logits, mask, ent
        per_seq.extend(ent_b)
    return (total / count if count else float("nan")), per_seq


def health_metrics(responses, token_ids, truncated, *, fallback=True):
    """Every reasoning-health number that needs no model, for one model on one benchmark."""
    lengths = [len(t) for t in token_ids]
    return {
        "length": length_stats(lengths),
        "truncation_rate": truncation_rate(truncated),
        "no_box_rate": no_answer_rate(responses, fallback=False),
        "no_answer_rate": no_answer_rate(responses, fallback=fallback),
        "revisions_per_1k_tokens": revision_density(responses, lengths),
        "rep4": ngram_repetition_rate(token_ids, n=4),
    }


# ---------------------------------------------------------------------------------------------
# benchmarks: named hub datasets and local files
# ---------------------------------------------------------------------------------------------

# name -> (hub id, config, split, problem field, answer field, solution field or None)
BENCHMARKS = {
    "MATH-500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", "solution"),
    "AIME 2024": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", "solution"),
    "AIME 2025": ("MathArena/aime_2025", None, "train", "problem", "answer", None),
    "HMMT Feb 2025": ("MathArena/hmmt_feb_2025", None, "train", "problem", "answer", None),
    "AMC 2023": ("math-ai/amc23", None, "test", "question", "answer", None),
    "Minerva Math": ("math-ai/minervamath", None, "test", "question", "answer", None),
    "OlympiadBench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train", "question", "final_answer", "solution"),
}


class BenchmarkUnavailable(RuntimeError):
    """A named benchmark that cannot be fetched (offline, or no `datasets` package)."""


def _key(name):
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_key(n): n for n in BENCHMARKS}
_ALIASES.update({"math500": "MATH-500", "aime24": "AIME 2024", "aime25": "AIME 2025", "hmmt25": "HMMT Feb 2025",
                 "hmmtfeb25": "HMMT Feb 2025", "amc23": "AMC 2023", "minerva": "Minerva Math",
                 "olympiad": "OlympiadBench"})


def benchmark_name(name):
    """The canonical benchmark name for `name` ("aime24", "MATH500", ...) or None if it is not one."""
    return _ALIASES.get(_key(name))


def _first(value):
    """OlympiadBench stores answers and solutions as lists; take the first entry."""
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def load_benchmark(name):
    """Rows {"id","problem","solution","answer","level"} of a named benchmark, from the hub."""
    canon = benchmark_name(name)
    if canon is None:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    hub_id, config, split, f_problem, f_answer, f_solution = BENCHMARKS[canon]
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # noqa: BLE001 - ImportError, connection errors, offline-mode errors ...
        raise BenchmarkUnavailable(
            f"benchmark {canon!r} (hub dataset {hub_id}) could not be loaded: {type(e).__name__}: {e}. "
            f"This machine may be offline or lack the `datasets` package; save the benchmark as a "
            f"JSONL/Parquet file with fields problem/answer and pass that file to --data."
        ) from e
    rows = []
    for i, r in enumerate(ds):
        rows.append({
            "id": str(r.get("id", r.get("unique_id", r.get("problem_idx", i)))),
            "problem": str(r[f_problem]),
            "solution": _first(r.get(f_solution)) if f_solution else "",
            "answer": _first(r[f_answer]),
            "level": r.get("level", 0) if isinstance(r.get("level", 0), int) else 0,
        })
    return rows


def load_problems(name_or_path, split="test"):
    """A named benchmark (hub), 'embedded:test', or a local JSONL/JSON/Parquet file (data.py)."""
    if benchmark_name(name_or_path) is not None and not os.path.exists(name_or_path):
        return load_benchmark(name_or_path)
    return data.load_dataset(name_or_path, split=split)


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend: files only, no display)
# ---------------------------------------------------------------------------------------------


def plot_pass_at_k(results, path):
    """results[model][bench]["pass_at_k"] = {k: percent}; one panel per benchmark (+ macro), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    benches = [b for b in results[models[0]] if b != "macro"]
    panels = benches + (["macro"] if len(benches) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, bench in zip(axes[0], panels):
        for m in models:
            curve = results[m][bench]["pass_at_k"]
            ks = sorted(int(k) for k in curve)
            ax.plot(ks, [curve[str(k)] for k in ks], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])  # 1, 2, 4, ... rather than 2^0, 2^1, ...
        ax.minorticks_off()
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k (%)")
        ax.set_title(bench)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the keys train.py logs (docs/metrics.md) that a person compares runs by
TRAIN_KEYS = ("loss/total", "loss/pull", "loss/push", "entropy/student", "entropy/teacher", "kl/teacher_student",
              "dasd/frac_pushed", "exposure/alpha_used", "teacher/answer_logprob", "rollout/accuracy")


def read_metrics(path):
    """A metrics JSONL (one JSON object per line) as a list of dicts; blank / broken lines skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a run killed mid-write leaves a half line at the end
    return rows


def plot_train(paths, out_png, keys=None):
    """Training curves from train.py's metrics JSONL files: one panel per metric, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {p: read_metrics(p) for p in paths}
    present = {k for rows in runs.values() for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    if keys is None:
        keys = [k for k in TRAIN_KEYS if k in present] or sorted(present - {"step"})
    if not keys:
        raise ValueError(f"no numeric metrics in {paths}")
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
    labels = _labels(paths)
    for ax, key in zip(axes.flat, keys):
        for p, rows in runs.items():
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], label=labels[p])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return keys


def _labels(paths):
    """Short, distinct names for model paths / metric files: the last path part, more if needed."""
    for depth in range(1, 6):
        names = ["/".join(os.path.normpath(str(p)).split(os.sep)[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return dict(zip(paths, names))
    return {p: str(p) for p in paths}


# ---------------------------------------------------------------------------------------------
# the evaluation run
# ---------------------------------------------------------------------------------------------


TRAIN_CONFIG = "train_config.json"  # plumbing.TRAIN_CONFIG: train.py's flags, saved in every model folder it writes
THINKING = {"true": True, "false": False, "default": None}  # --thinking -> enable_thinking (None: the template's)


def recorded_thinking(model_dir):
    """(found, student_thinking) from model_dir/train_config.json; found is False without the file or the field."""
    if model_dir is None:  # the embedded model: never trained here
        return False, None
    path = os.path.join(os.path.expanduser(model_dir), TRAIN_CONFIG)
    if not os.path.isfile(path):  # a hub name, or a folder train.py did not write
        return False, None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(cfg, dict) or "student_thinking" not in cfg:
        return False, None
    value = cfg["student_thinking"]
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{path}, field 'student_thinking': expected true, false or null, got {value!r}")
    return True, value


def thinking_mode(flag, model_dir):
    """The student prompts' enable_thinking for --thinking `flag` (None: the template's default), where it comes
    from, and a warning line (or None) when an explicit flag contradicts the recorded student_thinking
    (docs/choices.md, choice 57)."""
    found, recorded = recorded_thinking(model_dir)
    if flag == "auto":
        return (recorded, TRAIN_CONFIG, None) if found else (None, "template default", None)
    if flag not in THINKING:
        raise ValueError(f"--thinking {flag}: expected auto, true, false or default")
    chosen, warning = THINKING[flag], None
    if found and chosen != recorded:
        warning = (f"warning: --thinking {flag} (enable_thinking={json.dumps(chosen)}) but "
                   f"{os.path.join(model_dir, TRAIN_CONFIG)} records student_thinking={json.dumps(recorded)}")
    return chosen, f"--thinking {flag}", warning


def student_prompts(tok, benches, enable_thinking=None):
    """{bench: P lists of prompt ids}: train.py's student prompts of every problem, in the given thinking mode."""
    import teacher

    return {bench: [teacher.student_prompt_ids(tok, r["problem"], enable_thinking=enable_thinking) for r in rows]
            for bench, rows in benches.items()}


def evaluate_model(path, label, benches, args, out_samples, enable_thinking=None):
    """Generate k samples per problem of every benchmark, grade them, return {bench: metrics}."""
    import torch

    import model as model_lib
    import rollout

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = model_lib.pick_dtype(args.dtype, device)
    dtype = getattr(torch, args.dtype)
    policy, tok = model_lib.load(path, dtype=dtype, device=device)
    policy.eval()
    model_path = model_lib.resolve(path)
    prompts_of = student_prompts(tok, benches, enable_thinking)
    longest = max(len(p) for ps in prompts_of.values() for p in ps)
    # vLLM sizes its KV cache for max_model_len tokens per sequence: the longest prompt + the response. On a CPU the
    # cache is sized to hold every sequence of one generate call at once (at most 4 GiB, at least vLLM's 1 GiB
    # default here): one wave of decoding instead of several, 1.19x the tokens/s for 400 fp32 sequences of the
    # embedded model (181 -> 216 tok/s), the same samples
    c = policy.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * getattr(c, "num_key_value_heads", c.num_attention_heads) * head_dim
    kv_gb = per_token * dtype.itemsize * args.batch_problems * args.k * (longest + args.max_new_tokens) / 2**30
    engine = rollout.make_rollout(args.rollout, model=policy, model_path=model_path, tokenizer=tok, seed=args.seed,
                                  dtype=args.dtype, max_model_len=longest + args.max_new_tokens,
                                  gpu_memory_utilization=args.gpu_memory_utilization,
                                  kv_cache_gb=min(4.0, max(1.0, kv_gb)),
                                  log_file=None if args.verbose else os.path.join(args.out, "engine.log"))
    results = {}
    for bench, rows in benches.items():
        prompts = prompts_of[bench]
        t0, samples = time.time(), []
        for b in range(0, len(prompts), args.batch_problems):
            samples += engine.generate(prompts[b:b + args.batch_problems], n=args.k, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_p=args.top_p, seed=args.seed + b)
            done, n_tok = min(b + args.batch_problems, len(prompts)), sum(len(s.token_ids) for s in samples)
            print(f"  {bench}: {done}/{len(prompts)} problems, {n_tok / (time.time() - t0):.0f} tok/s", flush=True)
        gen_s = time.time() - t0
        assert len(samples) == len(rows) * args.k, "engine.generate must return n samples per prompt, prompt-major"
        texts = [tok.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        answers, correct = [], []
        for i, text in enumerate(texts):
            a, ok = grade(text, rows[i // args.k]["answer"], fallback=not args.no_fallback, timeout=args.answer_timeout)
            answers.append(a)
            correct.append(ok)
        P, k = len(rows), args.k
        ans_pk = [answers[i * k:(i + 1) * k] for i in range(P)]  # P lists of k
        cor_pk = [correct[i * k:(i + 1) * k] for i in range(P)]
        health = health_metrics(texts, [s.token_ids for s in samples], [s.truncated for s in samples],
                                fallback=not args.no_fallback)
        ent_seq = [float("nan")] * len(samples)
        if not args.no_entropy:
            health["entropy"], ent_seq = mean_token_entropy(
                policy, [prompts[i // k] for i in range(len(samples))], [list(s.token_ids) for s in samples],
                batch_size=args.entropy_batch, temperature=args.entropy_temperature)
        n_tok = sum(len(s.token_ids) for s in samples)
        results[bench] = {
            "n_problems": P, "k": k,
            "avg_at_k": 100 * avg_at_k(cor_pk),
            "accuracy_per_problem": [sum(c) / k for c in cor_pk],  # (P,) c_i / k, for paired comparisons
            "pass_at_k": {str(kk): 100 * v for kk, v in pass_at_k_curve(cor_pk).items()},
            "maj_at_k": 100 * maj_at_k(ans_pk, cor_pk),
            "health": health,
            "generation": {"seconds": gen_s, "tokens": n_tok, "tokens_per_s": n_tok / max(gen_s, 1e-9)},
        }
        for i, s in enumerate(samples):
            out_samples.write(json.dumps({
                "model": label, "benchmark": bench, "problem_id": rows[i // k]["id"], "sample": i % k,
                "response": texts[i], "answer": answers[i], "gold": rows[i // k]["answer"], "correct": correct[i],
                "length": len(s.token_ids), "truncated": bool(s.truncated), "finish_reason": s.finish_reason,
                "entropy": ent_seq[i], "revisions": count_revisions(texts[i]),
            }) + "\n")
        out_samples.flush()
    del engine, policy  # free the engine (vLLM holds GPU memory) before the next model is loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def macro(per_bench):
    """Mean over benchmarks of Avg@k, maj@k and every Pass@k' they all have."""
    bs = list(per_bench.values())
    common = set.intersection(*(set(b["pass_at_k"]) for b in bs))
    return {
        "avg_at_k": sum(b["avg_at_k"] for b in bs) / len(bs),
        "maj_at_k": sum(b["maj_at_k"] for b in bs) / len(bs),
        "pass_at_k": {k: sum(b["pass_at_k"][k] for b in bs) / len(bs) for k in sorted(common, key=int)},
    }


def paired_differences(results):
    """Every model after the first against the first, per benchmark: Avg@k difference and its 95% bootstrap
    interval over problems, in percentage points (paired_bootstrap)."""
    labels = list(results)
    out = {}
    for label in labels[1:]:
        for bench, r in results[label].items():
            base = results[labels[0]].get(bench, {}).get("accuracy_per_problem")
            if base is None or "accuracy_per_problem" not in r:
                continue  # the macro row has no problems of its own
            diff, (lo, hi) = paired_bootstrap(base, r["accuracy_per_problem"])
            out[f"{label} - {labels[0]} | {bench}"] = {"diff": 100 * diff, "ci95": [100 * lo, 100 * hi],
                                                       "n_problems": len(base)}
    return out


def format_paired(paired, k):
    return [f"avg@{k} {name}: {p['diff']:+.2f} points, 95% CI [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] "
            f"over {p['n_problems']} problems" + ("" if p["ci95"][0] > 0 or p["ci95"][1] < 0 else " (includes 0)")
            for name, p in paired.items()]


def format_table(results, k):
    """A plain-text table, one row per (model, benchmark)."""
    head = (f"{'model':<28} {'benchmark':<16} {'avg@' + str(k):>7} {'pass@1':>7} {'pass@' + str(k):>8} "
            f"{'maj@' + str(k):>7} {'no_box':>6} {'no_ans':>6} {'trunc':>6} {'len':>7} {'ent':>6} {'rev/1k':>6} {'rep4':>5}")
    lines = [head, "-" * len(head)]
    for m, per in results.items():
        for bench, r in per.items():
            pk = r["pass_at_k"]
            kmax = max(pk, key=int)
            h = r.get("health")
            if h is None:  # the macro row
                tail = ""
            else:
                tail = (f" {100 * h['no_box_rate']:6.1f} {100 * h['no_answer_rate']:6.1f} {100 * h['truncation_rate']:6.1f}"
                        f" {h['length']['mean']:7.1f} {h.get('entropy', float('nan')):6.3f}"
                        f" {h['revisions_per_1k_tokens']:6.2f} {h['rep4']:5.3f}")
            lines.append(f"{m[-28:]:<28} {bench[:16]:<16} {r['avg_at_k']:7.2f} {pk.get('1', float('nan')):7.2f}"
                         f" {pk[kmax]:8.2f} {r['maj_at_k']:7.2f}" + tail)
    lines.append("percent; no_box/no_ans/trunc: % of samples; len: tokens; ent: nats/token; rev/1k: revision markers per 1k tokens")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None,
                   help="model name or folder; repeat to compare several (default: the embedded model)")
    p.add_argument("--data", action="append", default=None,
                   help=f"benchmark name ({', '.join(BENCHMARKS)}), 'embedded:test', or a JSONL/JSON/Parquet file; "
                        "repeat for several (default: embedded:test)")
    p.add_argument("--split", default="test", help="split for .json files and hub names handled by data.py")
    p.add_argument("--k", type=int, default=16, help="samples per problem")
    p.add_argument("--n_problems", type=int, default=None, help="first N problems of each benchmark (default: all)")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="token limit per response")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--rollout", choices=["hf", "vllm"], default=None,
                   help="generation backend (default: vllm wherever it is installed, on GPU or CPU; else hf)")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.5,
                   help="vLLM's share of GPU memory (the transformers copy for the entropy pass needs the rest)")
    p.add_argument("--thinking", choices=["auto", "true", "false", "default"], default="auto",
                   help="chat-template thinking mode of the prompts: auto = the student_thinking in the model "
                        f"folder's {TRAIN_CONFIG} (else the template's default); default = the template's "
                        "(docs/choices.md, choice 57)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch_problems", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", default="auto",
                   help="bfloat16 | float32 | auto (bfloat16 on GPU; on CPU the faster matmul, measured at start)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--no_fallback", action="store_true", help="only \\boxed{} answers count (no 'the answer is X' fallback)")
    p.add_argument("--answer_timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds allowed to check one answer")
    p.add_argument("--no_entropy", action="store_true", help="skip the teacher-forced entropy pass")
    p.add_argument("--entropy_batch", type=int, default=4, help="sequences per entropy forward pass")
    p.add_argument("--entropy_temperature", type=float, default=1.0,
                   help="temperature of the entropy (docs/choices.md, choice 54)")
    p.add_argument("--plot_train", nargs="+", default=None, metavar="METRICS.jsonl",
                   help="draw train_curves.png from train.py metrics files; evaluates nothing unless --model is given")
    p.add_argument("--demo", action="store_true", help="print toy values of the metrics and the checker, then exit")
    p.add_argument("--out", default="runs/eval", help="output folder: report.json, samples.jsonl, pass_at_k.png")
    p.add_argument("--verbose", action="store_true",
                   help="print vLLM's log lines here instead of appending them to <out>/engine.log "
                        "(OPSD_VERBOSE=1 does the same, for train.py too)")
    return p


def check_args(args):
    """Every bad flag or path, before anything is loaded or written: SystemExit with one line per problem,
    `evaluate.py: --flag value: what is allowed`. A --model that is no local folder is looked up last (tokenizer and
    config only, from the hub or its cache), so that a wrong name fails before any model is evaluated."""
    inf, errors = float("inf"), []

    def bad(flag, value, allowed):
        errors.append(f"evaluate.py: --{flag} {value}: {allowed}")

    for flag, low in (("k", 1), ("max_new_tokens", 1), ("batch_problems", 1), ("entropy_batch", 1)):
        if getattr(args, flag) < low:
            bad(flag, getattr(args, flag), f"must be >= {low}")
    if args.n_problems is not None and args.n_problems < 1:
        bad("n_problems", args.n_problems, "must be >= 1 (leave it out for every problem)")
    if not 0.0 <= args.temperature < inf:  # written so that nan fails too
        bad("temperature", args.temperature, "must be a finite number >= 0")
    if not 0.0 < args.top_p <= 1.0:
        bad("top_p", args.top_p, "must be in (0, 1] (1: off)")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        bad("gpu_memory_utilization", args.gpu_memory_utilization, "must be in (0, 1]")
    if not 0.0 < args.answer_timeout < inf:
        bad("answer_timeout", args.answer_timeout, "must be a finite number of seconds > 0")
    if not 0.0 < args.entropy_temperature < inf:
        bad("entropy_temperature", args.entropy_temperature, "must be a finite number > 0")
    if args.dtype not in ("auto", "bfloat16", "float16", "float32"):
        bad("dtype", args.dtype, "choose auto, bfloat16, float16 or float32")
    for name in args.data or []:
        if name == "embedded" or name.startswith("embedded:") or (benchmark_name(name) and not os.path.exists(name)):
            continue
        ext = os.path.splitext(name)[1].lower()
        if os.path.isdir(name):
            bad("data", name, "a folder; give a benchmark name, embedded:test, or a .jsonl, .json or .parquet file")
        elif os.path.exists(name) and ext not in (".jsonl", ".json", ".parquet"):
            bad("data", name, f"unknown file type {ext!r}; use .jsonl, .json or .parquet")
        elif not os.path.exists(name) and (ext in (".jsonl", ".json", ".parquet") or name.startswith((".", "/"))):
            bad("data", name, f"no such file; give an existing .jsonl, .json or .parquet file, embedded:test, or a "
                              f"benchmark name ({', '.join(BENCHMARKS)})")
    for path in args.plot_train or []:
        if not os.path.isfile(path):
            bad("plot_train", path, "no such file; give train.py's metrics.jsonl files")
    hub_names = []
    for name in args.model or []:
        path = os.path.expanduser(name)
        if name == "embedded" or os.path.isdir(path):
            continue
        if os.path.exists(path):
            bad("model", name, "a file; give a model folder or a hub name")
        elif name.startswith((".", "/", "~")) or name.strip("/").count("/") > 1:  # model.py's rule for local paths
            bad("model", name, "no such folder; give a model folder (train.py writes OUT_DIR/final) or a hub name")
        else:
            hub_names.append(name)
    if not errors and hub_names:
        import model as model_lib

        for name in hub_names:
            try:
                model_lib.load_tokenizer_and_config(name)
            except FileNotFoundError:
                bad("model", name, "no such folder, and no model of that name on the hub (offline: in its cache)")
    if errors:
        raise SystemExit("\n".join(errors))


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.demo:
        demo()
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.plot_train:
        png = os.path.join(args.out, "train_curves.png")
        keys = plot_train(args.plot_train, png)
        print(f"wrote {png} ({', '.join(keys)})")
        if args.model is None and args.data is None:
            return 0
    # ---- problems first: a benchmark that cannot be fetched fails before any model is loaded ----
    benches = {}
    for name in args.data or ["embedded:test"]:
        try:
            rows = load_problems(name, split=args.split)
        except (BenchmarkUnavailable, ValueError, OSError) as e:  # data.DataError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            return 2
        benches[benchmark_name(name) or name] = rows[:args.n_problems] if args.n_problems else rows

    # ---- every model on every benchmark ----
    model_paths = args.model or [None]
    labels = _labels([p if p is not None else "embedded" for p in model_paths])
    thinking = {}  # label -> the thinking mode of its prompts, decided for every model before any is loaded
    for path in model_paths:
        try:
            enable, source, warning = thinking_mode(args.thinking, path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if warning:
            print(warning, file=sys.stderr)
        thinking[labels[path if path is not None else "embedded"]] = {"enable_thinking": enable, "source": source}
    if args.rollout is None:
        import rollout

        args.rollout = rollout.default_backend()
    results = {}
    with open(os.path.join(args.out, "samples.jsonl"), "w") as out_samples:
        for path in model_paths:
            label = labels[path if path is not None else "embedded"]
            mode = thinking[label]
            print(f"evaluating {label} on {', '.join(f'{b} ({len(r)})' for b, r in benches.items())}, k={args.k}, "
                  f"enable_thinking={json.dumps(mode['enable_thinking'])} ({mode['source']})")
            per = evaluate_model(path, label, benches, args, out_samples, enable_thinking=mode["enable_thinking"])
            if len(per) > 1:
                per["macro"] = macro(per)
            results[label] = per

    report = {"config": vars(args), "models": dict(zip(labels.values(), [str(p) for p in model_paths])),
              "thinking": thinking, "benchmarks": list(benches), "results": results,
              "paired": paired_differences(results)}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_pass_at_k(results, os.path.join(args.out, "pass_at_k.png"))
    print(format_table(results, args.k))
    for line in format_paired(report["paired"], args.k):
        print(line)
    print(f"wrote {args.out}/report.json, samples.jsonl, pass_at_k.png")
    return 0


def demo():
    """Toy values a reader wants to see: Pass@k, extraction, checking, health numbers."""
    print("pass@k for n=8, c=2:", {k: round(pass_at_k(8, 2, k), 4) for k in (1, 2, 4, 8)})
    for text in ["so x = \\boxed{\\frac{1}{2}}.", "first \\boxed{3}, then \\fbox{4}", "the answer is 12 apples", "2 + 3 = 5"]:
        print(f"{text!r:40} -> {extract_answer(text)!r}")
    for pred, gold in [("0.5", "\\frac{1}{2}"), ("\\sqrt{8}", "2\\sqrt{2}"), ("3", "4")]:
        response = "so the answer is \\boxed{" + pred + "}"
        print(f"check {response!r} against {gold!r}: {check_answer(response, gold)}")
    texts = ["Wait, let me check: 2 + 2 = 4. So \\boxed{4}", "4 4 4 4 4 4 4 4"]
    print("revisions/1k words:", round(revision_density(texts), 2), " rep4:", round(ngram_repetition_rate(texts), 3))


if __name__ == "__main__":
    sys.exit(main())
