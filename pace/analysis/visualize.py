"""Membership maps of a PACE-ViT on images: one PNG grid per image (the image, then per chosen block the argmax-head
segmentation and every head's π map), and ``memberships.json`` with each head's share of the pixels.

    python scripts/visualize_memberships.py runs/quickstart/checkpoints/best.pt photo.jpg --out outputs/memberships
    python scripts/visualize_memberships.py runs/quickstart/checkpoints/best.pt --shards data/generated/shapes
    python scripts/visualize_memberships.py pace_vit_tiny_patch16_224 --demo    # random weights, offline photos
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from pace.analysis import _cli
from pace.analysis.images import model_transform, to_display
from pace.analysis.memberships import INTERPOLATIONS, membership_maps, segmentation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _cli.analysis_parser(
        __doc__.split("\n\n")[0], max_images=4, max_images_help="images read from --shards (one figure each)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/memberships"), help="output folder")
    _cli.add_blocks_argument(parser, "--blocks", "block indices")
    parser.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS, default="bilinear", help="upsampling of π maps")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    _cli.check_image_arguments(parser, args)
    return args


def safe_stem(name: str) -> str:
    """A file-name-safe version of an image name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "image"


def head_shares(seg: torch.Tensor, num_heads: int) -> list[float]:
    """Fraction of pixels whose argmax head is k, for each k."""
    return (torch.bincount(seg.flatten(), minlength=num_heads).double() / seg.numel()).tolist()


def main(argv: list[str] | None = None) -> int:
    return _cli.run(_main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    from pace.analysis.plots import plot_membership_grid

    start = time.perf_counter()
    model, description = _cli.model_from_args(args)
    blocks = _cli.chosen_blocks(model, args.blocks)
    # The whole shorter side is kept (no centre crop), so the grid shows as much of the photograph as possible.
    transform, config = model_transform(model, img_size=args.img_size, crop_pct=1.0)
    inputs = _cli.collect_images(args, transform)
    if not inputs.names:
        raise ValueError("no images: name image files or folders after the model source, --shards and/or --demo")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": description,
        "source": str(args.source),
        "blocks": blocks,
        "input_size": config["input_size"],
        "num_images": len(inputs.names),
        "inputs": inputs.record,
        "images": {},
    }
    for name, image, details in zip(inputs.names, inputs.images, inputs.details):
        x = image.unsqueeze(0)  # (1, 3, H, W)
        maps = membership_maps(model, x, blocks=blocks, interpolation=args.interpolation)
        shown = to_display(x, mean=config["mean"], std=config["std"])[0]
        path = args.out / f"{safe_stem(name)}_memberships.png"
        caption = f"{name} ({details['class']})" if "class" in details else name
        plot_membership_grid(
            shown, {b: m[0] for b, m in maps.items()}, path, title=f"{description}: {caption}", dpi=args.dpi
        )
        summary["images"][name] = {
            **details,
            "figure": path.name,
            "head_share": {b: head_shares(segmentation(m[0]), m.shape[1]) for b, m in maps.items()},
        }
        print(f"wrote {path}")
    (args.out / "memberships.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(inputs.names)} images, blocks {blocks}, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
