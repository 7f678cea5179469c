"""Bootstrap confidence intervals over the test split's songs and images (issue 14).

A comparison of models is only as good as the test split it is measured on. The test items are a sample
of songs and images, so every reported number gets a 95 % percentile-bootstrap interval that resamples
**songs** (all clips of a drawn song together: clips of one song are not independent) and **images**
with replacement, and recomputes the metric on each resample.

Every stage draws the *same* resamples: :func:`make_plan` derives them from the sorted song and image ids
and the seed of ``params.yaml: evaluate.bootstrap`` only, whatever the order of a stage's tables. So the
comparison can pair two models on identical resamples (:func:`paired`): the interval of a difference is
much narrower than the two intervals side by side suggest, because both models face the same hard and
easy items.

A resample is a pair of index arrays into the split's clip and image tables (an item drawn twice appears
twice), so every metric is recomputed exactly as on the full split: regression errors over the pairs and
items of the resample, rankings over its queries and candidates. Chance levels are exact expectations
and are not resampled. Methods with another retrieval unit (CMER-CL's clips and their VA sequences,
Emo-CLIM's classes) use the same clip and image draws.

The files: ``bootstrap.npz`` holds, per row and metric, the values on the ``n`` resamples (key
``<row>|<metric>``) plus ``replicates`` and ``seed``; :func:`save` / :func:`load` write and read it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from imem.errors import ImemError
from imem.io import atomic_path

DEFAULTS = {"n": 1000, "seed": 2026, "level": 0.95}


@dataclass(frozen=True)
class Plan:
    """``n`` resamples of one split: how often each clip (via its song) and each image is drawn."""

    clip_counts: np.ndarray  # (n, n_clips) multiplicity of each clip of the table, in table order
    image_counts: np.ndarray  # (n, n_images)
    seed: int

    @property
    def n(self) -> int:
        return int(self.clip_counts.shape[0])

    def clips(self, b: int) -> np.ndarray:
        """Indices into the clip table of resample ``b`` (a song drawn k times: each of its clips k times)."""
        return np.repeat(np.arange(self.clip_counts.shape[1]), self.clip_counts[b])

    def images(self, b: int) -> np.ndarray:
        return np.repeat(np.arange(self.image_counts.shape[1]), self.image_counts[b])


def _counts(ids: Sequence[str], n: int, seed: int, stream: int) -> np.ndarray:
    """(n, len(ids)): per resample, how often the unit of each entry was drawn (units = sorted unique ids)."""
    ids = np.asarray([str(i) for i in ids])
    units, inverse = np.unique(ids, return_inverse=True)  # sorted: independent of the table's order
    if len(units) == 0:
        return np.zeros((n, 0), dtype=np.int32)
    rng = np.random.default_rng([int(seed), stream])
    drawn = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=n)
    return drawn[:, inverse].astype(np.int32)


def make_plan(song_of_clip: Sequence[str], image_ids: Sequence[str], n: int, seed: int) -> Plan:
    """Resamples of songs (for the clips) and images; music and images draw from separate streams, so a
    music-only method gets the same song draws as a matching model."""
    if int(n) < 1:
        raise ImemError(f"params: evaluate.bootstrap.n = {n!r}: must be an integer >= 1")
    return Plan(_counts(song_of_clip, int(n), seed, 0), _counts(image_ids, int(n), seed, 1), int(seed))


def replicate(score: Callable[[np.ndarray, np.ndarray], dict[str, dict[str, float]]], plan: Plan,
              desc: str = "bootstrap", progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """``score(clip_idx, image_idx) -> {row: {metric: value}}`` on every resample of ``plan``:
    ``{row: {metric: values (n,)}}`` (NaN where a resample left a metric undefined)."""
    out: dict[str, dict[str, list[float]]] = {}
    for b in tqdm(range(plan.n), desc=desc, unit="resample", disable=not progress, mininterval=2.0):
        for row, metrics in score(plan.clips(b), plan.images(b)).items():
            for k, v in metrics.items():
                out.setdefault(row, {}).setdefault(k, [np.nan] * plan.n)[b] = float(v)
    return {row: {k: np.asarray(v, dtype=np.float64) for k, v in m.items()} for row, m in out.items()}


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite resample values; (nan, nan) when none is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    a = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


def intervals(reps: dict[str, np.ndarray], level: float = 0.95) -> dict[str, dict[str, float]]:
    """``{"lo": {metric: ...}, "hi": {...}}``: :func:`interval` of every metric's resample values (rounded to
    6 decimals like the point values; a metric without a finite resample value is left out)."""
    iv = {c: interval(v, level) for c, v in reps.items()}
    return {"lo": {c: round(lo, 6) for c, (lo, _) in iv.items() if np.isfinite(lo)},
            "hi": {c: round(hi, 6) for c, (_, hi) in iv.items() if np.isfinite(hi)}}


def paired(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over resamples where both are finite, and its percentile interval. The two arrays
    must come from the same plan (same resample at the same position)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ImemError(f"paired bootstrap: {a.shape} and {b.shape} resamples (different plans?)")
    d = a - b
    lo, hi = interval(d, level)
    fin = d[np.isfinite(d)]
    return (float(fin.mean()) if len(fin) else float("nan")), lo, hi


def save(path: str | Path, reps: dict[str, dict[str, np.ndarray]], plan: Plan) -> None:
    arrays = {f"{row}|{k}": v.astype(np.float64) for row, m in reps.items() for k, v in m.items()}
    bad = [k for k in arrays if k.count("|") != 1]
    if bad:
        raise ImemError(f"bootstrap: row or metric name {bad[0]!r} contains '|'")
    buf = io.BytesIO()
    np.savez_compressed(buf, replicates=np.int64(plan.n), seed=np.int64(plan.seed), **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def load(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], int, int]:
    """``({row: {metric: values}}, n, seed)`` of a file written by :func:`save`."""
    path = Path(path)
    if not path.is_file():
        raise ImemError(f"{path}: missing (run its stage first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            n, seed = int(z["replicates"]), int(z["seed"])
            out: dict[str, dict[str, np.ndarray]] = {}
            for key in z.files:
                if "|" in key:
                    row, metric = key.split("|")
                    out.setdefault(row, {})[metric] = z[key]
    except (OSError, ValueError, KeyError) as exc:
        raise ImemError(f"{path}: not a bootstrap file ({exc})") from exc
    return out, n, seed


def mean_over(reps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per metric, the mean over several runs (training seeds) of their values on the same resamples."""
    keys = set.intersection(*(set(r) for r in reps)) if reps else set()
    return {k: np.mean(np.stack([r[k] for r in reps]), axis=0) for k in sorted(keys)}
