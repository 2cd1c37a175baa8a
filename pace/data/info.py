"""The dataset info file written next to the shards, and resolving a data source into a list of shard URLs.

The info file (`_info.json`) follows timm's webdataset reader layout (`splits.<name>.num_samples / filenames /
shard_lengths`), so timm's own `ReaderWds` reads our shards too, and adds the class list and image size stats.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.shardlists import expand_urls

from pace.data.imagenet import IMAGENET1K_WDS, IMAGENET1K_WDS_SHARD, imagenet_classes

INFO_NAME = "_info.json"
INFO_FORMAT = "pace-shards"
LIST_SUFFIXES = (".txt", ".list")


@dataclass(frozen=True)
class ShardSet:
    """Where a split's shards are and what is known about them.

    Args:
        urls: shard paths or URLs (local paths, `file:`, `http(s):`, `pipe:` ...), in their stored order.
        num_samples: samples in all shards together, or None where unknown.
        shard_lengths: samples per shard (same order as `urls`), or None where unknown.
        classes: class names in class-index order, or None where unknown.
        info_path: the info file the counts came from, if any.
    """

    urls: tuple[str, ...]
    num_samples: int | None = None
    shard_lengths: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None
    info_path: str | None = None


def read_info(location: str | Path) -> dict | None:
    """Read the info file of a shard directory (local path or http(s) URL); None when there is none."""
    location = str(location)
    path = _join(location, INFO_NAME)
    if _is_http(path):
        try:
            with urllib.request.urlopen(path, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as exn:
            if exn.code == 404:
                return None
            raise OSError(f"cannot read dataset info {path}: HTTP {exn.code} {exn.reason}") from exn
        except urllib.error.URLError as exn:
            raise OSError(f"cannot reach dataset info {path}: {exn.reason}") from exn
    if _scheme(path) not in ("", "file") or not os.path.isfile(_local(path)):
        return None
    with open(_local(path)) as f:
        info = json.load(f)
    if "splits" not in info:
        raise ValueError(f"{path} is not a dataset info file (no 'splits')")
    return info


def write_info(directory: str | Path, info: dict) -> Path:
    """Write the info file atomically (a reader never sees half a file)."""
    path = Path(directory) / INFO_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def resolve_shards(
    source: str | Sequence[str], *, split: str | None = None, num_samples: int | None = None
) -> ShardSet:
    """Turn a data source into its shard list and whatever counts are known.

    Args:
        source: one of
            * a shard directory (local or http(s), ending in `/` for URLs) holding our `_info.json`
              (the split is looked up in it) or timm/imagenet-1k-wds shards (`imagenet1k-<split>-NNNN.tar`);
            * brace patterns such as `/data/train-{000000..000127}.tar` (several joined by `::`), local
              paths, `file:`, `http(s):` or `pipe:` URLs;
            * a list file (`.txt` / `.list`) with one shard path or URL per line (relative paths are taken
              relative to the list file);
            * a sequence of any of the above.
        split: split name (`train`, `val`, ...); needed for a directory source, used to match counts otherwise.
        num_samples: the split's sample count, overriding any count found in an info file.

    Returns:
        The ShardSet. Counts come from `num_samples`, else our info file next to the shards, else the
        published timm/imagenet-1k-wds counts when the full published shard set is given.
    """
    if isinstance(source, (str, os.PathLike)) and _is_directory(str(source)):
        shards = _resolve_directory(str(source), split)
    else:
        urls = _expand(source)
        shards = _match_info(urls, split) or _match_imagenet1k_wds(urls) or ShardSet(urls=tuple(urls))
    if num_samples is not None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        lengths = shards.shard_lengths if shards.num_samples == num_samples else None
        shards = ShardSet(shards.urls, num_samples, lengths, shards.classes, shards.info_path)
    return shards


def check_local_shards(urls: Sequence[str]) -> None:
    """Fail early, naming them, when local shard files are missing (remote ones are checked when opened)."""
    missing = [url for url in urls if _scheme(url) in ("", "file") and not os.path.isfile(_local(url))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards not found: {shown}")


def _resolve_directory(directory: str, split: str | None) -> ShardSet:
    info = read_info(directory)
    if info is not None:
        if split is None or split not in info["splits"]:
            raise ValueError(f"split {split!r} not in {_join(directory, INFO_NAME)} (splits: {sorted(info['splits'])})")
        entry = info["splits"][split]
        return ShardSet(
            urls=tuple(_join(directory, name) for name in entry["filenames"]),
            num_samples=int(entry["num_samples"]),
            shard_lengths=tuple(int(n) for n in entry["shard_lengths"]),
            classes=tuple(info["classes"]) if info.get("classes") else None,
            info_path=_join(directory, INFO_NAME),
        )
    if _is_http(directory):
        raise FileNotFoundError(f"no {INFO_NAME} at {directory}: pass a brace pattern of its shards instead")
    if split is None:
        raise ValueError(f"{directory} has no {INFO_NAME}; pass split= to pick its shards by name")
    names = [split] + (["validation"] if split == "val" else [])
    for name in names:
        found = sorted(glob(os.path.join(_local(directory), f"*-{name}-*.tar")))
        if found:
            return _match_imagenet1k_wds(found) or ShardSet(urls=tuple(found))
    raise FileNotFoundError(f"no {INFO_NAME} and no shards named *-{split}-*.tar in {directory}")


def _match_info(urls: list[str], split: str | None) -> ShardSet | None:
    """Counts for an explicit shard list from the info file in the shards' directory, if every shard is listed."""
    directories = {_dirname(url) for url in urls}
    if len(directories) != 1 or any(_scheme(url) not in ("", "file", "http", "https") for url in urls):
        return None
    directory = directories.pop()
    try:
        info = read_info(directory)
    except OSError:
        return None  # an unreachable host fails again, naming the shard, when the shard is opened
    if info is None:
        return None
    splits = [info["splits"][split]] if split in info["splits"] else list(info["splits"].values())
    for entry in splits:
        lengths = dict(zip(entry["filenames"], entry["shard_lengths"]))
        names = [_basename(url) for url in urls]
        if all(name in lengths for name in names):
            shard_lengths = tuple(int(lengths[name]) for name in names)
            return ShardSet(
                urls=tuple(urls),
                num_samples=sum(shard_lengths),
                shard_lengths=shard_lengths,
                classes=tuple(info["classes"]) if info.get("classes") else None,
                info_path=_join(directory, INFO_NAME),
            )
    return None


