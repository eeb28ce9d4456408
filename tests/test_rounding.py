"""experiments/rounding.py: the update measured against the bf16 grid, and its sign-scrambled twin."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import rounding  # noqa: E402


def test_bf16_spacing_is_the_gap_to_the_next_bf16_value():
    w = torch.tensor([0.1, -0.1, 0.75, 1.0, 3e-3, -2.5e-7, 40.0])
    b = w.bfloat16().abs()
    gap = (b.view(torch.int16) + 1).view(torch.bfloat16).float() - b.float()  # one unit in bf16's last place, by bits
    assert torch.equal(rounding.bf16_spacing(w), gap)  # the spacing above |w| (at 1.0 too)


def test_update_stats_count_by_hand():
    start = {"a": torch.tensor([0.1, 0.1, 0.1, 1.0]), "n": torch.tensor([3])}
    spacing = float(rounding.bf16_spacing(torch.tensor(0.1)))  # 2**-11
    trained = {"a": torch.tensor([0.1, 0.1 + 1e-5, 0.1 + 0.75 * spacing, 1.0 - 1e-5]), "n": torch.tensor([3])}
    s = rounding.update_stats(start, trained)
    assert s["weights"] == 4 and s["moved"] == pytest.approx(3 / 4)
    # only the third crosses a rounding midpoint (0.1 sits inside its bf16 cell, 1e-5 << 2**-11 / 2)
    changed = int((trained["a"].bfloat16() != start["a"].bfloat16()).sum())
    assert s["bf16_changed"] == pytest.approx(changed / 4) and changed == 1
    d = trained["a"] - start["a"]
    assert s["update_rms"] == pytest.approx(float((d.double() ** 2).mean() ** 0.5), rel=1e-6)
    e = trained["a"].bfloat16().double() - start["a"].bfloat16().double()  # one whole spacing, on the third weight
    assert float(e[2]) == pytest.approx(spacing) and int((e != 0).sum()) == 1
    assert s["bf16_update_rms"] == pytest.approx(spacing / 2)  # sqrt(spacing**2 / 4)
    cos = float((d.double() @ e) / (d.double().norm() * e.norm()))
    assert s["cosine_bf16_update_vs_update"] == pytest.approx(cos, rel=1e-6) and 0 < cos < 1


def test_scramble_keeps_every_size_and_draws_signs():
    g = torch.Generator().manual_seed(1)
    start = {"w": torch.randn(200, 50, generator=g), "i": torch.tensor([7])}
    trained = {"w": start["w"] + 1e-3 * torch.randn(200, 50, generator=g), "i": torch.tensor([7])}
    out = rounding.scramble(start, trained, seed=0)
    d, e = trained["w"] - start["w"], out["w"] - start["w"]
    assert torch.allclose(e.abs(), d.abs(), atol=1e-7)
    agree = float((torch.sign(e) == torch.sign(d)).float().mean())
    assert 0.45 < agree < 0.55  # no direction left
    assert torch.equal(out["i"], trained["i"])
    assert torch.equal(rounding.scramble(start, trained, seed=0)["w"], out["w"])  # seeded
