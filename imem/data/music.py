"""Music corpora: DEAM and PMEmo, read into song tables plus dynamic VA on a regular time grid.

DEAM (Aljanaki et al. 2017): static ``static_annotations_averaged_songs_1_2000.csv`` and
``..._2000_2058.csv`` (``song_id, valence_mean, valence_std, arousal_mean, arousal_std`` on 1-9, headers
with leading spaces), dynamic ``valence.csv`` / ``arousal.csv`` (``song_id, sample_15000ms, ...`` at 2 Hz,
values in [-1, 1], empty cells past a song's end), audio ``MEMD_audio/<id>.mp3`` (the embedded corpus:
``.wav``).

PMEmo (Zhang et al. 2018): ``static_annotations.csv`` (``musicId, Arousal(mean), Valence(mean)``),
``dynamic_annotations.csv`` (``musicId, frameTime, Arousal(mean), Valence(mean)``, frameTime in seconds
from 15.5 s), values in [0, 1]; audio ``chorus/<id>.mp3``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from imem.data.clips import DynamicAnnotations, song_sort_key
from imem.data.common import (
    AUDIO_EXTS,
    audio_duration,
    check_range,
    find_file,
    read_extras,
    stem_index,
    wav_header_seconds,
)
from imem.errors import ImemError

_SAMPLE_COL = re.compile(r"^sample_(\d+)ms$")


@dataclass
class MusicSource:
    name: str
    directory: Path
    songs: pd.DataFrame  # song_id, audio_path, duration_s (NaN unless media checked)
    dynamic: DynamicAnnotations
    scale: tuple[float, float]  # the dynamic annotations' scale
    extras: pd.DataFrame | None  # per clip id: emotion, caption (embedded corpus)


DEAM_OPTIONS = {
    "format": "deam",
    "dir": "DEAM",
    "static_csv": [
        "annotations/static_annotations_averaged_songs_1_2000.csv",
        "annotations/static_annotations_averaged_songs_2000_2058.csv",
    ],
    "valence_csv": "annotations/valence.csv",
    "arousal_csv": "annotations/arousal.csv",
    "audio_dir": "MEMD_audio",
}
PMEMO_OPTIONS = {
    "format": "pmemo",
    "dir": "PMEmo",
    "static_csv": "static_annotations.csv",
    "dynamic_csv": "dynamic_annotations.csv",
    "audio_dir": "chorus",
}


def _options(given: dict, defaults: dict, where: str) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ImemError(f"params: unknown key '{where}.{unknown[0]}' (known: {', '.join(sorted(defaults))})")
    return {**defaults, **given}


def load_music(root: Path, opts: dict, check_media: bool = True) -> MusicSource:
    fmt = str(opts.get("format", "deam")).lower()
    if fmt == "deam":
        return load_deam(root, _options(opts, DEAM_OPTIONS, "prepare.music"), check_media)
    if fmt == "pmemo":
        return load_pmemo(root, _options(opts, PMEMO_OPTIONS, "prepare.music"), check_media)
    raise ImemError(f"params: prepare.music.format = {fmt!r} is not one of: deam, pmemo")


def _read_dynamic_deam(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, skipinitialspace=True)
    df.columns = [str(c).strip() for c in df.columns]
    if "song_id" not in df.columns:
        raise ImemError(f"{path}: no 'song_id' column")
    cols = [c for c in df.columns if _SAMPLE_COL.match(c)]
    if not cols:
        raise ImemError(f"{path}: no 'sample_<ms>ms' columns")
    df["song_id"] = df["song_id"].astype(str).str.strip().str.replace(r"\.0$", "", regex=True)
    return df.set_index("song_id")[cols]


def _grid(frames: dict[str, pd.DataFrame], path_of: dict[str, Path], lo: float, hi: float) -> DynamicAnnotations:
    """Align valence/arousal wide frames (index song id, columns sample times) on one regular grid."""
    v, a = frames["valence"], frames["arousal"]
    only_v = sorted(set(v.index) - set(a.index))
    only_a = sorted(set(a.index) - set(v.index))
    if only_v or only_a:
        sid, missing_in = (only_v[0], "arousal") if only_v else (only_a[0], "valence")
        raise ImemError(f"{path_of[missing_in]}: song {sid} has dynamic annotations for one dimension only")
    times_all = sorted({int(_SAMPLE_COL.match(c).group(1)) for c in list(v.columns) + list(a.columns)})
    times = np.asarray(times_all, dtype=np.int64)
    if len(times) > 1:
        steps = np.diff(times)
        if not (steps == steps[0]).all():
            raise ImemError(f"{path_of['valence']}: sample columns are not on a regular time grid")
    song_ids = sorted(v.index, key=song_sort_key)
    cols = [f"sample_{t}ms" for t in times]
    out = {}
    for dim, df in (("valence", v), ("arousal", a)):
        df = df.reindex(index=song_ids, columns=cols)
        arr = df.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        raw = df.to_numpy(dtype=object)
        # Cells that hold text that is not a number are errors, empty cells are "not annotated".
        bad_text = np.isnan(arr) & pd.notna(raw) & (raw.astype(str) != "")
        out_of_scale = np.isfinite(arr) & ((arr < lo) | (arr > hi))
        # A gap followed by later samples is a hole in the annotation, not the song's end.
        finite = np.isfinite(arr)
        later = np.flip(np.logical_or.accumulate(np.flip(finite, axis=1), axis=1), axis=1)
        hole = ~finite & later
        for mask, why in ((bad_text, "is not a number"), (out_of_scale, f"is outside the scale [{lo}, {hi}]"),
                          (hole, "is missing inside the annotated span")):
            if mask.any():
                r, c = np.argwhere(mask)[0]
                raise ImemError(f"{path_of[dim]}: song {song_ids[r]}: {cols[c]} = {raw[r, c]!r} {why}")
        out[dim] = arr
    return DynamicAnnotations(song_ids, times, out["valence"], out["arousal"])


def _songs_table(song_ids: list[str], audio_dir: Path, check_media: bool, what: str) -> pd.DataFrame:
    paths, durations, declared = [], [], []
    index = stem_index(audio_dir, AUDIO_EXTS, what) if check_media or audio_dir.is_dir() else {}
    for sid in song_ids:
        p = index.get(sid)
        if check_media:
            if p is None:
                raise ImemError(f"{what}: song {sid}: audio file not found: {audio_dir / sid}.(mp3|wav)")
            durations.append(audio_duration(p))
            header = wav_header_seconds(p)
            declared.append(np.nan if header is None else header)
        else:
            durations.append(np.nan)
            declared.append(np.nan)
        paths.append(str(p) if p is not None else "")
    return pd.DataFrame({"song_id": song_ids, "audio_path": paths, "duration_s": durations, "header_s": declared})


def short_songs(music: MusicSource) -> pd.DataFrame:
    """Songs whose audio is shorter than its header declares (a truncated file) or ends before the song's
    last annotated sample: song_id, audio_path, duration_s, needed_s and why (issue 16 item 2). Without
    this check such a song's clips past the audio's end vanish from the split without a word."""
    dyn, songs = music.dynamic, music.songs
    if list(songs["song_id"]) != list(dyn.song_ids):
        raise ImemError(f"{music.directory}: the songs table and the annotations list the songs in another order")
    finite = np.isfinite(dyn.valence) & np.isfinite(dyn.arousal)
    last = finite.shape[1] - 1 - np.argmax(finite[:, ::-1], axis=1)
    needed = np.where(finite.any(axis=1), np.asarray(dyn.times_ms, dtype=float)[last] / 1000.0, 0.0)
    dur = songs["duration_s"].to_numpy(dtype=float)
    header = songs["header_s"].to_numpy(dtype=float) if "header_s" in songs else np.full(len(dur), np.nan)
    slack = 1e-3  # a millisecond: the header rounds to whole frames
    truncated = np.isfinite(header) & (dur < header - slack)
    short = np.isfinite(dur) & (dur < needed - slack)
    rows = []
    for i in np.nonzero(truncated | short)[0]:
        why = (f"the file holds {dur[i]:.2f} s of the {header[i]:.2f} s its header declares (truncated)"
               if truncated[i] else f"the audio ends at {dur[i]:.2f} s, before the last annotated sample at {needed[i]:.2f} s")
        rows.append({"song_id": songs["song_id"].iloc[i], "audio_path": songs["audio_path"].iloc[i],
                     "duration_s": dur[i], "needed_s": needed[i], "why": why})
    return pd.DataFrame(rows, columns=["song_id", "audio_path", "duration_s", "needed_s", "why"])


def load_deam(root: Path, opts: dict, check_media: bool = True) -> MusicSource:
    base = Path(root) / opts["dir"]
    static_files = opts["static_csv"] if isinstance(opts["static_csv"], list) else [opts["static_csv"]]
    for name in static_files:  # read to validate the song-level labels; clips use the dynamic ones
        path = find_file(base, name, "DEAM static annotations")
        df = pd.read_csv(path, skipinitialspace=True)
        df.columns = [str(c).strip() for c in df.columns]
        need = ["song_id", "valence_mean", "arousal_mean"]
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise ImemError(f"{path}: missing column {missing[0]!r}")
        check_range(df, "song_id", ["valence_mean", "arousal_mean"], 1.0, 9.0, str(path))
    paths = {dim: find_file(base, opts[f"{dim}_csv"], f"DEAM dynamic {dim}") for dim in ("valence", "arousal")}
    frames = {dim: _read_dynamic_deam(p) for dim, p in paths.items()}
    dyn = _grid(frames, paths, -1.0, 1.0)
    songs = _songs_table(dyn.song_ids, base / opts["audio_dir"], check_media, "DEAM")
    return MusicSource("deam", base, songs, dyn, (-1.0, 1.0), read_extras(base, "clip_id"))


def load_pmemo(root: Path, opts: dict, check_media: bool = True) -> MusicSource:
    base = Path(root) / opts["dir"]
    spath = find_file(base, opts["static_csv"], "PMEmo static annotations")
    static = pd.read_csv(spath, skipinitialspace=True)
    static.columns = [str(c).strip() for c in static.columns]
    for col in ("musicId", "Arousal(mean)", "Valence(mean)"):
        if col not in static.columns:
            raise ImemError(f"{spath}: missing column {col!r}")
    check_range(static, "musicId", ["Arousal(mean)", "Valence(mean)"], 0.0, 1.0, str(spath))
    dpath = find_file(base, opts["dynamic_csv"], "PMEmo dynamic annotations")
    dyn = pd.read_csv(dpath, skipinitialspace=True)
    dyn.columns = [str(c).strip() for c in dyn.columns]
    for col in ("musicId", "frameTime", "Arousal(mean)", "Valence(mean)"):
        if col not in dyn.columns:
            raise ImemError(f"{dpath}: missing column {col!r}")
    dyn["musicId"] = dyn["musicId"].astype(str).str.strip()
    ms = np.round(pd.to_numeric(dyn["frameTime"], errors="coerce") * 1000)
    if ms.isna().any():
        raise ImemError(f"{dpath}: song {dyn['musicId'][ms.isna()].iloc[0]}: frameTime is not a number")
    dyn["col"] = [f"sample_{int(t)}ms" for t in ms]
    if dyn.duplicated(["musicId", "col"]).any():
        row = dyn[dyn.duplicated(["musicId", "col"])].iloc[0]
        raise ImemError(f"{dpath}: song {row['musicId']}: frameTime {row['frameTime']} appears twice")
    frames = {
        "valence": dyn.pivot(index="musicId", columns="col", values="Valence(mean)"),
        "arousal": dyn.pivot(index="musicId", columns="col", values="Arousal(mean)"),
    }
    grid = _grid(frames, {"valence": dpath, "arousal": dpath}, 0.0, 1.0)
    songs = _songs_table(grid.song_ids, base / opts["audio_dir"], check_media, "PMEmo")
    return MusicSource("pmemo", base, songs, grid, (0.0, 1.0), read_extras(base, "clip_id"))
