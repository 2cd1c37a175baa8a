"""`pace-eval` end to end: config composition and validation, a JPEG folder named like ImageNet val files through
the command line, every model source through `run`, re-scoring, wandb offline, and the errors for bad data."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from eval_helpers import compose_eval, real_json, write_val_jpegs
from omegaconf import OmegaConf
from PIL import Image
from timm.models import save_for_hf
from torchvision.transforms import Compose, PILToTensor, Resize

import pace  # noqa: F401  (registers the models)
from pace.eval import build_evaluators, evaluators_from_config
from pace.eval.config import validate
from pace.eval.main import CONFIG_DIR, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    """Nine JPEGs `ILSVRC2012_val_00000001..9.JPEG` with a label file of their first ReaL class."""
    root = tmp_path_factory.mktemp("val")
    keys = list(write_val_jpegs(root / "val", 9))
    real = real_json()
    labels = {k: (real[i] or [3])[0] for i, k in enumerate(keys)}
    (root / "val.txt").write_text("".join(f"{k}.JPEG {c}\n" for k, c in labels.items()))
    return root


def base_args(root: Path, out: Path) -> list[str]:
    return [
        f"data.root={root / 'val'}",
        f"eval.imagenet.label_file={root / 'val.txt'}",
        "data.batch_size=4",
        "data.num_workers=0",
        "device=cpu",
        f"output_dir={out}",
    ]


@pytest.mark.parametrize("group", sorted(p.stem for p in (CONFIG_DIR / "eval").glob("*.yaml")))
def test_every_evaluator_group_composes_and_validates(group, tmp_path):
    cfg = compose_eval([f"eval={group}", "model.name=resnet10t", "data.root=/data/val", f"output_dir={tmp_path}"])
    config = validate(cfg)
    assert config.eval, group
    entries = evaluators_from_config(OmegaConf.to_container(cfg.eval, resolve=True))
    assert all(e.labels and e.topk for e in entries.values())
    assert any(e.path == "/data/val" for e in entries.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("amp=fp8", "amp='fp8'"),
        ("eval.imagenet.format=lmdb", "format='lmdb'"),
        ("model.weights=best", "model.weights='best'"),
        ("eval.imagenet.every_n_epochs=0", "every_n_epochs=0"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override, message, tmp_path):
    cfg = compose_eval(["model.name=resnet10t", "data.root=/data/val", f"output_dir={tmp_path}", override])
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_unknown_keys_and_missing_inputs_are_rejected(tmp_path):
    with pytest.raises(Exception, match="colour"):
        compose_eval(["model.name=resnet10t", "eval.imagenet.colour=red", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="model.name=None"):
        validate(compose_eval(["data.root=/data/val", f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="data.root=None.*evaluation data"):
        validate(compose_eval(["model.name=resnet10t", f"output_dir={tmp_path}"]))


def test_jpeg_folder_end_to_end_through_the_command_line(val_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [a for a in base_args(val_data, tmp_path) if not a.startswith("output_dir")]
    proc = subprocess.run(
        [sys.executable, "-m", "pace.eval.main", "model.name=pace_vit_test", *args, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "results.json").read_text())
    section = record["evaluators"]["imagenet"]
    assert section["counts"]["samples"] == 9
    assert (section["counts"]["real/top1"], section["counts"]["real/excluded"]) == (8, 1)
    assert set(section["metrics"]) == {
        "val/top1",
        "val/top5",
        "val/loss",
        "val/nll",
        "val/ece",
        "real/top1",
        "real/top5",
    }
    assert record["transform"]["input_size"] == [3, 64, 64] and record["transform"]["crop_pct"] == 0.875
    assert record["model"]["name"] == "pace_vit_test" and record["environment"]["world_size"] == 1
    assert record["config"]["eval"]["imagenet"]["label_file"].endswith("val.txt")
    assert section["timing"]["seconds"] > 0
    assert "real/top1" in proc.stdout and "imagenet" in proc.stdout  # the printed table


def test_release_checkpoint_is_hashed_and_predictions_rescore(val_data, tmp_path):
    torch.manual_seed(5)
    model = timm.create_model("pace_vit_test")
    with torch.no_grad():
        model.head.bias[[3, 970, 230, 809, 516, 57, 334, 415, 674]] += 4.0  # first ReaL classes of images 1-9
    save_for_hf(model, tmp_path / "release", safe_serialization=True)
    weights = tmp_path / "release" / "model.safetensors"
    out = tmp_path / "out"
    args = [f"model.checkpoint={tmp_path / 'release'}", "predictions=true", *base_args(val_data, out)]
    record = run(compose_eval(args))
    assert record["model"]["source"] == "release"
    assert record["model"]["sha256"] == {str(weights): hashlib.sha256(weights.read_bytes()).hexdigest()}
    section = record["evaluators"]["imagenet"]
    assert section["counts"]["real/top5_correct"] > 0  # the biased head makes hits possible
    assert json.loads((out / "results.json").read_text())["evaluators"]["imagenet"]["metrics"] == section["metrics"]

    rescored = run(compose_eval([f"rescore={section['predictions']}", f"output_dir={tmp_path / 'again'}"]))
    again = rescored["evaluators"]["imagenet"]
    assert again["metrics"] == section["metrics"]
    assert {k: again["counts"][k] for k in section["counts"]} == section["counts"]


def test_partial_data_is_an_error_unless_asked_for(val_data, tmp_path, caplog):
    extra = tmp_path / "val.txt"
    extra.write_text((val_data / "val.txt").read_text() + "ILSVRC2012_val_00000010.JPEG 4\n")
    args = ["model.name=pace_vit_test", *base_args(val_data, tmp_path), f"eval.imagenet.label_file={extra}"]
    with pytest.raises(ValueError, match="evaluated 9 unique samples, fewer than the 10"):
        run(compose_eval(args))
    with caplog.at_level(logging.WARNING):
        record = run(compose_eval([*args, "eval.imagenet.partial=true"]))
    assert record["evaluators"]["imagenet"]["counts"]["samples"] == 9
    assert "fewer than the 10" in caplog.text


def test_real_on_keys_that_are_not_val_files_names_the_key(tmp_path):
    for i in range(3):
        (tmp_path / "tree" / "n01440764").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i, 9, 9)).save(tmp_path / "tree" / "n01440764" / f"photo_{i}.jpg")
    args = ["model.name=pace_vit_test", f"data.root={tmp_path / 'tree'}", "data.num_workers=0", "device=cpu"]
    with pytest.raises(ValueError, match="not an ImageNet validation key: 'photo_0'"):
        run(compose_eval([*args, "+model.kwargs.num_classes=1", f"output_dir={tmp_path}"]))
    # The same tree without ReaL is a one-class ImageFolder; a 1000-class model does not fit it.
    with pytest.raises(ValueError, match="class-count mismatch: the model produces 1000 logits but the data has 1"):
        run(compose_eval([*args, "eval=default", f"output_dir={tmp_path}"]))
    record = run(compose_eval([*args, "eval=default", "+model.kwargs.num_classes=1", f"output_dir={tmp_path}"]))
    assert record["evaluators"]["val"]["metrics"]["val/top1"] == 100.0


def test_wandb_offline_run_is_written_locally(val_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["model.name=pace_vit_test", *base_args(val_data, tmp_path), "logger=wandb"]
    run(compose_eval(args))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_configured_evaluators_open_their_data_and_know_their_cadence(val_data):
    entries = evaluators_from_config(
        {
            "imagenet": {
                "path": str(val_data / "val"),
                "label_file": str(val_data / "val.txt"),
                "labels": {"val": "targets", "real": "imagenet_real"},
            },
            "v2": {"path": None, "labels": {"v2": "targets"}, "every_n_epochs": 10},
            "sparse": {"path": str(val_data / "val"), "labels": {"real": "imagenet_real"}, "every_n_epochs": 3},
        }
    )
    evaluators = build_evaluators(
        entries, Compose([Resize((32, 32)), PILToTensor(), float_image]), batch_size=4, num_workers=0
    )
    assert [e.name for e in evaluators] == ["imagenet", "sparse"]  # v2 has no data: skipped
    sparse = evaluators[1]
    assert [sparse.due(n) for n in (1, 2, 3, 6)] == [False, False, True, True] and sparse.due(4, last=True)
    assert (sparse.targets_name, list(sparse.label_sets)) == (None, ["real"])
    model = timm.create_model("resnet10t")
    result = evaluators[0].run(model, device="cpu")
    assert result.counts["samples"] == 9 and result.counts["real/top1"] == 8
    assert sparse.run(model, device="cpu").metrics.keys() == {"real/top1", "real/top5"}  # no val group asked for
    with pytest.raises(ValueError, match="eval.bad: .*every_n_epochs=0"):
        evaluators_from_config({"bad": {"path": "x", "labels": {"val": "targets"}, "every_n_epochs": 0}})


def float_image(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255
