"""Distillation losses: OPSD divergence, DASD pull/push routing, GRPO, and a chunked path for large vocabularies.

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
    A clipped entry has no gradient. For beta = 0 the gradient on the student's logit z_u is then
    -p_T(u) [s_u <= tau] + p_S(u) P_T(unclipped): when the clipped entry is the teacher's confident token, a
    descent step lowers its student probability (the unclipped KL's p_S(u) - p_T(u) raises it). That happens
    where p_S(u) < p_T(u) exp(-tau / p_T(u)), e.g. below 0.94 against a teacher at 0.99.
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
    (with topk both D_pull and D_push are taken on the top-k support S_t; the router's H_t is not, see 10.)
  DASD token-advantage form (sampled token y_t):
    d_t = log p_T(y_t) - log p_S(y_t), standardized within the trajectory
    A_t = A_group + coef * w_t * sigmoid(|d_t| - 1) * d_t
  GRPO:
    A_i = (r_i - mean_group(r)) / (std_group(r) + eps),   L = - sum_t mask_t A_t log p_S(y_t) / sum_t mask_t

Departures and choices where the papers are silent:
  1. All softmax math runs in float32 (float64 stays float64) even for bf16 logits.
  2. Vocabulary entries with p = 0 (logit -inf) contribute exactly 0 (0 log 0 = 0), guarded with torch.where.
  3. The clip applies to the whole per-entry summand for every beta (the paper only clips forward KL).
  4. Token mean over all valid tokens of the batch (not a mean of per-sequence means): every response token
     counts the same, as in OPSD's and TRL's "batchmean" over unmasked labels. An all-masked batch gives 0.
  5. DASD quantile: k = min(round(rho * n), n - 1) tokens of a trajectory with n valid tokens are pushed; tau_rho is the
     midpoint between the k-th and (k+1)-th largest entropy (the largest one if k = 0, so nothing is pushed and
     a one-token trajectory is plain OPSD). When the entropies of a trajectory are all equal (s_H = 0) the soft
     gate falls back to the hard one, so there is no division by zero.
  6. DASD push term: a bounded JSD capped at push_margin = 0.1 nats (about the JSD between a 50/50 and a 90/10
     split over two candidate tokens: a clear change of preference at a fork, well short of abandoning the
     teacher). Past the margin the push has zero gradient, so the student is never driven to arbitrary
     distributions. FLOOR: the push part of each token is at most push_weight * push_margin, so with clip=None
     (D_pull >= 0) the loss is >= -push_weight * push_margin however far the student moves. With the per-entry
     clip, D_pull itself can dip below 0 (true of OPSD too), but only to -H(p_T) for beta = 0 (a constant of
     the teacher, not of the student) and to -log V in general.
  7. Token-advantage form: d_t in A_t is the standardized gap (the same d_t as in the filter), so the shaping term
     has the scale of a GRPO advantage; std is the population std within the trajectory plus 1e-6.
  8. GRPO std is the population std (a group of one gives advantage 0, not nan).
  9. chunked_distill_loss computes each chunk's gradient during the forward pass (loss is a sum over tokens and
     the router's gate is a constant), so the full (N, V) logits never exist, forward or backward, and no
     matmul is recomputed for OPSD; DASD adds one no-grad pass for the entropies the router needs (and keeps
     each token's log-sum-exp from it, so the loss pass gets log p_S with one subtraction). The gradient of the
     logits is written out by hand (dL/dz = (p_S sum(w) - w) / temp, w = -dL/dlog p_S; see _divergence_and_w)
     rather than taken from autograd, and the logged entropy and unclipped KL reuse the loss's own tensors:
     about 15 elementwise passes per row. Inside a chunk the float32 math runs math_rows rows at a time in
     work buffers allocated once; the lm_head matmuls keep chunk_size rows (a wide matmul, fewer passes over
     the (V, H) gradient). The per-token factor of the gradient is applied to the (C, H) side of the matmuls.
     The weight gradient is accumulated in the weight's dtype (bf16 rounding per chunk for a bf16 model).
     matmul_dtype=bf16 over fp32 master weights (train.py under --dtype bfloat16) runs the lm_head matmuls in
     bf16, as autocast would; the softmax math stays float32 either way.
     With topk the same formula holds on the k entries of S_t (p_S^k in place of p_S) and dL/dz is 0 elsewhere:
     the row's gradient is scattered into a zeroed row, so the lm_head matmuls stay dense (C, V) ones.
     chunked_nll_loss is the same scheme for SFT's NLL of the reference tokens: dL/dz = (p - onehot(y)) / N.
 10. Top-k support: the DASD router keeps the student's FULL-vocabulary entropy H_t (the gate asks how uncertain
     the student is, which the top-k renormalization would distort: a flat tail outside the teacher's k entries
     is invisible to it); only D_pull and D_push use the top-k support. The logged metrics (student entropy,
     unclipped KL(p_T || p_S)) also stay full-vocabulary, so runs with and without topk log comparable numbers.
     The selection is torch.topk of the teacher's logits in their own dtype (dividing by temp > 0 keeps the
     order); which of several tied logits at the k-th place is kept is torch.topk's choice.

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


def dasd_token_loss(logp_s, logp_t, gate, *, beta=0.0, clip=0.05, push_weight=1.0, push_margin=0.1):
    """Per-token DASD KL form. logp_s, logp_t: (..., V), or (..., K) on the top-k support (support_logprobs);
    gate: (...). Returns (loss_t, pull_t, push_t), each (...).

    loss_t = max(gate, 0) * D_pull - push_weight * max(-gate, 0) * min(D_push, push_margin), push_t >= 0.
    """
    # Each token is either pulled (gate > 0) or pushed (gate < 0), so each divergence is computed only on the
    # rows that use it (about 80% / 20% of them): same values and gradients, much less work over V.
    pos, neg = gate > 0, gate < 0  # (...)
    zero = torch.zeros(gate.shape, dtype=logp_s.dtype, device=logp_s.device)
    d_pull = zero.masked_scatter(pos, divergence_from_logprobs(logp_s[pos], logp_t[pos], beta=beta, clip=clip))
    # D_push = JSD(beta=0.5) in [0, log 2]: bounded, unlike KL, so pushing cannot run off to infinity.
    d_push = zero.masked_scatter(neg, divergence_from_logprobs(logp_s[neg], logp_t[neg], beta=0.5))  # (...)
    pull = gate.clamp(min=0) * d_pull  # (...)
    # clamp(max=margin) is flat past the margin: zero gradient once the student is far enough from the teacher.
    push = push_weight * (-gate).clamp(min=0) * d_push.clamp(max=push_margin)  # (...) in [0, push_weight*margin]
    return pull - push, pull, push


def dasd_loss(student_logits, teacher_logits, mask, *, push_fraction=0.2, soft=True, beta=0.0, clip=0.05,
              push_weight=1.0, push_margin=0.1, temperature=1.0, topk=None):
    """DASD KL form: entropy-routed pull (OPSD divergence) / push (margin-capped JSD). Returns (loss, metrics).

    student_logits, teacher_logits: (B, T, V), mask: (B, T). Floor: loss >= -push_weight * push_margin when
    clip=None (see the module docstring for the clipped case).
    topk: D_pull and D_push are taken on the teacher's top-k entries, both sides renormalized over them; the
    router still reads the student's FULL-vocabulary entropy (module docstring, 10), and the metrics stay full.
    """
    logp_s, logp_t, loss_s, loss_t = _loss_logprobs(student_logits, teacher_logits, temperature, topk)
    ent = entropy_from_logprobs(logp_s.detach())  # (B, T) full vocabulary; detached: the router is not trained
    gate = entropy_gate(ent, mask, push_fraction=push_fraction, soft=soft)  # (B, T)
    loss_t, pull_t, push_t = dasd_token_loss(loss_s, loss_t, gate.to(loss_s.dtype), beta=beta, clip=clip,
                                             push_weight=push_weight, push_margin=push_margin)  # (B, T) each
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


# ----------------------------------------------------------------------------------------------------------------
# Chunked path: same loss and gradients as opsd_loss / dasd_loss on  h @ W.T,  at most C x V logits at a time


class _AttachGrad(torch.autograd.Function):
    """Returns a precomputed loss value and, on backward, the precomputed gradients of its inputs.

    A class only because torch.autograd.Function requires one. Supports one backward pass (grads scaled in place).
    """

    @staticmethod
    def forward(ctx, loss, hidden, weight, grad_hidden, grad_weight):
        ctx.grads = (grad_hidden, grad_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # drop our reference so autograd can take the (V, H) buffer as .grad without a copy
        # In place: scaling by grad_out (1 for loss.backward()) must not allocate a second (V, H) buffer.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_out)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_out)
        return None, grad_hidden, grad_weight, None, None


def _lm_head_for_matmuls(W, matmul_dtype):
    """The (V, H) matrix the chunked losses multiply by: W itself (detached), or its matmul_dtype copy."""
    return W.detach() if matmul_dtype in (None, W.dtype) else W.detach().to(matmul_dtype)


class _WeightGrad:
    """dL/dW = sum over chunks of dz^T h_scaled, each product in the matmul dtype, the sum in W's dtype.

    The first chunk's product is the buffer itself (no pass to fill zeros); with matmul dtype = W's dtype later
    chunks accumulate in place (addmm_); otherwise each product lands in one reused buffer of the matmul dtype
    and is added in W's dtype (CPUs have no mixed-dtype addmm)."""

    def __init__(self, W, mm_dtype):
        self.W, self.mm_dtype, self.grad, self.buf = W, mm_dtype, None, None

    def add(self, dz, h_scaled):  # (C, V), (C, H) in the matmul dtype
        if self.grad is None:
            self.grad = (dz.T @ h_scaled).to(self.W.dtype)
        elif self.mm_dtype == self.W.dtype:
            self.grad.addmm_(dz.T, h_scaled)
        else:
            if self.buf is None:
                self.buf = torch.empty(self.W.shape, dtype=self.mm_dtype, device=self.W.device)
            self.grad += torch.mm(dz.T, h_scaled, out=self.buf)

    def result(self):  # (V, H); zeros when no chunk had a valid token
        return self.grad if self.grad is not None else torch.zeros_like(self.W)


