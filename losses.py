"""Distillation losses: OPSD divergence, DASD pull/push routing, GRPO. Plain PyTorch on (B, T, V) logits.

Papers:
  OPSD  "Self-Distilled Reasoner: On-Policy Self-Distillation for LLMs"                       arXiv 2601.18734
  DASD  "Tailoring Teaching to Aptitude: Direction-Adaptive Self-Distillation for LLM Reasoning" arXiv 2605.22263
  GKD   "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"     arXiv 2306.13649
  GRPO  "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"   arXiv 2402.03300

Dims: B sequences, G samples per prompt, T response tokens, V vocabulary, H hidden size, N valid tokens, C chunk,
K = min(topk, V) entries of the top-k support.
p_S = softmax(z_S / temp) is the student (gets gradients), p_T = softmax(z_T / temp) the teacher (a constant).

Equations, per response position t (all sums over the vocabulary v):

  Divergence (GKD's generalized JSD; beta picks the direction):
    beta = 0 :  D = KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))     "forward KL", mode-covering
    beta = 1 :  D = KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))     "reverse KL", mode-seeking
    else     :  m = beta p_T + (1 - beta) p_S
                D = beta KL(p_T || m) + (1 - beta) KL(p_S || m)                 (<= log 2 at beta = 0.5)
  OPSD per-entry clip at tau (0.05 in the paper): every summand s_v is replaced by min(s_v, tau) before the sum.
    A clipped entry has no gradient; for beta = 0 the gradient on z_u is -p_T(u) [s_u <= tau] + p_S(u) P_T(unclipped),
    so a clipped confident teacher token is pushed *down* where p_S(u) < p_T(u) exp(-tau / p_T(u))
    (docs/choices.md, choice 3).
  OPSD loss:  L = sum_t mask_t D_t / sum_t mask_t                                 (token mean over the batch)

  Top-k support (topk = k, OPSD's top_k_loss; None = the full vocabulary):
    S_t   = the k entries of largest z_T / temp                                   (the teacher's top-k, K = min(k, V))
    p^k(v) = exp(z(v) / temp) / sum_{u in S_t} exp(z(u) / temp),  v in S_t         (each side renormalized over S_t)
    D_t   = the divergence above, with its per-entry clip, on p_S^k and p_T^k, summed over v in S_t only.
    k >= V gives the full-vocabulary D_t (the same entries, reordered). The selection depends on the teacher only,
    so no gradient flows through it; the student's gradient lives on the k entries of S_t.

  DASD router (per trajectory; H_t the student's entropy, detached):
    tau_rho = threshold such that the top rho (= push_fraction) of the trajectory's tokens have H_t > tau_rho
    s_H     = mean_t |H_t - mean(H)|                                              (mean absolute deviation)
    w_t     = tanh((tau_rho - H_t) / s_H)    (soft)   or   sign(tau_rho - H_t)    (hard; +1 at the tie)
  DASD KL form:
    L_t = max(w_t, 0) * D_pull_t  -  push_weight * max(-w_t, 0) * min(D_push_t, push_margin)
    D_pull = the OPSD divergence above, D_push = JSD (beta = 0.5, no clip), 0 <= D_push <= log 2
    (with topk D_pull and D_push are taken on the top-k support S_t, the router's H_t not: docs/choices.md, choice 33)
  DASD token-advantage form (sampled token y_t):
    d_t = log p_T(y_t) - log p_S(y_t), standardized within the trajectory
    A_t = A_group + coef * w_t * sigmoid(|d_t| - 1) * d_t
  GRPO:
    A_i = (r_i - mean_group(r)) / (std_group(r) + eps),   L = - sum_t mask_t A_t log p_S(y_t) / sum_t mask_t

Where the papers are silent: float32 softmax math (docs/choices.md, choice 29); 0 log 0 = 0
(docs/choices.md, choice 30); the clip on every beta (docs/choices.md, choice 3); the token mean over the whole
batch (docs/choices.md, choice 4); DASD's per-response quantile (docs/choices.md, choice 1) and margin-capped push
(docs/choices.md, choice 2); the token-advantage form's standardized gap (docs/choices.md, choice 31); GRPO's
population std (docs/choices.md, choice 32); the top-k support under a full-vocabulary router
(docs/choices.md, choice 33). The chunked path for large vocabularies is chunked_loss.py (docs/choices.md, choice 16).

Run the demo:
    python losses.py
"""

