"""ImageNet specifics: the published webdataset layout, the class list and validation keys and labels."""

from __future__ import annotations

import csv
import re
from pathlib import Path

# The Hugging Face hub's timm/imagenet-1k-wds: members `jpg` + `cls` + `json`, keys such as
# `ILSVRC2012_val_00000001`. Its shards carry no info file, so the published sample counts live here.
IMAGENET1K_WDS = {
    "train": {"pattern": "imagenet1k-train-{0000..1023}.tar", "num_shards": 1024, "num_samples": 1_281_167},
    "validation": {"pattern": "imagenet1k-validation-{0000..0063}.tar", "num_shards": 64, "num_samples": 50_000},
}
IMAGENET1K_WDS_SHARD = re.compile(r"^imagenet1k-(train|validation)-(\d{4})\.tar$")

_VAL_KEY = re.compile(r"^ILSVRC2012_val_(\d{8})$")


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in sorted order, the class-index order of timm's ImageNet heads."""
    from timm.data import ImageNetInfo

    wnids = list(ImageNetInfo("imagenet-1k").label_names())
    return sorted(wnids)


def val_key_index(key: str) -> int:
    """Zero-based position of an ImageNet validation key (`ILSVRC2012_val_00000001` -> 0).

    ImageNet-ReaL's label list is ordered by this index.

    Args:
        key: a sample key or file stem.
    """
    match = _VAL_KEY.match(key)
    if match is None:
        raise ValueError(f"not an ImageNet validation key: {key!r} (expected ILSVRC2012_val_NNNNNNNN)")
    return int(match.group(1)) - 1


def read_label_file(path: str | Path) -> dict[str, str]:
    """Read the labels of a flat image folder, keyed by file stem.

    Two formats are accepted:

    * Kaggle's `LOC_val_solution.csv` (header `ImageId,PredictionString`; the label is the first wnid
      of the prediction string);
    * one `<file name or stem> <label>` pair per line, separated by whitespace or a comma, where the label
      is a wnid or a class index. Blank lines and `#` comments are skipped.

    Args:
        path: the label file.

    Returns:
        Mapping from file stem to the label as written (a wnid or an integer string).
    """
    path = Path(path)
    labels: dict[str, str] = {}
    with path.open(newline="") as f:
        first = f.readline()
        if first.strip().lower().startswith("imageid,predictionstring"):
            for row in csv.reader(f):
                if row:
                    labels[_stem(row[0])] = row[1].split()[0]
            return labels
        for lineno, line in enumerate([first, *f], start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = re.split(r"[,\s]+", line)
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: expected '<file> <label>', got {line!r}")
            labels[_stem(parts[0])] = parts[1]
    return labels


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[0]
