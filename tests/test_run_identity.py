"""Run identity: a rerun with other run-defining settings is refused (one line naming the keys) instead of silently
continuing the old state; `trainer.resume=force` and the keys a resumed run may change by design go through; a
truncated newest checkpoint falls back to the previous intact one; a checkpoint of another architecture is named.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from train_helpers import read_metrics, run_train

from pace.train.checkpoint import load_checkpoint
from pace.train.config import register_configs
from pace.train.main import CONFIG_DIR
from pace.train.run_identity import config_hash, differing_keys

# debug=cpu: 2 epochs x 4 updates of timm's test ViT on synthetic data, a checkpoint every 2 updates.
SAVED = ["step_00000004.pt", "step_00000006.pt", "step_00000008.pt"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    out = run_train(run_dir, "optim.lr=0.001")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_the_hash_ignores_keys_a_resumed_run_may_change():
    base = {"optim": {"lr": 0.001}, "sched": {"epochs": 2}, "trainer": {"log_every_steps": 1}, "logger": {"a": 1}}
    longer = {"optim": {"lr": 0.001}, "sched": {"epochs": 9}, "trainer": {"log_every_steps": 5}, "logger": {"a": 2}}
    other_lr = {**base, "optim": {"lr": 0.002}}
    assert config_hash(base) == config_hash(longer)
    assert config_hash(base) != config_hash(other_lr)
    assert differing_keys(base, other_lr) == [("optim.lr", 0.001, 0.002)]
    assert differing_keys(base, {**base, "distill": {"alpha": 0.5}}) == [("distill.alpha", "<absent>", 0.5)]


def test_a_rerun_with_another_lr_is_refused_naming_the_key(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    before = (run_dir / "config.yaml").read_text()
    out = run_train(run_dir, "optim.lr=0.002", full_errors=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("pace-train: error:") and "optim.lr: 0.001 -> 0.002" in line, line
    assert "trainer.resume=force" in line
    assert (run_dir / "config.yaml").read_text() == before  # the record of what ran is untouched
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == SAVED


def test_force_continues_and_keeps_the_earlier_config(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    out = run_train(run_dir, "optim.lr=0.002", "trainer.resume=force", "sched.epochs=3")
    assert out.returncode == 0, out.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "trainer.resume=force: resuming" in log and "optim.lr: 0.001 -> 0.002" in log
    assert "lr: 0.001" in (run_dir / "config.1.yaml").read_text()
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text()
    last = load_checkpoint(run_dir / "checkpoints" / "step_00000012.pt")
    assert last["config"]["optim"]["lr"] == 0.002 and last["config_hash"] == config_hash(last["config"])


def test_more_epochs_and_other_logging_resume_without_force(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    out = run_train(run_dir, "optim.lr=0.001", "sched.epochs=3", "trainer.log_every_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert max(r["step"] for r in read_metrics(run_dir)) == 12


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    out = run_train(run_dir, "optim.lr=0.001")
    assert out.returncode == 0, out.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert f"checkpoint {newest} cannot be read (" in log and "set aside as step_00000008.pt.corrupt" in log
    assert f"resuming from {run_dir / 'checkpoints' / 'step_00000006.pt'}, the newest intact checkpoint" in log
    assert "resumed from " + str(run_dir / "checkpoints" / "step_00000006.pt") in log
    assert (run_dir / "checkpoints" / "step_00000008.pt.corrupt").is_file()
    assert load_checkpoint(newest)["trainer"]["step"] == 8  # written again by the resumed run


def test_resume_never_in_a_run_dir_with_checkpoints_is_refused(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    metrics = (run_dir / "metrics.jsonl").read_text()
    out = run_train(run_dir, "optim.lr=0.001", "trainer.resume=never", full_errors=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    expected = f"trainer.resume=never: {run_dir / 'checkpoints'} holds the checkpoints of an earlier run (up to "
    assert line.startswith(f"pace-train: error: {expected}step_00000008.pt)"), line
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # the earlier run is untouched
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt")) == SAVED


def test_a_fresh_start_drops_the_records_of_an_attempt_that_saved_no_checkpoint(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")  # as if it had died before its first checkpoint
    out = run_train(run_dir, "optim.lr=0.001")
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == list(range(1, 9))  # once each, not the first attempt's and then the rerun's


def test_a_checkpoint_of_another_architecture_is_named_in_one_line(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    out = run_train(run_dir, "optim.lr=0.001", "model=pace_vit_test", full_errors=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "holds a 'test_vit' model" in line, line
    assert "model.name='pace_vit_test'" in line, line


def test_fine_tuning_from_another_architecture_is_named_in_one_line(finished, tmp_path):
    ckpt = finished / "checkpoints" / "step_00000008.pt"
    out = run_train(tmp_path / "ft", "model=pace_vit_test", f"model.pretrained={ckpt}", full_errors=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert str(ckpt) in line and "pace_vit_test" in line, line
    assert not (tmp_path / "ft").exists()  # nothing of a run was written


def _hydra(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra


def test_debug_runs_and_sweep_jobs_get_directories_of_their_own():
    assert _hydra("experiment=quickstart", "debug=default").run.dir == "runs/debug/quickstart"
    assert _hydra("experiment=quickstart").run.dir == "runs/quickstart"
    sweep = OmegaConf.to_container(_hydra("experiment=quickstart").sweep, resolve=False)
    # Named by the job's overrides, not its number: a second sweep of the same name gets new directories.
    assert sweep["subdir"] == "${hydra.job.override_dirname}"
