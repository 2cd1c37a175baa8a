"""Data sources: HTTP, pipe:, list files, directories, the timm/imagenet-1k-wds layout, and clear errors."""

from __future__ import annotations

import json
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from data_helpers import fixed_transform, jpeg_bytes, make_image_folder, write_shards, write_tar

from pace.data import ShardOpenError, create_eval_loader, create_train_loader, imagenet_classes, resolve_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 shards of 5 images (20 in all), their stems."""
    root = tmp_path_factory.mktemp("sources")
    files = make_image_folder(root / "src", classes=2, per_class=10)
    write_shards(root / "out", root / "src", max_count=5)
    return root / "out", set(files)


@pytest.fixture(scope="module")
def server(dataset):
    """The shard directory served over HTTP on 127.0.0.1."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(dataset[0])))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


def _keys(source, num_workers=0, **kwargs):
    loader = create_eval_loader(
        source, batch_size=3, transform=fixed_transform(), num_workers=num_workers, split="train", **kwargs
    )
    keys = [key for _, _, batch in loader for key in batch]
    assert len(keys) == len(set(keys))
    return set(keys)


def test_http_directory_and_pattern(dataset, server):
    out, stems = dataset
    assert _keys(f"{server}/", num_workers=2) == stems
    pattern = f"{server}/out-train-{{000000..000003}}.tar"
    assert resolve_shards(pattern, split="train").num_samples == 20  # counts from the served _info.json
    loader = create_train_loader(pattern, batch_size=4, transform=fixed_transform(), num_workers=2)
    assert len(list(loader)) == 5


def test_http_errors_name_the_url(dataset, server):
    missing = f"{server}/out-train-000009.tar"
    with pytest.raises(ShardOpenError, match="out-train-000009.tar: HTTP 404"):
        _keys(missing, num_samples=5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    with pytest.raises(Exception, match=f"cannot reach shard http://127.0.0.1:{port}/x.tar"):
        _keys(f"http://127.0.0.1:{port}/x.tar", num_workers=1, num_samples=5)


def test_pipe_source(dataset):
    out, stems = dataset
    assert _keys(f"pipe:cat {out}/out-train-{{000000..000003}}.tar", num_workers=2) == stems
    with pytest.raises(ShardOpenError, match="pipe:cat .*nothing.tar"):
        _keys(f"pipe:cat {out}/nothing.tar 2>/dev/null")


def test_list_file_source(dataset, tmp_path):
    out, stems = dataset
    names = sorted(p.name for p in out.glob("*.tar"))
    listing = out / "train.txt"
    listing.write_text("# shards, relative to this file\n" + "\n".join(names[:2]) + f"\n\n{out / names[2]}\n")
    try:
        assert len(_keys(listing)) == 15
        assert resolve_shards(str(listing), split="train").num_samples == 15
    finally:
        listing.unlink()


def test_missing_local_shard_is_named_before_reading(dataset):
    out, _ = dataset
    with pytest.raises(FileNotFoundError, match="1 of 5 shards not found: .*out-train-000004.tar"):
        create_eval_loader(f"{out}/out-train-{{000000..000004}}.tar", batch_size=2, transform=fixed_transform())


def test_directory_without_split_or_counts(dataset, tmp_path):
    out, _ = dataset
    with pytest.raises(ValueError, match="split 'val' not in"):
        resolve_shards(out, split="val")
    with pytest.raises(ValueError, match="number of samples .* is unknown"):
        create_train_loader(f"pipe:cat {out}/out-train-000000.tar", batch_size=2, transform=fixed_transform())


def test_imagenet1k_wds_layout(tmp_path):
    # The published layout: imagenet1k-validation-NNNN.tar, members jpg + cls + json, keys not in file order.
    wnids = imagenet_classes()
    numbers = [7, 3, 12, 1, 9, 5, 11, 2]
    for shard in range(2):
        samples = []
        for n in numbers[shard * 4 : shard * 4 + 4]:
            key = f"ILSVRC2012_val_{n:08d}"
            meta = {"filename": f"{key}.JPEG", "label": n * 10, "class_name": wnids[n * 10]}
            samples.append(
                {"__key__": key, "jpg": jpeg_bytes(n), "cls": str(n * 10).encode(), "json": json.dumps(meta).encode()}
            )
        write_tar(tmp_path / f"imagenet1k-validation-{shard:04d}.tar", samples)
    shards = resolve_shards(tmp_path, split="val")
    assert len(shards.urls) == 2 and shards.num_samples is None and shards.classes == tuple(wnids)
    loader = create_eval_loader(tmp_path, split="val", batch_size=3, transform=fixed_transform(), num_workers=0)
    labels = {key: int(t) for _, targets, keys in loader for key, t in zip(keys, targets)}
    assert labels == {f"ILSVRC2012_val_{n:08d}": n * 10 for n in numbers}
    # The full published sets have known sizes without an info file.
    train = resolve_shards("/hub/imagenet1k-train-{0000..1023}.tar")
    val = resolve_shards("/hub/imagenet1k-validation-{0000..0063}.tar")
    assert (train.num_samples, val.num_samples) == (1_281_167, 50_000)
    assert resolve_shards("/hub/imagenet1k-train-{0000..0009}.tar").num_samples is None