def _attach_grads(loss, hidden, W, rows, grad_rows, grad_W):
    """loss with the precomputed gradients attached: grad_rows (N, H) of the valid rows `rows` of hidden (B, T, H)
    scattered into place (0 at padding), grad_W (V, H) or None."""
    grad_hidden = None
    if grad_rows is not None:
        B, T, H = hidden.shape
        grad_hidden = torch.zeros_like(hidden).reshape(B * T, H)
        grad_hidden[rows] = grad_rows.to(grad_hidden.dtype)
        grad_hidden = grad_hidden.view(B, T, H)
    return _AttachGrad.apply(loss, hidden, W, grad_hidden, grad_W)


def _rowdot(a, b, tmp):
    """sum_v a[r, v] * b[r, v] for every row, the products written into the work buffer tmp. (R, V) x 3 -> (R,)"""
    return torch.mul(a, b, out=tmp).sum(-1)


def _divergence_and_w(logp_s, logp_t, p_s, p_t, *, beta, clip, out):
    """Per-row divergence D and w = -dD/dlog p_S(v) per entry, the gradient written out by hand.

    logp_s, logp_t, p_s, p_t: (R, V) float, finite logs (rows of h W^T are finite, so no -inf here).
    Returns (D (R,), w (R, V), kl (R,) unclipped forward KL when it comes for free (beta = 0), else None).
    out: an (R, V) work buffer for the summands (beta = 0). May overwrite p_t (then w is p_t).
    Each summand s_v depends on log p_S(v) only, so dD/dlog p_S(v) = ds_v/dlog p_S(v):
      beta = 0:  s = p_T (log p_T - log p_S)          ds/dlog p_S = -p_T
      beta = 1:  s = p_S (log p_S - log p_T)          ds/dlog p_S = p_S (log p_S - log p_T) + p_S
      else:      s = beta p_T (log p_T - log m) + (1-beta) p_S (log p_S - log m)
                 ds/dlog p_S = (1-beta) p_S (log p_S - log m)   (the d log m terms cancel: m = beta p_T + (1-beta) p_S)
    The per-entry clip min(s_v, clip) keeps ds_v where s_v <= clip and zeroes it above (as clamp's gradient does).
    """
    kl = None
    if beta == 0.0:
        terms = torch.sub(logp_t, logp_s, out=out).mul_(p_t)  # (R, V)
        kl = terms.sum(-1)  # (R,) the logged unclipped KL(p_T || p_S), free here
        w = p_t  # (R, V)
    elif beta == 1.0:
        terms = (logp_s - logp_t).mul_(p_s)  # (R, V)
        w = -(terms + p_s)  # (R, V)
    else:
        logm = torch.logaddexp(logp_s + math.log(1.0 - beta), logp_t + math.log(beta))  # (R, V)
        terms = beta * p_t * (logp_t - logm) + (1.0 - beta) * p_s * (logp_s - logm)  # (R, V)
        w = (1.0 - beta) * p_s * (logm - logp_s)  # (R, V)
    if clip is not None:
        w = w.mul_(terms <= clip)  # a clipped entry is flat: no gradient from it
        terms = terms.clamp_(max=clip)
    return terms.sum(-1), w, kl


