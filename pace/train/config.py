"""Typed schemas of the training config (`configs/train.yaml` and its groups).

`register_configs()` puts them in Hydra's ConfigStore; `train.yaml` lists `pace_train_schema` first in its
defaults, so every group file is merged onto a typed node: an unknown key or a value of the wrong type fails
during composition, and `validate()` (which builds the dataclasses, running each `__post_init__`) rejects
values out of range, both before any work, with the full key in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pace.errors import UsageError, did_you_mean, schema_keys
from pace.eval.config import EvaluatorConfig, evaluators_from_config
from pace.schema import LoggerConfig
from pace.schema import require as _require


def _one_of(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    _require(value in choices, key, value, f"one of {choices}")


@dataclass
class ModelConfig:
    """Which timm model to build.

    Args:
        name: a timm model name (`pace_vit_tiny_patch16_224`, `vit_tiny_patch16_224`, ...).
        num_classes: classifier width; a fine-tune with a new class count resets the head.
        img_size: input resolution for models that take one (None: the model's default).
        drop_path_rate: stochastic depth rate.
        pretrained: weights to start from: a local checkpoint (ours or the authors' format), a release
            file (`model.safetensors` beside its `config.json`) or `hf-hub:org/name`. None: random init.
        kwargs: further keyword arguments for `timm.create_model` (e.g. `compress_form: diag`).
        linear_probe: train only a new linear classifier on the frozen pooled features: the head is
            re-initialised, every other parameter (and BatchNorm statistics) frozen; needs drop_path_rate 0.
    """

    name: str = "pace_vit_tiny_patch16_224"
    num_classes: int = 1000
    img_size: int | None = None
    drop_path_rate: float = 0.1
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    linear_probe: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", self.name, "a timm model name")
        from pace.models.names import require_known_model  # registers PACE-ViT with timm first

        require_known_model("model.name", self.name)
        # Stochastic depth would perturb the frozen features the probe is meant to measure.
        ok = not self.linear_probe or self.drop_path_rate == 0
        _require(ok, "model.drop_path_rate", self.drop_path_rate, "0 for a linear probe (model.linear_probe=true)")
        _require(self.num_classes > 0, "model.num_classes", self.num_classes, "a positive class count")
        _require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "a rate in [0, 1)")


@dataclass
class DataConfig:
    """Where the images come from and how they are batched (per process).

    Args:
        source: "webdataset" (shards under `root`), "quickstart" (the generated offline dataset under `root`,
            created if missing) or "synthetic" (random tensors; throughput and smoke tests).
        root: folder holding the shards and their info JSON (`data=imagenet` puts it under `$PACE_DATA` when set).
        train_split: name of the training split.
        val_split: name of the held-out split evaluated during training.
        num_classes: classes in the data (must equal model.num_classes).
        img_size: training and evaluation resolution.
        batch_size: training images per process per micro-batch.
        eval_batch_size: evaluation images per process.
        num_workers: data-loading workers per process.
        decode: where shard images are decoded and augmented: "cpu" (timm's transform per sample in the
            workers), "draft" (workers decode at a reduced JPEG scale where the crop allows; normalising, erasing
            and Mixup run per batch on the training device) or "device" (workers only read bytes and draw the
            random choices; the training device decodes, nvJPEG on CUDA, and augments in batches). See
            docs/data.md.
        synthetic_train_samples: size of the synthetic training split.
        synthetic_val_samples: size of the synthetic held-out split.
    """

    source: str = "webdataset"
    root: str = "data/imagenet"
    train_split: str = "train"
    val_split: str = "validation"
    num_classes: int = 1000
    img_size: int = 224
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 8
    decode: str = "cpu"
    synthetic_train_samples: int = 1024
    synthetic_val_samples: int = 256

    def __post_init__(self) -> None:
        _one_of("data.source", self.source, ("webdataset", "quickstart", "synthetic"))
        _require(self.source == "synthetic" or bool(self.root), "data.root", self.root, "the shard folder")
        _require(self.img_size > 0, "data.img_size", self.img_size, "a positive resolution")
        _require(self.batch_size > 0, "data.batch_size", self.batch_size, "a positive batch size")
        _require(self.eval_batch_size > 0, "data.eval_batch_size", self.eval_batch_size, "a positive batch size")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "a count >= 0")
        _one_of("data.decode", self.decode, ("cpu", "draft", "device"))


@dataclass
class AugConfig:
    """Training augmentation (timm `create_transform`) and Mixup/CutMix with label smoothing.

    Args:
        auto_augment: timm auto-augment policy string, None for none.
        color_jitter: colour jitter strength.
        reprob: random-erasing probability.
        remode: random-erasing mode.
        interpolation: resize interpolation.
        hflip: horizontal flip probability.
        scale: RandomResizedCrop scale range.
        crop_pct: evaluation centre-crop fraction.
        mixup: Mixup alpha (0 disables).
        cutmix: CutMix alpha (0 disables).
        mixup_prob: probability of applying Mixup or CutMix to a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        mixup_mode: "batch", "pair" or "elem".
        label_smoothing: label smoothing of the targets.
        repeated_aug: places in the training batches each sample fills, each with its own augmentation
            (repeated augmentation, DeiT's RASampler; 1: off). The epoch length stays the same, so an epoch uses
            1/repeated_aug as many distinct samples. Shard data only (`data.source` webdataset or quickstart).
    """

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    interpolation: str = "bicubic"
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_pct: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1
    repeated_aug: int = 1

    def __post_init__(self) -> None:
        for key in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"aug.{key}", value, "a probability in [0, 1]")
        _require(0.0 <= self.label_smoothing < 1.0, "aug.label_smoothing", self.label_smoothing, "a value in [0, 1)")
        _require(self.mixup >= 0 and self.cutmix >= 0, "aug.mixup/cutmix", (self.mixup, self.cutmix), "alphas >= 0")
        _one_of("aug.mixup_mode", self.mixup_mode, ("batch", "pair", "elem"))
        _require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], "aug.scale", self.scale, "[lo, hi]")
        _require(self.repeated_aug >= 1, "aug.repeated_aug", self.repeated_aug, "a count >= 1 (1: off)")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher, as in DeiT (`distill` group; see pace/train/distill.py).

    Args:
        kind: "none", "soft" (KL divergence at temperature `tau`) or "hard" (cross-entropy to the teacher's argmax).
        teacher: timm model name of the teacher (may be omitted when `teacher_checkpoint` names its architecture).
        teacher_checkpoint: one of our training checkpoints, a release folder or `hf-hub:org/name` (read by
            `pace.eval.load_model`; EMA weights when the checkpoint has them). None: `teacher` from timm.
        teacher_pretrained: with no checkpoint, load timm's pretrained weights for `teacher`.
        teacher_weights: "auto", "ema" or "raw" weights of a training checkpoint.
        teacher_input_size: resolution the teacher sees (None: its pretrained_cfg's input size).
        teacher_kwargs: further `timm.create_model` arguments of the teacher.
        alpha: weight of the distillation term; the base loss gets 1 - alpha (DeiT: 0.5).
        tau: temperature of the soft loss (DeiT: 1.0).
        token: train the student's distillation head on the distillation term (the student must have
            `set_distilled_training`, e.g. timm's distilled DeiTs); False: the class head takes both terms.
    """

    kind: str = "none"
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_pretrained: bool = True
    teacher_weights: str = "auto"
    teacher_input_size: int | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    alpha: float = 0.5
    tau: float = 1.0
    token: bool = False

    def __post_init__(self) -> None:
        _one_of("distill.kind", self.kind, ("none", "soft", "hard"))
        _one_of("distill.teacher_weights", self.teacher_weights, ("auto", "ema", "raw"))
        _require(0.0 <= self.alpha <= 1.0, "distill.alpha", self.alpha, "a weight in [0, 1]")
        _require(self.tau > 0, "distill.tau", self.tau, "a positive temperature")
        size = self.teacher_input_size
        _require(size is None or size > 0, "distill.teacher_input_size", size, "a positive resolution or null")
        named = self.teacher is not None or self.teacher_checkpoint is not None
        _require(self.kind == "none" or named, "distill.teacher", self.teacher, "a timm name or a teacher_checkpoint")
        _require(not self.token or self.kind != "none", "distill.token", self.token, "false with distill.kind=none")


@dataclass
class OptimConfig:
    """Optimizer (timm `create_optimizer_v2`): no weight decay on 1-D parameters, optional layer decay.

    Args:
        opt: timm optimizer name.
        lr: absolute peak learning rate; None scales `base_lr` by global batch / `lr_base_size`.
        base_lr: learning rate at the reference batch size.
        lr_base_size: the reference batch size of `base_lr`.
        weight_decay: decoupled weight decay for parameters with 2 or more dimensions.
        momentum: SGD-style momentum.
        betas: Adam betas, None for the optimizer's default.
        eps: Adam epsilon, None for the optimizer's default.
        layer_decay: layer-wise lr decay through the model's `group_matcher` (None: off).
        clip_grad: gradient clipping threshold (None: off).
        clip_mode: "norm", "value" or "agc".
    """

    opt: str = "adamw"
    lr: float | None = None
    base_lr: float = 5e-4
    lr_base_size: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list[float] | None = None
    eps: float | None = None
    layer_decay: float | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"

    def __post_init__(self) -> None:
        _require(self.lr is None or self.lr > 0, "optim.lr", self.lr, "a positive learning rate or null")
        _require(self.base_lr > 0, "optim.base_lr", self.base_lr, "a positive learning rate")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a value >= 0")
        ok = self.layer_decay is None or 0 < self.layer_decay <= 1
        _require(ok, "optim.layer_decay", self.layer_decay, "a value in (0, 1] or null")
        _require(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", self.clip_grad, "> 0 or null")
        _one_of("optim.clip_mode", self.clip_mode, ("norm", "value", "agc"))


@dataclass
class SchedConfig:
    """Learning-rate schedule (timm `create_scheduler_v2`), stepped once per optimizer update.

    Args:
        sched: timm scheduler name.
        epochs: length of the run in epochs.
        warmup_epochs: linear warm-up length (inside `epochs`).
        warmup_lr: learning rate at the start of warm-up.
        min_lr: floor of the decay.
        cooldown_epochs: epochs at `min_lr` after the schedule.
    """

    sched: str = "cosine"
    epochs: int = 400
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "sched.epochs", self.epochs, "a positive epoch count")
        _require(0 <= self.warmup_epochs <= self.epochs, "sched.warmup_epochs", self.warmup_epochs, "0..epochs")
        _require(self.min_lr >= 0 and self.warmup_lr >= 0, "sched.min_lr/warmup_lr", self.min_lr, "values >= 0")


# torch.compile's modes (None: its default).
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainerConfig:
    """How the loop runs: precision, accumulation, EMA, evaluation, checkpoints, fault handling.

    Args:
        device: "auto", "cpu" or "cuda".
        precision: "fp32", "bf16" (autocast) or "fp16" (autocast with a GradScaler).
        compile: compile the model with `torch.compile`.
        compile_scope: "model" (the whole model, one graph) or "blocks" (each transformer block in place, regional
            compilation: PACE-ViT's blocks share one compiled frame, so it compiles in about the time of one).
        compile_mode: a `torch.compile` mode, e.g. "reduce-overhead" (CUDA graphs: with compile_scope=blocks each
            block replays as one graph; the sketches are redrawn in place, so the graphs stay valid) or null.
        channels_last: channels-last memory format for images and model.
        grad_accum_steps: micro-batches per optimizer update.
        sync_batchnorm: convert BatchNorm to SyncBatchNorm under DDP.
        ema: keep a timm ModelEmaV3 of the weights.
        ema_decay: EMA decay per update.
        ema_warmup: timm's EMA decay warm-up.
        eval_ema: evaluate the EMA weights as well (metrics under `ema/`).
        limit_train_batches: cap on micro-batches per epoch (short runs and tests).
        limit_eval_batches: cap on evaluation batches.
        log_every_steps: optimizer updates between metric records.
        telemetry_every_steps: optimizer updates between white-box telemetry records (rank 0): each PACE block's
            alpha, beta, tau and the coding rates R, R_c, dR of the tokens of a few fixed held-out images
            (0: off).
        telemetry_images: held-out images the telemetry measures.
        progress_bar: rank-0 tqdm bar, shown only when stderr is a terminal (SLURM logs get the plain log lines).
        ckpt_every_steps: optimizer updates between mid-epoch checkpoints (0: end of epoch only).
        keep_last: how many recent checkpoints to keep.
        keep_best: also keep the checkpoint with the best `best_metric`.
        best_metric: metric that chooses the best checkpoint (higher is better).
        resume: "auto" (latest checkpoint in the run dir, if any, refused when the run-defining config differs),
            "force" (the latest checkpoint whatever the config), "never", or a checkpoint path.
        on_nonfinite: on a non-finite loss or gradient on any rank, "skip" the update (counted) or "stop".
        max_nonfinite_skips: stop after this many skipped updates.
        export_release: write `release/model.safetensors` + `config.json` at the end of training.
        peak_tflops: the device's peak dense TFLOP/s for MFU (None: looked up from the GPU name).
        cpu_threads: torch intra-op threads (None: torch's default, one per core). On a small shared CPU one
            thread beside the data worker avoids oversubscribing the cores.
        rendezvous_timeout_s: how long the ranks wait for each other to join the process group; a rank lost
            before it joins makes the others stop with an error after this time.
        collective_timeout_s: how long a collective waits for every rank once training runs.
    """

    device: str = "auto"
    precision: str = "bf16"
    compile: bool = False
    compile_scope: str = "model"
    compile_mode: str | None = None
    channels_last: bool = False
    grad_accum_steps: int = 1
    sync_batchnorm: bool = True
    ema: bool = True
    ema_decay: float = 0.99996
    ema_warmup: bool = False
    eval_ema: bool = True
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    log_every_steps: int = 50
    telemetry_every_steps: int = 500
    telemetry_images: int = 8
    progress_bar: bool = True
    ckpt_every_steps: int = 1000
    keep_last: int = 3
    keep_best: bool = True
    best_metric: str = "val/top1"
    resume: str = "auto"
    on_nonfinite: str = "skip"
    max_nonfinite_skips: int = 20
    export_release: bool = True
    peak_tflops: float | None = None
    cpu_threads: int | None = None
    rendezvous_timeout_s: float = 300.0
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        _one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("trainer.precision", self.precision, ("fp32", "bf16", "fp16"))
        _one_of("trainer.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        _one_of("trainer.compile_scope", self.compile_scope, ("model", "blocks"))
        _one_of("trainer.compile_mode", self.compile_mode, COMPILE_MODES)
        _require(self.grad_accum_steps >= 1, "trainer.grad_accum_steps", self.grad_accum_steps, "an integer >= 1")
        _require(0.0 < self.ema_decay < 1.0, "trainer.ema_decay", self.ema_decay, "a decay in (0, 1)")
        _require(self.log_every_steps >= 1, "trainer.log_every_steps", self.log_every_steps, ">= 1")
        _require(self.telemetry_every_steps >= 0, "trainer.telemetry_every_steps", self.telemetry_every_steps, ">= 0")
        _require(self.telemetry_images >= 1, "trainer.telemetry_images", self.telemetry_images, ">= 1")
        _require(self.ckpt_every_steps >= 0, "trainer.ckpt_every_steps", self.ckpt_every_steps, ">= 0")
        _require(self.keep_last >= 1, "trainer.keep_last", self.keep_last, ">= 1")
        _require(self.cpu_threads is None or self.cpu_threads >= 1, "trainer.cpu_threads", self.cpu_threads, ">= 1")
        for key in ("rendezvous_timeout_s", "collective_timeout_s"):
            _require(getattr(self, key) > 0, f"trainer.{key}", getattr(self, key), "a positive number of seconds")
        for key in ("limit_train_batches", "limit_eval_batches"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"trainer.{key}", value, "a positive count or null")


@dataclass
class TrainConfig:
    """The whole training job.

    Args:
        name: run name (the default run dir is `runs/<name>`, so the same command resumes the same run).
        seed: base random seed (each rank adds its rank).
        run_dir: output folder shared by all ranks (None: Hydra's output dir, `runs/<name>` by default).
        model: see `ModelConfig`.
        data: see `DataConfig`.
        aug: see `AugConfig`.
        optim: see `OptimConfig`.
        sched: see `SchedConfig`.
        trainer: see `TrainerConfig`.
        distill: see `DistillConfig`.
        logger: see `LoggerConfig`.
        eval: evaluator name -> `EvaluatorConfig` (the `eval` group): what the periodic evaluation scores, each
            entry at its own `every_n_epochs`, the raw weights and (with `trainer.eval_ema`) the EMA weights.
    """

    name: str = "default"
    seed: int = 0
    run_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: dict[str, EvaluatorConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The run dir is runs/<name>: an empty, `.` or `..` part would make it the folder of other runs.
        proper = all(part not in ("", ".", "..") for part in self.name.split("/"))
        _require(proper, "name", self.name, "a run name without empty, '.' or '..' parts (the run dir is runs/<name>)")
        mixing = self.aug.mixup > 0 or self.aug.cutmix > 0
        ok = not mixing or self.data.batch_size % 2 == 0
        _require(ok, "data.batch_size", self.data.batch_size, "an even batch size (Mixup/CutMix pairs images)")
        _require(
            self.model.num_classes == self.data.num_classes,
            "model.num_classes",
            self.model.num_classes,
            f"the data's class count data.num_classes={self.data.num_classes}",
        )
        _require(
            self.data.source != "synthetic" or self.aug.repeated_aug == 1,
            "aug.repeated_aug",
            self.aug.repeated_aug,
            "1 with data.source=synthetic (random tensors, no samples to repeat)",
        )


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (called by the entry point, not at import)."""
    cs = ConfigStore.instance()
    cs.store(name="pace_train_schema", node=TrainConfig)


def _check_known_keys(node: DictConfig, schema: type, path: str) -> None:
    # A `+key=value` override opens the typed node; the schema still decides what exists.
    types = get_type_hints(schema)
    for key in node:
        where = f"{path}.{key}" if path else str(key)
        if key not in types:
            raise UsageError(f"unknown config key {where}{did_you_mean(where, schema_keys(TrainConfig))}")
        sub = node._get_node(key)
        if is_dataclass(types[key]) and isinstance(sub, DictConfig):
            _check_known_keys(sub, types[key], where)


def validate(cfg: DictConfig) -> TrainConfig:
    """Resolve the composed config and build the typed dataclasses, running every `__post_init__` check.

    Args:
        cfg: the composed config (from `@hydra.main` or `hydra.compose`).

    Raises:
        UsageError: naming the first unknown key, or the first key whose value is out of range.
    """
    _check_known_keys(cfg, TrainConfig, "")
    try:
        evaluators_from_config(OmegaConf.to_container(cfg.eval, resolve=True))  # errors name the entry: eval.<name>
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ValueError as e:
        raise UsageError(str(e)) from e
