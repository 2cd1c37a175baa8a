"""Loading checkpoints: the authors' DeiT-style format (spec §6) and this project's own state dicts.

The authors' checkpoints are built here from the spec's key names and shapes with random values; the expected
logits come from an independent float64 forward of that state dict written here from the spec (explicit BatchNorm,
Fourier encoding, per-image ridge bases and explicit projector matrices, the Compress diagonal taken by an einsum
with a repeated index as the authors' code does, XCiT class attention with its doubled patch tokens). It shares no
code with the layer tests' oracle (tests/reference_pace.py) nor with the package.
"""

import argparse
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import load_checkpoint

import pace  # noqa: F401  (registers the models)
from pace.models import checkpoint_filter_fn

MODEL = "pace_vit_test"  # d 64, 4 blocks, K 2, rank 8, patch 8, 64 px -> 8 x 8 tokens
DIM, DEPTH, HEADS, RANK, PATCH, IMG, CLASSES = 64, 4, 2, 8, 8, 64, 1000
NUM_TOKENS = (IMG // PATCH) ** 2


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.expm1(y.double())).float()


def reference_state_dict(seed: int, *, softplus: bool = False, num_tokens: int = NUM_TOKENS) -> dict:
    """Random weights under the authors' key names and shapes (spec §6) for the ``pace_vit_test`` sizes."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    sd = {}
    widths = [DIM // 2 ** (int(math.log2(PATCH)) - 1 - i) for i in range(int(math.log2(PATCH)))]
    in_chs = 3
    for stage, width in enumerate(widths):
        i = 2 * stage
        sd[f"patch_embed.proj.{i}.0.weight"] = randn(width, in_chs, 3, 3, std=math.sqrt(2 / (9 * in_chs)))
        sd[f"patch_embed.proj.{i}.1.weight"] = uniform(width, low=0.5, high=1.5)
        sd[f"patch_embed.proj.{i}.1.bias"] = randn(width, std=0.1)
        sd[f"patch_embed.proj.{i}.1.running_mean"] = randn(width, std=0.1)
        sd[f"patch_embed.proj.{i}.1.running_var"] = uniform(width, low=0.5, high=2.0)
        sd[f"patch_embed.proj.{i}.1.num_batches_tracked"] = torch.tensor(1000)
        in_chs = width
    sd["pos_embeder.token_projection.weight"] = randn(DIM, 64, 1, 1, std=0.1)
    sd["pos_embeder.token_projection.bias"] = randn(DIM, std=0.1)
    sd["cls_token"] = randn(1, 1, DIM, std=0.02)
    for i in range(DEPTH):
        sd[f"blocks.{i}.norm1.weight"] = uniform(DIM, low=0.8, high=1.2)
        sd[f"blocks.{i}.norm1.bias"] = randn(DIM, std=0.05)
        gammas = uniform(2, low=0.05, high=0.4)
        if softplus:
            sd[f"blocks.{i}._gamma1_raw"] = _softplus_inverse(gammas[0]).reshape(())
            sd[f"blocks.{i}._gamma2_raw"] = _softplus_inverse(gammas[1]).reshape(())
        else:
            sd[f"blocks.{i}.gamma1"] = gammas[0].reshape(())
            sd[f"blocks.{i}.gamma2"] = gammas[1].reshape(())
        sd[f"blocks.{i}.attn.expandoperator.Omega"] = randn(num_tokens, RANK * HEADS)
        sd[f"blocks.{i}.attn.compressoperator.Us"] = torch.linalg.qr(randn(DIM, DIM)).Q
        sd[f"blocks.{i}.attn.compressoperator.temperature"] = uniform(1, low=0.5, high=1.5)
        sd[f"blocks.{i}.attn.compressoperator.Omega"] = randn(num_tokens, RANK)
    for j in range(2):
        p = f"cls_attn_blocks.{j}"
        for norm in ("norm1", "norm2"):
            sd[f"{p}.{norm}.weight"] = uniform(DIM, low=0.8, high=1.2)
            sd[f"{p}.{norm}.bias"] = randn(DIM, std=0.05)
        sd[f"{p}.attn.qkv.weight"] = randn(3 * DIM, DIM, std=0.1)
        sd[f"{p}.attn.qkv.bias"] = randn(3 * DIM, std=0.02)
        sd[f"{p}.attn.proj.weight"] = randn(DIM, DIM, std=0.1)
        sd[f"{p}.attn.proj.bias"] = randn(DIM, std=0.02)
        sd[f"{p}.mlp.fc1.weight"] = randn(4 * DIM, DIM, std=0.1)
        sd[f"{p}.mlp.fc1.bias"] = randn(4 * DIM, std=0.02)
        sd[f"{p}.mlp.fc2.weight"] = randn(DIM, 4 * DIM, std=0.1)
        sd[f"{p}.mlp.fc2.bias"] = randn(DIM, std=0.02)
        sd[f"{p}.gamma1"] = uniform(DIM, low=0.5, high=1.5)
        sd[f"{p}.gamma2"] = uniform(DIM, low=0.5, high=1.5)
    sd["norm.weight"] = uniform(DIM, low=0.8, high=1.2)
    sd["norm.bias"] = randn(DIM, std=0.05)
    sd["head.weight"] = randn(CLASSES, DIM, std=0.1)
    sd["head.bias"] = randn(CLASSES, std=0.02)
    return sd


def _layer_norm(x, sd, prefix, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _fourier(H: int, W: int, sd: dict) -> torch.Tensor:
    """DETR/XCiT encoding: coordinates 1..H (1..W) scaled to (0, 2π], 32 frequencies, sin/cos interleaved."""
    y = torch.arange(1, H + 1, dtype=torch.float64) / (H + 1e-6) * 2 * math.pi
    x = torch.arange(1, W + 1, dtype=torch.float64) / (W + 1e-6) * 2 * math.pi
    freqs = 10000.0 ** (2 * (torch.arange(32, dtype=torch.float64) // 2) / 32)

    def encode(coord):  # (L,) -> (L, 32): sin on even frequencies, cos on odd, interleaved
        angles = coord[:, None] / freqs
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)

    pos = torch.cat([encode(y)[:, None].expand(H, W, 32), encode(x)[None].expand(H, W, 32)], dim=-1)  # (H, W, 64)
    weight = sd["pos_embeder.token_projection.weight"].reshape(DIM, 64)
    return pos.reshape(H * W, 64) @ weight.T + sd["pos_embeder.token_projection.bias"]  # (N, d)


def _ridge_basis(Y: torch.Tensor) -> torch.Tensor:
    """Spec §2: unit-norm columns Ŷ, G = ŶᵀŶ + 0.01 I = LLᵀ, Q = Ŷ L⁻ᵀ (per matrix of a batch)."""
    Y_hat = Y / Y.norm(dim=-2, keepdim=True)
    L = torch.linalg.cholesky(Y_hat.mT @ Y_hat + 0.01 * torch.eye(Y.shape[-1], dtype=Y.dtype))
    return torch.linalg.solve_triangular(L, Y_hat.mT, upper=False).mT  # Ŷ L⁻ᵀ


def _expand(h: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Spec §3 Expand: per image, Y = hᵀΩ (d × rK), P = QQᵀ (d × d), output (I − P) applied to every token."""
    out = []
    for tokens in h:  # (n, d)
        Q = _ridge_basis(tokens.T @ omega)
        P = Q @ Q.T
        out.append(tokens - tokens @ P.T)
    return torch.stack(out)


