"""ATESD's exposure controller (exposure.py) on a synthetic student, step by step: the reward on a hand example,
then the first decisions in detail (state, Beta, draw, reward, REINFORCE update), then the Beta mean following the
best exposure as it moves from 0.25 to 0.75. No model is involved.

    python experiments/exposure_demo.py
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exposure import discounted_progress, guard_term, make_exposure  # noqa: E402


def main():
    print("reward on a hand example, gamma = 0.9:")
    losses = [1.00, 0.90, 0.95, 0.80]  # the rise 0.90 -> 0.95 counts 0, not -0.05
    print(f"  losses {losses}: G_lp = 0.10 + 0.9 * 0 + 0.81 * 0.15 = {discounted_progress(losses, 0.9):.4f}")
    gts = [-1.0, -0.5, -0.2]
    print(f"  answer log-probs {gts}: G_gt = {guard_term(gts, 0.9):.4f}")

    # A synthetic student: its clean loss falls by 0.01 * exp(-((alpha - alpha*) / 0.25)^2) per step,
    # so progress is fastest at alpha* = 0.25 for the first 150 decisions, then at 0.75. The observed
    # distillation loss adds 0.3 * alpha (a teacher that sees more is harder to match; constant within
    # a hold, so it cancels in G_lp) and noise; the teacher's answer log-prob is flat here (-1 + noise).
    n1, n2 = 150, 250
    steps = 4 * (n1 + n2)
    ctrl = make_exposure("atesd", total_steps=steps, seed=0)
    noise = torch.Generator().manual_seed(100)
    clean = 2.0
    print("\nthe first decisions in detail (hold 4, lookahead 3, one update per 4 scored decisions):")
    for t in range(steps):
        best = 0.25 if t < 4 * n1 else 0.75
        alpha = ctrl.alpha_for_step(t)
        if t < 20 and t % 4 == 0:
            c = ctrl.current
            s = ", ".join(f"{x:+.2f}" for x in ctrl.features(t))
            print(f"  step {t:2d}: state [{s}]  Beta({c['a']:.3f}, {c['b']:.3f})  u = {c['u']:.3f}  alpha = {alpha:.3f}")
        observed = clean + 0.3 * alpha + 0.005 * float(torch.randn((), generator=noise))
        g = -1.0 + 0.05 * float(torch.randn((), generator=noise))
        clean -= 0.01 * math.exp(-(((alpha - best) / 0.25) ** 2))
        n_scored, n_updates = ctrl.counts["scored"], ctrl.counts["updates"]
        ctrl.report(t, loss=observed, answer_logprob=g, mismatch=0.3 * alpha, probe_nll=clean, confidence=0.5)
        m = ctrl.metrics()
        if t < 20 and ctrl.counts["scored"] > n_scored:
            print(f"  step {t:2d}: decision scored, G_lp = {m['exposure/reward_lp']:.4f}  "
                  f"G_gt = {m['exposure/reward_gt']:.4f}  R = {m['exposure/reward']:+.4f}")
        if t < 20 and ctrl.counts["updates"] > n_updates:
            print(f"  step {t:2d}: REINFORCE update, controller loss {m['exposure/controller_loss']:+.4f}")
        if t == 20:
            print("\n step  alpha*  alpha  Beta mean  concentration  entropy   reward  updates")
        if t % 80 == 79:
            print(f"{t:5d}  {best:.2f}   {alpha:.3f}    {m['exposure/beta_mean']:.3f}        "
                  f"{m['exposure/beta_concentration']:6.2f}     {m['exposure/policy_entropy']:+.3f}  "
                  f"{m['exposure/reward']:+.4f}  {int(m['exposure/updates']):4d}")


if __name__ == "__main__":
    main()
