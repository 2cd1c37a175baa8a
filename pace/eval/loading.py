"""Build a model for evaluation from a timm name, one of our training checkpoints, a release folder, an authors'-
format checkpoint or `hf-hub:`, recording what was loaded so results can name it (and its sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import clean_state_dict, parse_model_name
from torch import nn

from pace.eval.transform import run_eval_settings, set_eval_settings
from pace.layers.sketch import reseed_sketches

log = logging.getLogger(__name__)

_EMA_KEYS = ("model_ema", "state_dict_ema")
_RAW_KEYS = ("model", "state_dict")
WEIGHTS = ("auto", "ema", "raw")
_KIND = {"model_ema": "EMA", "state_dict_ema": "EMA", "model": "raw", "state_dict": "raw"}
_RELEASE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LoadedModel:
    """A model ready for evaluation and a record of where its weights came from.

    Args:
        model: the model, in eval mode, on the CPU.
        name: its timm architecture name.
        source: `timm`, `hf-hub`, `release`, `checkpoint` (ours) or `state_dict` (any other file).
        weights: which weights were loaded: `pretrained`, `random`, `model_ema`, `model`, ...
        files: the local files the weights were read from (for hashing).
        info: extra provenance (hub id, checkpoint epoch, ...).
    """

    model: nn.Module
    name: str
    source: str
    weights: str
    files: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _torch_load(path: Path) -> Any:
    # DeiT-style checkpoints carry their argparse.Namespace; allow that one class and nothing else unpickled.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from e


def _pick_state_dict(checkpoint: Any, weights: str, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint or state dict, found {type(checkpoint).__name__}")
    ema = next((k for k in _EMA_KEYS if checkpoint.get(k) is not None), None)
    raw = next((k for k in _RAW_KEYS if checkpoint.get(k) is not None), None)
    if ema is None and raw is None:
        if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise ValueError(f"{path}: no weights found; expected one of {_EMA_KEYS + _RAW_KEYS} or a plain state dict")
        if weights == "ema":
            raise ValueError(f"{path}: EMA weights asked for, but the file is a plain state dict")
        return dict(checkpoint), "state_dict"
    if weights == "ema" and ema is None:
        raise ValueError(f"{path}: EMA weights asked for, but the checkpoint has none (keys: {sorted(checkpoint)})")
    if weights == "raw" and raw is None:
        raise ValueError(f"{path}: raw weights asked for, but the checkpoint has only {ema}")
    # `auto` takes the raw weights when there are any: the authors evaluate, select their best model and
    # fine-tune from `model` (never `model_ema`), and our trainer picks best.pt by the raw weights' metric.
    key = ema if weights == "ema" or raw is None else raw
    log.info("%s: loaded the %s weights (checkpoint[%r]; model.weights=%s)", path, _KIND[key], key, weights)
    return clean_state_dict(checkpoint[key]), key


def read_weights(path: str | Path, weights: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict a weights file holds, and the entry it came from.

    Args:
        path: a `.safetensors` file (one state dict), or a torch file: one of our training checkpoints, a DeiT-style
            checkpoint (the authors' format), or a plain state dict.
        weights: `auto` (the raw weights, `model` / `state_dict`, when the checkpoint has them, else its EMA
            weights), `ema`, or `raw`.

    Raises:
        ValueError: the file cannot be read weights-only, holds no weights, or lacks the weights asked for.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path), "state_dict"
    return _pick_state_dict(_torch_load(path), weights, path)


def drop_pretrained_state_dict(model: nn.Module) -> None:
    """Forget the state dict passed to timm through `pretrained_cfg_overlay`: timm keeps the pretrained config on
    the model, which would keep a second copy of the weights alive.

    Args:
        model: a model timm created with a `state_dict` overlay.
    """
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)


def _through_filter_fn(
    path: Path, state_dict: dict[str, torch.Tensor], key: str, name: str | None, kwargs: dict[str, Any]
) -> LoadedModel:
    # Any checkpoint that does not name its architecture (e.g. the authors' format) goes through the model's own
    # checkpoint_filter_fn, which timm applies to a passed-through state dict. The class count is pinned so timm
    # cannot silently drop a classifier whose size differs.
    if name is None:
        raise ValueError(f"{path} does not name its architecture; set the model name (e.g. pace_vit_tiny_patch16_224)")
    head = kwargs.get("num_classes", timm.models.get_pretrained_cfg_value(name, "num_classes") or 1000)
    overlay = {"state_dict": state_dict, "num_classes": head}
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    drop_pretrained_state_dict(model)
    return LoadedModel(model, name, "state_dict", key, [path], {})


def _restore_eval_settings(model: nn.Module, config: Any, load_kwargs: Mapping[str, Any]) -> None:
    # The model rebuilt from its arguments has the architecture's default pretrained_cfg (224 px); the run's own
    # evaluation settings live in the resolved config stored beside the weights.
    try:
        data, aug = config["data"], config["aug"]
        settings = run_eval_settings(data["img_size"], aug["crop_pct"], aug["interpolation"])
    except (KeyError, TypeError):
        return  # a checkpoint written without a full config keeps the architecture's defaults
    if load_kwargs.get("img_size") is not None:  # a resolution asked for at load time wins
        size = int(load_kwargs["img_size"])
        settings["input_size"] = (3, size, size)
    set_eval_settings(model, settings)


def _training_position(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    # Our checkpoints keep the loop position under `trainer`: `epoch` counts the epochs completed (the epoch in
    # progress for a mid-epoch checkpoint), `step` the optimizer updates. Other formats keep a top-level `epoch`.
    trainer = checkpoint.get("trainer")
    if isinstance(trainer, Mapping):
        return {"epoch": trainer.get("epoch"), "step": trainer.get("step"), "epoch_batch": trainer.get("batch")}
    return {"epoch": checkpoint.get("epoch")}


def _from_torch_file(path: Path, name: str | None, weights: str, kwargs: dict[str, Any]) -> LoadedModel:
    checkpoint = _torch_load(path)
    state_dict, key = _pick_state_dict(checkpoint, weights, path)
    ours = isinstance(checkpoint, Mapping) and "model_name" in checkpoint
    if ours:
        # A training checkpoint of this project: it names its architecture and arguments; load strictly.
        arch = checkpoint["model_name"]
        if name is not None and parse_model_name(name)[1] != arch:
            raise ValueError(f"{path} holds a {arch!r} model, but model name {name!r} was given")
        args = {**dict(checkpoint.get("model_args") or {}), **kwargs}
        model = timm.create_model(arch, pretrained=False, **args)
        model.load_state_dict(state_dict, strict=True)
        _restore_eval_settings(model, checkpoint.get("config"), kwargs)
        info = {**_training_position(checkpoint), "model_args": args}
        return LoadedModel(model, arch, "checkpoint", key, [path], info)
    return _through_filter_fn(path, state_dict, key, name, kwargs)


def _release_dir(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "config.json").is_file() else None


def _hub_files(hub_id: str) -> list[Path]:
    # The hub caches what it downloaded; hash that copy so results name the exact weights.
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    found = (try_to_load_from_cache(repo, f, revision=revision or None) for f in _RELEASE_WEIGHTS)
    return [Path(p) for p in found if isinstance(p, str)][:1]


def load_model(
    name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights: str = "auto",
    model_kwargs: Mapping[str, Any] | None = None,
    sketch_seed: int | None = None,
) -> LoadedModel:
    """Create a model for evaluation.

    Sources, by `checkpoint`:
      - None: `timm.create_model(name, pretrained=pretrained)`; `name` may be `hf-hub:org/repo` or `local-dir:...`.
      - `hf-hub:org/repo[@revision]`: a timm model on the Hugging Face hub (config.json + weights).
      - a release folder (config.json + model.safetensors, as `timm.models.save_for_hf` writes), or a file in one.
      - a `.pth` / `.pt` / `.bin` / `.safetensors` file: one of our training checkpoints (it names its architecture:
        `model_name`, `model_args`, with `model` and `model_ema` weights; `model` unless `weights='ema'`), or any
        other checkpoint or state dict for architecture `name`, converted by that model's `checkpoint_filter_fn`
        (the authors' format for PACE-ViT).

    Args:
        name: timm architecture (required unless the checkpoint names it).
        checkpoint: see above.
        pretrained: with no checkpoint, load timm's pretrained weights for `name`.
        weights: `auto` (raw `model` weights when the checkpoint has them, else EMA; as the authors evaluate and
            fine-tune), `ema` (`model_ema`), or `raw`. The log says which entry was loaded.
        model_kwargs: extra `timm.create_model` arguments (e.g. `num_classes`, `img_size`).
        sketch_seed: re-seed the model's sketched operators (PACE) with this seed and drop the sketches a checkpoint
            stored, so evaluation uses the sketches derived from it (recorded in `info["sketch_seed"]`). None keeps
            the model's own.

    Raises:
        ValueError: an unknown `weights`, a missing architecture name, a file without usable weights, EMA asked
            for and absent, or a checkpoint whose architecture differs from `name`.
        FileNotFoundError: the checkpoint path does not exist.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    kwargs = dict(model_kwargs or {})
    spec = str(checkpoint) if checkpoint is not None else None
    if spec is None or spec.startswith(("hf-hub:", "local-dir:")):
        target = spec or name
        if target is None:
            raise ValueError("give a model name or a checkpoint")
        source, ident = parse_model_name(target)
        model = timm.create_model(target, pretrained=pretrained or source is not None, **kwargs)
        arch = model.pretrained_cfg.get("architecture", ident)
        if source == "hf-hub":
            loaded = LoadedModel(model, arch, "hf-hub", "pretrained", _hub_files(ident), {"hub_id": ident})
        elif source == "local-dir":
            return load_model(name, checkpoint=Path(ident), weights=weights, model_kwargs=kwargs)
        else:
            loaded = LoadedModel(model, arch, "timm", "pretrained" if pretrained else "random")
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        release = _release_dir(path)
        if release is not None and (path.is_dir() or path.suffix == ".safetensors"):
            model = timm.create_model(f"local-dir:{release}", pretrained=True, **kwargs)
            files = [release / f for f in _RELEASE_WEIGHTS if (release / f).is_file()][:1]
            arch = model.pretrained_cfg.get("architecture", "")
            loaded = LoadedModel(model, arch, "release", "release", files, {"release": str(release)})
        elif path.suffix == ".safetensors":
            loaded = _through_filter_fn(path, *read_weights(path), name, kwargs)
        else:
            loaded = _from_torch_file(path, name, weights, kwargs)
    if sketch_seed is not None:
        reseed_sketches(loaded.model, sketch_seed)
        loaded.info["sketch_seed"] = int(sketch_seed)
        log.info("evaluation sketches derived from sketch seed %d (stored sketches dropped)", sketch_seed)
    loaded.model.eval()
    return loaded
