"""The analysis scripts end to end on the tiny model: images and checkpoints in, PNG figures and JSON out."""

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_analysis import _assert_png
from test_checkpoint_filter import reference_state_dict
from timm.data import create_transform
from timm.models import save_for_hf

import pace  # noqa: F401  (registers the models)
from pace.analysis import layer_rates
from pace.analysis._cli import model_from_source
from pace.analysis.analyze import main as analyze_main
from pace.analysis.images import model_transform
from pace.analysis.visualize import main as visualize_main
from pace.data import make_quickstart_dataset

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pace_vit_test"


def _photos(folder: Path) -> list[Path]:
    """A JPEG and two PNGs of different sizes and aspect ratios (smooth colour fields, not noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w, suffix) in enumerate([(90, 120, ".jpg"), (64, 64, ".png"), (100, 70, ".png")]):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        rgb = np.stack([np.sin(3 * xx + i), np.cos(4 * yy), xx * yy], -1)
        img = Image.fromarray(((rgb - rgb.min()) / np.ptp(rgb) * 255).astype(np.uint8))
        paths.append(folder / f"photo {i}{suffix}")  # a space in the name: output names must be safe
        img.save(paths[-1])
    return paths


def _training_checkpoint(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A checkpoint dict as the trainer writes it, with EMA and raw weights that differ in α and β."""
    raw = timm.create_model(MODEL, num_classes=10)
    ema = timm.create_model(MODEL, num_classes=10)
    with torch.no_grad():
        for i, (r, e) in enumerate(zip(raw.blocks, ema.blocks)):
            r.attn.alpha.fill_(0.5 + i)
            e.attn.alpha.fill_(0.05 * (i + 1))
            e.attn.beta.fill_(0.3 - 0.05 * i)
    torch.save(
        {
            "model": raw.state_dict(),
            "model_ema": ema.state_dict(),
            "model_name": MODEL,
            "model_args": {"num_classes": 10},
            "config": {"model": {"name": MODEL}},
        },
        path,
    )
    return raw.eval(), ema.eval()


def test_visualize_writes_one_png_grid_per_image_and_head_shares(tmp_path):
    photos = _photos(tmp_path / "photos")
    (tmp_path / "photos" / "sub").mkdir()
    Image.open(photos[1]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "photos" / "sub" / photos[1].name)
    out = tmp_path / "vis"
    argv = [MODEL, str(photos[0]), str(tmp_path / "photos"), "--blocks", "0", "-1", "--out", str(out)]
    assert visualize_main(argv) == 0
    summary = json.loads((out / "memberships.json").read_text())
    assert summary["blocks"] == [0, 3]
    # The JPEG named twice is analysed once; the two files called "photo 1" get distinct names.
    assert sorted(summary["images"]) == ["photo 0", "photo 1", "photo 1_2", "photo 2"]
    for entry in summary["images"].values():
        _assert_png(out / entry["figure"])
        assert " " not in entry["figure"]
        for shares in entry["head_share"].values():
            assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)


def test_visualize_demo_uses_the_offline_sample_photographs(tmp_path):
    pytest.importorskip("skimage")
    assert visualize_main([MODEL, "--demo", "--out", str(tmp_path)]) == 0
    for name in ("astronaut", "coffee", "chelsea"):
        _assert_png(tmp_path / f"{name}_memberships.png")