def _match_imagenet1k_wds(urls: Sequence[str]) -> ShardSet | None:
    """The published counts of timm/imagenet-1k-wds, when the whole published split is given."""
    matches = [IMAGENET1K_WDS_SHARD.match(_basename(url)) for url in urls]
    if not all(matches):
        return None
    split_names = {m.group(1) for m in matches}
    if len(split_names) != 1:
        return None
    published = IMAGENET1K_WDS[split_names.pop()]
    complete = len({m.group(2) for m in matches}) == published["num_shards"] == len(urls)
    return ShardSet(
        urls=tuple(urls),
        num_samples=published["num_samples"] if complete else None,
        classes=tuple(imagenet_classes()),
    )


def _expand(source: str | os.PathLike | Sequence[str]) -> list[str]:
    items = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
    urls: list[str] = []
    for item in items:
        if item.endswith(LIST_SUFFIXES) and _scheme(item) in ("", "file"):
            urls.extend(_read_list_file(_local(item)))
        else:
            urls.extend(expand_urls(item))
    if not urls:
        raise ValueError(f"no shards in source {source!r}")
    return urls


def _read_list_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard list file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    urls = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if _scheme(line) == "" and not os.path.isabs(line):
                line = os.path.join(base, line)
            urls.extend(expand_urls(line))
    if not urls:
        raise ValueError(f"shard list file {path} lists no shards")
    return urls


def _scheme(url: str) -> str:
    scheme = urlparse(url).scheme
    return "" if len(scheme) == 1 else scheme  # a Windows drive letter is not a scheme


def _is_http(url: str) -> bool:
    return _scheme(url) in ("http", "https")


def _local(url: str) -> str:
    return url2pathname(urlparse(url).path) if _scheme(url) == "file" else url


def _is_directory(source: str) -> bool:
    if _is_http(source):
        return source.endswith("/")
    return _scheme(source) in ("", "file") and os.path.isdir(_local(source))


def _join(directory: str, name: str) -> str:
    if _is_http(directory):
        return directory.rstrip("/") + "/" + name
    return os.path.join(directory, name)


def _dirname(url: str) -> str:
    return posixpath.dirname(url) if _is_http(url) else os.path.dirname(_local(url)) or "."


def _basename(url: str) -> str:
    return posixpath.basename(urlparse(url).path) if _is_http(url) else os.path.basename(url)
