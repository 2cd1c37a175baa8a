"""The model an analysis script looks at: a timm name (random weights), a checkpoint file or a release folder."""

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pace.models.pace_vit import checkpoint_filter_fn

log = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "raw")


def _read(path: Path) -> Any:
    # The authors' DeiT-style checkpoints carry their argparse.Namespace; allow that class and nothing else.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from e


def _weights_of(checkpoint: Mapping, weights: str, path: Path) -> tuple[Mapping, str]:
    ema = checkpoint.get("model_ema")
    raw = checkpoint.get("model")
    if weights == "ema" and not ema:
        raise ValueError(f"{path}: EMA weights asked for, but the checkpoint has no 'model_ema' entry")
    if weights == "raw" and not raw:
        raise ValueError(f"{path}: raw weights asked for, but the checkpoint has no 'model' entry")
    if weights != "raw" and ema:
        return ema, "model_ema"
    if raw:
        return raw, "model"
    return checkpoint, "state_dict"


def load_model(
    source: str | Path,
    *,
    model_name: str | None = None,
    weights: str = "auto",
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, str]:
    """Build a PACE-ViT (or any timm model) to analyse, in evaluation mode on the CPU.

    ``source`` is, in order of precedence:

    * a release folder (``config.json`` + ``model.safetensors``, as the training run exports), or a file in one;
    * a torch checkpoint: a training checkpoint of this project (it names its architecture in ``model_name`` and
      ``model_args``, with ``model`` and ``model_ema`` weights), or a bare state dict or the authors' DeiT-style
      checkpoint, which needs ``model_name`` and goes through the model's ``checkpoint_filter_fn``;
    * otherwise a timm model name, created with random weights (for demonstrations).

    Args:
        source: See above.
        model_name: timm architecture for a checkpoint that does not name its own.
        weights: ``"auto"`` (EMA weights when present), ``"ema"`` or ``"raw"``.
        model_kwargs: Extra ``timm.create_model`` arguments.

    Returns:
        ``(model, description)``; the description names the source and the weights for plot titles and JSON.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    kwargs = dict(model_kwargs or {})
    path = Path(source)
    release = path if path.is_dir() else path.parent
    if path.exists() and (release / "config.json").is_file() and (path.is_dir() or path.suffix == ".safetensors"):
        model = timm.create_model(f"local-dir:{release}", pretrained=True, **kwargs)
        description = f"{model.pretrained_cfg.get('architecture', '?')} ({release})"
    elif path.is_file():
        checkpoint = _read(path)
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{path}: expected a checkpoint dict or a state dict, found {type(checkpoint).__name__}")
        state_dict, which = _weights_of(checkpoint, weights, path)
        name = checkpoint.get("model_name") or model_name
        if name is None:
            raise ValueError(f"{path} does not name its architecture: pass the timm model name (--model)")
        args = {**dict(checkpoint.get("model_args") or {}), **kwargs}
        model = timm.create_model(name, pretrained=False, **args)
        model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=True)
        description = f"{name} ({path.name}, {which} weights)"
    elif path.exists():
        raise ValueError(f"{path} is neither a checkpoint file nor a release folder with config.json")
    elif str(source) in timm.list_models():
        model = timm.create_model(str(source), pretrained=False, **kwargs)
        description = f"{source} (random initialisation)"
        log.warning("%s: random weights; pass a checkpoint to analyse a trained model", source)
    else:
        raise ValueError(f"{source!r} is neither an existing checkpoint/release path nor a timm model name")
    return model.eval(), description
