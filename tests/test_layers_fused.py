"""The fused fast path of the PACE layer: closed-form projector backward, shared output product, compile graph."""

from functools import partial

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from reference_pace import dense_compress, dense_expand

from pace.layers import ConvStem, PACEAttention, PACEBlock, pace_attention, ridge_basis, ridge_project

B, N, C, K, RANK = 2, 24, 16, 2, 3


def _autograd_projection(x, sketch, eps, complement, scale=None):
    # The same map written with plain differentiable ops (autograd through the Cholesky and the solve).
    Q = ridge_basis(x.mT @ sketch, eps=eps)
    out = (x @ Q) @ Q.mT
    out = x - out if complement else out
    return out if scale is None else scale * out


@pytest.mark.parametrize("complement", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_ridge_project_closed_form_backward_passes_gradcheck(complement, scaled):
    x = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    sketch = torch.randn(9, 3, dtype=torch.float64)
    inputs = (x, torch.tensor(0.7, dtype=torch.float64, requires_grad=True)) if scaled else (x,)

    def fn(x, scale=None):
        return ridge_project(x, sketch, eps=0.05, complement=complement, scale=scale)

    assert torch.autograd.gradcheck(fn, inputs)
    # And it is the function autograd differentiates through the basis.
    g = torch.randn(2, 9, 7, dtype=torch.float64)
    fast = torch.autograd.grad((fn(*inputs) * g).sum(), inputs)
    plain = torch.autograd.grad((_autograd_projection(x, sketch, 0.05, complement, *inputs[1:]) * g).sum(), inputs)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ridge_project_gradient_with_a_degenerate_sketch_matches_autograd():
    # A zero token column makes one column of Y = xᵀΩ vanish (norm clamped, as F.normalize does).
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    sketch = torch.randn(6, 3, dtype=torch.float64)
    sketch[:, 1] = 0.0
    g = torch.randn(2, 6, 5, dtype=torch.float64)
    fast = torch.autograd.grad((ridge_project(x, sketch, eps=0.05) * g).sum(), x)[0]
    plain = torch.autograd.grad((_autograd_projection(x, sketch, 0.05, False, None) * g).sum(), x)[0]
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)


def _inputs(dtype=torch.float64):
    x = torch.randn(B, N, C, dtype=dtype, requires_grad=True)
    U = torch.linalg.qr(torch.randn(C, C, dtype=dtype)).Q.requires_grad_()
    tau = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    alpha = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    beta = torch.tensor(0.6, dtype=dtype, requires_grad=True)
    e_sketch = torch.randn(N, RANK * K, dtype=dtype)
    c_sketch = torch.randn(N, RANK, dtype=dtype)
    return x, U, tau, alpha, beta, e_sketch, c_sketch


@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("exact", [False, True], ids=["ridge", "exact"])
def test_fused_attention_and_its_gradients_match_the_dense_oracle(form, exact):
    x, U, tau, alpha, beta, e_sketch, c_sketch = _inputs()
    kw = {"eps": 0.01, "exact": exact}
    out, pi = pace_attention(x, U, tau, alpha, beta, e_sketch, c_sketch, num_heads=K, form=form, **kw)
    ref_c, ref_pi = dense_compress(x, U, tau, c_sketch, num_heads=K, form=form, **kw)
    ref = alpha * dense_expand(x, e_sketch, **kw) - beta * ref_c
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pi, ref_pi, rtol=1e-9, atol=1e-9)
    # Gradients of every input through the fused path (closed-form projector backward, folded α and β) against
    # autograd through the oracle's explicit projectors.
    # A random cotangent on π as well (π sums to 1 over heads, so pi.sum() would have a zero gradient).
    g, g_pi = torch.randn_like(out), torch.randn_like(pi)
    params = (x, U, tau, alpha, beta)
    fast = torch.autograd.grad((out * g).sum() + (pi * g_pi).sum(), params)
    slow = torch.autograd.grad((ref * g).sum() + (ref_pi * g_pi).sum(), params)
    for name, a, b in zip(("x", "U", "tau", "alpha", "beta"), fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=name)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_fused_attention_under_bf16_autocast_stays_close_to_float32(form):
    x, U, tau, alpha, beta, e_sketch, c_sketch = (t.detach().float() for t in _inputs())
    args = (x, U, tau, alpha, beta, e_sketch, c_sketch)
    reference, _ = pace_attention(*args, num_heads=K, eps=0.01, form=form)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, pi = pace_attention(*args, num_heads=K, eps=0.01, form=form)
    assert low.dtype == torch.float32 and torch.isfinite(pi).all()
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()


