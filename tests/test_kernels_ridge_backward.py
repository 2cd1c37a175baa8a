"""pace.kernels.ridge_gradient_matrix and ridge_radial_diagonal: the ridge backward's c × c work, Triton (interpreted)
against float64."""

import random

import pytest
import torch
from kernels_helpers import build_for_hopper, run_interpreted

from pace.kernels import (
    ridge_gradient_matrix,
    ridge_gradient_matrix_reference,
    ridge_radial_diagonal,
    symmetric_gradient,
)
from pace.layers.basis import _ridge_factors, ridge_factors_backward, scaled_ridge_factors

SIZES = (5, 20, 32)  # below one 16-tile, the Compress ridge's r, the largest register tile
RADIAL_SIZES = (20, 40, 160)  # one row block; ragged row blocks; the Expand ridge's c_e
EPS = 0.01


def _inputs(c, gen):
    """W = YᵀQ̄, F_s, G and scales of the ridge step of sketches Y (float64) with a zero column (its scale clamped),
    columns of very different norms and nearly parallel columns (κ(G) in the hundreds)."""
    B, m = 3, 2 * c
    Y = torch.randn(B, m, c, generator=gen, dtype=torch.float64) * torch.logspace(-2, 2, c, dtype=torch.float64)
    Y[..., 2] = Y[..., 3] + 1e-2 * Y[..., 2] / Y[..., 2].norm()
    Y[..., 1] = 0
    scale, G, F_s = scaled_ridge_factors(Y, EPS)
    W = Y.mT @ torch.randn(B, m, c, generator=gen, dtype=torch.float64)
    return W, F_s, G, scale, EPS


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    inputs = {c: _inputs(c, gen) for c in SIZES}
    jobs = {}
    for c, (W, F_s, G, scale, eps) in inputs.items():
        for how in ("poison", "op"):
            jobs[f"{c}_{how}"] = ("ridge_grad", (W.float(), F_s.float(), G.float(), scale.float(), eps), how)
    for c in RADIAL_SIZES:
        W, F_s, G, scale, eps = inputs[f"radial_{c}"] = _inputs(c, gen)
        args = (W.float(), F_s.float(), G.float(), symmetric_gradient(W, F_s).float(), scale.float(), eps)
        H = symmetric_gradient(W, F_s, half=True).float()  # G_s = H + Hᵀ, summed by the kernel
        for how in ("poison", "op"):
            jobs[f"radial_{c}_{how}"] = ("radial", args, how)
            jobs[f"half_radial_{c}_{how}"] = ("radial", (*args[:3], H, *args[4:], {"half": True}), how)
    # The factor of the result the layers use (−½), through launcher and op, on a tile size and a row-kernel size.
    W, F_s, G, scale, eps = inputs[20]
    for how in ("poison", "op"):
        jobs[f"coef_20_{how}"] = ("ridge_grad", (W.float(), F_s.float(), G.float(), scale.float(), eps, -0.5), how)
        W, F_s, G, scale, eps = inputs["radial_160"]
        args = (W.float(), F_s.float(), G.float(), symmetric_gradient(W, F_s).float(), scale.float(), eps, -0.5)
        jobs[f"coef_radial_160_{how}"] = ("radial", args, how)
        W, F_s, G, scale, eps = inputs[20]
    return seed, inputs, run_interpreted(jobs, tmp_path_factory.mktemp("interp"))


@pytest.mark.parametrize("c", SIZES)
def test_kernel_matches_float64(interpreted, c):
    seed, inputs, out = interpreted
    args = inputs[c]
    # The reference on the fp32-rounded inputs in float64: the kernel's error is its fp32 arithmetic only.
    ref = ridge_gradient_matrix_reference(*(t.float().double() for t in args[:4]), EPS)
    for how in ("poison", "op"):
        got = out[f"{c}_{how}"]
        assert got.dtype == torch.float32 and not got.isnan().any()
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"seed {seed}: c = {c} via {how} off by {err:.1e}"


