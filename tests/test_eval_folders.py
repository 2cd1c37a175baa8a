"""Folder datasets for evaluation: label files, flat ImageNet val folders, ImageFolder trees, format detection and
the per-rank split (every sample on exactly one rank)."""

from pathlib import Path

import pytest
from eval_helpers import write_val_jpegs
from PIL import Image
from torchvision.transforms import PILToTensor

from pace.distributed import DistEnv
from pace.eval.datasets import detect_format
from pace.eval.folders import folder_loader, image_folder, imagenet_val_folder


def test_label_files_map_synsets_to_timm_class_order(tmp_path):
    write_val_jpegs(tmp_path / "val", 3)
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n01443537 1 2 3 4 n01443537 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n15075141 1 2 3 4\n"
        "ILSVRC2012_val_00000003,n01440764 1 2 3 4\n"
    )
    text = tmp_path / "val.txt"
    text.write_text("ILSVRC2012_val_00000001.JPEG 999\nILSVRC2012_val_00000002 1\nILSVRC2012_val_00000003,n01440764\n")
    for label_file in (kaggle, text):
        data = imagenet_val_folder(tmp_path / "val", label_file)
        assert [(Path(p).name, t, k) for p, t, k in data.samples] == [
            ("ILSVRC2012_val_00000001.JPEG", 999, "ILSVRC2012_val_00000001"),
            ("ILSVRC2012_val_00000002.JPEG", 1, "ILSVRC2012_val_00000002"),
            ("ILSVRC2012_val_00000003.JPEG", 0, "ILSVRC2012_val_00000003"),
        ]


def test_flat_val_folder_with_and_without_labels(tmp_path):
    labels = write_val_jpegs(tmp_path / "val", 5)
    (tmp_path / "val" / "notes.txt").write_text("not an image")
    label_file = tmp_path / "labels.txt"
    extra = "ILSVRC2012_val_00000009 3\n"  # listed but absent: the folder is smaller than its label file says
    label_file.write_text("".join(f"{k}.JPEG {v}\n" for k, v in labels.items()) + extra)
    data = imagenet_val_folder(tmp_path / "val", label_file)
    assert [(k, t) for _, t, k in data.samples] == list(labels.items())
    assert (data.num_classes, data.expected_samples) == (1000, 6)

    unlabelled = imagenet_val_folder(tmp_path / "val")
    assert {t for _, t, _ in unlabelled.samples} == {-1}
    assert [k for _, _, k in unlabelled.samples] == list(labels)

    label_file.write_text("ILSVRC2012_val_00000001 3\n")
    with pytest.raises(ValueError, match="4 images in .* have no label, e.g. ILSVRC2012_val_00000002"):
        imagenet_val_folder(tmp_path / "val", label_file)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        imagenet_val_folder(tmp_path / "nothing")


def test_image_folder_and_format_detection(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3)):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "tree" / cls / f"{cls}{i}.jpg")
    data = image_folder(tmp_path / "tree")
    assert data.num_classes == 2
    assert [(k, t) for _, t, k in data.samples] == [("cat0", 0), ("cat1", 0), ("cat2", 0), ("dog0", 1), ("dog1", 1)]

    # ImageNetV2's layout names class folders by index: folder "10" is class 10, not the 2nd in string order.
    for name in ("0", "10", "2"):
        (tmp_path / "v2" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "v2" / name / f"img{name}.jpeg")
    v2 = image_folder(tmp_path / "v2")
    assert sorted((k, t) for _, t, k in v2.samples) == [("img0", 0), ("img10", 10), ("img2", 2)]
    assert v2.num_classes == 11

    write_val_jpegs(tmp_path / "flat", 2)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "val-000000.tar").write_bytes(b"")
    assert detect_format(str(tmp_path / "tree")) == "image_folder"
    assert detect_format(str(tmp_path / "flat")) == "imagenet_val_folder"
    assert detect_format(str(tmp_path / "shards")) == "webdataset"
    assert detect_format(str(tmp_path / "val-{000000..000003}.tar")) == "webdataset"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the data format"):
        detect_format(str(tmp_path / "empty"))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_split_the_folder_exactly_once(tmp_path, world_size):
    write_val_jpegs(tmp_path, 7, size=(8, 8))
    data = imagenet_val_folder(tmp_path)
    seen = []
    for rank in range(world_size):
        env = DistEnv(rank=rank, world_size=world_size)
        loader = folder_loader(data, PILToTensor(), batch_size=2, num_workers=0, env=env)
        for images, targets, keys in loader:
            assert images.shape[1:] == (3, 8, 8) and len(keys) == len(targets)
            seen += keys
    assert sorted(seen) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 8)]
