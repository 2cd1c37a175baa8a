"""The Trainer: an explicit `train_step`, the epoch loop, evaluation, checkpoints, resume and stop signals."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, adaptive_clip_grad
from torch import nn
from tqdm import tqdm

from pace.distributed import DistEnv, all_gather_object, all_reduce_sum_values, broadcast_buffers
from pace.errors import EXIT_REQUEUE as EXIT_REQUEUE
from pace.errors import RunError, set_stop_phase
from pace.eval import Evaluator
from pace.layers import sync_sketches
from pace.train.checkpoint import CheckpointManager, export_release, load_checkpoint, rng_state, set_rng_state
from pace.train.config import TrainerConfig
from pace.train.data_builders import TrainData
from pace.train.distill import DistillationLoss
from pace.train.faults import nan_fault_from_env
from pace.train.metric_logger import MetricLogger
from pace.train.progress import ProgressLine, show_progress_bar
from pace.train.stop_signals import StopSignals
from pace.train.telemetry import first_images, pace_telemetry
from pace.train.throughput import ThroughputMeter

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pace-train-1"


def updates_per_epoch(num_batches: int, options: TrainerConfig) -> int:
    """Optimizer updates per epoch: whole groups of `grad_accum_steps` among the epoch's micro-batches.

    Args:
        num_batches: micro-batches per epoch on this rank.
        options: loop options (`limit_train_batches`, `grad_accum_steps`).
    """
    batches = min(num_batches, options.limit_train_batches or num_batches)
    updates = batches // options.grad_accum_steps
    if updates == 0:
        raise ValueError(
            f"{batches} batches per epoch cannot fill one update of trainer.grad_accum_steps={options.grad_accum_steps}"
        )
    return updates


class PreemptedError(Exception):
    """Raised once the checkpoint requested by SIGTERM/SIGUSR1 is on disk."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped training (the last checkpoint on disk is untouched)."""


