"""The benchmark scripts: they run in --quick mode and report (their speed is not tested), and their helpers
measure what they claim to."""

import csv
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from reference_pace import dense_compress, dense_expand

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

from _bench_utils import peak_memory_bytes, saved_tensor_bytes  # noqa: E402
from _reference_block import ReferenceBlock  # noqa: E402

from pace.layers import PACEAttention, PACEBlock  # noqa: E402


def _run(script: str, out: Path, *extra: str, quick: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *(["--quick"] if quick else []), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_bench_layer_quick_reports_every_candidate(tmp_path):
    proc = _run("bench_layer.py", tmp_path)
    rows = _rows(tmp_path)
    reference = [r for r in rows if r["part"] == "reference"]
    assert {(r["form"], r["candidate"]) for r in reference} == {
        (form, name) for form in ("full", "diag") for name in ("pace", "reference")
    }
    for row in reference:
        assert float(row["wall_ms"]) > 0 and float(row["matmul_gflop"]) > 0
        if row["candidate"] == "reference":
            # The two formulations computed the same outputs and gradients.
            assert float(row["max_rel_diff_output"]) < 1e-5 and float(row["max_rel_diff_grad_U"]) < 1e-3
    scaling = [r for r in rows if r["part"] == "scaling"]
    candidates = {"pace_full", "pace_diag", "softmax_block", "softmax_attn", "tost_attn"}
    assert {(r["tokens"], r["candidate"]) for r in scaling} == {(n, c) for n in ("64", "256") for c in candidates}
    assert all(float(r["peak_mib"]) > 0 and float(r["saved_mib"]) > 0 for r in scaling)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["machine"]["cpu_cores"] == os.cpu_count() and "torch" in summary["machine"]
    assert {"reference_over_pace_full", "reference_over_pace_diag"} <= set(summary["targets"])
    report = (tmp_path / "report.md").read_text()
    assert "## Against the reference formulation" in report and "## Token scaling" in report
    assert "faster" in proc.stdout


def test_bench_model_checks_compiled_training_gradients_against_eager(tmp_path):
    _run("bench_model.py", tmp_path, "--compile", "compiled", "--compile-modes", "train", "--compile-sizes", "64",
         "--modes", "train", "--regional", "--compile-backend", "aot_eager")  # fmt: skip
    rows = _rows(tmp_path)
    assert {r["model"] for r in rows} == {"pace_vit_test", "test_vit"}
    # aot_eager runs eager's ops: the same gradients up to summation order.
    assert all(0 <= float(r["grad_disagreement"]) < 1e-5 for r in rows), rows
    targets = json.loads((tmp_path / "summary.json").read_text())["targets"]
    checks = {k: v for k, v in targets.items() if k.startswith("gradients_")}
    assert len(checks) == 2 and all(v["holds"] for v in checks.values()), targets


def test_gradient_disagreement_flags_a_graph_that_drops_a_gradient():
    import bench_model

    g = [torch.randn(3, 4), torch.randn(5)]
    assert bench_model.gradient_disagreement(g, [t.clone() for t in g]) == 0
    assert bench_model.gradient_disagreement(g, [g[0], torch.zeros(5)]) == pytest.approx(1.0)
    assert bench_model.gradient_disagreement(g, [g[0] * 1.01, g[1]]) == pytest.approx(0.01, rel=1e-3)


def test_bench_model_quick_reports_both_models(tmp_path):
    _run("bench_model.py", tmp_path)
    rows = _rows(tmp_path)
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("pace_vit_test", "test_vit") for mode in ("train", "infer")
    }
    for row in rows:
        assert float(row["images_per_s"]) > 0 and float(row["gflop_per_image"]) > 0
        assert float(row["images_per_s"]) == pytest.approx(int(row["batch"]) / (float(row["step_ms"]) / 1e3))
    ours = {r["mode"]: r for r in rows if r["model"] == "pace_vit_test"}
    base = {r["mode"]: r for r in rows if r["model"] == "test_vit"}
    for mode in ("train", "infer"):
        expected = float(ours[mode]["images_per_s"]) / float(base[mode]["images_per_s"])
        assert float(ours[mode]["throughput_vs_baseline"]) == pytest.approx(expected)
    assert (tmp_path / "report.md").read_text().startswith("# Model throughput")


@pytest.mark.parametrize("form", ["full", "diag"])
def test_reference_formulation_computes_the_dense_oracle(form):
    # The benchmark's baseline must be the same function: check it against the float64 oracle.
    dim, heads, rank, n = 32, 4, 4, 48
    block = PACEBlock(dim, heads, attn_layer=partial(PACEAttention, rank=rank, compress_form=form, coeff_init=0.3))
    x = torch.randn(2, n, dim)
    block(x)  # draws and stores the sketches the reference copies
    reference = ReferenceBlock(block)
    with torch.no_grad():
        h = block.norm(x).double()
        attn = block.attn
        expected = (
            x.double()
            + 0.3 * dense_expand(h, attn.expand.sketch, eps=0.01, exact=False)
            - 0.3
            * dense_compress(
                h, attn.compress.subspaces, 1.0, attn.compress.sketch, num_heads=heads, eps=0.01, exact=False, form=form
            )[0]
        )
        torch.testing.assert_close(reference(x).double(), expected, rtol=1e-4, atol=1e-4)


def test_peak_memory_counts_a_temporary_that_is_freed():
    size = 4 * 2**20  # bytes

    def work():
        t = torch.ones(size // 4)
        return float(t[0])  # t is freed on return: only the peak remembers it

    peak = peak_memory_bytes(work, torch.device("cpu"))
    assert size <= peak < size + 2**20


def test_saved_tensor_bytes_counts_distinct_storages():
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)
    # a * b saves both inputs; a * a saves one storage twice.
    assert saved_tensor_bytes(lambda: a * b) == 2 * 4000
    assert saved_tensor_bytes(lambda: a * a) == 4000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("script", ["bench_layer.py", "bench_model.py"])
def test_benchmarks_run_on_cuda_with_bf16_and_report_gpu_memory(script, tmp_path):
    _run(script, tmp_path, "--device", "cuda")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["machine"]["gpu"]
    rows = _rows(tmp_path)
    key = "peak_mib" if script == "bench_model.py" else "saved_mib"
    assert rows and all(float(r[key]) > 0 for r in rows if r.get(key))


def test_profile_step_writes_the_operator_table_and_the_step_time(tmp_path):
    model = ["--model", "pace_vit_test", "--img-size", "32", "--num-classes", "10", "--threads", "1"]
    _run(
        "profile_step.py",
        tmp_path,
        *model,
        "--batch",
        "2",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--row-limit",
        "1000",
        quick=False,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "pace_vit_test" and summary["wall_ms_per_step"] > 0
    # The PACE layer's own operators show up in the profile of a PACE-ViT step.
    assert "aten::linalg_cholesky_ex" in (tmp_path / "profile.txt").read_text()
