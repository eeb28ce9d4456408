"""chunked_loss.py against the plain losses of losses.py: the same values, gradients and metrics (float64 to 1e-12),
in every dtype path, with and without the top-k support; chunked_nll_loss against cross-entropy."""

import pytest
import torch

from chunked_loss import chunked_distill_loss, chunked_nll_loss
from losses import dasd_loss, opsd_loss


def chunk_setup(dtype, B=2, T=7, H=6, V=13, seed=17):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, H, generator=g, dtype=dtype)
    h_t = torch.randn(B, T, H + 2, generator=g, dtype=dtype)  # the teacher may even have another width
    W_s = torch.randn(V, H, generator=g, dtype=dtype)
    W_t = torch.randn(V, H + 2, generator=g, dtype=dtype)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    return h_s, W_s, h_t, W_t, mask


def plain_and_chunked(method, dtype, chunk_size, math_rows=16, V=13, **kw):
    h_s, W_s, h_t, W_t, mask = chunk_setup(dtype, V=V)
    h_s.requires_grad_(True)
    W_s.requires_grad_(True)
    fn = opsd_loss if method == "opsd" else dasd_loss
    loss_p, m_p = fn(h_s @ W_s.T, h_t @ W_t.T, mask, **kw)
    g_p = torch.autograd.grad(loss_p, (h_s, W_s))
    loss_c, m_c = chunked_distill_loss(h_s, W_s, h_t, W_t, mask, method=method, chunk_size=chunk_size,
                                       math_rows=math_rows, **kw)
    g_c = torch.autograd.grad(loss_c, (h_s, W_s))
    return (loss_p, m_p, g_p), (loss_c, m_c, g_c)


