"""pace.train.data_builders: the training data follow the model's data config."""

import pytest
import torch
from test_configs import compose_train
from train_helpers import FAST, make_tiny_shards

from pace.distributed import DistEnv
from pace.train.config import validate
from pace.train.data_builders import build_data

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5,) * 3, "std": (0.5,) * 3}


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_training_images_are_normalised_with_the_models_mean_and_std(tmp_path, decode):
    # aug=none (full-image crop, no flip, no erasing) is deterministic: both runs see the same pixels.
    overrides = (*FAST, *make_tiny_shards(tmp_path / "shapes"), "aug=none", f"data.decode={decode}")
    cfg = validate(compose_train(*overrides))
    pixels = []
    for stats in (IMAGENET, HALF):
        eval_config = {"input_size": (3, cfg.data.img_size, cfg.data.img_size), "crop_pct": 1.0, **stats}
        eval_config["interpolation"] = "bicubic"
        train, _, _ = build_data(cfg.data, cfg.aug, {}, DistEnv(), cfg.seed, eval_config=eval_config, mixup=None)
        images, _ = next(iter(train))
        mean, std = (torch.tensor(stats[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        pixels.append(images.float().cpu() * std + mean)
    assert pixels[0].std() > 0.05  # real images, not a constant
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