def _segments(c0, c1, step, cuts):
    """Row ranges [r0, r1) of at most step rows covering [c0, c1), never crossing a row index in cuts."""
    edges = sorted({c0, c1, *[c for c in cuts if c0 < c < c1]})
    for a, b in zip(edges[:-1], edges[1:]):
        for r0 in range(a, b, step):
            yield r0, min(r0 + step, b)


def chunked_distill_loss(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight, mask, *,
                         method="opsd", chunk_size=256, math_rows=16, beta=0.0, clip=0.05, temperature=1.0,
                         push_fraction=0.2, soft=True, push_weight=1.0, push_margin=0.1, topk=None,
                         matmul_dtype=None):
    """opsd_loss / dasd_loss on logits = hidden @ W.T, never holding more than chunk_size x V logits.

    student_hidden: (B, T, H) final hidden states (after the last norm) at the positions predicting the response
    tokens; student_lm_head_weight: (V, H); teacher_hidden: (B, T, H_t); teacher_lm_head_weight: (V, H_t);
    mask: (B, T). Gradients reach student_hidden and student_lm_head_weight; the teacher side is a constant.
    chunk_size: token rows per lm_head matmul (C x V logits in the model dtype); math_rows: rows of float32
    softmax math at a time inside a chunk (five math_rows x V float work buffers, reused by every block).
    topk: the divergences on the teacher's top-k support, as in opsd_loss / dasd_loss (None: all V); DASD's
    router and the metrics stay full-vocabulary.
    matmul_dtype: dtype of the lm_head matmuls (None: each weight's own dtype). torch.bfloat16 over float32
    weights does what autocast does to a linear layer: each weight is cast once per call (a (V, H) bf16 copy),
    the logits and their gradient are bf16, and each chunk's bf16 weight gradient is summed in float32.
    Returns (loss, metrics) with the same keys as the plain functions. One backward pass per call.

    Same values and gradients as the plain path (tests check it to 1e-12 in float64), but the gradient of the
    logits is written out by hand instead of asking autograd: with w = -dL/dlog p_S (see _divergence_and_w),
        dL/dz = (p_S * sum_v w - w) / temperature          (the softmax Jacobian applied to -w)
    which takes a few elementwise passes over each row instead of autograd's recorded graph, and gives the logged
    entropy and unclipped KL from quantities the loss already needs. With topk, log p_S^k = z_k/temp - logsumexp(
    z_k/temp) on the k entries only, so the same formula with p_S^k holds on those k and dL/dz = 0 on the others.
    """
    assert method in ("opsd", "dasd")
    B, T, H = student_hidden.shape
    W_s, W_t = student_lm_head_weight, teacher_lm_head_weight.detach()  # teacher is a constant
    # the matrices the matmuls use: the weights themselves, or their matmul_dtype copies (one copy for a teacher
    # that shares the student's lm_head)
    mm_s = _lm_head_for_matmuls(W_s, matmul_dtype)
    if matmul_dtype in (None, W_t.dtype):
        mm_t = W_t
    elif W_t.data_ptr() == W_s.data_ptr() and W_t.shape == W_s.shape:
        mm_t = mm_s
    else:
        mm_t = W_t.to(matmul_dtype)
    valid = mask.bool().reshape(-1)  # (B*T,)
    idx = valid.nonzero().squeeze(1)  # (N,) padding rows are skipped entirely: they add nothing to loss or grad
    N = idx.numel()
    inv_n = 1.0 / max(N, 1)  # token mean: d(loss)/d(token loss) = 1/N, known before any chunk is seen
    fdtype = torch.promote_types(W_s.dtype, torch.float32)  # dtype of the softmax math (logits are in W's dtype)
    dev = student_hidden.device

    # The two (C, V) logits buffers are allocated once and refilled by every chunk (torch.mm(out=...)): fresh
    # buffers per chunk would cost the operating system's page faults on 2 x C x V new memory each time.
    C_max = min(chunk_size, N)
    buf_s = torch.empty(C_max, W_s.shape[0], dtype=mm_s.dtype, device=dev)  # (C, V)
    buf_t = torch.empty(C_max, W_t.shape[0], dtype=mm_t.dtype, device=dev) if N else None  # (C, V)

    def student_logits(h_rows):  # (C, H) -> (C, V) in the matmul dtype, in buf_s
        return torch.mm(h_rows.to(mm_s.dtype), mm_s.T, out=buf_s[:h_rows.shape[0]])

    def log_softmax(z, out):  # (R, V) model dtype -> (R, V) float log-probs in out, as logprobs() computes them
        if temperature != 1.0:
            return torch.log_softmax(z.to(fdtype) / temperature, dim=-1, out=out)
        return torch.log_softmax(z, dim=-1, dtype=fdtype, out=out)

    # (R, V) float work buffers, allocated once and reused by every row block: allocating and freeing them per
    # block makes the C library hand the memory back to the operating system and fault it in again each time.
    work_bufs = {}

    def work(name, R):
        if name not in work_bufs:
            work_bufs[name] = torch.empty(min(math_rows, N), W_s.shape[0], dtype=fdtype, device=dev)
        return work_bufs[name][:R]

    h_all = student_hidden.detach().reshape(B * T, H)  # (B*T, H) detached: we compute the gradient ourselves
    names = ["entropy/student", "entropy/teacher", "kl/teacher_student"]
    if method == "dasd":
        names += ["dasd/gate_mean", "dasd/frac_pushed", "loss/pull", "loss/push"]
    sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in names}  # running sums over tokens

    def add(name, values):
        sums[name] += values.double().sum()

    # Per-token constants of the loss pass: the weight a_t of each token's divergence in the loss, and which
    # divergence it uses. OPSD: a_t = 1/N for all. DASD: pull tokens (gate >= 0) a_t = gate/N on D_pull; push
    # tokens (gate < 0) a_t = -push_weight |gate| / N on min(D_push, margin). Sorting the tokens pull-first makes
    # each row block of the loss pass one kind only (the loss is a sum over tokens: any order gives the same).
    n_pull = N
    if method == "dasd":  # the router needs every entropy of a sequence first: one no-grad pass over the logits
        ent = torch.zeros(B * T, dtype=fdtype, device=dev)  # (B*T,)
        lse = torch.zeros(B * T, dtype=fdtype, device=dev)  # (B*T,) student log-sum-exp per token
        with torch.no_grad():
            for c0 in range(0, N, chunk_size):
                rows_c = idx[c0:c0 + chunk_size]
                z_s = student_logits(h_all[rows_c])  # (C, V)
                for r0 in range(0, rows_c.numel(), math_rows):
                    rows = rows_c[r0:r0 + math_rows]
                    R = rows.numel()
                    logp_s = log_softmax(z_s[r0:r0 + math_rows], work("logp_s", R))  # (R, V)
                    p_s = torch.exp(logp_s, out=work("p_s", R))  # (R, V)
                    ent[rows] = -_rowdot(p_s, logp_s, work("tmp", R))  # (R,)
                    # keep log-sum-exp(z/temp) = z/temp - log p_S, read off entry 0: the loss pass then gets
                    # log p_S = z/temp - lse in one subtraction instead of a second log_softmax
                    lse[rows] = z_s[r0:r0 + math_rows, 0].to(fdtype) / temperature - logp_s[:, 0]  # (R,)
                del logp_s, p_s
        gate_all = entropy_gate(ent.view(B, T), mask, push_fraction=push_fraction, soft=soft).reshape(-1)
        push = gate_all[idx] < 0  # (N,)
        order = torch.cat([idx[~push], idx[push]])  # (N,) pull tokens first, then push tokens
        n_pull = int((~push).sum())
        gate = gate_all[order].to(fdtype)  # (N,)
        ent = ent[order]  # (N,) reused for the entropy metric
        lse = lse[order]  # (N,)
        add("dasd/gate_mean", gate)
        add("dasd/frac_pushed", push.float())
        add("entropy/student", ent)
    else:
        order = idx

    h_s = h_all[order]  # (N, H) rows in loss-pass order
    h_t = teacher_hidden.detach().reshape(B * T, -1)[order]  # (N, H_t)
    need_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or W_s.requires_grad)
    want_h = need_grad and student_hidden.requires_grad
    want_W = need_grad and W_s.requires_grad
    grad_h = torch.zeros(N, H, dtype=fdtype, device=dev) if want_h else None  # (N, H)
    grad_W = _WeightGrad(W_s, mm_s.dtype) if want_W else None  # (V, H), accumulated over the chunks

    loss = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        for c0 in range(0, N, chunk_size):
            c1 = min(c0 + chunk_size, N)
            z_t = torch.mm(h_t[c0:c1].to(mm_t.dtype), mm_t.T, out=buf_t[:c1 - c0])  # (C, V) teacher logits
            z_s = student_logits(h_s[c0:c1])  # (C, V) student logits, model dtype
            # d(loss)/d(logits) / scale, (C, V) in the model dtype, is written over z_s row block by row block
            # (a block's logits are not needed once its log-probs exist): no third (C, V) buffer
            dz = z_s
            scale = torch.zeros(c1 - c0, dtype=fdtype, device=dev)  # (C,) per-row factor of dz
            for r0, r1 in _segments(c0, c1, math_rows, [n_pull]):
                rows = slice(r0 - c0, r1 - c0)  # rows of this chunk
                R = r1 - r0
                if method == "dasd":  # log p_S = z/temp - lse, with the lse of the entropy pass
                    z = z_s[rows] if temperature == 1.0 else z_s[rows].to(fdtype) / temperature
                    logp_s = torch.sub(z, lse[r0:r1, None], out=work("logp_s", R))  # (R, V) float
                else:
                    logp_s = log_softmax(z_s[rows], work("logp_s", R))  # (R, V)
                logp_t = log_softmax(z_t[rows], work("logp_t", R))  # (R, V) a constant
                p_s = torch.exp(logp_s, out=work("p_s", R))  # (R, V)
                p_t = torch.exp(logp_t, out=work("p_t", R))  # (R, V)
                tmp = work("tmp", R)  # (R, V)
                # logged metrics the loss below does not give for free (DASD has the entropies already)
                kl_free = beta == 0.0 and r0 < n_pull and topk is None  # from _divergence_and_w, full-vocab KL
                if method == "opsd":
                    add("entropy/student", -_rowdot(p_s, logp_s, tmp))
                neg_ent_t = _rowdot(p_t, logp_t, tmp)  # (R,) sum_v p_T log p_T
                add("entropy/teacher", -neg_ent_t)
                if not kl_free:
                    add("kl/teacher_student", neg_ent_t - _rowdot(p_t, logp_s, tmp))
                if topk is not None:
                    # From here on the loss's support is the teacher's top-k (the metrics above saw all V): the
                    # names now hold (R, K) tensors, each side's logits gathered and renormalized over the k
                    # entries, exactly as support_logprobs does for the plain path.
                    top = topk_support(z_t[rows], topk)  # (R, K)
                    logp_s = logprobs(z_s[rows].gather(-1, top), temperature)  # (R, K)
                    logp_t = logprobs(z_t[rows].gather(-1, top), temperature).to(fdtype)  # (R, K)
                    p_s, p_t, tmp = logp_s.exp(), logp_t.exp(), torch.empty_like(logp_s)  # (R, K) each
                if method == "opsd":
                    d, w, kl = _divergence_and_w(logp_s, logp_t, p_s, p_t, beta=beta, clip=clip, out=tmp)
                    a = torch.full_like(d, inv_n)  # (R,) d(loss)/d(D_t)
                    loss_t = d
                elif r0 < n_pull:  # DASD pull rows
                    g = gate[r0:r1]  # (R,) >= 0
                    d, w, kl = _divergence_and_w(logp_s, logp_t, p_s, p_t, beta=beta, clip=clip, out=tmp)
                    a = g * inv_n
                    loss_t = g * d
                    add("loss/pull", loss_t)
                else:  # DASD push rows: JSD, capped at the margin, with zero gradient past it
                    g = -gate[r0:r1]  # (R,) > 0
                    d, w, kl = _divergence_and_w(logp_s, logp_t, p_s, p_t, beta=0.5, clip=None, out=tmp)
                    push_t = push_weight * g * d.clamp(max=push_margin)  # (R,)
                    a = torch.where(d <= push_margin, -push_weight * g * inv_n, 0.0)  # flat past the margin
                    loss_t = -push_t
                    add("loss/push", push_t)
                if kl_free:
                    add("kl/teacher_student", kl)
                loss += loss_t.double().sum() * inv_n
                if need_grad:
                    # dL/dz = -(a / temperature) * (w - sum(w) p_S). The bracket is written straight into the
                    # model-dtype buffer (one pass); the per-row factor is applied to the (C, H) side of the
                    # matmuls below, which is V / H times smaller than scaling the (C, V) logits' gradient.
                    w = w.addcmul_(p_s, w.sum(-1, keepdim=True), value=-1.0)  # (R, V) or (R, K) w - sum(w) p_S
                    if topk is None:
                        dz[rows] = w  # over z_s's rows, cast to the model dtype
                    else:  # 0 off the support, the k entries scattered into place (K < V: a zeroed row first)
                        dz[rows] = 0
                        dz[rows].scatter_(-1, top, w.to(dz.dtype))
                    scale[rows] = -a / temperature  # (R,)
                del logp_s, logp_t, p_s, p_t, w, tmp
            if need_grad:
                if want_h:  # (C, H)   since z = h W^T:  dL/dh = dL/dz W = scale * (dz W)
                    grad_h[c0:c1] = (dz @ mm_s).to(fdtype) * scale[:, None]
                if want_W:  # (V, H)   dL/dW += dL/dz^T h = dz^T (scale * h), accumulated in W's dtype
                    grad_W.add(dz, (h_s[c0:c1].to(fdtype) * scale[:, None]).to(mm_s.dtype))

    loss = loss.to(fdtype)
    if need_grad:
        loss = _attach_grads(loss, student_hidden, W_s, order, grad_h, grad_W.result() if want_W else None)
    metrics = {k: (v * inv_n).float() for k, v in sums.items()}
    if method == "opsd":
        metrics["loss/div"] = loss.detach()
    return loss, metrics


