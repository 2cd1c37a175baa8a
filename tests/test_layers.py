"""PACEAttention layers: the fast batched path against the dense float64 oracle, and the module contract."""

import math
from functools import partial

import pytest
import timm
import torch
from reference_pace import dense_compress, dense_expand, dense_projector
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import pace  # noqa: F401  (registers the models)
from pace.layers import PACEAttention, PACEBlock, compress, expand, gaussian_sketch, ridge_basis, softplus_inverse

B, N, C, K, RANK = 2, 64, 32, 4, 4
P = C // K


def _tokens(dtype=torch.float64, n=N):
    return torch.randn(B, n, C, dtype=dtype)


def _subspaces(dtype=torch.float64):
    return torch.linalg.qr(torch.randn(C, C, dtype=dtype)).Q


@pytest.mark.parametrize("exact", [False, True], ids=["ridge", "exact"])
def test_expand_matches_dense_oracle(exact):
    x = _tokens()
    sketch = torch.randn(N, RANK * K, dtype=torch.float64)
    fast = expand(x, sketch, eps=0.01, exact=exact)
    torch.testing.assert_close(fast, dense_expand(x, sketch, eps=0.01, exact=exact), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("exact", [False, True], ids=["ridge", "exact"])
def test_compress_matches_dense_oracle(form, exact):
    x, U = _tokens(), _subspaces()
    tau = torch.tensor(0.7, dtype=torch.float64)
    sketch = torch.randn(N, RANK, dtype=torch.float64)
    out, pi = compress(x, U, tau, sketch, num_heads=K, eps=0.01, exact=exact, form=form)
    ref_out, ref_pi = dense_compress(x, U, 0.7, sketch, num_heads=K, eps=0.01, exact=exact, form=form)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pi, ref_pi, rtol=1e-9, atol=1e-9)


def test_repeated_einsum_index_takes_the_diagonal():
    # The fact behind the "diag" form: an einsum operand with a repeated index reads its diagonal.
    P, A = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.einsum("pp,pn->pn", P, A), torch.diag(P)[:, None] * A, rtol=0, atol=0)


def test_compress_forms_differ():
    # The diagonal form is not a projection: on generic input the two forms must disagree.
    x, U, sketch = _tokens(), _subspaces(), torch.randn(N, RANK, dtype=torch.float64)
    tau = torch.tensor(1.0, dtype=torch.float64)
    full = compress(x, U, tau, sketch, num_heads=K, eps=0.01, form="full")[0]
    diag = compress(x, U, tau, sketch, num_heads=K, eps=0.01, form="diag")[0]
    assert (full - diag).abs().max() > 1e-2


def test_float32_path_close_to_float64_oracle():
    x, U, sketch = _tokens(), _subspaces(), torch.randn(N, RANK, dtype=torch.float64)
    tau = torch.tensor(1.0, dtype=torch.float64)
    out32, pi32 = compress(x.float(), U.float(), tau.float(), sketch.float(), num_heads=K, eps=0.01)
    ref_out, ref_pi = dense_compress(x, U, 1.0, sketch, num_heads=K, eps=0.01, exact=False, form="full")
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pi32.double(), ref_pi, rtol=1e-4, atol=1e-4)


def test_exact_basis_is_orthonormal_and_spans_y():
    Y = torch.randn(3, 40, 12)
    Q = ridge_basis(Y, eps=0.01, exact=True)
    assert Q.dtype == torch.float32 and Q.shape == Y.shape
    torch.testing.assert_close(Q.mT @ Q, torch.eye(12).expand(3, 12, 12), rtol=0, atol=1e-5)
    torch.testing.assert_close(Q @ (Q.mT @ Y), Y, rtol=0, atol=1e-4)


def test_exact_basis_with_fewer_tokens_than_columns_still_contains_range_y():
    # rank(Y) = 3 < c = 12 (three tokens): Q keeps 12 orthonormal columns and its span contains range(Y).
    Y = torch.randn(2, 40, 3) @ torch.randn(2, 3, 12)
    Q = ridge_basis(Y, eps=0.01, exact=True)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(12).expand(2, 12, 12), rtol=0, atol=1e-5)
    torch.testing.assert_close(Q @ (Q.mT @ Y), Y, rtol=0, atol=1e-4)


