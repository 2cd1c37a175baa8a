"""`pace-make-shards` on bad input: one line naming the problem, no traceback, exit 2 for usage errors and 1 for bad
data, nothing left behind, and a rerun after the fix succeeds. A few cases run the real command in a subprocess
(each pays the package's import time); the rest call its `main` in the test process."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from data_helpers import jpeg_bytes, make_image_folder

from pace.data import read_info
from pace.data.make_shards import main

ROOT = Path(__file__).resolve().parents[1]


def _make_shards(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pace.data.make_shards", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`main` in this process, its outcome in the shape of a finished command."""
    with pytest.raises(SystemExit) as caught:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, caught.value.code, captured.out, captured.err)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line; fails when there is a traceback or more than one line of error."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _nothing_left(tmp_path: Path, out: Path, before: set[str]) -> None:
    assert not out.exists()
    assert {p.name for p in tmp_path.iterdir()} == before  # no staging directory, no stray file


def test_usage_errors_name_the_path_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "no_images" / "n01").mkdir(parents=True)
    (tmp_path / "no_images" / "n01" / "readme.txt").write_text("not an image")
    before = {p.name for p in tmp_path.iterdir()}
    cases = [
        (["--split", f"train={tmp_path / 'missing'}"], f"directory not found: {tmp_path / 'missing'}"),
        (["--split", f"train={empty}"], f"{empty} has no class subdirectories"),
        (["--split", f"train={tmp_path / 'no_images'}"], f"class directory {tmp_path / 'no_images' / 'n01'} holds no"),
        (["--split", "train"], "--split expects NAME=PATH, got 'train'"),
    ]
    for i, (args, expected) in enumerate(cases):
        result = (_make_shards if i == 0 else partial(_main, capsys))(str(out), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in _error_line(result), (args, result.stderr)
        _nothing_left(tmp_path, out, before)


def test_a_file_that_is_no_image_is_named_without_pillows_buffer(tmp_path, capsys):
    src = tmp_path / "src"
    files = make_image_folder(src, classes=2, per_class=2)
    bad = sorted(path for _, path in files.values())[0]
    bad.write_bytes(b"plain text, no image")
    result = _main(capsys, str(tmp_path / "out"), "--split", f"train={src}", "--workers", "1")
    assert result.returncode == 1, result.stderr
    line = _error_line(result)
    assert f"cannot read image {bad}: not an image format Pillow reads" in line and "BytesIO" not in line, line


def test_an_unreadable_image_fails_cleanly_and_the_rerun_after_the_fix_succeeds(tmp_path, capsys):
    src = tmp_path / "src"
    files = make_image_folder(src, classes=2, per_class=20)
    bad = sorted(path for _, path in files.values())[-1]  # the last image in file order: shards before it finish
    good = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    out = tmp_path / "out"
    before = {p.name for p in tmp_path.iterdir()}
    for run, workers in [(partial(_main, capsys), "1"), (_make_shards, "2")]:
        args = [str(out), "--split", f"train={src}", "--max-count", "5", "--no-shuffle", "--workers", workers]
        result = run(*args)
        assert result.returncode == 1, result.stderr
        assert f"cannot read image {bad}" in _error_line(result)
        _nothing_left(tmp_path, out, before)
    bad.write_bytes(good)
    result = _main(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert "train: 40 samples in 8 shards" in result.stdout
    info = read_info(out)
    assert info["splits"]["train"]["shard_lengths"] == [5] * 8
    assert sorted(p.name for p in out.iterdir()) == ["_info.json"] + [f"out-train-{i:06d}.tar" for i in range(8)]
    assert {p.name for p in tmp_path.iterdir()} == before | {"out"}


def test_a_non_empty_output_is_refused_and_left_as_it_was(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src, classes=2, per_class=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = _main(capsys, str(out), "--split", f"train={src}")
    assert result.returncode == 2
    assert f"output directory {out} is not empty" in _error_line(result)
    assert sorted(os.listdir(out)) == ["notes.txt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_overwrite_keeps_the_previous_shards(tmp_path, capsys, overwrite):
    src = tmp_path / "src"
    files = make_image_folder(src, classes=2, per_class=6)
    out = tmp_path / "out"
    assert _main(capsys, str(out), "--split", f"train={src}", "--max-count", "4", "--workers", "1").returncode == 0
    shards = {p.name: p.read_bytes() for p in out.iterdir()}
    victim = next(iter(files.values()))[1]
    victim.write_bytes(jpeg_bytes(1)[:50])
    result = _main(capsys, str(out), "--split", f"train={src}", "--max-count", "3", *(["--overwrite"] * overwrite))
    assert result.returncode == (1 if overwrite else 2)
    _error_line(result)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == shards  # the earlier output, byte for byte
    assert not (tmp_path / ".out.partial").exists()