def _explain(block, x):
    explanation = torch._dynamo.explain(block)(x)
    return explanation.graph_count, explanation.graph_break_count


@pytest.mark.parametrize("form", ["full", "diag"])
def test_block_compiles_without_graph_breaks(form):
    torch._dynamo.reset()
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK, compress_form=form))
    x = torch.randn(B, N, C, requires_grad=True)
    assert _explain(block, x) == (1, 0)  # first forward: the sketch is drawn inside the graph
    block(x)
    assert _explain(block, x) == (1, 0)  # stored sketch, training
    block.set_epoch(1)
    assert _explain(block, x) == (1, 0)  # the epoch's redraw happened in set_epoch
    block.eval()
    assert _explain(block, x) == (1, 0)  # evaluation with the stored sketch
    assert _explain(block, torch.randn(B, N + 12, C)) == (1, 0)  # another token count: derived in the graph


def test_compiled_training_runs_one_graph_per_step_across_epochs():
    torch._dynamo.reset()
    graphs, runs = [], []

    def backend(gm, example_inputs):
        index = len(graphs)
        graphs.append(gm)

        def run(*args):
            runs.append(index)
            return gm.forward(*args)

        return run

    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK))
    compiled = torch.compile(block, backend=backend)
    x = torch.randn(B, N, C, requires_grad=True)
    compiled(x).sum().backward()  # draws; the next call recompiles once to the stored-sketch graph
    compiled(x).sum().backward()
    settled = len(graphs)
    for epoch in range(1, 4):
        block.set_epoch(epoch)
        for _ in range(2):
            runs.clear()
            compiled(x).sum().backward()
            assert runs == [settled - 1]
    assert len(graphs) == settled


def test_set_epoch_draws_the_new_sketch_at_once():
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK))
    block(torch.randn(B, N, C))
    block.set_epoch(3)
    expand_op = block.attn.expand
    assert expand_op._stored_current
    assert torch.equal(expand_op.sketch, expand_op.derived_sketch(N))
    other = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK))
    other.set_epoch(3)
    other(torch.randn(B, N, C))
    assert torch.equal(other.attn.expand.sketch, expand_op.sketch)