import math

import torch

# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities, entropy, per-position divergence


def logprobs(logits, temperature=1.0):
    """log softmax(logits / temperature) in float32 (float64 stays float64). (..., V) -> (..., V)"""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (..., V)
    if temperature != 1.0:  # skip a (..., V) copy in the common case
        z = z / temperature
    return torch.log_softmax(z, dim=-1)  # (..., V)


def entropy_from_logprobs(logp):
    """Entropy in nats from log-probabilities; entries with p = 0 contribute 0. (..., V) -> (...)"""
    p = logp.exp()  # (..., V)
    # Double where: log p = -inf is replaced by 0 before the product, so neither value nor gradient sees 0 * -inf.
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # (...)


def _p_log_ratio(p, logp, logq):
    """Per-entry p * (log p - log q), exactly 0 where p == 0 (also when both logs are -inf)."""
    # The where is on the difference, so a nan from (-inf) - (-inf) is never multiplied, and its gradient is 0.
    return p * torch.where(p > 0, logp - logq, 0.0)  # (..., V)


def divergence_from_logprobs(logp_s, logp_t, *, beta=0.0, clip=None):
    """Generalized JSD per position, summed over V. beta=0: KL(p_T||p_S); beta=1: KL(p_S||p_T).

    logp_s, logp_t: (..., V) log-probabilities. clip: per-entry cap on each summand (OPSD), None for no cap.
    Returns (...). Gradients flow into whatever requires grad (callers pass a detached logp_t).
    """
    p_t = logp_t.exp()  # (..., V)
    p_s = logp_s.exp() if beta != 0.0 else None  # (..., V) forward KL does not need it: one tensor less
    if beta == 0.0:
        terms = _p_log_ratio(p_t, logp_t, logp_s)  # forward KL(p_T || p_S): teacher-weighted, mode-covering
    elif beta == 1.0:
        terms = _p_log_ratio(p_s, logp_s, logp_t)  # reverse KL(p_S || p_T): student-weighted, mode-seeking
    else:
        # log m = log(beta p_T + (1-beta) p_S), computed in log space. Entries dead in both (p_S = p_T = 0) get
        # log m = 0 instead of logaddexp(-inf, -inf), whose gradient is nan; they contribute 0 anyway.
        dead = (p_s == 0) & (p_t == 0)  # (..., V)
        logm = torch.logaddexp(torch.where(dead, 0.0, logp_s) + math.log(1.0 - beta),
                               torch.where(dead, 0.0, logp_t) + math.log(beta))  # (..., V)
        terms = beta * _p_log_ratio(p_t, logp_t, logm) + (1.0 - beta) * _p_log_ratio(p_s, logp_s, logm)  # (..., V)
    if clip is not None:
        terms = terms.clamp(max=clip)  # OPSD: no single vocabulary entry may contribute more than clip nats
    return terms.sum(-1)  # (...)


def topk_support(teacher_logits, topk):
    """Indices of the teacher's topk largest logits, K = min(topk, V): all V, reordered, when topk >= V.

    teacher_logits: (..., V) -> (..., K) long. OPSD takes the top-k of z_T / temp; dividing by temp > 0 keeps the
    order, so the top-k of z_T itself are the same entries, without a (..., V) copy.
    """
    assert topk >= 1, "topk is the number of teacher entries kept (None for the full vocabulary)"
    return teacher_logits.detach().topk(min(topk, teacher_logits.shape[-1]), dim=-1).indices  # (..., K)


