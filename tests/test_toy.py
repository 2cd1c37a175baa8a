"""The toy MCR² verification script: runs, writes its JSON and figures, and shows monotone rates."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference_pace import dense_coding_rate, dense_compression_rate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "toy_mcr2.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("toy_mcr2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, json.loads((out / "metrics.json").read_text())


def test_rates_are_monotone_at_every_layer(toy_run):
    _, stdout, metrics = toy_run
    layers = metrics["config"]["layers"]
    for per_image in metrics["expansion"]["R_per_image"]:
        assert len(per_image) == layers + 1
        assert all(b > a for a, b in zip(per_image, per_image[1:]))
    for per_image in metrics["compression"]["R_c_per_image"]:
        assert len(per_image) == layers + 1
        assert all(b < a for a, b in zip(per_image, per_image[1:]))
    assert all(metrics["checks"].values())
    assert "expansion_raises_R_every_layer: yes" in stdout


def test_json_rates_match_an_independent_computation_on_the_input(toy_run):
    _, _, metrics = toy_run
    toy = _load_script()
    args = toy.parse_args(["--seed", str(metrics["config"]["seed"])])
    Z, U = toy.union_of_subspaces(args)
    eps, K = args.coding_eps, args.num_subspaces
    assert metrics["expansion"]["R"][0] == pytest.approx(dense_coding_rate(Z, eps).mean().item(), rel=1e-9)
    assert metrics["compression"]["R_c"][0] == pytest.approx(
        dense_compression_rate(Z, U, K, eps).mean().item(), rel=1e-9
    )
    # The input spectrum has actual_dim · K strong directions and a noise floor.
    spectrum = torch.tensor(metrics["spectra"]["input"])
    strong = args.actual_dim * K
    assert spectrum[strong - 1] > 10 * spectrum[strong]


def test_figures_are_valid_pngs(toy_run):
    out, _, metrics = toy_run
    assert sorted(metrics["figures"]) == ["rate_R.png", "rate_Rc.png", "spectra.png"]
    for name in metrics["figures"]:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width > 100 and image.height > 100


def test_bad_step_sizes_are_rejected():
    toy = _load_script()
    with pytest.raises(SystemExit) as excinfo:
        toy.parse_args(["--beta", "1.5"])
    assert excinfo.value.code == 2
