"""Shard writer: round trip against the source files, info file, refusals, atomic shards, CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from data_helpers import decode_file, fixed_transform, jpeg_bytes, make_image_folder, write_shards
from PIL import Image

from pace.data import EncodeOptions, ShardPlan, create_eval_loader, read_info, shard_image_folders
from pace.data.image_folders import scan_image_folder
from pace.data.make_shards import main
from pace.data.writer import _write_shard

ROOT = Path(__file__).resolve().parents[1]


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def test_round_trip_every_image_once_with_label_key_and_bytes(tmp_path):
    files = make_image_folder(tmp_path / "src", classes=3, per_class=9)
    info = write_shards(tmp_path / "out", tmp_path / "src", max_count=4)

    # Stored bytes are the source files' bytes, labels are sorted-class indices, JSON names the source.
    stored = {}
    for name in info["splits"]["train"]["filenames"]:
        for member, data in _members(tmp_path / "out" / name).items():
            stored[member] = data
    assert len(stored) == 3 * len(files)
    for stem, (label, path) in files.items():
        assert stored[f"{stem}.jpg"] == path.read_bytes()
        assert stored[f"{stem}.cls"] == str(label).encode()
        meta = json.loads(stored[f"{stem}.json"])
        assert meta["filename"] == str(path.relative_to(tmp_path / "src"))
        assert meta["class_name"] == f"n{label:08d}"
        assert (meta["width"], meta["height"]) == Image.open(path).size

    # The reader yields each image exactly once, decoded as the source file decodes.
    out = tmp_path / "out"
    loader = create_eval_loader(out, split="train", batch_size=5, transform=fixed_transform(), num_workers=0)
    seen = {}
    for images, targets, keys in loader:
        for image, target, key in zip(images, targets, keys):
            assert key not in seen
            seen[key] = (image, int(target))
    assert set(seen) == set(files)
    for stem, (label, path) in files.items():
        assert seen[stem][1] == label
        assert torch.equal(seen[stem][0], decode_file(path))


def test_info_file_counts_shards_and_classes(tmp_path):
    make_image_folder(tmp_path / "src", classes=4, per_class=5)
    info = write_shards(tmp_path / "out", tmp_path / "src", max_count=6)
    on_disk = read_info(tmp_path / "out")
    assert on_disk == json.loads(json.dumps(info))
    split = on_disk["splits"]["train"]
    assert on_disk["classes"] == [f"n{k:08d}" for k in range(4)]
    assert split["num_samples"] == 20
    assert split["shard_lengths"] == [6, 6, 6, 2]
    assert split["filenames"] == [f"out-train-{i:06d}.tar" for i in range(4)]
    assert split["pattern"] == "out-train-{000000..000003}.tar"
    for name, length in zip(split["filenames"], split["shard_lengths"]):
        assert len(_members(tmp_path / "out" / name)) == 3 * length
    assert split["image_size"]["min"] == [16, 12] and split["image_size"]["max"] == [20, 16]


def test_timm_reads_our_shards_through_the_info_file(tmp_path):
    from timm.data import create_dataset

    files = make_image_folder(tmp_path / "src", classes=2, per_class=6)
    write_shards(tmp_path / "out", tmp_path / "src", max_count=5)
    dataset = create_dataset("wds/out", root=str(tmp_path / "out"), split="train", is_training=False)
    labels = sorted(int(target) for _, target in dataset)
    assert len(dataset) == 12 and labels == sorted(label for label, _ in files.values())


def test_train_split_is_shuffled_but_contents_do_not_depend_on_workers(tmp_path):
    make_image_folder(tmp_path / "src", classes=3, per_class=8)
    one = write_shards(tmp_path / "a", tmp_path / "src", max_count=5, workers=1, prefix="x")
    two = write_shards(tmp_path / "b", tmp_path / "src", max_count=5, workers=2, prefix="x")
    assert one["splits"] == two["splits"]
    for name in one["splits"]["train"]["filenames"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    first = list(_members(tmp_path / "a" / "x-train-000000.tar"))
    assert len({name.split("_")[1] for name in first}) > 1, "first shard should mix classes"


def test_non_empty_output_refused_unless_overwrite(tmp_path):
    make_image_folder(tmp_path / "src", classes=2, per_class=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        write_shards(out, tmp_path / "src")
    assert sorted(os.listdir(out)) == ["notes.txt"]
    write_shards(out, tmp_path / "src", overwrite=True)
    assert (out / "notes.txt").read_text() == "keep"
    assert read_info(out)["splits"]["train"]["num_samples"] == 6


def test_overwrite_replaces_only_the_split_written(tmp_path):
    make_image_folder(tmp_path / "src", classes=2, per_class=6)
    make_image_folder(tmp_path / "val", classes=2, per_class=2, seed=1)
    out = tmp_path / "out"
    write_shards(out, tmp_path / "src", max_count=2)  # 6 train shards
    write_shards(out, tmp_path / "val", split="val", overwrite=True)
    write_shards(out, tmp_path / "src", max_count=5, overwrite=True)  # 3 train shards now
    info = read_info(out)
    assert sorted(info["splits"]) == ["train", "val"]
    assert sorted(p.name for p in out.glob("*-train-*")) == info["splits"]["train"]["filenames"]
    assert len(info["splits"]["train"]["filenames"]) == 3


def test_failed_shard_leaves_no_final_named_file(tmp_path, monkeypatch):
    _, images = scan_image_folder(make_image_folder(tmp_path / "src", classes=1, per_class=6) and tmp_path / "src")
    broken = images[:3] + [images[3].__class__(key="bad", label=0, class_name="x", path=str(tmp_path / "gone.jpg"))]
    target = tmp_path / "s-000000.tar"
    with pytest.raises(ValueError, match="gone.jpg"):
        _write_shard(str(target), broken, EncodeOptions())
    assert not target.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_killed_writer_leaves_the_output_untouched_and_a_rerun_finishes(tmp_path, capsys):
    # A real interruption: SIGKILL while a shard is being written. The shards are written in a staging directory
    # beside the output, which appears only when every split is done.
    src = tmp_path / "src"
    make_image_folder(src, classes=2, per_class=400)
    out = tmp_path / "out"
    staging = tmp_path / ".out.partial"
    cmd = [sys.executable, "-m", "pace.data.make_shards", str(out), "--split", f"train={src}", "--max-count", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(staging.glob("*-000002.tar.tmp")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(staging.glob("*.tmp")), "the writer was not caught mid-shard"
    assert not out.exists()
    finals = sorted(staging.glob("*.tar"))
    assert len(finals) == 2
    for path in finals:
        assert len(_members(path)) == 300  # complete: 100 samples x 3 members
    # Re-running (no --overwrite: the output was never created) finishes the job and clears the staging directory.
    main([*cmd[3:], "--workers", "2"])
    assert "train: 800 samples in 8 shards" in capsys.readouterr().out
    assert not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == ["_info.json"] + [f"out-train-{i:06d}.tar" for i in range(8)]
    assert read_info(out)["splits"]["train"]["shard_lengths"] == [100] * 8


def test_flat_validation_layout_with_label_file(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    classes = ["n01440764", "n01443537", "n01484850"]
    lines = ["ImageId,PredictionString"]
    for i in range(1, 7):
        stem = f"ILSVRC2012_val_{i:08d}"
        (val / f"{stem}.JPEG").write_bytes(jpeg_bytes(i))
        lines.append(f"{stem},{classes[i % 3]} 1 2 3 4")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    info = shard_image_folders(
        tmp_path / "out",
        {"val": val},
        labels={"val": tmp_path / "LOC_val_solution.csv"},
        classes_file=tmp_path / "classes.txt",
        plan=ShardPlan(max_count=4),
    )
    assert info["splits"]["val"]["num_samples"] == 6
    loader = create_eval_loader(tmp_path / "out", batch_size=4, transform=fixed_transform(), num_workers=0)
    labels = {key: int(t) for _, targets, keys in loader for key, t in zip(keys, targets)}
    assert labels == {f"ILSVRC2012_val_{i:08d}": i % 3 for i in range(1, 7)}


def test_flat_folder_with_unlabelled_image_names_it(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    (val / "a.JPEG").write_bytes(jpeg_bytes(0))
    (val / "b.JPEG").write_bytes(jpeg_bytes(1))
    (tmp_path / "labels.txt").write_text("a.JPEG n1\n")
    with pytest.raises(ValueError, match="b.JPEG"):
        shard_image_folders(tmp_path / "out", {"val": val}, labels={"val": tmp_path / "labels.txt"})


def test_repeated_stems_get_path_keys(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "src" / name / f"{i:04d}.jpg").write_bytes(jpeg_bytes(i))
    _, images = scan_image_folder(tmp_path / "src")
    assert sorted(i.key for i in images) == ["cat/0000", "cat/0001", "dog/0000", "dog/0001"]
    with pytest.raises(ValueError, match="duplicate sample key"):
        scan_image_folder(tmp_path / "src", key_style="stem")


def test_resize_on_write_bounds_the_longer_side(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "big.png").write_bytes(_png(300, 120))
    (tmp_path / "src" / "a" / "small.png").write_bytes(_png(40, 30))
    options = EncodeOptions(max_side=100, quality=85)
    info = shard_image_folders(tmp_path / "out", {"train": tmp_path / "src"}, options=options)
    members = _members(tmp_path / "out" / info["splits"]["train"]["filenames"][0])
    assert Image.open(io.BytesIO(members["big.jpg"])).size == (100, 40)
    assert json.loads(members["big.json"])["orig_width"] == 300
    assert members["small.png"] == (tmp_path / "src" / "a" / "small.png").read_bytes()  # small: stored as is
    assert info["splits"]["train"]["stored"] == {"max_side": 100, "quality": 85, "reencode": False}


def test_corrupt_source_image_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path / "src", classes=1, per_class=2)
    bad = tmp_path / "src" / "n00000000" / "broken.jpg"
    bad.write_bytes(jpeg_bytes(5)[:60])
    with pytest.raises(ValueError, match="broken.jpg"):
        write_shards(tmp_path / "out", tmp_path / "src")


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()