def support_logprobs(student_logits, teacher_logits, *, temperature=1.0, topk=None):
    """Both sides' log-probs on the loss's support, in a common float dtype; the teacher side is detached.

    topk=None: log softmax over the full vocabulary, (..., V) x 2. Else OPSD's top-k support: gather both sides'
    logits at the teacher's top-k entries and log softmax over those k, so each side sums to 1 on them: (..., K) x 2.
    """
    # The teacher is a target, not a model being trained: detach so no gradient reaches it (in OPSD the teacher
    # can share weights with the student; without the detach the student would also be trained "as teacher").
    z_t = teacher_logits.detach()  # (..., V)
    z_s = student_logits  # (..., V)
    if topk is not None:
        top = topk_support(z_t, topk)  # (..., K) the support depends on the teacher only: no gradient through it
        z_s, z_t = z_s.gather(-1, top), z_t.gather(-1, top)  # (..., K) each, still raw logits
    logp_t = logprobs(z_t, temperature)  # (..., V) or (..., K)
    logp_s = logprobs(z_s, temperature)  # (..., V) or (..., K)
    if logp_s.dtype != logp_t.dtype:
        dtype = torch.promote_types(logp_s.dtype, logp_t.dtype)
        logp_s, logp_t = logp_s.to(dtype), logp_t.to(dtype)
    return logp_s, logp_t


def divergence(student_logits, teacher_logits, *, beta=0.0, temperature=1.0, clip=None, topk=None):
    """Per-position divergence between softmax(student/temp) and softmax(teacher/temp), summed over V.

    beta=0 is KL(p_T || p_S) (forward), beta=1 is KL(p_S || p_T) (reverse), in between the generalized JSD of GKD;
    with clip=None it equals TRL's GKDTrainer.generalized_jsd_loss(reduction="none").sum(-1).
    topk: restrict to the teacher's top-k entries, both sides renormalized over them (see support_logprobs).
    student_logits, teacher_logits: (..., V). Returns (...) in float32 (float64 for float64 input).
    """
    logp_s, logp_t = support_logprobs(student_logits, teacher_logits, temperature=temperature, topk=topk)
    return divergence_from_logprobs(logp_s, logp_t, beta=beta, clip=clip)  # (...)


# ----------------------------------------------------------------------------------------------------------------
# Reduction: a separate, named step


def masked_token_mean(values, mask):
    """Mean of values over positions where mask is true, pooled over the whole batch; 0 if nothing is valid.

    values, mask: (B, T). Token mean (not mean of per-sequence means): each response token weighs the same, so a
    long response gets more weight than a short one, as in OPSD and TRL's batchmean over unmasked tokens.
    """
    mask = mask.bool()
    # where, not multiply: a nan/inf at a padded position must not leak into the sum (nan * 0 = nan).
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# OPSD


def opsd_loss(student_logits, teacher_logits, mask, *, beta=0.0, clip=0.05, temperature=1.0, topk=None):
    """OPSD: token mean of the (clipped) divergence. Logits (B, T, V), mask (B, T). Returns (loss, metrics).

    topk: the divergence is taken on the teacher's top-k entries, both sides renormalized over them (None: all V);
    the logged entropy and KL stay full-vocabulary.
    """
    logp_s, logp_t, loss_s, loss_t = _loss_logprobs(student_logits, teacher_logits, temperature, topk)
    div = divergence_from_logprobs(loss_s, loss_t, beta=beta, clip=clip)  # (B, T) per-token loss
    loss = masked_token_mean(div, mask)
    metrics = _log_metrics(logp_s, logp_t, mask)
    metrics["loss/div"] = loss.detach()
    return loss, metrics


