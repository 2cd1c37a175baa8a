"""Scoring by key: ImageNet-ReaL on all 50,000 val keys against independent computations, empty-set exclusion,
counts, repeated keys, and the errors for keys and class counts."""

import random

import numpy as np
import pytest
import torch
from eval_helpers import N_VAL, LookupModel, keyed_batches, real_json, synthetic_val_logits
from timm.data import RealLabelsImagenet

from pace.eval import LabelSets, evaluate, predict
from pace.eval.predictions import Predictions, canonicalise
from pace.eval.scoring import score_label_sets, score_predictions, score_targets


@pytest.fixture(scope="module")
def val_setup():
    real = real_json()
    logits, targets = synthetic_val_logits(real)
    return real, logits, targets


def independent_scores(real, logits, targets):
    """ReaL and original-label top-1/top-5 counts from the JSON with numpy, sharing no code with pace.eval."""
    scores = logits.numpy()
    top1 = scores.argmax(axis=1)
    top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    real_n = real_c1 = real_c5 = 0
    for i, labels in enumerate(real):
        if labels:
            real_n += 1
            real_c1 += int(top1[i] in labels)
            real_c5 += int(any(c in labels for c in top5[i]))
    t = targets.numpy()
    return {
        "real/top1": real_c1,
        "real/top5": real_c5,
        "real/count": real_n,
        "val/top1": int((top1 == t).sum()),
        "val/top5": int((top5 == t[:, None]).any(axis=1).sum()),
    }


def assert_matches(result_counts, expected):
    assert result_counts["real/top1_correct"] == expected["real/top1"]
    assert result_counts["real/top5_correct"] == expected["real/top5"]
    assert result_counts["real/top1"] == expected["real/count"]
    assert result_counts["val/top1_correct"] == expected["val/top1"]
    assert result_counts["val/top5_correct"] == expected["val/top5"]


def test_real_labels_shipped_by_timm_have_the_documented_shape():
    sets = LabelSets.imagenet_real()
    assert len(sets) == N_VAL
    assert sum(1 for s in sets.sets.values() if not s) == 3163
    assert sets.lookup("ILSVRC2012_val_00000002") == frozenset({970, 795})
    assert sets.lookup("ILSVRC2012_val_00000001") == frozenset()


def test_real_top1_on_all_val_keys_equals_json_and_timm(val_setup):
    real, logits, targets = val_setup
    expected = independent_scores(real, logits, targets)
    # The synthetic logits hit ReaL top-1 on about a third of the labelled images and top-5 on two thirds.
    assert 0.3 < expected["real/top1"] / expected["real/count"] < 0.37
    assert 0.63 < expected["real/top5"] / expected["real/count"] < 0.7

    order = list(range(N_VAL))
    result = evaluate(
        LookupModel(logits),
        keyed_batches(order, targets, 1000),
        device="cpu",
        label_sets={"real": LabelSets.imagenet_real()},
    )
    assert_matches(result.counts, expected)
    assert result.counts["samples"] == N_VAL
    assert result.counts["real/excluded"] == 3163
    assert result.counts["real/top1"] == N_VAL - 3163
    assert result.metrics["real/top1"] == 100.0 * expected["real/top1"] / expected["real/count"]

    # timm's evaluator fed in validation-file order.
    timm_real = RealLabelsImagenet([f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(N_VAL)], topk=(1, 5))
    for start in range(0, N_VAL, 1000):
        timm_real.add_result(logits[start : start + 1000])
    assert sum(timm_real.is_correct[1]) == result.counts["real/top1_correct"]
    assert sum(timm_real.is_correct[5]) == result.counts["real/top5_correct"]
    assert len(timm_real.is_correct[1]) == result.counts["real/top1"]
    assert result.metrics["real/top1"] == pytest.approx(timm_real.get_accuracy(1), rel=1e-12)
    assert result.metrics["real/top5"] == pytest.approx(timm_real.get_accuracy(5), rel=1e-12)


