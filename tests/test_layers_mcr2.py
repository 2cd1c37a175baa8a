"""MCR² measures in their small form against the n × n form computed independently."""

import math

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


# Closed forms, independent of any log-determinant code: tokens built from known singular values s_j (random
# orthonormal factors), so logdet(I + c·ZᵀZ) = Σ_j log(1 + c·s_j²), with c = d/(n ε²) for R and p/(n ε²) for R_c.


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A rows × cols matrix with orthonormal columns (rows >= cols)."""
    return torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator)).Q


def _tokens_with_spectrum(n: int, width: int, singular: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n, width) tokens whose non-zero singular values are ``singular``."""
    m = singular.numel()
    return _orthonormal(n, m, generator) @ torch.diag(singular) @ _orthonormal(width, m, generator).T


@pytest.mark.parametrize("n", [40, 5])
@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_coding_rate_closed_form_for_known_spectra(n, eps):
    g = torch.Generator().manual_seed(n)
    m = min(n, C) - 1  # one direction left empty: rank-deficient on purpose
    singular = torch.linspace(0.3, 4.0, m, dtype=torch.float64)
    Z = _tokens_with_spectrum(n, C, singular, g)[None]
    expected = 0.5 * torch.log1p(C / (n * eps**2) * singular**2).sum()
    torch.testing.assert_close(coding_rate(Z, eps)[0], expected, rtol=1e-10, atol=1e-10)


def test_coding_rate_of_orthogonal_tokens_of_known_norms():
    # n orthogonal tokens (rows) of norms s_i: ZᵀZ has eigenvalues s_i², so R = ½ Σ_i log(1 + d/(n ε²) s_i²).
    n, eps = 6, 0.5
    norms = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 5.0], dtype=torch.float64)
    directions = _orthonormal(C, n, torch.Generator().manual_seed(1)).T  # (n, C), orthonormal rows
    Z = (norms[:, None] * directions)[None]
    expected = 0.5 * sum(math.log(1 + C / (n * eps**2) * s**2) for s in norms.tolist())
    assert coding_rate(Z, eps).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n", [40, 5])
def test_compression_rate_closed_form_for_tokens_built_per_subspace(n):
    # Z = Σ_k A_k U_kᵀ with U orthogonal, so U_kᵀ z = a_k exactly and R_c = ½ Σ_k Σ_j log(1 + p/(n ε²) s_kj²).
    g, eps, p = torch.Generator().manual_seed(2 + n), 0.5, C // K
    U = _orthonormal(C, C, g)
    spectra = [torch.linspace(0.5, 2.0 + k, min(n, p), dtype=torch.float64) for k in range(K)]
    spectra[1] = torch.zeros_like(spectra[1])  # an empty subspace contributes log 1 = 0
    Z = sum(_tokens_with_spectrum(n, p, s, g) @ U[:, k * p : (k + 1) * p].T for k, s in enumerate(spectra))
    expected = 0.5 * sum(torch.log1p(p / (n * eps**2) * s**2).sum() for s in spectra)
    torch.testing.assert_close(compression_rate(Z[None], U, K, eps)[0], expected, rtol=1e-10, atol=1e-10)


def test_rate_reduction_closed_form_for_orthogonal_token_factors():
    # With the token-side factors of the subspaces mutually orthogonal too (n >= d), the spectrum of Z is the
    # union of the per-subspace spectra: ΔR = ½ Σ_kj [log(1 + d/(n ε²) s_kj²) − log(1 + p/(n ε²) s_kj²)].
    n, eps, p = 40, 0.3, C // K
    g = torch.Generator().manual_seed(3)
    U, V = _orthonormal(C, C, g), _orthonormal(n, C, g)  # V: one orthonormal token factor per subspace column
    spectra = [torch.linspace(0.2, 1.0 + k, p, dtype=torch.float64) for k in range(K)]
    Z = sum(V[:, k * p : (k + 1) * p] @ torch.diag(s) @ U[:, k * p : (k + 1) * p].T for k, s in enumerate(spectra))
    singular = torch.cat(spectra)
    expected = 0.5 * (torch.log1p(C / (n * eps**2) * singular**2) - torch.log1p(p / (n * eps**2) * singular**2)).sum()
    torch.testing.assert_close(rate_reduction(Z[None], U, K, eps)[0], expected, rtol=1e-10, atol=1e-10)
