"""JPEGs that libjpeg decodes despite zeroed bytes: what `pace-make-shards` catches (a zeroed or cut end, by a walk
over the markers) and what it lets through (zeros inside the compressed data), as docs/data.md says."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from data_helpers import fixed_transform, make_image_folder
from PIL import Image

from pace.data import create_eval_loader, read_info
from pace.data.jpeg_check import jpeg_damage, jpeg_size
from pace.data.make_shards import main


def _photo_jpeg(**save_options) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:160]
    pixels = np.stack([x, y, (x + y) / 2], -1) + rng.normal(0, 20, (120, 160, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", **save_options)
    return out.getvalue()


def _zeroed(data: bytes, start: int, stop: int | None = None) -> bytes:
    damaged = bytearray(data)
    stop = len(data) if stop is None else stop
    damaged[start:stop] = bytes(stop - start)
    return bytes(damaged)


def _decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
    except OSError:
        return False
    return True


ENCODINGS = [
    {"quality": 90},
    {"quality": 75, "optimize": True},
    {"quality": 90, "progressive": True},
    {"quality": 85, "subsampling": 0},
    {"quality": 90, "restart_marker_rows": 1},
]


@pytest.mark.parametrize("options", ENCODINGS, ids=lambda o: ",".join(o))
def test_marker_walk_passes_whole_files_and_finds_a_zeroed_or_missing_end(options):
    data = _photo_jpeg(**options)
    if "restart_marker_rows" in options:
        assert b"\xff\xdd" in data  # the DRI segment: the scan holds restart markers
    assert jpeg_damage(data) is None
    assert jpeg_damage(data + b"camera trailer\x00\x00\xff") is None  # bytes after the end-of-image marker
    zero_tail = _zeroed(data, len(data) // 2)
    if options == ENCODINGS[0]:  # libjpeg fills in the image from the zeros without an error: why the walk exists
        assert _decodes(zero_tail)
    assert "no end-of-image marker" in jpeg_damage(zero_tail)
    assert "no end-of-image marker" in jpeg_damage(data[:-2])
    assert jpeg_damage(b"GIF89a") == "no start-of-image marker"


def test_a_zeroed_end_is_refused_by_pace_make_shards_naming_the_file(tmp_path, capsys):
    src = tmp_path / "src"
    files = make_image_folder(src, classes=2, per_class=3)
    victim = files["img_1_0002"][1]
    data = _photo_jpeg(**ENCODINGS[0])
    assert _decodes(_zeroed(data, len(data) // 2))
    victim.write_bytes(_zeroed(data, len(data) // 2))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as caught:
        main([str(out), "--split", f"train={src}", "--workers", "1"])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert f"pace-make-shards: error: cannot read image {victim}: damaged JPEG (no end-of-image marker" in err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(SystemExit) as caught:  # --no-verify stores it as it is
        main([str(out), "--split", f"train={src}", "--workers", "1", "--no-verify"])
        raise SystemExit(0)
    assert caught.value.code == 0 and read_info(out)["splits"]["train"]["num_samples"] == 6


def test_zeros_inside_the_compressed_data_pass_as_documented(tmp_path, capsys):
    # The end is intact, so only a decoder that reports libjpeg's warnings could tell: the image is stored as it is
    # and decodes to wrong pixels in training, without a bad-data entry.
    src = tmp_path / "src"
    files = make_image_folder(src, classes=2, per_class=3)
    victim = files["img_0_0001"][1]
    data = _photo_jpeg(**ENCODINGS[0])
    damaged = _zeroed(data, len(data) // 2, len(data) // 2 + 512)
    assert jpeg_damage(damaged) is None and _decodes(damaged)
    whole, broken = (np.asarray(Image.open(io.BytesIO(d)), dtype=np.float64) for d in (data, damaged))
    assert np.abs(whole - broken).mean() > 5  # the pixels after the zeros are wrong
    victim.write_bytes(damaged)
    out = tmp_path / "out"
    main([str(out), "--split", f"train={src}", "--workers", "1", "--prefix", "z"])
    with tarfile.open(out / "z-train-000000.tar") as tar:
        assert tar.extractfile("img_0_0001.jpg").read() == damaged
    loader = create_eval_loader(out, split="train", batch_size=6, transform=fixed_transform(), num_workers=0)
    assert sorted(key for _, _, keys in loader for key in keys) == sorted(files)
    assert loader.stats.bad == 0


@pytest.mark.parametrize(
    "mode, options",
    [
        ("RGB", {}),
        ("RGB", {"progressive": True}),
        ("L", {}),
        ("CMYK", {}),
        ("RGB", {"exif": b"Exif\x00\x00" + bytes(2000), "icc_profile": bytes(3000)}),  # long segments first
    ],
)
def test_the_frame_header_scan_reads_the_size_pillow_reads(mode, options):
    data = _photo_jpeg_of(mode, **options)
    assert jpeg_size(data) == Image.open(io.BytesIO(data)).size == (160, 120)


def test_the_frame_header_scan_leaves_what_it_cannot_read_to_pillow():
    data = _photo_jpeg()
    frame = data.index(b"\xff\xc0")
    assert jpeg_size(b"not a jpeg") is None
    assert jpeg_size(data[: frame + 4]) is None  # cut inside the frame header
    assert jpeg_size(data[:frame] + b"\xff\xda" + data[frame + 2 :]) is None  # a scan before any frame header
    zero_height = bytearray(data)
    zero_height[frame + 5 : frame + 7] = b"\x00\x00"  # height given later (DNL): Pillow's business
    assert jpeg_size(bytes(zero_height)) is None


def _photo_jpeg_of(mode: str, **save_options) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(_photo_jpeg())).convert(mode).save(out, "JPEG", **save_options)
    return out.getvalue()