def test_real_is_independent_of_order_and_split_over_ranks(val_setup):
    real, logits, targets = val_setup
    expected = independent_scores(real, logits, targets)
    order = list(range(N_VAL))
    random.Random(1).shuffle(order)
    # Three "ranks" with unequal shares, each producing its predictions in its own shuffled order.
    bounds = [0, 17_001, 33_333, N_VAL]
    parts = []
    for r in range(3):
        share = order[bounds[r] : bounds[r + 1]]
        preds, _ = predict(LookupModel(logits), keyed_batches(share, targets, 999), device="cpu")
        parts.append(preds)
    merged, dropped = canonicalise(Predictions.concat(parts[::-1]))
    assert dropped == 0
    assert merged.keys == sorted(f"ILSVRC2012_val_{i + 1:08d}" for i in range(N_VAL))
    _, counts = score_predictions(merged, label_sets={"real": LabelSets.imagenet_real()})
    assert_matches(counts, expected)


def _preds(keys, topk, targets=None, num_classes=10):
    topk = torch.tensor(topk)
    n = len(keys)
    targets = torch.tensor(targets) if targets is not None else torch.full((n,), -1)
    return Predictions(list(keys), topk, targets, torch.zeros(n), num_classes)


def test_empty_sets_are_excluded_and_counted():
    sets = LabelSets({"a": [1], "b": [], "c": [2, 3], "d": []}, name="toy")
    preds = _preds(["a", "b", "c", "d"], [[1, 0], [1, 0], [0, 3], [2, 2]])
    score = score_label_sets(preds, sets, topk=(1, 2))
    assert (score.count, score.excluded) == (2, 2)
    assert score.correct == {1: 1, 2: 2}
    assert score.metrics() == {"top1": 50.0, "top2": 100.0}
    assert score.counts()["top1"] == 2


def test_unlabelled_samples_are_excluded_from_target_metrics():
    preds = _preds(["a", "b", "c"], [[1, 2], [3, 4], [5, 6]], targets=[1, -1, 6])
    preds.loss = torch.tensor([0.5, float("nan"), 1.5])
    score = score_targets(preds, topk=(1, 2))
    assert (score.count, score.excluded) == (2, 1)
    assert score.correct == {1: 1, 2: 2}
    assert score.metrics()["loss"] == 1.0


def test_real_rejects_keys_that_are_not_val_stems():
    sets = LabelSets.imagenet_real()
    for bad in ["ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000001", "ILSVRC2012_val_00050001", "img_1"]:
        preds = _preds(["ILSVRC2012_val_00000002", bad], [[1], [1]], num_classes=1000)
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            score_label_sets(preds, sets, topk=(1,))


def test_key_without_an_entry_is_named():
    sets = LabelSets({"a": [1]}, name="toy", source="toy.json")
    with pytest.raises(KeyError, match="'zz'.*toy"):
        score_label_sets(_preds(["a", "zz"], [[1], [1]]), sets, topk=(1,))


def test_class_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="class-count mismatch.*class 999.*10 logits"):
        score_label_sets(_preds(["ILSVRC2012_val_00000002"], [[1]]), LabelSets.imagenet_real(), topk=(1,))
    with pytest.raises(ValueError, match="class-count mismatch.*'b' has label 12.*10 logits"):
        score_targets(_preds(["a", "b"], [[1], [1]], targets=[1, 12]), topk=(1,))


def test_repeated_keys_are_an_error_or_dropped_when_partial(caplog):
    preds = _preds(["b", "a", "b", "c", "a"], [[1], [2], [1], [3], [2]])
    with pytest.raises(ValueError, match=r"2 samples repeat.*a \(x2\), b \(x2\)"):
        canonicalise(preds)
    unique, dropped = canonicalise(preds, allow_partial=True)
    assert dropped == 2
    assert unique.keys == ["a", "b", "c"]
    assert unique.topk.flatten().tolist() == [2, 1, 3]
    assert "keeping the first occurrence" in caplog.text
