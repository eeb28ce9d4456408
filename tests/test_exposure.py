"""Tests for exposure.py: the reward by hand, the Beta sampler, the schedules, learning on a synthetic
student, the guard, and exact checkpoint resumption."""

import io
import math

import pytest
import torch

import exposure


# ---------------------------------------------------------------------------------------------
# the reward, by hand
# ---------------------------------------------------------------------------------------------


def test_discounted_progress_by_hand():
    # decreases 0.10, -0.05 (a rise: counts 0), 0.15 with weights 1, 0.9, 0.81
    assert exposure.discounted_progress([1.00, 0.90, 0.95, 0.80], 0.9) == pytest.approx(0.10 + 0.81 * 0.15)
    # gamma = 0.5, losses below zero (a push term can make the loss negative): only differences matter
    assert exposure.discounted_progress([-0.2, -0.5, -0.4, -0.9], 0.5) == pytest.approx(0.3 + 0.0 + 0.25 * 0.5)
    # a loss that only rises earns nothing, never a negative reward
    assert exposure.discounted_progress([0.1, 0.2, 0.3], 0.9) == 0.0
    # one loss: no step, no progress
    assert exposure.discounted_progress([0.7], 0.9) == 0.0


def test_guard_term_by_hand():
    # (1 * -1.0 + 0.9 * -0.5 + 0.81 * -0.2) / (1 + 0.9 + 0.81) = -1.612 / 2.71
    assert exposure.guard_term([-1.0, -0.5, -0.2], 0.9) == pytest.approx(-1.612 / 2.71)
    assert exposure.guard_term([-1.0, -0.5, -0.2], 1.0) == pytest.approx(-1.7 / 3)  # plain mean
    assert exposure.guard_term([-0.4], 0.3) == pytest.approx(-0.4)


def scripted(step):
    """Deterministic loss and answer log-prob for step `step` (rises and falls, some negative)."""
    loss = 1.0 - 0.05 * step + (0.08 if step % 3 == 0 else 0.0)
    g = -1.0 + 0.01 * step
    return loss, g


def hand_reward(t0, L, gamma, lambda_gt):
    """R for a decision at t0, computed from the script with explicit loops (independent of exposure.py)."""
    g_lp = 0.0
    for i in range(1, L + 1):
        drop = scripted(t0 + i - 1)[0] - scripted(t0 + i)[0]
        g_lp += gamma ** (i - 1) * (drop if drop > 0 else 0.0)
    num = sum(gamma ** (i - 1) * scripted(t0 + i)[1] for i in range(1, L + 1))
    den = sum(gamma ** (i - 1) for i in range(1, L + 1))
    return g_lp + lambda_gt * num / den


@pytest.mark.parametrize("hold,lookahead", [(4, 3), (2, 3), (3, 2)])
def test_controller_scores_decisions_and_drops_those_past_the_end(hold, lookahead):
    total, gamma, lam = 11, 0.8, 0.5
    ctrl = exposure.make_exposure("atesd", total_steps=total, hold=hold, lookahead=lookahead, gamma=gamma,
                                  lambda_gt=lam, batch_decisions=100)  # no update: keep every scored decision
    for t in range(total):
        ctrl.alpha_for_step(t)
        loss, g = scripted(t)
        ctrl.report(t, loss=loss, answer_logprob=g)
    starts = list(range(0, total, hold))
    complete = [t0 for t0 in starts if t0 + lookahead <= total - 1]  # windows that fit inside training
    assert len(complete) < len(starts)  # every case has a decision that cannot complete
    assert [d["R"] for d in ctrl.scored] == pytest.approx([hand_reward(t0, lookahead, gamma, lam) for t0 in complete])
    assert ctrl.counts == {"decisions": len(starts), "scored": len(complete),
                           "dropped": len(starts) - len(complete), "updates": 0}
    assert ctrl.pending == []  # nothing is left waiting to be scored on a short window


