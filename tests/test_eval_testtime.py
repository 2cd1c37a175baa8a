"""Test-time options of pace-eval: flip TTA, and several resolutions and crop fractions in one run with one table,
each point equal to a computation with timm's own transform at that point."""

import math

import pytest
from eval_helpers import biased_checkpoint, compose_eval, imagenet_wnids, reference_outputs, write_class_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    wnids = imagenet_wnids()
    chosen = [wnids[3], wnids[300], wnids[600]]
    keys = write_class_tree(root / "sketch", chosen, 3, seed=5)
    biased_checkpoint(root / "ckpt.pt", [wnids.index(w) for w in chosen], bias=2.5)
    return root, keys


def _args(root, out, *extra):
    return [
        f"model.checkpoint={root / 'ckpt.pt'}",
        "eval=robustness",
        "eval.val.path=null",
        f"data.root={root}",
        f"eval.imagenet_sketch.path={root / 'sketch'}",
        "data.batch_size=4",
        "data.num_workers=0",
        "device=cpu",
        f"output_dir={out}",
        *extra,
    ]


def _expected(root, keys, size, crop, flip=False):
    wnids = imagenet_wnids()
    files = {k: root / "sketch" / w / f"{k}.jpg" for k, w in keys.items()}
    ref = reference_outputs(root / "ckpt.pt", files, size=size, crop_pct=crop, flip=flip)
    hits, nll = 0, 0.0
    for key, wnid in keys.items():
        row = ref[key][0].double().tolist()
        t = wnids.index(wnid)
        hits += max(range(1000), key=row.__getitem__) == t
        nll += math.log(sum(math.exp(v) for v in row)) - row[t]
    return hits, nll / len(keys)


def test_flip_tta_averages_the_logits_of_both_views(tree, tmp_path):
    from pace.eval.main import run

    root, keys = tree
    plain = run(compose_eval(_args(root, tmp_path / "a", "transform.input_size=32", "transform.crop_pct=1.0")))
    flip = run(
        compose_eval(
            _args(root, tmp_path / "b", "transform.input_size=32", "transform.crop_pct=1.0", "test_time.flip=true")
        )
    )
    for record, use_flip in ((plain, False), (flip, True)):
        hits, nll = _expected(root, keys, 32, 1.0, flip=use_flip)
        section = record["evaluators"]["imagenet_sketch"]
        assert section["counts"]["sketch/top1_correct"] == hits
        assert section["metrics"]["sketch/nll"] == pytest.approx(nll, rel=1e-4)
    # The mirrored view changes the numbers (the noise images are not symmetric).
    assert flip["evaluators"]["imagenet_sketch"]["metrics"]["sketch/nll"] != pytest.approx(
        plain["evaluators"]["imagenet_sketch"]["metrics"]["sketch/nll"], rel=1e-6
    )
    assert flip["test_time"]["flip"] is True


def test_resolutions_and_crops_in_one_run_and_one_table(tree, tmp_path, capsys):
    from pace.eval.main import run

    root, keys = tree
    record = run(compose_eval(_args(root, tmp_path, "test_time.input_sizes=[24,32]", "test_time.crop_pcts=[0.75,1.0]")))
    names = list(record["evaluators"])
    assert names == [f"imagenet_sketch@{s}px/crop{c}" for s in (24, 32) for c in ("0.75", "1")]
    for size in (24, 32):
        for crop in (0.75, 1.0):
            section = record["evaluators"][f"imagenet_sketch@{size}px/crop{crop:g}"]
            assert section["transform"]["input_size"] == [3, size, size] or section["transform"]["input_size"] == (
                3,
                size,
                size,
            )
            hits, nll = _expected(root, keys, size, crop)
            assert section["counts"]["sketch/top1_correct"] == hits
            assert section["metrics"]["sketch/nll"] == pytest.approx(nll, rel=1e-4)
    table = capsys.readouterr().out
    assert all(name in table for name in names) and table.count("sketch/ece") == 4
    assert set(record["transform"]) == {f"{s}px/crop{c}" for s in (24, 32) for c in ("0.75", "1")}
