"""One eval transform: the Trainer's periodic evaluation and pace-eval on that run's checkpoint feed the model the
same tensors for a real image, and those are torchvision's resize / centre crop / normalise at the run's settings.
"""

from __future__ import annotations

import shutil

import torch
from eval_helpers import compose_eval
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms
from train_helpers import ROOT

import pace  # noqa: F401  (registers the PACE-ViT variants)
from pace.distributed import DistEnv
from pace.eval import read_predictions
from pace.eval.main import run as pace_eval
from pace.train.assemble import build_trainer
from pace.train.builders import model_args
from pace.train.config import register_configs, validate

# A real picture (a figure of the analysis docs), in two class folders of an ImageFolder tree.
IMAGE = ROOT / "docs" / "figures" / "analysis" / "val_000000_memberships.png"
SIZE, CROP, INTERPOLATION = 40, 0.9, "bilinear"  # the run's settings, none of them timm's or the model's default


def _compose_train(overrides: list[str]):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("train", overrides=overrides)


def test_trainer_and_pace_eval_feed_the_model_the_same_tensors(tmp_path):
    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        shutil.copy(IMAGE, folder / name / f"{name}.png")
    overrides = [
        "debug=cpu",
        "model=pace_vit_test",
        "logger=none",
        "data.num_classes=2",
        f"data.img_size={SIZE}",
        f"aug.crop_pct={CROP}",
        f"aug.interpolation={INTERPOLATION}",
        f"eval.val.path={folder}",
        f"run_dir={tmp_path / 'run'}",
    ]
    composed = _compose_train(overrides)
    resolved = OmegaConf.to_container(composed, resolve=True)
    cfg = validate(composed)
    trainer = build_trainer(cfg, env=DistEnv(), device=torch.device("cpu"), resolved=resolved)
    (evaluator,) = trainer.evaluators

    images, _, keys = next(iter(evaluator.data.loader))
    reference = transforms.Compose(
        [
            transforms.Resize(int(SIZE / CROP), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(SIZE),
            transforms.ToTensor(),
            transforms.Normalize(trainer.model.pretrained_cfg["mean"], trainer.model.pretrained_cfg["std"]),
        ]
    )
    expected = reference(Image.open(IMAGE).convert("RGB"))
    assert images.shape == (2, 3, SIZE, SIZE)
    for image in images:
        torch.testing.assert_close(image, expected)

    trained = tmp_path / "trainer.jsonl"
    evaluator.run(trainer.model, device="cpu", predictions_path=trained, keep_logits=True)
    checkpoint = tmp_path / "step_00000001.pt"
    meta = {"model_name": cfg.model.name, "model_args": model_args(cfg.model), "config": resolved}
    torch.save({"model": trainer.model.state_dict(), **meta}, checkpoint)

    out = tmp_path / "eval"
    record = pace_eval(
        compose_eval(
            [
                f"model.checkpoint={checkpoint}",
                f"data.root={folder}",
                "eval=default",
                "data.num_workers=0",
                "device=cpu",
                "predictions=true",
                "predictions_logits=true",
                f"output_dir={out}",
            ],
        )
    )
    transform = record["transform"]
    assert (transform["input_size"], transform["crop_pct"], transform["interpolation"]) == (
        (3, SIZE, SIZE),
        CROP,
        INTERPOLATION,
    )
    ours, theirs = read_predictions(trained), read_predictions(out / "predictions_val.jsonl.gz")
    assert ours.keys == theirs.keys == sorted(keys)
    # Same weights and, through the one transform, the same input tensors: the same logits.
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=0, atol=1e-6)
