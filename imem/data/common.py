"""Small helpers shared by the corpus loaders: finding files, checking label scales, media headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from imem.errors import ImemError

AUDIO_EXTS = (".wav", ".mp3", ".flac", ".ogg")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def find_file(base: Path, name: str, what: str) -> Path:
    """``base/name`` if it exists, else the single file called ``basename(name)`` anywhere under ``base``.

    The real corpora unpack into deeper trees (DEAM's CSVs sit under
    ``annotations/annotations averaged per song/song_level/``); searching by name lets a user drop the
    distribution folder in unchanged.
    """
    direct = base / name
    if direct.is_file():
        return direct
    matches = sorted(p for p in base.rglob(Path(name).name) if p.is_file()) if base.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ImemError(f"{what}: several files named {Path(name).name!r} under {base}: {matches[0]}, {matches[1]}")
    raise ImemError(f"{what}: file not found: {direct}")


def stem_index(directory: Path, exts: tuple[str, ...], what: str) -> dict[str, Path]:
    """Map file stem -> path for every file under ``directory`` whose extension (any case) is in ``exts``.

    IAPS mixes ``.jpg`` and ``.JPG``; DEAM ships ``.mp3`` (the embedded corpus ``.wav``).
    """
    if not directory.is_dir():
        raise ImemError(f"{what}: directory not found: {directory}")
    index: dict[str, Path] = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.suffix.lower() in exts:
            index.setdefault(p.stem, p)
    return index


def check_range(df: pd.DataFrame, id_col: str, cols: list[str], lo: float, hi: float, where: str) -> None:
    """Every value finite and inside [lo, hi]; otherwise one line naming the file, id and column."""
    for col in cols:
        vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(vals) | (vals < lo) | (vals > hi)
        if bad.any():
            i = int(np.argmax(bad))
            value = df[col].iloc[i]
            value = value.item() if isinstance(value, np.generic) else value  # nan, not np.float64(nan)
            raise ImemError(
                f"{where}: id {df[id_col].iloc[i]}: {col} = {value!r} is "
                f"{'missing or not a number' if not np.isfinite(vals[i]) else f'outside the scale [{lo}, {hi}]'}"
            )


def audio_duration(path: Path) -> float:
    """Duration in seconds from the file header (soundfile reads wav/flac/ogg/mp3 headers)."""
    import soundfile as sf

    try:
        return float(sf.info(str(path)).duration)
    except Exception as exc:  # soundfile raises several types; any of them means unreadable here
        try:
            import warnings

            import librosa

            with warnings.catch_warnings():  # its audioread fallback warns (Future/UserWarning) before failing
                warnings.simplefilter("ignore")
                return float(librosa.get_duration(path=str(path)))
        except Exception:
            raise ImemError(f"unreadable audio file {path}: {str(exc).splitlines()[0]}") from exc


def wav_header_seconds(path: Path) -> float | None:
    """The duration a RIFF/WAVE file's header declares (its ``data`` chunk size over the byte rate), or None
    for other formats and for headers that declare none. libsndfile reports the frames the file really
    holds, so a truncated WAV reads as a short song; comparing the two finds it (issue 16 item 2). Written
    by hand: soundfile and the ``wave`` module expose no declared size (``wave`` reads PCM only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            byte_rate = 0
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                if cid == b"fmt ":
                    fmt = f.read(size)
                    byte_rate = int.from_bytes(fmt[8:12], "little") if len(fmt) >= 12 else 0
                    f.seek(size & 1, 1)
                elif cid == b"data":
                    return size / byte_rate if byte_rate > 0 and size < 0xFFFFFFFF else None
                else:
                    f.seek(size + (size & 1), 1)
    except OSError:
        return None


def check_image(path: Path) -> None:
    """Decode the whole image once: a truncated or corrupt file is refused here, in ``prepare``, not later
    in ``features`` (``Image.verify`` checks the structure but decodes no pixel data)."""
    from imem.features.store import IMAGE_ERRORS, open_image

    try:
        with open_image(path) as im:
            im.load()
    except IMAGE_ERRORS as exc:  # PIL's decompression-bomb error included: one line, not a traceback
        raise ImemError(f"unreadable image file {path}: {str(exc).splitlines()[0]}") from exc


def read_extras(directory: Path, id_col: str) -> pd.DataFrame | None:
    """Optional ``emotions.csv`` / ``captions.csv`` beside a source (the embedded corpus writes them)."""
    frames = []
    for name in ("emotions.csv", "captions.csv"):
        p = directory / name
        if p.is_file():
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
            if id_col not in df.columns:
                raise ImemError(f"{p}: missing column {id_col!r}")
            frames.append(df.drop_duplicates(id_col).set_index(id_col))
    if not frames:
        return None
    return pd.concat(frames, axis=1)