def _compress_diag(h: torch.Tensor, Us: torch.Tensor, tau: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Spec §3 Compress as the authors' code computes it: col_k = diag(Q_kQ_kᵀ) ⊙ a_k via a repeated einsum index."""
    p = DIM // HEADS
    out = []
    for tokens in h:  # (n, d)
        A = torch.stack([tokens @ Us[:, k * p : (k + 1) * p] for k in range(HEADS)])  # (K, n, p): a_k per token
        P = torch.stack([_ridge_basis(A[k].T @ omega) @ _ridge_basis(A[k].T @ omega).T for k in range(HEADS)])
        col = torch.einsum("kii,kni->kni", P, A)  # the repeated index i reads P's diagonal
        null = A - col
        pi = torch.softmax(col.norm(dim=-1) / tau, dim=0)  # (K, n), softmax over heads
        out.append(sum((pi[k, :, None] * null[k]) @ Us[:, k * p : (k + 1) * p].T for k in range(HEADS)))
    return torch.stack(out)


def reference_logits(state_dict: dict, images: torch.Tensor, global_pool: str = "token") -> torch.Tensor:
    """The authors' network (spec §3-4), in float64, straight from a spec §6 state dict.

    ``global_pool='avg'`` averages the final patch tokens instead of taking the class token (timm's option).
    """
    sd = {k: v.double() for k, v in state_dict.items()}
    x = images.double()
    stage = 0
    while f"patch_embed.proj.{stage}.0.weight" in sd:
        p = f"patch_embed.proj.{stage}"
        if stage:
            x = F.gelu(x)
        x = F.conv2d(x, sd[p + ".0.weight"], stride=2, padding=1)
        scale = sd[p + ".1.weight"] / torch.sqrt(sd[p + ".1.running_var"] + 1e-5)
        x = (x - sd[p + ".1.running_mean"][:, None, None]) * scale[:, None, None] + sd[p + ".1.bias"][:, None, None]
        stage += 2
    B, _, H, W = x.shape
    x = x.flatten(2).transpose(1, 2) + _fourier(H, W, sd)  # (B, N, d)

    for i in range(DEPTH):
        p = f"blocks.{i}"
        if p + ".gamma1" in sd:
            alpha, beta = sd[p + ".gamma1"], sd[p + ".gamma2"]
        else:
            alpha, beta = F.softplus(sd[p + "._gamma1_raw"]), F.softplus(sd[p + "._gamma2_raw"])
        h = _layer_norm(x, sd, p + ".norm1")
        e = _expand(h, sd[p + ".attn.expandoperator.Omega"])
        c = _compress_diag(
            h,
            sd[p + ".attn.compressoperator.Us"],
            sd[p + ".attn.compressoperator.temperature"],
            sd[p + ".attn.compressoperator.Omega"],
        )
        x = x + alpha * e - beta * c

    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)  # (B, 1 + N, d)
    head_dim = DIM // HEADS
    for j in range(2):
        p = f"cls_attn_blocks.{j}"
        h = _layer_norm(x, sd, p + ".norm1")
        qkv = (h @ sd[p + ".attn.qkv.weight"].T + sd[p + ".attn.qkv.bias"]).reshape(B, -1, 3, HEADS, head_dim)
        q, k, v = qkv[:, 0, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, K, dh), (B, 1 + N, K, dh) x 2
        attn = torch.softmax((q[:, None] * k).sum(-1) * head_dim**-0.5, dim=1)  # (B, 1 + N, K), over tokens
        cls = (attn[..., None] * v).sum(1).reshape(B, DIM) @ sd[p + ".attn.proj.weight"].T + sd[p + ".attn.proj.bias"]
        # XCiT's block: the attention branch returns the normed patch tokens beside the class token.
        x = x + sd[p + ".gamma1"] * torch.cat([cls[:, None], h[:, 1:]], dim=1)
        x = _layer_norm(x, sd, p + ".norm2")  # tokens_norm: every token
        hidden = F.gelu(x[:, 0] @ sd[p + ".mlp.fc1.weight"].T + sd[p + ".mlp.fc1.bias"])
        mlp = hidden @ sd[p + ".mlp.fc2.weight"].T + sd[p + ".mlp.fc2.bias"]
        # ... and its second residual adds the branch [γ2·mlp(cls), patch tokens] to x: the patch tokens double.
        x = x + torch.cat([sd[p + ".gamma2"] * mlp[:, None], x[:, 1:]], dim=1)
    x = _layer_norm(x, sd, "norm")
    pooled = x[:, 1:].mean(1) if global_pool == "avg" else x[:, 0]
    return pooled @ sd["head.weight"].T + sd["head.bias"]


