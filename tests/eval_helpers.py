"""Shared pieces of the evaluation tests: synthetic logits for the 50,000 ImageNet val keys, a model that looks
them up by sample index, keyed loaders, and JPEG folders named like ImageNet val files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

N_VAL = 50_000


def real_json() -> list[list[int]]:
    """timm's ImageNet-ReaL labels, read straight from the JSON (independently of pace.eval)."""
    return json.loads((resources.files("timm.data") / "_info" / "imagenet_real_labels.json").read_text())


def synthetic_val_logits(real: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(50000, 1000) logits and (50000,) targets with a mix of ReaL top-1 hits, top-5-only hits and misses.

    Every third image puts a ReaL class first, every third puts one at rank 3 (behind two non-ReaL classes), the
    rest are random; targets are the first ReaL label (or a random class when the set is empty).
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N_VAL, 1000, generator=gen)
    targets = torch.randint(0, 1000, (N_VAL,), generator=gen)
    for i, labels in enumerate(real):
        if not labels:
            continue
        targets[i] = labels[0]
        if i % 3 == 0:
            logits[i, labels[-1]] = 20.0
        elif i % 3 == 1:
            others = [c for c in range(11) if c not in labels][:2]  # a set holds at most 9 classes
            logits[i, others] = torch.tensor([30.0, 25.0])
            logits[i, labels[0]] = 20.0
    return logits, targets


class LookupModel(nn.Module):
    """Returns precomputed logits for a batch of sample indices (the "images")."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits, persistent=False)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index]


def keyed_batches(indices: list[int], targets: torch.Tensor, batch_size: int) -> list[tuple]:
    """`(index, target, key)` batches over ImageNet val indices, in the given order."""
    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = torch.tensor(indices[start : start + batch_size])
        keys = [f"ILSVRC2012_val_{i + 1:08d}" for i in chunk.tolist()]
        batches.append((chunk, targets[chunk], keys))
    return batches


def write_val_jpegs(folder: Path, count: int, *, size: tuple[int, int] = (40, 48), seed: int = 0) -> dict[str, int]:
    """JPEG files `ILSVRC2012_val_00000001.JPEG` ... in `folder`; returns the label of each stem (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(1, count + 1):
        stem = f"ILSVRC2012_val_{i:08d}"
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.JPEG", quality=90)
        labels[stem] = int(rng.integers(0, 1000))
    return labels


def compose_eval(overrides: list[str]):
    """`configs/eval.yaml` composed with `overrides`, as `pace-eval` would (set `output_dir=` among them)."""
    from hydra import compose, initialize_config_dir

    from pace.eval.config import register_configs
    from pace.eval.main import CONFIG_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("eval", overrides=overrides)


def imagenet_wnids() -> list[str]:
    """timm's ImageNet-1k wnids in class-index order, read straight from its synset file."""
    text = (resources.files("timm.data") / "_info" / "imagenet_synsets.txt").read_text()
    return sorted(line.strip() for line in text.splitlines() if line.strip())


def timm_subset_wnids(name: str) -> list[str]:
    """The wnids of timm's `imagenet_a` / `imagenet_r` list, read straight from the file."""
    text = (resources.files("timm.data") / "_info" / f"{name}_synsets.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _noise_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def write_class_tree(root: Path, wnids: list[str], per_class: int, *, seed: int = 0) -> dict[str, str]:
    """An ImageNet-A/R/Sketch style tree `root/<wnid>/<wnid>_<i>.jpg` of noise JPEGs; returns key -> wnid."""
    rng = np.random.default_rng(seed)
    keys = {}
    for wnid in wnids:
        for i in range(per_class):
            _noise_jpeg(root / wnid / f"{wnid}_{i}.jpg", rng)
            keys[f"{wnid}_{i}"] = wnid
    return keys


def write_corruption_tree(
    root: Path, corruptions: list[str], severities: list[int], labels: dict[str, str], *, seed: int = 0
) -> dict[str, str]:
    """An ImageNet-C style tree `root/<corruption>/<severity>/<wnid>/<stem>.JPEG`: the same stems (val images)
    under every corruption and severity, each a different noise image; returns key `c/s/stem` -> wnid."""
    rng = np.random.default_rng(seed)
    keys = {}
    for corruption in corruptions:
        for severity in severities:
            for stem, wnid in labels.items():
                _noise_jpeg(root / corruption / str(severity) / wnid / f"{stem}.JPEG", rng)
                keys[f"{corruption}/{severity}/{stem}"] = wnid
    return keys


def biased_checkpoint(path: Path, classes: list[int], *, bias: float = 3.0, seed: int = 0) -> Path:
    """A training checkpoint of `pace_vit_test` whose head favours `classes`, so predictions hit and miss."""
    import timm

    import pace  # noqa: F401  (registers the models)

    torch.manual_seed(seed)
    model = timm.create_model("pace_vit_test")
    with torch.no_grad():
        model.head.bias[sorted(set(classes))] += bias
    state = model.state_dict()
    torch.save({"model": state, "model_ema": state, "model_name": "pace_vit_test", "model_args": {}}, path)
    return path


def reference_outputs(checkpoint: Path, files: dict[str, str | Path], *, size: int, crop_pct: float, flip=False):
    """key -> (logits, pooled features) of each image file, computed one image at a time with timm's own transform
    and model calls (independently of pace.eval)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    import pace  # noqa: F401

    saved = torch.load(checkpoint, weights_only=True)
    model = timm.create_model(saved["model_name"])
    model.load_state_dict(saved["model_ema"])
    model.eval()
    config = resolve_data_config({"input_size": (3, size, size), "crop_pct": crop_pct}, model=model)
    transform = create_transform(**config, is_training=False)
    out = {}
    with torch.no_grad():
        for key, file in files.items():
            with Image.open(file) as img:
                x = transform(img.convert("RGB"))[None]
            views = [x, x.flip(-1)] if flip else [x]
            feats = [model.forward_head(model.forward_features(v), pre_logits=True)[0] for v in views]
            logits = [model.forward_head(model.forward_features(v))[0] for v in views]
            out[key] = (sum(logits) / len(logits), sum(feats) / len(feats))
    return out
