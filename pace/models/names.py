"""Model names a command can build, checked against timm's registry before any work starts."""

from __future__ import annotations

import difflib

import timm

from pace.schema import require

_SOURCES = ("hf-hub:", "local-dir:")  # resolved when the model loads, not by the registry


def require_known_model(key: str, name: str | None) -> None:
    """Fail with one line naming ``key`` unless ``name`` is a registered timm architecture (PACE-ViT's included,
    pretrained tags allowed) or an ``hf-hub:`` / ``local-dir:`` source; None or empty passes (checked elsewhere).

    Args:
        key: the config key (`model.name`).
        name: its value.

    Raises:
        ValueError: an unknown architecture, with the closest registered names.
    """
    if not name or name.startswith(_SOURCES) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    require(False, key, name, f"a timm model name{hint}")
