"""The chunked path of losses.py: opsd_loss, dasd_loss and SFT's NLL on logits = hidden @ W.T, never all at once.

A speed and memory path beside the plain losses, not a different loss: for the same inputs it returns the same values
and gradients (tests/test_chunked_loss.py checks it against losses.py to 1e-12 in float64). Use it when the (B, T, V)
logits do not fit, or, on a CPU, because autograd's graph over them costs more than the model's own backward.

How (dims as in losses.py; C the chunk):
chunked_distill_loss computes each chunk's gradient during the forward pass (loss is a sum over tokens and
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

Run the check:
    python chunked_loss.py
"""

import math

import torch

from losses import dasd_loss, entropy_gate, logprobs, topk_support


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


def _teacher_lm_head_for_matmuls(W_t, W_s, mm_s, matmul_dtype):
    """The teacher's (V, H_t) matrix for the matmuls: W_t (detached), or its matmul_dtype copy; one copy in all
    (mm_s) for a teacher that shares the student's lm_head."""
    if matmul_dtype in (None, W_t.dtype):
        return W_t
    if W_t.data_ptr() == W_s.data_ptr() and W_t.shape == W_s.shape:
        return mm_s
    return W_t.to(matmul_dtype)


class _Workspace:
    """The lm_head matrices of one chunked_distill_loss call and the buffers its passes reuse.

    The two (C, V) logits buffers are allocated once and refilled by every chunk (torch.mm(out=...)): fresh buffers
    per chunk would cost the operating system's page faults on 2 x C x V new memory each time. The (R, V) float work
    buffers (R <= math_rows) are allocated once too and reused by every row block: allocating and freeing them per
    block makes the C library hand the memory back to the operating system and fault it in again each time.
    """

    def __init__(self, mm_s, mm_t, n_rows, *, chunk_size, math_rows, temperature, fdtype, device):
        self.mm_s, self.mm_t, self.n_rows = mm_s, mm_t, n_rows
        self.chunk_size, self.math_rows, self.temperature = chunk_size, math_rows, temperature
        self.fdtype, self.device = fdtype, device  # fdtype: the dtype of the softmax math
        C_max = min(chunk_size, n_rows)
        self.buf_s = torch.empty(C_max, mm_s.shape[0], dtype=mm_s.dtype, device=device)  # (C, V)
        self.buf_t = torch.empty(C_max, mm_t.shape[0], dtype=mm_t.dtype, device=device) if n_rows else None  # (C, V)
        self.work_bufs = {}  # name -> (math_rows, V) float buffer

    def student_logits(self, h_rows):  # (C, H) -> (C, V) in the matmul dtype, in buf_s
        return torch.mm(h_rows.to(self.mm_s.dtype), self.mm_s.T, out=self.buf_s[:h_rows.shape[0]])

    def teacher_logits(self, h_rows):  # (C, H_t) -> (C, V) in the teacher's matmul dtype, in buf_t
        return torch.mm(h_rows.to(self.mm_t.dtype), self.mm_t.T, out=self.buf_t[:h_rows.shape[0]])

    def log_softmax(self, z, out):  # (R, V) model dtype -> (R, V) float log-probs in out, as logprobs() computes them
        if self.temperature != 1.0:
            return torch.log_softmax(z.to(self.fdtype) / self.temperature, dim=-1, out=out)
        return torch.log_softmax(z, dim=-1, dtype=self.fdtype, out=out)

    def work(self, name, R):  # the first R rows of the work buffer `name`, (R, V) float
        if name not in self.work_bufs:
            self.work_bufs[name] = torch.empty(min(self.math_rows, self.n_rows), self.mm_s.shape[0],
                                               dtype=self.fdtype, device=self.device)
        return self.work_bufs[name][:R]


class _LossSettings:
    """The arguments of chunked_distill_loss that shape the loss of a row block (see chunked_distill_loss)."""

    def __init__(self, method, beta, clip, temperature, topk, pull_weight, push_weight, push_margin):
        self.method, self.beta, self.clip, self.temperature, self.topk = method, beta, clip, temperature, topk
        self.pull_weight, self.push_weight, self.push_margin = pull_weight, push_weight, push_margin


def _add(sums, name, values):
    """Adds the token values (R,) to the running float64 sum sums[name] of a logged metric."""
    sums[name] += values.double().sum()