def test_missed_report_drops_the_decision_instead_of_scoring_a_gap():
    ctrl = exposure.make_exposure("atesd", total_steps=20, hold=4, lookahead=3, batch_decisions=100)
    for t in [0, 1, 3, 4, 5, 6, 7]:  # step 2 never reported
        ctrl.alpha_for_step(t)
        ctrl.report(t, loss=scripted(t)[0], answer_logprob=scripted(t)[1])
    assert ctrl.counts["dropped"] == 1 and ctrl.counts["scored"] == 1  # decision 0 dropped, decision 1 scored
    assert ctrl.scored[0]["R"] == pytest.approx(hand_reward(4, 3, 0.9, 0.1))


# ---------------------------------------------------------------------------------------------
# the Beta sampler and the policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (2.5, 4.0), (12.0, 3.0)])
def test_beta_sampler_matches_beta_moments(a, b):
    gen = torch.Generator().manual_seed(0)
    n = 4000
    xs = torch.tensor([exposure.sample_beta(a, b, gen) for _ in range(n)], dtype=torch.float64)
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(float(xs.mean()) - mean) < 5 * math.sqrt(var / n)
    # the variance of the sample variance is (mu4 - var^2) / n; mu4 <= var for data in [0, 1]
    assert abs(float(xs.var()) - var) < 5 * math.sqrt(var / n)
    assert 0.0 < float(xs.min()) and float(xs.max()) < 1.0


def test_sampler_is_reproducible_from_its_generator():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draws1 = [exposure.sample_beta(2.0, 3.0, g1) for _ in range(50)]
    assert draws1 == [exposure.sample_beta(2.0, 3.0, g2) for _ in range(50)]


def test_prior_is_the_same_symmetric_beta_in_every_state():
    ctrl = exposure.make_exposure("atesd", total_steps=100)
    for step in [0, 50, 99]:
        a, b = ctrl.policy(step)
        assert a == pytest.approx(1 + math.log(2)) and b == pytest.approx(1 + math.log(2))
    alpha = ctrl.alpha_for_step(0)
    m = ctrl.metrics()
    assert m["exposure/alpha"] == alpha and 0.05 <= alpha <= 1.0
    assert m["exposure/beta_mean"] == pytest.approx(0.5)
    assert m["exposure/beta_concentration"] == pytest.approx(2 * (1 + math.log(2)))


def test_entropy_hinge_alone():
    # all rewards equal -> advantages 0 -> the update is the entropy hinge only
    def run(entropy_target):
        ctrl = exposure.make_exposure("atesd", total_steps=100, hold=1, lookahead=1, batch_decisions=2,
                                      entropy_target=entropy_target, entropy_coef=0.5)
        before = {k: p.detach().clone() for k, p in ctrl.phi.items()}
        for t in range(3):  # decisions 0 and 1 complete at steps 1 and 2
            ctrl.alpha_for_step(t)
            ctrl.report(t, loss=1.0, answer_logprob=-1.0)
        changed = any(not torch.equal(before[k], p) for k, p in ctrl.phi.items())
        return ctrl.metrics()["exposure/controller_loss"], changed

    # differential entropy of Beta(c, c), c = 1 + ln 2, by numerical integration of -p log p
    c = 1 + math.log(2)
    log_norm = 2 * math.lgamma(c) - math.lgamma(2 * c)
    n = 200000
    ent = 0.0
    for i in range(n):
        x = (i + 0.5) / n
        logp = (c - 1) * (math.log(x) + math.log(1 - x)) - log_norm
        ent -= math.exp(logp) * logp / n
    loss, changed = run(entropy_target=-0.9)  # prior entropy is above the target: penalty active
    assert loss == pytest.approx(0.5 * (ent + 0.9), abs=1e-5) and changed
    loss, changed = run(entropy_target=0.0)  # below the target: no penalty, no gradient, no move
    assert loss == 0.0 and not changed


# ---------------------------------------------------------------------------------------------
# learning on a synthetic student
# ---------------------------------------------------------------------------------------------