def _loss_logprobs(student_logits, teacher_logits, temperature, topk):
    """Full-vocabulary log-probs (metrics, DASD's router) and the divergence's log-probs, in the student's dtype.

    Returns (logp_s, logp_t, loss_s, loss_t): logp_* (B, T, V); loss_* the same tensors for topk=None, else the
    top-k support's (B, T, K) ones (support_logprobs).
    """
    # with topk the full log-probs only feed the metrics and the router: detached, no graph kept for them
    logp_s = logprobs(student_logits if topk is None else student_logits.detach(), temperature)  # (B, T, V)
    logp_t = logprobs(teacher_logits.detach(), temperature).to(logp_s.dtype)  # (B, T, V); teacher is a constant
    if topk is None:
        return logp_s, logp_t, logp_s, logp_t
    loss_s, loss_t = support_logprobs(student_logits, teacher_logits, temperature=temperature, topk=topk)
    return logp_s, logp_t, loss_s.to(logp_s.dtype), loss_t.to(logp_s.dtype)  # (B, T, K) each


@torch.no_grad()  # diagnostics only: never part of the gradient
def _log_metrics(logp_s, logp_t, mask):
    """Token means of the student's and the teacher's entropy and of the unclipped forward KL(p_T || p_S)."""
    return {
        "entropy/student": masked_token_mean(entropy_from_logprobs(logp_s), mask),
        "entropy/teacher": masked_token_mean(entropy_from_logprobs(logp_t), mask),
        "kl/teacher_student": masked_token_mean(divergence_from_logprobs(logp_s, logp_t, beta=0.0), mask),
    }


# ----------------------------------------------------------------------------------------------------------------
# DASD: the router, the KL form, the token-advantage form


@torch.no_grad()  # the router is a constant: gradients must not move tokens across the threshold
def entropy_gate(entropy, mask, *, push_fraction=0.2, soft=True):
    """Signed gate in [-1, 1]: > 0 pull toward the teacher, < 0 push away, 0 where mask is 0.

    entropy, mask: (B, T). Per sequence, the top push_fraction (rounded) of its valid tokens by entropy are pushed.
    soft: tanh((tau - H) / s) with s the mean absolute deviation of the sequence's entropies; else +-1.
    """
    assert 0.0 <= push_fraction < 1.0, "push_fraction is the share of tokens pushed, in [0, 1)"
    mask = mask.bool()
    ent = entropy.detach().to(torch.promote_types(entropy.dtype, torch.float32))  # (B, T)
    n = mask.sum(-1)  # (B,) valid tokens per sequence
    # Threshold: sort valid entropies descending (padding sorted last as -inf), take the midpoint between the
    # k-th and (k+1)-th largest, k = round(rho * n). k = 0 gives the maximum itself: nothing is pushed.
    ent_sorted = torch.where(mask, ent, torch.full_like(ent, -math.inf)).sort(dim=-1, descending=True).values
    k = torch.floor(push_fraction * n.float() + 0.5).long()  # (B,) tokens to push, round(rho * n) ...
    k = torch.minimum(k, (n - 1).clamp(min=0))  # ... but at most n - 1: the calmest token is always pulled
    i_hi = (k - 1).clamp(min=0)
    i_lo = k
    tau = 0.5 * (ent_sorted.gather(-1, i_hi[:, None]) + ent_sorted.gather(-1, i_lo[:, None]))  # (B, 1)
    tau = torch.where(n[:, None] > 0, tau, torch.zeros_like(tau))  # all-masked sequence: any finite value
    hard = torch.where(ent <= tau, 1.0, -1.0)  # (B, T) sign(tau - H), +1 at the tie
    if soft:
        nf = n.clamp(min=1).float()[:, None]  # (B, 1)
        mean = torch.where(mask, ent, 0.0).sum(-1, keepdim=True) / nf  # (B, 1)
        s = torch.where(mask, (ent - mean).abs(), 0.0).sum(-1, keepdim=True) / nf  # (B, 1) mean abs deviation
        # s = 0 (equal entropies, or one token): no scale to measure distance in, so fall back to the sign.
        gate = torch.where(s > 0, torch.tanh((tau - ent) / s.clamp(min=1e-12)), hard)  # (B, T)
    else:
        gate = hard
    return torch.where(mask, gate, torch.zeros_like(gate))  # (B, T)


