"""Deterministic Gaussian sketches Ω and the module state that schedules them.

The reference draws Ω with an unseeded ``torch.randn`` on every rank, so ranks disagree and evaluation at a new
resolution is not reproducible. Here Ω is a pure function of (base seed, epoch, step, layer, token count,
operator), drawn on the CPU with its own generator: every rank and every device gets the same matrix without
communication, and repeated evaluation calls are bit-identical.

The ``"reference"`` schedule reproduces when the authors' code redraws (PACE_SPEC §3): one Ω through epoch 0,
then a fresh Ω on every forward from epoch 1 on. Their draws are unseeded and per rank; ours are seeded by
(seed, epoch, forward counter, layer, n, operator), so every rank uses the same Ω and a resumed run draws the
sketches an uninterrupted one would have. Their validation forwards redraw too; ours use one fixed evaluation
sketch unless :func:`set_eval_sketch` asks for a fresh one per forward.
"""

import hashlib
import operator

import torch
from torch import Tensor, nn

SKETCH_SCHEDULES = ("epoch", "step", "fixed", "reference")
# How an evaluation forward of a ``"reference"``-schedule operator picks Ω: one sketch derived from the seed alone
# (the default, deterministic), or a fresh sketch per forward from epoch 1 on, as the authors' validation did.
EVAL_SKETCHES = ("fixed", "fresh")
_EVAL_TAG = "eval"  # appended to the operator name in the seeds of evaluation sketches


@torch.compiler.assume_constant_result
def derive_sketch_seed(base_seed: int, *, epoch: int, step: int, layer_idx: int, num_tokens: int, operator: str) -> int:
    """Seed of one sketch, mixed from everything that selects it.

    A cryptographic hash (not Python's salted ``hash``) keeps it identical across processes and machines, and
    neighbouring tuples give unrelated streams.

    Args:
        base_seed: Model-wide sketch seed.
        epoch: Epoch the sketch belongs to.
        step: Training step within the epoch (0 unless the schedule redraws per step).
        layer_idx: Index of the block that owns the sketch.
        num_tokens: Number of rows of the sketch (tokens per image).
        operator: Name of the operator that uses it (``"expand"``, ``"compress"``).

    Returns:
        A non-negative 63-bit integer for ``torch.Generator.manual_seed``.
    """
    key = f"pace-sketch|{base_seed}|{epoch}|{step}|{layer_idx}|{num_tokens}|{operator}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def gaussian_sketch(
    num_tokens: int,
    width: int,
    *,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard Gaussian matrix Ω (num_tokens × width) drawn on the CPU from ``seed``, then moved.

    Args:
        num_tokens: Rows n.
        width: Columns c.
        seed: Generator seed (see :func:`derive_sketch_seed`).
        device: Target device.
        dtype: Target dtype (the draw itself is float32, so every dtype holds the same values up to rounding).

    Returns:
        Ω of shape (num_tokens, width).
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    omega = torch.randn(num_tokens, width, generator=generator, dtype=torch.float32).to(dtype=dtype)  # (n, c)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        # A copy from pinned memory is asynchronous: redrawing does not stall the host on the GPU queue.
        return omega.pin_memory().to(device, non_blocking=True)
    return omega.to(device)


