"""Regional compilation: each transformer block compiled in place, for PACE-ViT and timm's ViTs alike."""

from torch import nn


def compile_blocks(model: nn.Module, mode: str | None = None, **kwargs) -> None:
    """Compile every transformer block of ``model`` in place (``nn.Module.compile``), leaving the rest eager.

    Blocks that run the same code share one compiled frame, so a deep model compiles in about the time of one block,
    and with ``mode="reduce-overhead"`` each block replays as a CUDA graph. PACE-ViT decides which of its blocks
    (:meth:`pace.models.PACEViT.compile_blocks`); other models need a ``blocks`` container (timm's ViTs, DeiT).

    Args:
        model: the model.
        mode: a ``torch.compile`` mode (None, ``"reduce-overhead"``, ``"max-autotune"``, ...).
        **kwargs: further ``torch.compile`` arguments (``fullgraph``, ``dynamic``, ``backend``, ...).

    Raises:
        ValueError: the model has neither ``compile_blocks`` nor ``blocks``.
    """
    if hasattr(model, "compile_blocks"):
        model.compile_blocks(mode=mode, **kwargs)
        return
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `blocks` to compile one by one: use trainer.compile_scope=model"
        )
    for blk in blocks:
        blk.compile(mode=mode, **kwargs)