@pytest.mark.parametrize("c", RADIAL_SIZES)
def test_radial_kernel_matches_float64(interpreted, c):
    seed, inputs, out = interpreted
    W, F_s, G, scale, eps = (t.float().double() if torch.is_tensor(t) else t for t in inputs[f"radial_{c}"])
    G_s = symmetric_gradient(*(t.double() for t in inputs[f"radial_{c}"][:2])).float().double()
    ref = ridge_radial_diagonal(W, F_s, G, G_s, scale, eps)  # the float64 fallback on the kernel's inputs
    # The fallback split in two is the whole chain.
    whole = ridge_radial_diagonal(W, F_s, G, symmetric_gradient(W, F_s), scale, eps)
    torch.testing.assert_close(whole, ridge_gradient_matrix_reference(W, F_s, G, scale, eps), rtol=1e-12, atol=1e-12)
    for how in ("poison", "op"):
        got = out[f"radial_{c}_{how}"]
        assert got.dtype == torch.float32 and not got.isnan().any()
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, f"seed {seed}: c = {c} via {how} off by {err:.1e}"
        # G_s given as its half H (G_s = H + Hᵀ), the layers' way: the same Γ to fp32 rounding.
        half = out[f"half_radial_{c}_{how}"]
        assert not half.isnan().any()
        err = ((half.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, f"seed {seed}: c = {c}, H given, via {how} off by {err:.1e}"


def test_half_of_the_symmetric_gradient_sums_to_it():
    W, F_s, *_ = _inputs(40, torch.Generator().manual_seed(6))
    H = symmetric_gradient(W, F_s, half=True)
    torch.testing.assert_close(H + H.mT, symmetric_gradient(W, F_s), rtol=1e-12, atol=1e-12)
    W, F_s, G, scale, eps = _inputs(40, torch.Generator().manual_seed(7))
    H, G_s = symmetric_gradient(W, F_s, half=True), symmetric_gradient(W, F_s)
    torch.testing.assert_close(
        ridge_radial_diagonal(W, F_s, G, H, scale, eps, half=True), ridge_radial_diagonal(W, F_s, G, G_s, scale, eps)
    )


def test_kernels_scale_their_result_by_coef(interpreted):
    seed, _, out = interpreted
    for name in ("20", "radial_160"):
        for how in ("poison", "op"):
            unscaled, scaled = out[f"{name}_{how}"], out[f"coef_{name}_{how}"]
            # A factor of −½ is exact in binary floating point: the same arithmetic, then the factor.
            assert torch.equal(scaled, -0.5 * unscaled), f"seed {seed}: {name} via {how}"


def test_references_scale_their_result_by_coef():
    W, F_s, G, scale, eps = _inputs(20, torch.Generator().manual_seed(5))
    gamma = ridge_gradient_matrix_reference(W, F_s, G, scale, eps)
    assert torch.equal(ridge_gradient_matrix(W, F_s, G, scale, eps, coef=-0.5), -0.5 * gamma)
    G_s = symmetric_gradient(W, F_s)
    assert torch.equal(ridge_radial_diagonal(W, F_s, G, G_s, scale, eps, coef=-0.5), -0.5 * gamma)


def test_layer_backward_equals_autograd_through_the_ridge_step():
    """ridge_factors_backward (which takes the op for c ≤ 32) against autograd through Ŷ, Cholesky and the solve."""
    gen = torch.Generator().manual_seed(3)
    for c in (20, 40):  # the op, and the ATen sequence above the tile
        Y = torch.randn(4, 48, c, generator=gen, dtype=torch.float64, requires_grad=True)
        Z = torch.randn(4, 48, 48, generator=gen, dtype=torch.float64)
        Q = _ridge_factors(Y, EPS)[3]
        # A loss through the projector QQᵀ only, as every use of the basis in the layers (the formula's premise).
        (grad,) = torch.autograd.grad((Q @ Q.mT * Z).sum(), Y)
        Q_bar = (Z + Z.mT) @ Q.detach()
        scale, G, F_s = scaled_ridge_factors(Y.detach(), EPS)
        torch.testing.assert_close(ridge_factors_backward(Y.detach(), scale, G, F_s, EPS, Q_bar), grad)


def test_bad_shapes_name_the_problem():
    W = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="ridge_gradient_matrix: W"):
        ridge_gradient_matrix(W, W, W, torch.ones(2, 4, 1), EPS)
    with pytest.raises(ValueError, match="ridge_radial_diagonal: W"):
        ridge_radial_diagonal(W, W, W, W[:1], torch.ones(2, 1, 4), EPS)


@pytest.mark.parametrize(
    ("name", "constexprs", "warps"),
    [
        ("_ridge_gradient_kernel", {"FLOOR": 1e-12, "BC": 32}, 2),
        ("_radial_diagonal_kernel", {"FLOOR": 1e-12, "BR": 16, "BC": 256, "HALF": True}, 4),  # Expand, c = 160
    ],
)
def test_kernels_compile_for_hopper_without_a_gpu(name, constexprs, warps):
    assert len(build_for_hopper("_triton_ridge_bwd", name, constexprs, {}, warps)) > 1000