def _student_entropy_and_lse(ws, h_all, idx):
    """DASD's no-grad pass over the student logits of the valid rows idx (N,) of h_all (B*T, H).

    Returns (entropy, lse), each (B*T,) float (0 at padding): the student's entropy per token, which the router
    needs for every token of a sequence before any loss is taken, and the log-sum-exp of z/temp, kept so that the
    loss pass gets log p_S = z/temp - lse with one subtraction instead of a second log_softmax.
    """
    ent = torch.zeros(h_all.shape[0], dtype=ws.fdtype, device=ws.device)  # (B*T,)
    lse = torch.zeros(h_all.shape[0], dtype=ws.fdtype, device=ws.device)  # (B*T,) student log-sum-exp per token
    with torch.no_grad():
        for c0 in range(0, idx.numel(), ws.chunk_size):
            rows_c = idx[c0:c0 + ws.chunk_size]
            z_s = ws.student_logits(h_all[rows_c])  # (C, V)
            for r0 in range(0, rows_c.numel(), ws.math_rows):
                rows = rows_c[r0:r0 + ws.math_rows]
                R = rows.numel()
                logp_s = ws.log_softmax(z_s[r0:r0 + ws.math_rows], ws.work("logp_s", R))  # (R, V)
                p_s = torch.exp(logp_s, out=ws.work("p_s", R))  # (R, V)
                ent[rows] = -_rowdot(p_s, logp_s, ws.work("tmp", R))  # (R,)
                # log-sum-exp(z/temp) = z/temp - log p_S, read off entry 0
                lse[rows] = z_s[r0:r0 + ws.math_rows, 0].to(ws.fdtype) / ws.temperature - logp_s[:, 0]  # (R,)
    return ent, lse


def _route_pull_first(ws, h_all, idx, mask, batch_shape, *, push_fraction, soft, sums):
    """DASD's router: the entropy gate of every valid token and the loss pass's token order, pull tokens first.

    h_all: (B*T, H) detached student hidden states; idx: (N,) valid rows; mask: (B, T); batch_shape: (B, T).
    Returns (order (N,) rows of h_all pull-first, n_pull, gate (N,) float in that order, lse (N,) in that order) and
    adds the gate, the fraction pushed and the student entropy to the metric sums.
    """
    ent, lse = _student_entropy_and_lse(ws, h_all, idx)  # (B*T,) each
    gate_all = entropy_gate(ent.view(batch_shape), mask, push_fraction=push_fraction, soft=soft).reshape(-1)
    push = gate_all[idx] < 0  # (N,)
    order = torch.cat([idx[~push], idx[push]])  # (N,) pull tokens first, then push tokens
    n_pull = int((~push).sum())
    gate = gate_all[order].to(ws.fdtype)  # (N,)
    _add(sums, "dasd/gate_mean", gate)
    _add(sums, "dasd/frac_pushed", push.float())
    _add(sums, "entropy/student", ent[order])
    return order, n_pull, gate, lse[order]


def _block_logprobs(ws, z_s, z_t, lse):
    """Both sides' float log-probs and probs of one row block's (R, V) logits, in the work buffers.

    lse: (R,) the student's log-sum-exp from DASD's router pass (log p_S = z/temp - lse), or None (a log_softmax).
    Returns (logp_s, logp_t, p_s, p_t, tmp), each (R, V); tmp a free work buffer.
    """
    R = z_s.shape[0]
    if lse is not None:
        z = z_s if ws.temperature == 1.0 else z_s.to(ws.fdtype) / ws.temperature
        logp_s = torch.sub(z, lse[:, None], out=ws.work("logp_s", R))  # (R, V) float
    else:
        logp_s = ws.log_softmax(z_s, ws.work("logp_s", R))  # (R, V)
    logp_t = ws.log_softmax(z_t, ws.work("logp_t", R))  # (R, V) a constant
    p_s = torch.exp(logp_s, out=ws.work("p_s", R))  # (R, V)
    p_t = torch.exp(logp_t, out=ws.work("p_t", R))  # (R, V)
    return logp_s, logp_t, p_s, p_t, ws.work("tmp", R)


def _block_metrics(sums, method, logp_s, logp_t, p_s, p_t, tmp, kl_free):
    """Adds the full-vocabulary metrics of a row block that the loss does not give for free (DASD has the student
    entropies already; kl_free: _divergence_and_w returns the unclipped KL). (R, V) x 5."""
    if method == "opsd":
        _add(sums, "entropy/student", -_rowdot(p_s, logp_s, tmp))
    neg_ent_t = _rowdot(p_t, logp_t, tmp)  # (R,) sum_v p_T log p_T
    _add(sums, "entropy/teacher", -neg_ent_t)
    if not kl_free:
        _add(sums, "kl/teacher_student", neg_ent_t - _rowdot(p_t, logp_s, tmp))


