"""Results of an evaluation: the results JSON, the printed table, and the optional wandb run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def format_table(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width table of every metric with the number of samples behind it.

    Args:
        sections: evaluator name -> `{"metrics": {...}, "counts": {...}}` (as in the results JSON).
    """
    rows = [("evaluator", "metric", "value", "samples")]
    for name, section in sections.items():
        metrics = section["metrics"]
        for metric, value in metrics.items():
            if metric.endswith("/loss") and metric[: -len("loss")] + "nll" in metrics:
                continue  # the same number as the NLL row
            rows.append((name, metric, f"{value:.3f}", str(section["counts"].get(metric, ""))))
        excluded = {k: v for k, v in section["counts"].items() if k.endswith("/excluded") and v}
        for key, value in excluded.items():
            rows.append((name, key, "", str(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_results(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write the results JSON atomically (a reader never sees half a file); non-finite floats become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def log_wandb(
    record: Mapping[str, Any],
    *,
    mode: str,
    project: str,
    entity: str | None,
    tags: list[str],
    directory: str | Path,
) -> None:
    """Log the flat metrics (and counts) of a results record as one wandb run of job type `eval`.

    Args:
        record: the results JSON content.
        mode: wandb mode (`offline` writes locally; sync later with `wandb sync`).
        project: wandb project.
        entity: wandb entity.
        tags: run tags.
        directory: where wandb writes its files.
    """
    import wandb

    flat = {}
    for name, section in record["evaluators"].items():
        flat.update({f"{name}/{k}": v for k, v in section["metrics"].items()})
        flat.update({f"{name}/count/{k}": v for k, v in section["counts"].items()})
    run = wandb.init(
        mode=mode,
        project=project,
        entity=entity,
        tags=tags,
        dir=str(directory),
        job_type="eval",
        name=f"eval-{record['model']['name']}",
        config=_jsonable({"model": record["model"], "transform": record["transform"], "config": record["config"]}),
    )
    try:
        run.log(flat)
        run.summary.update(flat)
    finally:
        run.finish()
