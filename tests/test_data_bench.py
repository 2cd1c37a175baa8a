"""The data benchmark's smoke mode runs both pipelines and prints their rates and ratio."""

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