def _topk_logprobs(z_s, z_t, topk, temperature, fdtype):
    """The loss's support narrowed to the teacher's top-k: each side's (R, V) logits gathered and renormalized over
    the k entries, exactly as support_logprobs does for the plain path.

    Returns (top, logp_s, logp_t, p_s, p_t, tmp): top (R, K) long, the rest (R, K) float; tmp a free buffer.
    """
    top = topk_support(z_t, topk)  # (R, K)
    logp_s = logprobs(z_s.gather(-1, top), temperature)  # (R, K)
    logp_t = logprobs(z_t.gather(-1, top), temperature).to(fdtype)  # (R, K)
    return top, logp_s, logp_t, logp_s.exp(), logp_t.exp(), torch.empty_like(logp_s)


def _block_divergence(cfg, pull, logp_s, logp_t, p_s, p_t, tmp, gate, inv_n, sums):
    """One row block's per-token loss, with what its gradient needs; all rows of one kind.

    OPSD: loss_t = D_t, a_t = 1/N. DASD pull rows (pull, gate >= 0): loss_t = g D_t with g = pull_weight gate,
    a_t = g/N. DASD push rows (gate < 0): JSD, capped at the margin, with zero gradient past it:
    loss_t = -push_weight |gate| min(D_t, margin), a_t = -push_weight |gate| / N where D_t <= margin, else 0.
    logp_s, logp_t, p_s, p_t, tmp: (R, V) or (R, K); gate: (R,) or None (OPSD).
    Returns (loss_t (R,), a (R,) = d(loss)/d(D_t), w (R, V) or (R, K) as in _divergence_and_w, kl (R,) or None).
    """
    if cfg.method == "opsd":
        d, w, kl = _divergence_and_w(logp_s, logp_t, p_s, p_t, beta=cfg.beta, clip=cfg.clip, out=tmp)
        return d, torch.full_like(d, inv_n), w, kl
    if pull:
        g = cfg.pull_weight * gate  # (R,) >= 0
        d, w, kl = _divergence_and_w(logp_s, logp_t, p_s, p_t, beta=cfg.beta, clip=cfg.clip, out=tmp)
        loss_t = g * d
        _add(sums, "loss/pull", loss_t)
        return loss_t, g * inv_n, w, kl
    g = -gate  # (R,) > 0
    d, w, kl = _divergence_and_w(logp_s, logp_t, p_s, p_t, beta=0.5, clip=None, out=tmp)
    push_t = cfg.push_weight * g * d.clamp(max=cfg.push_margin)  # (R,)
    a = torch.where(d <= cfg.push_margin, -cfg.push_weight * g * inv_n, 0.0)  # flat past the margin
    _add(sums, "loss/push", push_t)
    return -push_t, a, w, kl


def _write_logit_grad(dz, scale, w, p_s, a, top, temperature):
    """dL/dz = -(a / temperature) * (w - sum(w) p_S) for one row block, as the bracket dz (R, V) and the per-row
    factor scale (R,).

    The bracket is written straight into the model-dtype dz (one pass); the per-row factor is applied later to the
    (C, H) side of the matmuls, which is V / H times smaller than scaling the (C, V) logits' gradient.
    With top (R, K) the bracket is 0 off the support and its k entries are scattered into a zeroed row.
    """
    w = w.addcmul_(p_s, w.sum(-1, keepdim=True), value=-1.0)  # (R, V) or (R, K) w - sum(w) p_S
    if top is None:
        dz.copy_(w)  # cast to the model dtype
    else:
        dz.zero_()
        dz.scatter_(-1, top, w.to(dz.dtype))
    scale.copy_(-a / temperature)  # (R,)


