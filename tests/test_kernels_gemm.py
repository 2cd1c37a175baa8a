"""pace.kernels.matmul_sum: the Triton GEMM under the interpreter and the PyTorch fallback against float64."""

import random

import pytest
import torch
from kernels_helpers import build_for_hopper, run_interpreted

from pace.kernels import matmul_sum, matmul_sum_reference


def _direct(C, lhs, rhs, scalars, codes):
    """float64 ``s₀C + Σ sᵢAᵢBᵢ`` written out term by term."""

    def coef(code):
        return 1.0 if code == 0 else (1 if code > 0 else -1) * scalars.double()[abs(code) - 1]

    out = 0 if C is None else coef(codes[0]) * C.double()
    for A, W, code in zip(lhs, rhs, codes[1:]):
        out = out + coef(code) * (A.double() @ W.double())
    return out


def _cases(gen):
    """The mixer's three uses at ragged sizes (tiles of 64 × 64 cut by every dimension): GEMM 2 (bf16 left factors,
    R transposed, U shared and fp32), x̄ (four pairs, Ω's column slices shared) and R̄ (transposed left factors, no
    C)."""
    B, N, d, c, r = 2, 70, 67, 40, 5
    bf = torch.bfloat16
    x, g = torch.randn(B, N, d, generator=gen), torch.randn(B, N, d, generator=gen)
    Ps, z = torch.randn(B, N, 2 * c, generator=gen).to(bf), torch.randn(B, N, d, generator=gen).to(bf)
    R, U = torch.randn(B, d, 2 * c, generator=gen).to(bf), torch.randn(d, d, generator=gen)
    omega = torch.randn(N, c + r, generator=gen).to(bf)
    Ye_bar, Sc_bar = torch.randn(B, d, c, generator=gen), torch.randn(B, d, r, generator=gen)
    xb = torch.randn(B, N, d, generator=gen).to(torch.float16)
    scalars = torch.tensor([1.3, 0.7, 0.4])
    return {
        "gemm2": (x, [Ps, z], [R.mT, U.mT], scalars, [2, -2, -3]),
        "grad_x": (
            g,
            [Ps, z, omega[:, :c], omega[:, c:]],
            [R.mT, U.mT, Ye_bar.mT, Sc_bar.mT],
            scalars,
            [2, 0, 0, 0, 0],
        ),
        "r_bar": (None, [xb.mT, xb.mT], [Ps.half(), Ps.half()], scalars, [0, -1, 3]),
    }


def _sketch_case(gen):
    """The mixer's sketch product ``S = x̂ᵀΩ`` (bf16 operands, x̂ transposed, Ω shared), written in bf16 (truncating
    instead would miss the nearest value in about half of the entries)."""
    B, N, d, c = 2, 70, 67, 45
    xb = torch.randn(B, N, d, generator=gen).to(torch.bfloat16)
    omega = torch.randn(N, c, generator=gen).to(torch.bfloat16)
    return None, [xb.mT], [omega], None, [0, 0], {"out_dtype": torch.bfloat16}


def _ridge_case(gen):
    """The Expand ridge backward's ``Ȳ = Q̄F_sᵀ + YΓ`` (fp32 operands, F_s transposed), written in bf16."""
    B, m, c = 2, 70, 45
    Q_bar, Y = torch.randn(B, m, c, generator=gen), torch.randn(B, m, c, generator=gen)
    F_s, Gamma = torch.randn(B, c, c, generator=gen), torch.randn(B, c, c, generator=gen)
    return None, [Q_bar, Y], [F_s.mT, Gamma], None, [0, 0, 0], {"out_dtype": torch.bfloat16}


def _residual_case(gen):
    """GEMM 2 with the block's residual and stochastic depth: ``x_in + t_b(αx̂ + Ps Rᵀ − β z Uᵀ)``, one image's
    branch dropped (t = 0) and the other's kept and scaled (t = 1/0.9)."""
    C, lhs, rhs, scalars, codes = _cases(gen)["gemm2"]
    residual = torch.randn(C.shape, generator=gen)
    return C, lhs, rhs, scalars, codes, {"D": residual, "batch_scale": torch.tensor([0.0, 1 / 0.9])}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    seed = random.SystemRandom().randrange(2**31)
    cases = _cases(torch.Generator().manual_seed(seed))
    cases["sketch"] = _sketch_case(torch.Generator().manual_seed(seed))
    cases["ridge_bf16"] = _ridge_case(torch.Generator().manual_seed(seed))
    cases["residual"] = _residual_case(torch.Generator().manual_seed(seed))
    jobs = {f"{name}_{how}": ("matmul_sum", args, how) for name, args in cases.items() for how in ("poison", "op")}
    return seed, cases, run_interpreted(jobs, tmp_path_factory.mktemp("interp"))


