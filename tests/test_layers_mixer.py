"""The fused PACE mixer (pace.layers.mixer): equal to the separate operators in float64, gradients included."""

from functools import partial

import pytest
import torch
import torch._dynamo
from reference_pace import dense_compress, dense_expand

from pace.layers import PACEAttention, PACEBlock, pace_attention
from pace.layers.basis import inverse_cholesky_factor
from pace.layers.mixer import pace_mixer

B, N, C, K, RANK = 2, 24, 16, 2, 3
NAMES = ("x", "U", "tau", "alpha", "beta")


def _inputs(dtype=torch.float64, b=B, n=N, c=C, k=K, rank=RANK):
    x = torch.randn(b, n, c, dtype=dtype, requires_grad=True)
    U = torch.linalg.qr(torch.randn(c, c, dtype=dtype)).Q.requires_grad_()
    tau = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    alpha = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    beta = torch.tensor(0.6, dtype=dtype, requires_grad=True)
    return x, U, tau, alpha, beta, torch.randn(n, rank * k, dtype=dtype), torch.randn(n, rank, dtype=dtype)


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_inverse_cholesky_factor_is_upper_triangular_and_inverts_the_gram():
    A = torch.randn(3, 9, 6, dtype=torch.float64)
    G = A.mT @ A + 0.01 * torch.eye(6, dtype=torch.float64)
    F = inverse_cholesky_factor(G)
    assert torch.equal(F, F.triu())
    torch.testing.assert_close(F @ F.mT, torch.linalg.inv(G), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_mixer_equals_the_separate_operators_in_float64_with_random_cotangents(form):
    x, U, tau, alpha, beta, e_sketch, c_sketch = _inputs()
    args, kw = (x, U, tau, alpha, beta, e_sketch, c_sketch), {"num_heads": K, "eps": 0.01, "form": form}
    out, pi = pace_mixer(*args, **kw)
    ref, ref_pi = pace_attention(*args, fused=False, **kw)
    assert _relative(out, ref) < 1e-12 and _relative(pi, ref_pi) < 1e-12
    # Random cotangents on the update and on π: a π.sum() term would have a vanishing gradient (Σ_k π_k = 1).
    g, g_pi = torch.randn_like(out), torch.randn_like(pi)
    params = (x, U, tau, alpha, beta)
    fast = torch.autograd.grad((out * g).sum() + (pi * g_pi).sum(), params, retain_graph=True)
    slow = torch.autograd.grad((ref * g).sum() + (ref_pi * g_pi).sum(), params)
    for name, a, b in zip(NAMES, fast, slow):
        assert _relative(a, b) < 1e-10, name
    # The π cotangent alone reaches τ, U and x (the update's α path does not).
    only_pi = torch.autograd.grad((pi * g_pi).sum(), (x, U, tau))
    assert all(t.abs().max() > 1e-6 for t in only_pi)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_mixer_matches_the_dense_oracle(form):
    x, U, tau, alpha, beta, e_sketch, c_sketch = _inputs()
    out, pi = pace_mixer(x, U, tau, alpha, beta, e_sketch, c_sketch, num_heads=K, eps=0.01, form=form)
    ref_c, ref_pi = dense_compress(x, U, tau, c_sketch, num_heads=K, eps=0.01, exact=False, form=form)
    ref = alpha * dense_expand(x, e_sketch, eps=0.01, exact=False) - beta * ref_c
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pi, ref_pi, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_mixer_passes_gradcheck(form):
    x, U, tau, alpha, beta, e_sketch, c_sketch = _inputs(b=1, n=7, c=6, k=2, rank=2)

    def fn(x, U, tau, alpha, beta):
        return pace_mixer(x, U, tau, alpha, beta, e_sketch, c_sketch, num_heads=2, eps=0.05, form=form)

    assert torch.autograd.gradcheck(fn, (x, U, tau, alpha, beta))


@pytest.mark.parametrize("form", ["full", "diag"])
def test_attention_module_fused_flag_selects_an_equal_path(form):
    fused = PACEAttention(C, K, rank=RANK, compress_form=form, fused=True, dtype=torch.float64)
    plain = PACEAttention(C, K, rank=RANK, compress_form=form, fused=False, dtype=torch.float64)
    plain.load_state_dict(fused.state_dict())
    assert fused.fused and not plain.fused
    x = torch.randn(B, N, C, dtype=torch.float64)
    g = torch.randn(B, N, C, dtype=torch.float64)
    for module in (fused, plain):
        module.train()
        (module(x) * g).sum().backward()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_exact_projector_falls_back_to_the_separate_operators():
    x, U, tau, alpha, beta, e_sketch, c_sketch = _inputs()
    kw = {"num_heads": K, "eps": 0.01, "exact": True}
    fused, _ = pace_attention(x, U, tau, alpha, beta, e_sketch, c_sketch, fused=True, **kw)
    plain, _ = pace_attention(x, U, tau, alpha, beta, e_sketch, c_sketch, fused=False, **kw)
    assert torch.equal(fused, plain)


def test_default_path_is_the_separate_operators_on_the_cpu():
    # The CPU is FLOP-bound and the fused mixer's Compress products are K-fold wider: fused=None keeps the
    # separate operators there (and picks the mixer on accelerators, where bytes dominate).
    args = _inputs()
    kw = {"num_heads": K, "eps": 0.01}
    default, _ = pace_attention(*args, **kw)
    assert torch.equal(default, pace_attention(*args, fused=False, **kw)[0])
    assert not torch.equal(default, pace_attention(*args, fused=True, **kw)[0])  # rounding differs: a real switch
    assert PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK)).attn.fused is None


@pytest.mark.parametrize("form", ["full", "diag"])
def test_mixer_under_bf16_autocast_is_as_accurate_as_the_separate_operators(form):
    x, U, tau, alpha, beta, e_sketch, c_sketch = (t.detach() for t in _inputs(b=2, n=49, c=64, k=4, rank=4))
    args = (x, U, tau, alpha, beta, e_sketch, c_sketch)
    kw = {"num_heads": 4, "eps": 0.01, "form": form}
    exact, exact_pi = pace_attention(*args, fused=False, **kw)  # float64

    def low(fused):
        leaves = [t.float().requires_grad_() for t in args[:5]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, pi = pace_attention(*leaves, *(s.float() for s in args[5:]), fused=fused, **kw)
        assert out.dtype == torch.float32
        return out, pi, leaves

    f_out, f_pi, _ = low(True)
    p_out, p_pi, _ = low(False)
    f_err, p_err = _relative(f_out.double(), exact), _relative(p_out.double(), exact)
    assert f_err < 2 * p_err + 1e-3, (f_err, p_err)
    assert _relative(f_pi.double(), exact_pi) < 2 * _relative(p_pi.double(), exact_pi) + 1e-3


@pytest.mark.parametrize("form", ["full", "diag"])
def test_fused_block_compiles_without_graph_breaks_and_matches_eager(form):
    torch._dynamo.reset()
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK, compress_form=form, fused=True))
    x = torch.randn(B, N, C, requires_grad=True)
    block(x)  # draw the sketch eagerly
    explanation = torch._dynamo.explain(block)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    g = torch.randn(B, N, C)
    grads = []
    for fn in (block, compiled):
        block.zero_grad()
        x.grad = None
        (fn(x) * g).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