def _row_block(ws, cfg, z_s, z_t, dz, scale, *, pull, lse, gate, inv_n, sums, need_grad):
    """The loss of one block of R rows of a chunk, with its metrics and, if need_grad, its part of dL/dz.

    z_s, z_t: the block's (R, V) logits; dz, scale: the block's rows of the chunk's (C, V) logits gradient (over
    z_s's memory) and (C,) per-row factor; pull: the block holds pull rows (always for OPSD); lse, gate: (R,) from
    DASD's router, or None. Returns the block's float64 share of the loss, sum_t loss_t / N.
    """
    logp_s, logp_t, p_s, p_t, tmp = _block_logprobs(ws, z_s, z_t, lse)  # (R, V) each
    kl_free = cfg.beta == 0.0 and pull and cfg.topk is None  # from _divergence_and_w, full-vocab KL
    _block_metrics(sums, cfg.method, logp_s, logp_t, p_s, p_t, tmp, kl_free)
    top = None
    if cfg.topk is not None:  # from here on the loss's support is the teacher's top-k (the metrics saw all V)
        top, logp_s, logp_t, p_s, p_t, tmp = _topk_logprobs(z_s, z_t, cfg.topk, cfg.temperature, ws.fdtype)
    loss_t, a, w, kl = _block_divergence(cfg, pull, logp_s, logp_t, p_s, p_t, tmp, gate, inv_n, sums)
    if kl_free:
        _add(sums, "kl/teacher_student", kl)
    if need_grad:
        _write_logit_grad(dz, scale, w, p_s, a, top, cfg.temperature)
    return loss_t.double().sum() * inv_n


def _loss_pass(ws, cfg, h_s, h_t, *, n_pull, gate, lse, inv_n, sums, grad_h, grad_W):
    """The loss over the valid rows, chunk by chunk, each chunk's gradient computed as it goes.

    h_s: (N, H), h_t: (N, H_t) detached hidden states in loss-pass order (DASD: the first n_pull rows pull, the rest
    push); gate, lse: (N,) from DASD's router, or None. grad_h: (N, H) float buffer filled here, or None; grad_W:
    a _WeightGrad accumulated here, or None. Returns the float64 loss.
    """
    N = h_s.shape[0]
    need_grad = grad_h is not None or grad_W is not None
    loss = torch.zeros((), dtype=torch.float64, device=ws.device)
    with torch.no_grad():
        for c0 in range(0, N, ws.chunk_size):
            c1 = min(c0 + ws.chunk_size, N)
            z_t = ws.teacher_logits(h_t[c0:c1])  # (C, V) teacher logits
            z_s = ws.student_logits(h_s[c0:c1])  # (C, V) student logits, model dtype
            # d(loss)/d(logits) / scale, (C, V) in the model dtype, is written over z_s row block by row block
            # (a block's logits are not needed once its log-probs exist): no third (C, V) buffer
            dz = z_s
            scale = torch.zeros(c1 - c0, dtype=ws.fdtype, device=ws.device)  # (C,) per-row factor of dz
            for r0, r1 in _segments(c0, c1, ws.math_rows, [n_pull]):  # each block pull rows only or push rows only
                rows = slice(r0 - c0, r1 - c0)  # rows of this chunk
                loss += _row_block(ws, cfg, z_s[rows], z_t[rows], dz[rows], scale[rows], pull=r0 < n_pull,
                                   lse=None if lse is None else lse[r0:r1],
                                   gate=None if gate is None else gate[r0:r1], inv_n=inv_n, sums=sums,
                                   need_grad=need_grad)
            if grad_h is not None:  # (C, H)   since z = h W^T:  dL/dh = dL/dz W = scale * (dz W)
                grad_h[c0:c1] = (dz @ ws.mm_s).to(ws.fdtype) * scale[:, None]
            if grad_W is not None:  # (V, H)   dL/dW += dL/dz^T h = dz^T (scale * h), accumulated in W's dtype
                grad_W.add(dz, (h_s[c0:c1].to(ws.fdtype) * scale[:, None]).to(ws.mm_s.dtype))
    return loss


