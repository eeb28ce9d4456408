"""losses.py against hand computations, brute-force loops, TRL's generalized JSD, and autograd gradient checks."""

import math
import os

import pytest
import torch

import losses
from losses import (dasd_loss, dasd_token_advantages, dasd_token_loss, divergence, entropy_gate, grpo_advantages,
                    opsd_loss, policy_gradient_loss, sampled_logprobs)

# ----------------------------------------------------------------------------------------------------------------
# Independent reference computations (python floats, loops)


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def gjsd(p_t, p_s, beta):
    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def softmax(row, temp=1.0):
    z = [x / temp for x in row]
    mx = max(z)
    e = [math.exp(x - mx) for x in z]
    return [x / sum(e) for x in e]


def brute_entropy(row):
    return -sum(p * math.log(p) for p in softmax(row) if p > 0)


def brute_gate(ent, mask, rho, soft):
    """Loop reference of the router: sort, count k = round(rho n), midpoint threshold, MAD scale."""
    B, T = len(ent), len(ent[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        vals = [ent[b][t] for t in range(T) if mask[b][t]]
        n = len(vals)
        if n == 0:
            continue
        desc = sorted(vals, reverse=True)
        k = min(int(math.floor(rho * n + 0.5)), n - 1)
        hi = desc[max(k - 1, 0)]
        lo = desc[min(k, n - 1)]
        tau = (hi + lo) / 2
        mean = sum(vals) / n
        s = sum(abs(v - mean) for v in vals) / n
        for t in range(T):
            if mask[b][t]:
                h = ent[b][t]
                sign = 1.0 if h <= tau else -1.0
                out[b][t] = math.tanh((tau - h) / s) if (soft and s > 0) else sign
    return out


def gjsd_terms(p_t, p_s, beta):
    """Per-entry summands of the generalized JSD (the clip caps each of them), loops over python floats."""
    if beta == 0:
        return [a * math.log(a / c) for a, c in zip(p_t, p_s)]
    if beta == 1:
        return [c * math.log(c / a) for a, c in zip(p_t, p_s)]
    m = [beta * a + (1 - beta) * c for a, c in zip(p_t, p_s)]
    return [beta * a * math.log(a / mm) + (1 - beta) * c * math.log(c / mm) for a, c, mm in zip(p_t, p_s, m)]


def brute_topk(zs_row, zt_row, k, temp=1.0):
    """Teacher's top-k by a hand sort, then both sides renormalized over those k with exp/log by hand."""
    V = len(zt_row)
    chosen = sorted(range(V), key=lambda v: zt_row[v], reverse=True)[:k]

    def renorm(row):
        z = [row[v] / temp for v in chosen]
        mx = max(z)
        log_norm = mx + math.log(sum(math.exp(x - mx) for x in z))
        return [math.exp(x - log_norm) for x in z]

    return renorm(zs_row), renorm(zt_row)  # p_S^k, p_T^k


def brute_topk_div(zs_row, zt_row, k, beta, clip=None, temp=1.0):
    p_s, p_t = brute_topk(zs_row, zt_row, k, temp)
    terms = gjsd_terms(p_t, p_s, beta)
    return sum(min(x, clip) if clip is not None else x for x in terms)


def assert_no_ties(zt, gap=1e-3):
    """The top-k selection must be unambiguous (and stable under finite differences): distinct teacher logits."""
    assert (zt.sort(-1).values.diff(dim=-1) > gap).all()


def logits_pair(B=2, T=5, V=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, T, V, generator=g, dtype=dtype) * torch.linspace(0.3, 3.0, T, dtype=dtype)[:, None]
    zt = zs + torch.randn(B, T, V, generator=g, dtype=dtype)
    return zs, zt


# ----------------------------------------------------------------------------------------------------------------
# divergence


def test_three_token_hand_computed():
    p_t, p_s = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]
    # forward KL by hand: 0.7 ln(7/4) + 0.2 ln(1/2) + 0.1 ln(1/2) = 0.7 ln 1.75 - 0.3 ln 2
    assert abs(kl(p_t, p_s) - (0.7 * math.log(1.75) - 0.3 * math.log(2))) < 1e-12
    zt, zs = torch.tensor(p_t, dtype=torch.float64).log(), torch.tensor(p_s, dtype=torch.float64).log()
    for beta in (0.0, 0.25, 0.5, 1.0):
        assert abs(divergence(zs, zt, beta=beta).item() - gjsd(p_t, p_s, beta)) < 1e-12
    # JSD at beta = 0.5 is symmetric and below log 2
    assert abs(divergence(zt, zs, beta=0.5).item() - divergence(zs, zt, beta=0.5).item()) < 1e-12
    assert divergence(zs, zt, beta=0.5).item() < math.log(2)


def test_clipped_top_entry_gets_a_gradient_away_from_the_teacher():
    """The per-entry clip drops a summand's gradient once it exceeds tau. On a 3-token vocabulary with the
    teacher sure of token 0 (p_T = 0.99, 0.005, 0.005) and the student less so (p_S = 0.8, 0.1, 0.1), token 0's
    summand 0.99 log(0.99 / 0.8) = 0.211 > 0.05 is clipped, and the gradient of the rest with respect to the
    student's logits is -p_T,u [u unclipped] + p_S,u P_T(unclipped), by hand: (+0.008, -0.004, -0.004). Its
    sign on token 0 is the opposite of the unclipped forward KL's (p_S - p_T = (-0.19, +0.095, +0.095)): a
    descent step lowers the student's probability of the token the teacher is sure of."""
    p_s = torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64)
    p_t = torch.tensor([0.99, 0.005, 0.005], dtype=torch.float64)
    clipped = [0.8 * 0.01, -0.005 + 0.1 * 0.01, -0.005 + 0.1 * 0.01]  # P_T(unclipped) = 0.01
    for clip, by_hand in ((0.05, clipped), (None, (p_s - p_t).tolist())):
        z = p_s.log().clone().requires_grad_(True)
        divergence(z, p_t.log(), clip=clip).backward()
        torch.testing.assert_close(z.grad, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert 0.99 * math.log(0.99 / 0.8) > 0.05  # token 0 is the clipped one


def test_per_entry_clip_brute_force():
    zs, zt = logits_pair(B=2, T=4, V=6, seed=3, dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0):
        for tau in (0.01, 0.05, 0.3):
            got = divergence(zs, zt, beta=beta, clip=tau, temperature=1.1)
            for b in range(2):
                for t in range(4):
                    p_s, p_t = softmax(zs[b, t].tolist(), 1.1), softmax(zt[b, t].tolist(), 1.1)
                    if beta == 0:
                        terms = [a * math.log(a / c) for a, c in zip(p_t, p_s)]
                    elif beta == 1:
                        terms = [c * math.log(c / a) for a, c in zip(p_t, p_s)]
                    else:
                        m = [beta * a + (1 - beta) * c for a, c in zip(p_t, p_s)]
                        terms = [beta * a * math.log(a / mm) + (1 - beta) * c * math.log(c / mm)
                                 for a, c, mm in zip(p_t, p_s, m)]
                    assert abs(got[b, t].item() - sum(min(x, tau) for x in terms)) < 1e-10


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_matches_trl_generalized_jsd(beta, temperature):
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:  # older TRL releases kept the trainer in trl.trainer
        from trl.trainer.gkd_trainer import GKDTrainer
    zs, zt = logits_pair(B=3, T=6, V=17, seed=4, dtype=torch.float64)
    ref = GKDTrainer.generalized_jsd_loss(zs, zt, beta=beta, temperature=temperature, reduction="none").sum(-1)
    got = divergence(zs, zt, beta=beta, temperature=temperature)
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_teacher_gets_no_gradient():
    zs, zt = logits_pair()
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    for beta in (0.0, 0.5, 1.0):
        divergence(zs, zt, beta=beta, clip=0.05).sum().backward()
    assert zt.grad is None and zs.grad is not None
    loss, _ = dasd_loss(zs, zt, torch.ones(2, 5))
    loss.backward()
    assert zt.grad is None


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradcheck_divergence(beta, clip):
    zs, zt = logits_pair(B=2, T=3, V=5, seed=5, dtype=torch.float64)
    zs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: divergence(x, zt, beta=beta, clip=clip, temperature=0.9), (zs,),
                                    fast_mode=True)


