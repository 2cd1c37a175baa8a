"""Pre-resized shards (`pace-make-shards --max-size`) and the `data.decode` key."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image
from test_data_device import smooth_jpeg

from pace.data.make_shards import main
from pace.train.config import DataConfig


def test_max_size_caps_the_shorter_side_and_records_it(tmp_path):
    src = tmp_path / "src"
    sizes = {"wide": (90, 40), "tall": (30, 70), "small": (20, 18)}
    for name, size in sizes.items():
        (src / "n0").mkdir(parents=True, exist_ok=True)
        (src / "n0" / f"{name}.jpg").write_bytes(smooth_jpeg(len(name), size=size))
    out = tmp_path / "shards"
    main([str(out), "--split", f"train={src}", "--max-size", "24", "--workers", "1"])
    stored = {}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    stored[member.name.split(".")[0]] = Image.open(io.BytesIO(tar.extractfile(member).read())).size
    # Shorter side 24 where it was larger, aspect ratio kept (rounded); small images untouched.
    assert stored == {"wide": (54, 24), "tall": (24, 56), "small": (20, 18)}
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["stored"]["max_short_side"] == 24


def test_data_decode_accepts_the_three_paths_and_names_a_wrong_value():
    for value in ("cpu", "draft", "device"):
        assert DataConfig(decode=value).decode == value
    with pytest.raises(ValueError, match="data.decode"):
        DataConfig(decode="gpu")