def test_ridge_block_trains_on_fewer_tokens_than_sketch_columns():
    # 4 tokens (a 32 px image at patch 16) against an Expand sketch of width rank·K = 16.
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK))
    x = torch.randn(B, 4, C, requires_grad=True)
    block(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_ridge_projector_eigenvalues():
    eps = 0.05
    Y = torch.randn(2, 30, 8, dtype=torch.float64) * torch.logspace(-2, 1, 8, dtype=torch.float64)
    Q = ridge_basis(Y, eps=eps, exact=False)
    Y_hat = Y / Y.norm(dim=-2, keepdim=True)
    lam = torch.linalg.eigvalsh(Y_hat.mT @ Y_hat)  # (2, 8), ascending
    expected = lam / (lam + eps)
    projector_eigs = torch.linalg.eigvalsh(Q @ Q.mT)  # (2, 30): 22 zeros then the 8 soft eigenvalues
    torch.testing.assert_close(projector_eigs[:, -8:], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(projector_eigs[:, :-8], torch.zeros(2, 22, dtype=torch.float64), rtol=0, atol=1e-10)
    # And it is the oracle's explicit projector.
    torch.testing.assert_close(Q[0] @ Q[0].T, dense_projector(Y[0], eps=eps, exact=False), rtol=0, atol=1e-10)


def test_ridge_basis_finite_on_degenerate_sketches():
    # Zero and repeated columns make ŶᵀŶ singular; the ridge keeps G positive definite.
    Y = torch.randn(2, 16, 6)
    Y[:, :, 1] = 0.0
    Y[:, :, 2] = Y[:, :, 3]
    Q = ridge_basis(Y, eps=0.01, exact=False)
    assert torch.isfinite(Q).all()


def test_ridge_basis_stays_float32_under_autocast():
    Y = torch.randn(2, 48, 8)
    reference = ridge_basis(Y, eps=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ridge_basis(Y, eps=0.01)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, reference, rtol=0, atol=1e-6)
    assert ridge_basis(Y.bfloat16(), eps=0.01).dtype == torch.float32


def test_memberships_are_a_distribution():
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK))
    pi = block.memberships(torch.randn(B, N, C))
    assert pi.shape == (B, N, K)
    assert (pi >= 0).all()
    torch.testing.assert_close(pi.sum(-1), torch.ones(B, N), rtol=0, atol=1e-6)


def test_block_is_prenorm_residual_of_alpha_expand_minus_beta_compress():
    block = PACEBlock(
        C, K, attn_layer=partial(PACEAttention, rank=RANK, compress_form="diag", positive_coeffs=True, coeff_init=0.3)
    ).eval()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.attn.compress.tau.fill_(0.5)
    x = torch.randn(B, N, C)
    with torch.no_grad():
        y = block(x)
        h = block.norm(x)
        e_sketch = block.attn.expand.derived_sketch(N)
        c_sketch = block.attn.compress.derived_sketch(N)
        U, tau = block.attn.compress.subspaces, block.attn.compress.tau
        manual = (
            x
            + 0.3 * expand(h, e_sketch, eps=0.01)
            - 0.3 * compress(h, U, tau, c_sketch, num_heads=K, eps=0.01, form="diag")[0]
        )
    torch.testing.assert_close(y, manual, rtol=1e-5, atol=1e-5)


def test_standalone_block_norm_uses_the_reference_eps():
    # The reference's LayerNorm eps is 1e-6 (PACE_SPEC §4); tokens of variance ~1e-6 make 1e-5 and 1e-6 differ.
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK)).eval()
    x = 1e-3 * torch.randn(B, N, C, dtype=torch.float64)
    block.double()
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6)  # weight 1, bias 0 at initialisation
    with torch.no_grad():
        torch.testing.assert_close(block.norm(x), expected, rtol=1e-10, atol=1e-10)
    model = timm.create_model("pace_vit_test")
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {block.norm.eps} == {1e-6}