def test_channels_last_stem_tokens_are_contiguous_and_match_nchw():
    stem = ConvStem(img_size=64, patch_size=16, embed_dim=32).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, grid = stem(images)
        reference = stem.proj(images).flatten(2).transpose(1, 2)  # plain NCHW convolutions
    assert grid == (4, 4) and tokens.is_contiguous()
    torch.testing.assert_close(tokens, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("complement", [False, True])
def test_ridge_project_gradients_under_bf16_autocast_stay_close_to_float32(complement):
    # float32 rows under autocast: the products run in bf16 and the results come back in float32.
    x = torch.randn(2, 49, 64, requires_grad=True)
    sketch, scale, g = torch.randn(49, 16), torch.tensor(0.5, requires_grad=True), torch.randn(2, 49, 64)
    reference = torch.autograd.grad(
        (ridge_project(x, sketch, eps=0.01, complement=complement, scale=scale) * g).sum(), (x, scale)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ridge_project(x, sketch, eps=0.01, complement=complement, scale=scale)
    assert y.dtype == torch.float32
    low = torch.autograd.grad((y * g).sum(), (x, scale))
    for a, b in zip(low, reference):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() < 0.03 * b.abs().max()


def _block_and_written_out(block, x, g, autocast=False, norm_in_mixer=False):
    """Output and gradients (x, then every parameter) of ``block(x)`` and of ``x + DropPath(attn(norm(x)))`` written
    out with timm's DropPath, each run from the same seed (the same images dropped); with ``norm_in_mixer`` the
    written-out sum hands the norm to the mixer (``attn(x, norm=norm)``) and adds the residual outside."""

    def run(fn):
        for p in (x, *block.parameters()):
            p.grad = None
        torch.manual_seed(1)  # the draw of the dropped images
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x)
        y.backward(g)
        return [y.detach()] + [t.grad.clone() for t in (x, *block.parameters())]

    if norm_in_mixer:
        return run(block), run(lambda t: t + block.drop_path(block.attn(t, norm=block.norm)))
    return run(block), run(lambda t: t + block.drop_path(block.attn(block.norm(t))))


@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_block_residual_and_stochastic_depth_equal_timms_order_of_operations(form, fused):
    """PACEBlock hands its input and DropPath's per-image scales to the mixer, which adds them in GEMM 2's epilogue
    (fused) or after the operators (separate): output and every gradient equal ``x + DropPath(attn(norm(x)))``
    written out with timm's DropPath, in float64, with the same images dropped from the same seed."""
    torch.manual_seed(0)
    attn = partial(PACEAttention, rank=4, compress_form=form, fused=fused)
    block = PACEBlock(32, 4, attn_layer=attn, drop_path=0.5).double().train()
    x = torch.randn(8, 10, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, 10, 32, dtype=torch.float64)
    got, ref = _block_and_written_out(block, x, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    dropped = (got[0] == x.detach()).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 8  # seed 1 drops some images and keeps others: both branches are checked
    # Outside training (and with no stochastic depth) the branch is added unscaled.
    block.eval()
    torch.testing.assert_close(block(x), x + block.attn(block.norm(x)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_memberships_false_returns_the_same_update_and_no_memberships(fused):
    """``pace_attention(..., memberships=False)`` (what PACEAttention.forward asks for): the same update and
    gradients, and None for π (the fused mixer then does not output it)."""
    torch.manual_seed(0)
    attn = PACEAttention(32, 4, rank=4, fused=fused).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 10, 32, dtype=torch.float64)
    args = (attn.compress.subspaces, attn.compress.tau, attn.alpha, attn.beta)
    sketches = (attn.expand.current_sketch(10), attn.compress.current_sketch(10))
    runs = []
    for memberships in (True, False):
        out, pi = pace_attention(
            x, *args, *sketches, num_heads=4, eps=0.01, fused=fused, memberships=memberships
        )  # fmt: skip
        assert (pi is None) == (not memberships)
        runs.append((out, *torch.autograd.grad((out * g).sum(), (x, *args))))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_branch_scale_needs_a_residual():
    block = PACEBlock(32, 4, attn_layer=partial(PACEAttention, rank=4, fused=True))
    x = torch.randn(2, 10, 32)
    with pytest.raises(ValueError, match="branch_scale scales the update added to a residual"):
        block.attn(x, branch_scale=torch.ones(2))


@pytest.mark.parametrize("form", ["full", "diag"])
def test_block_residual_under_bf16_autocast_matches_the_separate_sum(form):
    """Under bf16 autocast the fused residual and scales (cast_dot scaling g as it copies it, the norm's backward
    adding the residual's cotangent) give what the mixer gives with DropPath and the residual added outside it, to
    float32 rounding."""
    torch.manual_seed(0)
    block = PACEBlock(32, 4, attn_layer=partial(PACEAttention, rank=4, compress_form=form, fused=True), drop_path=0.5)
    x = torch.randn(8, 10, 32, requires_grad=True)
    g = torch.randn(8, 10, 32)
    got, ref = _block_and_written_out(block, x, g, autocast=True, norm_in_mixer=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_block_norm_in_the_mixer_under_bf16_autocast(form):
    """Under bf16 autocast the mixer runs the block's LayerNorm itself: the output is the block written out with
    the norm outside (to float32 rounding), and the norm's backward takes the mixer's x̄ rounded to bf16, as
    autocast's cast before a product would hand it: x's gradient is g + LayerNorm's float64 backward of that
    rounded x̄, and the norm's weight and bias get the float64 gradients of the same."""
    torch.manual_seed(0)
    block = PACEBlock(32, 4, attn_layer=partial(PACEAttention, rank=4, compress_form=form, fused=True)).train()
    with torch.no_grad():  # a norm that is not the identity
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_()
    x = torch.randn(8, 10, 32, requires_grad=True)
    g = torch.randn(8, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.backward(g)
    got = (x.grad.clone(), block.norm.weight.grad.clone(), block.norm.bias.grad.clone())
    with torch.no_grad():
        h = block.norm(x).requires_grad_()  # the norm outside: x̄ is h's gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = x.detach() + block.attn(h)
    y_ref.backward(g)
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (block.norm.weight, block.norm.bias))
    F.layer_norm(x64, (32,), w64, b64, block.norm.eps).backward(h.grad.bfloat16().double())
    for what, a, b in zip(("x", "weight", "bias"), got, (x64.grad + g.double(), w64.grad, b64.grad)):
        scale = b.abs().max()
        assert (a.double() - b).abs().max() <= 1e-5 * scale, what
    # x̄ not rounded (float32) would differ by more than the tolerance: the test sees the rounding.
    x32 = x.detach().double().requires_grad_()
    F.layer_norm(x32, (32,), w64.detach(), b64.detach(), block.norm.eps).backward(h.grad.double())
    assert (x32.grad + g.double() - got[0].double()).abs().max() > 1e-5 * x32.grad.abs().max()
