"""CPU cost of one training sample by stage, for each `data.decode` path, one thread, in this process.

Each stage runs over the same images (generated 500x375 q90 JPEGs, as `bench_data.py --image-size 500x375`
makes them) with its output dropped at once (the steady state of a loader, where memory is reused), and the best
of `--repeats` passes counts. RandAugment ops are timed applied (probability 1) at timm's magnitude and weighted by
how often timm's `rand-m9-mstd0.5-inc1` applies each (2 layers, 15 ops, probability 0.5: 1/15 per op and sample).
Batch stages (collation, normalise, erase) are timed on whole batches and divided by the batch size.

    OMP_NUM_THREADS=1 python scripts/profile_data_stages.py --num-images 64 --batch-size 64
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from pace.data import create_device_train_transform, create_train_transform, shard_image_folders
from pace.data.augment_ops import apply_recorded
from pace.data.device_augment import EncodedImage, apply_ops, resize_crops
from pace.data.jpeg_check import jpeg_size
from pace.data.quickstart import render_jpeg
from pace.data.shards import read_shard
from pace.data.writer import ShardPlan

# Seeds cycle over the images: every step draws the same choices for the same image (so timm's RandAugment and the
# recorded one apply the same ops), and each image its own, as the pipeline's per-sample seeds.
PERIOD = 64


def make_images(count: int, size: tuple[int, int]) -> list[bytes]:
    """`count` generated JPEGs re-encoded at `size` (q90), as bench_data.py's `--image-size` makes them."""
    blobs = []
    for index in range(count):
        image = Image.open(io.BytesIO(render_jpeg(seed=0, split="train", index=index))).convert("RGB")
        out = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
        blobs.append(out.getvalue())
    return blobs


def best_per_item(function: Callable[[], int], repeats: int) -> float:
    """CPU microseconds per item of `function` (which returns its item count), best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        cpu = time.process_time()
        items = function()
        best = min(best, (time.process_time() - cpu) / items * 1e6)
    return best


def each(function: Callable, items: list) -> Callable[[], int]:
    """A timing body applying `function` to every item, dropping each result."""

    def body() -> int:
        for item in items:
            function(item)
        return len(items)

    return body


def seeded(function: Callable) -> Callable:
    """`function` under seed k for its k-th call (mod PERIOD), as the pipeline seeds each sample."""
    seeds = itertools.cycle(range(PERIOD))

    def call(item):
        seed = next(seeds)
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        return function(item)

    return call


def shard_stage(blobs: list[bytes], root: Path) -> Callable[[], int]:
    """Reading the samples back from a webdataset shard (tar parsing, member grouping)."""
    for index, blob in enumerate(blobs):
        path = root / "images" / f"c{index % 10}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    shard_image_folders(root / "shards", {"train": root / "images"}, plan=ShardPlan(max_count=len(blobs)))
    urls = sorted(str(path) for path in (root / "shards").glob("*.tar"))
    return lambda: sum(1 for url in urls for _ in read_shard(url, bad=[]))


def cpu_path(blobs, batch, repeats) -> dict[str, float]:
    """`data.decode=cpu`: timm's transform per sample on a Pillow image."""
    transform = create_train_transform(input_size=224)
    crop, flip, randaug, to_tensor, normalize, erasing = transform.transforms
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    crop_seeded = seeded(crop)
    crops = [crop_seeded(image) for image in images]
    tensors = [normalize(to_tensor(c)) for c in crops]
    rows = {
        "decode (Pillow, full size)": each(lambda b: Image.open(io.BytesIO(b)).convert("RGB"), blobs),
        "crop + resize (Pillow bicubic)": each(seeded(crop), images),
        "flip": each(seeded(flip), crops),
        "RandAugment (timm, Pillow)": each(seeded(randaug), crops),
        "to tensor": each(to_tensor, crops),
        "normalise": each(normalize, [to_tensor(c) for c in crops]),
        "random erasing (p 0.25)": each(seeded(lambda t: erasing(t.clone())), tensors),
        "collation (default_collate, per sample)": lambda: _per_batch(lambda: default_collate(tensors[:batch]), batch),
    }
    result = {name: best_per_item(body, repeats) for name, body in rows.items()}
    result.update(expected_randaugment(randaug_pil_ops(randaug, crops, repeats)))
    return result


