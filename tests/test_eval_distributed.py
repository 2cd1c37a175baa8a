"""Evaluation under torchrun (gloo on CPU): the numbers do not depend on the number of processes.

- ImageNet-ReaL on synthetic logits for all 50,000 val keys, shuffled and split unevenly over 3 ranks, equals an
  independent computation from the JSON.
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
    bounds = [0, 20_011, 31_337, N_VAL]  # unequal shares
    share = order[bounds[env.rank] : bounds[env.rank + 1]]
    result = evaluate(
        LookupModel(logits),
        keyed_batches(share, targets, 997),
        device="cpu",
        label_sets={"real": LabelSets.imagenet_real()},
        expected_samples=N_VAL,
    )
    Path(f"{out}.rank{env.rank}.json").write_text(json.dumps({"metrics": result.metrics, "counts": result.counts}))
    destroy_distributed()


def test_real_on_all_val_keys_over_three_ranks_equals_the_json(tmp_path):
    real = real_json()
    logits, targets = synthetic_val_logits(real)
    torch.save({"logits": logits, "targets": targets}, tmp_path / "table.pt")  # read memory-mapped by the ranks
    torchrun(3, [str(Path(__file__)), str(tmp_path / "table.pt"), str(tmp_path / "out")])
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
    results = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(3)]
    assert results[0] == results[1] == results[2]  # identical on every rank
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


def eval_args(root: Path, out: Path) -> list[str]:
    return [
        f"model.checkpoint={root / 'ckpt.pt'}",
        f"data.root={root / 'val'}",
        f"eval.imagenet.label_file={root / 'labels.txt'}",
        "data.batch_size=4",
        "data.num_workers=0",
        "device=cpu",
        "predictions=true",
        "predictions_logits=true",
        f"hydra.run.dir={out}",  # last: the in-process run replaces it with output_dir
    ]


@pytest.fixture(scope="module")
def one_process(val_folder, tmp_path_factory):
    from pace.eval.main import run

    out = tmp_path_factory.mktemp("one")
    run(compose_eval([*eval_args(val_folder, out)[:-1], f"output_dir={out}"]))
    return out


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_pace_eval_is_identical_for_1_2_3_processes(val_folder, one_process, tmp_path, nproc):
    torchrun(nproc, ["scripts/eval.py", *eval_args(val_folder, tmp_path)])
    single = json.loads((one_process / "results.json").read_text())
    multi = json.loads((tmp_path / "results.json").read_text())
    for section in ("metrics", "counts"):
        assert multi["evaluators"]["imagenet"][section] == single["evaluators"]["imagenet"][section]
    counts = multi["evaluators"]["imagenet"]["counts"]
    assert counts["samples"] == 13 and counts["real/excluded"] == 1  # ILSVRC2012_val_00000001 has no ReaL label
    # The biased head makes some predictions right and some wrong, so equality is not trivially 0 == 0.
    assert 0 < counts["val/top1_correct"] < 13 and 0 < counts["real/top5_correct"] < 12
    assert multi["environment"]["world_size"] == nproc
    # Per-sample predictions: same keys and top-5 for every sample; logits equal up to kernel rounding.
    lines = [
        [json.loads(line) for line in gzip.decompress((d / "predictions_imagenet.jsonl.gz").read_bytes()).splitlines()]
        for d in (one_process, tmp_path)
    ]
    assert [(r["key"], r["topk"]) for r in lines[0]] == [(r["key"], r["topk"]) for r in lines[1]]
    torch.testing.assert_close(
        torch.tensor([r["logits"] for r in lines[1]]), torch.tensor([r["logits"] for r in lines[0]])
    )


if __name__ == "__main__":
    _real_worker(sys.argv[1], sys.argv[2])
