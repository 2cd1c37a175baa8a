"""Helpers shared by the training tests: run `pace.train.main` in a subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tiny CPU set-up: timm's test ViT on synthetic 32 px data, a few batches, no wandb, no progress bar.
FAST = ("debug=cpu", "model=vit_test", "trainer.progress_bar=false", "logger=none")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def make_tiny_shards(root: Path) -> tuple[str, ...]:
    """The generated shapes dataset at 32 px, 80 training images in 4 shards and 40 held-out images in 2;
    returns the overrides that train on it."""
    from pace.data import make_quickstart_dataset

    make_quickstart_dataset(root, image_size=32, train_per_class=8, val_per_class=4, shard_size=20, workers=1)
    return (
        "data.source=webdataset",
        f"data.root={root}",
        "data.train_split=train",
        "data.val_split=val",
        "data.img_size=32",
        "data.num_workers=1",
        "data.eval_batch_size=20",
        "trainer.limit_eval_batches=null",
    )


def train_env(full_errors: bool = True) -> dict[str, str]:
    """The test process's environment for a training subprocess: one thread, wandb offline, no launcher; with
    `full_errors` every error keeps its traceback (HYDRA_FULL_ERROR=1), else users' one-line errors are seen."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
    )
    env.pop("HYDRA_FULL_ERROR", None)
    if full_errors:
        env["HYDRA_FULL_ERROR"] = "1"
    return env


def start_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """Start a training job in its own process group (signal it like a launcher: `os.killpg`)."""
    return subprocess.Popen(
        train_command(run_dir, *overrides),
        env=train_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def train_command(run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """`python -m pace.train.main` (under torchrun when `nproc` > 1) writing to `run_dir`."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "pace.train.main", f"hydra.run.dir={run_dir}", *FAST, *overrides]


def run_train(
    run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 120, full_errors: bool = True
) -> subprocess.CompletedProcess:
    """Run a training job to completion and return it (stdout and stderr captured); `full_errors=False` shows
    what a user sees (one line for a user error)."""
    return subprocess.run(
        train_command(run_dir, *overrides, nproc=nproc),
        env=train_env(full_errors),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `metrics.jsonl`."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss from `metrics.jsonl`."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
