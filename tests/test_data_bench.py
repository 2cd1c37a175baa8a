"""The data benchmark's smoke mode runs both pipelines and prints their rates and ratio, and its step timings."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_data.py"


def test_bench_quick_prints_both_rates_and_ratio(capsys):
    main = runpy.run_path(str(SCRIPT), run_name="bench_data")["main"]
    (row,) = main(["--quick"])
    out = capsys.readouterr().out
    assert "64 images" in out
    assert row["ours"] > 0 and row["imagefolder"] > 0
    assert abs(row["ratio"] - row["ours"] / row["imagefolder"]) < 1e-9
    assert f"ratio {row['ratio']:.2f}" in out and "pace webdataset" in out and "ImageFolder" in out


def test_bench_breakdown_times_each_step(capsys):
    main = runpy.run_path(str(SCRIPT), run_name="bench_data")["main"]
    main(["--quick", "--breakdown"])
    lines = capsys.readouterr().out.split("CPU microseconds per sample", 1)[1].splitlines()[1:]
    steps = dict(line.strip().rsplit(": ", 1) for line in lines if line.strip())
    assert set(steps) == {
        "pace loader, no-op transform",
        "ImageFolder loader, no-op transform",
        "read shards (webdataset tar iteration)",
        "open + read image files",
        "decode JPEG from memory",
        "transform",
    }
    assert all(float(micros) > 0 for micros in steps.values())


def test_stage_profile_times_every_step_and_op_of_a_path(capsys):
    main = runpy.run_path(str(SCRIPT.parent / "profile_data_stages.py"), run_name="profile")["main"]
    results = main(["--num-images", "4", "--batch-size", "4", "--repeats", "1", "--paths", "draft"])
    draft = results["draft"]
    ops = {name: micros for name, micros in draft.items() if name.endswith("per application")}
    assert len(ops) == 15 and all(micros > 0 for micros in draft.values()) and results["tar"]["tar parsing"] > 0
    expected = draft["RandAugment, expected per sample (mean over the ops)"]
    assert abs(expected - sum(ops.values()) / 15) < 1e-6  # each op: chosen 1/15 per layer, 2 layers, applied 1/2
    assert "decode (torchvision, full size)" in draft and "[draft]" in capsys.readouterr().out
