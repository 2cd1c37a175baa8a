"""Robustness sets and calibration: ECE and NLL, ImageNet-A/R class masking, ImageNet-C corruption errors, and
pace-eval on generated A/R/Sketch/C folders and on the shards pace-make-shards writes from them, each checked
against a computation written out plainly here."""

import json
import math
import random
import tarfile

import pytest
import torch
from eval_helpers import (
    LookupModel,
    biased_checkpoint,
    compose_eval,
    imagenet_wnids,
    reference_outputs,
    timm_subset_wnids,
    write_class_tree,
    write_corruption_tree,
)

from pace.eval import evaluate
from pace.eval.calibration import expected_calibration_error
from pace.eval.predictions import Predictions
from pace.eval.robustness import class_subset, score_corruptions


def explicit_ece(confidences: list[float], correct: list[bool], bins: int = 15) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidences[i] for i in members) / len(members)
            total += len(members) / len(confidences) * abs(acc - conf)
    return total


def test_ece_equals_explicit_bins():
    rng = random.Random(0)
    confidences = [rng.random() for _ in range(500)] + [0.0, 1.0, 1 / 15, 2 / 15, 14 / 15]
    correct = [rng.random() < c for c in confidences]
    got = expected_calibration_error(torch.tensor(confidences, dtype=torch.float64), torch.tensor(correct))
    assert got == pytest.approx(explicit_ece(confidences, correct), abs=1e-12)
    assert 0 < got < 0.2  # correctness drawn with probability = confidence: nearly calibrated, not exactly


def _keyed(logits: torch.Tensor, targets: torch.Tensor, keys: list[str], batch: int = 7) -> list[tuple]:
    return [
        (torch.arange(i, min(i + batch, len(keys))), targets[i : i + batch], keys[i : i + batch])
        for i in range(0, len(keys), batch)
    ]


def test_nll_and_ece_in_the_results_equal_a_plain_computation():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(60, 12, generator=gen) * 3
    targets = torch.randint(0, 12, (60,), generator=gen)
    keys = [f"img{i:03d}" for i in range(60)]
    result = evaluate(LookupModel(logits), _keyed(logits, targets, keys), device="cpu")
    rows = logits.double().tolist()
    nll, conf, hit = [], [], []
    for row, t in zip(rows, targets.tolist()):
        z = math.log(sum(math.exp(v) for v in row))
        nll.append(z - row[t])
        best = max(range(12), key=lambda c: row[c])
        conf.append(math.exp(row[best] - z))
        hit.append(best == t)
    assert result.metrics["val/nll"] == pytest.approx(sum(nll) / 60, rel=1e-6)
    assert result.metrics["val/nll"] == result.metrics["val/loss"]
    assert result.metrics["val/ece"] == pytest.approx(100 * explicit_ece(conf, hit), abs=1e-4)


def test_class_subsets_are_timm_lists_in_imagenet_order(tmp_path):
    wnids = imagenet_wnids()
    for name in ("imagenet_a", "imagenet_r"):
        expected = sorted(wnids.index(w) for w in timm_subset_wnids(name))
        assert class_subset(name) == expected and len(expected) == 200
    custom = tmp_path / "subset.txt"
    custom.write_text(f"{wnids[5]}\n{wnids[2]}\n")
    assert class_subset(str(custom)) == [2, 5]
    custom.write_text("7\n3\n")  # class indices: any label space
    assert class_subset(str(custom)) == [3, 7]
    custom.write_text("n99999999\n")
    with pytest.raises(ValueError, match="not ImageNet-1k classes, e.g. n99999999"):
        class_subset(str(custom))


def test_masked_logits_score_only_the_subset():
    gen = torch.Generator().manual_seed(2)
    subset = class_subset("imagenet_r")
    logits = torch.randn(40, 1000, generator=gen)
    targets = torch.tensor([subset[i * 5 % 200] for i in range(40)])
    keys = [f"r{i:02d}" for i in range(40)]
    result = evaluate(LookupModel(logits), _keyed(logits, targets, keys), device="cpu", class_subset=subset)
    hits, nll = 0, 0.0
    for row, t in zip(logits.double().tolist(), targets.tolist()):
        best = max(subset, key=lambda c: row[c])  # argmax over the 200 classes only
        hits += best == t
        nll += math.log(sum(math.exp(row[c]) for c in subset)) - row[t]
    assert result.counts["val/top1_correct"] == hits
    assert result.metrics["val/nll"] == pytest.approx(nll / 40, rel=1e-6)
    assert all(c in subset for c in result.predictions.topk.flatten().tolist())
    outside = next(c for c in range(1000) if c not in subset)
    targets[3] = outside
    with pytest.raises(ValueError, match=f"sample 'r03' has label {outside}, which is not in the .*200-class subset"):
        evaluate(LookupModel(logits), _keyed(logits, targets, keys), device="cpu", class_subset=subset)


