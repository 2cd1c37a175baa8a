"""A failed start removes its output directory and the parents it created, never a directory that existed."""

from __future__ import annotations

from pathlib import Path

from pace.failed_start import discard_failed_start, remember_new_directories


def _start(run_dir: Path) -> None:
    # What Hydra does before the task runs: create the output directory and open the log in it.
    remember_new_directories(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text("[INFO] starting\n")


def test_the_parents_a_failed_start_created_are_removed(tmp_path: Path):
    run_dir = tmp_path / "runs" / "debug" / "x"
    _start(run_dir)
    discard_failed_start(run_dir)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_parent_that_existed_is_kept(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    run_dir = tmp_path / "runs" / "eval" / "x"
    _start(run_dir)
    discard_failed_start(run_dir)
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("runs")]


def test_a_parent_that_another_run_filled_meanwhile_is_kept(tmp_path: Path):
    run_dir = tmp_path / "runs" / "x"
    _start(run_dir)
    (tmp_path / "runs" / "y").mkdir()  # another job's run, started after this one created runs/
    discard_failed_start(run_dir)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("runs"), Path("runs/y")]


def test_a_run_dir_holding_more_than_the_log_is_kept_with_its_parents(tmp_path: Path):
    run_dir = tmp_path / "runs" / "x"
    _start(run_dir)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    discard_failed_start(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "train.log"]


def test_a_failed_sweep_takes_its_sweep_record_along(tmp_path: Path):
    # `pace-train -m ...` whose first job fails at start: Hydra created the sweep directory and wrote multirun.yaml.
    sweep = tmp_path / "multirun" / "s"
    remember_new_directories(sweep)
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    run_dir = sweep / "0"
    _start(run_dir)
    discard_failed_start(run_dir)
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_with_a_finished_job_keeps_its_record(tmp_path: Path):
    sweep = tmp_path / "s"
    remember_new_directories(sweep)
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "0").mkdir()  # the first job's results
    _start(sweep / "1")
    discard_failed_start(sweep / "1")
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml"]