def test_neg_inf_logits():
    zs, zt = logits_pair(B=1, T=3, V=6, seed=6)
    dead = torch.tensor([False, True, False, False, True, False])
    zs[..., dead] = -math.inf
    zt[..., dead] = -math.inf
    zs.requires_grad_(True)
    for beta in (0.0, 0.5, 1.0):
        d = divergence(zs, zt, beta=beta, clip=0.05)
        ref = divergence(zs[..., ~dead], zt[..., ~dead], beta=beta, clip=0.05)  # same on the live entries only
        torch.testing.assert_close(d, ref)
        d.sum().backward()
        assert torch.isfinite(zs.grad).all()
    # teacher-only -inf: forward KL ignores entries where p_T = 0
    zs2, zt2 = logits_pair(B=1, T=3, V=6, seed=7)
    zt2[..., 0] = -math.inf
    assert torch.isfinite(divergence(zs2, zt2, beta=0.0)).all()
    loss, m = dasd_loss(zs.detach(), zt, torch.ones(1, 3))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())


def test_bf16_inputs_compute_in_float32():
    zs, zt = logits_pair(B=2, T=4, V=50, seed=8)
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    d = divergence(zs16, zt16, clip=0.05)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, divergence(zs16.float(), zt16.float(), clip=0.05))
    mask = torch.ones(2, 4)
    for fn in (opsd_loss, dasd_loss):
        loss16, _ = fn(zs16, zt16, mask)
        loss32, _ = fn(zs16.float(), zt16.float(), mask)
        assert loss16.dtype == torch.float32
        torch.testing.assert_close(loss16, loss32)


