"""Evaluation under torchrun (gloo on CPU): the numbers do not depend on the number of processes.

- ImageNet-ReaL on synthetic logits for all 50,000 val keys, shuffled and split unevenly over 2 (and 3) ranks,
  equals an independent computation from the JSON.
- `pace-eval` on a folder of JPEGs named like ImageNet val files gives the same results JSON and the same
  per-sample predictions with 2 and 3 processes as with one.

Run as a script (by torchrun) this file is the 50,000-key worker.
"""

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from eval_helpers import (  # noqa: E402
    N_VAL,
    LookupModel,
    compose_eval,
    keyed_batches,
    real_json,
    synthetic_val_logits,
    write_val_jpegs,
)


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _real_worker(table: str, out: str) -> None:
    from pace.distributed import destroy_distributed, init_distributed, resolve_dist_env
    from pace.eval import LabelSets, evaluate

    env = resolve_dist_env()
    init_distributed(env, torch.device("cpu"))
    saved = torch.load(table, mmap=True)
    logits, targets = saved["logits"], saved["targets"]
    order = list(range(N_VAL))
    random.Random(7).shuffle(order)
    # Unequal shares: the cut points between ranks are shifted off the even split.
    world = env.world_size
    cuts = [0, *(N_VAL * (r + 1) // world - 997 * (r + 1) for r in range(world - 1)), N_VAL]
    share = order[cuts[env.rank] : cuts[env.rank + 1]]
    result = evaluate(
        LookupModel(logits),
        keyed_batches(share, targets, 997),
        device="cpu",
        label_sets={"real": LabelSets.imagenet_real()},
        expected_samples=N_VAL,
    )
    Path(f"{out}.rank{env.rank}.json").write_text(json.dumps({"metrics": result.metrics, "counts": result.counts}))
    destroy_distributed()


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_real_on_all_val_keys_over_ranks_equals_the_json(tmp_path, nproc):
    real = real_json()
    logits, targets = synthetic_val_logits(real)
    torch.save({"logits": logits, "targets": targets}, tmp_path / "table.pt")  # read memory-mapped by the ranks
    torchrun(nproc, [str(Path(__file__)), str(tmp_path / "table.pt"), str(tmp_path / "out")])
    top1 = logits.argmax(dim=1).tolist()
    top5 = logits.topk(5, dim=1).indices.tolist()
    labelled = [i for i, labels in enumerate(real) if labels]
    expected = {
        "real/top1": len(labelled),
        "real/top1_correct": sum(top1[i] in real[i] for i in labelled),
        "real/top5_correct": sum(any(c in real[i] for c in top5[i]) for i in labelled),
        "real/excluded": N_VAL - len(labelled),
        "val/top1_correct": sum(t == p for t, p in zip(targets.tolist(), top1)),
        "samples": N_VAL,
    }
    results = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(nproc)]
    assert all(r == results[0] for r in results)  # identical on every rank
    assert {k: results[0]["counts"][k] for k in expected} == expected
    assert results[0]["metrics"]["real/top1"] == 100.0 * expected["real/top1_correct"] / len(labelled)


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    """13 JPEGs named like ImageNet val files (shares of 7/6 and 5/4/4), labelled with their first ReaL class, and
    a training checkpoint of `pace_vit_test` whose head favours those classes, so that hits and misses vary."""
    import timm

    import pace  # noqa: F401  (registers the models)

    root = tmp_path_factory.mktemp("imagenet_val")
    keys = list(write_val_jpegs(root / "val", 13))
    real = real_json()
    labels = {k: (real[i] or [7])[0] for i, k in enumerate(keys)}
    (root / "labels.txt").write_text("".join(f"{k}.JPEG {c}\n" for k, c in labels.items()))
    torch.manual_seed(0)
    model = timm.create_model("pace_vit_test")
    with torch.no_grad():
        model.head.bias[sorted(set(labels.values()))] += 3.0
    state = model.state_dict()
    torch.save({"model": state, "model_ema": state, "model_name": "pace_vit_test", "model_args": {}}, root / "ckpt.pt")
    return root


@pytest.fixture(scope="module")
def val_shards(val_folder):
    """The same 13 images as webdataset shards of at most 4 samples (4 shards), written by pace.data."""
    from pace.data import ShardPlan, imagenet_classes, shard_image_folders

    (val_folder / "classes.txt").write_text("\n".join(imagenet_classes()) + "\n")
    shard_image_folders(
        val_folder / "shards",
        {"val": val_folder / "val"},
        labels={"val": val_folder / "labels.txt"},
        classes_file=val_folder / "classes.txt",
        plan=ShardPlan(max_count=4),
    )
    return val_folder / "shards"


def eval_args(root: Path, source: str, workers: int = 0) -> list[str]:
    data = [f"data.root={root / 'val'}", f"eval.imagenet.label_file={root / 'labels.txt'}"]
    if source == "shards":
        data = [f"data.root={root / 'shards'}"]
    return [
        f"model.checkpoint={root / 'ckpt.pt'}",
        *data,
        "data.batch_size=4",
        f"data.num_workers={workers}",
        "device=cpu",
        "predictions=true",
        "predictions_logits=true",
    ]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


def assert_same_results(run_dir: Path, reference: Path) -> dict:
    single = json.loads((reference / "results.json").read_text())["evaluators"]["imagenet"]
    other = json.loads((run_dir / "results.json").read_text())["evaluators"]["imagenet"]
    # Accuracies and counts are exact. The mean loss is computed from logits, and a sample's logits depend on the
    # matrix-kernel path its batch shape selects (ranks see other batch compositions), so it agrees to rounding;
    # so do the NLL and the calibration error, computed from the same logits.
    losses = {k for k in single["metrics"] if k.endswith(("/loss", "/nll", "/ece"))}
    assert {k: v for k, v in other["metrics"].items() if k not in losses} == {
        k: v for k, v in single["metrics"].items() if k not in losses
    }
    assert {k: other["metrics"][k] for k in losses} == pytest.approx(
        {k: single["metrics"][k] for k in losses}, rel=1e-6
    )
    assert other["counts"] == single["counts"]
    # Per-sample predictions: same keys and top-5 for every sample; logits equal up to kernel rounding.
    rows = [read_lines(d / "predictions_imagenet.jsonl.gz") for d in (reference, run_dir)]
    assert [(r["key"], r["topk"], r["target"]) for r in rows[0]] == [
        (r["key"], r["topk"], r["target"]) for r in rows[1]
    ]
    logits = [torch.tensor([r["logits"] for r in lines]) for lines in rows]
    torch.testing.assert_close(logits[1], logits[0])
    return other


@pytest.fixture(scope="module")
def one_process(val_folder, tmp_path_factory):
    """The reference: one process, in this interpreter, on the JPEG folder."""
    from pace.eval.main import run

    out = tmp_path_factory.mktemp("one")
    record = run(compose_eval([*eval_args(val_folder, "folder"), f"output_dir={out}"]))
    counts = record["evaluators"]["imagenet"]["counts"]
    assert counts["samples"] == 13 and counts["real/excluded"] == 1  # ILSVRC2012_val_00000001 has no ReaL label
    # The biased head makes some predictions right and some wrong, so agreement is not trivially 0 == 0.
    assert 0 < counts["val/top1_correct"] < 13 and 0 < counts["real/top5_correct"] < 12
    return out


def test_shards_and_folder_agree_in_one_process(val_folder, val_shards, one_process, tmp_path):
    from pace.eval.main import run

    record = run(compose_eval([*eval_args(val_folder, "shards", workers=2), f"output_dir={tmp_path}"]))
    assert record["evaluators"]["imagenet"]["data"]["description"].startswith("webdataset")
    assert_same_results(tmp_path, one_process)


@pytest.mark.parametrize(
    ("source", "nproc"),
    [
        ("shards", 2),
        ("folder", 2),
        pytest.param("shards", 3, marks=pytest.mark.slow),
        pytest.param("folder", 3, marks=pytest.mark.slow),
    ],
)
def test_pace_eval_is_identical_for_1_2_3_processes(val_folder, val_shards, one_process, tmp_path, source, nproc):
    # Shards: 4 shards over 2 x 2 or 3 x 2 loader workers; the folder: strided shares of 7/6 or 5/4/4 images.
    workers = 2 if source == "shards" else 0
    torchrun(nproc, ["scripts/eval.py", *eval_args(val_folder, source, workers), f"hydra.run.dir={tmp_path}"])
    assert_same_results(tmp_path, one_process)
    assert json.loads((tmp_path / "results.json").read_text())["environment"]["world_size"] == nproc


if __name__ == "__main__":
    _real_worker(sys.argv[1], sys.argv[2])
