"""PACE-ViT: registry, sizes, forward/backward, resolutions, timm model contract, PACE controls."""

import fnmatch
import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

import pace  # noqa: F401  (registers the models)
from pace.layers import ConvStem, PACEAttention
from pace.models import PACEViT

VARIANTS = {
    # name: (patch, d, depth, K, default input size, num_classes)
    "pace_vit_test": (8, 64, 4, 2, 64, 1000),
    "pace_vit_tiny_patch4_32": (4, 192, 12, 4, 32, 10),
    "pace_vit_tiny_patch8_224": (8, 192, 12, 4, 224, 1000),
    "pace_vit_small_patch8_224": (8, 384, 12, 8, 224, 1000),
    "pace_vit_tiny_patch16_224": (16, 192, 12, 4, 224, 1000),
    "pace_vit_small_patch16_224": (16, 384, 12, 8, 224, 1000),
    "pace_vit_medium_patch16_224": (16, 512, 24, 8, 224, 1000),
    "pace_vit_large_patch16_224": (16, 1024, 24, 16, 224, 1000),
}
SPEC_PARAMS = {  # spec §4 table, reference models counted analytically
    "pace_vit_tiny_patch16_224": 1.76e6,
    "pace_vit_small_patch16_224": 6.61e6,
    "pace_vit_medium_patch16_224": 14.7e6,
    "pace_vit_large_patch16_224": 57.7e6,
}


def _tiny(**kwargs) -> PACEViT:
    return timm.create_model("pace_vit_test", **kwargs)