@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("projector", ["ridge", "exact"])
@pytest.mark.parametrize("positive_coeffs", [False, True])
def test_every_parameter_gets_a_finite_gradient(form, projector, positive_coeffs):
    block = PACEBlock(
        C,
        K,
        attn_layer=partial(
            PACEAttention, rank=RANK, compress_form=form, projector=projector, positive_coeffs=positive_coeffs
        ),
    )
    x = torch.randn(B, N, C, requires_grad=True)
    block(x).square().mean().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_bf16_autocast_forward_and_backward():
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK), drop_path=0.1)
    x = torch.randn(B, N, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
        pi = block.memberships(x)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(pi).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_bf16_weights_keep_bf16_output():
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK)).to(torch.bfloat16)
    y = block(torch.randn(B, N, C, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_positive_coeffs_hold_raw_softplus_values():
    attn = PACEAttention(C, K, rank=RANK, positive_coeffs=True)
    raw = math.log(math.exp(0.1) - 1.0)
    assert attn.alpha.shape == () and attn.beta.shape == ()
    assert attn.alpha.item() == pytest.approx(raw) and attn.beta.item() == pytest.approx(raw)
    coeffs = attn.coefficients()
    assert coeffs["alpha"].item() == pytest.approx(0.1) and coeffs["beta"].item() == pytest.approx(0.1)
    assert coeffs["tau"].item() == 1.0
    plain = PACEAttention(C, K, rank=RANK)
    assert plain.alpha.item() == pytest.approx(0.1) and plain.coefficients()["alpha"].item() == pytest.approx(0.1)


def test_softplus_inverse_undoes_softplus_without_overflow():
    y = torch.tensor([1e-6, 0.1, 1.0, 30.0, 800.0], dtype=torch.float64)
    raw = softplus_inverse(y)
    assert raw.dtype == torch.float64 and torch.isfinite(raw).all()
    torch.testing.assert_close(torch.nn.functional.softplus(raw), y, rtol=1e-12, atol=0)
    assert raw[-1].item() == 800.0  # log(e^y − 1) = y to float64 precision for large y (e^800 overflows)
    assert softplus_inverse(y.float()).dtype == torch.float32


def test_state_dict_keys_and_shapes():
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK))
    block(torch.randn(1, N, C))
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {
        "norm.weight": (C,),
        "norm.bias": (C,),
        "attn.alpha": (),
        "attn.beta": (),
        "attn.expand.sketch": (N, RANK * K),
        "attn.expand._extra_state": (3,),  # sketch schedule counters: epoch, training and evaluation forwards
        "attn.compress.subspaces": (C, C),
        "attn.compress.tau": (),
        "attn.compress.sketch": (N, RANK),
        "attn.compress._extra_state": (3,),
    }
    U = block.attn.compress.subspaces.detach()
    torch.testing.assert_close(U.T @ U, torch.eye(C), rtol=0, atol=1e-5)


