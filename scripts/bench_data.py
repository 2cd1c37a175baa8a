"""Train-pipeline throughput: pace's webdataset loader vs torchvision ImageFolder + DataLoader.

Both decode the same JPEG files and run the same timm train transform (RandomResizedCrop, flip, RandAugment,
normalise, random erasing; bicubic) in the same process, alternating runs so machine noise hits both alike.
Rates are samples per wall-clock second and worker process (the main process counts as one when num_workers is
0), and samples per CPU-second of the main process and its workers together (the per-core cost, which does not
depend on what else the machine runs).

    python scripts/bench_data.py --cifar ../shared/data/cifar10/cifar10_jpg.tar.gz --num-images 5000
    python scripts/bench_data.py --cifar ... --image-size 500x375   # ImageNet-sized decodes
    python scripts/bench_data.py --quick                             # smoke test on generated images
    python scripts/bench_data.py --cifar ... --breakdown             # also: where each pipeline's time goes

`--breakdown` times the steps of one sample in this process (CPU microseconds per sample, best of the repeats):
both loaders with a no-op transform (everything but the augmentation), reading the shards (webdataset's tar
iteration under `pace.data.shards.read_shard`), opening and reading the image files, decoding the JPEGs from
memory, and the transform itself.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pace.data import SYNTHETIC_CLASSES, create_train_loader, create_train_transform, shard_image_folders
from pace.data.shards import read_shard
from pace.data.synthetic import render_jpeg


def build_folder(root: Path, *, cifar: str | None, num_images: int, image_size: tuple[int, int] | None) -> Path:
    """An ImageFolder tree of num_images JPEGs: CIFAR-10 images, or generated ones; optionally resized."""
    folder = root / "images"
    if cifar:
        per_class = num_images // 10
        with tarfile.open(cifar) as tar:
            members = [m for m in tar if m.isfile() and "/train/" in m.name and int(Path(m.name).stem) < per_class]
            for member in members:
                target = folder / Path(member.name).parent.name / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    else:
        for index in range(num_images):
            target = folder / SYNTHETIC_CLASSES[index % 10] / f"{index:06d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(render_jpeg(seed=0, split="train", index=index))
    if image_size:
        for path in folder.glob("*/*.jpg"):
            with Image.open(path) as image:
                resized = image.convert("RGB").resize(image_size, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            resized.save(out, format="JPEG", quality=90)
            path.write_bytes(out.getvalue())
    return folder


def time_pass(batches, total: int) -> tuple[float, float]:
    """One pass: (samples per wall-clock second, samples per CPU-second of this process and its workers).

    CPU time is what "per core" means and, unlike wall time, does not depend on what else the machine runs.
    DataLoader workers have exited when a pass ends, so their time is in RUSAGE_CHILDREN by then.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, wall = time.process_time(), time.perf_counter()
    seen = sum(len(targets) for _, targets in batches)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu + (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    assert seen == total, (seen, total)
    return seen / wall, seen / cpu


def _no_op(image) -> torch.Tensor:
    return torch.zeros(1)


def breakdown(folder: Path, shards: Path, transform, *, batch_size: int, repeats: int) -> dict[str, float]:
    """CPU microseconds per sample of each step of the two pipelines, in this process (best of `repeats`)."""
    files = sorted(str(path) for path in folder.glob("*/*.jpg"))
    blobs = [Path(path).read_bytes() for path in files]
    images = [Image.open(io.BytesIO(blob)).convert("RGB") for blob in blobs[:256]]
    urls = sorted(str(path) for path in shards.glob("*.tar"))
    baseline = ImageFolder(str(folder), transform=_no_op)
    total = len(files) // batch_size * batch_size

    def pace_loader():
        loader = create_train_loader(
            shards, batch_size=batch_size, transform=_no_op, num_workers=0, samples_per_epoch=total
        )
        return sum(len(targets) for _, targets in loader)

    def imagefolder_loader():
        loader = DataLoader(baseline, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
        return sum(len(targets) for _, targets in loader)

    def read_shards():
        return sum(1 for url in urls for _ in read_shard(url, bad=[]))

    def read_files():
        for path in files:
            with open(path, "rb") as stream:
                stream.read()
        return len(files)

    def decode():
        for blob in blobs:
            Image.open(io.BytesIO(blob)).load()
        return len(blobs)

    def augment():
        for image in images:
            transform(image)
        return len(images)

    steps = {
        "pace loader, no-op transform": pace_loader,
        "ImageFolder loader, no-op transform": imagefolder_loader,
        "read shards (webdataset tar iteration)": read_shards,
        "open + read image files": read_files,
        "decode JPEG from memory": decode,
        "transform": augment,
    }
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():  # alternating, so machine noise hits all steps alike
            cpu = time.process_time()
            count = step()
            best[name] = min(best[name], (time.process_time() - cpu) / count * 1e6)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", help="CIFAR-10 JPEG tarball to take images from (default: generated images)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--image-size", help="re-encode the images at WxH (e.g. 500x375) before the benchmark")
    parser.add_argument("--input-size", type=int, default=224, help="transform output side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per pipeline; the median counts")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--breakdown", action="store_true", help="also time each step of one sample (no workers)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.input_size, args.batch_size, args.workers, args.repeats = 64, 32, 16, [0], 1
    image_size = tuple(int(v) for v in args.image_size.split("x")) if args.image_size else None
    torch.set_num_threads(1)  # one core per process for both pipelines

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), cifar=args.cifar, num_images=args.num_images, image_size=image_size)
        shards = Path(tmp) / "shards"
        shard_image_folders(shards, {"train": folder}, max_count=max(1, args.num_images // 16), workers=2)
        transform = create_train_transform(input_size=args.input_size)
        baseline = ImageFolder(str(folder), transform=transform)
        total = len(baseline) // args.batch_size * args.batch_size
        print(f"{len(baseline)} images from {folder}, input {args.input_size}px, batch {args.batch_size}")
        for workers in args.workers:
            ours, theirs = [], []
            for _ in range(args.repeats):
                loader = create_train_loader(
                    shards,
                    batch_size=args.batch_size,
                    transform=transform,
                    num_workers=workers,
                    samples_per_epoch=total,  # one pass over the same number of samples as the baseline
                )
                ours.append(time_pass(loader, total))
                folder_loader = DataLoader(
                    baseline, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True
                )
                theirs.append(time_pass(folder_loader, total))
            per = max(1, workers)
            row = {
                "workers": workers,
                "ours": statistics.median(r[0] for r in ours) / per,
                "imagefolder": statistics.median(r[0] for r in theirs) / per,
                "ours_cpu": statistics.median(r[1] for r in ours),
                "imagefolder_cpu": statistics.median(r[1] for r in theirs),
            }
            row["ratio"] = row["ours"] / row["imagefolder"]
            row["cpu_ratio"] = row["ours_cpu"] / row["imagefolder_cpu"]
            results.append(row)
            print(
                f"workers={workers}: pace webdataset {row['ours']:.1f} samples/s/worker, "
                f"ImageFolder {row['imagefolder']:.1f} samples/s/worker, ratio {row['ratio']:.2f} | per CPU-second: "
                f"pace {row['ours_cpu']:.1f}, ImageFolder {row['imagefolder_cpu']:.1f}, ratio {row['cpu_ratio']:.2f}"
            )
        if args.breakdown:
            steps = breakdown(folder, shards, transform, batch_size=args.batch_size, repeats=max(3, args.repeats))
            print("CPU microseconds per sample (best of the repeats):")
            for name, micros in steps.items():
                print(f"  {name}: {micros:.1f}")
    return results


if __name__ == "__main__":
    main()