def _expected_params(patch: int, d: int, depth: int, num_classes: int, mlp_ratio: float = 4.0, cls_layers=2) -> int:
    """Parameter count from the architecture of spec §4, term by term."""
    stages = int(math.log2(patch))
    widths = [d // 2 ** (stages - 1 - i) for i in range(stages)]
    stem = sum(9 * c_in * c_out + 2 * c_out for c_in, c_out in zip([3, *widths[:-1]], widths))  # conv + BN affine
    pos = 64 * d + d
    pace_block = 2 * d + 2 + d * d + 1  # norm, α and β, U, τ
    hidden = int(d * mlp_ratio)
    cls_block = 2 * d + 3 * (d * d + d) + (d * d + d) + 2 * d + (d * hidden + hidden) + (hidden * d + d) + 2 * d
    return stem + pos + d + depth * pace_block + cls_layers * cls_block + 2 * d + d * num_classes + num_classes


def test_registry_lists_every_variant_after_import():
    assert set(timm.list_models("pace_vit*")) == set(VARIANTS)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_on_meta(name):
    patch, d, depth, heads, size, num_classes = VARIANTS[name]
    model = timm.create_model(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert (model.num_features, len(model.blocks), model.blocks[0].attn.compress.num_heads) == (d, depth, heads)
    assert model.default_cfg["input_size"] == (3, size, size)
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_params(patch, d, depth, num_classes)
    if name in SPEC_PARAMS:
        assert abs(count - SPEC_PARAMS[name]) / SPEC_PARAMS[name] < 0.01


def test_forward_backward_every_parameter_gets_a_finite_gradient():
    model = _tiny(num_classes=7, drop_path_rate=0.1, drop_rate=0.1).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [224, 256, 320])
def test_any_resolution_divisible_by_the_patch_and_eval_is_repeatable(size):
    model = _tiny().eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        again = model.forward_features(x)
    assert feats.shape == (1, 1 + (size // 8) ** 2, 64)
    assert torch.isfinite(feats).all()
    assert torch.equal(feats, again)


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_patch_sizes(patch):
    model = _tiny(patch_size=patch).eval()
    stages = [m for m in model.patch_embed.proj if isinstance(m, nn.Sequential)]
    assert len(stages) == int(math.log2(patch))
    assert all(s[0].stride == (2, 2) and isinstance(s[1], nn.BatchNorm2d) for s in stages)
    assert [s[0].out_channels for s in stages] == [64 // 2 ** (len(stages) - 1 - i) for i in range(len(stages))]
    x = torch.randn(2, 3, 64, 96)  # non-square
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 1 + (64 // patch) * (96 // patch), 64)
        maps = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert maps[0].shape == (2, 64, 64 // patch, 96 // patch)


def test_bad_arguments_name_the_problem():
    with pytest.raises(TypeError):
        _tiny(not_a_model_arg=1)
    with pytest.raises(ValueError, match="patch_size"):
        _tiny(patch_size=32)
    with pytest.raises(ValueError, match="rank"):
        _tiny(rank=40)  # 40 * 2 heads > 64
    with pytest.raises(AssertionError, match="global_pool"):
        _tiny(global_pool="max")
    with pytest.raises(ValueError, match="patch_size"):
        ConvStem(patch_size=6, embed_dim=64)


def test_pace_settings_reach_every_block_once_configured():
    model = _tiny(rank=4, eps=0.05, compress_form="diag", positive_coeffs=True, sketch_seed=3, sketch_schedule="fixed")
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        assert (attn.compress.sketch_width, attn.expand.sketch_width) == (4, 4 * 2)
        assert attn.compress.eps == attn.expand.eps == 0.05 and attn.compress_form == "diag" and attn.positive_coeffs
        for op in (attn.expand, attn.compress):
            assert (op.layer_idx, op.sketch_seed, op.sketch_schedule) == (i, 3, "fixed")
    with pytest.raises(TypeError, match="PACEAttention.*'rnak'"):
        _tiny(rnak=4)


def test_attn_layer_injects_another_token_mixer():
    built = []

    class Recorded(PACEAttention):
        def __init__(self, dim, num_heads, **kwargs):
            built.append((dim, num_heads, kwargs["layer_idx"], kwargs["rank"]))
            super().__init__(dim, num_heads, **kwargs)

    model = _tiny(attn_layer=Recorded, rank=8)
    assert built == [(64, 2, i, 8) for i in range(4)]
    assert all(type(blk.attn) is Recorded for blk in model.blocks)


def test_architecture_follows_the_reference():
    model = _tiny(drop_path_rate=0.2)
    assert [blk.drop_path.drop_prob for blk in model.blocks] == [0.2] * 4  # constant, no ramp
    assert [blk.attn.compress.layer_idx for blk in model.blocks] == [0, 1, 2, 3]
    assert all(blk.norm.eps == 1e-6 for blk in model.blocks) and model.norm.eps == 1e-6
    for blk in model.cls_attn_blocks:
        assert blk.tokens_norm and blk.attn.q.bias is not None
        assert torch.equal(blk.gamma1, torch.ones(64)) and torch.equal(blk.gamma2, torch.ones(64))
        assert blk.mlp.fc1.out_features == 4 * 64
    assert isinstance(model.patch_embed.proj[0][1], nn.BatchNorm2d)  # plain BN; DDP converts it to SyncBatchNorm
    assert 0.018 < model.head.weight.std() < 0.022  # trunc_normal(std 0.02)
    assert torch.equal(model.head.bias, torch.zeros(1000))


def test_meta_construction_then_materialise_and_init_weights():
    model = timm.create_model("pace_vit_test", device="meta", dtype=torch.float64)
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
    model.init_weights()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(t).all(), name
    blk = model.blocks[0]
    U = blk.attn.compress.subspaces
    torch.testing.assert_close(U.T @ U, torch.eye(64, dtype=torch.float64))
    coeffs = blk.coefficients()
    assert (coeffs["alpha"].item(), coeffs["beta"].item(), coeffs["tau"].item()) == pytest.approx((0.1, 0.1, 1.0))
    assert torch.equal(model.cls_attn_blocks[0].gamma2, torch.ones(64, dtype=torch.float64))
    assert torch.equal(model.patch_embed.proj[0][1].running_var, torch.ones(16, dtype=torch.float64))
    assert model.eval()(torch.randn(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_bfloat16_weights_and_autocast():
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_reset_classifier_keeps_device_dtype_mode_and_pooling():
    model = _tiny().to(torch.float64).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_features(x)
        token = model.forward_head(feats, pre_logits=True)
        model.reset_classifier(5)
        assert model.head.weight.dtype == torch.float64 and not model.head.training
        assert model(x).shape == (2, 5)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), token)  # pooling kept
        torch.testing.assert_close(token, feats[:, 0])
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), feats[:, 1:].mean(1))
        model.reset_classifier(3, "")
        assert model.forward_head(feats, pre_logits=True).shape == feats.shape
    model.train()
    model.reset_classifier(4)
    assert model.head.training


def test_no_weight_decay_names_exist_and_layer_decay_groups():
    model = _tiny()
    names = [n for n, _ in model.named_parameters()]
    for pattern in model.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale_of, decay_of = {}, {}
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[by_id[id(p)]] = group["lr_scale"]
            decay_of[by_id[id(p)]] = group["weight_decay"]
    assert set(scale_of) == set(names)
    ladder = [
        scale_of["patch_embed.proj.0.0.weight"],
        *[scale_of[f"blocks.{i}.attn.compress.subspaces"] for i in range(4)],
        scale_of["cls_attn_blocks.0.attn.q.weight"],
        scale_of["cls_attn_blocks.1.attn.q.weight"],
        scale_of["head.weight"],
    ]
    assert all(a < b for a, b in zip(ladder, ladder[1:])), ladder
    assert ladder[-1] == 1.0
    assert scale_of["pos_embed.token_projection.weight"] == scale_of["cls_token"] == ladder[0]
    for name in ("cls_token", "blocks.0.attn.alpha", "blocks.3.attn.beta", "blocks.1.attn.compress.tau"):
        assert decay_of[name] == 0.0, name
    assert decay_of["blocks.0.attn.compress.subspaces"] == 0.05
    assert decay_of["cls_attn_blocks.0.mlp.fc1.weight"] == 0.05


def test_features_only_and_forward_intermediates():
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    features = timm.create_model("pace_vit_test", features_only=True).eval()
    assert features.feature_info.channels() == [64, 64, 64] and features.feature_info.reduction() == [8, 8, 8]
    with torch.no_grad():
        maps = features(x)
    assert [m.shape for m in maps] == [(2, 64, 8, 8)] * 3
    picked = timm.create_model("pace_vit_test", features_only=True, out_indices=(0, 2)).eval()
    assert len(picked.model.blocks) == 3  # later blocks pruned

    torch.manual_seed(1)
    model = _tiny().eval()
    with torch.no_grad():
        final, tokens = model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC")
        _, grids = model.forward_intermediates(x, indices=[0, 2])
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(maps[1], grids[1])  # features_only takes the last 3 of 4 blocks: 1, 2, 3
    assert [t.shape for t in tokens] == [(2, 64, 64)] * 2
    torch.testing.assert_close(grids[0], tokens[0].transpose(1, 2).reshape(2, 64, 8, 8))


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        torch.manual_seed(1)
        model = _tiny().train()
        model.set_grad_checkpointing(enable)
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_grad_checkpointing_refuses_per_step_sketches():
    model = _tiny(sketch_schedule="step")
    with pytest.raises(ValueError, match="step"):
        model.set_grad_checkpointing()


def test_set_epoch_redraws_every_block_deterministically():
    model = _tiny().train()
    x = torch.randn(2, 3, 64, 64)

    def sketches():
        model(x)
        return [blk.attn.expand.sketch.clone() for blk in model.blocks]

    first = sketches()
    model.set_epoch(1)
    second = sketches()
    assert all(not torch.equal(a, b) for a, b in zip(first, second))
    model.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, sketches()))
    other_rank = _tiny().train()
    other_rank(x)
    assert all(torch.equal(a, blk.attn.expand.sketch) for a, blk in zip(first, other_rank.blocks))


def test_compress_form_switches_every_block():
    model = _tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        model.compress_form = "diag"
        assert model.compress_form == "diag" and all(blk.attn.compress.form == "diag" for blk in model.blocks)
        assert not torch.allclose(model(x), full)
    with pytest.raises(ValueError, match="compress_form.*'paper'"):
        model.compress_form = "paper"
    assert all(blk.attn.compress.form == "diag" for blk in model.blocks)  # a bad name changes no block


def test_forward_memberships():
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    maps = model.forward_memberships(x)
    assert len(maps) == 4
    for m in maps:
        assert m.shape == (2, 2, 8, 12)
        torch.testing.assert_close(m.sum(1), torch.ones(2, 8, 12))
    with torch.no_grad():
        tokens, _ = model._embed(x)
        expected = model.blocks[0].memberships(tokens)  # (B, N, K)
        tokens = model.blocks[0](tokens)
        torch.testing.assert_close(maps[1], model.blocks[1].memberships(tokens).transpose(1, 2).reshape(2, 2, 8, 12))
    torch.testing.assert_close(maps[0], expected.transpose(1, 2).reshape(2, 2, 8, 12))


def test_cifar_variant_at_32_px():
    model = timm.create_model("pace_vit_tiny_patch4_32").train()
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    out.mean().backward()
    assert model.blocks[0].attn.expand.sketch.shape == (64, 20 * 4)  # 8 x 8 tokens, rank 20 x 4 subspaces