def draft_path(blobs, batch, repeats) -> dict[str, float]:
    """`data.decode=draft`: torchvision decode, torch uint8 resize, RandAugment from timm's draws in the worker."""
    transform = create_device_train_transform(input_size=224, draft=True)
    sampler = transform.sampler
    encoded = [_encoded(b) for b in blobs]
    payloads = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    sample = seeded(sampler.sample)
    params = [sample(e.sized()) for e in encoded]
    decoded = [decode_jpeg(p, mode=ImageReadMode.RGB) for p in payloads]
    crops = [resize_crops([d], [p], 224, uint8_kernel=True)[0] for d, p in zip(decoded, params)]
    worker = seeded(transform)
    items = [worker(e) for e in encoded]
    rows = {
        "header parse (frame-header scan)": each(_encoded, blobs),
        "random choices (timm's samplers, all steps)": each(seeded(sampler.sample), [e.sized() for e in encoded]),
        "decode (torchvision, full size)": each(lambda p: decode_jpeg(p, mode=ImageReadMode.RGB), payloads),
        "crop + resize (torch uint8 bicubic, antialiased)": each(
            lambda pair: resize_crops([pair[0]], [pair[1]], 224, uint8_kernel=True), list(zip(decoded, params))
        ),
        "flip (tensor, p 0.5)": each(
            lambda pair: pair[0].flip(-1) if pair[1].flip else pair[0], list(zip(crops, params))
        ),
        "RandAugment (recorded draws)": each(
            lambda pair: apply_recorded(pair[0], pair[1].ops, transform.fill), list(zip(crops, params))
        ),
        "whole worker transform": each(seeded(transform), encoded),
        "collate + pack (shared memory)": lambda: _per_batch(lambda: transform.collate(items[:batch]), batch),
        "batch stage (normalise, erase)": lambda: _per_batch(lambda: _stage(transform, items[:batch]), batch),
    }
    result = {name: best_per_item(body, repeats) for name, body in rows.items()}
    result.update(expected_randaugment(randaug_worker_ops(transform, crops, repeats)))
    return result


def device_path(blobs, batch, repeats) -> dict[str, float]:
    """`data.decode=device` on the CPU: bytes in the worker, decode and batched augmentation in the main process."""
    transform = create_device_train_transform(input_size=224)
    encoded = [_encoded(b) for b in blobs]
    worker = seeded(transform)
    items = [worker(e) for e in encoded]
    params = [item[1] for item in items][:batch]
    payloads = [item[0] for item in items][:batch]
    pictures = decode_jpeg(payloads, mode=ImageReadMode.RGB)
    crops = resize_crops(pictures, params, 224, uint8_kernel=True)
    rows = {
        "worker: header parse + all random choices": each(seeded(transform), encoded),
        "decode (decode_jpeg list, full size)": lambda: _per_batch(
            lambda: decode_jpeg(payloads, mode=ImageReadMode.RGB), batch
        ),
        "crop + resize (torch uint8)": lambda: _per_batch(
            lambda: resize_crops(pictures, params, 224, uint8_kernel=True), batch
        ),
        "whole batch stage": lambda: _per_batch(lambda: _stage(transform, items[:batch]), batch),
    }
    result = {name: best_per_item(body, repeats) for name, body in rows.items()}
    result.update(expected_randaugment(randaug_tensor_ops(transform, crops, repeats)))
    return result


def _encoded(data: bytes) -> EncodedImage:
    """A JPEG as the pipeline hands it to the deferred paths: the bytes and the size from the frame header."""
    return EncodedImage(data, jpeg_size=jpeg_size(data))


