"""Two no-training analyses behind the papers' motivations, on the base model's own rollouts.

1. ATESD's exposure sweep: the teacher-student mismatch as a function of how much of the reference the
   teacher sees. For alpha in {0, 0.25, 0.5, 0.75, 1}, over the same student rollouts:
       mean KL(p_T || p_S) per token, and top-1 disagreement  argmax p_T != argmax p_S.
   The ATESD paper reports that mismatch grows monotonically with exposure.
2. DASD's token analysis (full exposure): tokens bucketed by the quantile of the student's entropy H_t
   within their response; per bucket the mean KL(p_T || p_S) and the share of tokens whose teacher
   log-evidence gap d_t = log p_T(y_t) - log p_S(y_t) is positive (the teacher likes the sampled
   token more than the student does).

Run:
    python experiments/analysis.py                       # 16 embedded test problems, 96 tokens, JSON + PNG
    python experiments/analysis.py --n 32 --max_new_tokens 128 --model runs/demo/train/final
Output: results/analysis/<name>.json and .png (never overwritten: a numbered suffix is added).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import entropy  # noqa: E402
import model as modellib  # noqa: E402
import rollout  # noqa: E402
import teacher as teacherlib  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def scores(net, prompts, responses, temperature):
    logits, mask = teacherlib.response_forward(net, prompts, responses)  # (B,T,V), (B,T)
    return torch.log_softmax(logits.float() / temperature, -1), mask  # (B,T,V)


def unique_path(folder, name, ext):
    os.makedirs(folder, exist_ok=True)
    path, i = os.path.join(folder, f"{name}.{ext}"), 1
    while os.path.exists(path):
        path, i = os.path.join(folder, f"{name}-{i}.{ext}"), i + 1
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="name or folder (default: the embedded model)")
    ap.add_argument("--n", type=int, default=16, help="embedded test problems")
    ap.add_argument("--max_new_tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--buckets", type=int, default=5, help="entropy quantile buckets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/analysis")
    args = ap.parse_args()

    net, tok = modellib.load(args.model, dtype=torch.float32)
    net.eval()
    rows = data.embedded_split("test")[: args.n]
    s_prompts = [teacherlib.student_prompt_ids(tok, r["problem"]) for r in rows]
    engine = rollout.make_rollout("hf", model=net, tokenizer=tok, seed=args.seed)
    bf16 = modellib.pick_dtype("auto") == "bfloat16"  # bf16 matmuls only where this CPU runs them faster
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        samples = engine.generate(s_prompts, n=1, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, seed=args.seed)
    responses = [s.token_ids for s in samples]
    logp_s, mask = scores(net, s_prompts, responses, args.temperature)  # (B,T,V), (B,T)
    m = mask.float()
    n_tok = m.sum().item()

    # ---- 1. exposure sweep
    sweep = {}
    for alpha in ALPHAS:
        t_prompts = [teacherlib.teacher_prompt_ids(tok, r["problem"], r["solution"], r["answer"], alpha=alpha)
                     for r in rows]
        logp_t, _ = scores(net, t_prompts, responses, args.temperature)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (B,T) KL(p_T || p_S)
        dis = (logp_t.argmax(-1) != logp_s.argmax(-1)).float()  # (B,T)
        sweep[alpha] = {"kl": (kl * m).sum().item() / n_tok, "top1_disagree": (dis * m).sum().item() / n_tok}
        if alpha == 1.0:
            kl_full, logp_t_full = kl, logp_t
        print(f"alpha {alpha:4.2f}: mean KL(p_T||p_S) {sweep[alpha]['kl']:.4f}  "
              f"top-1 disagreement {sweep[alpha]['top1_disagree']:.3f}")

    # ---- 2. DASD token analysis at full exposure
    ent = entropy.token_entropy(logp_s)  # (B,T) log-probs are valid logits
    y = torch.tensor([r + [0] * (mask.shape[1] - len(r)) for r in responses])  # (B,T)
    gap = (logp_t_full.gather(-1, y[..., None]) - logp_s.gather(-1, y[..., None])).squeeze(-1)  # (B,T) d_t
    buckets = [{"kl": 0.0, "gap_pos": 0.0, "entropy": 0.0, "n": 0} for _ in range(args.buckets)]
    for b in range(len(responses)):
        valid = mask[b].nonzero().squeeze(-1)
        if len(valid) == 0:
            continue
        order = ent[b, valid].argsort()  # rank within the response: quantile of H_t
        for rank, j in enumerate(order.tolist()):
            t = valid[j].item()
            q = min(args.buckets - 1, rank * args.buckets // len(valid))
            buckets[q]["kl"] += kl_full[b, t].item()
            buckets[q]["gap_pos"] += float(gap[b, t].item() > 0)
            buckets[q]["entropy"] += ent[b, t].item()
            buckets[q]["n"] += 1
    for q, bk in enumerate(buckets):
        n = max(bk["n"], 1)
        bk.update(kl=bk["kl"] / n, gap_pos=bk["gap_pos"] / n, entropy=bk["entropy"] / n)
        print(f"entropy quantile bucket {q + 1}/{args.buckets}: mean H {bk['entropy']:.3f}  mean KL {bk['kl']:.4f}  "
              f"share d_t > 0 {bk['gap_pos']:.3f}  ({bk['n']} tokens)")

    out = {"config": vars(args), "n_tokens": n_tok, "exposure_sweep": {str(a): v for a, v in sweep.items()},
           "entropy_buckets": buckets}
    jpath = unique_path(args.out, "analysis", "json")
    with open(jpath, "w") as f:
        json.dump(out, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ALPHAS, [sweep[a]["kl"] for a in ALPHAS], "o-")
    ax[0].set(title="mismatch vs exposure", xlabel="alpha", ylabel="mean KL(p_T || p_S)")
    ax[1].plot(ALPHAS, [sweep[a]["top1_disagree"] for a in ALPHAS], "o-")
    ax[1].set(title="top-1 disagreement vs exposure", xlabel="alpha")
    xs = [bk["entropy"] for bk in buckets]
    ax[2].plot(xs, [bk["kl"] for bk in buckets], "o-", label="mean KL")
    ax[2].plot(xs, [bk["gap_pos"] for bk in buckets], "s--", label="share d_t > 0")
    ax[2].set(title="by student-entropy quantile (alpha = 1)", xlabel="mean entropy of bucket (nats)")
    ax[2].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    ppath = jpath[:-5] + ".png"
    fig.savefig(ppath, dpi=110)
    print(f"wrote {jpath} and {ppath}")


if __name__ == "__main__":
    main()
