"""Label sets keyed by sample key: ImageNet-ReaL and any other multi-label set given as a file.

A prediction is scored against a label set by the sample's key, never by its position in the data stream, so the
order in which samples arrive (shuffled shards, several ranks, several workers) cannot change a metric.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from pace.data import val_key_index

IMAGENET_VAL_SIZE = 50_000


def imagenet_val_key(index: int) -> str:
    """The key (file stem) of ImageNet val image `index` (0-based, validation-file order)."""
    if not 0 <= index < IMAGENET_VAL_SIZE:
        raise ValueError(f"ImageNet val index {index} is outside [0, {IMAGENET_VAL_SIZE})")
    return f"ILSVRC2012_val_{index + 1:08d}"


def _imagenet_val_index(key: str) -> int:
    index = val_key_index(key)
    if not 0 <= index < IMAGENET_VAL_SIZE:
        raise ValueError(f"{key!r} is outside the {IMAGENET_VAL_SIZE} ImageNet val images")
    return index


class LabelSets:
    """A set of acceptable classes per sample key, as ImageNet-ReaL gives for ImageNet val.

    Samples whose set is empty (ReaL found no confident label) are excluded from scoring; a prediction counts as
    correct when it is in the set.

    Args:
        sets: sample key -> acceptable class indices.
        name: a short name for messages and reports, such as "real".
        source: where the sets came from (a path or a package resource), for reports.
        key_check: optional function that validates a key and raises ValueError naming it (ReaL uses
            the val file index, so a key that is not an ImageNet val stem fails loudly, not as "missing").
    """

    def __init__(
        self,
        sets: Mapping[str, Iterable[int]],
        *,
        name: str,
        source: str = "",
        key_check=None,
    ):
        self.sets = {key: frozenset(int(c) for c in classes) for key, classes in sets.items()}
        self.name = name
        self.source = source
        self.key_check = key_check
        self.max_class = max((max(s) for s in self.sets.values() if s), default=-1)

    def __len__(self) -> int:
        return len(self.sets)

    def __repr__(self) -> str:
        return f"LabelSets(name={self.name!r}, keys={len(self)}, source={self.source!r})"

    def lookup(self, key: str) -> frozenset[int]:
        """The acceptable classes of `key` (possibly empty).

        Raises:
            ValueError: the key fails the key check (e.g. not an ImageNet val stem).
            KeyError: the key is valid but has no entry in these label sets.
        """
        if self.key_check is not None:
            try:
                self.key_check(key)
            except ValueError as e:
                raise ValueError(f"the {self.name!r} label sets are keyed by ImageNet val file stems: {e}") from None
        try:
            return self.sets[key]
        except KeyError:
            raise KeyError(f"sample key {key!r} has no entry in the {self.name!r} label sets ({self.source})") from None

    @classmethod
    def imagenet_real(cls, path: str | Path | None = None) -> LabelSets:
        """ImageNet-ReaL labels (Beyer et al. 2020, "Are we done with ImageNet?").

        Args:
            path: a `real.json` in the published format (a list of 50,000 label lists in validation-file order);
                None reads the copy that timm ships (`timm/data/_info/imagenet_real_labels.json`).
        """
        if path is None:
            resource = resources.files("timm.data") / "_info" / "imagenet_real_labels.json"
            entries, source = json.loads(resource.read_text()), "timm:data/_info/imagenet_real_labels.json"
        else:
            entries, source = json.loads(Path(path).read_text()), str(path)
        if not isinstance(entries, list) or len(entries) != IMAGENET_VAL_SIZE:
            raise ValueError(f"{source}: expected a list of {IMAGENET_VAL_SIZE} label lists in ImageNet val order")
        sets = {imagenet_val_key(i): labels for i, labels in enumerate(entries)}
        return cls(sets, name="real", source=source, key_check=_imagenet_val_index)

    @classmethod
    def from_json(cls, path: str | Path, *, name: str) -> LabelSets:
        """Label sets from a JSON file: either `{key: [classes]}` or, for ImageNet val, a 50,000-entry list.

        Args:
            path: the JSON file.
            name: the metric group these sets report under.
        """
        entries = json.loads(Path(path).read_text())
        if isinstance(entries, list):
            if len(entries) != IMAGENET_VAL_SIZE:
                raise ValueError(
                    f"{path}: a list of label sets must have one entry per ImageNet val image "
                    f"({IMAGENET_VAL_SIZE}), found {len(entries)}; use a {{key: [classes]}} object otherwise"
                )
            sets = {imagenet_val_key(i): labels for i, labels in enumerate(entries)}
            return cls(sets, name=name, source=str(path), key_check=_imagenet_val_index)
        if isinstance(entries, dict):
            return cls(entries, name=name, source=str(path))
        raise ValueError(f"{path}: expected a JSON list or object of label lists, found {type(entries).__name__}")
