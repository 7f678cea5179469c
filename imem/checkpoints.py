"""Reading and writing model files safely.

Every file imem writes (``best.pt``, ``last.pt``, a method's ``model.pt``, the frozen-backbone memo) holds
tensors and plain containers only (dicts, lists, tuples, str, int, float, bool, None), so every file imem
reads is loaded with ``torch.load(..., weights_only=True)``: its unpickler refuses any other Python object,
so a crafted ``.pt`` whose pickle would call ``os.system`` is refused instead of run (issue 16 item 1).
:func:`plain` turns what a config may hold (NumPy scalars, paths) into those plain types before a save.

``best.pt`` holds {model, config, epoch}; ``last.pt`` the whole Trainer state (which includes model and
config too). Used by training (resume), evaluation and user-side inference.

A *trained-part* checkpoint (what a tuning trial logs to MLflow, issue 22) is a ``best.pt`` without the tensors
of its frozen backbones: {model (heads and decoders only), config, epoch, backbones}, where ``backbones`` maps
each left-out backbone (``image_backbone``, ``music_backbone`` or ``backbone``) to the sha256 of its tensors.
Frozen backbones are what the config builds (the pretrained file, else the initialisation drawn from
``seed``), so :func:`restore_backbones` rebuilds them and refuses weights whose hash differs.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import OrderedDict
from pathlib import Path, PurePath

import numpy as np
import torch

from imem.errors import ImemError
from imem.io import atomic_path

# the keys of an imem checkpoint's config that evaluation and inference read (anything else is optional)
REQUIRED_CONFIG = ("kind", "variant")


def load_failure(exc: Exception) -> str:
    """The telling line of a ``torch.load`` failure (its messages span many lines with ANSI colours)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:  # the reason follows on the same line or the next one
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            line = rest or (lines[i + 1] if i + 1 < len(lines) else line)
            break
    return line if len(line) <= 200 else line[:197] + "..."


def safe_load(path: str | Path, what: str = "checkpoint"):
    """``torch.load`` with ``weights_only=True`` on the CPU; any failure is one :class:`ImemError` line
    naming the file. A file that needs more than tensors and plain containers is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ImemError(f"{path}: no such {what}") from exc
    except Exception as exc:  # torch raises many kinds (pickle, zip, EOF, ...)
        reason = load_failure(exc)
        if "Unsupported global" in reason or "Unsupported operand" in reason or "weights_only" in str(exc):
            raise ImemError(f"{path}: refused: this {what} holds Python objects beyond tensors and plain "
                            f"containers, which could run code when loaded ({reason}); imem never writes "
                            "such files") from exc
        raise ImemError(f"{path}: not a readable {what} ({reason})") from exc


def plain(obj):
    """``obj`` with NumPy scalars/arrays, paths and sets turned into the plain types ``weights_only``
    loading accepts (tensors and ``torch.Size`` stay as they are)."""
    if isinstance(obj, (torch.Tensor, torch.Size)):
        return obj
    if isinstance(obj, dict):
        out = {plain(k): plain(v) for k, v in obj.items()}
        if not isinstance(obj, OrderedDict):
            return out
        kept = OrderedDict(out)  # an OrderedDict state dict: its type and its version _metadata stay
        if hasattr(obj, "_metadata"):
            kept._metadata = obj._metadata
        return kept
    if type(obj) in (list, tuple):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, (list, tuple)):  # a namedtuple or other subclass: a list
        return [plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def save(obj: dict, path: Path, before_write=None) -> None:
    """torch.save of :func:`plain` ``obj`` through an in-memory buffer, then an atomic write. Saving to the
    temporary file directly would name the archive's top folder after the (random) temp name, so identical
    checkpoints would differ in bytes and DVC hashes would change on every re-run. ``before_write``: called
    with the file's sha256 before it is written (training tags its MLflow run with it: a kill at any point
    leaves a file whose hash the run names, imem.training)."""
    buf = io.BytesIO()
    torch.save(plain(obj), buf)
    if before_write is not None:
        before_write(hashlib.sha256(buf.getbuffer()).hexdigest())
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _encoders_of(kind: object) -> tuple[str, ...]:
    return {"matching": ("image_encoder", "music_encoder"), "unimodal_image": ("image_encoder",),
            "unimodal_music": ("music_encoder",)}.get(str(kind), ())


def read_checkpoint(path: str | Path, keys: tuple[str, ...] = ("model", "config"), complete: bool = False) -> dict:
    """The checkpoint's dict (on the CPU); an unreadable, unsafe, foreign or incomplete file is one error line.
    ``complete``: the config must also hold every ``train.common`` key and the kind's encoders (what training
    and evaluation read); otherwise only its kind and variant are required (enough for ``imem predict``, whose
    loader names any further missing key itself)."""
    ck = safe_load(path)
    if not isinstance(ck, dict) or any(k not in ck for k in keys):
        raise ImemError(f"{path}: not an imem checkpoint (expected a dict with {', '.join(repr(k) for k in keys)})")
    cfg = ck["config"]
    required: tuple[str, ...] = REQUIRED_CONFIG
    if complete and isinstance(cfg, dict):
        from imem.params import Common

        required += tuple(Common.model_fields) + _encoders_of(cfg.get("kind"))
    missing = [k for k in required if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ImemError(f"{path}: the checkpoint's config lacks {', '.join(repr(k) for k in missing)}: "
                        "not a complete imem checkpoint")
    return ck


# --- trained-part checkpoints (frozen backbones left out) -------------------------------------------------

BACKBONES = ("image_backbone", "music_backbone", "backbone")  # MatchingModel's and UnimodalModel's attributes


def state_sha256(state: dict) -> str:
    """sha256 over a state dict's names, shapes, dtypes and bytes, in name order: equal weights, equal hash,
    whatever file or run they came from."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _split(state: dict) -> dict[str, dict]:
    """``state`` by backbone (``BACKBONES``) and ``""`` for everything after them."""
    out: dict[str, dict] = {}
    for k, v in state.items():
        top = k.split(".", 1)[0]
        out.setdefault(top if top in BACKBONES else "", {})[k] = v
    return out


