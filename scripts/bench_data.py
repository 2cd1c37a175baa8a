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
    python scripts/bench_data.py --image-size 500x375 --decode cpu draft device   # the data.decode modes
    python scripts/bench_data.py --image-size 500x375 --photo-like --decode device  # photo-sized files (60-100 kB)

`--decode` chooses pace's paths (`data.decode`): `cpu` runs timm's transform per sample in the workers, `draft`
decodes at reduced JPEG scale in the workers and finishes each batch (normalise, erase) in the main process,
`device` only reads bytes in the workers and decodes and augments each batch in the main process on `--device`.
The ImageFolder baseline always runs timm's transform; CPU-seconds count the main process too, so work moved
there is not hidden. On CUDA (`--device cuda`) the rate is ready training batches on the GPU per second, and
`--step-model` also measures the share of a training step spent waiting for data: the same steps timed on one
fixed batch (compute only) and fed by the loader, `1 - compute / fed`.

The generated images are smooth (a 500x375 file is about 22 kB at q90, where photos run to 60-100 kB, and a
smooth JPEG decodes faster than a photo); `--photo-like` adds fine texture and grain to each re-encoded image
(seeded by its file name), which brings a 500x375 q90 file to photo size, so the decode weighs as it does on photos.

`--breakdown` times the steps of one sample in this process (CPU microseconds per sample, best of the repeats):
both loaders with a no-op transform (everything but the augmentation), reading the shards (webdataset's tar
iteration under `pace.data.shards.read_shard`), opening and reading the image files, decoding the JPEGs from
memory, and the transform itself.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import resource
import statistics
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pace.data import (
    QUICKSTART_CLASSES,
    ShardPlan,
    ShardReading,
    TrainSampling,
    create_device_train_transform,
    create_train_loader,
    create_train_transform,
    shard_image_folders,
)
from pace.data.quickstart import render_jpeg
from pace.data.shards import read_shard


def build_folder(
    root: Path,
    *,
    cifar: str | None,
    num_images: int,
    image_size: tuple[int, int] | None,
    processes: int = 1,
    photo_like: bool = False,
) -> Path:
    """An ImageFolder tree of num_images JPEGs: CIFAR-10 images, or generated ones; optionally resized (q90),
    with photo-like texture (`photo_texture`)."""
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
            target = folder / QUICKSTART_CLASSES[index % 10] / f"{index:06d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(render_jpeg(seed=0, split="train", index=index))
    if image_size:
        paths = [(str(path), image_size, photo_like) for path in folder.glob("*/*.jpg")]
        if processes > 1:
            with multiprocessing.get_context("fork").Pool(processes) as pool:
                pool.map(_resize_file, paths, chunksize=64)
        else:
            for item in paths:
                _resize_file(item)
    return folder


def _resize_file(item: tuple[str, tuple[int, int], bool]) -> None:
    path, image_size, photo_like = item
    with Image.open(path) as image:
        resized = image.convert("RGB").resize(image_size, Image.Resampling.BICUBIC)
    if photo_like:
        resized = photo_texture(resized, seed=zlib.crc32(Path(path).name.encode()))
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=90)
    Path(path).write_bytes(out.getvalue())


