"""k-NN on frozen features (DINO's weighted vote) against a brute-force float64 computation: the vote itself, and
pace-eval's k-NN evaluator on generated image folders with features computed here one image at a time."""

import math

import numpy as np
import pytest
import torch
from eval_helpers import biased_checkpoint, compose_eval, reference_outputs
from PIL import Image

from pace.eval.knn import knn_votes


def brute_force_knn(train, labels, queries, num_classes, k=20, temperature=0.07):
    """Votes by explicit loops in float64: cosine similarity to every training sample, the k largest vote."""

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    train = [unit(v) for v in train]
    out = []
    for q in queries:
        q = unit(q)
        sims = sorted(((sum(a * b for a, b in zip(q, t)), i) for i, t in enumerate(train)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for sim, i in sims:
            votes[labels[i]] += math.exp(sim / temperature)
        out.append(votes)
    return out


def test_weighted_votes_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(57, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (57,), generator=gen)
    queries = train[:13] + 0.3 * torch.randn(13, 16, generator=gen, dtype=torch.float64)
    expected = brute_force_knn(train.tolist(), labels.tolist(), queries.tolist(), 6)
    unit = torch.nn.functional.normalize
    got = knn_votes(unit(train.float(), dim=1), labels, unit(queries.float(), dim=1), num_classes=6, chunk=5)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=0)
    assert got.argmax(dim=1).tolist() == [max(range(6), key=v.__getitem__) for v in expected]
    # k larger than the memory bank: every training sample votes.
    few = knn_votes(unit(train[:4].float(), dim=1), labels[:4], unit(queries.float(), dim=1), num_classes=6, k=20)
    expected_few = brute_force_knn(train[:4].tolist(), labels[:4].tolist(), queries.tolist(), 6, 4)
    torch.testing.assert_close(few.double(), torch.tensor(expected_few, dtype=torch.float64), rtol=1e-4, atol=0)


def write_split(root, classes, per_class, seed):
    """Class folders of noisy images whose mean colour depends on the class, so features cluster by class."""
    rng = np.random.default_rng(seed)
    files = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.array([100 + 12 * c, 120 - 8 * c, 110 + 4 * c], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 70, (36, 36, 3)), 0, 255).astype(np.uint8)
            key = f"{name}_{seed}_{i}"
            Image.fromarray(pixels).save(root / name / f"{key}.png")
            files[key] = (root / name / f"{key}.png", c)
    return files


def test_knn_evaluator_equals_brute_force_on_the_model_features(tmp_path):
    from pace.eval.main import run

    classes = ["c0", "c1", "c2", "c3"]
    train = write_split(tmp_path / "train", classes, 7, seed=1)
    val = write_split(tmp_path / "val", classes, 4, seed=2)
    ckpt = biased_checkpoint(tmp_path / "ckpt.pt", [0])
    args = [
        f"model.checkpoint={ckpt}",
        "eval=knn",
        f"data.root={tmp_path}",
        f"eval.knn.path={tmp_path / 'val'}",
        f"eval.knn.knn_train_path={tmp_path / 'train'}",
        "transform.input_size=32",
        "transform.crop_pct=1.0",
        "data.batch_size=5",
        "data.num_workers=0",
        "device=cpu",
        f"output_dir={tmp_path / 'out'}",
        # The tiny model's pooled features are nearly collinear (cosine ≈ 0.9995), so with k below the bank size
        # float32 rounding that depends on the batch (the evaluator runs batches of 5, the reference one image at a
        # time) can swap the k-th and (k+1)-th neighbours. With the whole bank voting no such boundary exists; the
        # top-k selection itself is checked against the brute force above, on float64 features.
        "eval.knn.knn_k=28",
    ]
    record = run(compose_eval(args))
    section = record["evaluators"]["knn"]
    feats = reference_outputs(ckpt, {k: p for k, (p, _) in {**train, **val}.items()}, size=32, crop_pct=1.0)
    train_keys, val_keys = sorted(train), sorted(val)
    votes = brute_force_knn(
        [feats[k][1].double().tolist() for k in train_keys],
        [train[k][1] for k in train_keys],
        [feats[k][1].double().tolist() for k in val_keys],
        len(classes),
        k=28,
    )
    ranked = [sorted(range(len(classes)), key=lambda c: -v[c]) for v in votes]
    # Every decision is far from a tie at float32 feature precision, so the counts must agree exactly.
    assert min((v[r[0]] - v[r[1]]) / v[r[0]] for v, r in zip(votes, ranked)) > 1e-5
    top1 = sum(r[0] == val[k][1] for r, k in zip(ranked, val_keys))
    assert section["counts"]["knn/top1_correct"] == top1
    assert section["counts"]["samples"] == 16 and section["counts"]["memory_bank"] == 28
    assert section["metrics"]["knn/top1"] == pytest.approx(100 * top1 / 16)
    assert 0 < top1 < 16  # not trivially all right or all wrong
    assert "knn/nll" not in section["metrics"] and "knn/ece" not in section["metrics"]


def test_knn_needs_its_memory_bank(tmp_path):
    from pace.eval.config import validate

    cfg = compose_eval(
        [
            "model.name=pace_vit_test",
            "eval=knn",
            "data.root=/data",
            "eval.knn.knn_train_path=null",
            f"output_dir={tmp_path}",
        ]
    )
    with pytest.raises(ValueError, match="knn_train_path=None"):
        validate(cfg)
