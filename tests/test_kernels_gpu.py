"""pace.kernels' compiled Triton kernels on CUDA at the layers' real sizes, against float64 (needs a GPU)."""

import pytest
import torch
from kernels_helpers import ridge_gram

from pace.kernels import (
    _dispatch,
    compress_memberships,
    compress_memberships_reference,
    inverse_cholesky_factor,
    inverse_cholesky_factor_reference,
    normalized_gram,
    normalized_gram_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
EPS = 0.01


@pytest.mark.parametrize(("batch", "c"), [(1024, 20), (128, 80), (128, 160), (16, 320), (64, 7), (32, 33)])
def test_factor_on_cuda_matches_float64(batch, c):
    module = _dispatch.triton_module(torch.empty(0, device="cuda"))
    assert module is not None
    G = ridge_gram(batch, 2 * c, c, EPS, torch.Generator().manual_seed(c))
    out = torch.full((batch, c, c), float("nan"), device="cuda")
    F = module.inverse_cholesky_factor(G.float().cuda(), out=out).cpu().double()
    assert torch.isfinite(F).all() and (F.tril(-1) == 0).all()
    F64 = inverse_cholesky_factor_reference(G)
    err = ((F - F64).norm(dim=(-2, -1)) / F64.norm(dim=(-2, -1))).max().item()
    ref = inverse_cholesky_factor_reference(G.float()).double()
    ref_err = ((ref - F64).norm(dim=(-2, -1)) / F64.norm(dim=(-2, -1))).max().item()
    assert err <= max(1e-5, 4 * ref_err), (err, ref_err)
    # The public op picks Triton for CUDA tensors by default and gives the same numbers.
    assert torch.equal(inverse_cholesky_factor(G.float().cuda()).cpu(), F.float())


@pytest.mark.parametrize(("batch", "m", "c"), [(1024, 48, 20), (128, 384, 160), (8, 100, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_on_cuda_matches_float64(batch, m, c, dtype):
    Y = torch.randn(batch, m, c).to(dtype)
    Y[0, :, 0] = 0
    scale, G = normalized_gram(Y.cuda(), EPS)
    scale64, G64 = normalized_gram_reference(Y.double(), EPS)
    assert ((scale.cpu().double() - scale64).abs() / scale64).max().item() <= 1e-6
    assert (G.cpu().double() - G64).abs().max().item() <= 2e-6


def test_compiled_basis_on_cuda():
    def basis(Y):
        scale, G = normalized_gram(Y, EPS)
        return (Y.float() / scale) @ inverse_cholesky_factor(G)

    Y = torch.randn(64, 48, 20, device="cuda", requires_grad=True)
    compiled = torch.compile(basis, fullgraph=True)
    out = compiled(Y)
    (grad,) = torch.autograd.grad(out.square().sum(), Y)
    Y64 = Y.detach().double().cpu().requires_grad_()
    expected = basis(Y64)
    (grad64,) = torch.autograd.grad(expected.square().sum(), Y64)
    assert (out.detach().cpu().double() - expected).abs().max().item() <= 1e-4
    assert ((grad.cpu().double() - grad64).abs().max() / grad64.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memberships_on_cuda_match_float64(dtype):
    B, N, K, p = 16, 196, 8, 48
    a = torch.randn(B * K, N, p).view(B, K, N, p).transpose(1, 2).to(dtype)  # head-major storage
    col = (0.5 * torch.randn(B * K, N, p)).view(B, K, N, p).transpose(1, 2).to(dtype)
    tau = torch.tensor(0.4)
    w, pi = compress_memberships(a.cuda(), col.cuda(), tau.cuda())
    w64, pi64 = compress_memberships_reference(a.double(), col.double(), tau.double())
    assert (pi.cpu().double() - pi64).abs().max().item() <= 1e-6
    tol = 1e-6 if dtype == torch.float32 else 2**-8 + 1e-6
    assert ((w.cpu().double() - w64).abs() / w64.abs().clamp_min(1e-3)).max().item() <= tol


def test_the_layers_factor_dispatches_to_the_kernel_on_cuda():
    # pace.layers.basis routes CUDA factors through pace.kernels: same numbers as the op, float64 stays float64.
    from pace.layers.basis import inverse_cholesky_factor as layers_factor

    G = ridge_gram(256, 40, 20, EPS, torch.Generator().manual_seed(1))
    assert torch.equal(layers_factor(G.float().cuda()), inverse_cholesky_factor(G.float().cuda()))
    F64 = layers_factor(G.cuda())
    assert F64.dtype == torch.float64
    torch.testing.assert_close(F64.cpu(), inverse_cholesky_factor_reference(G))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_memberships_on_cuda_match_float64(dtype):
    """The fused mixer's membership kernels (forward, backward through π, backward per head) at the S model's
    sizes, against float64."""
    from pace.kernels import (
        mixer_heads_backward,
        mixer_heads_backward_reference,
        mixer_memberships,
        mixer_memberships_backward,
        mixer_memberships_backward_reference,
        mixer_memberships_reference,
    )

    gen = torch.Generator().manual_seed(3)
    B, N, K, r, p = 16, 196, 8, 20, 48
    a = torch.randn(B, N, K * p, generator=gen).to(dtype)
    Q_c = torch.randn(B, K, p, r, generator=gen) / p**0.5
    scalars = torch.tensor([0.7, 0.3, 0.6])
    out = mixer_memberships(a.cuda(), Q_c.cuda(), scalars.cuda())
    ref = mixer_memberships_reference(a.double(), Q_c.double(), scalars.double())
    rel = 2**-8 if dtype == torch.bfloat16 else 1e-5
    for got, want, tol in zip(out, ref, (rel, 1e-5, 1e-5)):
        got = got.cpu().double()
        assert ((got - want).abs() <= tol * want.abs() + 1e-5 * want.abs().max()).all()
    g_Qe, P = (torch.randn(B, N, K * r, generator=gen).to(dtype) for _ in range(2))
    g_U = torch.randn(a.shape, generator=gen).to(dtype)
    g_pi = torch.randn(B, N, K, generator=gen)
    for pi_cot in (g_pi, None):  # None: π unused, the training path
        args = (g_Qe, P, g_U, a, ref[1].float(), ref[2].float(), pi_cot, Q_c, scalars)
        sq_bar, sums = mixer_memberships_backward(*(None if t is None else t.cuda() for t in args))
        want = mixer_memberships_backward_reference(*(None if t is None else t.double() for t in args))
        torch.testing.assert_close(sq_bar.cpu().double(), want[0], rtol=1e-4, atol=1e-4 * want[0].abs().max().item())
        torch.testing.assert_close(sums.cpu().double(), want[1], rtol=1e-4, atol=1e-3)
        heads = (a, g_U, ref[1].float(), want[0].float(), Q_c, scalars)
        a_bar, Qc_bar = mixer_heads_backward(*(t.cuda() for t in heads))
        want = mixer_heads_backward_reference(*(t.double() for t in heads))
        for o, w, tol in zip((a_bar, Qc_bar), want, (2 * rel, 1e-5)):  # Q̄_c: summed over 196 tokens in fp32
            o = o.cpu().double()
            assert ((o - w).abs() <= tol * w.abs() + 1e-5 * w.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diag_memberships_on_cuda_match_float64(dtype):
    """The diag form's membership kernels (forward and backward) at the S model's sizes, against float64."""
    from pace.kernels import (
        diag_memberships,
        diag_memberships_backward,
        diag_memberships_backward_reference,
        diag_memberships_reference,
    )

    gen = torch.Generator().manual_seed(4)
    B, N, K, p, ce = 16, 196, 8, 48, 160
    a_w = torch.randn(B, N, K * p, generator=gen)
    keep = (torch.randn(B, K, p, 20, generator=gen) / 20).square().sum(-1)  # diag(Q_kQ_kᵀ)
    scalars = torch.tensor([0.7, 0.3, 0.6])
    a, z, pi, sq = diag_memberships(a_w.cuda(), keep.cuda(), scalars.cuda(), dtype)
    ref = diag_memberships_reference(a_w.double(), keep.double(), scalars.double(), torch.float64)
    rel = 2**-8 if dtype == torch.bfloat16 else 1e-5
    assert torch.equal(a.cpu(), a_w.to(dtype))
    for got, want, tol in zip((z, pi, sq), ref[1:], (rel, 1e-5, 1e-5)):
        got = got.cpu().double()
        assert ((got - want).abs() <= tol * want.abs() + 1e-5 * want.abs().max()).all()
    g_Qe, P_e = (torch.randn(B, N, ce, generator=gen).to(dtype) for _ in range(2))
    g_U = torch.randn(a_w.shape, generator=gen).to(dtype)
    g_pi = torch.randn(B, N, K, generator=gen)
    args = (g_Qe, P_e, g_U, a_w.to(dtype), ref[2].float(), ref[3].float(), g_pi, keep, scalars)
    for pi_cot in (g_pi, None):  # None: π unused, the training path
        args = (*args[:6], pi_cot, *args[7:])
        a_bar, keep_bar, sums = diag_memberships_backward(*(None if t is None else t.cuda() for t in args))
        want = diag_memberships_backward_reference(*(None if t is None else t.double() for t in args))
        a_bar = a_bar.cpu().double()
        assert ((a_bar - want[0]).abs() <= 2 * rel * want[0].abs() + 1e-5 * want[0].abs().max()).all()
        torch.testing.assert_close(keep_bar.cpu().double(), want[1], rtol=1e-4, atol=1e-4 * want[1].abs().max().item())
        torch.testing.assert_close(sums.cpu().double(), want[2], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sketch_dtype", [torch.float32, torch.bfloat16])
def test_expand_basis_on_cuda_matches_float64(sketch_dtype):
    """Q_e = Y F_s at the S model's sizes (B = 32), from fp32 and from bf16 sketches (the mixer's): fp32-accurate
    products (3xTF32), one rounding to bf16."""
    from pace.kernels import expand_basis, expand_basis_reference

    gen = torch.Generator().manual_seed(5)
    B, d, c = 32, 384, 160
    S = torch.randn(B, d, c + 20, generator=gen).to(sketch_dtype)
    F_s = torch.randn(B, c, c, generator=gen).triu() / c**0.5
    Q = expand_basis(S.cuda()[..., :c], F_s.cuda(), torch.bfloat16)
    ref = expand_basis_reference(S[..., :c].double(), F_s.double(), torch.float64)
    err = (Q.cpu().double() - ref).abs()
    assert (err <= 2**-8 * ref.abs() + 1e-5 * ref.abs().max()).all(), err.max().item()


@pytest.mark.parametrize("form", ["full", "diag"])
def test_traced_fused_block_on_cuda_matches_eager(form):
    """The fused block with the pace:: Triton ops traced by torch.compile (fake implementations, one graph, AOT
    autograd) gives eager's numbers on CUDA. aot_eager, not inductor, to keep this step short: bench_model's
    compiled modes run Inductor on the same ops. fp32: under bf16 the scalar gradients are too noisy to compare."""
    from functools import partial

    import torch._dynamo

    from pace.layers import PACEAttention, PACEBlock

    torch._dynamo.reset()
    block = PACEBlock(384, 8, attn_layer=partial(PACEAttention, rank=20, compress_form=form, fused=True)).cuda()
    x = torch.randn(4, 196, 384, device="cuda", requires_grad=True)
    g = torch.randn(4, 196, 384, device="cuda")
    block(x)  # draw the sketches eagerly
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        block.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x)
        (y * g).sum().backward()
        results.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for eager, traced in zip(*results):
        assert ((traced - eager).abs().max() / eager.abs().max().clamp_min(1e-6)).item() < 1e-4


def test_matmul_sum_on_cuda_matches_float64_at_s_sizes():
    """GEMM 2 and x̄ of the S model's fused mixer (B = 8, N = 196, d = 384, c = 160 + 160, r = 20) on CUDA: bf16
    tiles exact with fp32 accumulation, fp32 tiles as 3xTF32; float64 of the same operands to 1e-5."""
    from pace.kernels import matmul_sum

    gen = torch.Generator().manual_seed(0)
    B, N, d, c, r = 8, 196, 384, 320, 20
    bf = torch.bfloat16
    x, Ps = torch.randn(B, N, d, generator=gen), torch.randn(B, N, c, generator=gen).to(bf)
    z, R = torch.randn(B, N, d, generator=gen).to(bf), torch.randn(B, d, c, generator=gen).to(bf)
    U, omega = torch.randn(d, d, generator=gen), torch.randn(N, 180, generator=gen).to(bf)
    Ye, Sc = torch.randn(B, d, 160, generator=gen), torch.randn(B, d, r, generator=gen)
    scalars = torch.tensor([1.3, 0.7, 0.4])
    residual, t = torch.randn(B, N, d, generator=gen), torch.tensor([0.0, 1 / 0.9] * (B // 2))
    cases = {
        "gemm2": (x, [Ps, z], [R.mT, U.mT], [2, 0, -3], {}),
        "gemm2_residual": (x.to(bf), [Ps, z], [R.mT, U.mT], [2, 0, -3], {"D": residual, "batch_scale": t}),
        "grad_x": (x, [Ps, z, omega[:, :160], omega[:, 160:]], [R.mT, U.mT, Ye.mT, Sc.mT], [2, 0, 0, 0, 0], {}),
    }
    for name, (C, lhs, rhs, codes, options) in cases.items():
        ref = matmul_sum(
            C.double(), [t.double() for t in lhs], [t.double() for t in rhs], scalars=scalars.double(), codes=codes,
            dtype=torch.float64, **{k: v.double() for k, v in options.items()},
        )  # fmt: skip
        cuda = [C.cuda(), [t.cuda() for t in lhs], [t.cuda() for t in rhs]]
        got = matmul_sum(*cuda, scalars=scalars.cuda(), codes=codes, **{k: v.cuda() for k, v in options.items()})
        err = ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (name, err)
    # The sketch product S written in bf16 (as the Expand ridge's Ȳ_e is): each entry the float64 value rounded to
    # nearest (one bf16 step off where fp32 accumulation crosses a boundary, rarely).
    S_lhs, S_rhs = z.mT, omega  # (B, d, N) @ (N, 180)
    got = matmul_sum(None, [S_lhs.cuda()], [S_rhs.cuda()], out_dtype=bf).cpu()
    assert got.dtype == bf
    assert (got != (S_lhs.double() @ S_rhs.double()).to(bf)).float().mean() < 0.01


@pytest.mark.parametrize(("batch", "c"), [(1024, 20), (128, 160)])
def test_ridge_backward_kernels_on_cuda_match_float64(batch, c):
    """The ridge backward's c × c work at the S model's sizes (Compress: register tile; Expand: row kernel)."""
    from pace.kernels import ridge_gradient_matrix, ridge_radial_diagonal, symmetric_gradient
    from pace.kernels.ridge import ridge_gradient_matrix_reference
    from pace.layers.basis import scaled_ridge_factors

    gen = torch.Generator().manual_seed(c)
    Y = torch.randn(batch, 2 * c, c, generator=gen, dtype=torch.float64)
    scale, G, F_s = scaled_ridge_factors(Y, EPS)
    W = Y.mT @ torch.randn(batch, 2 * c, c, generator=gen, dtype=torch.float64)
    ref = ridge_gradient_matrix_reference(W, F_s, G, scale, EPS)
    args = [t.float().cuda() for t in (W, F_s, G, scale)]
    if c <= 32:
        got = ridge_gradient_matrix(*args, EPS)
    else:
        got = ridge_radial_diagonal(*args[:3], symmetric_gradient(*args[:2], half=True), args[3], EPS, half=True)
    err = ((got.cpu().double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, err


@pytest.mark.parametrize("form", ["full", "diag"])
def test_block_residual_and_stochastic_depth_on_cuda(form):
    """An S block on CUDA under bf16 autocast, training with stochastic depth: the residual and DropPath's scales
    added in GEMM 2's epilogue (and g scaled in cast_dot, the residual's cotangent added in the norm's backward)
    give what the mixer (with the norm inside) gives with DropPath and the residual added outside it, to float32
    rounding (output and every gradient)."""
    from functools import partial

    from pace.layers import PACEAttention, PACEBlock

    torch.manual_seed(0)
    attn = partial(PACEAttention, rank=20, compress_form=form)
    block = PACEBlock(384, 8, attn_layer=attn, drop_path=0.5).cuda().train()
    x = torch.randn(8, 196, 384, device="cuda", requires_grad=True)
    g = torch.randn_like(x)

    def run(fn):
        for p in (x, *block.parameters()):
            p.grad = None
        torch.manual_seed(1)  # the same images dropped in both runs
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.backward(g)
        return [y.detach()] + [t.grad.clone() for t in (x, *block.parameters())]

    fused = run(block)
    separate = run(lambda t: t + block.drop_path(block.attn(t, norm=block.norm)))
    assert (fused[0] == x.detach()).flatten(1).all(1).any()  # seed 1 drops an image: both branches are checked
    for got, ref in zip(fused, separate):
        assert ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item() < 1e-4


def test_layer_norm_kernels_on_cuda_match_float64():
    """The block's LayerNorm kernels at S sizes (128 × 196 tokens, C = 384): the bf16 normalised tokens within one
    rounding of float64, μ and rstd, and the backward (bf16 x̄, a residual cotangent) against float64 autograd."""
    import torch.nn.functional as F

    from pace.kernels import layer_norm_backward, layer_norm_cast

    assert _dispatch.triton_module(torch.empty(0, device="cuda"), "_triton_norm") is not None
    torch.manual_seed(0)
    x = torch.randn(128, 196, 384, device="cuda") * 2 + 0.5
    w, b = torch.rand(384, device="cuda") + 0.5, torch.randn(384, device="cuda")
    dy, r = torch.randn_like(x).bfloat16(), torch.randn_like(x)
    y, mean, rstd = layer_norm_cast(x, w, b, 1e-6, torch.bfloat16)
    dx, dw, db = layer_norm_backward(dy, x, mean, rstd, w, r)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y64 = F.layer_norm(x64, (384,), w64, b64, 1e-6)
    y64.backward(dy.double())
    assert y.dtype == torch.bfloat16 and ((y.double() - y64).abs() <= 2**-8 * y64.abs() + 1e-6).all()
    var, mu = torch.var_mean(x.double(), dim=-1, unbiased=False)
    assert (mean.double() - mu).abs().max() < 1e-6 * mu.abs().max()
    assert ((rstd.double() - (var + 1e-6).rsqrt()).abs() / (var + 1e-6).rsqrt()).max() < 1e-5
    for got, ref in ((dx, x64.grad + r.double()), (dw, w64.grad), (db, b64.grad)):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