def test_corruption_errors_equal_the_formula():
    gen = torch.Generator().manual_seed(3)
    keys, corruptions = [], {"fog": 5, "snow": 5, "glass_blur": 3}  # glass_blur lacks severities 4-5: no CE
    for c, n_sev in corruptions.items():
        keys += [f"{c}/{s}/ILSVRC2012_val_{i:08d}" for s in range(1, n_sev + 1) for i in range(1, 9)]
    keys.sort()
    n = len(keys)
    logits = torch.randn(n, 10, generator=gen)
    targets = torch.randint(0, 10, (n,), generator=gen)
    preds = Predictions(keys, logits.topk(5, dim=1).indices, targets, torch.zeros(n), 10)
    baseline = {"fog": 80.0, "snow": 60.0, "glass_blur": 90.0, "contrast": 70.0}
    metrics, counts = score_corruptions(preds, name="c", baseline_errors=baseline)
    top1 = logits.argmax(dim=1).tolist()
    ces = []
    for c, n_sev in corruptions.items():
        accs = []
        for s in range(1, n_sev + 1):
            rows = [i for i, k in enumerate(keys) if k.startswith(f"{c}/{s}/")]
            accs.append(100 * sum(top1[i] == targets[i] for i in rows) / len(rows))
            assert metrics[f"c/{c}/s{s}/top1"] == pytest.approx(accs[-1])
        assert metrics[f"c/{c}/top1"] == pytest.approx(sum(accs) / len(accs))
        if n_sev == 5:
            ces.append(100 * (sum(100 - a for a in accs) / 5) / baseline[c])
            assert metrics[f"c/{c}/ce"] == pytest.approx(ces[-1])
    assert "c/glass_blur/ce" not in metrics
    assert metrics["c/mce"] == pytest.approx(sum(ces) / 2) and counts["c/mce"] == 2
    assert counts["c/top1"] == n


# ---------------------------------------------------------------------------------------------------------------
# pace-eval on generated ImageNet-A / R / Sketch / C layouts, from folders and from shards

SIZE, CROP = 32, 1.0


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    wnids = imagenet_wnids()
    a = timm_subset_wnids("imagenet_a")[:3]
    r = timm_subset_wnids("imagenet_r")[5:8]
    sketch = [wnids[1], wnids[500], wnids[999]]
    c_labels = {f"ILSVRC2012_val_{i:08d}": wnids[(i * 7) % 3 * 400] for i in range(1, 4)}
    files = {
        "imagenet_a": write_class_tree(root / "a", a, 2, seed=1),
        "imagenet_r": write_class_tree(root / "r", r, 2, seed=2),
        "imagenet_sketch": write_class_tree(root / "sketch", sketch, 2, seed=3),
        "imagenet_c": write_corruption_tree(root / "c", ["fog", "snow"], [1, 2, 3, 4, 5], c_labels, seed=4),
    }
    classes = [wnids.index(w) for w in a + r + sketch + list(c_labels.values())]
    biased_checkpoint(root / "ckpt.pt", classes)
    return root, files


def _paths(root, name, key):
    folder = {"imagenet_a": "a", "imagenet_r": "r", "imagenet_sketch": "sketch", "imagenet_c": "c"}[name]
    if name == "imagenet_c":
        c, s, stem = key.split("/")
        return next((root / folder / c / s).glob(f"*/{stem}.JPEG"))
    wnid = key.rsplit("_", 1)[0]
    return root / folder / wnid / f"{key}.jpg"


def _run(root, out, data_args):
    from pace.eval.main import run

    args = [
        f"model.checkpoint={root / 'ckpt.pt'}",
        "eval=robustness",
        "eval.val.path=null",
        f"data.root={root}",
        f"transform.input_size={SIZE}",
        f"transform.crop_pct={CROP}",
        "data.batch_size=4",
        "data.num_workers=0",
        "device=cpu",
        f"output_dir={out}",
        *data_args,
    ]
    return run(compose_eval(args))


FOLDER_ARGS = [f"eval.{n}.path={{root}}/{d}" for n, d in [("imagenet_a", "a"), ("imagenet_r", "r")]] + [
    "eval.imagenet_sketch.path={root}/sketch",
    "eval.imagenet_c.path={root}/c",
]


@pytest.fixture(scope="module")
def folder_record(layouts, tmp_path_factory):
    root, _ = layouts
    return _run(root, tmp_path_factory.mktemp("out"), [a.format(root=root) for a in FOLDER_ARGS])