def synthetic_run(ctrl, n_decisions, hold, best_alpha, answer_logprob, seed=100):
    """Drive `ctrl` on a toy student; return the controller's Beta mean at each decision.

    The student's clean loss falls by 0.01 * q(alpha) per step, q peaking at best_alpha(t); the
    observed distillation loss adds 0.3 * alpha (a teacher that sees more is harder to match, a
    level shift held constant within a hold) and Gaussian noise of 0.005 (half the best progress).
    """
    noise = torch.Generator().manual_seed(seed)
    clean = 2.0
    means = []
    for t in range(n_decisions * hold):
        alpha = ctrl.alpha_for_step(t)
        if t % hold == 0:
            means.append(ctrl.metrics()["exposure/beta_mean"])
        observed = clean + 0.3 * alpha + 0.005 * float(torch.randn((), generator=noise))
        g = answer_logprob(alpha) + 0.05 * float(torch.randn((), generator=noise))
        clean -= 0.01 * math.exp(-(((alpha - best_alpha(t)) / 0.25) ** 2))
        ctrl.report(t, loss=observed, answer_logprob=g, mismatch=0.3 * alpha, probe_nll=clean, confidence=0.5)
    return means


def test_controller_finds_the_best_exposure_and_follows_it_when_it_moves():
    # optimum 0.25 for 150 decisions, then 0.75 for 250 decisions; default hyperparameters, seed 0.
    # The answer log-prob does not depend on alpha here, so only learning progress matters.
    n1, n2, hold = 150, 250, 4
    ctrl = exposure.make_exposure("atesd", total_steps=(n1 + n2) * hold, seed=0)
    means = synthetic_run(ctrl, n1 + n2, hold, best_alpha=lambda t: 0.25 if t < n1 * hold else 0.75,
                          answer_logprob=lambda alpha: -1.0)
    phase1, phase2 = means[:n1], means[n1:]
    assert phase1[0] == pytest.approx(0.5)  # the prior
    first1 = next(i for i, m in enumerate(phase1) if abs(m - 0.25) < 0.1)
    assert first1 <= 40  # measured: 24 (controller seeds 0-4: 20-36)
    assert abs(sum(phase1[-25:]) / 25 - 0.25) < 0.1  # and it stays there
    first2 = next(i for i, m in enumerate(phase2) if abs(m - 0.75) < 0.1)
    assert first2 <= 160  # measured: 54 decisions after the move (seeds 0-4: 50-222)
    assert abs(sum(phase2[-25:]) / 25 - 0.75) < 0.1
    # with lookahead = hold - 1 even the last decision's window ends on the last step: all are scored
    assert ctrl.counts["scored"] == n1 + n2 and ctrl.counts["updates"] == (n1 + n2) // 4


@pytest.mark.parametrize("lambda_gt,low,high", [(0.0, 0.0, 0.15), (0.1, 0.8, 1.0)])
def test_guard_stops_the_collapse_to_no_exposure(lambda_gt, low, high):
    # Loss progress is fastest at alpha = 0, but the teacher's answer log-prob rises by 1 nat from
    # alpha = 0 to 1. Loss alone drives the policy into the alpha_min clip; the guard holds it up.
    n, hold = 150, 4
    ctrl = exposure.make_exposure("atesd", total_steps=n * hold, seed=0, lambda_gt=lambda_gt)
    means = synthetic_run(ctrl, n, hold, best_alpha=lambda t: 0.0, answer_logprob=lambda alpha: -1.5 + alpha)
    late = sum(means[-25:]) / 25
    assert low <= late <= high


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def drive(sched, steps):
    """Run `sched` over `steps` with reports that depend on the alphas; return alphas and snapshots."""
    alphas, snaps = [], []
    for t in steps:
        alpha = sched.alpha_for_step(t)
        alphas.append(alpha)
        loss = 2.0 - 0.03 * t + 0.2 * alpha + 0.05 * math.sin(3.0 * t)
        sched.report(t, loss=loss, answer_logprob=-1.0 + 0.5 * alpha, mismatch=0.1 * alpha,
                     probe_nll=1.5 - 0.01 * t, confidence=0.4 + 0.01 * t)
        snaps.append(({k: p.detach().clone() for k, p in sched.phi.items()}, sched.metrics()))
    return alphas, snaps