# A draw inside a compiled forward (the first at a token count) is one opaque graph node, not a graph break: a
# break there would split the compiled frames of every enclosing module for good, not only for that step.
@torch.library.custom_op("pace::gaussian_sketch", mutates_args=())
def _gaussian_sketch_op(num_tokens: int, width: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return gaussian_sketch(num_tokens, width, seed=seed, device=device, dtype=dtype)


@_gaussian_sketch_op.register_fake
def _(num_tokens: int, width: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.empty(num_tokens, width, device=device, dtype=dtype)


class SketchedModule(nn.Module):
    """Base of the operators that own a sketch: a persistent ``sketch`` buffer (n × c) and its schedule.

    Which Ω a forward uses:

    * the stored buffer, when it has n rows and is current (drawn for the present schedule state by a training
      forward, or loaded from a checkpoint and not invalidated since by :meth:`set_epoch`);
    * otherwise the derived sketch for (seed, epoch, step, layer, n, operator), cached per n. A training forward
      stores it in the buffer (so checkpoints hold the last sketch used); an evaluation forward never overwrites
      the buffer, so a loaded checkpoint's sketch survives evaluation at other resolutions.

    Schedules:

    * ``"epoch"`` redraws on every :meth:`set_epoch`;
    * ``"step"`` also redraws on every training forward (a step counter, reset by :meth:`set_epoch`, enters the
      seed);
    * ``"reference"`` is the authors' training (PACE_SPEC §3): one Ω through epoch 0, then a fresh Ω on every
      training forward from epoch 1 on, seeded by (seed, epoch, forward counter, layer, n, operator) where theirs
      is an unseeded per-rank draw. Evaluation forwards use one fixed *evaluation sketch*, derived from (seed,
      layer, n, operator) alone (not from the training state, nor the stored buffer), so every checkpoint of a run
      is evaluated with the same Ω and a different ``sketch_seed`` gives another one. ``eval_sketch = "fresh"``
      (:func:`set_eval_sketch`) instead redraws on every evaluation forward from epoch 1 on, as the authors'
      validation did, from its own seeded counter;
    * ``"fixed"`` ignores epochs and steps and draws once per token count.

    The counters (epoch, training forwards and evaluation forwards since :meth:`set_epoch`) are module state
    (``_extra_state`` in the state dict), so a run resumed from a checkpoint draws the sketches an uninterrupted
    one would; a state dict without it (older checkpoints, the authors' files) loads with the counters at zero.
    A forward recomputed under gradient checkpointing would advance a per-forward counter and see another Ω, so
    ``"step"`` and ``"reference"`` training must not be combined with it.

    A checkpoint's buffer of any row count loads (the buffer is resized to it) and is used when n matches.

    Under ``torch.compile`` a forward with a stored sketch reads only the buffer: no graph break. :meth:`set_epoch`
    draws the new epoch's sketch for the token count in use eagerly, so epoch changes neither break nor
    recompile the graph. A draw that is not stored yet (the first forward at a new token count, and each
    evaluation-sketch forward) happens outside the graph, one graph break per operator, because its seed mixes in
    the layer index and would give every block its own frame; :meth:`store_sketch` (which
    :meth:`pace.models.PACEViT.compile_blocks` calls for the nominal token count) draws beforehand. A per-forward draw
    (``"step"``, and ``"reference"`` from epoch 1) happens outside the graph (a graph break per operator), because
    a counter inside the graph would recompile it every step; ``"reference"`` recompiles once, when epoch 1 starts.

    Args:
        width: Sketch columns c.
        operator: Name mixed into the seed, distinct per operator of a block.
        layer_idx: Block index mixed into the seed.
        sketch_seed: Model-wide base seed.
        sketch_schedule: ``"epoch"``, ``"step"``, ``"fixed"`` or ``"reference"``.
        device: Factory device of the buffer.
        dtype: Factory dtype of the buffer.
    """

    sketch: Tensor

    def __init__(
        self,
        width: int,
        *,
        operator: str,
        layer_idx: int = 0,
        sketch_seed: int = 0,
        sketch_schedule: str = "epoch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if sketch_schedule not in SKETCH_SCHEDULES:
            raise ValueError(f"sketch_schedule must be one of {SKETCH_SCHEDULES}, got {sketch_schedule!r}")
        self.sketch_width = width
        self.operator = operator
        self.layer_idx = layer_idx
        self.sketch_seed = sketch_seed
        self.sketch_schedule = sketch_schedule
        self.eval_sketch = "fixed"
        self.epoch = 0
        self.step = 0
        self.eval_step = 0
        # A bool, not a test of `epoch` in forward: under torch.compile it guards once, not once per epoch.
        self._past_epoch_zero = False
        self._stored_current = False
        self._derived: dict[int, tuple[tuple, Tensor]] = {}
        # Zero rows until a training forward or a checkpoint fills it: nothing to draw at construction.
        self.register_buffer("sketch", torch.empty(0, width, device=device, dtype=dtype), persistent=True)

    def reset_sketch(self) -> None:
        """Forget the stored and cached sketches (the buffer goes back to zero rows)."""
        self._buffers["sketch"] = torch.empty(0, self.sketch_width, device=self.sketch.device, dtype=self.sketch.dtype)
        self._stored_current = False
        self._derived.clear()

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``: forwards use the sketch derived for it (except under ``"fixed"``).

        The new sketch for the token count in use is drawn here, outside any compiled forward, so a compiled
        model sees the same graph and guards in every epoch.

        Args:
            epoch: The new epoch.
        """
        self._set_counters(int(epoch), 0, 0)
        if self.sketch_schedule == "fixed":
            return
        self._stored_current = False
        rows = self.sketch.shape[0]
        if rows and self.sketch.device.type != "meta":
            # In place: the buffer keeps its address, so CUDA graphs that read it stay valid. Every forward of the
            # previous epoch has been backpropagated by now, so nothing saved for a backward changes under it.
            with torch.no_grad():
                self.sketch.copy_(self.derived_sketch(rows, training=True))
            self._stored_current = True

    def _set_counters(self, epoch: int, step: int, eval_step: int) -> None:
        self.epoch, self.step, self.eval_step = epoch, step, eval_step
        self._past_epoch_zero = epoch > 0
        self._derived.clear()

    def _fresh_each_forward(self, training: bool | None = None) -> bool:
        # Whether this forward (training or not; default: the module's mode) draws a new Ω and advances a counter.
        training = self.training if training is None else training
        if self.sketch_schedule == "step":
            return training
        if self.sketch_schedule != "reference" or not self._past_epoch_zero:
            return False
        return training or self.eval_sketch == "fresh"

    def _uses_evaluation_sketch(self) -> bool:
        return self.sketch_schedule == "reference" and not self.training and self.eval_sketch == "fixed"

    def _schedule_state(self, training: bool) -> tuple[int, int, str]:
        # (epoch, step, operator tag) that select the sketch; evaluation sketches get their own tag.
        schedule, eval_tag = self.sketch_schedule, f"{self.operator}/{_EVAL_TAG}"
        if schedule == "fixed":
            return 0, 0, self.operator
        if schedule == "epoch":
            return self.epoch, 0, self.operator
        if schedule == "step":
            return self.epoch, self.step, self.operator
        if not self._past_epoch_zero:  # "reference" in epoch 0: one sketch, evaluation included unless fixed
            return (0, 0, eval_tag) if not training and self.eval_sketch == "fixed" else (0, 0, self.operator)
        if training:
            return self.epoch, self.step, self.operator
        return (self.epoch, self.eval_step, eval_tag) if self.eval_sketch == "fresh" else (0, 0, eval_tag)

    def derived_sketch(self, num_tokens: int, *, training: bool | None = None) -> Tensor:
        """The sketch derived for ``num_tokens`` rows at the present schedule state, on the buffer's device/dtype.

        Args:
            num_tokens: Rows n.
            training: Derive the training (True) or evaluation (False) sketch; default: the module's mode.

        Returns:
            Ω of shape (num_tokens, width).
        """
        # The sketch is a function of the token count: under torch.compile with dynamic shapes, operator.index
        # specialises a symbolic count to its value (a guard) where int() would keep it symbolic.
        num_tokens = operator.index(num_tokens)
        epoch, step, name = self._schedule_state(self.training if training is None else training)
        key = (epoch, step, name, self.sketch.device, self.sketch.dtype)
        cached = self._derived.get(num_tokens)
        if cached is not None and cached[0] == key:
            return cached[1]
        seed = derive_sketch_seed(
            self.sketch_seed,
            epoch=epoch,
            step=step,
            layer_idx=self.layer_idx,
            num_tokens=num_tokens,
            operator=name,
        )
        omega = _gaussian_sketch_op(num_tokens, self.sketch_width, seed, key[3], key[4])
        self._derived[num_tokens] = (key, omega)
        return omega

    @torch.compiler.disable
    def _fresh_sketch(self, num_tokens: int) -> Tensor:
        # Outside any compiled graph: the counter it reads and advances would otherwise recompile every step.
        omega = self.derived_sketch(num_tokens)
        if self.training:
            # Replace rather than copy in place: a sketch saved for an earlier, not yet backpropagated forward
            # must not change under it.
            self._buffers["sketch"] = omega
            self._stored_current = True
            self.step += 1
        else:
            self.eval_step += 1
        return omega

    def current_sketch(self, num_tokens: int) -> Tensor:
        """The sketch a forward over ``num_tokens`` tokens uses now (see the class docstring).

        Args:
            num_tokens: Rows n.

        Returns:
            Ω of shape (num_tokens, width).
        """
        if self._fresh_each_forward():
            return self._fresh_sketch(num_tokens)
        if not self._uses_evaluation_sketch() and self._stored_current and self.sketch.shape[0] == num_tokens:
            return self.sketch
        return self._derive(num_tokens)

    @torch.compiler.disable
    def _derive(self, num_tokens: int) -> Tensor:
        # Outside any compiled graph: the seed mixes in the layer index, so a draw inside the graph would compile
        # one frame per block, and a deep model would exhaust Dynamo's recompile limit and run its blocks eagerly.
        omega = self.derived_sketch(num_tokens)
        if self.training:
            self._buffers["sketch"] = omega
            self._stored_current = True
        return omega

    def store_sketch(self, num_tokens: int) -> None:
        """Draw and store the training sketch for ``num_tokens`` now, as the next training forward would.

        Called before compiling, so that the first compiled forward already reads the stored buffer (no graph
        break). A schedule that draws on every training forward is left alone.

        Args:
            num_tokens: Rows n.
        """
        if self._fresh_each_forward(training=True) or (self._stored_current and self.sketch.shape[0] == num_tokens):
            return
        with torch.no_grad():
            self._buffers["sketch"] = self.derived_sketch(num_tokens, training=True)
        self._stored_current = True

    def get_extra_state(self) -> Tensor:
        """The schedule counters (epoch, training forwards, evaluation forwards), for exact resumption."""
        return torch.tensor([self.epoch, self.step, self.eval_step], dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        """Restore the counters :meth:`get_extra_state` saved.

        Args:
            state: int64 tensor (epoch, step, eval_step).
        """
        epoch, step, eval_step = (int(v) for v in torch.as_tensor(state).reshape(3).tolist())
        self._set_counters(epoch, step, eval_step)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "sketch"
        loaded = state_dict.get(key)
        if (
            isinstance(loaded, Tensor)
            and loaded.dim() == 2
            and loaded.shape[1] == self.sketch_width
            and loaded.shape[0] != self.sketch.shape[0]
        ):
            # A sketch stored at another token count is valid: resize the buffer so the copy below accepts it.
            self._buffers["sketch"] = torch.empty(loaded.shape, device=self.sketch.device, dtype=self.sketch.dtype)
        num_errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        extra = prefix + "_extra_state"
        if extra not in state_dict:
            # Written before the counters were saved (or by the authors' code): start them at zero.
            if extra in missing_keys:
                missing_keys.remove(extra)
            self._set_counters(0, 0, 0)
        if loaded is not None and len(error_msgs) == num_errors:
            self._stored_current = True
            self._derived.clear()

    def extra_repr(self) -> str:
        return f"sketch_width={self.sketch_width}, schedule={self.sketch_schedule!r}, layer_idx={self.layer_idx}"


def _sketched(model: nn.Module) -> list[SketchedModule]:
    return [m for m in model.modules() if isinstance(m, SketchedModule)]


def set_eval_sketch(model: nn.Module, mode: str) -> None:
    """Choose how the ``"reference"``-schedule operators of ``model`` sketch in evaluation forwards.

    Args:
        model: Any module holding sketched operators.
        mode: ``"fixed"`` (one evaluation sketch per seed, layer and n; the default) or ``"fresh"`` (a new seeded
            sketch per evaluation forward from epoch 1 on, as the authors' validation did).
    """
    if mode not in EVAL_SKETCHES:
        raise ValueError(f"eval sketch must be one of {EVAL_SKETCHES}, got {mode!r}")
    for module in _sketched(model):
        module.eval_sketch = mode
        module._derived.clear()


def reseed_sketches(model: nn.Module, seed: int) -> None:
    """Give every sketched operator of ``model`` a new base seed and drop its stored sketches.

    Evaluation forwards then use the sketches derived from ``seed`` (for the schedule state the model was loaded
    with) instead of the ones a checkpoint stored: the way to measure how much accuracy depends on the sketch.

    Args:
        model: Any module holding sketched operators.
        seed: The new model-wide sketch seed.
    """
    for module in _sketched(model):
        module.sketch_seed = int(seed)
        module.reset_sketch()


@torch.no_grad()
def sync_sketches(source: nn.Module, target: nn.Module) -> None:
    """Give every sketched operator of ``target`` the sketch and schedule state of its twin in ``source``.

    For a model copy that is updated from the model's state dict position by position, such as timm's
    ``ModelEmaV3``: its averaging needs equal shapes, and a sketch is a draw, not a quantity to average. Call it
    before each such update; the averaged sketch then equals the model's exactly.

    Args:
        source: The model whose sketches are authoritative.
        target: A structurally identical model (for example the EMA copy).
    """
    pairs = zip(_sketched(source), _sketched(target), strict=True)
    for src, dst in pairs:
        dst._buffers["sketch"] = src.sketch.to(device=dst.sketch.device, dtype=dst.sketch.dtype, copy=True)
        dst._set_counters(src.epoch, src.step, src.eval_step)
        dst._stored_current, dst.eval_sketch = src._stored_current, src.eval_sketch
