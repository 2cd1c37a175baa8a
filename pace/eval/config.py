"""Typed schemas of the evaluation config: `configs/eval.yaml` (pace-eval) and the `configs/eval/` evaluator group,
which training uses too. `register_configs()` stores them in Hydra's ConfigStore so composition rejects unknown
keys and wrong types; `validate()` builds the dataclasses, whose `__post_init__` rejects values out of range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pace.schema import LoggerConfig
from pace.schema import require as _require

FORMATS = ("auto", "webdataset", "imagenet_val_folder", "image_folder", "corruption_folder")
KINDS = ("classify", "corruptions", "knn")
TARGETS = "targets"  # label source: the labels the samples carry
IMAGENET_REAL = "imagenet_real"  # label source: the ImageNet-ReaL sets timm ships


@dataclass
class EvaluatorConfig:
    """One evaluator: a dataset, the label sources it is scored against, and how often it runs in training.

    Args:
        path: the data: a shard folder / brace pattern / list file, a flat folder of `ILSVRC2012_val_*.JPEG`
            files, or an ImageFolder tree. None (or empty) skips this evaluator.
        split: the split name inside a shard folder.
        format: `auto` (detected from `path`), `webdataset`, `imagenet_val_folder`, `image_folder`, or
            `corruption_folder` (ImageNet-C: `<corruption>/<severity>/<wnid>/<image>`).
        label_file: labels of a flat ImageNet val folder (`LOC_val_solution.csv` or `file label` lines).
        kind: `classify` (top-k, NLL, ECE), `corruptions` (the same per corruption and severity, and the mean
            corruption error against `baseline_errors`), or `knn` (weighted k-NN on frozen pooled features, with
            `knn_train_path` as the memory bank).
        classes: `imagenet` reads class-folder names as ImageNet wnids in timm's 1000-class order (ImageNet-A/R/
            Sketch/C folders); or a file naming the label space (a shard folder's `_info.json`, or one class name
            per line); null: the folders' sorted order (or their index, for folders named 0..N-1).
        class_subset: `imagenet_a`, `imagenet_r` (timm's 200-class lists) or a file of wnids or class indices: the
            other logits are masked before scoring, as timm's `--valid-labels` does. null: all classes.
        baseline_errors: corruption -> the baseline model's top-1 error (percent) averaged over the 5 severities;
            the corruption error of each corruption is the model's mean error divided by this.
        num_samples: the number of samples the data must have (None: from its info or label file).
        labels: metric group -> label source: `targets` (the samples' own labels), `imagenet_real`, or a JSON
            file of label sets (`{key: [classes]}`, or a 50,000-entry list in ImageNet val order).
        topk: the top-k accuracies to report.
        every_n_epochs: in training, run after every this many epochs (and after the last).
        partial: accept fewer or more samples than declared, and repeated keys, with warnings.
    """

    path: str | None = None
    split: str = "val"
    format: str = "auto"
    label_file: str | None = None
    num_samples: int | None = None
    # No default groups: a schema default would be merged into every entry's own `labels`.
    labels: dict[str, str] = field(default_factory=dict)
    topk: list[int] = field(default_factory=lambda: [1, 5])
    every_n_epochs: int = 1
    partial: bool = False
    kind: str = "classify"
    classes: str | None = None
    class_subset: str | None = None
    baseline_errors: dict[str, float] = field(default_factory=dict)
    knn_train_path: str | None = None
    knn_train_split: str = "train"
    knn_k: int = 20
    knn_temperature: float = 0.07

    def __post_init__(self) -> None:
        _require(self.format in FORMATS, "format", self.format, f"one of {FORMATS}")
        _require(self.kind in KINDS, "kind", self.kind, f"one of {KINDS}")
        _require(self.knn_k >= 1, "knn_k", self.knn_k, "an integer >= 1")
        _require(self.knn_temperature > 0, "knn_temperature", self.knn_temperature, "a temperature > 0")
        if self.kind == "knn" and self.path:
            _require(bool(self.knn_train_path), "knn_train_path", self.knn_train_path, "the memory-bank data")
        bad = {k: v for k, v in self.baseline_errors.items() if not 0 < v <= 100}
        _require(not bad, "baseline_errors", bad, "errors in percent, in (0, 100]")
        _require(bool(self.labels), "labels", self.labels, "at least one metric group")
        _require(list(self.labels.values()).count(TARGETS) <= 1, "labels", self.labels, "'targets' at most once")
        _require(bool(self.topk) and min(self.topk) >= 1, "topk", self.topk, "positive integers")
        _require(self.every_n_epochs >= 1, "every_n_epochs", self.every_n_epochs, "an integer >= 1")
        _require(self.num_samples is None or self.num_samples > 0, "num_samples", self.num_samples, "> 0 or null")


@dataclass
class ModelSourceConfig:
    """Which model to evaluate (see `pace.eval.loading.load_model`).

    Args:
        name: timm architecture, `hf-hub:org/repo` or `local-dir:/path`; optional when the checkpoint names it.
        checkpoint: one of our training checkpoints, a release folder, an authors'-format file, or `hf-hub:`.
        pretrained: with no checkpoint, use timm's pretrained weights for `name`.
        weights: `auto` (the raw `model` weights if present, else EMA), `ema` or `raw`.
        sketch_seed: evaluate PACE models with the sketches derived from this seed instead of the stored ones
            (null: the model's own; see docs/training.md, "Sketch schedule").
        kwargs: extra `timm.create_model` arguments.
    """

    name: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    weights: str = "auto"
    sketch_seed: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.weights in ("auto", "ema", "raw"), "model.weights", self.weights, "auto, ema or raw")
        from pace.models.names import require_known_model  # registers PACE-ViT with timm first

        require_known_model("model.name", self.name)


@dataclass
class TransformConfig:
    """Overrides of the eval transform; null keeps the model's pretrained_cfg value.

    Args:
        input_size: square input resolution.
        crop_pct: centre-crop fraction (resize to input_size / crop_pct first).
        crop_mode: timm crop mode (`center`, `squash`, `border`).
        interpolation: resize interpolation (`bicubic`, `bilinear`, ...).
        mean: normalisation mean per channel.
        std: normalisation std per channel.
    """

    input_size: int | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class TestTimeConfig:
    """Test-time options of pace-eval.

    Args:
        flip: average the logits of each image and its horizontal mirror.
        input_sizes: evaluate at each of these resolutions (empty: the transform's one resolution).
        crop_pcts: and at each of these centre-crop fractions (empty: the transform's one fraction); every
            (size, crop) pair is one row block of the combined results table.
    """

    flip: bool = False
    input_sizes: list[int] = field(default_factory=list)
    crop_pcts: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(all(s > 0 for s in self.input_sizes), "test_time.input_sizes", self.input_sizes, "sizes > 0")
        _require(all(0 < c <= 1 for c in self.crop_pcts), "test_time.crop_pcts", self.crop_pcts, "in (0, 1]")


@dataclass
class LoaderConfig:
    """Per-process batching, and the data root the evaluator group refers to.

    Args:
        root: default data location of the evaluator group (`eval.<name>.path: ${data.root}`).
        val_split: default split name inside a shard folder.
        batch_size: images per process per batch.
        num_workers: loader workers per process.
    """

    root: str | None = None
    val_split: str = "val"
    batch_size: int = 128
    num_workers: int = 8

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "data.batch_size", self.batch_size, "a positive batch size")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "a count >= 0")


@dataclass
class EvalConfig:
    """The pace-eval job.

    Args:
        name: run name; the output dir is `runs/eval/<name>`.
        seed: seeds the model's creation, so a randomly initialised model is the same on every rank.
        model: see `ModelSourceConfig`.
        data: see `LoaderConfig`.
        eval: evaluator name -> `EvaluatorConfig` (the `eval` group).
        transform: see `TransformConfig`.
        test_time: see `TestTimeConfig`.
        device: `auto`, `cpu` or `cuda`.
        amp: autocast dtype `bf16` / `fp16`, or null for full precision.
        channels_last: channels-last images and model.
        predictions: write `predictions_<evaluator>.jsonl.gz` (key, target, top-5, loss) per evaluator.
        predictions_logits: include the logits in those files.
        rescore: a predictions file to score again instead of running a model.
        output_dir: where `results.json` and predictions go.
        logger: wandb settings, the `logger` group shared with training (off; `logger=wandb` turns it on).
    """

    name: str = "default"
    seed: int = 0
    model: ModelSourceConfig = field(default_factory=ModelSourceConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    eval: dict[str, EvaluatorConfig] = field(default_factory=dict)
    transform: TransformConfig = field(default_factory=TransformConfig)
    test_time: TestTimeConfig = field(default_factory=TestTimeConfig)
    device: str = "auto"
    amp: str | None = None
    channels_last: bool = False
    predictions: bool = False
    predictions_logits: bool = False
    rescore: str | None = None
    output_dir: str = MISSING
    # Evaluation logs to wandb only when asked (`logger=wandb`); training does by default.
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(wandb=False))

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda"), "device", self.device, "auto, cpu or cuda")
        _require(self.amp in (None, "bf16", "fp16"), "amp", self.amp, "bf16, fp16 or null")
        if self.rescore:
            _require(bool(self.eval), "eval", self.eval, "an evaluator whose labels score the predictions file")
            return
        model = self.model
        _require(bool(model.name or model.checkpoint), "model.name", model.name, "a model name or model.checkpoint")
        active = [name for name, ev in self.eval.items() if ev.path]
        _require(bool(active), "data.root", self.data.root, "the evaluation data (or an eval.<name>.path)")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (called by the entry point, not at import)."""
    cs = ConfigStore.instance()
    cs.store(name="pace_eval_schema", node=EvalConfig)


def validate(cfg: DictConfig) -> EvalConfig:
    """Resolve the composed config and build the typed dataclasses, running every `__post_init__` check.

    Raises:
        ValueError: naming the first key whose value is out of range.
    """
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg))  # type: ignore[return-value]


def evaluators_from_config(entries: DictConfig | dict) -> dict[str, EvaluatorConfig]:
    """Typed evaluator entries from the `eval` node of any config (pace-eval's or training's).

    Raises:
        ValueError: naming the evaluator and key of an invalid entry.
    """
    out = {}
    for name, entry in dict(entries).items():
        try:
            merged = OmegaConf.merge(OmegaConf.structured(EvaluatorConfig), entry)
            out[name] = OmegaConf.to_object(merged)
        except Exception as e:
            raise ValueError(f"evaluator eval.{name}: {e}") from e
    return out
