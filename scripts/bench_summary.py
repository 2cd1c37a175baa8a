"""The short table at the end of scripts/gpu_check.sh: the issue's GPU targets, read back from the results folder.

Reads what the check's steps wrote (bench_layer/, bench_model*/, profile_*/, the numerics lines of gpu_check.log,
steps.tsv) and prints one line per target; a missing result prints as ``missing`` (its step failed or timed out).

    python scripts/bench_summary.py outputs/gpu_check
"""

import csv
import json
import re
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "missing" if value is None else f"{value:.{digits}f}"


def layer_lines(results: Path) -> list[tuple[str, str, str]]:
    """One PACE block ÷ timm softmax Block per token count, and the fused path's gain over the separate one."""
    rows = _rows(results / "bench_layer" / "results.csv")
    lines = []
    for tokens, target in (("196", "1.5"), ("4096", "4"), ("16384", "10")):
        at = {r["candidate"]: float(r["wall_ms"]) for r in rows if r.get("part") == "scaling" and r["tokens"] == tokens}
        pace = at.get("pace_full")
        ratio = at["softmax_block"] / pace if pace and "softmax_block" in at else None
        gain = at["pace_full_unfused"] / pace if pace and "pace_full_unfused" in at else None
        lines.append((f"block speed vs softmax Block, {tokens} tokens", _fmt(ratio), f">= {target}"))
        lines.append((f"  fused over separate path, {tokens} tokens", _fmt(gain), "> 1"))
    return lines


def model_lines(results: Path) -> list[tuple[str, str, str]]:
    """Training and inference throughput ÷ DeiT, per compilation, from every bench_model* folder."""
    lines = []
    for folder in sorted(results.glob("bench_model*")):
        for r in _rows(folder / "results.csv"):
            if r["model"] == r["baseline"] or not r["model"].startswith("pace"):
                continue
            how = r.get("compile_mode") or ("compiled" if r["compiled"] == "True" else "eager")
            label = f"{r['model'].removeprefix('pace_vit_')} {r['mode']} {how} ÷ {r['baseline']}"
            lines.append((label, _fmt(float(r["throughput_vs_baseline"])), ">= 1.5"))
    return lines or [("model benchmark", "missing", ">= 1.5")]


def profile_lines(results: Path) -> list[tuple[str, str, str]]:
    pace, deit = _json(results / "profile_pace" / "summary.json"), _json(results / "profile_deit" / "summary.json")
    share = pace.get("gpu_busy_share")
    kernels = pace.get("kernels_per_step")
    ratio = kernels / deit["kernels_per_step"] if kernels and deit.get("kernels_per_step") else None
    return [
        ("PACE-ViT-S GPU busy share", _fmt(share), ">= 0.85"),
        ("PACE-ViT-S kernels per step", _fmt(kernels, 0), ""),
        ("  ÷ DeiT-S kernels per step", _fmt(ratio), "<= 1.2"),
    ]


def numerics_lines(results: Path) -> list[tuple[str, str, str]]:
    """Worst error per precision over the numerics test's lines (seeds, forms, paths)."""
    log = results / "gpu_check.log"
    worst: dict[str, float] = {}
    pattern = re.compile(r"^numerics .*? (fp32|bf16): (.*)$")
    for line in log.read_text().splitlines() if log.is_file() else []:
        match = pattern.match(line)
        if match:
            values = [float(v) for v in re.findall(r" ([0-9.]+e[-+][0-9]+)", " " + match.group(2))]
            worst[match.group(1)] = max(worst.get(match.group(1), 0.0), *values)
    return [
        ("numerics fp32, worst relative error", _fmt(worst.get("fp32"), 6), "<= 1e-4"),
        ("numerics bf16, worst relative error", _fmt(worst.get("bf16"), 4), "<= 2e-2"),
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        raise SystemExit(f"usage: bench_summary.py RESULTS_DIR (got {argv})")
    results = Path(argv[0])
    lines = layer_lines(results) + model_lines(results) + profile_lines(results) + numerics_lines(results)
    width = max(len(label) for label, _, _ in lines)
    print(f"{'measure':<{width}}  {'value':>9}  target")
    for label, value, target in lines:
        print(f"{label:<{width}}  {value:>9}  {target}")


if __name__ == "__main__":
    main()