def _save_deit_style(path, model_sd, ema_sd=None):
    checkpoint = {
        "model": model_sd,
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="ECAttention_test", lr=5e-4, output_dir="./checkpoint"),
    }
    if ema_sd is not None:
        checkpoint["model_ema"] = ema_sd
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images).double()


def test_reference_checkpoint_loads_cleanly_and_reproduces_reference_logits(tmp_path, images, caplog):
    sd, ema = reference_state_dict(1), reference_state_dict(2)
    path = tmp_path / "checkpoint.pth"
    _save_deit_style(path, sd, ema)
    with caplog.at_level(logging.WARNING, logger="pace.models.checkpoint_filter"):
        # timm loads strictly: a missing or unexpected key would raise here.
        model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert model.compress_form == "diag"
    assert all(blk.attn.compress.form == "diag" for blk in model.blocks)
    assert any("authors" in r.getMessage() and "'diag'" in r.getMessage() for r in caplog.records)
    # timm's own file loader (pretrained_cfg_overlay={"file": ...}) applies timm's rule, EMA first, before the
    # filter sees the weights; pace.eval.load_model and checkpoint_filter_fn given the whole file take `model`.
    expected = reference_logits(ema, images)
    torch.testing.assert_close(_logits(model, images), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, reference_logits(sd, images), atol=1e-2)
    # The paper's full projector is a different function of the same weights.
    model.compress_form = "full"
    assert not torch.allclose(_logits(model, images), expected, atol=1e-3)


