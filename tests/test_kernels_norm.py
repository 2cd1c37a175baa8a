"""pace.kernels' LayerNorm around the fused mixer (``layer_norm_cast``, ``layer_norm_backward``): the Triton kernels
under the interpreter and the PyTorch fallbacks, against float64 autograd of ``F.layer_norm``."""

import pytest
import torch
import torch.nn.functional as F
from kernels_helpers import assert_pace_mixer_matches_float64, build_for_hopper, pace_mixer_case, run_interpreted

from pace.kernels import layer_norm_backward, layer_norm_cast

EPS = 1e-6
T, C = 42, 48  # 42 tokens: two full blocks of 16 and a ragged one; C padded from 48 to 64 columns


def _inputs(gen, dtype=torch.float32):
    x = (torch.randn(T, C, generator=gen) * 2 + 0.5).to(dtype)
    w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    dy = torch.randn(T, C, generator=gen).to(torch.bfloat16)  # the mixer's x̄ comes in bf16
    r = torch.randn(T, C, generator=gen)  # the residual path's cotangent
    return x, w, b, dy, r


def _float64(x, w, b, dy, r):
    """Output, μ, rstd and the gradients of x (plus r), w and b, by float64 autograd of F.layer_norm."""
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y = F.layer_norm(x64, (C,), w64, b64, EPS)
    y.backward(dy.double())
    var, mean = torch.var_mean(x.double(), dim=-1, unbiased=False)
    dx = x64.grad + (0 if r is None else r.double())
    return y.detach(), mean, (var + EPS).rsqrt(), dx, w64.grad, b64.grad


