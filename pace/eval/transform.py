"""The eval transform settings of a model: timm's resolution of its pretrained_cfg, with explicit overrides.

`create_eval_transform(**eval_data_config(model))` (`pace.data.create_eval_transform`) is the one eval transform:
the Trainer records its run's resolution, crop and interpolation in the model's pretrained_cfg
(`set_eval_settings`), and the Trainer, pace-eval and the analysis scripts all build their transform from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from timm.data import resolve_data_config
from torch import nn

_OVERRIDABLE = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def eval_data_config(model: nn.Module, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Resize, crop, interpolation and normalisation for evaluating `model`.

    Values come from the model's pretrained_cfg (`timm.data.resolve_data_config`), except those given in
    `overrides`. A model built for a fixed input size other than its pretrained_cfg's (e.g. `img_size=` passed at
    creation) is evaluated at the size it was built for.

    Args:
        model: a timm model.
        overrides: any of input_size (int or (C, H, W)), crop_pct, crop_mode, interpolation, mean, std; None values
            are ignored.

    Raises:
        ValueError: naming an override key that is not one of the above.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown transform settings {unknown}; known: {list(_OVERRIDABLE)}")
    if isinstance(overrides.get("input_size"), int):
        overrides["input_size"] = (3, overrides["input_size"], overrides["input_size"])
    config = resolve_data_config(args=dict(overrides), model=model)
    built_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if "input_size" not in overrides and built_size is not None and model.pretrained_cfg.get("fixed_input_size"):
        config["input_size"] = (config["input_size"][0], *built_size)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def run_eval_settings(img_size: int, crop_pct: float, interpolation: str) -> dict[str, Any]:
    """The pretrained_cfg entries that describe how a training run evaluated: its resolution, crop and resize.

    Args:
        img_size: the run's square input size (`data.img_size`).
        crop_pct: its evaluation centre-crop fraction (`aug.crop_pct`).
        interpolation: its resize interpolation (`aug.interpolation`).
    """
    size = int(img_size)
    return {"input_size": (3, size, size), "crop_pct": float(crop_pct), "interpolation": interpolation}


def set_eval_settings(model: nn.Module, settings: Mapping[str, Any]) -> None:
    """Record a run's evaluation settings in the model's pretrained_cfg.

    `eval_data_config` (pace-eval, the analysis scripts) and timm's `resolve_data_config` then default to the
    transform the model was trained and evaluated with, and a release exported from the model carries them in its
    `config.json`.

    Args:
        model: a timm model.
        settings: pretrained_cfg entries, as `run_eval_settings` returns them.
    """
    cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **settings}
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's older alias of the same dict
