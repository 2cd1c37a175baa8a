"""Provenance of a run: the git commit of the code, and the resolved config and launch record in the run dir."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import OmegaConf

from pace.distributed import DistEnv


def git_sha() -> str | None:
    """The commit of the code that runs (suffix `-dirty` with local changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _keep_previous_config(path: Path, text: str) -> None:
    # A resumed run with changed settings (more epochs, `trainer.resume=force`) keeps the record of what ran
    # before: the earlier config.yaml becomes config.1.yaml, config.2.yaml, ...
    if not path.is_file() or path.read_text().split("\n", 1)[-1] == text.split("\n", 1)[-1]:
        return
    n = 1
    while path.with_name(f"config.{n}.yaml").exists():
        n += 1
    path.rename(path.with_name(f"config.{n}.yaml"))


def write_provenance(run_dir: Path, resolved: dict[str, Any], env: DistEnv, sha: str | None) -> None:
    """Write the resolved config and how the run was started into the run dir (after the resume checks, so a
    refused command leaves the run's record as it was).

    Args:
        run_dir: the run directory.
        resolved: the resolved config.
        env: this process's place in the job.
        sha: git commit of the code.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    text = f"# git: {sha}\n" + OmegaConf.to_yaml(OmegaConf.create(resolved))
    _keep_previous_config(run_dir / "config.yaml", text)
    (run_dir / "config.yaml").write_text(text)
    provenance = {
        "git_sha": sha,
        "argv": sys.argv,
        "host": platform.node(),
        "world_size": env.world_size,
        "launcher": env.launcher,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
    }
    (run_dir / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
