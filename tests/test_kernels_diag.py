"""pace.kernels' diag-form membership ops: the Triton kernels under the interpreter against float64, the PyTorch
fallback against autograd, and the fused mixer's diag form with every Triton kernel against its float64 path."""

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
    diag_memberships,
    diag_memberships_backward,
    diag_memberships_backward_reference,
    diag_memberships_reference,
)
from pace.kernels.diag_ops import block_diag

# (B, N, K, p, c_e): ragged (N crosses the 16-token blocks, K, p and c_e below their padded sizes) and the S model's.
SHAPES = {"small": (2, 20, 3, 6, 15), "s": (1, 17, 8, 48, 160)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def _forward_inputs(B, N, K, p, gen):
    a_w = torch.randn(B, N, K * p, generator=gen, dtype=torch.float64)
    Q = torch.randn(B, K, p, 4, generator=gen, dtype=torch.float64) / 4
    keep = Q.square().sum(-1)  # diag(Q_kQ_kᵀ), in (0, 1) mostly
    scalars = torch.tensor([0.5 + torch.rand((), generator=gen).item(), 0.3, 0.7], dtype=torch.float64)
    return a_w, keep, scalars


def _backward_args(B, N, K, p, ce, a, keep, scalars, dtype, gen, g_pi=True):
    _, _, pi, sq = diag_memberships_reference(a.double(), keep.double(), scalars.double(), torch.float64)
    g_Qe, P_e = (torch.randn(B, N, ce, generator=gen).to(dtype) for _ in range(2))
    g_U = torch.randn(a.shape, generator=gen).to(dtype)
    g = torch.randn(pi.shape, generator=gen) if g_pi else None
    return (g_Qe, P_e, g_U, a, pi.float(), sq.float(), g, keep, scalars)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs drawn with a fresh seed, and the interpreter's outputs for them (one subprocess for the module)."""
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    cases, inputs = {}, {}
    for name, (B, N, K, p, ce) in SHAPES.items():
        a_w, keep, scalars = _forward_inputs(B, N, K, p, gen)
        a_w[0, 1] = 0  # a token with no component in any head: ‖col‖ = 0
        for dt, dtype in DTYPES.items():
            fwd = (a_w.float(), keep.float(), scalars.float(), dtype)
            bwd = _backward_args(B, N, K, p, ce, a_w.to(dtype), keep.float(), scalars.float(), dtype, gen)
            inputs[f"{name}_{dt}"] = (fwd, bwd)
            cases[f"fwd_{name}_{dt}"] = ("diag_fwd", fwd, "poison")
            cases[f"bwd_{name}_{dt}"] = ("diag_bwd", bwd, "poison")
    fwd, bwd = inputs["small_bf16"]
    cases["fwd_op"] = ("diag_fwd", fwd, "op")
    cases["bwd_op"] = ("diag_bwd", bwd, "op")
    no_g_pi = (*bwd[:6], None, *bwd[7:])  # π unused by the loss
    cases["bwd_no_g_pi"] = ("diag_bwd", no_g_pi, "poison")
    cases["bwd_no_g_pi_op"] = ("diag_bwd", no_g_pi, "op")
    # The whole fused mixer (diag form), every pace.kernels op on the Triton interpreter, fp32.
    inputs["mixer"], cases["mixer"] = pace_mixer_case(gen, "diag")
    return seed, inputs, run_interpreted(cases, tmp_path_factory.mktemp("interp"))


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_forward_kernel_matches_float64(interpreted, name, dt):
    seed, inputs, out = interpreted
    (a_w, keep, scalars, dtype), _ = inputs[f"{name}_{dt}"]
    a, z, pi, sq = out[f"fwd_{name}_{dt}"]
    assert a.dtype == z.dtype == dtype and pi.dtype == sq.dtype == torch.float32
    # float64 from the same fp32 inputs: z = π (1 − keep) a from the unrounded a, one rounding
    ref = diag_memberships_reference(a_w.double(), keep.double(), scalars.double(), torch.float64)
    assert torch.equal(a, a_w.to(dtype)), f"seed {seed}: a not rounded to nearest even"
    rounding = 2**-8 if dt == "bf16" else 1e-6
    for what, o, r, rel in zip(("z", "pi", "sq"), (z, pi, sq), ref[1:], (rounding, 1e-5, 1e-5)):
        assert_close_elementwise(o, r, rel, what, seed)
    K = SHAPES[name][2]
    assert sq[0, 1].abs().max() == 0 and torch.allclose(pi[0, 1].double(), torch.full_like(ref[2][0, 1], 1 / K))


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_backward_kernel_matches_float64(interpreted, name, dt):
    seed, inputs, out = interpreted
    _, bwd = inputs[f"{name}_{dt}"]
    a_bar, keep_bar, sums = out[f"bwd_{name}_{dt}"]
    assert a_bar.dtype == DTYPES[dt] and keep_bar.dtype == torch.float32 and sums.shape == (3,)
    ref = diag_memberships_backward_reference(*(t.double() for t in bwd))
    assert_close_elementwise(a_bar, ref[0], 2**-8 if dt == "bf16" else 1e-5, "a_bar", seed)
    assert_close_elementwise(keep_bar, ref[1], 1e-5, "keep_bar", seed)  # fp32 sums of exact (bf16) products
    torch.testing.assert_close(sums.double(), ref[2], rtol=1e-4, atol=1e-4, msg=f"seed {seed}: partial sums")


def test_backward_kernel_without_a_membership_cotangent(interpreted):
    """g_pi = None (π unused) is a zero cotangent: kernel and op as the float64 reference with zeros."""
    seed, inputs, out = interpreted
    _, bwd = inputs["small_bf16"]
    args = [t.double() for t in bwd]
    args[6] = torch.zeros_like(args[6])
    ref = diag_memberships_backward_reference(*args)
    for case in ("bwd_no_g_pi", "bwd_no_g_pi_op"):
        assert_close_elementwise(out[case][0], ref[0], 2**-8, "a_bar", seed)
        assert_close_elementwise(out[case][1], ref[1], 1e-5, "keep_bar", seed)
        torch.testing.assert_close(out[case][2].double(), ref[2], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    got = diag_memberships_backward_reference(*args[:6], None, *args[7:])  # the fallback takes None as well
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_public_ops_dispatch_to_interpreter_and_match_the_fallback(interpreted):
    seed, inputs, out = interpreted
    # The ops ran the kernels: the launchers' results on the same inputs, bit for bit.
    for case in ("fwd", "bwd"):
        for got, want in zip(out[f"{case}_op"], out[f"{case}_small_bf16"]):
            assert torch.equal(got, want), f"seed {seed}: {case} op did not run the kernel"
    fwd, bwd = inputs["small_bf16"]
    ref = diag_memberships_reference(*fwd)  # the fallback rounds a, π(1 − keep) and z: 3 roundings
    for what, got, want, tol in zip(("a", "z", "pi", "sq"), out["fwd_op"], ref, (0, 2**-6, 1e-5, 1e-5)):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-5, msg=f"seed {seed}: {what}")
    ref = diag_memberships_backward_reference(*bwd)
    # ā = −βπ(1 − keep)gU + 2∂‖col‖² keep² a: the fallback rounds both terms (and their sum) to bf16, so where they
    # cancel its error is a bf16 rounding of the terms (up to max|ā|), not of ā (seed 550899204: 1.1e-3 at ā ≈ 2e-3).
    # The kernel itself is held to float64 in test_backward_kernel_matches_float64.
    atol = 2**-7 * ref[0].float().abs().max().item()
    torch.testing.assert_close(out["bwd_op"][0].float(), ref[0].float(), rtol=2**-6, atol=atol, msg=f"seed {seed}")
    torch.testing.assert_close(out["bwd_op"][1], ref[1], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    # The fallback's α term sums bf16-rounded products gQ_e ⊙ P_e, the kernel fp32 ones.
    scale = (bwd[0].double() * bwd[1].double()).abs().sum().item()
    torch.testing.assert_close(out["bwd_op"][2][0], ref[2][0], rtol=0, atol=2**-8 * scale, msg=f"seed {seed}")
    torch.testing.assert_close(out["bwd_op"][2][1:], ref[2][1:], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


def test_fused_mixer_on_the_interpreted_kernels_matches_float64(interpreted):
    """Every pace.kernels op of the diag form (the two diag kernels included) inside pace_mixer, fp32."""
    seed, inputs, out = interpreted
    assert_pace_mixer_matches_float64(inputs["mixer"], out["mixer"], "diag", seed)


def test_reference_backward_equals_autograd_through_the_reference_forward():
    """The backward's formulas against autograd in float64 (z enters −β zUᵀ, π an output, α through P_e)."""
    gen = torch.Generator().manual_seed(0)
    B, N, K, p, ce = 2, 7, 3, 5, 6
    a_w, keep, scalars = (t.requires_grad_() for t in _forward_inputs(B, N, K, p, gen))
    P_e = torch.randn(B, N, ce, dtype=torch.float64, generator=gen)
    g_Qe, g_U = torch.randn(P_e.shape, dtype=torch.float64), torch.randn(a_w.shape, dtype=torch.float64)
    g_pi = torch.randn(B, N, K, dtype=torch.float64)
    _, z, pi, sq = diag_memberships_reference(a_w, keep, scalars, torch.float64)
    # The loss the mixer's backward sees: −α x̂Q_e enters GEMM 2 (cotangent gQ_e), z enters −β zUᵀ.
    loss = -scalars[1] * (g_Qe * P_e).sum() - scalars[2] * (g_U * z).sum() + (g_pi * pi).sum()
    da, dkeep, dS = torch.autograd.grad(loss, (a_w, keep, scalars))
    with torch.no_grad():
        a_bar, keep_bar, sums = diag_memberships_backward_reference(g_Qe, P_e, g_U, a_w, pi, sq, g_pi, keep, scalars)
    torch.testing.assert_close(a_bar, da, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(keep_bar, dkeep, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack([sums[2], sums[0], sums[1]]), dS, rtol=1e-10, atol=1e-12)


def test_block_diag_puts_each_head_block_on_the_diagonal():
    blocks = torch.randn(2, 3, 2, 4)
    full = block_diag(blocks)
    assert full.shape == (2, 6, 12) and torch.equal(full[1, 2:4, 4:8], blocks[1, 1]) and full[0, :2, 4:].eq(0).all()


def test_bad_shapes_name_the_problem():
    a_w, keep, scalars = _forward_inputs(1, 4, 2, 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"diag_memberships: a \(B, N, K·p\).*got \(1, 4, 9\)"):
        diag_memberships(a_w[..., :9], keep, scalars, torch.float32)
    args = list(_backward_args(1, 4, 2, 5, 3, a_w, keep, scalars, torch.float64, torch.Generator().manual_seed(1)))
    args[4] = args[4][..., :1]
    with pytest.raises(ValueError, match="cotangent or saved shapes"):
        diag_memberships_backward(*args)


_BF16 = dict.fromkeys(("A_ptr", "Z_ptr", "GQ_ptr", "Pe_ptr", "GU_ptr", "Abar_ptr"), "*bf16")


@pytest.mark.parametrize("name", ["_diag_fwd_kernel", "_diag_bwd_kernel"])
def test_kernels_compile_for_hopper_without_a_gpu(name):
    """The S model's configuration (K = 8, p = 48, c_e = 160, bf16 activations) builds down to an sm_90 cubin."""
    from pace.kernels._triton_diag import TINY

    constexprs = {"TINY_": TINY, "BN": 16, "BK": 8, "BP": 64, "ROUND_BF16": False}
    if name == "_diag_bwd_kernel":
        constexprs.update(BC=256, HAS_GPI=False)  # the training path: the block discards π
    assert len(build_for_hopper("_triton_diag", name, constexprs, _BF16, 4)) > 1000
