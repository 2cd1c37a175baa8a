"""Fine-tuning: weights from the authors' checkpoint format, our checkpoints and release files; head reset for a
new class count; a new resolution; layer-wise lr decay; no weight decay on PACE's scalars."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from train_helpers import read_metrics, run_train

import pace  # noqa: F401  (registers the models)
from pace.train import builders
from pace.train.builders import build_model, build_optimizer
from pace.train.checkpoint import export_release
from pace.train.config import ModelConfig, OptimConfig


def _to_authors_format(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pace_vit state dict under the reference's key names and shapes (spec §6)."""
    out = {}
    for k, v in sd.items():
        if ".attn.q." in k and k.startswith("cls_attn_blocks."):
            parts = [sd[k.replace(".attn.q.", f".attn.{n}.")] for n in "qkv"]
            out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
            continue
        if ".attn.k." in k or ".attn.v." in k:
            continue
        k = k.replace("pos_embed.", "pos_embeder.")
        k = k.replace(".attn.expand.sketch", ".attn.expandoperator.Omega")
        k = k.replace(".attn.compress.sketch", ".attn.compressoperator.Omega")
        k = k.replace(".attn.compress.subspaces", ".attn.compressoperator.Us")
        if k.endswith(".attn.compress.tau"):
            k, v = k.replace(".attn.compress.tau", ".attn.compressoperator.temperature"), v.reshape(1)
        k = k.replace(".attn.alpha", ".gamma1").replace(".attn.beta", ".gamma2")
        if k.startswith("blocks."):
            k = k.replace(".norm.", ".norm1.")
        out[k] = v
    return out


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    source = timm.create_model("pace_vit_test", num_classes=1000).eval()
    sd = _to_authors_format(source.state_dict())
    path = tmp_path_factory.mktemp("authors") / "checkpoint.pth"
    args = argparse.Namespace(model="ECAttention_test", nb_classes=1000, input_size=64)
    torch.save({"model": sd, "model_ema": sd, "optimizer": {}, "epoch": 299, "args": args}, path)
    return path, source.state_dict()


def test_authors_checkpoint_loads_with_a_new_head(authors_checkpoint):
    path, source = authors_checkpoint
    model = build_model(ModelConfig(name="pace_vit_test", num_classes=10, drop_path_rate=0.0, pretrained=str(path)))
    assert model.compress_form == "diag"  # the authors' Compress, switched on by the checkpoint format
    assert model.get_classifier().out_features == 10
    loaded = model.state_dict()
    for name in ("blocks.2.attn.compress.subspaces", "blocks.0.attn.alpha", "patch_embed.proj.0.0.weight"):
        assert torch.equal(loaded[name], source[name]), name
    assert not torch.equal(loaded["head.weight"][:10], source["head.weight"][:10])


def test_missing_pretrained_file_names_the_key(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        build_model(ModelConfig(name="pace_vit_test", num_classes=10, pretrained=str(tmp_path / "nope.pth")))


def test_release_export_loads_through_timm_and_as_pretrained(tmp_path: Path):
    torch.manual_seed(0)
    model = timm.create_model("pace_vit_test", num_classes=10).eval()
    weights = export_release(model, tmp_path / "release", {"num_classes": 10, "drop_path_rate": 0.0})
    assert weights.name == "model.safetensors" and (tmp_path / "release" / "config.json").is_file()
    x = torch.randn(2, 3, 64, 64)
    # The overlay states the file's class count; otherwise timm compares against the default 1000 and drops the head.
    overlay = {"file": str(weights), "num_classes": 10}
    loaded = timm.create_model("pace_vit_test", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay).eval()
    from_dir = timm.create_model(f"local-dir:{tmp_path / 'release'}", pretrained=True).eval()
    as_pretrained = build_model(ModelConfig(name="pace_vit_test", num_classes=10, pretrained=str(tmp_path / "release")))
    with torch.no_grad():
        expected = model(x)
        for other in (loaded, from_dir, as_pretrained.eval()):
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_layer_decay_and_no_weight_decay_on_pace_scalars():
    model = timm.create_model("pace_vit_test", num_classes=10)
    optimizer = build_optimizer(model, OptimConfig(base_lr=1e-3, lr_base_size=64, layer_decay=0.5), global_batch=64)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_of = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    scale_of = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    for scalar in ("blocks.0.attn.alpha", "blocks.0.attn.beta", "blocks.0.attn.compress.tau", "head.bias"):
        assert decay_of[scalar] == 0.0, scalar
    assert decay_of["blocks.0.attn.compress.subspaces"] == 0.05
    # Deeper layers learn faster: scale 0.5 ** (depth distance to the head).
    assert scale_of["head.weight"] == 1.0
    assert scale_of["patch_embed.proj.0.0.weight"] < scale_of["blocks.0.attn.compress.subspaces"]
    assert scale_of["blocks.0.attn.compress.subspaces"] == 0.5 * scale_of["blocks.1.attn.compress.subspaces"]


def test_finetune_experiment_runs_from_the_authors_checkpoint_at_a_new_resolution(authors_checkpoint, tmp_path):
    path, _ = authors_checkpoint
    out = run_train(
        tmp_path,
        "experiment=finetune",
        "debug=cpu",
        "model=pace_vit_test",
        f"model.pretrained={path}",
        "data.img_size=48",  # the checkpoint's sketches are for 64 px; 48 px has 36 tokens
        "trainer.limit_train_batches=3",
        "sched.epochs=1",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    logs = out.stdout + out.stderr
    assert "new 10-class head" in logs and "diag" in logs
    evals = [r for r in read_metrics(tmp_path) if "val/top1" in r]
    assert evals and evals[-1]["val/count"] == 32


def test_hf_hub_source_loads_through_timm_hub_download(tmp_path: Path, monkeypatch):
    # No network: the hub download is replaced by a local file, the rest of the path is timm's and ours.
    torch.manual_seed(1)
    source = timm.create_model("pace_vit_test", num_classes=10)
    requested = []

    def fake_hub(model_id, *args, **kwargs):
        requested.append(model_id)
        return source.state_dict()

    monkeypatch.setattr(builders, "load_state_dict_from_hf", fake_hub)
    model = build_model(ModelConfig(name="pace_vit_test", num_classes=10, pretrained="hf-hub:org/pace-vit-test"))
    assert requested == ["org/pace-vit-test"]
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