def dasd_token_loss(logp_s, logp_t, gate, *, beta=0.0, clip=0.05, push_weight=1.0, push_margin=0.1,
                    pull_weight=1.0):
    """Per-token DASD KL form. logp_s, logp_t: (..., V), or (..., K) on the top-k support (support_logprobs);
    gate: (...). Returns (loss_t, pull_t, push_t), each (...).

    loss_t = pull_weight * max(gate, 0) * D_pull - push_weight * max(-gate, 0) * min(D_push, push_margin),
    push_t >= 0. pull_weight = 0 leaves the push alone, push_weight = 0 the pull alone (the router's two effects).
    """
    # Each token is either pulled (gate > 0) or pushed (gate < 0), so each divergence is computed only on the
    # rows that use it (about 80% / 20% of them): same values and gradients, much less work over V.
    pos, neg = gate > 0, gate < 0  # (...)
    zero = torch.zeros(gate.shape, dtype=logp_s.dtype, device=logp_s.device)
    d_pull = zero.masked_scatter(pos, divergence_from_logprobs(logp_s[pos], logp_t[pos], beta=beta, clip=clip))
    # D_push = JSD(beta=0.5) in [0, log 2]: bounded, unlike KL, so pushing cannot run off to infinity.
    d_push = zero.masked_scatter(neg, divergence_from_logprobs(logp_s[neg], logp_t[neg], beta=0.5))  # (...)
    pull = pull_weight * gate.clamp(min=0) * d_pull  # (...)
    # clamp(max=margin) is flat past the margin: zero gradient once the student is far enough from the teacher.
    push = push_weight * (-gate).clamp(min=0) * d_push.clamp(max=push_margin)  # (...) in [0, push_weight*margin]
    return pull - push, pull, push


def dasd_loss(student_logits, teacher_logits, mask, *, push_fraction=0.2, soft=True, beta=0.0, clip=0.05,
              push_weight=1.0, push_margin=0.1, temperature=1.0, topk=None, pull_weight=1.0):
    """DASD KL form: entropy-routed pull (OPSD divergence) / push (margin-capped JSD). Returns (loss, metrics).

    student_logits, teacher_logits: (B, T, V), mask: (B, T). Floor: loss >= -push_weight * push_margin when
    clip=None (the clipped case: docs/choices.md, choice 2).
    topk: D_pull and D_push are taken on the teacher's top-k entries, both sides renormalized over them; the
    router still reads the student's FULL-vocabulary entropy (docs/choices.md, choice 33), and the metrics stay full.
    """
    logp_s, logp_t, loss_s, loss_t = _loss_logprobs(student_logits, teacher_logits, temperature, topk)
    ent = entropy_from_logprobs(logp_s.detach())  # (B, T) full vocabulary; detached: the router is not trained
    gate = entropy_gate(ent, mask, push_fraction=push_fraction, soft=soft)  # (B, T)
    loss_t, pull_t, push_t = dasd_token_loss(loss_s, loss_t, gate.to(loss_s.dtype), beta=beta, clip=clip,
                                             push_weight=push_weight, push_margin=push_margin,
                                             pull_weight=pull_weight)  # (B, T) each
    loss = masked_token_mean(loss_t, mask)
    metrics = _log_metrics(logp_s, logp_t, mask)
    metrics.update(_gate_metrics(gate, pull_t, push_t, mask))
    return loss, metrics


@torch.no_grad()
def _gate_metrics(gate, pull_t, push_t, mask):
    m = mask.bool()
    return {
        "dasd/gate_mean": masked_token_mean(gate.float(), m),
        "dasd/frac_pushed": masked_token_mean((gate < 0).float(), m),
        "loss/pull": masked_token_mean(pull_t, m),  # loss = pull - push
        "loss/push": masked_token_mean(push_t, m),
    }


