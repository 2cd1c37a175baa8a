"""Command-line pieces shared by the analysis scripts: which model, which images, which device."""

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from pace.analysis.images import DEMO_IMAGES, demo_images, image_files, load_image, shard_images
from pace.analysis.inference import pace_blocks, select_blocks
from pace.distributed import DistEnv, select_device
from pace.eval.loading import WEIGHTS, load_model

log = logging.getLogger(__name__)


def analysis_parser(description: str, *, max_images: int | None, max_images_help: str) -> argparse.ArgumentParser:
    """A parser holding the model and image arguments every analysis script takes.

    Args:
        description: the script's one-line description.
        max_images: default of ``--max-images``.
        max_images_help: its help text.
    """
    parser = argparse.ArgumentParser(description=description)
    add_model_arguments(parser)
    add_image_arguments(parser, max_images=max_images, max_images_help=max_images_help)
    return parser


def add_blocks_argument(parser: argparse.ArgumentParser, flag: str, what: str) -> None:
    """``flag``: block indices, negative from the end (read back with `chosen_blocks`).

    Args:
        parser: the script's parser.
        flag: the option, e.g. ``--blocks``.
        what: the start of its help text.
    """
    help_text = f"{what} (negative from the end); default: first, middle and last"
    parser.add_argument(flag, type=int, nargs="+", default=None, help=help_text)


