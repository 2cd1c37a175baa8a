"""Real JPEGs: CIFAR-10 (ImageFolder layout, stems repeated across classes) converts and reads back complete."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
from data_helpers import decode_file, fixed_transform

from pace.data import EncodeOptions, ShardPlan, create_eval_loader, create_train_loader, shard_image_folders

REPO = Path(__file__).resolve().parents[1]
TARBALL = Path("data") / "cifar10" / "cifar10_jpg.tar.gz"


def _tarball() -> Path:
    """The CIFAR-10 JPEG tarball: $PACE_CIFAR10_TARBALL, else shared/ beside or inside the checkout."""
    candidates = [
        os.environ.get("PACE_CIFAR10_TARBALL", ""),
        REPO.parent / "shared" / TARBALL,
        REPO / "shared" / TARBALL,
    ]
    for path in candidates:
        if path and Path(path).is_file():
            return Path(path)
    pytest.skip("CIFAR-10 JPEG tarball not available")


def _extract(target: Path, per_class: int | None) -> Path:
    """Extract cifar10/{train,test}; per_class keeps only the first images of each class."""
    with tarfile.open(_tarball()) as tar:
        members = [m for m in tar if m.isfile()]
        if per_class is not None:
            members = [m for m in members if int(Path(m.name).stem) < per_class]
        tar.extractall(target, members=members, filter="data")
    return target / "cifar10"


def _convert_and_check(root: Path, out: Path, workers: int, max_count: int) -> None:
    info = shard_image_folders(
        out,
        {"train": root / "train", "val": root / "test"},
        plan=ShardPlan(max_count=max_count),
        workers=workers,
        options=EncodeOptions(verify=False),
    )
    assert info["classes"] == sorted(p.name for p in (root / "train").iterdir())
    for split, folder in (("train", root / "train"), ("val", root / "test")):
        sources = {f"{p.parent.name}/{p.stem}": p for p in folder.glob("*/*.jpg")}
        assert info["splits"][split]["num_samples"] == len(sources)
        loader = create_eval_loader(out, split=split, batch_size=256, transform=fixed_transform(32), num_workers=2)
        seen = {}
        for images, targets, keys in loader:
            for image, target, key in zip(images, targets, keys):
                assert key not in seen
                seen[key] = (image, int(target))
        assert seen.keys() == sources.keys()
        for key in list(sources)[:: max(1, len(sources) // 200)]:  # spot-check pixels and labels
            image, target = seen[key]
            assert info["classes"][target] == key.split("/")[0]
            assert torch.equal(image, decode_file(sources[key], 32))


def test_cifar_subset_converts_and_reads_back(tmp_path):
    root = _extract(tmp_path / "src", per_class=40)
    _convert_and_check(root, tmp_path / "out", workers=1, max_count=100)
    loader = create_train_loader(tmp_path / "out", batch_size=50, transform=fixed_transform(32), num_workers=2)
    assert sum(len(t) for _, t in loader) == 400


@pytest.mark.slow
def test_cifar_full_converts_and_reads_back(tmp_path):
    root = _extract(tmp_path / "src", per_class=None)
    _convert_and_check(root, tmp_path / "out", workers=2, max_count=2000)