@torch.no_grad()  # advantages are constants of the policy-gradient surrogate
def dasd_token_advantages(logp_s, logp_t, entropy, mask, *, push_fraction=0.2, soft=True, coef=1.0,
                          group_adv=None, eps=1e-6):
    """DASD token-advantage form: A_t = A_group + coef * gate_t * sigmoid(|d_t| - 1) * d_t.

    logp_s, logp_t: (B, T) log-probs of the sampled tokens under student and teacher; entropy, mask: (B, T);
    group_adv: (B,) or (B, T) GRPO advantages, or None. d_t = logp_t - logp_s standardized per trajectory.
    Returns (adv (B, T), 0 where masked; metrics).
    """
    m = mask.bool()
    n = m.sum(-1, keepdim=True).clamp(min=1).float()  # (B, 1)
    d = torch.where(m, (logp_t - logp_s).float(), 0.0)  # (B, T) teacher-student log-evidence gap
    mean = d.sum(-1, keepdim=True) / n  # (B, 1)
    std = (torch.where(m, (d - mean) ** 2, 0.0).sum(-1, keepdim=True) / n).sqrt()  # (B, 1) population std
    d_std = (d - mean) / (std + eps)  # (B, T)
    gate = entropy_gate(entropy, m, push_fraction=push_fraction, soft=soft)  # (B, T)
    # Reliability: |d| well under one std is likely noise (sigmoid(-1) = 0.27); a large gap is trusted (-> 1).
    w = gate * torch.sigmoid(d_std.abs() - 1.0)  # (B, T)
    adv = coef * w * d_std  # (B, T) pull tokens: up if the teacher likes y_t more; push tokens: the reverse
    if group_adv is not None:  # (B,) per sequence, or already (B, T)
        group_adv = group_adv.float()
        adv = adv + (group_adv[:, None] if group_adv.dim() == 1 else group_adv)
    adv = torch.where(m, adv, torch.zeros_like(adv))
    metrics = {
        "dasd/gate_mean": masked_token_mean(gate, m),
        "dasd/frac_pushed": masked_token_mean((gate < 0).float(), m),
        "dasd/reliability_mean": masked_token_mean(torch.sigmoid(d_std.abs() - 1.0), m),
        "dasd/gap_mean": masked_token_mean(d, m),
        "adv/token_mean": masked_token_mean(adv, m),
    }
    return adv, metrics


@torch.no_grad()  # advantages are constants of the policy-gradient surrogate
def teacher_free_advantages(logp_s, mask, *, fraction=0.2, magnitude=1.0):
    """The teacher-free control: A_t = -magnitude on the top `fraction` of each response's tokens by surprisal
    -log p_S(y_t) (its least likely sampled tokens: the per-response quantile of DASD's router, read on the
    surprisal instead of the entropy), 0 elsewhere. No teacher is consulted. logp_s, mask: (B, T).
    Returns (adv (B, T), metrics)."""
    m = mask.bool()
    low = entropy_gate(-logp_s.float(), m, push_fraction=fraction, soft=False) < 0  # (B, T) least likely tokens
    adv = torch.where(low & m, -float(magnitude), 0.0)  # (B, T)
    return adv, {"adv/frac_negative": masked_token_mean(low.float(), m), "adv/token_mean": masked_token_mean(adv, m)}


# ----------------------------------------------------------------------------------------------------------------
# GRPO baseline and the policy-gradient surrogate


def grpo_advantages(rewards, group_size, *, eps=1e-6):
    """Group-normalized advantages. rewards: (B,) with the G = group_size samples of a prompt contiguous. -> (B,)"""
    r = rewards.float().view(-1, group_size)  # (B/G, G)
    mean = r.mean(-1, keepdim=True)  # (B/G, 1)
    std = r.std(-1, keepdim=True, correction=0)  # (B/G, 1) population std: 0 (not nan) for a group of one
    return ((r - mean) / (std + eps)).view(-1)  # (B,)


def sampled_logprobs(logits, tokens, *, temperature=1.0):
    """log p(y_t) of the sampled tokens. logits (B, T, V), tokens (B, T) -> (B, T) float32."""
    return logprobs(logits, temperature).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)