def assert_same_loss_grads_metrics(plain, chunked):
    """float64: the chunked loss and gradients equal the plain path's to rounding, the metrics to 1e-5."""
    (lp, mp, gp), (lc, mc, gc) = plain, chunked
    torch.testing.assert_close(lc, lp, rtol=1e-12, atol=1e-12)
    for a, b in zip(gc, gp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert set(mc) == set(mp)
    for name in mp:
        torch.testing.assert_close(mc[name].double(), mp[name].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["opsd", "dasd"])
@pytest.mark.parametrize("chunk_size,math_rows", [(1, 1), (3, 2), (4, 16), (64, 5)])
def test_chunked_equals_plain_float64(method, chunk_size, math_rows):
    kw = dict(beta=0.0, clip=0.05, temperature=1.1)
    if method == "dasd":
        kw.update(push_fraction=0.3, soft=True, push_weight=0.8, push_margin=0.1)
    assert_same_loss_grads_metrics(*plain_and_chunked(method, torch.float64, chunk_size, math_rows, **kw))


@pytest.mark.parametrize("method", ["opsd", "dasd"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_chunked_equals_plain_float64_clipped_jsd_and_reverse(method, beta):
    # the chunked path writes each branch's gradient by hand: check the clipped JSD / reverse KL ones too
    kw = dict(beta=beta, clip=0.02, temperature=0.9)
    (lp, mp, gp), (lc, mc, gc) = plain_and_chunked(method, torch.float64, 3, 2, **kw)
    torch.testing.assert_close(lc, lp, rtol=1e-12, atol=1e-12)
    for a, b in zip(gc, gp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for k in mp:
        torch.testing.assert_close(mc[k].double(), mp[k].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["opsd", "dasd"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_equals_plain_float32(method, beta):
    (lp, _, gp), (lc, _, gc) = plain_and_chunked(method, torch.float32, 4, 3, beta=beta, clip=None)
    torch.testing.assert_close(lc, lp, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, gp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_bf16_close_to_plain():
    (lp, _, gp), (lc, _, gc) = plain_and_chunked("dasd", torch.bfloat16, 4)
    assert lc.dtype == torch.float32
    torch.testing.assert_close(lc, lp, rtol=1e-3, atol=1e-4)
    for a, b in zip(gc, gp):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_chunked_all_masked_and_backward_through_graph():
    h_s, W_s, h_t, W_t, _ = chunk_setup(torch.float32)
    h_s.requires_grad_(True)
    W_s.requires_grad_(True)
    for method in ("opsd", "dasd"):
        loss, m = chunked_distill_loss(h_s, W_s, h_t, W_t, torch.zeros(2, 7), method=method)
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
        g = torch.autograd.grad(loss, (h_s, W_s))
        assert all((x == 0).all() for x in g)
    # upstream gradients other than 1 (a loss weight) and an upstream graph (hidden from a layer) work
    x = torch.randn(2, 7, 6, requires_grad=True)
    lin = torch.nn.Linear(6, 6, dtype=torch.float64)
    mask = torch.ones(2, 7)
    hs = lin(x.double())
    loss_c, _ = chunked_distill_loss(hs, W_s.double(), h_t.double(), W_t.double(), mask, method="dasd")
    (3.0 * loss_c).backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = None
    lin.zero_grad()
    loss_p, _ = dasd_loss(lin(x.double()) @ W_s.double().T, h_t.double() @ W_t.double().T, mask)
    (3.0 * loss_p).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, lin.weight.grad)


def test_chunked_float32_hidden_with_bf16_weights():
    h_s, W_s, h_t, W_t, mask = chunk_setup(torch.float32)
    h_s.requires_grad_(True)
    W16 = W_s.bfloat16().requires_grad_(True)
    loss, _ = chunked_distill_loss(h_s, W16, h_t, W_t.bfloat16(), mask, method="dasd")
    loss.backward()
    assert h_s.grad.dtype == torch.float32 and W16.grad.dtype == torch.bfloat16
    ref, _ = dasd_loss(h_s.detach().bfloat16() @ W16.detach().T, h_t.bfloat16() @ W_t.bfloat16().T, mask)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["opsd", "dasd"])
def test_chunked_bf16_matmuls_over_float32_weights(method):
    # train.py --dtype bfloat16 keeps fp32 master weights and asks for bf16 lm_head matmuls (matmul_dtype).
    h_s, W_s, h_t, W_t, mask = chunk_setup(torch.float32, T=9, H=16, V=200)
    # 1. One chunk: exactly the path of weights stored in bf16 (same bf16 operands, same matmuls), with the
    #    gradients returned in the weights' own dtype, float32.
    W_s.requires_grad_(True)
    loss_a, m_a = chunked_distill_loss(h_s, W_s, h_t, W_t, mask, method=method, chunk_size=64,
                                       matmul_dtype=torch.bfloat16)
    (gW_a,) = torch.autograd.grad(loss_a, (W_s,))
    W16 = W_s.detach().bfloat16().requires_grad_(True)
    loss_b, m_b = chunked_distill_loss(h_s, W16, h_t, W_t.bfloat16(), mask, method=method, chunk_size=64)
    (gW_b,) = torch.autograd.grad(loss_b, (W16,))
    assert gW_a.dtype == torch.float32
    assert loss_a.item() == loss_b.item()
    assert torch.equal(gW_a, gW_b.float())
    # 2. Many chunks, a teacher that shares the student's lm_head (a live teacher): close to the plain loss on
    #    the logits autocast gives (what train.py computes with --chunk_size 0), and away from the float32 result
    #    by no more than bf16 rounding.
    h_t = torch.randn(h_s.shape, generator=torch.Generator().manual_seed(3))
    h_s.requires_grad_(True)
    loss_c, _ = chunked_distill_loss(h_s, W_s, h_t, W_s, mask, method=method, chunk_size=4, math_rows=3,
                                     matmul_dtype=torch.bfloat16)
    g_c = torch.autograd.grad(loss_c, (h_s, W_s))
    fn = opsd_loss if method == "opsd" else dasd_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_s = torch.nn.functional.linear(h_s, W_s)
        z_t = torch.nn.functional.linear(h_t, W_s.detach())
    assert z_s.dtype == torch.bfloat16
    loss_p, _ = fn(z_s, z_t, mask)
    g_p = torch.autograd.grad(loss_p, (h_s, W_s))
    torch.testing.assert_close(loss_c, loss_p, rtol=2e-3, atol=1e-4)
    for a, b in zip(g_c, g_p):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 3e-2 * b.norm()


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_nll_equals_cross_entropy_float64(chunk_size):
    # SFT's chunked loss against torch's cross_entropy on the full logits (padding rows left out), with the
    # gradients of both inputs from autograd through cross_entropy
    h, W, _, _, mask = chunk_setup(torch.float64, V=29)
    tgt = torch.randint(0, 29, mask.shape, generator=torch.Generator().manual_seed(5))
    h.requires_grad_(True)
    W.requires_grad_(True)
    keep = mask.bool()
    ref = torch.nn.functional.cross_entropy((h @ W.T)[keep], tgt[keep], reduction="sum") / keep.sum()
    g_ref = torch.autograd.grad(ref, (h, W))
    loss = chunked_nll_loss(h, W, tgt, mask, chunk_size=chunk_size)
    g = torch.autograd.grad(loss, (h, W))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (g[0][~keep] == 0).all()  # padding rows get no gradient
    # no gradient wanted, or no valid token: a plain value, and zero gradients
    with torch.no_grad():
        torch.testing.assert_close(chunked_nll_loss(h, W, tgt, mask, chunk_size=chunk_size), ref.detach())
    empty = chunked_nll_loss(h, W, tgt, torch.zeros_like(mask), chunk_size=chunk_size)
    assert empty.item() == 0.0 and all((x == 0).all() for x in torch.autograd.grad(empty, (h, W)))


def test_chunked_nll_bf16_matmuls_close_to_autocast():
    # train.py --method sft --dtype bfloat16: the chunked loss with bf16 lm_head matmuls against the plain path
    # (autocast logits, float32 log-softmax), gradients in the fp32 weights' dtype
    h, W, _, _, mask = chunk_setup(torch.float32, T=9, H=16, V=200)
    tgt = torch.randint(0, 200, mask.shape, generator=torch.Generator().manual_seed(6))
    h.requires_grad_(True)
    W.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.nn.functional.linear(h, W)
    logp = torch.log_softmax(z.float(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    ref = -(logp * mask).sum() / mask.sum()
    g_ref = torch.autograd.grad(ref, (h, W))
    loss = chunked_nll_loss(h, W, tgt, mask, chunk_size=4, matmul_dtype=torch.bfloat16)
    g = torch.autograd.grad(loss, (h, W))
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=1e-4)
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.float32 and (a - b).norm() <= 3e-2 * b.norm()


@pytest.mark.parametrize("method", ["opsd", "dasd"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_chunked_topk_equals_plain_float64(method, k):
    for beta in (0.0, 0.5, 1.0):
        kw = dict(beta=beta, clip=0.05, temperature=1.1, topk=k)
        if method == "dasd":
            kw.update(push_fraction=0.3, soft=True, push_weight=0.8, push_margin=0.3)
        assert_same_loss_grads_metrics(*plain_and_chunked(method, torch.float64, 3, 2, V=6, **kw))
    # the top-k path is really taken: the gradient of a student logit off the support is 0 (all of it for k = 1,
    # where both sides are the same one-entry distribution)
    h_s, W_s, h_t, W_t, mask = chunk_setup(torch.float64, V=6)
    z_s = (h_s @ W_s.T).requires_grad_(True)
    fn = opsd_loss if method == "opsd" else dasd_loss
    (g,) = torch.autograd.grad(fn(z_s, h_t @ W_t.T, mask, topk=k)[0], z_s)
    assert ((g != 0).sum(-1) <= k).all() and bool((g != 0).any()) == (k > 1)
