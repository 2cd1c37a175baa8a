"""Periodic evaluation in training goes through the `eval` group's evaluators, for the raw and the EMA weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_helpers import write_val_jpegs
from train_helpers import read_metrics, run_train

from pace.eval import eval_data_config, load_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """timm's test ViT on synthetic data (the default `val` evaluator scores its held-out split) plus a `real`
    evaluator on nine JPEGs named like ImageNet val files, scored against ImageNet-ReaL by key; EMA on."""
    root = tmp_path_factory.mktemp("train_eval")
    write_val_jpegs(root / "imagenet_val", 9)
    # A user's own evaluator group, added to the config search path as docs/training.md describes.
    (root / "configs" / "eval").mkdir(parents=True)
    (root / "configs" / "eval" / "with_real.yaml").write_text(
        "val:\n  path: ${data.root}\n  labels: {val: targets}\n"
        f"real:\n  path: {root / 'imagenet_val'}\n  labels: {{real: imagenet_real}}\n  every_n_epochs: 2\n"
    )
    run_dir = root / "run"
    proc = run_train(
        run_dir,
        f"hydra.searchpath=[file://{root / 'configs'}]",
        "eval=with_real",
        "data.num_classes=1000",
        "trainer.ema=true",
        "trainer.limit_eval_batches=null",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "real: top-1" in proc.stdout and "ema/real: top-1" in proc.stdout
    return run_dir


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "val/top1" in r]


def test_every_epoch_scores_raw_and_ema_weights_on_the_held_out_split(run):
    evals = _evals(run)
    assert [r["epoch"] for r in evals] == [0, 1]
    for record in evals:
        for prefix in ("", "ema/"):
            assert record[f"{prefix}val/count"] == 64  # the whole synthetic held-out split, once
            assert record[f"{prefix}val/top1_count"] == 64
            assert 0.0 <= record[f"{prefix}val/top1"] <= record[f"{prefix}val/top5"] <= 100.0


def test_real_runs_at_its_own_cadence_and_excludes_empty_label_sets(run):
    first, last = _evals(run)
    assert not any(k.startswith(("real/", "ema/real/")) for k in first)  # every_n_epochs: 2
    for prefix in ("", "ema/"):
        assert last[f"{prefix}real/count"] == 9
        # One of the first nine ImageNet val images has an empty ReaL set (timm's JSON).
        assert last[f"{prefix}real/top1_count"] == 8
        assert 0.0 <= last[f"{prefix}real/top1"] <= 100.0


def test_checkpoints_and_the_release_evaluate_with_the_runs_transform(run):
    """pace-eval, the analysis scripts and timm's own resolve_data_config default to the run's 32 px transform,
    not the architecture's 224 px one."""
    checkpoint_path = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    stored = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["config"]
    size = stored["data"]["img_size"]
    expected = {"input_size": (3, size, size), "crop_pct": stored["aug"]["crop_pct"]}
    expected["interpolation"] = stored["aug"]["interpolation"]
    assert size != 224
    release = json.loads((run / "release" / "config.json").read_text())["pretrained_cfg"]
    assert (tuple(release["input_size"]), release["crop_pct"], release["interpolation"]) == tuple(expected.values())
    for source in (checkpoint_path, run / "release"):
        config = eval_data_config(load_model(checkpoint=source).model)
        assert {k: config[k] for k in expected} == expected, source