def chunked_distill_loss(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight, mask, *,
                         method="opsd", chunk_size=256, math_rows=16, beta=0.0, clip=0.05, temperature=1.0,
                         push_fraction=0.2, soft=True, push_weight=1.0, push_margin=0.1, topk=None,
                         matmul_dtype=None, pull_weight=1.0):
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

    The passes: _route_pull_first (DASD only: the router's entropies, gate and pull-first token order), then
    _loss_pass over the chunks, each chunk's rows math_rows at a time through _row_block.
    """
    assert method in ("opsd", "dasd")
    B, T, H = student_hidden.shape
    W_s, W_t = student_lm_head_weight, teacher_lm_head_weight.detach()  # teacher is a constant
    mm_s = _lm_head_for_matmuls(W_s, matmul_dtype)  # (V, H) the matrix the student's matmuls use
    mm_t = _teacher_lm_head_for_matmuls(W_t, W_s, mm_s, matmul_dtype)  # (V, H_t)
    idx = mask.bool().reshape(-1).nonzero().squeeze(1)  # (N,) padding rows are skipped: no loss, no gradient
    N = idx.numel()
    inv_n = 1.0 / max(N, 1)  # token mean: d(loss)/d(token loss) = 1/N, known before any chunk is seen
    fdtype = torch.promote_types(W_s.dtype, torch.float32)  # dtype of the softmax math (logits are in W's dtype)
    ws = _Workspace(mm_s, mm_t, N, chunk_size=chunk_size, math_rows=math_rows, temperature=temperature, fdtype=fdtype,
                    device=student_hidden.device)
    cfg = _LossSettings(method, beta, clip, temperature, topk, pull_weight, push_weight, push_margin)
    h_all = student_hidden.detach().reshape(B * T, H)  # (B*T, H) detached: we compute the gradient ourselves
    names = ["entropy/student", "entropy/teacher", "kl/teacher_student"]
    if method == "dasd":
        names += ["dasd/gate_mean", "dasd/frac_pushed", "loss/pull", "loss/push"]
    sums = {k: torch.zeros((), dtype=torch.float64, device=ws.device) for k in names}  # running sums over tokens

    # Per-token constants of the loss pass: the weight a_t of each token's divergence in the loss, and which
    # divergence it uses. OPSD: a_t = 1/N for all. DASD: pull tokens (gate >= 0) a_t = gate/N on D_pull; push
    # tokens (gate < 0) a_t = -push_weight |gate| / N on min(D_push, margin). Sorting the tokens pull-first makes
    # each row block of the loss pass one kind only (the loss is a sum over tokens: any order gives the same).
    # DASD's router needs every entropy of a sequence first: one no-grad pass over the logits.
    order, n_pull, gate, lse = idx, N, None, None
    if method == "dasd":
        order, n_pull, gate, lse = _route_pull_first(ws, h_all, idx, mask, (B, T), push_fraction=push_fraction,
                                                     soft=soft, sums=sums)

    h_s = h_all[order]  # (N, H) rows in loss-pass order
    h_t = teacher_hidden.detach().reshape(B * T, -1)[order]  # (N, H_t)
    need_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or W_s.requires_grad)
    want_h = need_grad and student_hidden.requires_grad
    want_W = need_grad and W_s.requires_grad
    grad_h = torch.zeros(N, H, dtype=fdtype, device=ws.device) if want_h else None  # (N, H)
    grad_W = _WeightGrad(W_s, mm_s.dtype) if want_W else None  # (V, H), accumulated over the chunks
    loss = _loss_pass(ws, cfg, h_s, h_t, n_pull=n_pull, gate=gate, lse=lse, inv_n=inv_n, sums=sums, grad_h=grad_h,
                      grad_W=grad_W)

    loss = loss.to(fdtype)
    if need_grad:
        loss = _attach_grads(loss, student_hidden, W_s, order, grad_h, grad_W.result() if want_W else None)
    metrics = {k: (v * inv_n).float() for k, v in sums.items()}
    if method == "opsd":
        metrics["loss/div"] = loss.detach()
    return loss, metrics


@torch.no_grad()
def student_confidence(s_out, targets, mask, temperature, lm_head_weight=None, rows_per_pass=256):
    """Token sums of the student's NLL of its own sampled tokens and of its top-1 probability (the ATESD controller's
    state features). s_out: (B,T,V) logits, or with lm_head_weight (V,H) the (B,T,H) hidden states, whose logits are
    made here; targets, mask: (B,T). The valid tokens go rows_per_pass at a time: an (R,V) softmax, never (B,T,V)."""
    tgt = targets.reshape(-1)  # (B*T,)
    flat = s_out.detach().reshape(-1, s_out.shape[-1])  # (B*T, V or H)
    rows = mask.bool().reshape(-1).nonzero().squeeze(1)  # (N,)
    nll = top1 = 0.0
    for r0 in range(0, rows.numel(), rows_per_pass):
        r = rows[r0:r0 + rows_per_pass]
        z = flat[r] if lm_head_weight is None else flat[r].to(lm_head_weight.dtype) @ lm_head_weight.T  # (R,V)
        logp = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)) / temperature, -1)  # (R,V)
        nll -= logp.gather(-1, tgt[r].unsqueeze(-1)).sum().item()
        top1 += logp.max(-1).values.exp().sum().item()
    return {"student/nll": nll, "student/confidence": top1}


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
    B, T, V = 2, 8, 11
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False  # second sequence is shorter
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

