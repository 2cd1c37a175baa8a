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
    expand_basis,
    expand_basis_reference,
    mixer_heads_backward,
    mixer_heads_backward_reference,
    mixer_memberships,
    mixer_memberships_backward,
    mixer_memberships_backward_reference,
    mixer_memberships_reference,
)

# (B, N, K, r, p): ragged (N crosses the 16-token blocks, K, r and p below their padded sizes) and the S model's.
SHAPES = {"small": (2, 20, 3, 5, 6), "s": (1, 17, 8, 20, 48)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
BASIS_SHAPES = {"small": (2, 18, 15), "s": (1, 384, 160)}  # (B, d, c): ragged tiles; the S model's


def _forward_inputs(B, N, K, r, p, gen, dtype=torch.float64):
    a = torch.randn(B, N, K * p, generator=gen, dtype=dtype)
    Q_c = torch.randn(B, K, p, r, generator=gen, dtype=dtype) / p**0.5
    scalars = torch.tensor([0.5 + torch.rand((), generator=gen).item(), 0.3, 0.7], dtype=dtype)
    return a, Q_c, scalars


def _backward_inputs(a, Q_c, scalars, gen):
    _, pi, sq = mixer_memberships_reference(a.double(), Q_c.double(), scalars.double())
    B, N, _ = a.shape
    K, r = Q_c.shape[1], Q_c.shape[3]
    g_Qe, P = (torch.randn(B, N, K * r, generator=gen).to(a.dtype) for _ in range(2))
    g_U = torch.randn(a.shape, generator=gen).to(a.dtype)
    g_pi, sq_bar = torch.randn(pi.shape, generator=gen), torch.randn(pi.shape, generator=gen)
    return g_Qe, P, g_U, pi.float(), sq.float(), g_pi, sq_bar


def _bwd_args(a, Q_c, scalars, extra):
    g_Qe, P, g_U, pi, sq, g_pi, _ = extra
    return (g_Qe, P, g_U, a, pi, sq, g_pi, Q_c, scalars)


def _heads_args(a, Q_c, scalars, extra):
    _, _, g_U, pi, _, _, sq_bar = extra
    return (a, g_U, pi, sq_bar, Q_c, scalars)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs drawn with a fresh seed, and the interpreter's outputs for them (one subprocess for the module)."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    cases, inputs = {}, {}
    for name, shape in SHAPES.items():
        a, Q_c, scalars = _forward_inputs(*shape, gen)
        a[0, 1] = 0  # a token with no component in any head's subspace: ‖col‖ = 0
        for dt, dtype in DTYPES.items():
            fwd = (a.to(dtype), Q_c.float(), scalars.float())
            extra = _backward_inputs(*fwd, gen)
            inputs[f"{name}_{dt}"] = (fwd, extra)
            cases[f"fwd_{name}_{dt}"] = ("mixer_fwd", fwd, "poison")
            cases[f"bwd_{name}_{dt}"] = ("mixer_bwd", _bwd_args(*fwd, extra), "poison")
            cases[f"heads_{name}_{dt}"] = ("mixer_heads", _heads_args(*fwd, extra), "poison")
    fwd, extra = inputs["small_f32"]
    cases["fwd_op"] = ("mixer_fwd", fwd, "op")
    cases["bwd_op"] = ("mixer_bwd", _bwd_args(*fwd, extra), "op")
    no_g_pi = (*_bwd_args(*fwd, extra)[:6], None, *_bwd_args(*fwd, extra)[7:])  # π unused by the loss
    cases["bwd_no_g_pi"] = ("mixer_bwd", no_g_pi, "poison")
    cases["bwd_no_g_pi_op"] = ("mixer_bwd", no_g_pi, "op")
    cases["heads_op"] = ("mixer_heads", _heads_args(*fwd, extra), "op")
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
    for name, (B, d, c) in BASIS_SHAPES.items():
        S = torch.randn(B, d, c + 7, generator=gen)  # Y is a strided view, as the mixer's S[..., :c_e]
        F_s = torch.randn(B, c, c, generator=gen).triu() / c**0.5
        inputs[f"basis_{name}"] = (S[..., :c], F_s)
        for dtype in (torch.bfloat16, torch.float32):
            cases[f"basis_{name}_{dtype}"] = ("pack", (S[..., :c], F_s, dtype), "poison")
        # The mixer's Expand sketches: bf16 numbers stored in bf16, a strided view of the sketch product.
        S_bf16 = S.to(torch.bfloat16)
        inputs[f"basis_{name}_bf16_y"] = S_bf16[..., :c]
        for how in ("poison", "op"):
            cases[f"basis_{name}_bf16_y_{how}"] = ("pack", (S_bf16[..., :c], F_s, torch.bfloat16), how)
    cases["basis_op"] = ("pack", (*inputs["basis_small"], torch.bfloat16), "op")
    return seed, inputs, run_interpreted(cases, tmp_path_factory.mktemp("interp"))


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_forward_kernel_matches_float64(interpreted, name, dt):
    seed, inputs, out = interpreted
    fwd, _ = inputs[f"{name}_{dt}"]
    z, pi, sq = out[f"fwd_{name}_{dt}"]
    assert z.dtype == DTYPES[dt] and pi.dtype == sq.dtype == torch.float32
    ref = mixer_memberships_reference(*(t.double() for t in fwd))  # float64 from the same (rounded) inputs
    rounding = 2**-8 if dt == "bf16" else 1e-6  # one rounding to the output dtype
    for what, o, r, rel in zip(("z", "pi", "sq"), (z, pi, sq), ref, (rounding, 1e-5, 1e-5)):
        assert_close_elementwise(o, r, rel, what, seed)
    assert sq[0, 1].abs().max() == 0 and torch.allclose(
        pi[0, 1].double(), torch.full_like(ref[1][0, 1], 1 / SHAPES[name][2])
    )


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_backward_kernels_match_float64(interpreted, name, dt):
    """Through π: ∂L/∂‖col‖² and the partial sums; per head: ā (one rounding) and Q̄_c summed over every token
    block (the small shape has two) in fp32."""
    seed, inputs, out = interpreted
    fwd, extra = inputs[f"{name}_{dt}"]
    (sq_bar, sums), (a_bar, Qc_bar) = out[f"bwd_{name}_{dt}"], out[f"heads_{name}_{dt}"]
    assert sq_bar.dtype == Qc_bar.dtype == torch.float32 and a_bar.dtype == DTYPES[dt] and sums.shape == (3,)
    ref = mixer_memberships_backward_reference(*(t.double() for t in _bwd_args(*fwd, extra)))
    assert_close_elementwise(sq_bar, ref[0], 1e-5, "sq_bar", seed)
    torch.testing.assert_close(sums.double(), ref[1], rtol=1e-4, atol=1e-4, msg=f"seed {seed}: partial sums")
    ref = mixer_heads_backward_reference(*(t.double() for t in _heads_args(*fwd, extra)))
    assert_close_elementwise(a_bar, ref[0], 2**-8 if dt == "bf16" else 1e-5, "a_bar", seed)
    assert_close_elementwise(Qc_bar, ref[1], 1e-5, "Qc_bar", seed)


def test_backward_kernel_without_a_membership_cotangent(interpreted):
    """g_pi = None (π unused) is a zero cotangent: kernel and op as the float64 reference with zeros."""
    seed, inputs, out = interpreted
    fwd, extra = inputs["small_f32"]
    args = [t.double() for t in _bwd_args(*fwd, extra)]
    args[6] = torch.zeros_like(args[6])
    ref = mixer_memberships_backward_reference(*args)
    for case in ("bwd_no_g_pi", "bwd_no_g_pi_op"):
        assert_close_elementwise(out[case][0], ref[0], 1e-5, "sq_bar", seed)
        torch.testing.assert_close(out[case][1].double(), ref[1], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
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
    for got, ref in zip(out["heads_op"], mixer_heads_backward_reference(*_heads_args(*fwd, extra))):
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


@pytest.mark.parametrize("name", BASIS_SHAPES)
@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float32"])
def test_expand_basis_kernel_matches_float64(interpreted, name, dtype):
    seed, inputs, out = interpreted
    Y, F_s = inputs[f"basis_{name}"]
    Q = out[f"basis_{name}_{dtype}"]
    ref = expand_basis_reference(Y.double(), F_s.double(), torch.float64)
    assert Q.shape == ref.shape and str(Q.dtype) == dtype
    assert_close_elementwise(Q, ref, 2**-8 if Q.dtype == torch.bfloat16 else 1e-5, "Q_e", seed)  # one rounding


@pytest.mark.parametrize("name", BASIS_SHAPES)
@pytest.mark.parametrize("how", ["poison", "op"])
def test_expand_basis_kernel_reads_bf16_sketches(interpreted, name, how):
    """Y stored in bf16 (the mixer's sketch product) is read as it is and converted exactly: Q_e is the float64
    product of the same bf16 numbers, rounded once."""
    seed, inputs, out = interpreted
    _, F_s = inputs[f"basis_{name}"]
    Y = inputs[f"basis_{name}_bf16_y"]
    Q = out[f"basis_{name}_bf16_y_{how}"]
    ref = expand_basis_reference(Y.double(), F_s.double(), torch.float64)
    assert Q.dtype == torch.bfloat16 and Q.shape == ref.shape
    assert_close_elementwise(Q, ref, 2**-8, "Q_e", seed)


def test_expand_basis_op_and_fallback(interpreted):
    seed, inputs, out = interpreted
    Y, F_s = inputs["basis_small"]
    ref = expand_basis_reference(Y, F_s, torch.bfloat16)  # an fp32 product, then rounded: the same numbers
    torch.testing.assert_close(out["basis_op"].float(), ref.float(), rtol=2**-7, atol=1e-5, msg=f"seed {seed}")
    direct = torch.stack([Y[b] @ F_s[b] for b in range(Y.shape[0])])  # image by image
    got = expand_basis(Y, F_s, torch.float32)
    assert got.is_contiguous()
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expand_basis: Y \(B, d, c\) and F_s \(B, c, c\) expected, got"):
        expand_basis(Y, F_s[:, :-1], torch.float32)


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


def _token_inputs(B, N, K, r, p, seed):
    """float64 tokens x (B, N, K·p), orthonormal subspaces U, bases Q_c and scalars, for the references' tests."""
    gen = torch.Generator().manual_seed(seed)
    d = K * p
    x = torch.randn(B, N, d, generator=gen, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    return (x, U, *_forward_inputs(B, N, K, r, p, gen)[1:])


def test_reference_backward_equals_autograd_through_the_reference_forward():
    """The backward's formulas (both ops) against autograd in float64: ā, Q̄_c and the scalars."""
    B, N, K, r, p = 2, 7, 3, 4, 5
    x, U, Q_c, scalars = _token_inputs(B, N, K, r, p, seed=0)
    Q_c, scalars, a = Q_c.requires_grad_(), scalars.requires_grad_(), (x @ U).requires_grad_()
    d = K * p
    g, g_pi = torch.randn(B, N, d, dtype=torch.float64), torch.randn(B, N, K, dtype=torch.float64)
    g_Qe, P = torch.randn(B, N, K * r, dtype=torch.float64), torch.randn(B, N, K * r, dtype=torch.float64)
    z, pi, sq = mixer_memberships_reference(a, Q_c, scalars)
    # The loss the mixer's backward sees: z enters −β zUᵀ (cotangent g), π is an output; the Expand term
    # −α (x̂Q_e)Q_eᵀ adds −α<gQ_e, x̂Q_e> to α's.
    loss = -scalars[2] * (g * (z @ U.mT)).sum() + (g_pi * pi).sum() - scalars[1] * (g_Qe * P).sum()
    da, dQ, dS = torch.autograd.grad(loss, (a, Q_c, scalars))
    with torch.no_grad():
        sq_bar, sums = mixer_memberships_backward_reference(g_Qe, P, g @ U, a, pi, sq, g_pi, Q_c, scalars)
        a_bar, Qc_bar = mixer_heads_backward_reference(a, g @ U, pi, sq_bar, Q_c, scalars)
    torch.testing.assert_close(a_bar, da, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Qc_bar, dQ, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack([sums[2], sums[0], sums[1]]), dS, rtol=1e-10, atol=1e-12)


def test_reference_forward_is_the_paper_compress_term():
    """−β zUᵀ is −β Σ_k π_k U_k(I − Q_kQ_kᵀ)U_kᵀx̂ per token, with ‖col_k‖ = ‖Q_kQ_kᵀU_kᵀx̂‖, head by head."""
    B, N, K, r, p = 2, 5, 3, 2, 4
    d = K * p
    x, U, Q_c, scalars = _token_inputs(B, N, K, r, p, seed=1)
    z, pi, sq = mixer_memberships_reference(x @ U, Q_c, scalars)
    want = torch.zeros(B, N, d, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            U_k, Q_k = U[:, k * p : (k + 1) * p], Q_c[b, k]
            col = x[b] @ U_k @ Q_k @ Q_k.T  # (N, p)
            torch.testing.assert_close(sq[b, :, k], col.square().sum(-1))
            want[b] += pi[b, :, k, None] * (x[b] @ U_k - col) @ U_k.T
    torch.testing.assert_close(z @ U.mT, want)
    torch.testing.assert_close(pi, torch.softmax(sq.sqrt() / scalars[0], -1))


def test_bad_shapes_name_the_problem():
    a, Q_c, scalars = _forward_inputs(1, 4, 2, 3, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"a \(B, N, K·p\).*got \(1, 4, 9\), \(1, 2, 5, 3\)"):
        mixer_memberships(a[..., :9], Q_c, scalars)
    P, pi = a[..., :6], a[..., :2]
    with pytest.raises(ValueError, match=r"cotangent or saved shapes.*g_Qe \(1, 4, 5\)"):
        mixer_memberships_backward(P[..., :5], P, a, a, pi, pi, pi, Q_c, scalars)
    with pytest.raises(ValueError, match=r"mixer_heads_backward: g_U \(1, 4, 9\) must be a's \(1, 4, 10\)"):
        mixer_heads_backward(a, a[..., :9], pi, pi, Q_c, scalars)


_BF16 = dict.fromkeys(("P_ptr", "A_ptr", "Z_ptr", "GQ_ptr", "GU_ptr", "Abar_ptr"), "*bf16")


@pytest.mark.parametrize(
    "name",
    [
        "_memberships_fwd_kernel",
        "_memberships_bwd_kernel",
        "_heads_bwd_kernel",
        "_expand_basis_kernel",
        "_cast_dot_kernel",
    ],
)
def test_kernels_compile_for_hopper_without_a_gpu(name):
    """The S model's configuration (K = 8, r = 20, p = 48, bf16 activations) builds down to an sm_90 cubin;
    cast_dot as the mixer calls it (bf16 x̂ and copy, per-image scales)."""
    from pace.kernels._triton_mixer import CAST_DOT_BLOCK, TINY

    if name == "_cast_dot_kernel":
        constexprs = {"BLOCK": CAST_DOT_BLOCK, "ROUND_BF16": False, "HAS_T": True}
        pointers = {"X_ptr": "*bf16", "Out_ptr": "*bf16"}
    elif name == "_expand_basis_kernel":
        constexprs = {"BM": 32, "BN": 32, "BK": 32, "ROUND_BF16": False, "PRECISION": "tf32x3"}
        pointers = {"Y_ptr": "*bf16", "Q_ptr": "*bf16"}  # the mixer's bf16 sketch product and Q_e
    else:
        constexprs = {"BN": 16, "BR": 32, "BP": 64, "PRECISION": "tf32x3"}
        if name != "_heads_bwd_kernel":
            constexprs.update(TINY_=TINY, BK=8)
        if name == "_memberships_bwd_kernel":
            constexprs["HAS_GPI"] = False  # the training path: the block discards π
        else:
            constexprs["ROUND_BF16"] = False
        pointers = _BF16
    assert len(build_for_hopper("_triton_mixer", name, constexprs, pointers, 4)) > 1000
