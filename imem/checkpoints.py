"""Reading the train stage's checkpoints: ``best.pt`` holds {model, config, epoch}, ``last.pt`` the whole
Trainer state (which includes model and config too). Used by evaluation and by user-side inference."""

from __future__ import annotations

from pathlib import Path

import torch

from imem.errors import ImemError


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict (on the CPU); an unreadable file or a foreign one is one error line."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds (pickle, zip, EOF, ...)
        raise ImemError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise ImemError(f"{path}: not an imem checkpoint (expected a dict with 'model' and 'config')")
    return ck