def test_reference_checkpoint_non_ema_weights_through_load_checkpoint(tmp_path, images):
    sd, ema = reference_state_dict(3), reference_state_dict(4)
    path = tmp_path / "checkpoint.pth"
    _save_deit_style(path, sd, ema)
    model = timm.create_model(MODEL)
    load_checkpoint(model, str(path), use_ema=False, filter_fn=checkpoint_filter_fn)
    torch.testing.assert_close(_logits(model, images), reference_logits(sd, images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_reference_checkpoint_logits_for_both_pools(images, global_pool):
    # 'avg' reads the patch tokens after the class-attention blocks, so it checks their doubled residual too.
    sd, ema = reference_state_dict(8), reference_state_dict(9)
    model = timm.create_model(MODEL, global_pool=global_pool)
    # The whole DeiT-style dict: the filter takes checkpoint['model'], as the authors evaluate and fine-tune.
    model.load_state_dict(checkpoint_filter_fn({"model": sd, "model_ema": ema, "epoch": 3}, model))
    expected = reference_logits(sd, images, global_pool=global_pool)
    torch.testing.assert_close(_logits(model, images), expected, rtol=1e-4, atol=1e-4)
    other = reference_logits(sd, images, global_pool="avg" if global_pool == "token" else "token")
    assert not torch.allclose(expected, other, atol=1e-2)


@pytest.mark.parametrize("stored_softplus", [False, True])
@pytest.mark.parametrize("positive_coeffs", [False, True])
def test_coefficients_convert_exactly_between_plain_and_softplus(tmp_path, images, stored_softplus, positive_coeffs):
    sd = reference_state_dict(5, softplus=stored_softplus)
    path = tmp_path / "checkpoint.pth"
    _save_deit_style(path, sd)
    model = timm.create_model(
        MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, positive_coeffs=positive_coeffs
    )
    for i, blk in enumerate(model.blocks):
        coeffs = blk.coefficients()
        if stored_softplus:
            alpha, beta = F.softplus(sd[f"blocks.{i}._gamma1_raw"]), F.softplus(sd[f"blocks.{i}._gamma2_raw"])
        else:
            alpha, beta = sd[f"blocks.{i}.gamma1"], sd[f"blocks.{i}.gamma2"]
        torch.testing.assert_close(coeffs["alpha"], alpha, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(coeffs["beta"], beta, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_logits(model, images), reference_logits(sd, images), rtol=1e-4, atol=1e-4)


def test_non_positive_coefficient_cannot_become_softplus(images):
    sd = reference_state_dict(6)
    sd["blocks.2.gamma2"] = torch.tensor(-0.05)
    model = timm.create_model(MODEL, positive_coeffs=True)
    with pytest.raises(ValueError, match=r"blocks\.2\.gamma2"):
        checkpoint_filter_fn({"model": sd}, model)


def test_reference_sketch_of_another_token_count_loads(tmp_path, images):
    # Trained at 96 px (144 tokens), evaluated at 64 px: the stored Ω loads and a derived one serves 64 tokens.
    sd = reference_state_dict(8, num_tokens=144)
    path = tmp_path / "checkpoint.pth"
    _save_deit_style(path, sd)
    model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert model.blocks[0].attn.expand.sketch.shape == (144, RANK * HEADS)
    torch.testing.assert_close(model.blocks[0].attn.expand.sketch, sd["blocks.0.attn.expandoperator.Omega"])
    first = _logits(model, images)
    assert torch.isfinite(first).all()
    assert torch.equal(first, _logits(model, images))
    # At the stored resolution the stored sketch is used, so the reference logits come back.
    big = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(_logits(model, big), reference_logits(sd, big), rtol=1e-4, atol=1e-4)


def test_reference_checkpoint_with_new_head_and_input_channels(tmp_path):
    sd = reference_state_dict(9)
    path = tmp_path / "checkpoint.pth"
    _save_deit_style(path, sd)
    model = timm.create_model(
        MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=10, in_chans=1
    )
    assert model.head.out_features == 10
    # timm folds the RGB filters of the first conv into one channel.
    torch.testing.assert_close(model.patch_embed.proj[0][0].weight, sd["patch_embed.proj.0.0.weight"].sum(1, True))
    torch.testing.assert_close(model.blocks[1].attn.compress.subspaces, sd["blocks.1.attn.compressoperator.Us"])
    assert model.eval()(torch.randn(1, 1, IMG, IMG)).shape == (1, 10)


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "ema_module", "compiled_ddp"])
def test_own_state_dict_round_trips(tmp_path, images, wrap):
    source = timm.create_model(MODEL, positive_coeffs=True, compress_form="full").train()
    source(images)  # a training forward stores the sketches in the buffers
    sd = source.state_dict()
    payload = {
        "bare": sd,
        "model": {"model": sd, "epoch": 1},
        "state_dict": {"state_dict": sd},
        "ema_module": {"state_dict_ema": {"module." + k: v for k, v in sd.items()}, "state_dict": {}},
        "compiled_ddp": {"model": {"_orig_mod.module." + k: v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "own.pth"
    torch.save(payload, path)
    model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, positive_coeffs=True)
    assert model.compress_form == "full"  # our own format keeps the model's Compress form
    torch.testing.assert_close(_logits(model, images), _logits(source, images), rtol=0, atol=0)


def test_own_filter_leaves_keys_alone():
    model = timm.create_model(MODEL)
    sd = model.state_dict()
    filtered = checkpoint_filter_fn({"model": dict(sd)}, model)
    assert list(filtered) == list(sd)
    assert all(filtered[k] is sd[k] for k in sd)


def test_loading_refuses_arbitrary_pickled_objects(tmp_path):
    # weights_only=True: a checkpoint that needs an arbitrary global to unpickle is refused, not executed.
    sd = reference_state_dict(10)
    path = tmp_path / "unsafe.pth"
    torch.save({"model": sd, "args": _Unlisted()}, path)
    with pytest.raises(RuntimeError, match=r"weights_only=True blocked.*_Unlisted"):
        timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(path)})


class _Unlisted:
    pass
