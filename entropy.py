"""Token entropy of a next-token distribution: the signal that routes DASD's pull/push and that we log for every method.

Papers: "Tailoring Teaching to Aptitude: Direction-Adaptive Self-Distillation for LLM Reasoning" (arXiv 2605.22263)
routes each token by the student's entropy H_t; "Self-Distilled Reasoner: On-Policy Self-Distillation for LLMs"
(arXiv 2601.18734) divides logits by the sampling temperature before any distribution is formed.

Equations (per position t, vocabulary of size V, logits z_t, temperature T_s):

    p_t(v)  = softmax(z_t / T_s)(v)
    H_t     = - sum_v p_t(v) * log p_t(v)                    (nats, 0 <= H_t <= log V)
            = logsumexp(z_t / T_s) - sum_v p_t(v) * z_t(v) / T_s

Where the papers are silent: the result is float32 whatever the input dtype (docs/choices.md, choice 29); entries
with logit -inf contribute exactly 0 (docs/choices.md, choice 30); differentiable, but every caller detaches it
(docs/choices.md, choice 34).

Run the demo:
    python entropy.py
"""

import math

import torch


def token_entropy(logits, temperature=1.0):
    """Entropy in nats of softmax(logits / temperature) over the last dim.

    logits: (..., V) any float dtype, may contain -inf. Returns (...), float32 (or float64 for float64 input).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., V)
    p = logp.exp()  # (..., V)
    # Double torch.where: first replace log p = -inf by 0 where p == 0, so that neither the value (0 * -inf = nan)
    # nor the gradient (d/dp of p*log p multiplies by log p = -inf) ever meets a nan.
    logp_safe = torch.where(p > 0, logp, torch.zeros_like(logp))  # (..., V)
    return -(p * logp_safe).sum(dim=-1)  # (...)


if __name__ == "__main__":
    torch.manual_seed(0)
    V = 5
    print(f"uniform over V={V}: H = {token_entropy(torch.zeros(V)).item():.4f}  (log V = {math.log(V):.4f})")
    print(f"one-hot-ish [20,0,0,0,0]: H = {token_entropy(torch.tensor([20.0, 0, 0, 0, 0])).item():.6f}")
    z = torch.tensor([2.0, 1.0, 0.0, -float("inf"), -float("inf")])
    print(f"with two -inf entries {z.tolist()}: H = {token_entropy(z).item():.4f}"
          f"  (same as the 3 finite ones: {token_entropy(z[:3]).item():.4f})")
    for T_s in (0.5, 1.0, 2.0):
        print(f"temperature {T_s}: H = {token_entropy(z, temperature=T_s).item():.4f}")
    zb = torch.randn(2, 4, 151936).bfloat16()  # (B, T, V) in bf16, like a model's output
    H = token_entropy(zb)  # (B, T)
    print(f"bf16 logits (2, 4, 151936) -> entropy {tuple(H.shape)} {H.dtype}:\n{H}")