def chunked_nll_loss(hidden, lm_head_weight, targets, mask, *, chunk_size=256, matmul_dtype=None):
    """SFT's loss, the token mean of -log p(y_t) under logits = hidden @ W.T, never holding more than chunk_size x V
    logits.

    hidden: (B, T, H) final hidden states at the positions predicting targets; lm_head_weight: (V, H); targets:
    (B, T) token ids; mask: (B, T). matmul_dtype as in chunked_distill_loss. Returns the loss (float32 for float32
    or bf16 weights); gradients reach hidden and lm_head_weight. The gradient of the logits is written by hand,
        dL/dz_t = (softmax(z_t) - onehot(y_t)) / N,
    the softmax taken in place of the log-probs the loss reads: two (C, V) buffers, allocated once, and a few
    passes over them per chunk instead of autograd's (B, T, V) graph.
    """
    B, T, H = hidden.shape
    W = lm_head_weight
    mm = _lm_head_for_matmuls(W, matmul_dtype)  # (V, H)
    fdtype = torch.promote_types(W.dtype, torch.float32)
    dev = hidden.device
    idx = mask.bool().reshape(-1).nonzero().squeeze(1)  # (N,) valid rows only
    N = idx.numel()
    inv_n = 1.0 / max(N, 1)
    h = hidden.detach().reshape(B * T, H)[idx]  # (N, H)
    y = targets.reshape(-1)[idx]  # (N,)
    want_h = torch.is_grad_enabled() and hidden.requires_grad
    want_W = torch.is_grad_enabled() and W.requires_grad
    grad_h = torch.empty(N, H, dtype=fdtype, device=dev) if want_h else None  # (N, H)
    grad_W = _WeightGrad(W, mm.dtype) if want_W else None  # (V, H), accumulated over the chunks
    C = min(chunk_size, N)
    z_buf = torch.empty(C, W.shape[0], dtype=mm.dtype, device=dev)  # (C, V) logits, then their gradient
    p_buf = torch.empty(C, W.shape[0], dtype=fdtype, device=dev)  # (C, V) log-probs, then probs
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        for c0 in range(0, N, chunk_size):
            c1 = min(c0 + chunk_size, N)
            rows = torch.arange(c1 - c0, device=dev)
            z = torch.mm(h[c0:c1].to(mm.dtype), mm.T, out=z_buf[:c1 - c0])  # (C, V)
            logp = torch.log_softmax(z, dim=-1, dtype=fdtype, out=p_buf[:c1 - c0])  # (C, V)
            loss -= logp[rows, y[c0:c1]].double().sum()
            if not (want_h or want_W):
                continue
            dz = logp.exp_()  # (C, V) softmax, in place
            dz[rows, y[c0:c1]] -= 1.0  # softmax - onehot; the 1/N is applied on the (C, H) side below
            if dz.dtype != mm.dtype:
                dz = z.copy_(dz)  # into the matmul dtype, over the logits (no longer needed)
            if want_h:  # (C, H)
                grad_h[c0:c1] = (dz @ mm).to(fdtype) * inv_n
            if want_W:  # (V, H) += dz^T (h / N)
                grad_W.add(dz, (h[c0:c1].to(fdtype) * inv_n).to(mm.dtype))
    loss = (loss * inv_n).to(fdtype)
    if not (want_h or want_W):
        return loss
    return _attach_grads(loss, hidden, W, idx, grad_h, grad_W.result() if want_W else None)