@pytest.mark.parametrize("name", ["gemm2", "grad_x", "r_bar"])
def test_kernel_matches_float64(interpreted, name):
    """Every output element written (NaN-poisoned buffer), fp32 accumulation of exact products: float64 to 1e-5."""
    seed, cases, out = interpreted
    ref = _direct(*cases[name])
    for how in ("poison", "op"):
        got = out[f"{name}_{how}"]
        assert got.dtype == torch.float32 and got.shape == ref.shape and not got.isnan().any()
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, f"seed {seed}: {name} via {how} off by {err:.1e}"


def _accumulation_error(C, lhs, rhs, scalars, codes):
    """float64 bound of fp32 accumulation's error per output element: (number of terms + 2) · 2⁻²⁴ · Σ|sᵢ||Aᵢ||Bᵢ|."""
    absolute = _direct(
        None if C is None else C.abs(), [A.abs() for A in lhs], [W.abs() for W in rhs],
        None if scalars is None else scalars.abs(), [abs(code) for code in codes],
    )  # fmt: skip
    terms = sum(A.shape[-1] for A in lhs) + (C is not None)
    return (terms + 2) * 2.0**-24 * absolute


def _check_rounded_to_bf16(got, case, label):
    """``got`` holds bf16 values, each the float64 sum of ``case`` rounded to nearest: one bf16 step at most off, where
    fp32 accumulation lands on the other side of a rounding boundary, plus that accumulation's own error where the
    sum cancels (a result far smaller than its terms: the bf16 step shrinks with it, the fp32 error does not); and at
    most a few of them not equal."""
    ref = _direct(*case)
    assert got.shape == ref.shape and not got.isnan().any(), label
    got = got.float()
    assert torch.equal(got, got.to(torch.bfloat16).float()), f"{label}: not bf16 values"
    nearest = ref.to(torch.bfloat16).double()  # float64 → bf16 rounds to nearest, ties to even
    off = got.double() != nearest
    step = (nearest.abs() * 2.0**-7).clamp_min(1e-30)
    allowed = step * 1.0001 + _accumulation_error(*case)
    assert ((got.double() - nearest).abs() <= allowed).all(), f"{label}: more than one step from nearest"
    assert off.float().mean() < 0.01, f"{label}: {int(off.sum())} of {off.numel()} not the nearest bf16 value"


@pytest.mark.parametrize("case", ["sketch", "ridge_bf16"])
def test_kernel_rounds_to_bf16_as_torch_does(interpreted, case):
    """``out_dtype=bfloat16`` (the sketch product from bf16 operands; the ridge backward's Ȳ from fp32 ones): the
    values are the fp32 sum rounded to nearest even bf16, through launcher (a poisoned buffer) and op; the
    interpreter's own fp32 → bf16 cast truncates."""
    seed, cases, out = interpreted
    for how in ("poison", "op"):
        assert out[f"{case}_{how}"].dtype == torch.bfloat16
        _check_rounded_to_bf16(out[f"{case}_{how}"], cases[case][:5], f"seed {seed}, {case} via {how}")


def test_kernel_adds_the_residual_and_scales_each_branch(interpreted):
    """``D + t_b(…)``: a dropped branch (t = 0) leaves exactly the residual, a kept one is scaled; float64 to 1e-5."""
    seed, cases, out = interpreted
    C, lhs, rhs, scalars, codes, options = cases["residual"]
    t, D = options["batch_scale"].double(), options["D"].double()
    ref = D + t.view(-1, 1, 1) * _direct(C, lhs, rhs, scalars, codes)
    for how in ("poison", "op"):
        got = out[f"residual_{how}"]
        assert torch.equal(got[0], options["D"][0]), f"seed {seed}: {how}: a dropped branch is not the residual"
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, f"seed {seed}: residual via {how} off by {err:.1e}"


def test_fallback_rounds_to_bf16():
    C, lhs, rhs, scalars, codes, options = _sketch_case(torch.Generator().manual_seed(0))
    got = matmul_sum(C, lhs, rhs, **options)
    assert got.dtype == torch.bfloat16
    _check_rounded_to_bf16(got, (C, lhs, rhs, scalars, codes), "fallback")
    assert torch.equal(got, (lhs[0].float() @ rhs[0].float()).to(torch.bfloat16))
    # Writing in the result's own dtype is no rounding.
    wide = matmul_sum(None, [lhs[0].double()], [rhs[0].double()], dtype=torch.float64, out_dtype=torch.float64)
    torch.testing.assert_close(wide, _direct(C, lhs, rhs, scalars, codes), rtol=1e-12, atol=1e-12)
    C, lhs, rhs, scalars, codes, options = _ridge_case(torch.Generator().manual_seed(0))
    narrow = matmul_sum(C, lhs, rhs, **options)
    assert narrow.dtype == torch.bfloat16
    _check_rounded_to_bf16(narrow, (C, lhs, rhs, scalars, codes), "fallback, out_dtype")


