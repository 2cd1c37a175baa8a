"""`pace-make-shards`: write webdataset shards from image folders, or the generated quickstart dataset.

    pace-make-shards OUT --split train=/data/imagenet/train --split val=/data/imagenet/val_flat \\
        --labels val=/data/imagenet/LOC_val_solution.csv --workers 16
    pace-make-shards OUT --split imagenet_r=/data/imagenet-r --split imagenet_c=/data/imagenet-c \\
        --layout imagenet_c=corruptions --classes imagenet
    pace-make-shards data/generated/shapes --synthetic
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pace.data.image_folders import shard_image_folders
from pace.data.quickstart import DEFAULT_DIR, make_quickstart_dataset
from pace.data.writer import BadImageError, EncodeOptions, ShardPlan

# Exit statuses: the command line or the paths it names are wrong (as argparse's own errors), or the data is.
USAGE_ERROR, DATA_ERROR = 2, 1
# User errors that end the command with one line instead of a traceback: wrong paths and values, a damaged image,
# a failing disk. Anything else is a bug and keeps its traceback.
_USAGE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)
_DATA_ERRORS = (BadImageError, OSError)


class _UsageError(ValueError):
    pass


def parse_pairs(values: list[str], flag: str, form: str = "NAME=PATH") -> dict[str, str]:
    """The `NAME=VALUE` arguments of a repeated command-line flag, as a dict (pace-make-shards, pace.eval.rescore).

    Args:
        values: the arguments as given.
        flag: the flag's name, for the error message.
        form: how the error message spells a valid argument.

    Returns:
        `{name: value}`; a later name replaces an earlier one.

    Raises:
        ValueError: an argument without `=`, or with an empty name or value.
    """
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects {form}, got {value!r}")
        pairs[name] = path
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pace-make-shards",
        description="Write webdataset tar shards (<prefix>-<split>-NNNNNN.tar) and _info.json from ImageFolder "
        "trees or flat labelled folders, or generate the quickstart dataset.",
    )
    parser.add_argument("out", nargs="?", default=None, help=f"output directory (--synthetic: default {DEFAULT_DIR})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--split",
        action="append",
        metavar="NAME=DIR",
        help="a split and its directory: an ImageFolder tree (DIR/<class>/<image>) or, with --labels, a flat folder",
    )
    source.add_argument("--synthetic", action="store_true", help="write the generated 10-class quickstart dataset")
    parser.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="labels of a flat split: LOC_val_solution.csv or '<file> <wnid|index>' lines",
    )
    parser.add_argument(
        "--layout",
        action="append",
        default=[],
        metavar="NAME=LAYOUT",
        help="folder layout of a split: folder (default) or corruptions (ImageNet-C: <corruption>/<severity>/<wnid>/)",
    )
    parser.add_argument(
        "--classes",
        help="class names in index order, one per line, or 'imagenet' for the 1000 ImageNet-1k wnids (ImageNet-A/R/"
        "Sketch/C folders keep ImageNet-1k labels); default: sorted wnids",
    )
    parser.add_argument("--prefix", help="shard name prefix (default: the output directory's name)")
    parser.add_argument("--key-style", choices=("auto", "stem", "path"), default="auto", help="sample keys")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--max-size-mb", type=float, default=None, help="shard size limit in MB (estimated)")
    parser.add_argument("--max-side", type=int, default=None, help="resize images whose longer side exceeds this")
    parser.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="resize images whose shorter side exceeds this (FFCV-style pre-resized shards; see docs/data.md)",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    parser.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG at --quality")
    parser.add_argument("--no-verify", action="store_true", help="do not fully decode each image while writing")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the train split in file order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train-order shuffle / generated images")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace the given splits in a non-empty directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: exits 2 on a usage error (arguments, missing or non-empty directories), 1 on bad
    data (an unreadable image) or a failing disk, each with one line on stderr; the output is left as it was."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        info = _run(args)
    except _DATA_ERRORS + _USAGE_ERRORS as exn:
        usage = isinstance(exn, _USAGE_ERRORS) and not isinstance(exn, BadImageError)
        print(f"pace-make-shards: error: {exn}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR if usage else DATA_ERROR) from None
    except KeyboardInterrupt:
        print("pace-make-shards: interrupted; the output directory is as it was", file=sys.stderr)
        raise SystemExit(130) from None
    for name, entry in info["splits"].items():
        print(f"{name}: {entry['num_samples']} samples in {len(entry['filenames'])} shards ({entry['pattern']})")


def _run(args: argparse.Namespace) -> dict:
    if args.synthetic:
        info = make_quickstart_dataset(args.out or DEFAULT_DIR, seed=args.seed, workers=args.workers)
    else:
        if args.out is None:
            raise _UsageError("the output directory is required")
        info = shard_image_folders(
            args.out,
            parse_pairs(args.split, "--split"),
            labels=parse_pairs(args.labels, "--labels"),
            layouts=parse_pairs(args.layout, "--layout"),
            classes_file=args.classes,
            key_style=args.key_style,
            plan=ShardPlan(
                prefix=args.prefix,
                max_count=args.max_count,
                max_size=int(args.max_size_mb * 1e6) if args.max_size_mb else None,
                shuffle_splits=() if args.no_shuffle else ("train",),
                seed=args.seed,
            ),
            options=EncodeOptions(
                max_side=args.max_side,
                max_short_side=args.max_size,
                quality=args.quality,
                reencode=args.reencode,
                verify=not args.no_verify,
            ),
            workers=args.workers,
            overwrite=args.overwrite,
        )
    return info


if __name__ == "__main__":
    main()
