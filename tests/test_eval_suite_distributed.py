"""The evaluation suite under torchrun (gloo on CPU): ImageNet-A masking, ImageNet-C corruption errors (from folders
and from shards), k-NN and flip TTA give the same counts and metrics with 2 processes as with one, every sample
evaluated exactly once and matched by key."""

import json
import sys
from pathlib import Path

import pytest
from eval_helpers import (
    biased_checkpoint,
    compose_eval,
    imagenet_wnids,
    timm_subset_wnids,
    write_class_tree,
    write_corruption_tree,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_eval_distributed import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    wnids = imagenet_wnids()
    a = timm_subset_wnids("imagenet_a")[10:13]
    write_class_tree(root / "a", a, 3, seed=1)  # 9 images: shares of 5 / 4
    labels = {f"ILSVRC2012_val_{i:08d}": wnids[i * 97] for i in range(1, 4)}
    write_corruption_tree(root / "c", ["fog", "contrast"], [1, 2, 3, 4, 5], labels, seed=2)  # 30 images
    write_class_tree(root / "train", [wnids[i * 97] for i in range(1, 4)], 5, seed=3)
    write_class_tree(root / "val", [wnids[i * 97] for i in range(1, 4)], 2, seed=4)
    biased_checkpoint(root / "ckpt.pt", [wnids.index(w) for w in a + list(labels.values())])
    from pace.data.make_shards import main as make_shards

    make_shards(
        [
            str(root / "shards"),
            f"--split=c={root / 'c'}",
            "--layout=c=corruptions",
            "--classes=imagenet",
            "--max-count=7",
            "--workers=1",
        ]
    )
    return root


def suite_args(root: Path, source: str) -> list[str]:
    c = [f"eval.imagenet_c.path={root / 'c'}"]
    if source == "shards":
        c = [f"eval.imagenet_c.path={root / 'shards'}", "eval.imagenet_c.split=c"]
    return [
        f"model.checkpoint={root / 'ckpt.pt'}",
        "eval=[robustness,knn]",  # both groups' evaluators in one run
        f"data.root={root}",
        "eval.val.path=null",
        f"eval.imagenet_a.path={root / 'a'}",
        *c,
        f"eval.knn.path={root / 'val'}",
        f"eval.knn.knn_train_path={root / 'train'}",
        "eval.knn.classes=imagenet",
        "transform.input_size=32",
        "transform.crop_pct=1.0",
        "test_time.flip=true",
        "data.batch_size=3",
        f"data.num_workers={1 if source == 'shards' else 0}",
        "device=cpu",
    ]


@pytest.fixture(scope="module")
def one_process(suite, tmp_path_factory):
    from pace.eval.main import run

    out = tmp_path_factory.mktemp("one")
    record = run(compose_eval([*suite_args(suite, "folder"), f"output_dir={out}"]))
    sections = record["evaluators"]
    assert set(sections) == {"imagenet_a", "imagenet_c", "knn"}
    assert sections["imagenet_c"]["counts"]["samples"] == 30 and "c/mce" in sections["imagenet_c"]["metrics"]
    assert sections["knn"]["counts"]["memory_bank"] == 15
    return record


def assert_same(record: dict, reference: dict) -> None:
    for name, section in reference["evaluators"].items():
        other = record["evaluators"][name]
        assert other["counts"] == section["counts"], name
        # Exact for accuracies; NLL/ECE/CE agree to the rounding of another batch composition.
        assert other["metrics"] == pytest.approx(section["metrics"], rel=1e-5), name


@pytest.mark.parametrize("source", ["folder", pytest.param("shards", marks=pytest.mark.slow)])
def test_suite_is_identical_for_1_and_2_processes(suite, one_process, tmp_path, source):
    torchrun(2, ["scripts/eval.py", *suite_args(suite, source), f"hydra.run.dir={tmp_path}"])
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["environment"]["world_size"] == 2
    assert_same(record, one_process)
