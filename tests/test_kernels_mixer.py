"""pace.kernels' fused-mixer membership ops: the Triton kernels under the interpreter against float64, the PyTorch
fallback against autograd, and the whole fused mixer with every Triton kernel against its float64 fallback path."""

import random

import pytest
import torch
from kernels_helpers import (
    assert_close_elementwise,
    assert_pace_mixer_matches_float64,
    build_for_hopper,
    pace_mixer_case,
    run_interpreted,
)

from pace.kernels import (
    cast_dot,
    mixer_memberships,
    mixer_memberships_backward,
    mixer_memberships_backward_reference,
    mixer_memberships_reference,
    pack_bases,
    pack_bases_reference,
)
from pace.kernels.mixer_ops import block_diag

# (B, N, K, r, p): ragged (N crosses the 16-token blocks, K, r and p below their padded sizes) and the S model's.
SHAPES = {"small": (2, 20, 3, 5, 6), "s": (1, 17, 8, 20, 48)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
PACK_SHAPES = {"small": (2, 3, 6, 5), "s": (1, 8, 48, 20)}  # (B, K, p, r): ragged tiles; the S model's


def _forward_inputs(B, N, K, r, p, gen, dtype=torch.float64):
    P = torch.randn(B, N, 2 * K * r, generator=gen, dtype=dtype)
    a = torch.randn(B, N, K * p, generator=gen, dtype=dtype)
    Q = torch.randn(B, K, p, r, generator=gen, dtype=dtype) / p**0.5
    M = Q.mT @ Q  # Q_kᵀQ_k
    scalars = torch.tensor([0.5 + torch.rand((), generator=gen).item(), 0.3, 0.7], dtype=dtype)
    return P, a, M, scalars


def _backward_inputs(P, a, M, scalars, gen):
    _, _, pi, sq = mixer_memberships_reference(P.double(), a.double(), M.double(), scalars.double())
    g_R, g_U = torch.randn(P.shape, generator=gen), torch.randn(a.shape, generator=gen)
    g_pi = torch.randn(pi.shape, generator=gen)
    return g_R.to(P.dtype), g_U.to(a.dtype), pi.float(), sq.float(), g_pi


def _bwd_args(P, a, M, scalars, extra):
    g_R, g_U, pi, sq, g_pi = extra
    return (g_R, P, g_U, a, pi, sq, g_pi, M, scalars)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs drawn with a fresh seed, and the interpreter's outputs for them (one subprocess for the module)."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    cases, inputs = {}, {}
    for name, shape in SHAPES.items():
        P, a, M, scalars = _forward_inputs(*shape, gen)
        P[0, 1, shape[2] * shape[3] :] = 0  # a token with no component in any sketched space: ‖col‖ = 0
        for dt, dtype in DTYPES.items():
            fwd = (P.to(dtype), a.to(dtype), M.float(), scalars.float())
            extra = _backward_inputs(*fwd, gen)
            inputs[f"{name}_{dt}"] = (fwd, extra)
            cases[f"fwd_{name}_{dt}"] = ("mixer_fwd", fwd, "poison")
            cases[f"bwd_{name}_{dt}"] = ("mixer_bwd", _bwd_args(*fwd, extra), "poison")
    fwd, extra = inputs["small_f32"]
    cases["fwd_op"] = ("mixer_fwd", fwd, "op")
    cases["bwd_op"] = ("mixer_bwd", _bwd_args(*fwd, extra), "op")
    no_g_pi = (*_bwd_args(*fwd, extra)[:6], None, *_bwd_args(*fwd, extra)[7:])  # π unused by the loss
    cases["bwd_no_g_pi"] = ("mixer_bwd", no_g_pi, "poison")
    cases["bwd_no_g_pi_op"] = ("mixer_bwd", no_g_pi, "op")
    # The whole fused mixer (full form), every pace.kernels op on the Triton interpreter, fp32.
    inputs["mixer"], cases["mixer"] = pace_mixer_case(gen, "full")
    g = torch.randn(2, 3, 1000, generator=gen)  # 6000 elements: a full block of 4096 and a ragged one
    x = torch.randn(2, 3, 1000, generator=gen)
    inputs["cast_dot"] = (g, x)
    for dtype in (torch.bfloat16, torch.float16):
        cases[f"cast_dot_{dtype}"] = ("cast_dot", (g, x, dtype), "poison")
    cases["cast_dot_op"] = ("cast_dot", (g, x, torch.bfloat16), "op")
    cases["cast_dot_op_bf16_x"] = ("cast_dot", (g, x.to(torch.bfloat16), torch.bfloat16), "op")  # the mixer's x̂
    scale = torch.tensor([0.0, 1 / 0.9])  # a dropped and a kept branch (stochastic depth)
    inputs["cast_dot_scale"] = scale
    for how in ("poison", "op"):
        cases[f"cast_dot_scaled_{how}"] = ("cast_dot", (g, x.to(torch.bfloat16), torch.bfloat16, scale), how)
    for name, (B, K, p, r) in PACK_SHAPES.items():
        d, c = K * p, K * r
        S = torch.randn(B, d, c + r, generator=gen)  # Y is a strided view, as the mixer's S[..., :c_e]
        F_s = torch.randn(B, c, c, generator=gen).triu() / c**0.5
        U = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
        Q_c = torch.randn(B * K, p, r, generator=gen)
        inputs[f"pack_{name}"] = (S[..., :c], F_s, U, Q_c)
        for dtype in (torch.bfloat16, torch.float32):
            cases[f"pack_{name}_{dtype}"] = ("pack", (S[..., :c], F_s, U, Q_c, dtype), "poison")
        cases[f"pack_{name}_diag"] = ("pack", (S[..., :c], F_s, U, None, torch.bfloat16), "poison")
        # The mixer's Expand sketches: bf16 numbers stored in bf16, a strided view of the sketch product.
        S_bf16 = S.to(torch.bfloat16)
        inputs[f"pack_{name}_bf16_y"] = S_bf16[..., :c]
        cases[f"pack_{name}_bf16_y"] = ("pack", (S_bf16[..., :c], F_s, U, Q_c, torch.bfloat16), "poison")
        cases[f"pack_{name}_bf16_y_op"] = ("pack", (S_bf16[..., :c], F_s, U, Q_c, torch.bfloat16), "op")
    cases["pack_op"] = ("pack", (*inputs["pack_small"], torch.bfloat16), "op")
    return seed, inputs, run_interpreted(cases, tmp_path_factory.mktemp("interp"))


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_forward_kernel_matches_float64(interpreted, name, dt):
    seed, inputs, out = interpreted
    fwd, _ = inputs[f"{name}_{dt}"]
    Ps, z, pi, sq = out[f"fwd_{name}_{dt}"]
    assert Ps.dtype == z.dtype == DTYPES[dt] and pi.dtype == sq.dtype == torch.float32
    ref = mixer_memberships_reference(*(t.double() for t in fwd))  # float64 from the same (rounded) inputs
    rounding = 2**-8 if dt == "bf16" else 1e-6  # one rounding to the output dtype
    for what, o, r, rel in zip(("Ps", "z", "pi", "sq"), (Ps, z, pi, sq), ref, (rounding, rounding, 1e-5, 1e-5)):
        assert_close_elementwise(o, r, rel, what, seed)
    assert sq[0, 1].abs().max() == 0 and torch.allclose(
        pi[0, 1].double(), torch.full_like(ref[2][0, 1], 1 / SHAPES[name][2])
    )


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_backward_kernel_matches_float64(interpreted, name, dt):
    seed, inputs, out = interpreted
    fwd, extra = inputs[f"{name}_{dt}"]
    P_bar, a_bar, Pc_w, sums = out[f"bwd_{name}_{dt}"]
    assert P_bar.dtype == a_bar.dtype == Pc_w.dtype == DTYPES[dt] and sums.shape == (3,)
    ref = mixer_memberships_backward_reference(*(t.double() for t in _bwd_args(*fwd, extra)))
    rounding = 2**-8 if dt == "bf16" else 1e-5
    for what, o, r in zip(("P_bar", "a_bar", "Pc_w"), (P_bar, a_bar, Pc_w), ref):
        assert_close_elementwise(o, r, rounding, what, seed)
    torch.testing.assert_close(sums.double(), ref[3], rtol=1e-4, atol=1e-4, msg=f"seed {seed}: partial sums")


def test_backward_kernel_without_a_membership_cotangent(interpreted):
    """g_pi = None (π unused) is a zero cotangent: kernel and op as the float64 reference with zeros."""
    seed, inputs, out = interpreted
    fwd, extra = inputs["small_f32"]
    args = [t.double() for t in _bwd_args(*fwd, extra)]
    args[6] = torch.zeros_like(args[6])
    ref = mixer_memberships_backward_reference(*args)
    for case in ("bwd_no_g_pi", "bwd_no_g_pi_op"):
        for what, o, r in zip(("P_bar", "a_bar", "Pc_w"), out[case][:3], ref):
            assert_close_elementwise(o, r, 1e-5, what, seed)
        torch.testing.assert_close(out[case][3].double(), ref[3], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    # The fallback takes None as well.
    got = mixer_memberships_backward_reference(*args[:6], None, *args[7:])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_public_ops_dispatch_to_interpreter_and_match_the_fallback(interpreted):
    seed, inputs, out = interpreted
    fwd, extra = inputs["small_f32"]
    for got, ref in zip(out["fwd_op"], mixer_memberships_reference(*fwd)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    for got, ref in zip(out["bwd_op"], mixer_memberships_backward_reference(*_bwd_args(*fwd, extra))):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


def test_fused_mixer_on_the_interpreted_kernels_matches_float64(interpreted):
    """normalized_gram, inverse_cholesky_factor and both membership kernels inside pace_mixer, fp32."""
    seed, inputs, out = interpreted
    assert_pace_mixer_matches_float64(inputs["mixer"], out["mixer"], "full", seed)


@pytest.mark.parametrize(
    "case", ["cast_dot_torch.bfloat16", "cast_dot_torch.float16", "cast_dot_op", "cast_dot_op_bf16_x"]
)
def test_cast_dot_kernel_rounds_like_torch_and_sums_in_fp32(interpreted, case):
    seed, inputs, out = interpreted
    g, x = inputs["cast_dot"]
    x = x.to(torch.bfloat16) if case.endswith("bf16_x") else x  # read as bf16, summed with fp32 g in fp32
    copy, dot = out[case]
    dtype = torch.float16 if case.endswith(".float16") else torch.bfloat16
    assert copy.dtype == dtype and torch.equal(copy, g.to(dtype)), f"seed {seed}: not rounded to nearest even"
    ref = torch.dot(g.double().reshape(-1), x.double().reshape(-1))
    scale = (g.double() * x.double()).abs().sum()
    assert dot.dtype == torch.float32 and (dot.double() - ref).abs() <= 1e-6 * scale, f"seed {seed}"


@pytest.mark.parametrize("how", ["poison", "op"])
def test_cast_dot_kernel_scales_each_batch_entry(interpreted, how):
    """With per-image scales t: the copy of t_b·g (a dropped image's is exactly zero) and <t_b·g, x>."""
    seed, inputs, out = interpreted
    g, x = inputs["cast_dot"]
    t = inputs["cast_dot_scale"].view(-1, 1, 1)
    x = x.to(torch.bfloat16).double()
    copy, dot = out[f"cast_dot_scaled_{how}"]
    assert torch.equal(copy, (g * t).to(torch.bfloat16)) and not copy[0].any(), f"seed {seed}"
    ref = (g.double() * t.double() * x).sum()
    assert (dot.double() - ref).abs() <= 1e-6 * (g.double() * x).abs().sum(), f"seed {seed}"


@pytest.mark.parametrize("name", PACK_SHAPES)
@pytest.mark.parametrize("kind", ["torch.bfloat16", "torch.float32", "diag"])
def test_pack_bases_kernel_matches_float64(interpreted, name, kind):
    seed, inputs, out = interpreted
    Y, F_s, U, Q_c = inputs[f"pack_{name}"]
    R = out[f"pack_{name}_{kind}"]
    ref = pack_bases_reference(
        Y.double(), F_s.double(), U.double(), None if kind == "diag" else Q_c.double(), torch.float64
    )
    assert R.shape == ref.shape and R.dtype == (torch.float32 if kind == "torch.float32" else torch.bfloat16)
    assert_close_elementwise(
        R, ref, 2**-8 if R.dtype == torch.bfloat16 else 1e-5, "R", seed
    )  # fp32 products, one rounding


@pytest.mark.parametrize("name", PACK_SHAPES)
@pytest.mark.parametrize("how", ["", "_op"])
def test_pack_bases_kernel_reads_bf16_sketches(interpreted, name, how):
    """Y stored in bf16 (the mixer's sketch product) is read as it is and converted exactly: R is the float64
    product of the same bf16 numbers, rounded once."""
    seed, inputs, out = interpreted
    _, F_s, U, Q_c = inputs[f"pack_{name}"]
    Y = inputs[f"pack_{name}_bf16_y"]
    R = out[f"pack_{name}_bf16_y{how}"]
    ref = pack_bases_reference(Y.double(), F_s.double(), U.double(), Q_c.double(), torch.float64)
    assert R.dtype == torch.bfloat16 and R.shape == ref.shape
    assert_close_elementwise(R, ref, 2**-8, "R", seed)


def test_pack_bases_op_and_fallback(interpreted):
    seed, inputs, out = interpreted
    Y, F_s, U, Q_c = inputs["pack_small"]
    ref = pack_bases_reference(Y, F_s, U, Q_c, torch.bfloat16)  # fp32 products, then rounded: the same numbers
    torch.testing.assert_close(out["pack_op"].float(), ref.float(), rtol=2**-7, atol=1e-5, msg=f"seed {seed}")
    # The fallback against a direct construction: R = [Y F_s | U_k Q_k], head by head.
    B, K = Y.shape[0], U.shape[1] // Q_c.shape[1]
    heads = [U[:, k * Q_c.shape[1] : (k + 1) * Q_c.shape[1]] @ Q_c.view(B, K, *Q_c.shape[1:])[:, k] for k in range(K)]
    direct = torch.cat([Y @ F_s, *heads], dim=-1)
    torch.testing.assert_close(pack_bases(Y, F_s, U, Q_c, torch.float32), direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pack_bases: Y"):
        pack_bases(Y, F_s, U, Q_c[:, :-1], torch.float32)


def test_cast_dot_fallback_and_bad_shapes():
    g, x = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    copy, dot = cast_dot(g, x, torch.float64)
    assert torch.equal(copy, g) and copy.data_ptr() != g.data_ptr() and dot == torch.dot(g.view(-1), x.view(-1))
    copy, dot = cast_dot(g.float(), x.float(), torch.bfloat16)
    assert torch.equal(copy, g.float().bfloat16()) and dot.dtype == torch.float32
    with pytest.raises(ValueError, match=r"one shape, got \(3, 5\) and \(5, 3\)"):
        cast_dot(g, x.mT, torch.float32)
    t = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    copy, dot = cast_dot(g, x, torch.float64, t)
    torch.testing.assert_close(copy, g * t[:, None], rtol=0, atol=0)
    torch.testing.assert_close(dot, (g * t[:, None] * x).sum(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"scale of shape \(g.shape\[0\],\) expected, got \(5,\)"):
        cast_dot(g, x, torch.float64, torch.ones(5))


def test_reference_backward_equals_autograd_through_the_reference_forward():
    """The backward's formulas against autograd in float64, M̄ from P_c ⊙ ∂‖col‖² included."""
    gen = torch.Generator().manual_seed(0)
    B, N, K, r, p = 2, 7, 3, 4, 5
    P, a, M, scalars = (t.requires_grad_() for t in _forward_inputs(B, N, K, r, p, gen))
    g_R, g_U = torch.randn(P.shape, dtype=torch.float64), torch.randn(a.shape, dtype=torch.float64)
    g_pi = torch.randn(B, N, K, dtype=torch.float64)
    Ps, z, pi, sq = mixer_memberships_reference(P, a, M, scalars)
    # The loss the mixer's backward sees: Ps enters GEMM 2 (cotangent g[Q_e | V]), z enters −β zUᵀ.
    loss = (g_R * Ps).sum() - scalars[2] * (g_U * z).sum() + (g_pi * pi).sum()
    dP, da, dM, dS = torch.autograd.grad(loss, (P, a, M, scalars))
    with torch.no_grad():
        P_bar, a_bar, Pc_w, sums = mixer_memberships_backward_reference(g_R, P, g_U, a, pi, sq, g_pi, M, scalars)
        M_bar = (Pc_w.mT @ P[..., K * r :]).view(B, K, r, K, r).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    torch.testing.assert_close(P_bar, dP, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a_bar, da, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M_bar, dM, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack([sums[2], sums[0], sums[1]]), dS, rtol=1e-10, atol=1e-12)


def test_block_diag_and_bad_shapes():
    blocks = torch.randn(2, 3, 2, 4)
    full = block_diag(blocks)
    assert full.shape == (2, 6, 12) and torch.equal(full[1, 2:4, 4:8], blocks[1, 1]) and full[0, :2, 4:].eq(0).all()
    P, a, M, scalars = _forward_inputs(1, 4, 2, 3, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"P \(B, N, 2·K·r\).*got \(1, 4, 11\)"):
        mixer_memberships(P[..., :11], a, M, scalars)
    with pytest.raises(ValueError, match="cotangent or saved shapes"):
        mixer_memberships_backward(P, P, a, a, P[..., :2], P[..., :2], P[..., :3], M, scalars)


_BF16 = dict.fromkeys(("P_ptr", "A_ptr", "Ps_ptr", "Z_ptr", "GR_ptr", "GU_ptr", "Pbar_ptr", "Abar_ptr"), "*bf16")


@pytest.mark.parametrize(
    "name", ["_memberships_fwd_kernel", "_memberships_bwd_kernel", "_pack_bases_kernel", "_cast_dot_kernel"]
)
def test_kernels_compile_for_hopper_without_a_gpu(name):
    """The S model's configuration (K = 8, r = 20, p = 48, bf16 activations) builds down to an sm_90 cubin;
    cast_dot as the mixer calls it (bf16 x̂ and copy, per-image scales)."""
    from pace.kernels._triton_mixer import CAST_DOT_BLOCK, TINY

    if name == "_cast_dot_kernel":
        constexprs = {"BLOCK": CAST_DOT_BLOCK, "ROUND_BF16": False, "HAS_T": True}
        pointers = {"X_ptr": "*bf16", "Out_ptr": "*bf16"}
    elif name == "_pack_bases_kernel":
        constexprs = {"BM": 32, "BN": 32, "BK": 32, "ROUND_BF16": False, "PRECISION": "tf32x3"}
        pointers = {"R_ptr": "*bf16"}
    else:
        constexprs = {"TINY_": TINY, "BN": 16, "BK": 8, "BR": 32, "BP": 64, "ROUND_BF16": False}
        if name == "_memberships_bwd_kernel":
            constexprs["HAS_GPI"] = False  # the training path: the block discards π
        pointers = dict(_BF16, Pcw_ptr="*bf16")
    assert len(build_for_hopper("_triton_mixer", name, constexprs, pointers, 4)) > 1000
