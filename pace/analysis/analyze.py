"""White-box report of a PACE-ViT checkpoint: α, β, τ per block; R(Z), R_c(Z | U) and ΔR of the tokens after
each block over a batch of images; the token covariance spectrum at chosen blocks. Writes ``analysis.json`` and
``coefficients.png``, ``rates.png``, ``spectra.png``.

    python scripts/analyze_checkpoint.py runs/quickstart/checkpoints/best.pt path/to/val_images --out outputs/analysis
    python scripts/analyze_checkpoint.py runs/quickstart/checkpoints/best.pt --shards data/generated/shapes --split val
    python scripts/analyze_checkpoint.py pace_vit_tiny_patch16_224 --demo    # random weights, offline photos

Images come from files and folders (any PIL-readable format), webdataset shards (``--shards``, the first
``--max-images`` of ``--split``), scikit-image's photographs (``--demo``) or random Gaussian images
(``--synthetic N``, for smoke tests).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pace.analysis import _cli
from pace.analysis.images import model_transform
from pace.analysis.inference import pace_blocks
from pace.analysis.rates import (
    DEFAULT_CODING_EPS,
    block_coefficients,
    block_outputs,
    covariance_spectrum,
    effective_rank,
    token_rates,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _cli.analysis_parser(
        __doc__.split("\n\n")[0], max_images=None, max_images_help="images read from --shards (default: --num-images)"
    )
    parser.add_argument("--synthetic", type=int, default=0, help="add this many random Gaussian images")
    parser.add_argument("--out", type=Path, default=Path("outputs/analysis"), help="output folder")
    parser.add_argument("--num-images", type=int, default=64, help="use at most this many images")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward")
    parser.add_argument("--eps", type=float, default=DEFAULT_CODING_EPS, help="coding precision ε of R and R_c")
    _cli.add_blocks_argument(parser, "--spectrum-blocks", "blocks whose spectra to plot")
    parser.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    args = parser.parse_args(argv)
    for key in ("num_images", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if not args.eps > 0:
        parser.error(f"--eps must be positive, got {args.eps}")
    _cli.check_image_arguments(parser, args)
    return args


def image_batches(args: argparse.Namespace, model: torch.nn.Module):
    """Normalised image batches (B, 3, H, W) from the arguments' sources, the data config, a description of the
    sources and the record of the images read (`pace.analysis._cli.Inputs.record`)."""
    transform, config = model_transform(model, img_size=args.img_size)
    inputs = _cli.collect_images(args, transform, limit=args.num_images)
    tensors = list(inputs.images)
    sources = []
    if inputs.record["files"]:
        sources.append(f"{inputs.record['files']} images ({', '.join(str(p) for p in args.images)})")
    if "shards" in inputs.record:
        sources.append(inputs.record["shards"]["description"])
    if inputs.record.get("demo"):
        sources.append(f"{len(inputs.record['demo'])} demo images ({', '.join(inputs.record['demo'])})")
    remaining = args.num_images - len(tensors)
    if args.synthetic and remaining > 0:
        gen = torch.Generator().manual_seed(args.seed)
        n = min(args.synthetic, remaining)
        tensors += list(torch.randn(n, *config["input_size"], generator=gen))
        sources.append(f"{n} synthetic Gaussian images (seed {args.seed})")
        inputs.record["synthetic"] = n
    if not tensors:
        raise ValueError(
            "no images: name image files or folders after the model source, --shards, --demo or --synthetic N"
        )
    batch = torch.stack(tensors)  # (B, 3, H, W)
    return batch.split(args.batch_size), config, "; ".join(sources), inputs.record


def measure(model: torch.nn.Module, batches, *, eps: float, spectrum_blocks: list[int]) -> dict:
    """Per-image rates of every block and mean spectra of the chosen blocks over all batches."""
    per_image = {}
    spectra = dict.fromkeys(spectrum_blocks, 0.0)
    count = 0
    for batch in batches:
        tokens = block_outputs(model, batch)
        for block, rates in token_rates(model, tokens, eps=eps).items():
            for key, values in rates.items():
                per_image.setdefault(block, {}).setdefault(key, []).extend(values.tolist())
        for b in spectrum_blocks:
            spectra[b] = spectra[b] + covariance_spectrum(tokens[b]).cpu() * batch.shape[0]
        count += batch.shape[0]
    blocks = sorted(per_image)
    rates = {"block": blocks}
    for key in ("R", "Rc", "dR"):
        values = torch.tensor([per_image[b][key] for b in blocks], dtype=torch.float64)  # (blocks, images)
        rates[key] = values.mean(1).tolist()
        rates[f"{key}_std"] = values.std(1, correction=0).tolist()
        rates[f"{key}_per_image"] = values.T.tolist()
    mean_spectra = {b: (s / count) for b, s in spectra.items()}
    return {
        "rates": rates,
        "spectra": {
            b: {"eigenvalues": s.tolist(), "effective_rank": effective_rank(s)} for b, s in mean_spectra.items()
        },
        "num_images": count,
    }


def main(argv: list[str] | None = None) -> int:
    return _cli.run(_main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    from pace.analysis.plots import plot_coefficients, plot_rates, plot_spectra

    start = time.perf_counter()
    model, description = _cli.model_from_args(args)
    depth = len(pace_blocks(model))
    spectrum_blocks = _cli.chosen_blocks(model, args.spectrum_blocks)
    batches, config, sources, record = image_batches(args, model)
    report = {
        "model": description,
        "source": str(args.source),
        "images": sources,
        "inputs": record,
        "input_size": config["input_size"],
        "eps": args.eps,
        "compress_form": getattr(model, "compress_form", None),
        "coefficients": block_coefficients(model),
        **measure(model, batches, eps=args.eps, spectrum_blocks=spectrum_blocks),
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        plot_coefficients(report["coefficients"], out / "coefficients.png"),
        plot_rates(report["rates"], out / "rates.png", eps=args.eps),
        plot_spectra({b: s["eigenvalues"] for b, s in report["spectra"].items()}, out / "spectra.png"),
    ]
    report["figures"] = [p.name for p in figures]
    (out / "analysis.json").write_text(json.dumps(report, indent=1))
    rates = report["rates"]
    print(f"{description}: {report['num_images']} images, {depth} blocks, ε = {args.eps:g}")
    print("block   alpha    beta     tau        R       Rc       dR")
    for j, b in enumerate(rates["block"]):
        c = report["coefficients"][b]
        print(
            f"{b:5d} {c['alpha']:7.3f} {c['beta']:7.3f} {c['tau']:7.3f} "
            f"{rates['R'][j]:8.2f} {rates['Rc'][j]:8.2f} {rates['dR'][j]:8.2f}"
        )
    for b, s in report["spectra"].items():
        print(f"block {b}: effective rank of the token covariance {s['effective_rank']:.1f} of {len(s['eigenvalues'])}")
    print(f"wrote {out / 'analysis.json'} and {len(figures)} figures in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
