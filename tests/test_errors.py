"""User errors print one line naming the problem, without a traceback, exit 2 (usage) or 1, and leave no run
directory behind; a full disk while writing a checkpoint says so with the path, on stderr and in train.log."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, make_tiny_shards, run_train, train_env

from pace.errors import RunError, describe, did_you_mean, schema_keys
from pace.train.checkpoint import CheckpointManager, load_checkpoint
from pace.train.config import TrainConfig


def _error_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "Error executing job" not in out.stderr, out.stderr[-3000:]  # Hydra's own line: ours is the only one
    return out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("override", "code", "expected"),
    [
        ("optim.lrr=0.1", 2, "unknown config key optim.lrr (did you mean optim.lr?)"),
        ("trainer.precision=fp8", 2, "trainer.precision='fp8'"),
        ("data.source=webdataset data.root=/nonexistent/shards", 1, "/nonexistent/shards"),
        (
            "model.name=pace_vit_smal_patch16_224",
            2,
            "model.name='pace_vit_smal_patch16_224' is invalid: expected a timm model name (did you mean "
            "pace_vit_small_patch16_224",
        ),
        # Each case starts a process (seconds each): the rest run with -m slow.
        pytest.param("+trainer.epochz=3", 2, "trainer.epochz (did you mean sched.epochs?)", marks=pytest.mark.slow),
        pytest.param("trainer.lr=0.1", 2, "did you mean optim.lr?", marks=pytest.mark.slow),
        pytest.param("data.batch_size=big", 2, "data.batch_size", marks=pytest.mark.slow),
        pytest.param("model=nonexistent", 2, "Could not find 'model/nonexistent'", marks=pytest.mark.slow),
        pytest.param(
            "model.pretrained=/nonexistent/ckpt.pt",
            1,
            "model.pretrained='/nonexistent/ckpt.pt'",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_user_error_is_one_line_with_its_exit_code_and_leaves_nothing(tmp_path: Path, override, code, expected):
    run_dir = tmp_path / "runs" / "debug" / "run"  # Hydra creates the missing parents too
    out = run_train(run_dir, *override.split(), full_errors=False)
    assert out.returncode == code, out.stderr[-3000:]
    line = _error_line(out)
    assert line.startswith("pace-train: error: ") and expected in line, line
    assert list(tmp_path.iterdir()) == []  # no .hydra, no train.log, no run dir, no runs/debug/ left empty


def test_a_run_dir_that_is_a_file_is_one_line_naming_it(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory")
    out = run_train(run_dir, full_errors=False)
    assert out.returncode == 1, out.stderr[-3000:]
    line = _error_line(out)
    assert (
        line == f"pace-train: error: {run_dir} is a file where a directory is needed: remove it or choose another path"
    )
    assert run_dir.read_text() == "not a directory"


def test_path_errors_say_which_path_and_why(tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(FileExistsError) as exists:
        afile.mkdir(parents=True, exist_ok=True)
    assert describe(exists.value) == (
        f"{afile} is a file where a directory is needed: remove it or choose another path",
        1,
    )
    with pytest.raises(NotADirectoryError) as below_a_file:
        (afile / "runs" / "x").mkdir(parents=True, exist_ok=True)
    message = f"cannot create {afile / 'runs' / 'x'}: {afile} is a file where a directory is needed"
    assert describe(below_a_file.value) == (message, 1)
    denied = PermissionError(errno.EACCES, "Permission denied", "/root/runs")
    assert describe(denied) == ("Permission denied: /root/runs", 1)
    # A message of our own is kept as written.
    assert describe(FileNotFoundError("trainer.resume='x.pt': no checkpoint at x.pt")) == (
        "trainer.resume='x.pt': no checkpoint at x.pt",
        1,
    )


def test_suggestions_come_from_the_schema():
    keys = schema_keys(TrainConfig)
    assert "optim.lr" in keys and "trainer.ema_decay" in keys
    assert did_you_mean("optim.weight_decy", keys) == " (did you mean optim.weight_decay?)"
    assert did_you_mean("zzz.qqq", keys) == ""


def test_disk_full_on_a_checkpoint_names_the_path_and_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1}, step=1)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunError) as err:
        manager.save({"step": 2}, step=2)
    assert str(err.value).startswith(f"no space left on device writing {tmp_path / 'step_00000002.pt'}")
    assert "step_00000001.pt" in str(err.value) and "is intact" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]  # no partial file left
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "step_00000001.pt") == {"step": 1}


# The training CLI with torch.save failing as a full disk does from its second checkpoint on.
_FULL_DISK_RUN = """
import errno, sys, torch
calls = []
real_save = torch.save
def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) >= 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from pace.train.main import main
sys.argv = ["pace-train", *sys.argv[1:]]
main()
"""


def test_disk_full_during_training_is_one_line_on_stderr_and_in_train_log(tmp_path: Path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", _FULL_DISK_RUN, f"hydra.run.dir={run_dir}", "debug=cpu", "model=vit_test"]
    cmd += ["trainer.progress_bar=false", "logger=none"]
    out = subprocess.run(cmd, env=train_env(full_errors=False), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1, out.stderr[-3000:]
    line = _error_line(out)
    expected = f"no space left on device writing {run_dir / 'checkpoints' / 'step_00000004.pt'}"
    assert line.startswith(f"pace-train: error: {expected}"), line
    assert expected in (run_dir / "train.log").read_text()
    assert load_checkpoint(run_dir / "checkpoints" / "step_00000002.pt")["trainer"]["step"] == 2


def test_class_count_of_the_data_is_checked_before_the_first_step(tmp_path: Path):
    shards = make_tiny_shards(tmp_path / "shards")  # 10 classes
    run_dir = tmp_path / "run"
    out = run_train(run_dir, "model=pace_vit_test", *shards, "data.num_classes=20", full_errors=False)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out)
    assert f"{tmp_path / 'shards' / '_info.json'} lists 10 classes, but model.num_classes=20" in line, line
    assert "set data.num_classes=10" in line
    assert not (run_dir / "metrics.jsonl").exists()


def test_imagenet_real_on_other_data_is_refused_at_start_up_with_a_hint(tmp_path: Path):
    shards = make_tiny_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    out = run_train(run_dir, "model=pace_vit_test", *shards, "eval=imagenet", full_errors=False)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _error_line(out)
    assert "eval.imagenet scores ImageNet-ReaL labels" in line and "use eval=default" in line, line
    assert "'val_000000'" in line or "keys like 'val_" in line, line
    assert not (run_dir / "metrics.jsonl").exists()


def test_pace_eval_user_error_is_one_line_and_leaves_no_output_directory(tmp_path: Path):
    # The default output dir, runs/eval/<name>: `runs/` exists (and stays, empty), `runs/eval/` is created.
    (tmp_path / "runs").mkdir()
    cmd = [sys.executable, "-m", "pace.eval.main", "model.checkpoint=/nonexistent/ckpt.pt", f"data.root={tmp_path}"]
    env = train_env(full_errors=False)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    line = _error_line(out)
    assert line == "pace-eval: error: checkpoint /nonexistent/ckpt.pt does not exist", line
    # no .hydra, no main.log, no runs/eval/<name>, no empty runs/eval/; the user's runs/ is kept
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("runs")]


def test_pace_eval_unknown_model_name_is_one_line_before_any_work(tmp_path: Path):
    cmd = [sys.executable, "-m", "pace.eval.main", "model.name=no_such_model", f"data.root={tmp_path}"]
    out = subprocess.run(
        cmd, cwd=tmp_path, env=train_env(full_errors=False), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1, out.stderr[-3000:]  # pace-eval's code for a config value (as model.weights)
    line = _error_line(out)
    assert line == "pace-eval: error: config key model.name='no_such_model' is invalid: expected a timm model name", (
        line
    )
    assert list(tmp_path.iterdir()) == []  # no runs/, no .hydra, no main.log