def default_blocks(depth: int) -> list[int]:
    """First, middle and last block."""
    return sorted({0, depth // 2, depth - 1})


def chosen_blocks(model: nn.Module, requested: list[int] | None) -> list[int]:
    """The blocks a `add_blocks_argument` option asked for, checked against the model, or its first, middle and
    last block when it was not given.

    Args:
        model: a PACE-ViT.
        requested: the option's value.
    """
    return select_blocks(model, requested if requested is not None else default_blocks(len(pace_blocks(model))))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``source``, ``--model``, ``--weights``, ``--device``, ``--seed``."""
    parser.add_argument(
        "source",
        help="training checkpoint (.pt), release folder or .safetensors in one, the authors' checkpoint (with "
        "--model), or a timm model name such as pace_vit_tiny_patch16_224 (random weights, for demonstrations)",
    )
    parser.add_argument("--model", default=None, help="timm architecture for a checkpoint that does not name it")
    parser.add_argument(
        "--weights", choices=WEIGHTS, default="auto", help="raw (auto: the default) or EMA weights of a checkpoint"
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (timm name) and synthetic images")


def add_image_arguments(parser: argparse.ArgumentParser, *, max_images: int | None, max_images_help: str) -> None:
    """``images`` (positional, after ``source``), ``--shards``, ``--split``, ``--max-images`` and ``--demo``."""
    parser.add_argument("images", nargs="*", type=Path, help="image files (JPEG, PNG, ...) and/or folders of images")
    parser.add_argument(
        "--shards",
        default=None,
        help="webdataset shards written by this project: a shard directory with _info.json, a brace pattern such "
        "as 'val-{000000..000003}.tar', or a list file",
    )
    parser.add_argument("--split", default="val", help="split of --shards (looked up in its _info.json)")
    parser.add_argument("--max-images", type=int, default=max_images, help=max_images_help)
    parser.add_argument(
        "--demo", action="store_true", help=f"add scikit-image's sample photographs ({', '.join(DEMO_IMAGES)})"
    )


def check_image_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a non-positive ``--max-images``."""
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be positive, got {args.max_images}")


def model_from_source(
    source: str | Path, *, model_name: str | None = None, weights: str = "auto"
) -> tuple[nn.Module, str]:
    """The model to analyse, in evaluation mode on the CPU, through `pace.eval.load_model`, and its description.

    Args:
        source: a checkpoint (ours, a release folder or a file in one, the authors' format with `model_name`), or a
            timm model name (random weights, for demonstrations).
        model_name: timm architecture for a checkpoint that does not name its own.
        weights: `auto` (the raw weights when present, else EMA), `ema` or `raw`.

    Returns:
        `(model, description)`; the description names the architecture, the file and the weights for plot titles.
        A model from one of our training checkpoints carries its run's evaluation settings in its pretrained_cfg
        (`pace.eval.set_eval_settings`), so `model_transform` gives the transform the run evaluated with.
    """
    if Path(source).exists():
        loaded = load_model(model_name, checkpoint=source, weights=weights)
        where = loaded.info.get("release") or (loaded.files[0].name if loaded.files else str(source))
    elif str(source) in timm.list_models():
        loaded = load_model(str(source))
        where = "timm"
        log.warning("%s: random weights; pass a checkpoint to analyse a trained model", source)
    else:
        raise ValueError(f"{str(source)!r} is neither an existing checkpoint/release path nor a timm model name")
    return loaded.model, f"{loaded.name} ({where}, {loaded.weights} weights)"


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The model the arguments name, in evaluation mode on the chosen device, and its description."""
    torch.manual_seed(args.seed)  # random weights of a model given by name are reproducible
    model, description = model_from_source(args.source, model_name=args.model, weights=args.weights)
    return model.to(select_device(DistEnv(), args.device)), description


@dataclass
class Inputs:
    """The images an analysis runs on, in order: files, then shard samples, then the demo photographs.

    Args:
        names: Unique names (file stems, shard keys, photograph names).
        images: Normalised (3, H, W) tensors.
        details: Per image, what the JSON records beside its name (key, label and class of a shard sample).
        record: The sources for the JSON: counts, and the shard keys read.
    """

    names: list[str] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, image: Tensor, details: dict[str, Any] | None = None) -> None:
        self.names.append(name)
        self.images.append(image)
        self.details.append(details or {})


def collect_images(args: argparse.Namespace, transform: Callable, *, limit: int | None = None) -> Inputs:
    """Images from ``images`` (in order), ``--shards`` (its first ``--max-images``), then ``--demo``, transformed.

    Args:
        args: The parsed arguments (see `add_image_arguments`).
        transform: PIL image → normalised (3, H, W) tensor.
        limit: Keep at most this many images in all.

    Returns:
        The images, possibly none.
    """
    inputs = Inputs()
    files = image_files(args.images, limit=limit) if args.images else []
    for path in files:
        inputs.add(path.stem, transform(load_image(path)))
    inputs.record["files"] = len(files)
    if args.shards is not None and _room(inputs, limit) != 0:
        caps = [n for n in (args.max_images, _room(inputs, limit)) if n is not None]
        if not caps:
            raise ValueError("--shards needs --max-images: how many of the split's images to read")
        read = shard_images(args.shards, transform=transform, max_images=min(caps), split=args.split)
        for image, key, label in zip(read.images, read.keys, read.labels):
            details = {"key": key, "label": label}
            if read.classes is not None and 0 <= label < len(read.classes):
                details["class"] = read.classes[label]
            inputs.add(key, image, details)
        inputs.record["shards"] = {
            "source": str(args.shards),
            "split": args.split,
            "num_images": len(read.keys),
            "keys": read.keys,
            "description": read.description,
        }
    if args.demo:
        photos = list(demo_images().items())[: _room(inputs, limit)]
        for name, image in photos:
            inputs.add(name, transform(image))
        inputs.record["demo"] = [name for name, _ in photos]
    # Files of the same name in different folders (class folders of a validation set) get distinct names.
    seen: dict[str, int] = {}
    for i, name in enumerate(inputs.names):
        seen[name] = seen.get(name, 0) + 1
        inputs.names[i] = name if seen[name] == 1 else f"{name}_{seen[name]}"
    return inputs


def _room(inputs: Inputs, limit: int | None) -> int | None:
    return None if limit is None else limit - len(inputs.names)


def run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a script's body; a bad input (missing file, unreadable checkpoint or image) ends it with the message and
    exit status 2 instead of a traceback."""
    try:
        return body(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
