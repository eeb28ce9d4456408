"""entropy.token_entropy against hand computations and brute-force loops."""

import math

import torch

from entropy import token_entropy


def brute_entropy(row, temperature=1.0):
    """-sum p log p with python floats, skipping -inf entries (p = 0)."""
    z = [float(x) / temperature for x in row if x != -math.inf]
    zmax = max(z)
    e = [math.exp(x - zmax) for x in z]
    s = sum(e)
    return -sum((x / s) * math.log(x / s) for x in e)


def test_uniform_is_log_v():
    for V in (1, 2, 7, 1000):
        assert abs(token_entropy(torch.zeros(V)).item() - math.log(V)) < 1e-5


def test_three_token_hand_computed():
    p = [0.5, 0.25, 0.25]
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # = 1.5 log 2
    got = token_entropy(torch.tensor(p).log()).item()
    assert abs(got - expected) < 1e-6
    assert abs(expected - 1.5 * math.log(2)) < 1e-12


def test_matches_brute_force_with_temperature_and_shape():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 9) * 3  # (B, T, V)
    for temp in (0.7, 1.0, 1.1):
        H = token_entropy(z, temperature=temp)
        assert H.shape == (2, 3)
        for b in range(2):
            for t in range(3):
                assert abs(H[b, t].item() - brute_entropy(z[b, t].tolist(), temp)) < 1e-5


def test_bf16_input_returns_float32():
    torch.manual_seed(1)
    z = (torch.randn(4, 50) * 2).bfloat16()
    H = token_entropy(z)
    assert H.dtype == torch.float32
    # the same as the float32 computation on the (exactly representable) upcast values
    torch.testing.assert_close(H, token_entropy(z.float()))


def test_float64_stays_float64():
    assert token_entropy(torch.randn(3, 5, dtype=torch.float64)).dtype == torch.float64


def test_neg_inf_logits_finite_value_and_gradient():
    z = torch.tensor([[2.0, -math.inf, 1.0, 0.0, -math.inf], [0.3, 0.1, -math.inf, -0.2, 5.0]], requires_grad=True)
    H = token_entropy(z)
    assert torch.isfinite(H).all()
    for b in range(2):
        assert abs(H[b].item() - brute_entropy(z[b].tolist())) < 1e-5
    H.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[z.detach() == -math.inf] == 0).all()


def test_gradcheck_float64():
    torch.manual_seed(2)
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: token_entropy(x, temperature=1.3), (z,), fast_mode=True)