# ----------------------------------------------------------------------------------------------------------------
# OPSD reduction and edge cases


def test_opsd_loss_is_token_mean_over_valid_tokens():
    zs, zt = logits_pair(B=2, T=5, V=7, seed=9)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    zs[0, 3:] = float("nan")  # padding garbage must not leak into the loss
    loss, m = opsd_loss(zs, zt, mask, clip=0.05)
    d = divergence(zs, zt, clip=0.05)
    expected = sum(d[b, t].item() for b in range(2) for t in range(5) if mask[b, t]) / 8
    assert abs(loss.item() - expected) < 1e-6
    ent = [brute_entropy(zs[b, t].tolist()) for b in range(2) for t in range(5) if mask[b, t]]
    assert abs(m["entropy/student"].item() - sum(ent) / 8) < 1e-5
    ent_t = [brute_entropy(zt[b, t].tolist()) for b in range(2) for t in range(5) if mask[b, t]]
    assert abs(m["entropy/teacher"].item() - sum(ent_t) / 8) < 1e-5


def test_all_masked_and_one_valid_token():
    zs, zt = logits_pair(B=2, T=4, V=7, seed=10)
    zs.requires_grad_(True)
    none = torch.zeros(2, 4)
    for fn in (opsd_loss, dasd_loss):
        loss, m = fn(zs, zt, none)
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
        (g,) = torch.autograd.grad(loss, zs)
        assert (g == 0).all()
    one = torch.zeros(2, 4)
    one[1, 2] = 1
    loss, _ = opsd_loss(zs, zt, one, clip=None)
    assert abs(loss.item() - gjsd(softmax(zt[1, 2].tolist()), softmax(zs[1, 2].tolist()), 0)) < 1e-5
    # one token: the router has no spread, so it pulls (plain OPSD)
    loss_d, m = dasd_loss(zs, zt, one, clip=None)
    assert abs(loss_d.item() - loss.item()) < 1e-6 and m["dasd/gate_mean"].item() == 1.0


