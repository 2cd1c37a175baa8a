"""Folder datasets for evaluation: label files, flat ImageNet val folders, ImageFolder trees, format detection and
the per-rank split (every sample on exactly one rank)."""

import pytest
from eval_helpers import write_val_jpegs
from PIL import Image
from torchvision.transforms import PILToTensor

from pace.eval.evaluators import detect_format
from pace.eval.folders import folder_loader, image_folder, imagenet_val_folder, read_val_labels


def test_label_file_formats(tmp_path):
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n01443537 1 2 3 4 n01443537 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n15075141 1 2 3 4\n"
    )
    assert read_val_labels(kaggle) == {"ILSVRC2012_val_00000001": 999, "ILSVRC2012_val_00000002": 1}
    text = tmp_path / "val.txt"
    text.write_text("ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002,n01440764\n\nILSVRC2012_val_00000003 7\n")
    assert read_val_labels(text) == {
        "ILSVRC2012_val_00000001": 65,
        "ILSVRC2012_val_00000002": 0,
        "ILSVRC2012_val_00000003": 7,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("490\n361\n", "devkit"),
        ("a.JPEG 1\na.JPEG 2\n", "a is listed twice"),
        ("a.JPEG n99999999\n", ":1: label 'n99999999'"),
        ("a.JPEG 1 2\n", "expected 'file label'"),
    ],
)
def test_bad_label_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "labels.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_val_labels(path)


def test_flat_val_folder_with_and_without_labels(tmp_path):
    labels = write_val_jpegs(tmp_path / "val", 5)
    (tmp_path / "val" / "notes.txt").write_text("not an image")
    label_file = tmp_path / "labels.txt"
    extra = "ILSVRC2012_val_00000009 3\n"  # listed but absent: the folder is smaller than its label file says
    label_file.write_text("".join(f"{k}.JPEG {v}\n" for k, v in labels.items()) + extra)
    data = imagenet_val_folder(tmp_path / "val", label_file)
    assert [(p.stem, t) for p, t in data.samples] == list(labels.items())
    assert (data.num_classes, data.expected_samples) == (1000, 6)

    unlabelled = imagenet_val_folder(tmp_path / "val")
    assert {t for _, t in unlabelled.samples} == {-1}

    label_file.write_text("ILSVRC2012_val_00000001 3\n")
    with pytest.raises(ValueError, match="no label for 4 images.*ILSVRC2012_val_00000002"):
        imagenet_val_folder(tmp_path / "val", label_file)
    with pytest.raises(FileNotFoundError, match="no ILSVRC2012_val"):
        imagenet_val_folder(tmp_path)


def test_image_folder_and_format_detection(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3)):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "tree" / cls / f"{cls}{i}.jpg")
    data = image_folder(tmp_path / "tree")
    assert data.num_classes == 2
    assert [(p.stem, t) for p, t in data.samples] == [("cat0", 0), ("cat1", 0), ("cat2", 0), ("dog0", 1), ("dog1", 1)]

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
        loader = folder_loader(data, PILToTensor(), batch_size=2, num_workers=0, rank=rank, world_size=world_size)
        for images, targets, keys in loader:
            assert images.shape[1:] == (3, 8, 8) and len(keys) == len(targets)
            seen += keys
    assert sorted(seen) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 8)]