def trained_part(ck: dict) -> dict:
    """``ck`` ({model, config, epoch}) without its backbones' tensors: for a model whose backbones were frozen
    (``fc_only``), the heads and decoders are all that training changed. ``backbones`` records each left-out
    backbone's :func:`state_sha256`."""
    parts = _split(ck["model"])
    return {**{k: v for k, v in ck.items() if k != "model"}, "model": parts.get("", {}),
            "backbones": {name: state_sha256(parts[name]) for name in BACKBONES if name in parts}}


def restore_backbones(ck: dict, model: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``model``; for a trained-part checkpoint (:func:`trained_part`), ``model``'s own
    backbones (built from the config) must hash as the ones it was trained with, else one error line."""
    left_out = ck.get("backbones") or {}
    if left_out:
        mine = _split(model.state_dict())
        for name, digest in left_out.items():
            if state_sha256(mine.get(name, {})) != digest:
                cfg = ck["config"]
                side = {"image_backbone": "image", "music_backbone": "music"}.get(
                    name, str(cfg.get("kind", "")).removeprefix("unimodal_"))
                spec = cfg.get(f"{side}_encoder", {})
                origin = (f"the pretrained file {spec.get('pretrained')}" if isinstance(spec, dict) and spec.get("pretrained")
                          else f"seed {cfg.get('seed')}")
                raise ImemError(f"{path}: a trained-part checkpoint (frozen backbones left out): the {name} rebuilt from "
                                f"{origin} differs from the one it was trained with (sha256 {digest[:12]}...); "
                                "it needs the same pretrained file and imem version")
    missing, unexpected = model.load_state_dict(ck["model"], strict=not left_out)
    stray = [k for k in missing if k.split(".", 1)[0] not in left_out] + list(unexpected)
    if stray:
        raise ImemError(f"{path}: the weights do not fit variant {ck['config'].get('variant')!r}: "
                        f"{'missing' if missing else 'unexpected'} {stray[0]!r}")