def test_compress_form_is_settable():
    block = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK)).eval()
    x = torch.randn(B, N, C)
    with torch.no_grad():
        full = block(x)
        block.attn.compress_form = "diag"
        assert block.attn.compress_form == "diag" and block.attn.compress.form == "diag"
        diag = block(x)
        block.attn.compress_form = "full"
        torch.testing.assert_close(block(x), full, rtol=0, atol=0)
    assert not torch.equal(full, diag)
    with pytest.raises(ValueError, match="'sparse'"):
        block.attn.compress_form = "sparse"
    assert block.attn.compress_form == "full"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 30, "num_heads": 4}, "divisible.*dim=30, num_heads=4"),
        ({"dim": 32, "num_heads": 4, "rank": 9}, r"9 \* 4 > 32"),
        ({"dim": 32, "num_heads": 4, "rank": 0}, "rank must be positive, got 0"),
        ({"dim": 32, "num_heads": 4, "rank": 4, "eps": 0.0}, "eps must be positive, got 0.0"),
        ({"dim": 32, "num_heads": 4, "rank": 4, "compress_form": "paper"}, "'paper'"),
        ({"dim": 32, "num_heads": 4, "rank": 4, "projector": "qr"}, "'qr'"),
        ({"dim": 32, "num_heads": 4, "rank": 4, "sketch_schedule": "batch"}, "'batch'"),
        ({"dim": 32, "num_heads": 4, "rank": 4, "drop_path": 1.0}, r"drop_path must be in \[0, 1\), got 1.0"),
        ({"dim": 32, "num_heads": 4, "rank": 4, "positive_coeffs": True, "coeff_init": 0.0}, "coeff_init, got 0.0"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_value(kwargs, match):
    kwargs = dict(kwargs)
    drop_path = kwargs.pop("drop_path", 0.0)
    with pytest.raises(ValueError, match=match):
        PACEBlock(
            kwargs.pop("dim"), kwargs.pop("num_heads"), attn_layer=partial(PACEAttention, **kwargs), drop_path=drop_path
        )


def test_meta_construction_and_reset_after_to_empty():
    def tensors(block):  # parameters and buffers; the sketch schedule counters (`_extra_state`) are host integers
        return [t for k, t in block.state_dict().items() if not k.endswith("_extra_state")]

    block = PACEBlock(
        C, K, attn_layer=partial(PACEAttention, rank=RANK, positive_coeffs=True), device="meta", dtype=torch.float64
    )
    assert all(t.device.type == "meta" and t.dtype == torch.float64 for t in tensors(block))
    block = block.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in tensors(block):
            tensor.fill_(float("nan"))
    for module in block.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert all(torch.isfinite(t).all() for t in tensors(block))
    assert block.coefficients()["alpha"].item() == pytest.approx(0.1)
    assert torch.isfinite(block(torch.randn(1, N, C, dtype=torch.float64))).all()


def _flops_and_saved_bytes(block, n):
    x = torch.randn(2, n, C * 2, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x).sum().backward()
    return counter.get_total_flops(), sum(saved)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_flops_and_saved_memory_grow_linearly_in_tokens(form):
    block = PACEBlock(C * 2, K, attn_layer=partial(PACEAttention, rank=RANK, compress_form=form))
    (f1, m1), (f2, m2), (f3, m3) = (_flops_and_saved_bytes(block, n) for n in (256, 512, 768))
    # Exactly affine in the token count: the second difference over n, 2n, 3n vanishes (a quadratic term, such
    # as an n × n attention map, would leave it positive), and the token-independent part (basis step, U) is
    # small next to the per-token part.
    assert f3 - 2 * f2 + f1 == 0 and m3 - 2 * m2 + m1 == 0
    assert f2 - f1 > 0.9 * f1 and m2 - m1 > 0.9 * m1


def test_functional_core_compiles_without_graph_breaks():
    # Data-dependent control flow (such as checking the Cholesky status) would break the graph; fullgraph=True
    # makes that an error.
    x, U, sketch = torch.randn(B, N, C), _subspaces(torch.float32), gaussian_sketch(N, RANK, seed=1)
    tau = torch.tensor(1.0)
    compiled = torch.compile(compress, backend="eager", fullgraph=True)
    out, _ = compiled(x, U, tau, sketch, num_heads=K, eps=0.01, form="full")
    torch.testing.assert_close(out, compress(x, U, tau, sketch, num_heads=K, eps=0.01, form="full")[0])
    compiled_expand = torch.compile(expand, backend="eager", fullgraph=True)
    e_sketch = gaussian_sketch(N, RANK * K, seed=2)
    torch.testing.assert_close(compiled_expand(x, e_sketch, eps=0.01), expand(x, e_sketch, eps=0.01))


class _HostSyncRecorder(TorchDispatchMode):
    """Records the aten ops that copy a device value to the host (what .item(), bool(t) and nonzero() run)."""

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNC_OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_recorder_sees_a_host_sync():
    with _HostSyncRecorder() as recorder:
        torch.randn(3).sum().item()
    assert recorder.seen == ["_local_scalar_dense"]


@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("projector", ["ridge", "exact"])
def test_forward_and_backward_do_no_host_sync(form, projector):
    block = PACEBlock(
        C,
        K,
        attn_layer=partial(PACEAttention, rank=RANK, compress_form=form, projector=projector, positive_coeffs=True),
        drop_path=0.1,
    )
    x = torch.randn(B, N, C, requires_grad=True)
    with _HostSyncRecorder() as recorder:
        block(x).sum().backward()
        block.eval()
        block(x)
        block.memberships(x)
    assert recorder.seen == []


def test_fx_feature_extraction_treats_the_operators_as_leaves():
    from timm.layers import create_feature_extractor

    blocks = torch.nn.Sequential(
        PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK)),
        PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK), layer_idx=1),
    ).eval()
    extractor = create_feature_extractor(blocks, return_nodes={"0": "first", "1": "second"})
    x = torch.randn(B, N, C)
    with torch.no_grad():
        features = extractor(x)
        torch.testing.assert_close(features["first"], blocks[0](x), rtol=0, atol=0)
        torch.testing.assert_close(features["second"], blocks(x), rtol=0, atol=0)
