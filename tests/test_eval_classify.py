"""`evaluate` on a tiny model: numbers against a direct computation, predictions files written, read back and
re-scored (function and command line), partial evaluation, and the errors a bad loader or model gives."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pace.eval import evaluate, read_predictions, rescore
from pace.eval.rescore import main as rescore_cli


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, num_classes)
        self.drop = nn.Dropout(0.5)  # makes train-mode outputs differ from eval-mode ones

    def forward(self, x):
        return self.head(self.drop(self.conv(x).flatten(1)))


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(37, 3, 8, 8, generator=gen)
    targets = torch.randint(0, 10, (37,), generator=gen)
    keys = [f"img_{i:03d}" for i in range(37)]
    return images, targets, keys


def batches(images, targets, keys, size=8):
    return [(images[i : i + size], targets[i : i + size], keys[i : i + size]) for i in range(0, len(keys), size)]


def test_metrics_equal_a_direct_computation_and_mode_is_restored(data):
    images, targets, keys = data
    model = TinyNet().train()
    result = evaluate(model, batches(*data), device="cpu", topk=(1, 3, 5))
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(5, dim=1).indices
    for k in (1, 3, 5):
        correct = int((top5[:, :k] == targets[:, None]).any(dim=1).sum())
        assert result.counts[f"val/top{k}_correct"] == correct
        assert result.metrics[f"val/top{k}"] == 100.0 * correct / 37
        assert result.counts[f"val/top{k}"] == 37
    assert result.metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert result.counts["samples"] == 37
    assert result.predictions.keys == sorted(keys)
    flat = result.log_dict("eval/")
    assert flat["eval/val/top1"] == result.metrics["val/top1"] and flat["eval/val/top1_count"] == 37


def test_predictions_file_round_trips_and_rescores(data, tmp_path, capsys):
    model = TinyNet()
    path = tmp_path / "preds.jsonl.gz"
    result = evaluate(model, batches(*data), device="cpu", predictions_path=path, keep_logits=True)
    back = read_predictions(path)
    assert back.keys == result.predictions.keys
    assert torch.equal(back.topk, result.predictions.topk)
    assert torch.equal(back.targets, result.predictions.targets)
    assert torch.equal(back.logits, result.predictions.logits)  # float32 -> JSON -> float32 is exact
    assert back.logits.shape == (37, 10)

    again = rescore(path, labels={"val": "targets"})
    assert again["metrics"] == result.metrics
    assert {k: again["counts"][k] for k in result.counts} == result.counts

    out = tmp_path / "rescored.json"
    rescore_cli([str(path), "--labels", "val=targets", "--num-samples", "37", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "val/top1" in printed and f"{result.metrics['val/top1']:.3f}" in printed
    assert json.loads(out.read_text())["metrics"] == result.metrics
    with pytest.raises(ValueError, match="fewer than the 38"):
        rescore_cli([str(path), "--labels", "val=targets", "--num-samples", "38"])


def test_rescore_against_another_label_set(data, tmp_path):
    path = tmp_path / "preds.jsonl"
    result = evaluate(TinyNet(), batches(*data), device="cpu", predictions_path=path)
    top1 = result.predictions.topk[:, 0].tolist()
    # A label set that accepts the predicted class for the first 10 keys, and nothing for the last 5.
    sets = {k: ([c] if i < 10 else [(c + 1) % 10]) for i, (k, c) in enumerate(zip(result.predictions.keys, top1))}
    for key in result.predictions.keys[-5:]:
        sets[key] = []
    (tmp_path / "sets.json").write_text(json.dumps(sets))
    scored = rescore(path, labels={"mine": str(tmp_path / "sets.json")}, topk=(1,))
    assert scored["counts"]["mine/top1"] == 32
    assert scored["counts"]["mine/excluded"] == 5
    assert scored["counts"]["mine/top1_correct"] == 10


def test_declared_sample_count_is_enforced_unless_partial(data, caplog):
    with pytest.raises(ValueError, match="evaluated 37 unique samples, fewer than the 40"):
        evaluate(TinyNet(), batches(*data), device="cpu", expected_samples=40)
    with pytest.raises(ValueError, match="more than the 30"):
        evaluate(TinyNet(), batches(*data), device="cpu", expected_samples=30)
    with caplog.at_level(logging.WARNING):
        result = evaluate(TinyNet(), batches(*data), device="cpu", expected_samples=40, allow_partial=True)
    assert result.counts["samples"] == 37
    assert "partial evaluation" in caplog.text
    limited = evaluate(TinyNet(), batches(*data), device="cpu", expected_samples=37, limit_batches=2)
    assert limited.counts["samples"] == 16


def test_repeated_samples_across_batches_are_refused(data):
    images, targets, keys = data
    repeated = batches(*data) + [(images[:3], targets[:3], keys[:3])]
    with pytest.raises(ValueError, match="3 samples repeat a key.*img_000"):
        evaluate(TinyNet(), repeated, device="cpu")
    result = evaluate(TinyNet(), repeated, device="cpu", allow_partial=True)
    assert result.counts["repeats_dropped"] == 3 and result.counts["samples"] == 37


def test_bad_batches_and_models_name_the_problem(data):
    images, targets, keys = data
    with pytest.raises(TypeError, match=r"must yield \(images, targets, keys\)"):
        evaluate(TinyNet(), [(images, targets)], device="cpu")
    with pytest.raises(ValueError, match="batch 1: missing or invalid sample key ''"):
        evaluate(TinyNet(), [(images[:2], targets[:2], keys[:2]), (images[:1], targets[:1], [""])], device="cpu")
    with pytest.raises(ValueError, match="2 images, 2 targets and 1 keys"):
        evaluate(TinyNet(), [(images[:2], targets[:2], keys[:1])], device="cpu")
    with pytest.raises(ValueError, match="class-count mismatch: the model produces 10 logits but the data has 1000"):
        evaluate(TinyNet(), batches(*data), device="cpu", num_classes=1000)
    with pytest.raises(ValueError, match="class-count mismatch: sample 'img_000' has label 12"):
        evaluate(TinyNet(), [(images[:1], torch.tensor([12]), keys[:1])], device="cpu")


def test_amp_and_channels_last_keep_the_predictions(data):
    model = TinyNet()
    plain = evaluate(model, batches(*data), device="cpu")
    cl = evaluate(model.to(memory_format=torch.channels_last), batches(*data), device="cpu", channels_last=True)
    assert torch.equal(cl.predictions.topk[:, 0], plain.predictions.topk[:, 0])
    bf16 = evaluate(model, batches(*data), device="cpu", amp_dtype="bf16")
    assert bf16.counts["samples"] == 37
    # bf16 rounding can swap near ties, but most top-1 predictions agree.
    assert (bf16.predictions.topk[:, 0] == plain.predictions.topk[:, 0]).float().mean() > 0.8