# ----------------------------------------------------------------------------------------------------------------
# DASD router


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("soft", [True, False])
def test_entropy_gate_brute_force(rho, soft):
    g = torch.Generator().manual_seed(11)
    ent = torch.rand(4, 13, generator=g) * 3
    mask = torch.ones(4, 13, dtype=torch.bool)
    mask[1, 9:] = False
    mask[2, 1:] = False  # one valid token
    mask[3, :] = False  # nothing valid
    gate = entropy_gate(ent, mask, push_fraction=rho, soft=soft)
    ref = torch.tensor(brute_gate(ent.tolist(), mask.tolist(), rho, soft))
    torch.testing.assert_close(gate, ref, atol=1e-6, rtol=1e-6)
    for b in range(4):
        n = int(mask[b].sum())
        k = min(math.floor(rho * n + 0.5), max(n - 1, 0))
        assert int((gate[b] < 0).sum()) == k  # exactly the top share is pushed (the calmest token never)
        assert (gate[b][~mask[b]] == 0).all()
    assert gate.abs().max() <= 1


def test_entropy_gate_uniform_entropies():
    ent = torch.full((2, 6), 1.25)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    gate = entropy_gate(ent, mask, push_fraction=0.2, soft=True)
    assert torch.isfinite(gate).all()
    assert (gate[mask.bool()] == 1).all()  # no spread: the sign fallback, ties are pulled