def through_disk(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("hold,lookahead,save_after", [(4, 3, 13), (2, 3, 12)])
def test_checkpoint_round_trip_is_exact(hold, lookahead, save_after):
    kw = dict(total_steps=60, hold=hold, lookahead=lookahead, batch_decisions=2, seed=3)
    steps_before, steps_after = range(save_after + 1), range(save_after + 1, save_after + 21)

    straight = exposure.make_exposure("atesd", **kw)
    drive(straight, steps_before)
    alphas_ref, snaps_ref = drive(straight, steps_after)

    first = exposure.make_exposure("atesd", **kw)
    drive(first, steps_before)
    assert (save_after + 1) % hold != 0  # saved mid-hold: the next step reuses the held alpha
    assert first.pending and first.pending[0]["losses"]  # and mid-lookahead
    sd_memory = first.state_dict()
    sd_disk = through_disk(first.state_dict())
    updates_at_save = first.counts["updates"]
    drive(first, steps_after)  # training on after state_dict() must not change the dict it returned

    for sd in (sd_memory, sd_disk):
        resumed = exposure.make_exposure("atesd", **{**kw, "seed": 99})  # another seed: all state from sd
        resumed.load_state_dict(sd)
        alphas, snaps = drive(resumed, steps_after)
        assert alphas == alphas_ref
        assert resumed.counts["updates"] >= updates_at_save + 3  # the 20 steps include several updates
        for (phi, m), (phi_ref, m_ref) in zip(snaps, snaps_ref):
            assert all(torch.equal(phi[k], phi_ref[k]) for k in phi)
            assert m == m_ref


def test_random_schedule_holds_and_resumes():
    sched = exposure.make_exposure("random", total_steps=40, hold=3, alpha_min=0.2, alpha_max=0.6, seed=1)
    alphas = [sched.alpha_for_step(t) for t in range(7)]
    assert alphas[0] == alphas[1] == alphas[2] != alphas[3] == alphas[4] == alphas[5] != alphas[6]
    assert all(0.2 <= a <= 0.6 for a in alphas)
    sd = through_disk(sched.state_dict())
    rest = [sched.alpha_for_step(t) for t in range(7, 30)]
    resumed = exposure.make_exposure("random", total_steps=40, hold=3, alpha_min=0.2, alpha_max=0.6, seed=5)
    resumed.load_state_dict(sd)
    assert [resumed.alpha_for_step(t) for t in range(7, 30)] == rest
    # uniform over [0.2, 0.6]: the draws spread over the range
    many = exposure.make_exposure("random", total_steps=3000, hold=1, alpha_min=0.2, alpha_max=0.6, seed=2)
    draws = torch.tensor([many.alpha_for_step(t) for t in range(3000)])
    assert abs(float(draws.mean()) - 0.4) < 0.01 and float(draws.min()) < 0.21 and float(draws.max()) > 0.59


def test_full_and_fixed_schedules():
    full = exposure.make_exposure("full", alpha=0.3, total_steps=10)
    fixed = exposure.make_exposure("fixed", alpha=0.3, total_steps=10)
    for t in range(10):
        assert full.alpha_for_step(t) == 1.0 and fixed.alpha_for_step(t) == 0.3
        full.report(t, loss=1.0, answer_logprob=-1.0)
    assert fixed.metrics() == {"exposure/alpha": 0.3}
    other = exposure.make_exposure("fixed", alpha=0.9, total_steps=10)
    other.load_state_dict(through_disk(fixed.state_dict()))
    assert other.alpha_for_step(0) == 0.3


def test_errors():
    with pytest.raises(ValueError):
        exposure.make_exposure("adaptive", total_steps=10)
    ctrl = exposure.make_exposure("atesd", total_steps=10, hold=4)
    with pytest.raises(ValueError):
        exposure.make_exposure("atesd", total_steps=10, hold=2).load_state_dict(ctrl.state_dict())
    with pytest.raises(ValueError):
        exposure.make_exposure("random", total_steps=10).load_state_dict(ctrl.state_dict())
