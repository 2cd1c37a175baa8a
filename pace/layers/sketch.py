"""Deterministic Gaussian sketches Ω and the module state that schedules them.

The reference draws Ω with an unseeded ``torch.randn`` on every rank, so ranks disagree and evaluation at a new
resolution is not reproducible. Here Ω is a pure function of (base seed, epoch, step, layer, token count,
operator), drawn on the CPU with its own generator: every rank and every device gets the same matrix without
communication, and repeated evaluation calls are bit-identical.
"""

import hashlib
import operator

import torch
from torch import Tensor, nn

SKETCH_SCHEDULES = ("epoch", "step", "fixed")


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

    Schedules: ``"epoch"`` redraws on every :meth:`set_epoch`; ``"step"`` also redraws on every training
    forward (a step counter, reset by :meth:`set_epoch`, enters the seed; a forward recomputed under gradient
    checkpointing would advance it, so do not combine the two); ``"fixed"`` ignores epochs and steps and draws
    once per token count.

    A checkpoint's buffer of any row count loads (the buffer is resized to it) and is used when n matches.

    Under ``torch.compile`` a forward with a stored sketch reads only the buffer: no graph break. :meth:`set_epoch`
    draws the new epoch's sketch for the token count in use eagerly, so epoch changes neither break nor
    recompile the graph. The first forward at a new token count draws inside the graph through one opaque custom
    op (``pace::gaussian_sketch``), then recompiles once to the stored (or cached) path. The ``"step"`` schedule
    draws outside the graph on every training step (a graph break per operator), because a step counter inside
    the graph would recompile it every step.

    Args:
        width: Sketch columns c.
        operator: Name mixed into the seed, distinct per operator of a block.
        layer_idx: Block index mixed into the seed.
        sketch_seed: Model-wide base seed.
        sketch_schedule: ``"epoch"``, ``"step"`` or ``"fixed"``.
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
        self.epoch = 0
        self.step = 0
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
        self.epoch = int(epoch)
        self.step = 0
        if self.sketch_schedule == "fixed":
            return
        self._stored_current = False
        self._derived.clear()
        rows = self.sketch.shape[0]
        if rows and self.sketch.device.type != "meta":
            # In place: the buffer keeps its address, so CUDA graphs that read it stay valid. Every forward of the
            # previous epoch has been backpropagated by now, so nothing saved for a backward changes under it.
            with torch.no_grad():
                self.sketch.copy_(self.derived_sketch(rows))
            self._stored_current = True

    def _schedule_state(self) -> tuple[int, int]:
        if self.sketch_schedule == "fixed":
            return 0, 0
        if self.sketch_schedule == "epoch":
            return self.epoch, 0
        return self.epoch, self.step

    def derived_sketch(self, num_tokens: int) -> Tensor:
        """The sketch derived for ``num_tokens`` rows at the present schedule state, on the buffer's device/dtype.

        Args:
            num_tokens: Rows n.

        Returns:
            Ω of shape (num_tokens, width).
        """
        # The sketch is a function of the token count: under torch.compile with dynamic shapes, operator.index
        # specialises a symbolic count to its value (a guard) where int() would keep it symbolic.
        num_tokens = operator.index(num_tokens)
        epoch, step = self._schedule_state()
        key = (epoch, step, self.sketch.device, self.sketch.dtype)
        cached = self._derived.get(num_tokens)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.sketch_schedule == "step" and torch.compiler.is_compiling():
            # A step counter traced into the graph would recompile it every step; draw outside it instead.
            return self._draw_eagerly(num_tokens)
        seed = derive_sketch_seed(
            self.sketch_seed,
            epoch=epoch,
            step=step,
            layer_idx=self.layer_idx,
            num_tokens=num_tokens,
            operator=self.operator,
        )
        omega = _gaussian_sketch_op(num_tokens, self.sketch_width, seed, key[2], key[3])
        self._derived[num_tokens] = (key, omega)
        return omega

    @torch.compiler.disable
    def _draw_eagerly(self, num_tokens: int) -> Tensor:
        self._derived.pop(num_tokens, None)
        return self.derived_sketch(num_tokens)

    def current_sketch(self, num_tokens: int) -> Tensor:
        """The sketch a forward over ``num_tokens`` tokens uses now (see the class docstring).

        Args:
            num_tokens: Rows n.

        Returns:
            Ω of shape (num_tokens, width).
        """
        redraw_each_step = self.training and self.sketch_schedule == "step"
        if not redraw_each_step and self._stored_current and self.sketch.shape[0] == num_tokens:
            return self.sketch
        omega = self.derived_sketch(num_tokens)
        if self.training:
            # Replace rather than copy in place: a sketch saved for an earlier, not yet backpropagated forward
            # must not change under it.
            self._buffers["sketch"] = omega
            self._stored_current = True
            if redraw_each_step:
                self.step += 1
        return omega

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
        if loaded is not None and len(error_msgs) == num_errors:
            self._stored_current = True
            self._derived.clear()

    def extra_repr(self) -> str:
        return f"sketch_width={self.sketch_width}, schedule={self.sketch_schedule!r}, layer_idx={self.layer_idx}"


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
    pairs = zip(
        (m for m in source.modules() if isinstance(m, SketchedModule)),
        (m for m in target.modules() if isinstance(m, SketchedModule)),
        strict=True,
    )
    for src, dst in pairs:
        dst._buffers["sketch"] = src.sketch.to(device=dst.sketch.device, dtype=dst.sketch.dtype, copy=True)
        dst.epoch, dst.step, dst._stored_current = src.epoch, src.step, src._stored_current
        dst._derived.clear()
