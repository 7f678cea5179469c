"""An on-disk cache of frozen-backbone outputs, shared by the train stages and the methods (issue 7).

With ``fc_only`` a backbone is never trained, so its outputs for the corpus are a pure function of its
weights, its input spec, the feature store, the rows and the torch version and device
(:func:`imem.training.cache_key`). Several variants and methods run the same seeded ResNet50 over the same
images (cnn, unimodal_image, ACP-Net, MMVA, Emo-CLIM ...); this memo lets the second one read the first
one's outputs instead of spending ~35 s of CPU on them again. Entries are written atomically and named by
the sha256 of the key, so a changed weight, input or store is a miss, never a stale hit.

Where: ``$IMEM_BACKBONE_CACHE`` (a directory; ``off`` disables it), default ``~/.cache/imem/backbones``.
``imem cache clear``-style cleanup is ``rm -r`` of that directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from imem.io import atomic_path


class BackboneMemo:
    """Dict-like (``get``, ``[]=``) store of ``(features, row_index)`` entries keyed by tuples."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.hits = self.misses = 0

    def _path(self, key: tuple) -> Path:
        return self.dir / (hashlib.sha256(json.dumps(list(key)).encode()).hexdigest() + ".pt")

    def get(self, key: tuple, default=None):
        """The entry, or ``default`` when there is none or it cannot be read (then it is recomputed)."""
        path = self._path(key)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # a foreign object: refused, a miss
            feats, rows, idx = obj["features"], obj["rows"], obj["index"]
            index = dict(zip(rows.tolist(), idx.tolist(), strict=True))
        except Exception:  # absent, truncated or foreign: a miss
            self.misses += 1
            return default
        self.hits += 1
        return feats, index

    def __setitem__(self, key: tuple, value) -> None:
        feats, index = value
        rows = torch.tensor(list(index.keys()), dtype=torch.long)
        idx = torch.tensor(list(index.values()), dtype=torch.long)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(key)) as tmp:
            torch.save({"features": feats.contiguous(), "rows": rows, "index": idx}, tmp)


def default_memo() -> BackboneMemo | None:
    """The memo at ``$IMEM_BACKBONE_CACHE`` (default ``~/.cache/imem/backbones``); None when set to ``off``."""
    where = os.environ.get("IMEM_BACKBONE_CACHE", "")
    if where.strip().lower() in ("off", "0", "false", "no"):
        return None
    return BackboneMemo(Path(where) if where else Path.home() / ".cache" / "imem" / "backbones")