def test_analyze_a_training_checkpoint_reports_its_raw_or_ema_weights_and_the_rates_of_the_batch(tmp_path):
    photos = _photos(tmp_path / "val")
    ckpt = tmp_path / "step_00000010.pt"
    raw, ema = _training_checkpoint(ckpt)
    out = tmp_path / "analysis"
    argv = [str(ckpt), str(tmp_path / "val"), "--batch-size", "2", "--spectrum-blocks", "1", "3"]
    # By default the raw `model` weights, as the authors evaluate and as pace-eval loads; EMA on request.
    assert analyze_main([*argv, "--out", str(tmp_path / "raw")]) == 0
    report = json.loads((tmp_path / "raw" / "analysis.json").read_text())
    assert report["coefficients"] == [{k: float(v) for k, v in b.coefficients().items()} for b in raw.blocks]
    assert analyze_main([*argv, "--weights", "ema", "--out", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["num_images"] == 3 and report["eps"] == 0.5
    coeffs = [{k: float(v) for k, v in b.coefficients().items()} for b in ema.blocks]
    assert report["coefficients"] == coeffs  # floats survive JSON exactly

    # The batched, accumulated numbers equal one pass of the library over the same three images.
    transform, _ = model_transform(ema)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(photos)])
    expected = layer_rates(ema, images, eps=0.5)
    rates = report["rates"]
    assert rates["block"] == [0, 1, 2, 3]
    for key in ("R", "Rc", "dR"):
        assert rates[key] == pytest.approx([expected[b][key].mean().item() for b in range(4)], rel=1e-5)
        per_image = torch.stack([expected[b][key] for b in range(4)], dim=1)  # (images, blocks)
        np.testing.assert_allclose(rates[f"{key}_per_image"], per_image.numpy(), rtol=1e-5)
    assert sorted(report["spectra"]) == ["1", "3"]
    assert all(len(s["eigenvalues"]) == 64 and 1 <= s["effective_rank"] <= 64 for s in report["spectra"].values())
    for name in report["figures"]:
        _assert_png(out / name)

    assert analyze_main([*argv, "--weights", "raw", "--out", str(tmp_path / "raw")]) == 0
    raw_report = json.loads((tmp_path / "raw" / "analysis.json").read_text())
    assert [c["alpha"] for c in raw_report["coefficients"]] == pytest.approx([0.5, 1.5, 2.5, 3.5])


