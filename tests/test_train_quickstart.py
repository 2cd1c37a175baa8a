"""The README's quickstart, end to end: data generated on first use, PACE-ViT-tiny trained and evaluated, accuracy
far above chance (minutes on two CPU cores, so it runs with `-m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import ROOT, read_metrics, train_env


@pytest.mark.slow
def test_quickstart_learns_the_generated_shapes(tmp_path: Path):
    cmd = [
        sys.executable,
        "scripts/train.py",
        "experiment=quickstart",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.root={tmp_path / 'shapes'}",
        "trainer.progress_bar=false",
    ]
    out = subprocess.run(cmd, env=train_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "shapes" / "_info.json").is_file()
    final = [r for r in read_metrics(tmp_path / "run") if "val/top1" in r][-1]
    assert final["val/count"] == 500
    assert final["val/top1"] > 50.0  # chance is 10 %
    assert "(chance 10.00%)" in out.stdout + out.stderr
    assert (tmp_path / "run" / "release" / "model.safetensors").is_file()
    release = json.loads((tmp_path / "run" / "release" / "config.json").read_text())
    assert release["architecture"] == "pace_vit_tiny_patch8_224"  # PACE-ViT-tiny: width 192
    assert release["num_features"] == 192
