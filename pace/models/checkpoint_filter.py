"""Checkpoint conversion for PACE-ViT: this project's training files and the authors' DeiT-style checkpoints.

References:
    https://github.com/SHIELD-SKY/PACEAttention (model/ECAttention.py: the authors' key names and coefficients)
"""

import logging

import torch.nn.functional as F
from torch import Tensor, nn

from pace.layers import softplus_inverse

__all__ = ["checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)


_REFERENCE_MARKERS = ("pos_embeder.", ".attn.expandoperator.", ".attn.compressoperator.")
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(state_dict: dict) -> dict:
    # Training checkpoints nest the weights; the raw weights win when a file holds both, because the authors
    # evaluate, select and fine-tune from `model` (PACE_SPEC §6). pace.eval.load_model picks EMA on request.
    for key in _WRAPPER_KEYS:
        inner = state_dict.get(key)
        if isinstance(inner, dict) and inner:
            return _unwrap(inner)
    out = {}
    for k, v in state_dict.items():
        while k.startswith(_PREFIXES):  # DDP and torch.compile wrappers, nested in either order
            k = k.split(".", 1)[1]
        if k != "n_averaged":  # torch.optim.swa_utils.AveragedModel bookkeeping
            out[k] = v
    return out


def _raw_coefficient(y: Tensor, key: str) -> Tensor:
    if not bool((y > 0).all()):
        raise ValueError(
            f"checkpoint_filter_fn: {key}={y.tolist()} is not positive, so it has no softplus-raw value; "
            "create the model with positive_coeffs=False to load this checkpoint"
        )
    return softplus_inverse(y)


def _reference_key(k: str) -> str:
    k = k.replace("pos_embeder.", "pos_embed.")
    k = k.replace(".attn.expandoperator.Omega", ".attn.expand.sketch")
    k = k.replace(".attn.compressoperator.Omega", ".attn.compress.sketch")
    k = k.replace(".attn.compressoperator.Us", ".attn.compress.subspaces")
    k = k.replace(".attn.compressoperator.temperature", ".attn.compress.tau")
    if k.startswith("blocks."):
        k = k.replace(".norm1.", ".norm.")
    return k


def _convert_reference(state_dict: dict, model: nn.Module) -> dict:
    positive = model.positive_coeffs
    out = {}
    for k, v in state_dict.items():
        if k.startswith("cls_attn_blocks.") and ".attn.qkv." in k:
            # timm's class attention keeps q, k and v as separate projections.
            for name, part in zip("qkv", v.reshape(3, -1, *v.shape[1:])):
                out[k.replace(".attn.qkv.", f".attn.{name}.")] = part
            continue
        if k.startswith("blocks.") and k.rsplit(".", 1)[-1] in ("gamma1", "gamma2", "_gamma1_raw", "_gamma2_raw"):
            prefix, name = k.rsplit(".", 1)
            # The reference adds gamma1 * Expand and subtracts gamma2 * Compress: gamma1 is α, gamma2 is β.
            ours = f"{prefix}.attn.{'alpha' if '1' in name else 'beta'}"
            stored_raw = name.startswith("_")
            if stored_raw and not positive:
                v = F.softplus(v.double()).to(v.dtype)
            elif positive and not stored_raw:
                v = _raw_coefficient(v, k)
            out[ours] = v.reshape(())
            continue
        k = _reference_key(k)
        if k.endswith(".attn.compress.tau"):
            v = v.reshape(())
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Convert a checkpoint to this model's state-dict layout.

    Accepts this project's state dicts (bare, or under ``'model'``, ``'state_dict'``, ``'model_ema'``,
    ``'state_dict_ema'``, with DDP / torch.compile prefixes) and the authors' DeiT-style checkpoints (their key
    names, ``gamma1/gamma2`` or softplus ``_gamma1_raw/_gamma2_raw``, ``Omega`` sketches, ``Us``, a (1,)
    ``temperature``). For the authors' format, α/β are converted exactly to the model's coefficient mode and the
    model is switched to the authors' Compress form (``'diag'``), which is what their code computes.

    Of a file holding both, the raw ``'model'`` weights are taken (what the authors evaluate and fine-tune from);
    for the EMA weights pass ``checkpoint['model_ema']`` or use ``pace.eval.load_model(..., weights='ema')``.

    Args:
        state_dict: Loaded checkpoint (any of the layouts above).
        model: The :class:`pace.models.PACEViT` the weights are for.

    Returns:
        A state dict with this model's key names.
    """
    state_dict = _unwrap(state_dict)
    if not any(marker in k for k in state_dict for marker in _REFERENCE_MARKERS):
        return state_dict
    out = _convert_reference(state_dict, model)
    if getattr(model, "compress_form", "diag") != "diag":
        _logger.warning(
            "Loaded a checkpoint in the authors' PACEAttention format: switching the model's Compress operator "
            "from %r to the authors' diagonal form ('diag') so their outputs are reproduced "
            "(set model.compress_form = 'full' to use the paper's projector instead).",
            model.compress_form,
        )
        model.compress_form = "diag"
    return out