@dataclass
class TrainState:
    """Where training stands; with the RNG states it is all a resume needs besides the modules.

    Args:
        epoch: current epoch.
        batch: next micro-batch of the epoch (the data position).
        step: optimizer update slots used so far (skipped updates included).
        nonfinite_skips: updates skipped for a non-finite loss or gradient.
        best_metric: best value of the metric that chooses `best.pt`.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    nonfinite_skips: int = 0
    best_metric: float | None = None


@dataclass
class StepOutput:
    """What one optimizer update produced.

    Args:
        loss: training loss, averaged over micro-batches and ranks.
        grad_norm: total gradient norm before clipping (this rank; identical across ranks under DDP).
        skipped: the update was skipped for a non-finite value.
        stop_requested: some rank received a stop signal.
        images: images this rank processed.
    """

    loss: float
    grad_norm: float
    skipped: bool
    stop_requested: bool
    images: int


# Keyword-only fields, compared by identity: a Trainer holds modules, not values.
@dataclass(kw_only=True, eq=False, repr=False)
class Trainer:
    """Trains a model with DDP-ready objects built elsewhere (see `pace.train.assemble.build_trainer`).

    Args:
        model: the unwrapped model (what checkpoints, EMA and evaluation see).
        train_model: the module the forward pass runs through (DDP- and/or compile-wrapped `model`).
        optimizer: optimizer over `model`'s parameters.
        scheduler: timm scheduler, stepped once per update.
        loss_fn: criterion on (logits, targets).
        train_data: training batches per epoch, resumable at a batch index.
        evaluators: the evaluators of the `eval` group, each run at its own cadence.
        checkpoints: where checkpoints go.
        metrics: metric sink.
        env: this process's place in the job.
        device: the compute device.
        options: loop options (precision, accumulation, cadences, fault handling).
        epochs: epochs to train.
        run_dir: the run directory (release export goes to `release/` in it).
        checkpoint_meta: provenance stored in each checkpoint (model name, model args, resolved config).
        mixup: batch mixer, if any.
        ema: weight EMA, if any.
        clip_grad: gradient clipping threshold (None: off).
        clip_mode: "norm", "value" or "agc".
        meter: throughput meter.
        resume_from: the checkpoint to resume, chosen and checked before the Trainer was built
            (`pace.train.run_identity.select_checkpoint`); None: `trainer.resume` decides.
        distill: knowledge distillation loss (it wraps `loss_fn`; None: `loss_fn` alone).
    """

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    loss_fn: nn.Module
    train_data: TrainData
    evaluators: list[Evaluator]
    checkpoints: CheckpointManager
    metrics: MetricLogger
    env: DistEnv
    device: torch.device
    options: TrainerConfig
    epochs: int
    run_dir: Path
    checkpoint_meta: dict[str, Any]
    mixup: Mixup | None = None
    ema: ModelEmaV3 | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"
    meter: ThroughputMeter | None = None
    resume_from: Path | None = None
    distill: DistillationLoss | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.meter = self.meter or ThroughputMeter(self.device)
        self.state = TrainState()
        self.stop = StopSignals()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.options.precision == "fp16")
        self.updates_per_epoch = updates_per_epoch(self.train_data.batches_per_epoch, self.options)
        self._loss_window: list[float] = []
        self._telemetry_images: torch.Tensor | None = None
        self.progress = ProgressLine(self.epochs, self.updates_per_epoch)
        self._nan_fault = nan_fault_from_env()

    # -- one update ---------------------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        """Autocast for the configured precision (a no-op in fp32)."""
        if self.options.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, scale: float, step: int) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.autocast():
            outputs = self.train_model(images)
            # Distillation: the teacher scores the same (mixed) images; its loss wraps `loss_fn`.
            loss = self.loss_fn(outputs, targets) if self.distill is None else self.distill(images, outputs, targets)
        if self._nan_fault is not None and self._nan_fault.poisons(step, self.env.rank):
            loss = loss * float("nan")
        self.scaler.scale(loss * scale).backward()
        return loss.detach().float()

    def _grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip, mode = self.clip_grad, self.clip_mode
        if clip is not None and mode == "norm":
            return float(torch.nn.utils.clip_grad_norm_(params, clip))
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        if clip is not None and mode == "value":
            torch.nn.utils.clip_grad_value_(params, clip)
        elif clip is not None:
            adaptive_clip_grad(params, clip_factor=clip)
        return norm

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepOutput:
        """One optimizer update over `grad_accum_steps` micro-batches.

        A non-finite loss or gradient on any rank makes every rank skip the update (or stop, per
        `trainer.on_nonfinite`), decided by one all-reduce that also carries the stop-signal flag.

        Args:
            batches: the micro-batches `(images, targets)` of this update.
        """
        self.train_model.train()
        step = self.state.step + 1
        loss_sum = torch.zeros((), device=self.device)
        for i, (images, targets) in enumerate(batches):
            last = i == len(batches) - 1
            # Gradients are all-reduced on the last micro-batch only.
            no_sync = getattr(self.train_model, "no_sync", None)
            with nullcontext() if last or no_sync is None else no_sync():
                loss_sum += self._forward_backward(images, targets, 1.0 / len(batches), step)
        local_loss = float(loss_sum) / len(batches)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        # Under fp16 an infinite gradient with a finite loss is the GradScaler's normal calibration.
        bad = not math.isfinite(local_loss) or (not self.scaler.is_enabled() and not math.isfinite(grad_norm))
        # One collective: how many ranks saw a non-finite value or a stop signal, and the summed loss.
        n_bad, n_stop, loss_total = all_reduce_sum_values(
            [float(bad), float(self.stop.received is not None), local_loss], self.env, self.device
        )
        self.state.step = step
        images = sum(int(b[0].shape[0]) for b in batches)
        if n_bad > 0:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            self._on_nonfinite(step, local_loss, grad_norm)
            return StepOutput(math.nan, grad_norm, True, n_stop > 0, images)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(num_updates=step)
        if self.ema is not None:
            # A sketch is a draw, not a quantity to average: the EMA copy takes the model's own.
            sync_sketches(self.model, self.ema.module)
            self.ema.update(self.model, step=step)
        return StepOutput(loss_total / self.env.world_size, grad_norm, False, n_stop > 0, images)

    def _on_nonfinite(self, step: int, local_loss: float, grad_norm: float) -> None:
        self.state.nonfinite_skips += 1
        where = (
            f"step {step} (epoch {self.state.epoch}, batch {self.state.batch}); on rank {self.env.rank}: "
            f"loss={local_loss}, grad_norm={grad_norm}"
        )
        latest = self.checkpoints.latest()
        if self.options.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient at {where}; last checkpoint {latest} is intact")
        if self.state.nonfinite_skips > self.options.max_nonfinite_skips:
            raise NonFiniteError(
                f"{self.state.nonfinite_skips} non-finite updates (> trainer.max_nonfinite_skips), the last at "
                f"{where}; last checkpoint {latest} is intact"
            )
        log.warning("skipped update: non-finite loss or gradient at %s", where)

    # -- epochs ------------------------------------------------------------------------------------------

    def _next_update(self, batches: Iterator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [next(batches) for _ in range(self.options.grad_accum_steps)]

    def train_epoch(self) -> None:
        """Train from the current data position to the end of the epoch (mid-epoch checkpoints included)."""
        epoch, accum = self.state.epoch, self.options.grad_accum_steps
        if self.state.batch == 0 and hasattr(self.model, "set_epoch"):
            # A mid-epoch resume keeps the sketches restored from the checkpoint.
            self.model.set_epoch(epoch)
        self.train_data.set_epoch(epoch, start_batch=self.state.batch)
        batches = iter(self.train_data)
        bar = tqdm(
            total=self.updates_per_epoch,
            initial=self.state.batch // accum,
            desc=f"epoch {epoch}",
            disable=not show_progress_bar(self.options.progress_bar, self.env.is_main),
            dynamic_ncols=True,
        )
        while self.state.batch < self.updates_per_epoch * accum:
            start = time.perf_counter()
            micro_batches = self._next_update(batches)
            fetched = time.perf_counter()
            # train_step ends in a host sync (the loss and flags it all-reduces), so this timing is the step's.
            out = self.train_step(micro_batches)
            self.meter.add(fetched - start, time.perf_counter() - fetched, out.images)
            self.progress.mark(self.state.step)
            self.state.batch += accum
            self._after_update(out, bar)
            self._telemetry()
            if out.stop_requested:
                self.save_checkpoint()
                raise PreemptedError(f"stop signal: checkpoint at step {self.state.step} written")
            last_update = self.state.batch >= self.updates_per_epoch * accum
            every = self.options.ckpt_every_steps
            if every and self.state.step % every == 0 and not last_update:
                self.save_checkpoint()
        bar.close()

    def _after_update(self, out: StepOutput, bar: tqdm) -> None:
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        if not out.skipped:
            self._loss_window.append(out.loss)
        bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{lr:.2e}", img_s=f"{self.meter.images_per_second():.0f}")
        bar.update(1)
        if self.state.step % self.options.log_every_steps != 0:
            return
        record = {
            "epoch": self.state.epoch,
            "train/loss": sum(self._loss_window) / len(self._loss_window) if self._loss_window else math.nan,
            "train/lr": lr,
            "train/grad_norm": out.grad_norm,
            "train/nonfinite_skips": self.state.nonfinite_skips,
            **self.meter.summary(self.env.world_size),
        }
        self._loss_window.clear()
        self.metrics.log(record, step=self.state.step)
        if self.env.is_main:
            log.info(self.progress.step_line(self.state.epoch, self.state.step, record))

    def _telemetry(self) -> None:
        every = self.options.telemetry_every_steps
        if not every or self.state.step % every or not self.env.is_main or not self.evaluators:
            return
        if self._telemetry_images is None:
            # The first held-out images, fixed for the run.
            images = first_images(self.evaluators[0].data.loader, self.options.telemetry_images)
            self._telemetry_images = images.to(self.device)
        record = pace_telemetry(self.model, self._telemetry_images)
        if record:
            self.metrics.log(record, step=self.state.step)

    def evaluate(self, evaluators: list[Evaluator] | None = None) -> dict[str, float]:
        """Run `evaluators` (default: all) on the raw weights and, if kept, the EMA weights (under `ema/`).

        Returns:
            Each evaluator's metrics (`val/top1`, `real/top1`, ...) with the samples behind each (`val/top1_count`)
            and the number of images it evaluated (`<evaluator>/count`), the same on every rank.
        """
        models = {"": self.model}
        if self.ema is not None and self.options.eval_ema:
            models["ema/"] = self.ema.module
        for model in models.values():
            # Without SyncBatchNorm each rank's BatchNorm statistics (and their EMA) are its own; a resumed rank
            # restarts from rank 0's saved ones. Evaluating rank 0's everywhere (what a checkpoint holds) makes the
            # numbers independent of restarts. Rank 0's training is unaffected; DDP re-broadcasts them anyway.
            broadcast_buffers(model, self.env)
        amp = None if self.options.precision == "fp32" else self.options.precision
        out: dict[str, float] = {}
        for evaluator in self.evaluators if evaluators is None else evaluators:
            for prefix, model in models.items():
                result = evaluator.run(
                    model,
                    device=self.device,
                    amp_dtype=amp,
                    channels_last=self.options.channels_last,
                    env=self.env,
                    limit_batches=self.options.limit_eval_batches,
                )
                out.update(result.log_dict(prefix))
                out[f"{prefix}{evaluator.name}/count"] = result.counts["samples"]
        return out

    def fit(self) -> dict[str, float]:
        """Resume if there is something to resume, train to the last epoch, export the release weights.

        Returns:
            The last evaluation's metrics.

        Raises:
            PreemptedError: after writing the checkpoint a SIGTERM/SIGUSR1 asked for.
            NonFiniteError: on a non-finite loss or gradient (per `trainer.on_nonfinite`).
        """
        self.resume()
        results: dict[str, float] = {}
        with self.stop:
            while self.state.epoch < self.epochs:
                started = time.monotonic()
                self.train_epoch()
                done = self.state.epoch + 1
                results = self.evaluate([e for e in self.evaluators if e.due(done, last=done == self.epochs)])
                if results:
                    self.metrics.log({"epoch": done - 1, **results}, step=self.state.step)
                log.info(self.progress.epoch_line(done - 1, self.state.step, time.monotonic() - started, results))
                self.state.epoch, self.state.batch = done, 0
                self.save_checkpoint(results.get(self.options.best_metric))
        # The loop's handler is gone: a stop signal now exits 75 at once, and a restart finds the last checkpoint.
        set_stop_phase("after the last checkpoint, before the run finished (a restart evaluates and exports again)")
        if not results:
            # Restarted after the final checkpoint: there was nothing left to train, evaluate it again.
            results = self.evaluate()
        if self.options.export_release and self.env.is_main:
            release = self.ema.module if self.ema is not None else self.model
            export_release(release, self.run_dir / "release", self.checkpoint_meta["model_args"])
        return results

    # -- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (a collective: every rank contributes its RNG state)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "trainer": asdict(self.state),
            "rng": all_gather_object(rng_state(), self.env),
            "world_size": self.env.world_size,
            **self.checkpoint_meta,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore what `state_dict` captured.

        Args:
            ckpt: a checkpoint dict from `state_dict`.
        """
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a training checkpoint of this trainer (format {ckpt.get('format')!r})")
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.ema is not None and ckpt["model_ema"] is not None:
                self.ema.module.load_state_dict(ckpt["model_ema"])
        except RuntimeError as e:
            # Same architecture name, other arguments (class count, depth, ...): torch's message is a page long.
            saved = f"{ckpt.get('model_name')!r} with {ckpt.get('model_args')}"
            current = f"{self.checkpoint_meta.get('model_name')!r} with {self.checkpoint_meta.get('model_args')}"
            raise RunError(
                f"the checkpoint's weights ({saved}) do not fit this run's model ({current}): {str(e).splitlines()[0]}"
            ) from e
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["trainer"])
        if ckpt["world_size"] == self.env.world_size:
            set_rng_state(ckpt["rng"][self.env.rank])
        else:
            log.warning(
                "checkpoint written by %d ranks, resuming with %d: RNG streams restart, the run is no longer "
                "bit-identical to an uninterrupted one",
                ckpt["world_size"],
                self.env.world_size,
            )

    def save_checkpoint(self, metric: float | None = None) -> None:
        """Write a checkpoint of the current state (rank 0 writes; all ranks take part).

        Args:
            metric: value of `trainer.best_metric` for this checkpoint, if evaluated.
        """
        is_best = metric is not None and (self.state.best_metric is None or metric > self.state.best_metric)
        if is_best:
            self.state.best_metric = metric
        state = self.state_dict()
        if self.env.is_main:
            self.checkpoints.save(state, self.state.step, is_best=is_best)
        # Both runs of a resume test start a fresh loss window here, so logged means agree.
        self._loss_window.clear()

    def resume(self) -> None:
        """Load the checkpoint `trainer.resume` names ("auto": the run's latest), if any."""
        if self.env.is_main:
            self.checkpoints.remove_partial_files()
        if self.options.resume == "never":
            path = None
        elif self.resume_from is not None:
            path = self.resume_from
        elif self.options.resume in ("auto", "force"):
            path = self.checkpoints.latest()
        else:
            path = Path(self.options.resume)
        if path is None:
            # A fresh start redoes from step 1 whatever an earlier attempt that saved no checkpoint logged.
            self.metrics.truncate_after(0)
            return
        if not path.is_file():
            raise FileNotFoundError(f"trainer.resume={self.options.resume!r}: no checkpoint at {path}")
        self.load_state_dict(load_checkpoint(path))
        self.metrics.truncate_after(self.state.step)
        state = self.state
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, state.epoch, state.batch, state.step)
