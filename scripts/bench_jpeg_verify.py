"""What verifying images costs `pace-make-shards`: header-only open vs full decode vs the JPEG marker walk, per
image, and the whole writer with and without `--no-verify`.

    OMP_NUM_THREADS=1 python scripts/bench_jpeg_verify.py [--images 200] [--cifar CIFAR10_JPG_TARBALL]

The photo-sized image is generated (500x375, smooth gradients plus noise, JPEG quality 90: about ImageNet's mean
size and file size); noise makes it slower to decode than most photos, so its decode cost is an upper estimate.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
from PIL import Image

from pace.data.image_folders import shard_image_folders
from pace.data.jpeg_check import jpeg_damage
from pace.data.writer import EncodeOptions


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500]
    pixels = np.stack([x / 2, y / 1.5, (x + y) / 3.5], -1) + rng.normal(0, 20, (375, 500, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def per_image(name: str, data: bytes, number: int) -> None:
    steps = {
        "open (header only)": lambda: Image.open(io.BytesIO(data)).size,
        "open + load (full decode)": lambda: Image.open(io.BytesIO(data)).load(),
        "marker walk (jpeg_damage)": lambda: jpeg_damage(data),
    }
    base = None
    for step, fn in steps.items():
        seconds = min(timeit.repeat(fn, number=number, repeat=5)) / number
        base = base or seconds
        print(f"{name:26s} {step:27s} {seconds * 1e6:8.1f} us/image ({seconds / base:5.1f}x open)")


def writer(images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "src" / "n00000000"
        folder.mkdir(parents=True)
        for i in range(images):
            (folder / f"img_{i:05d}.jpg").write_bytes(_photo(i))
        times = {}
        for verify in (False, True, False, True):  # alternated, best of two
            start = time.perf_counter()
            shard_image_folders(
                Path(tmp) / f"out-{verify}",
                {"train": folder.parent},
                options=EncodeOptions(verify=verify),
                overwrite=True,
            )
            times[verify] = min(times.get(verify, float("inf")), time.perf_counter() - start)
        for verify, seconds in times.items():
            print(
                f"pace-make-shards, {images} photo-sized images, 1 writer, verify={verify}: "
                f"{seconds / images * 1e3:.2f} ms/image ({seconds / times[False]:.1f}x --no-verify)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images written in the writer comparison")
    parser.add_argument(
        "--cifar",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10_jpg.tar.gz"),
        help="CIFAR-10 JPEG tarball (default: shared/ beside the checkout; skipped when absent)",
    )
    args = parser.parse_args()
    photo = _photo(0)
    per_image(f"500x375 q90 ({len(photo)} B)", photo, 100)
    if Path(args.cifar).is_file():
        with tarfile.open(args.cifar) as tar:
            cifar = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))
        per_image(f"CIFAR-10 32x32 ({len(cifar)} B)", cifar, 2000)
    writer(args.images)


if __name__ == "__main__":
    main()