@pytest.mark.parametrize("name", ["gemm2", "grad_x", "r_bar"])
def test_fallback_matches_float64_and_leaves_its_inputs_alone(name):
    C, lhs, rhs, scalars, codes = _cases(torch.Generator().manual_seed(0))[name]
    lhs64, rhs64 = [t.double() for t in lhs], [t.double() for t in rhs]
    C64 = None if C is None else C.double()
    before = None if C64 is None else C64.clone()
    got = matmul_sum(C64, lhs64, rhs64, scalars=scalars.double(), codes=codes, dtype=torch.float64)
    ref = _direct(C, lhs, rhs, scalars, codes)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if before is not None:
        assert torch.equal(C64, before)  # the addend is read, never written
    # Without coefficients and with C: the plain sum (the fallback's first product goes onto C, not into it).
    plain = matmul_sum_reference(C64, lhs64, rhs64, None, [0] * len(codes), 2, torch.float64)
    torch.testing.assert_close(plain, _direct(C, lhs, rhs, scalars, [0] * len(codes)), rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_the_problem():
    A, W = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="matmul_sum: C"):
        matmul_sum(None, [A], [W.mT])
    with pytest.raises(ValueError, match="matmul_sum: C"):
        matmul_sum(torch.randn(2, 3, 6), [A], [W])
    with pytest.raises(ValueError, match="need scalars"):
        matmul_sum(None, [A], [W], codes=[0, 1])
    with pytest.raises(ValueError, match="matmul_sum: C and D"):
        matmul_sum(None, [A], [W], D=torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match=r"batch_scale of shape \(2,\)"):
        matmul_sum(None, [A], [W], batch_scale=torch.ones(3))


def test_fallback_adds_the_residual_and_scales_each_branch():
    C, lhs, rhs, scalars, codes, options = _residual_case(torch.Generator().manual_seed(0))
    t, D = options["batch_scale"].double(), options["D"].double()
    got = matmul_sum(C.double(), [a.double() for a in lhs], [w.double() for w in rhs], scalars=scalars.double(),
                     codes=codes, dtype=torch.float64, D=D, batch_scale=t)  # fmt: skip
    ref = D + t.view(-1, 1, 1) * _direct(C, lhs, rhs, scalars, codes)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use", ["grad_x", "sketch", "ridge_bf16", "residual"])
def test_kernel_compiles_for_hopper_without_a_gpu(use):
    """The mixer's x̄ configuration (four pairs, bf16 and fp32 operand tiles), its sketch product's (one bf16 pair,
    the result written in bf16), the Expand ridge backward's (fp32 pairs, a bf16 result) and GEMM 2 with the block's
    residual and stochastic-depth scales build to sm_90 cubins."""
    constexprs = {"INTERPRETED": False, "BM": 64, "BN": 64, "BK": 32, "HAS_D": use == "residual"}
    constexprs |= {"HAS_BS": use == "residual"}
    if use == "grad_x":
        constexprs |= {"HAS_C": True, "PAIRS": 4, "ROUND_BF16": False, "CODE_C": 2, "CODE0": 0, "CODE1": -3}
        constexprs |= {"CODE2": 0, "CODE3": 0, "UP0": False, "UP1": True, "UP2": True, "UP3": True}
        pointers = {"A0_ptr": "*bf16", "B0_ptr": "*bf16", "A1_ptr": "*bf16", "A2_ptr": "*bf16", "A3_ptr": "*bf16"}
    elif use == "sketch":
        constexprs |= {"HAS_C": False, "PAIRS": 1, "ROUND_BF16": True, "CODE_C": 0, "CODE0": 0, "CODE1": 0}
        constexprs |= {"CODE2": 0, "CODE3": 0, "UP0": False, "UP1": False, "UP2": False, "UP3": False}
        pointers = {"A0_ptr": "*bf16", "B0_ptr": "*bf16", "O_ptr": "*bf16"}
    elif use == "residual":  # GEMM 2: bf16 x̂ (C), (Ps, Rᵀ) bf16, (z, Uᵀ) bf16 and fp32
        constexprs |= {"HAS_C": True, "PAIRS": 2, "ROUND_BF16": False, "CODE_C": 2, "CODE0": -2, "CODE1": -3}
        constexprs |= {"CODE2": 0, "CODE3": 0, "UP0": False, "UP1": True, "UP2": True, "UP3": True}
        pointers = {"C_ptr": "*bf16", "A0_ptr": "*bf16", "B0_ptr": "*bf16", "A1_ptr": "*bf16"}
    else:  # two fp32 pairs, the result written in bf16
        constexprs |= {"HAS_C": False, "PAIRS": 2, "ROUND_BF16": True, "CODE_C": 0, "CODE0": 0, "CODE1": 0}
        constexprs |= {"CODE2": 0, "CODE3": 0, "UP0": True, "UP1": True, "UP2": True, "UP3": True}
        pointers = {"O_ptr": "*bf16"}
    assert len(build_for_hopper("_triton_gemm", "_matmul_sum_kernel", constexprs, pointers, 4)) > 1000