def photo_texture(image: Image.Image, *, seed: int, strength: float = 14.0) -> Image.Image:
    """The image with a fine random texture (a blurred noise field, the same in the three bands) and grain (per band)
    added: the high-frequency detail that makes photos three to four times the size of smooth images at the same
    JPEG quality, and slower to decode.

    Args:
        image: an RGB image.
        seed: the noise seed.
        strength: standard deviation of texture and grain together, in levels.

    Returns:
        The textured RGB image.
    """
    rng = np.random.default_rng(seed)
    height, width = image.height, image.width
    texture = Image.fromarray(rng.normal(128, 60, (height, width)).clip(0, 255).astype(np.uint8))
    texture = np.asarray(texture.filter(ImageFilter.GaussianBlur(1.0)), np.float32)[..., None] - 128
    grain = rng.normal(0, 1, (height, width, 3)).astype(np.float32)
    detail = texture / max(1e-6, float(texture.std())) * 0.8 + grain * 0.6
    pixels = np.asarray(image, np.float32) + strength * detail
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def time_pass(batches, total: int) -> tuple[float, float]:
    """One pass: (samples per wall-clock second, samples per CPU-second of this process and its workers).

    CPU time is what "per core" means and, unlike wall time, does not depend on what else the machine runs.
    DataLoader workers have exited when a pass ends, so their time is in RUSAGE_CHILDREN by then.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, wall = time.process_time(), time.perf_counter()
    seen = sum(len(targets) for _, targets in batches)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # device-path batches are ready when their kernels have run
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
            shards,
            batch_size=batch_size,
            transform=_no_op,
            num_workers=0,
            sampling=TrainSampling(samples_per_epoch=total),
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


def pace_transform(decode: str, input_size: int, device: str):
    """pace's train transform for a `data.decode` mode (the same augmentation as timm's in every mode)."""
    if decode == "cpu":
        return create_train_transform(input_size=input_size)
    return create_device_train_transform(input_size=input_size, device=device, draft=decode == "draft")


def data_wait(loader, model_name: str, *, steps: int, batch_size: int, input_size: int, compile_model: bool) -> dict:
    """Seconds per training step of `model_name` on one fixed batch (compute only) and fed by `loader`.

    bf16 autocast, AdamW, soft-target loss on the device; the loader's batches must already be on the device."""
    import timm

    import pace.models  # noqa: F401  (registers the PACE models with timm)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = timm.create_model(model_name, num_classes=1000, img_size=input_size).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model

    def step(images, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(images), targets.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fixed = torch.randn(batch_size, 3, input_size, input_size, device=device)
    labels = torch.randint(1000, (batch_size,), device=device)
    for _ in range(5):  # warm-up (and compilation)
        step(fixed, labels)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(fixed, labels)
    _sync(device)
    compute = (time.perf_counter() - start) / steps
    batches = iter(loader)
    for _ in range(3):  # the workers' first batches
        step(*next(batches))
    _sync(device)
    start, done = time.perf_counter(), 0
    for images, targets in batches:
        step(images, targets)
        done += 1
        if done == steps:
            break
    _sync(device)
    fed = (time.perf_counter() - start) / max(done, 1)
    return {"model": model_name, "compute_s": compute, "fed_s": fed, "wait_share": max(0.0, 1 - compute / fed)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", help="CIFAR-10 JPEG tarball to take images from (default: generated images)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--image-size", help="re-encode the images at WxH (e.g. 500x375) before the benchmark")
    parser.add_argument("--photo-like", action="store_true", help="add photo-like texture to re-encoded images")
    parser.add_argument("--input-size", type=int, default=224, help="transform output side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per pipeline; the median counts")
    parser.add_argument("--decode", nargs="+", default=["cpu"], choices=("cpu", "draft", "device"), help="pace paths")
    parser.add_argument("--device", default="cpu", help="where the draft/device paths finish batches (cpu, cuda)")
    parser.add_argument("--no-baseline", action="store_true", help="skip ImageFolder (GPU runs: pace rates only)")
    parser.add_argument("--step-model", nargs="*", default=[], help="timm models whose data-wait share to measure")
    parser.add_argument("--steps", type=int, default=30, help="training steps per data-wait measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile the --step-model models")
    parser.add_argument("--gen-processes", type=int, default=1, help="processes that re-encode the images")
    parser.add_argument("--json", help="also write the result rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--breakdown", action="store_true", help="also time each step of one sample (no workers)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.input_size, args.batch_size, args.workers, args.repeats = 64, 32, 16, [0], 1
    image_size = tuple(int(v) for v in args.image_size.split("x")) if args.image_size else None
    torch.set_num_threads(1)  # one core per process for both pipelines

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(
            Path(tmp),
            cifar=args.cifar,
            num_images=args.num_images,
            image_size=image_size,
            processes=args.gen_processes,
            photo_like=args.photo_like,
        )
        shards = Path(tmp) / "shards"
        shard_count = max(16, max(args.workers) * 4)
        shard_image_folders(
            shards,
            {"train": folder},
            plan=ShardPlan(max_count=max(1, args.num_images // shard_count)),
            workers=max(2, args.gen_processes),
        )
        transform = create_train_transform(input_size=args.input_size)
        baseline = ImageFolder(str(folder), transform=transform)
        total = len(baseline) // args.batch_size * args.batch_size
        sizes = [path.stat().st_size for path in folder.glob("*/*.jpg")]
        print(
            f"{len(baseline)} images from {folder} (mean {statistics.mean(sizes) / 1e3:.1f} kB), "
            f"input {args.input_size}px, batch {args.batch_size}"
        )

        def pace_loader(decode: str, workers: int, samples: int):
            return create_train_loader(
                shards,
                batch_size=args.batch_size,
                transform=pace_transform(decode, args.input_size, args.device),
                num_workers=workers,
                # One pass over the same number of samples as the baseline.
                sampling=TrainSampling(samples_per_epoch=samples),
                reading=ShardReading(pin_memory=args.device != "cpu", prefetch_factor=4 if workers else None),
            )

        for decode in args.decode:
            for workers in args.workers:
                ours, theirs = [], []
                for _ in range(args.repeats):
                    ours.append(time_pass(pace_loader(decode, workers, total), total))
                    if not args.no_baseline:
                        folder_loader = DataLoader(
                            baseline, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True
                        )
                        theirs.append(time_pass(folder_loader, total))
                results.append(_row(decode, workers, ours, theirs))
        for name in args.step_model:
            for decode in args.decode:
                loader = pace_loader(decode, max(args.workers), args.batch_size * (args.steps + 3) * 4)
                row = data_wait(
                    loader,
                    name,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    input_size=args.input_size,
                    compile_model=args.compile,
                )
                row.update(decode=decode, workers=max(args.workers))
                results.append(row)
                print(
                    f"data wait, {name}, decode={decode}, workers={row['workers']}: step "
                    f"{row['compute_s'] * 1e3:.1f} ms on a fixed batch, {row['fed_s'] * 1e3:.1f} ms fed by the loader, "
                    f"wait share "
                    f"{100 * row['wait_share']:.1f}%"
                )
        if args.breakdown:
            steps = breakdown(folder, shards, transform, batch_size=args.batch_size, repeats=max(3, args.repeats))
            print("CPU microseconds per sample (best of the repeats):")
            for name, micros in steps.items():
                print(f"  {name}: {micros:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    return results


def _row(decode: str, workers: int, ours: list, theirs: list) -> dict:
    per = max(1, workers)
    row = {
        "decode": decode,
        "workers": workers,
        "ours": statistics.median(r[0] for r in ours) / per,
        "ours_cpu": statistics.median(r[1] for r in ours),
        "ours_total": statistics.median(r[0] for r in ours),
    }
    line = f"decode={decode} workers={workers}: pace webdataset {row['ours']:.1f} samples/s/worker"
    line += f" ({row['ours_total']:.0f} samples/s in all)"
    if theirs:
        row["imagefolder"] = statistics.median(r[0] for r in theirs) / per
        row["imagefolder_cpu"] = statistics.median(r[1] for r in theirs)
        row["ratio"] = row["ours"] / row["imagefolder"]
        row["cpu_ratio"] = row["ours_cpu"] / row["imagefolder_cpu"]
        line += (
            f", ImageFolder {row['imagefolder']:.1f} samples/s/worker, ratio {row['ratio']:.2f} | per CPU-second: "
            f"pace {row['ours_cpu']:.1f}, ImageFolder {row['imagefolder_cpu']:.1f}, ratio {row['cpu_ratio']:.2f}"
        )
    else:
        line += f" | per CPU-second: pace {row['ours_cpu']:.1f}"
    print(line)
    return row


if __name__ == "__main__":
    main()