def test_analyze_the_authors_checkpoint_through_the_models_filter(tmp_path):
    sd = reference_state_dict(seed=3)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "epoch": 399, "args": argparse.Namespace(model="ECAttention")}, ckpt)
    out = tmp_path / "out"
    assert analyze_main([str(ckpt), "--model", MODEL, "--synthetic", "2", "--out", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["compress_form"] == "diag"  # the authors' Compress, switched on by the filter
    for i, c in enumerate(report["coefficients"]):
        assert c["alpha"] == pytest.approx(sd[f"blocks.{i}.gamma1"].item())
        assert c["beta"] == pytest.approx(sd[f"blocks.{i}.gamma2"].item())
        assert c["tau"] == pytest.approx(sd[f"blocks.{i}.attn.compressoperator.temperature"].item())


def test_a_release_folder_or_its_safetensors_file_loads_with_its_weights(tmp_path):
    model = timm.create_model(MODEL, num_classes=10)
    with torch.no_grad():
        model.blocks[2].attn.alpha.fill_(0.77)
    save_for_hf(model, str(tmp_path), model_args={"num_classes": 10}, safe_serialization=True)  # as training exports
    for source in (tmp_path, tmp_path / "model.safetensors"):
        loaded, description = model_from_source(source)
        assert description.startswith(MODEL) and not loaded.training
        for (name, p), q in zip(loaded.state_dict().items(), model.state_dict().values()):
            assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    """The generated shapes dataset at 32 px: 40 held-out images in two shards of 20."""
    root = tmp_path_factory.mktemp("shapes")
    make_quickstart_dataset(root, image_size=32, train_per_class=1, val_per_class=4, shard_size=20, workers=1)
    return root


def _first_val_samples(root: Path, n: int) -> list[tuple[str, int, Image.Image]]:
    """``(key, label, image)`` of the first n held-out samples, read with Python's tarfile (independently of the
    project's reader), shard by shard in the order _info.json lists them."""
    samples: dict[str, dict] = {}
    for name in json.loads((root / "_info.json").read_text())["splits"]["val"]["filenames"]:
        with tarfile.open(root / name) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    out = []
    for key, members in list(samples.items())[:n]:
        image = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
        out.append((key, int(members["cls"]), image))
    return out


def _checkpoint_at_32px(path: Path) -> torch.nn.Module:
    """A training checkpoint of a model built for 32 px, with the run's data and eval-transform settings."""
    model = timm.create_model(MODEL, num_classes=10, img_size=32)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.attn.alpha.fill_(0.2 + 0.1 * i)
    config = {"model": {"name": MODEL}, "data": {"img_size": 32}, "aug": {"crop_pct": 1.0, "interpolation": "bilinear"}}
    model_args = {"num_classes": 10, "img_size": 32}
    torch.save({"model": model.state_dict(), "model_name": MODEL, "model_args": model_args, "config": config}, path)
    return model.eval()


def test_analyze_reads_exactly_the_first_n_images_of_a_shard_split(tmp_path, val_shards):
    ckpt = tmp_path / "best.pt"
    model = _checkpoint_at_32px(ckpt)
    out = tmp_path / "analysis"
    argv = [str(ckpt), "--shards", str(val_shards), "--split", "val", "--max-images", "25", "--batch-size", "8"]
    assert analyze_main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    expected = _first_val_samples(val_shards, 25)  # 20 from the first shard, 5 from the second
    assert report["num_images"] == 25
    assert report["inputs"]["shards"]["num_images"] == 25 and report["inputs"]["files"] == 0
    assert report["inputs"]["shards"]["keys"] == [key for key, _, _ in expected]
    # The run's own eval transform (its config's size, crop and interpolation), not the architecture's default.
    assert report["input_size"] == [3, 32, 32]

    # Same numbers as the library on the same 25 images decoded here, through the transform built here.
    cfg = model.pretrained_cfg
    transform = create_transform(32, crop_pct=1.0, interpolation="bilinear", mean=cfg["mean"], std=cfg["std"])
    images = torch.stack([transform(image) for _, _, image in expected])
    rates = layer_rates(model, images, eps=0.5)
    for key in ("R", "Rc", "dR"):
        assert report["rates"][key] == pytest.approx([rates[b][key].mean().item() for b in range(4)], rel=1e-5)

    # --num-images caps the shard images too.
    assert analyze_main([*argv, "--num-images", "7", "--out", str(tmp_path / "capped")]) == 0
    capped = json.loads((tmp_path / "capped" / "analysis.json").read_text())
    assert capped["num_images"] == 7 and capped["inputs"]["shards"]["keys"] == report["inputs"]["shards"]["keys"][:7]


def test_visualize_draws_the_first_n_images_of_shards_given_by_brace_pattern(tmp_path, val_shards):
    ckpt = tmp_path / "best.pt"
    _checkpoint_at_32px(ckpt)
    pattern = str(val_shards / "shapes-val-{000000..000001}.tar")
    out = tmp_path / "vis"
    assert visualize_main([str(ckpt), "--shards", pattern, "--max-images", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "memberships.json").read_text())
    expected = _first_val_samples(val_shards, 3)
    classes = json.loads((val_shards / "_info.json").read_text())["classes"]
    assert summary["num_images"] == 3 and summary["inputs"]["shards"]["keys"] == [k for k, _, _ in expected]
    assert list(summary["images"]) == [k for k, _, _ in expected]
    assert summary["input_size"] == [3, 32, 32]
    for key, label, _ in expected:
        entry = summary["images"][key]
        assert entry["label"] == label and entry["class"] == classes[label]
        _assert_png(out / entry["figure"])
    assert len(list(out.glob("*.png"))) == 3


def test_bad_shard_sources_end_with_a_message_that_names_them(tmp_path, val_shards, capsys):
    missing = tmp_path / "no_such_shards"
    assert analyze_main([MODEL, "--shards", str(missing), "--out", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert visualize_main([MODEL, "--shards", str(val_shards), "--split", "test", "--out", str(tmp_path)]) == 2
    assert "split 'test' not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize_main([MODEL, "--shards", str(val_shards), "--max-images", "0"])
    assert "--max-images must be positive" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.png"))


def test_bad_inputs_end_with_a_message_that_names_them(tmp_path, capsys):
    assert analyze_main(["no_such_model_or_file", "--synthetic", "1", "--out", str(tmp_path)]) == 2
    assert "'no_such_model_or_file' is neither" in capsys.readouterr().err
    bare = tmp_path / "bare.pt"
    torch.save(timm.create_model(MODEL).state_dict(), bare)
    assert analyze_main([str(bare), "--synthetic", "1", "--out", str(tmp_path)]) == 2
    assert f"{bare} does not name its architecture" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert visualize_main([MODEL, str(broken), "--out", str(tmp_path)]) == 2
    assert f"{broken}: cannot be read as an image" in capsys.readouterr().err
    assert visualize_main([MODEL, "--out", str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # nothing half-written


def test_script_runs_as_a_file(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(ROOT / "scripts" / "analyze_checkpoint.py"), MODEL, "--synthetic", "2"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "analysis.json").is_file() and "wrote" in done.stdout