def _assert_near(out, ref, rel, what, seed):
    """|out − ref| ≤ rel·max|ref| (NaN fails)."""
    err = (out.double() - ref).abs().max()
    assert err <= rel * ref.abs().max(), f"seed {seed}: {what}: worst {err:.2e}"


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    seed = torch.randint(0, 2**31, ()).item()
    gen = torch.Generator().manual_seed(seed)
    x, w, b, dy, r = _inputs(gen)
    x_bf16 = x.to(torch.bfloat16)
    cases = {
        "fwd_bf16": ("norm_fwd", (x, w, b, EPS, torch.bfloat16), "poison"),
        "fwd_f32": ("norm_fwd", (x, w, b, EPS, torch.float32), "poison"),
        "fwd_bf16_x": ("norm_fwd", (x_bf16, w, b, EPS, torch.bfloat16), "poison"),
        "fwd_op": ("norm_fwd", (x.view(2, T // 2, C), w, b, EPS, torch.bfloat16), "op"),
    }
    _, mean, rstd, *_ = _float64(x, w, b, dy, r)
    stats = (mean.float(), rstd.float())
    for programs in (1, 2):  # one program over all three row blocks; two, the first taking blocks 0 and 2
        cases[f"bwd_partials{programs}"] = ("norm_bwd", (dy, x, *stats, w, r), f"partials{programs}")
    cases["bwd_no_residual"] = ("norm_bwd", (dy, x, *stats, w, None), "partials512")
    shaped = [t.view(2, T // 2, *t.shape[1:]) for t in (dy, x, *stats)]
    cases["bwd_op"] = ("norm_bwd", (*shaped, w, r.view(2, T // 2, C)), "op")
    mixers = {}
    for form in ("full", "diag"):  # the whole fused mixer with the norm inside and x as its residual
        mixers[form], cases[f"mixer_{form}"] = pace_mixer_case(gen, form, norm=True)
    return seed, (x, w, b, dy, r, mixers), run_interpreted(cases, tmp_path_factory.mktemp("interp"))


@pytest.mark.parametrize("case", ["fwd_bf16", "fwd_f32", "fwd_bf16_x", "fwd_op"])
def test_layer_norm_cast_kernel_matches_float64(interpreted, case):
    """The normalised tokens within one rounding to their dtype (bf16: nearest even, 2⁻⁸ relative; truncation
    would be off by up to 2⁻⁷), μ and rstd to fp32 accuracy; every element written (NaN-poisoned outputs)."""
    seed, (x, w, b, dy, r, _), out = interpreted
    x = x.to(torch.bfloat16) if case == "fwd_bf16_x" else x  # read as bf16, normalised in fp32
    y, mean, rstd = out[case]
    y_ref, mean_ref, rstd_ref, *_ = _float64(x.float(), w, b, dy, r)
    dtype = torch.float32 if case == "fwd_f32" else torch.bfloat16
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    y, mean, rstd = y.reshape(T, C), mean.reshape(T), rstd.reshape(T)
    rounding = 2**-8 if dtype == torch.bfloat16 else 1e-6
    bad = (y.double() - y_ref).abs() > rounding * y_ref.abs() + 1e-6 * y_ref.abs().max()
    assert not bad.any(), f"seed {seed}: {int(bad.sum())} elements of y beyond one rounding"
    _assert_near(mean, mean_ref, 1e-6, "mean", seed)
    _assert_near(rstd, rstd_ref, 1e-5, "rstd", seed)


@pytest.mark.parametrize("case", ["bwd_partials1", "bwd_partials2", "bwd_no_residual", "bwd_op"])
def test_layer_norm_backward_kernel_matches_float64(interpreted, case):
    """∂L/∂x (plus the residual's cotangent), ∂L/∂w and ∂L/∂b against float64 autograd, whichever number of
    programs sums the weight's and bias's gradients; every element of ∂L/∂x written."""
    seed, (x, w, b, dy, r, _), out = interpreted
    r = None if case == "bwd_no_residual" else r
    dx, dw, db = out[case]
    _, _, _, dx_ref, dw_ref, db_ref = _float64(x, w, b, dy, r)
    assert dx.dtype == dw.dtype == db.dtype == torch.float32
    assert dx.shape == ((2, T // 2, C) if case == "bwd_op" else x.shape)
    for what, o, ref in (("dx", dx.reshape(T, C), dx_ref), ("dw", dw, dw_ref), ("db", db, db_ref)):
        _assert_near(o, ref, 1e-5, what, seed)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_interpreted_mixer_with_the_norm_inside_matches_float64(interpreted, form):
    """pace_mixer(x, residual=x, layer_norm=...) with every kernel interpreted (fp32) against ``x +
    pace_mixer(F.layer_norm(x))`` in float64: update, π and the gradients of x, U, τ, α, β, weight and bias."""
    seed, (*_, mixers), out = interpreted
    assert len(out[f"mixer_{form}"][2]) == 7
    assert_pace_mixer_matches_float64(mixers[form], out[f"mixer_{form}"], form, seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_norm_fallbacks_equal_autograd(dtype):
    """The PyTorch fallbacks (what the CPU runs): float64 to 1e-12 of autograd, float32 to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    x, w, b, dy, r = _inputs(gen)
    x, w, b, r = (t.to(dtype) for t in (x, w, b, r))
    y, mean, rstd = layer_norm_cast(x.view(2, T // 2, C), w, b, EPS, dtype)
    dx, dw, db = layer_norm_backward(dy.view(2, T // 2, C), x.view(2, T // 2, C), mean, rstd, w, r.view(2, T // 2, C))
    y_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref = _float64(x, w, b, dy, r)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert y.dtype == dx.dtype == dw.dtype == dtype and y.shape == dx.shape == (2, T // 2, C)
    refs = (y_ref, mean_ref, rstd_ref, dx_ref, dw_ref, db_ref)
    for what, o, ref in zip(("y", "mean", "rstd", "dx", "dw", "db"), (y, mean, rstd, dx, dw, db), refs):
        _assert_near(o.reshape(ref.shape), ref, rel, what, 0)


def test_layer_norm_ops_name_bad_shapes():
    x, w = torch.randn(2, 5, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"layer_norm_cast: x \(\.\.\., C\), weight \(C,\) and bias \(C,\) expected"):
        layer_norm_cast(x, torch.ones(7), w, EPS, torch.bfloat16)
    y, mean, rstd = layer_norm_cast(x, w, w, EPS, torch.float32)
    with pytest.raises(ValueError, match=r"layer_norm_backward: .* got \[\(2, 5, 8\), \(2, 5, 8\), \(2, 5\), \(2, 4\)"):
        layer_norm_backward(y, x, mean, rstd[:, :4], w)
    with pytest.raises(ValueError, match="layer_norm_backward"):
        layer_norm_backward(y, x, mean, rstd, w, residual_grad=torch.randn(2, 5, 7))


@pytest.mark.parametrize("kernel", ["_layer_norm_cast_kernel", "_layer_norm_backward_kernel"])
def test_norm_kernels_compile_for_hopper_without_a_gpu(kernel):
    """The S model's configuration (C = 384 padded to 512, fp32 block input, bf16 normalised tokens and x̄, a
    residual cotangent) builds down to an sm_90 cubin."""
    constexprs = {"BT": 16, "BC": 512}
    if kernel == "_layer_norm_cast_kernel":
        constexprs |= {"ROUND_BF16": False}
        pointers = {"Y_ptr": "*bf16"}
    else:
        constexprs |= {"HAS_R": True}
        pointers = {"DY_ptr": "*bf16"}
    assert len(build_for_hopper("_triton_norm", kernel, constexprs, pointers, 4)) > 1000
