"""The generated quickstart dataset: deterministic, balanced, idempotent, real JPEG shards, learnable."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from pace.data import (
    QUICKSTART_CLASSES,
    TrainSampling,
    create_eval_loader,
    create_eval_transform,
    create_train_loader,
    create_train_transform,
    make_quickstart_dataset,
    read_info,
)
from pace.data.make_shards import main
from pace.data.quickstart import render_image, render_jpeg

SMALL = {"train_per_class": 30, "val_per_class": 5, "shard_size": 100, "workers": 1}


def test_rendering_is_deterministic_and_seeded():
    a, label = render_image(seed=0, split="train", index=13)
    b, _ = render_image(seed=0, split="train", index=13)
    c, _ = render_image(seed=1, split="train", index=13)
    assert label == 3 and a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert render_jpeg(seed=0, split="val", index=2)[:2] == b"\xff\xd8"
    assert not np.array_equal(a, render_image(seed=0, split="val", index=13)[0])


def test_dataset_is_written_once_and_read_back(tmp_path):
    out = tmp_path / "shapes"
    info = make_quickstart_dataset(out, **SMALL)
    assert info["classes"] == list(QUICKSTART_CLASSES) == sorted(QUICKSTART_CLASSES)
    assert [info["splits"][s]["num_samples"] for s in ("train", "val")] == [300, 50]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert make_quickstart_dataset(out, **SMALL) == read_info(out)  # idempotent: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    loader = create_eval_loader(out, batch_size=50, transform=create_eval_transform(input_size=64), num_workers=2)
    labels = Counter(int(t) for _, targets, _ in loader for t in targets)
    assert labels == Counter(dict.fromkeys(range(10), 5))


def test_other_parameters_rewrite_and_foreign_directories_are_refused(tmp_path):
    out = tmp_path / "shapes"
    make_quickstart_dataset(out, **SMALL)
    info = make_quickstart_dataset(out, **{**SMALL, "train_per_class": 20})
    assert info["splits"]["train"]["num_samples"] == 200
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "shapes-train-000000.tar",
        "shapes-train-000001.tar",
        "shapes-val-000000.tar",
    ]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        make_quickstart_dataset(foreign, **SMALL)


def test_cli_generates_the_dataset(tmp_path, capsys):
    main([str(tmp_path / "shapes"), "--synthetic", "--workers", "2"])
    out = capsys.readouterr().out
    assert "train: 4000 samples in 8 shards" in out and "val: 500 samples in 1 shards" in out


@pytest.mark.slow
def test_a_small_convnet_learns_the_classes(tmp_path):
    # Form, not colour, separates the classes: a tiny CNN at 32 px gets far above chance (10%) in 3 epochs.
    torch.manual_seed(0)
    out = tmp_path / "shapes"
    make_quickstart_dataset(out)
    train_tf = create_train_transform(
        input_size=32, scale=(0.6, 1.0), color_jitter=None, auto_augment=None, re_prob=0.0, interpolation="bilinear"
    )
    train = create_train_loader(
        out, batch_size=64, transform=train_tf, num_workers=1, sampling=TrainSampling(shuffle_buffer=1000)
    )
    val = create_eval_loader(out, batch_size=250, transform=create_eval_transform(input_size=32), num_workers=0)

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(3):
        train.set_epoch(epoch)
        for images, targets in train:
            loss = nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y, _ in val)
    assert correct / 500 > 0.5