def _per_batch(function: Callable, batch: int) -> int:
    function()
    return batch


_STAGES: dict[int, object] = {}


def _stage(transform, items: list) -> torch.Tensor:
    """One batch through the transform's main-process stage (one stage per transform, as a loader keeps it)."""
    stage = _STAGES.setdefault(id(transform), transform.make_stage(train=True, seed=0, rank=0))
    return stage.finish_train(transform.collate(items), torch.zeros(len(items), dtype=torch.long), [], seed=1)[0]


def expected_randaugment(per_op: dict[str, float]) -> dict[str, float]:
    """The per-application times plus RandAugment's expected cost per sample: each op is chosen with probability
    1/15 in each of 2 layers and then applied with probability 0.5, so the mean over the ops."""
    return {"RandAugment, expected per sample (mean over the ops)": statistics.mean(per_op.values()), **per_op}


def randaug_pil_ops(randaug, crops: list, repeats: int) -> dict[str, float]:
    """Each of timm's RandAugment ops applied (probability 1), microseconds per application."""
    result = {}
    for op in randaug.ops:
        forced = type(op).__new__(type(op))
        forced.__dict__.update(op.__dict__, prob=1.0)
        result[f"  RandAugment op {op.name}, per application"] = best_per_item(each(seeded(forced), crops), repeats)
    return result


def randaug_worker_ops(transform, crops: list, repeats: int) -> dict[str, float]:
    """Each RandAugment op as the draft worker applies it to one crop, microseconds per application."""
    result = {}
    for op in transform.sampler.randaug.ops:
        forced = type(op).__new__(type(op))
        forced.__dict__.update(op.__dict__, prob=1.0)
        record = seeded(lambda crop, forced=forced: forced([])[0])
        pairs = [(crop, record(crop)) for crop in crops]
        body = each(lambda pair: apply_recorded(pair[0], [pair[1]], transform.fill), pairs)
        result[f"  worker op {pairs[0][1][0]}, per application"] = best_per_item(body, repeats)
    return result


def randaug_tensor_ops(transform, crops: torch.Tensor, repeats: int) -> dict[str, float]:
    """Each RandAugment op applied to the whole batch on uint8 tensors, microseconds per application."""
    result = {}
    for op in transform.sampler.randaug.ops:
        forced = type(op).__new__(type(op))
        forced.__dict__.update(op.__dict__, prob=1.0)
        records = []
        for k in range(len(crops)):
            random.seed(k)
            records.append(forced([])[0])
        body = lambda records=records: _per_batch(lambda: apply_ops(crops, records, transform.fill), len(crops))  # noqa: E731
        result[f"  tensor op {records[0][0]}, per application"] = best_per_item(body, repeats)
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print the table; returns {path: {step: CPU µs per sample}} (and "tar" for the shard parsing)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", default=["cpu", "draft", "device"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    global PERIOD
    PERIOD = args.num_images
    blobs = make_images(args.num_images, (500, 375))
    print(f"{len(blobs)} JPEGs 500x375 q90, mean {statistics.mean(map(len, blobs)) / 1e3:.1f} kB; CPU µs per sample")
    with tempfile.TemporaryDirectory() as tmp:
        results = {"tar": {"tar parsing": best_per_item(shard_stage(blobs, Path(tmp)), args.repeats)}}
    print(f"tar parsing (webdataset, 3 members per sample): {results['tar']['tar parsing']:.0f}")
    paths = {"cpu": cpu_path, "draft": draft_path, "device": device_path}
    for name in args.paths:
        print(f"\n[{name}]")
        results[name] = paths[name](blobs, min(args.batch_size, len(blobs)), args.repeats)
        for stage, micros in results[name].items():
            print(f"  {stage:<52} {micros:8.0f}")
    return results


if __name__ == "__main__":
    main()
