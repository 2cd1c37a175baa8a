"""Command-line pieces shared by the analysis scripts: which model, which images, which device."""

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from PIL import Image
from torch import nn

from pace.analysis.images import DEMO_IMAGES, demo_images, image_files, load_image
from pace.distributed import DistEnv, select_device
from pace.eval.loading import WEIGHTS, load_model

log = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``source``, ``--model``, ``--weights``, ``--device``, ``--seed``."""
    parser.add_argument(
        "source",
        help="training checkpoint (.pt), release folder or .safetensors in one, the authors' checkpoint (with "
        "--model), or a timm model name such as pace_vit_tiny_patch16_224 (random weights, for demonstrations)",
    )
    parser.add_argument("--model", default=None, help="timm architecture for a checkpoint that does not name it")
    parser.add_argument("--weights", choices=WEIGHTS, default="auto", help="EMA or raw weights of a checkpoint")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (timm name) and synthetic images")


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """``images`` (positional, after ``source``) and ``--demo``."""
    parser.add_argument("images", nargs="*", type=Path, help="image files (JPEG, PNG, ...) and/or folders of images")
    parser.add_argument(
        "--demo", action="store_true", help=f"add scikit-image's sample photographs ({', '.join(DEMO_IMAGES)})"
    )


def model_from_source(
    source: str | Path, *, model_name: str | None = None, weights: str = "auto"
) -> tuple[nn.Module, str]:
    """The model to analyse, in evaluation mode on the CPU, through `pace.eval.load_model`, and its description.

    Args:
        source: a checkpoint (ours, a release folder or a file in one, the authors' format with `model_name`), or a
            timm model name (random weights, for demonstrations).
        model_name: timm architecture for a checkpoint that does not name its own.
        weights: `auto` (EMA weights when present), `ema` or `raw`.

    Returns:
        `(model, description)`; the description names the architecture, the file and the weights for plot titles.
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


def build_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The model the arguments name, in evaluation mode on the chosen device, and its description."""
    torch.manual_seed(args.seed)  # random weights of a model given by name are reproducible
    model, description = model_from_source(args.source, model_name=args.model, weights=args.weights)
    return model.to(select_device(DistEnv(), args.device)), description


def collect_images(args: argparse.Namespace, *, limit: int | None = None) -> list[tuple[str, Image.Image]]:
    """``(name, image)`` pairs from ``images`` (in order) then ``--demo``; at least one is required."""
    named = [(p.stem, load_image(p)) for p in image_files(args.images, limit=limit)] if args.images else []
    if args.demo:
        named.extend(demo_images().items())
    if not named:
        raise ValueError("no images: name image files or folders after the model source, and/or pass --demo")
    named = named[:limit] if limit is not None else named
    # Files of the same name in different folders (class folders of a validation set) get distinct names.
    seen: dict[str, int] = {}
    unique = []
    for name, image in named:
        seen[name] = seen.get(name, 0) + 1
        unique.append((name if seen[name] == 1 else f"{name}_{seen[name]}", image))
    return unique


def run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a script's body; a bad input (missing file, unreadable checkpoint or image) ends it with the message and
    exit status 2 instead of a traceback."""
    try:
        return body(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