def nll_loss(logits, tokens, mask):
    """SFT's loss: the token mean of -log p(y_t) of the given tokens (the reference solution's). logits (B, T, V),
    tokens, mask (B, T) -> a scalar."""
    return masked_token_mean(-sampled_logprobs(logits, tokens), mask)


def policy_gradient_token_loss(logp, advantages):
    """Per-token on-policy surrogate -A_t * log p(y_t). logp (B, T); advantages (B, T) or (B,). -> (B, T)

    Exactly on-policy (the tokens were sampled from the current weights, one update per batch), the importance
    ratio pi/pi_old equals 1 with gradient grad log pi, so PPO's ratio and clip reduce to this plain REINFORCE.
    """
    adv = advantages.detach()  # constants: the gradient must flow only through log p
    if adv.dim() == 1:
        adv = adv[:, None]  # (B, 1) sequence-level advantage applies to every token
    return -adv * logp  # (B, T)


def policy_gradient_loss(logp, advantages, mask):
    """Token mean of the policy-gradient surrogate. Returns (loss, metrics)."""
    loss = masked_token_mean(policy_gradient_token_loss(logp, advantages), mask)
    adv = advantages.detach().float()
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
    metrics = {"loss/pg": loss.detach(), "adv/mean": masked_token_mean(adv, mask),
               "logp/mean": masked_token_mean(logp.detach(), mask)}
    return loss, metrics


if __name__ == "__main__":
    torch.manual_seed(0)
    p_t, p_s = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    z_t, z_s = p_t.log(), p_s.log()
    print("3-token vocabulary: p_T =", p_t.tolist(), " p_S =", p_s.tolist())
    for beta in (0.0, 0.5, 1.0):
        print(f"  beta={beta}: D = {divergence(z_s, z_t, beta=beta).item():.5f}")
    print(f"  forward KL with per-entry clip 0.05: {divergence(z_s, z_t, clip=0.05).item():.5f}"
          f"  (unclipped summands {(p_t * (p_t / p_s).log()).tolist()})")

    B, T, V = 2, 8, 11
    zs = torch.randn(B, T, V) * torch.linspace(0.2, 3.0, T)[:, None]  # later tokens sharper: a range of entropies
    zt = zs + torch.randn(B, T, V)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False  # second sequence is shorter
    ent = entropy_from_logprobs(logprobs(zs))
    print("\nstudent entropy (B, T):\n", ent.round(decimals=3))
    print("soft gate (negative = push):\n", entropy_gate(ent, mask).round(decimals=3))
    print("hard gate:\n", entropy_gate(ent, mask, soft=False))
    loss, m = opsd_loss(zs, zt, mask)
    print(f"\nOPSD loss {loss.item():.4f}", {k: round(v.item(), 4) for k, v in m.items()})
    loss, m = dasd_loss(zs, zt, mask)
    print(f"DASD loss {loss.item():.4f}", {k: round(v.item(), 4) for k, v in m.items()})
    # top-k support: the teacher's 3 most likely of the 11 entries, both sides renormalized over them
    print(f"top-3 support: OPSD loss {opsd_loss(zs, zt, mask, topk=3)[0].item():.4f}, "
          f"DASD loss {dasd_loss(zs, zt, mask, topk=3)[0].item():.4f} (topk={V}: "
          f"{opsd_loss(zs, zt, mask, topk=V)[0].item():.4f}, {dasd_loss(zs, zt, mask, topk=V)[0].item():.4f})")

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    print("\nGRPO advantages, G=3:", grpo_advantages(rewards, 3).round(decimals=3).tolist())
    y = zs.argmax(-1)
    adv, m = dasd_token_advantages(sampled_logprobs(zs, y), sampled_logprobs(zt, y), ent, mask,
                                   group_adv=torch.tensor([0.5, -0.5]))
    print("DASD token advantages (B, T):\n", adv.round(decimals=3))