def test_gate_pushes_highest_entropy_tokens():
    ent = torch.tensor([[0.1, 2.0, 0.3, 1.5, 0.2, 0.25, 0.15, 0.05, 0.12, 0.22]])
    gate = entropy_gate(ent, torch.ones(1, 10), push_fraction=0.2, soft=False)
    assert gate[0].tolist() == [1, -1, 1, -1, 1, 1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------------------------------------------
# DASD KL form


def test_dasd_loss_matches_composition_of_parts():
    zs, zt = logits_pair(B=2, T=10, V=9, seed=12, dtype=torch.float64)
    mask = torch.ones(2, 10)
    mask[0, 7:] = 0
    for soft in (True, False):
        loss, m = dasd_loss(zs, zt, mask, push_fraction=0.3, soft=soft, clip=0.05, push_weight=0.7,
                            push_margin=0.08, temperature=1.2)
        ent = [[brute_entropy((zs[b, t] / 1.2).tolist()) for t in range(10)] for b in range(2)]
        gate = brute_gate(ent, mask.tolist(), 0.3, soft)
        pull_d = divergence(zs, zt, clip=0.05, temperature=1.2)
        push_d = divergence(zs, zt, beta=0.5, temperature=1.2)
        total, n, pushed = 0.0, 0, 0
        for b in range(2):
            for t in range(10):
                if mask[b, t]:
                    w = gate[b][t]
                    total += max(w, 0) * pull_d[b, t].item() - 0.7 * max(-w, 0) * min(push_d[b, t].item(), 0.08)
                    n += 1
                    pushed += w < 0
        assert abs(loss.item() - total / n) < 1e-9
        assert abs(m["dasd/frac_pushed"].item() - pushed / n) < 1e-6
        assert abs(m["loss/pull"].item() - m["loss/push"].item() - loss.item()) < 1e-6


def test_gradcheck_dasd_loss():
    zs, zt = logits_pair(B=2, T=6, V=5, seed=13, dtype=torch.float64)
    zs.requires_grad_(True)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    # The router is a constant by design (entropy detached), but finite differences would see the soft gate
    # move with the logits; so check the gradient of the per-token loss at the gate the router chose.
    ent = losses.entropy_from_logprobs(losses.logprobs(zs.detach()))
    gate = entropy_gate(ent, mask, push_fraction=0.4)
    assert (gate < 0).any() and (gate > 0).any()
    logp_t = losses.logprobs(zt)

    def f(x):
        # margin 1.0 > log 2: the push is never capped, so no kink inside the finite-difference step
        loss_t = dasd_token_loss(losses.logprobs(x), logp_t, gate, clip=0.05, push_margin=1.0)[0]
        return losses.masked_token_mean(loss_t, mask)

    assert torch.autograd.gradcheck(f, (zs,), fast_mode=True)
    # and dasd_loss's own gradient is that one
    (g,) = torch.autograd.grad(dasd_loss(zs, zt, mask, push_fraction=0.4, push_margin=1.0)[0], zs)
    (g_ref,) = torch.autograd.grad(f(zs), zs)
    torch.testing.assert_close(g, g_ref)


def test_push_is_bounded_and_flat_past_margin():
    V = 6
    zt = torch.zeros(1, 1, V, dtype=torch.float64)
    zt[..., 0] = 4.0
    logp_t = torch.log_softmax(zt, -1)
    gate = -torch.ones(1, 1, dtype=torch.float64)
    for scale, beyond in ((8.0, True), (0.3, False)):
        zs = zt.clone()
        zs[..., 1] += scale  # move the student's mode away from the teacher's
        zs.requires_grad_(True)
        loss_t, pull_t, push_t = dasd_token_loss(torch.log_softmax(zs, -1), logp_t, gate, clip=None,
                                                 push_weight=2.0, push_margin=0.1)
        jsd = gjsd(softmax(zt[0, 0].tolist()), softmax(zs[0, 0].tolist()), 0.5)
        (g,) = torch.autograd.grad(loss_t.sum(), zs)
        if beyond:
            assert jsd > 0.1
            assert loss_t.item() == pytest.approx(-2.0 * 0.1)  # exactly the floor
            assert (g == 0).all()  # push gradient vanishes past the margin
        else:
            assert jsd < 0.1
            assert loss_t.item() == pytest.approx(-2.0 * jsd)
            assert g.abs().max() > 0


def test_dasd_floor_under_optimization():
    """Minimize the DASD loss directly over the student logits: it never goes below -push_weight * margin."""
    zs, zt = logits_pair(B=2, T=10, V=8, seed=14)
    zs = zs.clone().requires_grad_(True)
    mask = torch.ones(2, 10)
    opt = torch.optim.Adam([zs], lr=0.5)
    push_weight, margin = 1.5, 0.1
    floor = -push_weight * margin
    lowest = float("inf")
    for _ in range(150):
        loss, m = dasd_loss(zs, zt, mask, push_fraction=0.6, soft=False, clip=None, push_weight=push_weight,
                            push_margin=margin)
        assert loss.item() >= floor - 1e-6
        assert m["loss/push"].item() <= push_weight * margin + 1e-6
        lowest = min(lowest, loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lowest < 0  # the optimizer did reach the pushing regime, and still stayed above the floor


# ----------------------------------------------------------------------------------------------------------------
# DASD token-advantage form, GRPO, policy gradient


def test_dasd_token_advantages_brute_force():
    g = torch.Generator().manual_seed(15)
    B, T = 3, 9
    logp_s = -torch.rand(B, T, generator=g) * 3
    logp_t = -torch.rand(B, T, generator=g) * 3
    ent = torch.rand(B, T, generator=g) * 2
    mask = torch.ones(B, T)
    mask[1, 6:] = 0
    group = torch.tensor([0.5, -1.0, 0.0])
    adv, m = dasd_token_advantages(logp_s, logp_t, ent, mask, push_fraction=0.2, soft=True, coef=0.8,
                                   group_adv=group)
    gate = brute_gate(ent.tolist(), mask.tolist(), 0.2, True)
    for b in range(B):
        ts = [t for t in range(T) if mask[b, t]]
        d = [logp_t[b, t].item() - logp_s[b, t].item() for t in ts]
        mu = sum(d) / len(d)
        sd = math.sqrt(sum((x - mu) ** 2 for x in d) / len(d))
        for t, dt in zip(ts, d):
            z = (dt - mu) / (sd + 1e-6)
            w = gate[b][t] / (1 + math.exp(-(abs(z) - 1)))
            assert abs(adv[b, t].item() - (group[b].item() + 0.8 * w * z)) < 1e-5
        for t in range(T):
            if not mask[b, t]:
                assert adv[b, t].item() == 0
    assert 0 < m["dasd/frac_pushed"].item() < 1
    adv2, _ = dasd_token_advantages(logp_s, logp_t, ent, mask, coef=0.8, group_adv=group[:, None].expand(B, T))
    torch.testing.assert_close(adv2, adv)  # a (B, T) group advantage is the same as its (B,) form


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = grpo_advantages(r, 4)
    for grp in range(2):
        x = r[grp * 4:(grp + 1) * 4].tolist()
        mu = sum(x) / 4
        sd = math.sqrt(sum((v - mu) ** 2 for v in x) / 4)
        for i in range(4):
            assert abs(adv[grp * 4 + i].item() - (x[i] - mu) / (sd + 1e-6)) < 1e-5
    assert (grpo_advantages(torch.tensor([1.0, 0.0]), 1) == 0).all()  # a group of one: no signal, no nan
    assert (grpo_advantages(torch.ones(3), 3) == 0).all()


def test_policy_gradient_equals_ratio_objective_on_policy():
    """On-policy, grad of -A * log p equals grad of the PPO ratio objective -A * exp(logp - logp_old) at ratio 1."""
    torch.manual_seed(16)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    adv = torch.randn(2)
    logp = sampled_logprobs(logits, y)
    ref = torch.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref)
    loss, _ = policy_gradient_loss(logp, adv, mask)
    (g1,) = torch.autograd.grad(loss, logits)
    logp2 = sampled_logprobs(logits, y)
    ratio = torch.exp(logp2 - logp2.detach())
    surrogate = -(adv[:, None] * ratio * mask).sum() / mask.sum()
    (g2,) = torch.autograd.grad(surrogate, logits)
    torch.testing.assert_close(g1, g2)
    expected = -sum(adv[b].item() * logp[b, t].item() for b in range(2) for t in range(5) if mask[b, t]) / 9
    assert abs(loss.item() - expected) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Top-k teacher support


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_topk_brute_force(k, beta, clip):
    B, T, V, temp = 2, 4, 5, 1.3
    zs, zt = logits_pair(B=B, T=T, V=V, seed=21, dtype=torch.float64)
    assert_no_ties(zt)
    mask = torch.ones(B, T)
    mask[1, 3] = 0
    zs[1, 3] = float("nan")  # padding garbage must not leak in through the top-k path either
    expected = {(b, t): brute_topk_div(zs[b, t].tolist(), zt[b, t].tolist(), k, beta, clip, temp)
                for b in range(B) for t in range(T) if mask[b, t]}
    d = divergence(zs, zt, beta=beta, clip=clip, temperature=temp, topk=k)
    for (b, t), ref in expected.items():
        assert abs(d[b, t].item() - ref) < 1e-12
    loss, m = opsd_loss(zs, zt, mask, beta=beta, clip=clip, temperature=temp, topk=k)
    assert abs(loss.item() - sum(expected.values()) / len(expected)) < 1e-12
    # the logged metrics stay full-vocabulary
    ent = [brute_entropy((zs[b, t] / temp).tolist()) for (b, t) in expected]
    full_kl = [kl(softmax(zt[b, t].tolist(), temp), softmax(zs[b, t].tolist(), temp)) for (b, t) in expected]
    assert abs(m["entropy/student"].item() - sum(ent) / len(ent)) < 1e-10
    assert abs(m["kl/teacher_student"].item() - sum(full_kl) / len(full_kl)) < 1e-10
    ent_t = [brute_entropy((zt[b, t] / temp).tolist()) for (b, t) in expected]
    assert abs(m["entropy/teacher"].item() - sum(ent_t) / len(ent_t)) < 1e-10


def test_topk_vocabulary_size_is_full_loss():
    zs, zt = logits_pair(B=2, T=6, V=7, seed=22, dtype=torch.float64)
    zs.requires_grad_(True)
    mask = torch.ones(2, 6)
    mask[0, 4:] = 0
    for fn, kw in ((opsd_loss, dict(beta=0.5, clip=0.05)), (dasd_loss, dict(push_fraction=0.3, push_margin=0.5))):
        full, m_full = fn(zs, zt, mask, temperature=1.2, **kw)
        (g_full,) = torch.autograd.grad(full, zs)
        assert full.abs().item() > 1e-3 and g_full.abs().max() > 1e-3  # a loss that is there to be matched
        for k in (7, 50):  # k = V: the same entries, reordered; k > V: all of them too
            loss, m = fn(zs, zt, mask, temperature=1.2, topk=k, **kw)
            (g,) = torch.autograd.grad(loss, zs)
            torch.testing.assert_close(loss, full, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(g, g_full, rtol=1e-10, atol=1e-14)
            for name in m_full:
                torch.testing.assert_close(m[name], m_full[name], rtol=1e-12, atol=1e-14)
        # and fewer entries is another loss
        assert abs(fn(zs, zt, mask, temperature=1.2, topk=3, **kw)[0].item() - full.item()) > 1e-4
    with pytest.raises(AssertionError):
        opsd_loss(zs, zt, mask, topk=0)  # None, not 0, is the full vocabulary



@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradcheck_topk(beta):
    zs, zt = logits_pair(B=2, T=6, V=7, seed=23, dtype=torch.float64)
    assert_no_ties(zt)  # the support is then the same under every finite-difference step
    zs.requires_grad_(True)
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    assert torch.autograd.gradcheck(
        lambda x: opsd_loss(x, zt, mask, beta=beta, clip=0.05, temperature=0.9, topk=3)[0], (zs,), fast_mode=True)
    # hard gate: piecewise constant in the logits, so finite differences see the same gate as the analytic
    # gradient (the soft gate moves with the logits, by design without a gradient); margin 1.0 > log 2: no cap
    kw = dict(push_fraction=0.4, soft=False, beta=beta, clip=0.05, push_margin=1.0, temperature=0.9, topk=3)
    m = dasd_loss(zs, zt, mask, **kw)[1]
    assert 0 < m["dasd/frac_pushed"].item() < 1  # both pull and push rows are checked
    assert torch.autograd.gradcheck(lambda x: dasd_loss(x, zt, mask, **kw)[0], (zs,), fast_mode=True)


@pytest.mark.parametrize("soft", [True, False])
def test_dasd_topk_gate_uses_full_vocabulary_entropy(soft):
    B, T, V, k, temp = 2, 10, 9, 3, 1.2
    zs, zt = logits_pair(B=B, T=T, V=V, seed=25, dtype=torch.float64)
    assert_no_ties(zt)
    mask = torch.ones(B, T)
    mask[0, 8:] = 0
    pw, margin = 0.7, 0.2
    loss, m = dasd_loss(zs, zt, mask, push_fraction=0.3, soft=soft, clip=0.05, push_weight=pw, push_margin=margin,
                        temperature=temp, topk=k)

    def expected(ent):
        gate = brute_gate(ent, mask.tolist(), 0.3, soft)
        total, n, pushed, gsum = 0.0, 0, 0, 0.0
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    w = gate[b][t]
                    pull = brute_topk_div(zs[b, t].tolist(), zt[b, t].tolist(), k, 0.0, 0.05, temp)
                    push = brute_topk_div(zs[b, t].tolist(), zt[b, t].tolist(), k, 0.5, None, temp)
                    total += max(w, 0) * pull - pw * max(-w, 0) * min(push, margin)
                    n, pushed, gsum = n + 1, pushed + (w < 0), gsum + w
        return total / n, pushed / n, gsum / n

    full_ent = [[brute_entropy((zs[b, t] / temp).tolist()) for t in range(T)] for b in range(B)]
    topk_ent = [[-sum(p * math.log(p) for p in brute_topk(zs[b, t].tolist(), zt[b, t].tolist(), k, temp)[0])
                 for t in range(T)] for b in range(B)]
    loss_ref, frac_ref, gate_ref = expected(full_ent)
    assert abs(loss.item() - loss_ref) < 1e-12
    assert abs(m["dasd/frac_pushed"].item() - frac_ref) < 1e-6
    assert abs(m["dasd/gate_mean"].item() - gate_ref) < 1e-6
    # the test can tell: a router reading the top-k renormalized entropy would give another loss
    assert abs(expected(topk_ent)[0] - loss_ref) > 1e-4


def test_modules_import_only_torch():
    # a function copied out of these files works in any trainer (chunked_loss.py needs losses.py beside it)
    import ast

    for mod, allowed in ((losses, {"math", "torch"}), (__import__("entropy"), {"math", "torch"}),
                         (__import__("chunked_loss"), {"math", "torch", "losses"})):
        tree = ast.parse(open(mod.__file__).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert names <= allowed, (mod.__name__, names)
