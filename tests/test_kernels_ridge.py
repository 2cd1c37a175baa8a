"""pace.kernels: the Triton ridge kernels under the interpreter against float64, their PyTorch fallbacks, backward
formulas, backend choice and torch.compile."""

import math
import random

import pytest
import torch
from kernels_helpers import build_for_hopper, ridge_gram, run_interpreted, spd_with_condition

from pace.kernels import (
    _dispatch,
    compress_memberships,
    compress_memberships_reference,
    inverse_cholesky_factor,
    inverse_cholesky_factor_reference,
    normalized_gram,
    normalized_gram_reference,
    use_backend,
)
from pace.layers.basis import ridge_basis

EPS = 0.01
FACTOR_SIZES = (1, 5, 16, 20, 33, 80)  # one register tile up to 32, blocked 32 × 32 tiles above (33: a 1-row tail)
TILED_SIZES = (20, 33, 80)  # the same with 16 × 16 tiles: 2, 3 and 5 tiles a side
KAPPAS = (1e2, 1e3, 1.3e4)
GRAM_SHAPES = ((2, 50, 5), (2, 130, 20), (2, 40, 33))  # (B, m, c); m = 130 crosses the 64-row chunks
MEMBERSHIP_SHAPES = {"memb_small": (2, 11, 3, 6), "memb_s": (1, 20, 8, 48)}  # (B, N, K, p): ragged; the S model's


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-matrix relative Frobenius error (NaN propagates, so comparisons with it fail)."""
    return (a.double() - b.double()).norm(dim=(-2, -1)) / b.double().norm(dim=(-2, -1))


def _worst(err: torch.Tensor) -> float:
    value = err.max().item()
    assert math.isfinite(value), f"non-finite error {value}"
    return value


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs drawn with a fresh seed, and the interpreter's outputs for them (one subprocess for the module)."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    cases, inputs = {}, {}
    for c in FACTOR_SIZES:
        G = ridge_gram(3, c + 8, c, EPS, gen)
        inputs[f"ridge{c}"] = G
        cases[f"ridge{c}"] = ("factor", (G.float(),), "poison")
        if c in TILED_SIZES:
            cases[f"ridge{c}_tile16"] = ("factor", (G.float(),), "tile16")
    for c in (20, 40):
        for kappa in KAPPAS:
            G = spd_with_condition(2, c, kappa, gen)
            inputs[f"kappa{c}_{kappa:g}"] = G
            cases[f"kappa{c}_{kappa:g}"] = ("factor", (G.float(),), "poison")
        G = ridge_gram(2, c + 8, c, EPS, gen)
        G[1, c // 2, c // 3] = float("nan")
        cases[f"nan{c}"] = ("factor", (G.float(),), "poison")
    G = ridge_gram(2, 30, 24, EPS, gen)
    inputs["op_factor"] = G
    cases["op_factor"] = ("factor", (G.float(),), "op")
    for c in (20, 80):  # D⁻¹F: one register tile, and 3 × 3 blocked tiles (the scaling pass after the inversion)
        G, scale = ridge_gram(2, c + 8, c, EPS, gen), 0.5 + torch.rand(2, c, generator=gen, dtype=torch.float64)
        inputs[f"scaled{c}"] = (G, scale)
        cases[f"scaled{c}"] = ("factor", (G.float(), scale.float()), "poison")
        cases[f"scaled{c}_op"] = ("factor", (G.float(), scale.float()), "op")
    for B, m, c in GRAM_SHAPES:
        Y = torch.randn(B, m, c, generator=gen)
        Y[0, :, c // 2] = 0  # a zero column: scale clamps at 1e-12, G gets ε on its diagonal
        inputs[f"gram{c}"] = Y
        cases[f"gram{c}_f32"] = ("gram", (Y, EPS), "poison")
        cases[f"gram{c}_bf16"] = ("gram", (Y.bfloat16(), EPS), "poison")
    Y_t = torch.randn(2, 24, 40, generator=gen).mT  # (B, m=40, c=24), column-major storage
    inputs["gram_strided"] = Y_t
    cases["gram_strided"] = ("gram", (Y_t, 0.1), "poison")
    cases["op_gram"] = ("gram", (Y_t.bfloat16(), 0.1), "op")
    for name, (B, N, K, p) in MEMBERSHIP_SHAPES.items():
        # Head-major storage (B·K, N, p), as pace.layers.compress holds a and col, seen as (B, N, K, p).
        a = torch.randn(B * K, N, p, generator=gen).view(B, K, N, p).transpose(1, 2)
        col = 0.5 * torch.randn(B * K, N, p, generator=gen).view(B, K, N, p).transpose(1, 2)
        col[0, 1, 0] = 0  # a token with no component in head 0's space
        tau = torch.tensor(0.3 + torch.rand((), generator=gen).item())
        inputs[name] = (a, col, tau)
        cases[f"{name}_f32"] = ("memberships", (a, col, tau), "poison")
        cases[f"{name}_bf16"] = ("memberships", (a.bfloat16(), col.bfloat16(), tau), "poison")
    a, col, tau = inputs["memb_small"]
    cases["op_memberships"] = ("memberships", (a.contiguous(), col.contiguous(), tau), "op")
    return seed, inputs, run_interpreted(cases, tmp_path_factory.mktemp("interp"))


@pytest.mark.parametrize(("c", "tiles"), [(c, "") for c in FACTOR_SIZES] + [(c, "_tile16") for c in TILED_SIZES])
def test_factor_matches_float64(interpreted, c, tiles):
    seed, inputs, out = interpreted
    G = inputs[f"ridge{c}"]
    F = out[f"ridge{c}{tiles}"]
    assert F.dtype == torch.float32 and F.shape == G.shape
    assert torch.isfinite(F).all(), f"seed {seed}: unwritten (NaN-poisoned) or non-finite elements"
    assert (F.tril(-1) == 0).all(), f"seed {seed}: F is not upper triangular"
    F64 = inverse_cholesky_factor_reference(G)
    F32_ref = inverse_cholesky_factor_reference(G.float())
    err, ref_err = _worst(_rel_err(F, F64)), _worst(_rel_err(F32_ref, F64))
    # The fp32 LAPACK path is the yardstick for fp32 rounding at this conditioning.
    assert err <= max(1e-5, 4 * ref_err), f"seed {seed}: c={c} error {err:.2e} (fp32 LAPACK {ref_err:.2e})"
    residual = F.double() @ F.double().mT @ G - torch.eye(c, dtype=torch.float64)
    kappa = torch.linalg.cond(G).max().item()
    assert _worst(residual.abs().amax(dim=(-2, -1))) <= 1e-6 * kappa, f"seed {seed}: c={c} ‖FFᵀG − I‖ too large"


@pytest.mark.parametrize("how", ["", "_op"])
@pytest.mark.parametrize("c", (20, 80))
def test_factor_with_row_scales_is_the_scaled_factor(interpreted, c, how):
    """``row_scale``: the kernel's F with row j divided by s_j, every element written, as float64's D⁻¹F."""
    seed, inputs, out = interpreted
    G, scale = inputs[f"scaled{c}"]
    F_s = out[f"scaled{c}{how}"]
    assert torch.isfinite(F_s).all() and (F_s.tril(-1) == 0).all(), f"seed {seed}"
    ref = inverse_cholesky_factor_reference(G) / scale.unsqueeze(-1)
    assert _worst(_rel_err(F_s, ref)) <= 1e-5, f"seed {seed}: c={c}{how}"


def test_factor_with_row_scales_gradients_pass_gradcheck():
    """The op's backward through D⁻¹F (float64, the PyTorch path): gradients of G and of the scales."""
    gen = torch.Generator().manual_seed(0)
    G = ridge_gram(2, 9, 6, EPS, gen).requires_grad_()
    scale = (0.5 + torch.rand(2, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    # G symmetrised inside, as test_factor_backward_gradcheck does (the factor reads one triangle)
    assert torch.autograd.gradcheck(lambda X, s: inverse_cholesky_factor((X + X.mT) / 2, s), (G, scale))
    with pytest.raises(ValueError, match=r"row_scale must have shape \(2, 6\), got \(6,\)"):
        inverse_cholesky_factor(G, scale[0])


@pytest.mark.parametrize("c", (20, 40))
def test_factor_error_by_condition(interpreted, c, capsys):
    seed, inputs, out = interpreted
    lines = []
    for kappa in KAPPAS:
        G = inputs[f"kappa{c}_{kappa:g}"]
        F = out[f"kappa{c}_{kappa:g}"]
        assert torch.isfinite(F).all(), f"seed {seed}: unwritten or non-finite elements"
        F64 = inverse_cholesky_factor_reference(G)
        err = _worst(_rel_err(F, F64))
        ref_err = _worst(_rel_err(inverse_cholesky_factor_reference(G.float()), F64))
        lines.append(f"c={c} kappa={kappa:g}: triton {err:.2e}, fp32 LAPACK {ref_err:.2e}")
        if kappa <= 1e2:
            assert err <= 1e-5, f"seed {seed}: {lines[-1]}"
        assert err <= max(1e-5, 4 * ref_err), f"seed {seed}: {lines[-1]}"
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("c", (20, 40))
def test_factor_nan_input_gives_nan(interpreted, c):
    _, _, out = interpreted
    assert torch.isfinite(out[f"nan{c}"][0]).all(), "a clean matrix of the batch was affected"
    assert torch.isnan(out[f"nan{c}"][1]).any(), "a NaN in G vanished from F"


@pytest.mark.parametrize("c", [shape[2] for shape in GRAM_SHAPES])
@pytest.mark.parametrize("dtype", ("f32", "bf16"))
def test_gram_matches_float64(interpreted, c, dtype):
    seed, inputs, out = interpreted
    Y = inputs[f"gram{c}"]
    Y_in = Y if dtype == "f32" else Y.bfloat16()
    scale, G = out[f"gram{c}_{dtype}"]
    assert scale.dtype == G.dtype == torch.float32
    assert torch.isfinite(scale).all() and torch.isfinite(G).all(), f"seed {seed}: unwritten elements"
    scale64, G64 = normalized_gram_reference(Y_in.double(), EPS)  # float64 from the same (rounded) input
    assert _worst((scale.double() - scale64).abs() / scale64) <= 1e-6, f"seed {seed}"
    assert _worst((G.double() - G64).abs().amax(dim=(-2, -1))) <= 2e-6, f"seed {seed}"
    assert scale[0, 0, c // 2] == 1e-12 and G[0, c // 2, c // 2] == pytest.approx(EPS)
    # Same as the fp32 PyTorch fallback (which the layers use today) up to fp32 rounding.
    scale_ref, G_ref = normalized_gram_reference(Y_in, EPS)
    assert torch.allclose(G, G_ref, atol=2e-6, rtol=0)
    assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)


def test_gram_strided_input(interpreted):
    seed, inputs, out = interpreted
    scale64, G64 = normalized_gram_reference(inputs["gram_strided"].double(), 0.1)
    scale, G = out["gram_strided"]
    assert _worst((G.double() - G64).abs()) <= 2e-6, f"seed {seed}"
    assert _worst((scale.double() - scale64).abs() / scale64) <= 1e-6, f"seed {seed}"


def test_public_ops_dispatch_to_interpreter(interpreted):
    seed, inputs, out = interpreted
    F = out["op_factor"]
    F64 = inverse_cholesky_factor_reference(inputs["op_factor"])
    assert _worst(_rel_err(F, F64)) <= 1e-5, f"seed {seed}"
    scale, G = out["op_gram"]
    _, G64 = normalized_gram_reference(inputs["gram_strided"].bfloat16().double(), 0.1)
    assert scale.shape == (2, 1, 24) and _worst((G.double() - G64).abs()) <= 2e-6


@pytest.mark.parametrize("name", MEMBERSHIP_SHAPES)
@pytest.mark.parametrize("dtype", ("f32", "bf16"))
def test_memberships_match_float64(interpreted, name, dtype):
    seed, inputs, out = interpreted
    a, col, tau = inputs[name]
    if dtype == "bf16":
        a, col = a.bfloat16(), col.bfloat16()
    w, pi = out[f"{name}_{dtype}"]
    assert w.dtype == a.dtype and w.is_contiguous() and pi.dtype == torch.float32
    assert torch.isfinite(w).all() and torch.isfinite(pi).all(), f"seed {seed}: unwritten elements"
    w64, pi64 = compress_memberships_reference(a.double(), col.double(), tau.double())
    # fp32 softmax: exp of a logit ℓ carries a relative error of about |ℓ|·eps from ℓ's own rounding, so the bound
    # scales with the largest logit (a fixed 1e-6 failed on one seed in ~30 at 1.0036e-6, a logit near 8).
    logits = torch.linalg.vector_norm(col.double(), dim=-1) / tau.double()
    tol_pi = 4 * torch.finfo(torch.float32).eps * max(1.0, logits.abs().max().item())
    assert _worst((pi.double() - pi64).abs()) <= tol_pi, f"seed {seed}"
    assert torch.allclose(pi.sum(-1).double(), torch.ones_like(pi64[..., 0]), atol=1e-6)
    if dtype == "f32":
        # w = (a − col) π in fp32: the difference's and the product's roundings (eps each, relative) plus π's
        # error, elementwise; a fixed relative 1e-6 failed where a − col cancels (w small) on some seeds.
        eps = torch.finfo(torch.float32).eps
        diff = (a.double() - col.double()).abs()
        bound = diff * (3 * eps * pi64.unsqueeze(-1) + tol_pi) + 1e-30  # (B, N, K, p)
        assert ((w.double() - w64).abs() <= bound.view_as(w64)).all(), f"seed {seed}"
        assert _worst((w.double() - w64).abs()) > 0  # computed in fp32, not copied from the reference
    else:
        # One rounding of w to bf16: half a bf16 ulp (+ fp32 noise at a tie).
        tol = 2**-8 + 1e-6
        assert _worst((w.double() - w64).abs() / w64.abs().clamp_min(1e-3)) <= tol, f"seed {seed}"


def test_memberships_op_dispatches_to_interpreter(interpreted):
    seed, inputs, out = interpreted
    w, pi = out["op_memberships"]
    w64, pi64 = compress_memberships_reference(*(t.double() for t in inputs["memb_small"]))
    assert _worst((w.double() - w64).abs()) <= 1e-6 and _worst((pi.double() - pi64).abs()) <= 1e-6, f"seed {seed}"


def test_memberships_equal_the_layers_formula_and_gradcheck():
    B, K, N, p = 2, 3, 7, 5
    a_h = torch.randn(B * K, N, p, dtype=torch.float64)
    col_h = 0.5 * torch.randn(B * K, N, p, dtype=torch.float64)
    tau = torch.tensor(0.7, dtype=torch.float64)
    # pace.layers.compress (full form) after ridge_project: π over heads, w token-major.
    pi_ref = torch.softmax(torch.linalg.vector_norm(col_h, dim=-1).view(B, K, N) / tau, dim=1)
    w_ref = ((a_h - col_h).view(B, K, N, p) * pi_ref.unsqueeze(-1)).transpose(1, 2).reshape(B, N, K * p)
    a, col = (t.view(B, K, N, p).transpose(1, 2) for t in (a_h, col_h))
    w, pi = compress_memberships(a, col, tau)
    assert torch.allclose(w.view(B, N, K * p), w_ref, atol=1e-14) and torch.allclose(pi, pi_ref.mT, atol=1e-14)
    args = (a.clone().requires_grad_(), col.clone().requires_grad_(), tau.clone().requires_grad_())
    assert torch.autograd.gradcheck(compress_memberships, args)
    assert torch.autograd.gradcheck(lambda *t: compress_memberships(*t)[0], args)


def test_factor_reference_reproduces_the_layers_basis():
    Y = torch.randn(3, 40, 12, dtype=torch.float64)
    scale, G = normalized_gram(Y, EPS)
    Q = (Y / scale) @ inverse_cholesky_factor(G)
    assert torch.allclose(Q, ridge_basis(Y, eps=EPS), atol=1e-12, rtol=0)


def test_factor_backward_gradcheck():
    A = torch.randn(2, 9, 6, dtype=torch.float64)
    G = (A.mT @ A + 0.1 * torch.eye(6, dtype=torch.float64)).requires_grad_()
    # G is symmetric; the op reads one triangle, so check the gradient of the symmetrised input.
    assert torch.autograd.gradcheck(lambda X: inverse_cholesky_factor((X + X.mT) / 2), (G,))


def test_factor_backward_equals_autograd_through_linalg():
    G = ridge_gram(3, 30, 20, EPS, torch.Generator().manual_seed(1)).requires_grad_()
    F_bar = torch.randn(3, 20, 20, dtype=torch.float64)
    (mine,) = torch.autograd.grad((inverse_cholesky_factor(G) * F_bar).sum(), G)
    (ref,) = torch.autograd.grad((inverse_cholesky_factor_reference(G) * F_bar).sum(), G)
    ref = (ref + ref.mT) / 2  # linalg's gradient for a symmetric input, up to which triangle it reads
    assert torch.allclose(mine, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_gram_backward_gradcheck_and_zero_column():
    Y = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda Y: normalized_gram(Y, EPS), (Y,))
    # A zero column is not differentiable by finite differences; compare with autograd through the fallback.
    Y0 = torch.randn(2, 7, 5, dtype=torch.float64)
    Y0[:, :, 1] = 0
    Y0.requires_grad_()
    W, w = torch.randn(2, 5, 5, dtype=torch.float64), torch.randn(2, 1, 5, dtype=torch.float64)

    def loss(fn):
        scale, G = fn(Y0, EPS)
        return (G * W).sum() + (scale * w).sum()

    (mine,) = torch.autograd.grad(loss(normalized_gram), Y0)
    (ref,) = torch.autograd.grad(loss(normalized_gram_reference), Y0)
    assert torch.allclose(mine, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(B, m, c\), got \(4, 5\)"):
        normalized_gram(torch.ones(4, 5), EPS)
    with pytest.raises(ValueError, match=r"\(\.\.\., c, c\), got \(2, 3, 4\)"):
        inverse_cholesky_factor(torch.ones(2, 3, 4))


def test_factor_keeps_leading_dims_and_zero_batch():
    G = ridge_gram(6, 12, 5, EPS, torch.Generator().manual_seed(2)).float().view(2, 3, 5, 5)
    assert torch.equal(inverse_cholesky_factor(G), inverse_cholesky_factor_reference(G))
    assert inverse_cholesky_factor(torch.empty(0, 4, 4)).shape == (0, 4, 4)


def test_bf16_gram_gradient_dtype():
    Y = torch.randn(2, 16, 4, dtype=torch.bfloat16, requires_grad=True)
    scale, G = normalized_gram(Y, EPS)
    assert scale.dtype == G.dtype == torch.float32
    G.sum().backward()
    assert Y.grad.dtype == torch.bfloat16 and torch.isfinite(Y.grad).all()


def test_compile_fullgraph_no_graph_breaks():
    def basis(Y):
        scale, G = normalized_gram(Y, EPS)
        Q = (Y / scale) @ inverse_cholesky_factor(G)  # (2, 24, 6)
        a = Y.view(2, 4, 6, 6)  # (B, N, K, p)
        w, pi = compress_memberships(a, Q.view(2, 4, 6, 6), Y.square().sum())
        return Q + w.view(2, 24, 6) + pi.sum()

    Y = torch.randn(2, 24, 6)
    explanation = torch._dynamo.explain(basis)(Y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(basis, fullgraph=True, backend="aot_eager")
    Yg = Y.clone().requires_grad_()
    out = compiled(Yg)
    out.square().sum().backward()
    Ye = Y.clone().requires_grad_()
    expected = basis(Ye)
    expected.square().sum().backward()
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(Yg.grad, Ye.grad, atol=1e-4)


def test_backend_choice(monkeypatch):
    cpu = torch.empty(0)
    monkeypatch.delenv("PACE_TRITON", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.current_backend() == "auto" and _dispatch.triton_module(cpu) is None
    with use_backend("off"):
        assert _dispatch.current_backend() == "off"
    monkeypatch.setenv("PACE_TRITON", "bogus")
    with pytest.raises(ValueError, match="PACE_TRITON"):
        _dispatch.current_backend()
    monkeypatch.setenv("PACE_TRITON", "off")
    assert _dispatch.current_backend() == "off"
    with pytest.raises(ValueError, match="backend"), use_backend("gpu"):
        pass


def test_interpreter_request_without_env_fails_clearly(monkeypatch):
    pytest.importorskip("triton")
    import sys

    if "triton" not in sys.modules:
        import triton  # noqa: F401  (as torch does in a normal session)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("interpret"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        inverse_cholesky_factor(torch.eye(3).expand(2, 3, 3))


@pytest.mark.slow
def test_factor_large_sizes_match_float64(tmp_path):
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    inputs = {c: ridge_gram(2, 2 * c, c, EPS, gen) for c in (160, 320)}
    out = run_interpreted({str(c): ("factor", (G.float(),), "poison") for c, G in inputs.items()}, tmp_path)
    for c, G in inputs.items():
        F64 = inverse_cholesky_factor_reference(G)
        err = _worst(_rel_err(out[str(c)], F64))
        ref_err = _worst(_rel_err(inverse_cholesky_factor_reference(G.float()), F64))
        assert err <= max(1e-5, 4 * ref_err), f"c={c}: {err:.2e} vs fp32 LAPACK {ref_err:.2e}"
        assert (out[str(c)].tril(-1) == 0).all()


# (kernel, constexprs, pointer dtypes, num_warps): the factor unscaled and the Compress and Expand configurations of
# the mixer's scaled one, a bf16 Gram and the S model's memberships (K = 8, p = 48).
_SM90_BUILDS = [
    ("inverse_cholesky_factor_kernel", {"BS": 16, "NB": 1, "HAS_SCALE": False}, {}, 1),
    ("inverse_cholesky_factor_kernel", {"BS": 32, "NB": 1, "HAS_SCALE": True}, {}, 2),  # the mixer's D⁻¹F
    ("inverse_cholesky_factor_kernel", {"BS": 32, "NB": 5, "HAS_SCALE": True}, {}, 4),
    ("_normalized_gram_kernel", {"BT": 32, "BM": 64, "IEEE": False, "UPCAST": False}, {"Y_ptr": "*bf16"}, 4),
    (
        "_memberships_kernel",
        {"BN": 8, "BK": 8, "BP": 64, "ROUND_BF16": False},
        {"A_ptr": "*bf16", "C_ptr": "*bf16", "W_ptr": "*bf16"},
        4,
    ),
]


@pytest.mark.parametrize(("name", "constexprs", "pointers", "num_warps"), _SM90_BUILDS)
def test_kernels_compile_for_hopper_without_a_gpu(name, constexprs, pointers, num_warps):
    """The kernels go through Triton's whole pipeline down to an sm_90 cubin (ptxas ships with Triton)."""
    assert len(build_for_hopper("_triton_ridge", name, constexprs, pointers, num_warps)) > 1000