def test_robustness_sets_from_folders_equal_a_plain_computation(layouts, folder_record):
    root, files = layouts
    wnids = imagenet_wnids()
    sections = folder_record["evaluators"]
    assert set(sections) == {"imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_c"}
    baseline = compose_eval(["eval=robustness", "model.name=x", "data.root=x", "output_dir=x"]).eval.imagenet_c
    for name, keys in files.items():
        ref = reference_outputs(root / "ckpt.pt", {k: _paths(root, name, k) for k in keys}, size=SIZE, crop_pct=CROP)
        subset = [wnids.index(w) for w in timm_subset_wnids(name)] if name in ("imagenet_a", "imagenet_r") else None
        hit, nll = {}, 0.0
        for key, wnid in keys.items():
            row = ref[key][0].double().tolist()
            allowed = subset or range(1000)
            best = max(allowed, key=lambda c: row[c])
            hit[key] = best == wnids.index(wnid)
            nll += math.log(sum(math.exp(row[c]) for c in allowed)) - row[wnids.index(wnid)]
        group = {"imagenet_a": "a", "imagenet_r": "r", "imagenet_sketch": "sketch", "imagenet_c": "c"}[name]
        metrics = sections[name]["metrics"]
        assert sections[name]["counts"]["samples"] == len(keys)
        assert metrics[f"{group}/top1"] == pytest.approx(100 * sum(hit.values()) / len(keys))
        assert metrics[f"{group}/nll"] == pytest.approx(nll / len(keys), rel=1e-4)
        if name == "imagenet_c":
            ces = []
            for c in ("fog", "snow"):
                accs = [100 * sum(v for k, v in hit.items() if k.startswith(f"{c}/{s}/")) / 3 for s in range(1, 6)]
                assert metrics[f"c/{c}/top1"] == pytest.approx(sum(accs) / 5)
                ces.append(100 * (sum(100 - a for a in accs) / 5) / baseline.baseline_errors[c])
                assert metrics[f"c/{c}/ce"] == pytest.approx(ces[-1])
            assert metrics["c/mce"] == pytest.approx(sum(ces) / 2)
    # Hits and misses both occur, so agreement is not 0 == 0.
    top1 = [sections[n]["metrics"][f"{g}/top1"] for n, g in [("imagenet_c", "c"), ("imagenet_sketch", "sketch")]]
    assert any(0 < t < 100 for t in top1)


def test_make_shards_learns_the_layouts_and_shards_score_the_same(layouts, folder_record, tmp_path):
    from pace.data.make_shards import main as make_shards

    root, files = layouts
    splits = {"imagenet_a": "a", "imagenet_r": "r", "imagenet_sketch": "sketch", "imagenet_c": "c"}
    make_shards(
        [str(tmp_path / "shards"), *[f"--split={s}={root / d}" for s, d in splits.items()]]
        + ["--layout=imagenet_c=corruptions", "--classes=imagenet", "--max-count=8", "--workers=1"]
    )
    info = json.loads((tmp_path / "shards" / "_info.json").read_text())
    assert info["classes"] == imagenet_wnids()
    assert info["splits"]["imagenet_c"]["num_samples"] == len(files["imagenet_c"])
    args = [f"eval.{n}.path={tmp_path / 'shards'}" for n in splits] + [f"eval.{n}.split={n}" for n in splits]
    record = _run(root, tmp_path / "out", args)
    for name, section in folder_record["evaluators"].items():
        shard = record["evaluators"][name]
        assert shard["data"]["description"].startswith("webdataset")
        assert shard["counts"] == section["counts"]
        assert shard["metrics"] == pytest.approx(section["metrics"], rel=1e-5)


def test_shards_with_another_class_list_are_refused(layouts, tmp_path):
    from pace.data.make_shards import main as make_shards

    root, _ = layouts
    make_shards([str(tmp_path / "shards"), f"--split=imagenet_r={root / 'r'}", "--workers=1"])
    with pytest.raises(ValueError, match="classes=imagenet, but the shards' class list is another one"):
        _run(
            root, tmp_path / "out", [f"eval.imagenet_r.path={tmp_path / 'shards'}", "eval.imagenet_r.split=imagenet_r"]
        )


def test_imagenet_v2_folders_keep_their_index_in_shards(tmp_path):
    from pace.data import read_info
    from pace.data.make_shards import main as make_shards

    for name in ("0", "10", "2"):
        write_class_tree(tmp_path / "v2", [name], 1, seed=int(name))
    for flags, expected_classes in (([], [str(i) for i in range(11)]), (["--classes=imagenet"], imagenet_wnids())):
        out = tmp_path / f"shards{len(flags)}"
        make_shards([str(out), f"--split=v2={tmp_path / 'v2'}", "--workers=1", *flags])
        assert read_info(out)["classes"] == expected_classes
        labels = {}
        for tar in sorted(out.glob("*.tar")):
            with tarfile.open(tar) as f:
                labels.update(
                    {m.name.split(".")[0]: int(f.extractfile(m).read()) for m in f if m.name.endswith(".cls")}
                )
        assert labels == {"0_0": 0, "10_0": 10, "2_0": 2}  # the folder names are the class indices