# ----------------------------------------------------------------------------------------------------------------

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

    Hd = 6
    h_s, h_t = torch.randn(B, T, Hd, requires_grad=True), torch.randn(B, T, Hd)
    W_s, W_t = torch.randn(V, Hd, requires_grad=True), torch.randn(V, Hd)
    plain, _ = dasd_loss(h_s @ W_s.T, h_t @ W_t.T, mask)
    g_plain = torch.autograd.grad(plain, (h_s, W_s))
    chunk, _ = chunked_distill_loss(h_s, W_s, h_t, W_t, mask, method="dasd", chunk_size=3)
    g_chunk = torch.autograd.grad(chunk, (h_s, W_s))
    print(f"\nchunked vs plain DASD: loss {chunk.item():.6f} vs {plain.item():.6f}, max grad diff "
          f"{max((a - b).abs().max().item() for a, b in zip(g_plain, g_chunk)):.2e}")
    plain, _ = dasd_loss(h_s @ W_s.T, h_t @ W_t.T, mask, topk=3)
    g_plain = torch.autograd.grad(plain, (h_s, W_s))
    chunk, _ = chunked_distill_loss(h_s, W_s, h_t, W_t, mask, method="dasd", chunk_size=3, topk=3)
    g_chunk = torch.autograd.grad(chunk, (h_s, W_s))
    print(f"the same with topk=3: loss {chunk.item():.6f} vs {plain.item():.6f}, max grad diff "
          f"{max((a - b).abs().max().item() for a, b in zip(g_plain, g_chunk)):.2e}")

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    print("\nGRPO advantages, G=3:", grpo_advantages(rewards, 3).round(decimals=3).tolist())
    y = zs.argmax(-1)
    adv, m = dasd_token_advantages(sampled_logprobs(zs, y), sampled_logprobs(zt, y), ent, mask,
                                   group_adv=torch.tensor([0.5, -0.5]))
    print("DASD token advantages (B, T):\n", adv.round(decimals=3))
