"""MCR² measures in their small form against the n × n form computed independently."""

import pytest
import torch
from reference_pace import dense_coding_rate, dense_compression_rate

from pace.layers import coding_rate, compression_rate, rate_reduction

C, K = 24, 3


def _subspaces():
    return torch.linalg.qr(torch.randn(C, C, dtype=torch.float64)).Q


# 40 tokens: the C × C / p × p forms are the small ones; 5 tokens: the n × n forms are.
@pytest.mark.parametrize("n", [40, 5])
@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_coding_rate_matches_logdet_of_the_token_gram(n, eps):
    Z = torch.randn(3, n, C, dtype=torch.float64)
    torch.testing.assert_close(coding_rate(Z, eps), dense_coding_rate(Z, eps), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [40, 5])
def test_compression_rate_matches_per_subspace_logdets(n):
    Z, U = torch.randn(3, n, C, dtype=torch.float64), _subspaces()
    torch.testing.assert_close(
        compression_rate(Z, U, K, 0.5), dense_compression_rate(Z, U, K, 0.5), rtol=1e-10, atol=1e-10
    )


def test_rate_reduction_is_the_difference_and_float32_input_is_measured_in_float64():
    Z, U = torch.randn(2, 30, C), _subspaces().float()
    delta = rate_reduction(Z, U, K, 0.5)
    assert delta.dtype == torch.float64 and delta.shape == (2,)
    expected = dense_coding_rate(Z, 0.5) - dense_compression_rate(Z, U, K, 0.5)
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-6)


def test_rates_are_finite_for_rank_deficient_and_large_tokens():
    Z = torch.zeros(2, 50, C, dtype=torch.float64)
    Z[:, :, 0] = 1e4  # rank one, large scale
    assert torch.isfinite(coding_rate(Z, 0.01)).all()
    assert torch.isfinite(compression_rate(Z, _subspaces(), K, 0.01)).all()
    assert coding_rate(torch.zeros(1, 10, C), 0.5).item() == 0.0


def test_tokens_in_one_subspace_code_more_cheaply_than_spread_tokens():
    # Sanity of the geometry the layer relies on: the same energy spread over more directions costs more bits.
    U = _subspaces()
    inside = torch.randn(1, 60, C // K, dtype=torch.float64) @ U[:, : C // K].T  # (1, 60, C) in U_1
    spread = torch.randn(1, 60, C, dtype=torch.float64)
    spread = spread * (inside.norm() / spread.norm())  # same total energy
    assert coding_rate(inside, 0.5) < coding_rate(spread, 0.5)
    assert compression_rate(inside, U, K, 0.5) < compression_rate(spread, U, K, 0.5)
