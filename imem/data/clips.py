"""Clip windows over dynamic (per-half-second) VA annotations.

IMEMNet (Zhao et al., ACM MM 2020; authors' answer in linkAmy/IMEMNet issue #2) cuts each song into
2-s clips: clip ``k`` covers seconds ``2(k-1) .. 2k`` and its VA is the mean of the dynamic samples that
fall in that window (four samples at 2 Hz).

Rule used here, which reproduces the published clip ids:

* a window is kept only when every sample it should hold is present and finite (DEAM starts its
  dynamic annotations at 15 s, so window 8 = 14..16 s is incomplete and the first clip is k = 9);
* the window must also lie inside the audio when the audio's duration is known;
* the song's last complete window is dropped. DEAM's 45-s songs are annotated up to 44.5 s, so the
  last complete window is k = 22 (42..44 s); IMEMNet's published ids stop at k = 21, i.e. 13 clips
  k = 9..21 per 45-s song.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class DynamicAnnotations:
    """Dynamic VA on a regular time grid: one row per song, one column per sample time."""

    song_ids: list[str]
    times_ms: np.ndarray  # (n_samples,) int, strictly increasing, regular step
    valence: np.ndarray  # (n_songs, n_samples) float, NaN where not annotated
    arousal: np.ndarray  # (n_songs, n_samples) float, NaN where not annotated

    @property
    def step_ms(self) -> int:
        if len(self.times_ms) < 2:
            return 500
        return int(self.times_ms[1] - self.times_ms[0])


def clip_windows(
    dyn: DynamicAnnotations,
    durations_s: np.ndarray | None = None,
    clip_seconds: float = 2.0,
    drop_last: bool = True,
) -> pd.DataFrame:
    """All kept clip windows of all songs, vectorised over songs.

    Returns a frame with columns ``clip_id, song_id, k, start_s, end_s, valence, arousal`` where the
    labels are the raw (un-normalised) means of the window's samples.
    """
    times = np.asarray(dyn.times_ms, dtype=np.int64)
    step = dyn.step_ms
    clip_ms = int(round(clip_seconds * 1000))
    if clip_ms % step:
        raise ValueError(f"clip_seconds={clip_seconds} is not a multiple of the annotation step {step} ms")
    per = clip_ms // step
    if len(times) == 0:
        return _empty()
    t0 = int(times[0])
    # Windows that could hold any sample: k from the one containing t0 to the one containing t_last.
    k_lo = t0 // clip_ms + 1
    k_hi = int(times[-1]) // clip_ms + 1
    ks = np.arange(k_lo, k_hi + 1)
    # Expected sample times for window k: (k-1)*clip + j*step, j = 0..per-1.
    expected = (ks[:, None] - 1) * clip_ms + np.arange(per)[None, :] * step  # (n_k, per)
    pos = (expected - t0) // step
    on_grid = ((expected - t0) % step == 0) & (pos >= 0) & (pos < len(times))
    window_ok = on_grid.all(axis=1)  # (n_k,) the grid holds every sample of the window
    pos = np.clip(pos, 0, len(times) - 1)

    v = dyn.valence[:, pos]  # (n_songs, n_k, per)
    a = dyn.arousal[:, pos]
    complete = np.isfinite(v).all(axis=2) & np.isfinite(a).all(axis=2) & window_ok[None, :]
    if durations_s is not None:
        ends = ks * clip_seconds
        complete &= ends[None, :] <= np.asarray(durations_s, dtype=float)[:, None] + 1e-9
    if drop_last:
        # Index of the last complete window per song; clear it.
        has_any = complete.any(axis=1)
        last = complete.shape[1] - 1 - np.argmax(complete[:, ::-1], axis=1)
        rows = np.nonzero(has_any)[0]
        complete[rows, last[rows]] = False

    song_idx, k_idx = np.nonzero(complete)
    if len(song_idx) == 0:
        return _empty()
    song_ids = np.asarray(dyn.song_ids, dtype=object)[song_idx]
    k = ks[k_idx]
    return pd.DataFrame(
        {
            "clip_id": [f"{s}-{kk}" for s, kk in zip(song_ids, k, strict=True)],
            "song_id": song_ids,
            "k": k.astype(int),
            "start_s": (k - 1) * clip_seconds,
            "end_s": k * clip_seconds,
            "valence": v[song_idx, k_idx].mean(axis=1),
            "arousal": a[song_idx, k_idx].mean(axis=1),
        }
    )


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in [("clip_id", object), ("song_id", object), ("k", int),
                                             ("start_s", float), ("end_s", float),
                                             ("valence", float), ("arousal", float)]}
    )


def split_clip_id(clip_id: str) -> tuple[str, int]:
    """``'1967-11'`` -> ``('1967', 11)``. Raises ValueError on a malformed id."""
    song, sep, k = str(clip_id).rpartition("-")
    if not sep or not song or not k.isdigit():
        raise ValueError(f"malformed clip id {clip_id!r}: expected '<song_id>-<k>'")
    return song, int(k)


def song_sort_key(song_id) -> tuple:
    """Numeric song ids in numeric order (DEAM: 2 < 10 < 2001), any others after them by text."""
    s = str(song_id)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)
