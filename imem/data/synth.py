"""The embedded corpus: a generated stand-in for DEAM, IAPS, NAPS and EMOTIC in their own file formats.

The real corpora cannot be downloaded here, so ``imem synth`` writes a corpus that the loaders read
through the same code path as the real thing. It is *generated data, not real data*: every item has a
latent valence-arousal (VA) point in [0, 1]^2, the annotation files hold that latent VA plus rater noise
(std ``label_noise`` on the [0, 1] scale) mapped to each file's rating scale, and the media (audio,
images) are rendered from the latent VA with simple, learnable but noisy cues:

* music (rendered from the latent VA trajectory, which drifts within a song by about +-0.1):
  arousal -> tempo (about 60-180 bpm), notes per beat, loudness, brightness (harmonic roll-off of the
  wavetables) and percussion (kick, snare and hi-hat noise bursts); valence -> major vs minor mode,
  consonance (minor seconds and tritones added to the chords at low valence) and register (the melody
  sits higher for higher valence);
* images: valence -> hue warmth (blue/purple for low, red/orange/yellow for high valence), brightness
  and saturation; arousal -> spatial frequency and contrast of oriented sinusoidal gratings and the
  number of hard-edged shapes (calm images are also slightly blurred).

Layout (``out`` is the corpus root)::

    README.txt                                   generated embedded corpus, not real data; seed, sizes
    DEAM/MEMD_audio/<song_id>.wav                mono PCM_16, ``sample_rate`` Hz; 45 s or a long song
    DEAM/annotations/static_annotations_averaged_songs_1_2000.csv      ids 2..2000 (45-s songs)
    DEAM/annotations/static_annotations_averaged_songs_2000_2058.csv   ids 2001..2058 (long songs)
    DEAM/annotations/valence.csv, arousal.csv    dynamic, 2 Hz from 15000 ms, [-1, 1], empty cells
                                                 after a song's last sample
    DEAM/captions.csv                            clip_id,caption (one per clip of ``clip_windows``)
    DEAM/emotions.csv                            clip_id,emotion (MUSIC_EMOTIONS)
    IAPS/AllSubjects_1-20.txt                    7 preamble lines, then a tab-separated table
    IAPS/images/<IAPS id>.jpg                    about 1 in 20 with the extension .JPG
    IAPS/emotions.csv, NAPS/emotions.csv, EMOTIC/emotions.csv    image_id,emotion (IMAGE_EMOTIONS)
    NAPS/NAPS_ratings.csv                        CSV export of the NAPS .xls; ``_v`` images are portrait
    NAPS/images/<ID>.jpg
    EMOTIC/Annotations.mat                       MATLAB v5 struct arrays ``train``, ``val``, ``test``
    EMOTIC/images/<folder>/<filename>            e.g. images/mscoco/images/COCO_train2014_....jpg

A song of duration D s (an integer) is annotated from 15000 ms to ``1000 D - 500`` ms, so by the rule of
:func:`imem.data.clips.clip_windows` it has ``floor(D / 2) - 9`` clips, k = 9 .. floor(D / 2) - 1
(13 clips k = 9..21 for a 45-s song).

Reading ``Annotations.mat``::

    m = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    for split in ("train", "val", "test"):
        for rec in np.atleast_1d(m[split]):          # a 1 x n struct array (squeezed)
            rec.filename, rec.folder                 # 'COCO_train2014_000000318807.jpg', 'mscoco/images'
            rec.image_size.n_col, rec.image_size.n_row    # width, height (doubles)
            rec.original_database.name               # emodb_small | mscoco | ade20k | framesdb
            for person in np.atleast_1d(rec.person):     # 1..3 persons (a lone one is squeezed)
                person.body_bbox                     # (4,) doubles x1 y1 x2 y2
                person.gender, person.age            # 'Male'/'Female', 'Adult'/'Teenager'/'Kid'
                for ann in np.atleast_1d(person.annotations_continuous):  # 1 in train, 2-4 in val/test
                    ann.valence, ann.arousal, ann.dominance               # integers 1..10 (as doubles)

The image id is the filename stem. The file is written by :func:`write_mat5`, a small encoder that
produces the same bytes as ``scipy.io.savemat`` (uncompressed, ``oned_as='row'``; checked in the tests)
except the 116-byte header text, where savemat puts the current time: that would break the byte-for-byte
reproducibility the DVC hash of the corpus relies on, and savemat takes about 20 s for EMOTIC's 23,082
records while the label-only mode must take seconds.

Categorical emotions are a function of the *latent* VA (for clips: the latent mean over the clip's
window), see :func:`image_emotion`::

    v >= 0.5:  a >= 0.65 excitement | 0.45 <= a < 0.65 amusement | a < 0.45 contentment
    v <  0.5:  a >= 0.70 fear       | 0.50 <= a < 0.70 anger     | a < 0.50 sadness

and music clips get the counterpart ``IMAGE_TO_MUSIC_EMOTION[image_emotion(v, a)]``.

Reproducibility: everything is drawn from ``np.random.default_rng`` streams keyed by ``(seed, source,
purpose[, item])`` (:class:`numpy.random.SeedSequence` spawn keys), floats in text files have fixed
formats, files list items in sorted order and hold no timestamps, and outputs of transcendental functions
are rounded to float32 before they are mixed, so that last-bit differences between math libraries do not
reach the quantised audio and pixels. Same params -> byte-identical files (for the same numpy, Pillow and
libsndfile).

Label-only mode (``labels_only=True``) writes only the annotation files at IMEMNet's scale (1,744 45-s
songs + 58 long songs = 1,802 songs with exactly 35,817 clips; 1,182 IAPS + 1,356 NAPS + 23,082 EMOTIC
images), ignoring the size parameters; it runs in seconds and is used by the benchmarks.
"""

from __future__ import annotations

import colorsys
import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from PIL import Image, ImageDraw, ImageFilter
from scipy import special
from tqdm import tqdm

from imem.data.clips import DynamicAnnotations, clip_windows
from imem.errors import ImemError
from imem.io import atomic_dir
from imem.params import section

IMAGE_EMOTIONS = ["excitement", "amusement", "contentment", "anger", "sadness", "fear"]
MUSIC_EMOTIONS = ["exciting", "funny", "happy", "angry", "sad", "scary"]
IMAGE_TO_MUSIC_EMOTION = dict(zip(IMAGE_EMOTIONS, MUSIC_EMOTIONS, strict=True))

# IMEMNet's scale, used by the label-only mode.
IMEMNET = {"songs": 1744, "long_songs": 58, "clips": 35817, "iaps": 1182, "naps": 1356, "emotic": 23082}

FIRST_SAMPLE_MS = 15000  # DEAM's dynamic annotations start at 15 s
STEP_MS = 500  # ... and are sampled at 2 Hz
SONG_SECONDS = 45  # DEAM's excerpts
SHORT_IDS = (2, 2000)  # inclusive id ranges
LONG_IDS = (2001, 2058)

STATIC_HEADER = "song_id, valence_mean, valence_std, arousal_mean, arousal_std"
IAPS_COLUMNS = ["desc", "IAPS", "valmn", "valsd", "aromn", "arosd", "dom1mn", "dom1sd", "dom2mn",
                "dom2sd", "set"]
NAPS_COLUMNS = ["ID", "Category", "Nr", "V/H", "Description", "Valence_M", "Valence_SD", "Arousal_M",
                "Arousal_SD", "Approach-avoidance_M", "Approach-avoidance_SD"]
NAPS_CATEGORIES = {"Animals": 0.22, "Faces": 0.13, "Landscapes": 0.16, "Objects": 0.19, "People": 0.30}
EMOTIC_DATABASES = {"mscoco": 0.62, "ade20k": 0.14, "emodb_small": 0.10, "framesdb": 0.14}

_SRC_DEAM, _SRC_IAPS, _SRC_NAPS, _SRC_EMOTIC = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Small helpers


def _ss(seed: int, *key: int) -> np.random.SeedSequence:
    """An independent stream keyed by ``key`` (stable whatever else is drawn)."""
    return np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(_ss(seed, *key))


def _f32(x):
    """Round to float32 precision (kept as float64): hides last-bit differences of libm/SIMD."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _fmt(values, fmt: str) -> list[str]:
    out = [fmt % x for x in np.asarray(values, dtype=float)]
    zero = fmt % 0.0
    return [zero if s == "-" + zero else s for s in out]


def image_emotion(v, a) -> np.ndarray:
    """Image-taxonomy emotion of latent VA in [0, 1] (vectorised; see the module docstring)."""
    v = np.asarray(v, dtype=float)
    a = np.asarray(a, dtype=float)
    pos = np.where(a >= 0.65, "excitement", np.where(a >= 0.45, "amusement", "contentment"))
    neg = np.where(a >= 0.70, "fear", np.where(a >= 0.50, "anger", "sadness"))
    return np.where(v >= 0.5, pos, neg).astype(object)


def music_emotion(v, a) -> np.ndarray:
    """Music-taxonomy counterpart of :func:`image_emotion`."""
    return np.array([IMAGE_TO_MUSIC_EMOTION[e] for e in np.atleast_1d(image_emotion(v, a))], dtype=object)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")


def _write_frame(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, lineterminator="\n")


def _check_params(p: dict) -> None:
    def integer(key, lo, hi):
        val = p[key]
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or not lo <= val <= hi:
            raise ImemError(f"params: 'synth.{key}' must be an integer in [{lo}, {hi}], got {val!r}")

    integer("seed", 0, 2**63 - 1)
    integer("n_songs", 0, SHORT_IDS[1] - SHORT_IDS[0] + 1)
    integer("n_long_songs", 0, LONG_IDS[1] - LONG_IDS[0] + 1)
    integer("sample_rate", 8000, 192000)
    integer("n_iaps", 0, 9000)
    integer("n_naps", 0, 3000)
    integer("n_emotic", 0, 200000)
    integer("image_width", 16, 4096)
    integer("image_height", 16, 4096)
    lss = p["long_song_seconds"]
    if (not isinstance(lss, (list, tuple)) or len(lss) != 2
            or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in lss)
            or not 20 <= lss[0] <= lss[1] <= 1800):
        raise ImemError(f"params: 'synth.long_song_seconds' must be two integers 20 <= lo <= hi <= 1800 "
                        f"(a long song needs at least 20 s for one clip), got {lss!r}")
    noise = p["label_noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 0.5:
        raise ImemError(f"params: 'synth.label_noise' must be a number in [0, 0.5], got {noise!r}")


# --------------------------------------------------------------------------------------------------
# MATLAB v5 encoder (struct arrays, char arrays, double matrices)

_MI_INT8, _MI_INT32, _MI_UINT32, _MI_DOUBLE, _MI_MATRIX, _MI_UTF8 = 1, 5, 6, 9, 14, 16
_MX_STRUCT, _MX_CHAR, _MX_DOUBLE = 2, 4, 6


@dataclass(frozen=True)
class MatStruct:
    """A 1 x n MATLAB struct array: ``fields`` names, one tuple of values per element.

    Values are ``str`` (char array), ``float``/``int`` (1 x 1 double), a tuple of numbers (1 x k double
    row) or another :class:`MatStruct`.
    """

    fields: tuple[str, ...]
    rows: tuple[tuple, ...]


def _element(mdtype: int, data: bytes) -> bytes:
    n = len(data)
    if n <= 4:
        return struct.pack("<I", (n << 16) | mdtype) + data.ljust(4, b"\0")
    return struct.pack("<II", mdtype, n) + data + b"\0" * (-n % 8)


def _matrix(mclass: int, dims: tuple[int, int], body: bytes, name: bytes = b"") -> bytes:
    content = (struct.pack("<IIII", _MI_UINT32, 8, mclass, 0) + _element(_MI_INT32, struct.pack("<ii", *dims))
               + _element(_MI_INT8, name) + body)
    return struct.pack("<II", _MI_MATRIX, len(content)) + content


def _is_leaf(x) -> bool:
    return isinstance(x, (str, float, int))


@functools.lru_cache(maxsize=1 << 16)
def _encode_cached(value) -> bytes:
    return _encode(value, b"", cache=False)


def _encode(value, name: bytes = b"", cache: bool = True) -> bytes:
    if cache and not name and (_is_leaf(value) or (isinstance(value, MatStruct)
                                                    and all(_is_leaf(x) for row in value.rows for x in row))):
        return _encode_cached(value)
    if isinstance(value, MatStruct):
        length = max(len(f) for f in value.fields) + 1
        names = b"".join(f.encode("ascii").ljust(length, b"\0") for f in value.fields)
        body = [_element(_MI_INT32, struct.pack("<i", length)), _element(_MI_INT8, names)]
        for row in value.rows:
            if len(row) != len(value.fields):
                raise ValueError("MatStruct row does not match its fields")
            body.extend(_encode(x) for x in row)
        n = len(value.rows)
        return _matrix(_MX_STRUCT, (1, n) if n else (0, 0), b"".join(body), name)
    if isinstance(value, str):
        if not value:
            return _matrix(_MX_CHAR, (0, 0), _element(_MI_UTF8, b""), name)
        data = value.encode("ascii")
        return _matrix(_MX_CHAR, (1, len(data)), _element(_MI_UTF8, data), name)
    vals = np.atleast_1d(np.asarray(value, dtype="<f8"))
    if vals.ndim != 1:
        raise ValueError("only scalars and row vectors are supported")
    dims = (1, len(vals)) if len(vals) else (0, 0)
    return _matrix(_MX_DOUBLE, dims, _element(_MI_DOUBLE, vals.tobytes()), name)


def write_mat5(path: str | Path, variables: dict[str, MatStruct], description: str) -> None:
    """A MATLAB 5.0 MAT-file holding ``variables`` (bytes as ``scipy.io.savemat`` writes them, fixed header)."""
    text = f"MATLAB 5.0 MAT-file, {description}".encode("ascii")[:116]
    header = text.ljust(116, b"\0") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    with open(path, "wb") as fh:
        fh.write(header)
        for name, value in variables.items():
            fh.write(_encode(value, name.encode("latin1")))


# --------------------------------------------------------------------------------------------------
# DEAM: songs, latent trajectories, annotations


@dataclass
class _Songs:
    ids: np.ndarray  # (n,) int, sorted
    durations: np.ndarray  # (n,) int seconds
    v: np.ndarray  # (n, G) latent valence on the grid t = 0, 0.5, ... (NaN after the song)
    a: np.ndarray  # (n, G)
    sp: dict[str, np.ndarray]  # per-song rendering parameters, (n,) each

    @property
    def long(self) -> np.ndarray:
        return self.ids > SHORT_IDS[1]


def _partition(rng: np.random.Generator, total: int, n: int) -> np.ndarray:
    """``n`` positive integers summing to ``total`` (largest-remainder rounding of random weights)."""
    if n == 0:
        if total:
            raise ValueError("cannot partition a positive total into no parts")
        return np.zeros(0, dtype=np.int64)
    w = rng.uniform(0.5, 1.5, n)
    exact = 1 + w / w.sum() * (total - n)
    parts = np.floor(exact).astype(np.int64)
    short = total - parts.sum()
    order = np.argsort(-(exact - parts), kind="stable")
    parts[order[:short]] += 1
    return parts


def _drift(rng: np.random.Generator, n: int, t: np.ndarray, std: float = 0.06) -> np.ndarray:
    """Slow random sinusoids (periods 12-70 s), std ``std``: the within-song VA drift."""
    period = rng.uniform(12.0, 70.0, (n, 3))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 3))
    weight = rng.uniform(0.3, 1.0, (n, 3))
    out = np.zeros((n, len(t)))
    for j in range(3):
        out += weight[:, j:j + 1] * _f32(np.sin(2 * np.pi * t[None, :] / period[:, j:j + 1] + phase[:, j:j + 1]))
    return out * (std / np.sqrt((weight**2).sum(axis=1) / 2))[:, None]


def _deam_songs(p: dict, imemnet: bool) -> _Songs:
    """The songs: ``n_songs`` + ``n_long_songs`` of ``p``, or IMEMNet's counts (``imemnet``: 1,744 45-s songs and
    58 long ones whose lengths add up to 35,817 clips in all)."""
    seed = p["seed"]
    rng = _rng(seed, _SRC_DEAM, 0)
    n_short = IMEMNET["songs"] if imemnet else p["n_songs"]
    n_long = IMEMNET["long_songs"] if imemnet else p["n_long_songs"]
    short_ids = np.sort(rng.choice(np.arange(SHORT_IDS[0], SHORT_IDS[1] + 1), n_short, replace=False))
    long_ids = np.sort(rng.choice(np.arange(LONG_IDS[0], LONG_IDS[1] + 1), n_long, replace=False))
    if imemnet:
        per_long = _partition(rng, IMEMNET["clips"] - n_short * (SONG_SECONDS // 2 - 9), n_long)
        long_dur = 2 * (9 + per_long) + rng.integers(0, 2, n_long)
    else:
        lo, hi = p["long_song_seconds"]
        long_dur = rng.integers(lo, hi + 1, n_long)
    ids = np.concatenate([short_ids, long_ids]).astype(np.int64)
    durations = np.concatenate([np.full(n_short, SONG_SECONDS), long_dur]).astype(np.int64)
    n = len(ids)

    # Song-level latent VA: a Gaussian copula with DEAM-like Beta marginals, mildly correlated.
    z = rng.standard_normal((n, 2))
    rho = 0.35
    za = rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1]
    v0 = _f32(special.betaincinv(9.0, 5.5, special.ndtr(z[:, 0])))
    a0 = _f32(special.betaincinv(7.0, 6.0, special.ndtr(za)))
    grid = np.arange(2 * int(durations.max(initial=SONG_SECONDS)) + 1) * 0.5
    v = np.clip(v0[:, None] + _drift(rng, n, grid), 0.02, 0.98)
    a = np.clip(a0[:, None] + _drift(rng, n, grid), 0.02, 0.98)
    after = grid[None, :] > durations[:, None]
    v[after] = np.nan
    a[after] = np.nan
    sp = {
        "tempo_off": rng.normal(0.0, 6.0, n),
        "mode_bias": rng.normal(0.0, 0.05, n),
        "tonic": rng.integers(0, 12, n),
        "reg_off": rng.normal(0.0, 1.5, n),
        "bright_off": rng.normal(0.0, 0.06, n),
        "drum_off": rng.normal(0.0, 0.08, n),
        "prog_major": rng.integers(0, 3, n),
        "prog_minor": rng.integers(0, 3, n),
    }
    return _Songs(ids, durations, v, a, sp)


def _controls(v, a, tempo_off=0.0, mode_bias=0.0, reg_off=0.0, bright_off=0.0, drum_off=0.0) -> dict:
    """The generating parameters of the music at latent VA (vectorised)."""
    v = np.asarray(v, dtype=float)
    a = np.asarray(a, dtype=float)
    return {
        "tempo": np.clip(62.0 + 116.0 * a + tempo_off, 56.0, 184.0),
        "subdiv": np.where(a < 0.38, 1, np.where(a < 0.62, 2, 4)),
        "loud_db": -18.0 + 19.0 * a,
        # timbre: brighter for aroused and for happy music, duller for calm and for sad music (the cues
        # of Juslin & Laukka 2003, Psychol. Bull. 129(5): bright timbre for happiness, dull for sadness)
        "bright": np.clip(0.7 * a + 0.5 * (v - 0.5) + 0.15 + bright_off, 0.0, 1.0),
        "drums": np.clip((a - 0.3) / 0.45 + drum_off, 0.0, 1.0),
        "rest": 0.08 + 0.45 * (1.0 - a),
        "major": (v + mode_bias) >= 0.58,
        "dissonance": np.clip((0.62 - v) / 0.35, 0.0, 1.0),  # consonant above v = 0.62, fully rough at 0.27
        "center": 62.0 + 28.0 * (v - 0.5) + reg_off,  # melody register: about +-4 semitones per std of valence
    }


def _dynamic(songs: _Songs, noise: float, rng: np.random.Generator):
    """Dynamic annotations (noisy, on [-1, 1], rounded to 4 decimals) and the latent ones on [0, 1]."""
    last_ms = 1000 * songs.durations - 500
    times = np.arange(FIRST_SAMPLE_MS, int(last_ms.max(initial=FIRST_SAMPLE_MS)) + 1, STEP_MS)
    idx = times // STEP_MS
    inside = times[None, :] <= last_ms[:, None]
    rho = 0.7

    def one(lat):
        white = rng.standard_normal(lat.shape)
        ar = white.copy()  # AR(1) rater noise with unit variance: annotations lag and wander
        for j in range(1, ar.shape[1]):
            ar[:, j] = rho * ar[:, j - 1] + np.sqrt(1 - rho**2) * white[:, j]
        ann = np.round(np.clip(2.0 * (lat + noise * ar) - 1.0, -1.0, 1.0), 4)
        ann[~inside] = np.nan
        lat = lat.copy()
        lat[~inside] = np.nan
        return ann, lat

    v_ann, v_lat = one(songs.v[:, idx])
    a_ann, a_lat = one(songs.a[:, idx])
    names = [str(i) for i in songs.ids]
    return (DynamicAnnotations(names, times, v_ann, a_ann), DynamicAnnotations(names, times, v_lat, a_lat))


_WORDS = {
    "arousal": [["calm", "slow", "gentle", "relaxed", "quiet-paced"],
                ["steady", "moderate", "easygoing", "mid-tempo"],
                ["lively", "upbeat", "energetic", "bouncy"],
                ["intense", "driving", "frantic", "restless"]],
    "bright": [["dark", "mellow", "muted"], ["warm", "rounded", "soft-edged"], ["bright", "brilliant", "crisp"]],
    "loud": [["soft", "quiet", "hushed"], ["moderately loud", "medium-loud"], ["loud", "powerful", "forceful"]],
    "drums": [["no drums", "no percussion"], ["a light kick", "light percussion"],
              ["a steady beat", "steady drums"], ["busy drums", "pounding drums", "driving percussion"]],
    "register": [["low", "deep"], ["middle", "mid"], ["high", "lofty"]],
    "diss": [["consonant harmony", "clean consonant chords", "sweet harmonies"],
             ["a touch of tension", "some tense chords"],
             ["dissonant clashing chords", "harsh dissonances", "tense, dissonant harmony"]],
}
_TEMPLATES = [
    "{art} {arousal} piece at about {bpm} bpm in a {mode} key, {bright} and {loud} with {drums}, "
    "in a {register} register",
    "{Mode} {arousal} music around {bpm} bpm: {bright}, {loud}, {drums}; the melody sits in a {register} "
    "register, {diss}",
    "about {bpm} beats per minute, {arousal} and {bright}, {mode} mode, {drums}, {diss}, {register} melody",
    "{Art} {loud}, {bright} {mode}-key track with {drums} at roughly {bpm} bpm; {register} register, {diss}",
    "{Arousal} {mode} tune, {bpm} bpm or so, {drums}, {bright} timbre, {diss}",
]


def _captions(clips: pd.DataFrame, songs: _Songs, seed: int) -> list[str]:
    """One caption per clip from the generating parameters at the clip's latent mean VA."""
    row = pd.Index(songs.ids.astype(str)).get_indexer(clips["song_id"].astype(str))
    sp = {k: np.asarray(val)[row] for k, val in songs.sp.items()}
    c = _controls(clips["valence"].to_numpy(), clips["arousal"].to_numpy(), sp["tempo_off"],
                  sp["mode_bias"], sp["reg_off"], sp["bright_off"], sp["drum_off"])
    a = clips["arousal"].to_numpy()
    levels = {
        "arousal": np.digitize(a, [0.38, 0.52, 0.66]),
        "bright": np.digitize(c["bright"], [0.4, 0.62]),
        "loud": np.digitize(c["loud_db"], [-11.0, -5.0]),
        "drums": np.digitize(c["drums"], [0.05, 0.35, 0.6]),
        "register": np.digitize(c["center"], [59.0, 65.0]),
        "diss": np.digitize(c["dissonance"], [0.15, 0.5]),
    }
    rng = _rng(seed, _SRC_DEAM, 5)
    n = len(clips)
    pick = rng.integers(0, 1 << 30, (n, len(levels) + 1))
    out = []
    for i in range(n):
        w = {key: _WORDS[key][int(lv[i])][pick[i, j] % len(_WORDS[key][int(lv[i])])]
             for j, (key, lv) in enumerate(levels.items())}
        mode = "major" if c["major"][i] else "minor"
        bpm = int(5 * round(c["tempo"][i] / 5))
        art = "an" if w["arousal"][0] in "aeiou" else "a"
        art2 = "an" if w["loud"][0] in "aeiou" else "a"
        tpl = _TEMPLATES[pick[i, -1] % len(_TEMPLATES)]
        text = tpl.format(art=art, Art=art2.capitalize(), arousal=w["arousal"], Arousal=w["arousal"].capitalize(),
                          bpm=bpm, mode=mode, Mode=mode.capitalize(), bright=w["bright"], loud=w["loud"],
                          drums=w["drums"], register=w["register"], diss=w["diss"])
        out.append(text[0].upper() + text[1:])
    return out


def _write_deam(root: Path, songs: _Songs, p: dict, labels_only: bool, progress: bool, imemnet: bool = False) -> dict:
    seed, noise = p["seed"], float(p["label_noise"])
    rng = _rng(seed, _SRC_DEAM, 1)
    dyn, lat = _dynamic(songs, noise, rng)
    durations = songs.durations.astype(float)
    clips = clip_windows(dyn, durations)
    latent_clips = clip_windows(lat, durations)
    if not clips["clip_id"].equals(latent_clips["clip_id"]):
        raise AssertionError("noisy and latent annotations disagree on the clip windows")
    expected = int(np.maximum(songs.durations // 2 - 9, 0).sum())
    if len(clips) != expected or ((labels_only or imemnet) and len(clips) != IMEMNET["clips"]):
        raise AssertionError(f"generated {len(clips)} clips, expected {expected}")

    ann = root / "DEAM" / "annotations"
    ann.mkdir(parents=True)
    # Dynamic: one row per song, empty cells after the song's last sample.
    header = "song_id," + ",".join(f"sample_{t}ms" for t in dyn.times_ms)
    for name, values in (("valence", dyn.valence), ("arousal", dyn.arousal)):
        lines = [header]
        for sid, row in zip(dyn.song_ids, values, strict=True):
            n_valid = int(np.isfinite(row).sum())
            cells = _fmt(row[:n_valid], "%.4f") + [""] * (len(row) - n_valid)
            lines.append(sid + "," + ",".join(cells))
        _write_lines(ann / f"{name}.csv", lines)

    # Static: the song's latent mean + rater noise, on 1..9.
    srng = _rng(seed, _SRC_DEAM, 2)
    n = len(songs.ids)
    v_mean = 1 + 8 * np.clip(np.nanmean(songs.v, axis=1) + noise * srng.standard_normal(n), 0, 1)
    a_mean = 1 + 8 * np.clip(np.nanmean(songs.a, axis=1) + noise * srng.standard_normal(n), 0, 1)
    v_std = np.clip(srng.normal(1.3, 0.25, n), 0.8, 2.0)
    a_std = np.clip(srng.normal(1.35, 0.25, n), 0.8, 2.0)
    cols = [_fmt(x, "%.2f") for x in (v_mean, v_std, a_mean, a_std)]
    rows = [f"{sid}, {vm}, {vs}, {am}, {as_}"
            for sid, vm, vs, am, as_ in zip(songs.ids, *cols, strict=True)]
    is_long = songs.long
    _write_lines(ann / "static_annotations_averaged_songs_1_2000.csv",
                 [STATIC_HEADER] + [r for r, lg in zip(rows, is_long, strict=True) if not lg])
    _write_lines(ann / "static_annotations_averaged_songs_2000_2058.csv",
                 [STATIC_HEADER] + [r for r, lg in zip(rows, is_long, strict=True) if lg])

    _write_frame(root / "DEAM" / "captions.csv",
                 pd.DataFrame({"clip_id": latent_clips["clip_id"], "caption": _captions(latent_clips, songs, seed)}))
    _write_frame(root / "DEAM" / "emotions.csv",
                 pd.DataFrame({"clip_id": latent_clips["clip_id"],
                               "emotion": music_emotion(latent_clips["valence"], latent_clips["arousal"])}))

    if not labels_only:
        audio = root / "DEAM" / "MEMD_audio"
        audio.mkdir(parents=True)
        grid = np.arange(songs.v.shape[1]) * 0.5
        for i in tqdm(range(n), desc="synth: songs", unit="song", disable=not progress):
            sp = {k: val[i] for k, val in songs.sp.items()}
            pcm = _render_song(int(p["sample_rate"]), int(songs.durations[i]), grid, songs.v[i], songs.a[i], sp,
                               _rng(seed, _SRC_DEAM, 3, int(songs.ids[i])))
            sf.write(audio / f"{songs.ids[i]}.wav", pcm, int(p["sample_rate"]), subtype="PCM_16", format="WAV")
    return {"songs": n, "long_songs": int(is_long.sum()), "clips": len(clips)}


# --------------------------------------------------------------------------------------------------
# Music rendering

_TABLE_N = 4096
_TABLES: dict[tuple[int, int], np.ndarray] = {}
_MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
_MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)
_PROGRESSIONS = {  # cadential progressions that keep the tonic clear (V is major in minor: harmonic minor)
    True: [[(0, "M"), (5, "M"), (7, "M"), (0, "M")],  # I IV V I
           [(0, "M"), (9, "m"), (5, "M"), (7, "M")],  # I vi IV V
           [(0, "M"), (7, "M"), (0, "M"), (5, "M")]],  # I V I IV
    False: [[(0, "m"), (5, "m"), (7, "M"), (0, "m")],  # i iv V i
            [(0, "m"), (8, "M"), (5, "m"), (7, "M")],  # i VI iv V
            [(0, "m"), (7, "M"), (0, "m"), (5, "m")]],  # i V i iv
}
_TRIADS = {"M": (0, 4, 7), "m": (0, 3, 7)}


def _table(level: int, n_harm: int) -> np.ndarray:
    """One period of a waveform with ``n_harm`` harmonics, roll-off 1/h^p (p from 2.6 dark to 0.9 bright)."""
    key = (level, n_harm)
    if key not in _TABLES:
        x = np.arange(_TABLE_N) / _TABLE_N
        p = 2.6 - 1.7 * level / 7
        tab = np.zeros(_TABLE_N)
        for h in range(1, n_harm + 1):
            tab += h ** -p * np.sin(2 * np.pi * h * x)
        _TABLES[key] = _f32(tab / np.abs(tab).max())
    return _TABLES[key]


_ENVELOPES: dict[tuple[int, float], np.ndarray] = {}


def _decay(sr: int, tau: float, n: int) -> np.ndarray:
    """``exp(-t / tau)`` for the first ``n`` samples (cached per tau, float32-rounded)."""
    key = (sr, tau)
    env = _ENVELOPES.get(key)
    if env is None or len(env) < n:
        length = max(n, sr) if env is None else max(n, 2 * len(env))
        env = _f32(np.exp(-np.arange(length) / (tau * sr)))
        _ENVELOPES[key] = env
    return env[:n]


class _Mixer:
    """Adds wavetable notes and percussion samples into one mono buffer."""

    PHASE_BITS = 20

    def __init__(self, sr: int, seconds: int):
        self.sr = sr
        self.out = np.zeros(sr * seconds)

    def add(self, t0: float, wave: np.ndarray, gain: float) -> None:
        s = int(round(t0 * self.sr))
        n = min(len(wave), len(self.out) - s)
        if n > 0 and s >= 0:
            self.out[s:s + n] += gain * wave[:n]

    def note(self, t0: float, seconds: float, midi: float, gain: float, level: int, tau: float,
             attack: float = 0.005, phase: float = 0.0) -> None:
        s = int(round(t0 * self.sr))
        n = min(int(seconds * self.sr), len(self.out) - s)
        if n <= 16:
            return
        f0 = 440.0 * 2.0 ** ((midi - 69.0) / 12.0)
        n_harm = int(max(1, min(24, 0.45 * self.sr // f0)))
        # Fixed-point phase accumulator: exact integer arithmetic, no float modulo.
        inc = int(round(f0 * _TABLE_N / self.sr * (1 << self.PHASE_BITS)))
        start = int(phase * _TABLE_N) << self.PHASE_BITS
        idx = np.arange(n, dtype=np.int64)
        idx *= inc
        idx += start
        idx >>= self.PHASE_BITS
        idx &= _TABLE_N - 1
        wave = _table(int(level), n_harm)[idx]
        env = _decay(self.sr, round(tau, 2), n) * gain
        n_att = min(n, max(1, int(attack * self.sr)))
        env[:n_att] *= np.arange(n_att) / n_att
        rel = min(n - n_att, int(0.008 * self.sr))
        if rel > 0:
            env[n - rel:] *= np.linspace(1.0, 0.0, rel)
        wave *= env
        self.out[s:s + n] += wave


def _drum_kit(sr: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = np.arange(int(0.35 * sr)) / sr
    f = 45.0 + 110.0 * _f32(np.exp(-t / 0.04))
    kick = _f32(np.sin(2 * np.pi * np.cumsum(f) / sr)) * _f32(np.exp(-t / 0.12))
    ts = t[: int(0.2 * sr)]
    snare = (rng.standard_normal(len(ts)) * _f32(np.exp(-ts / 0.05))
             + 0.5 * _f32(np.sin(2 * np.pi * 185.0 * ts)) * _f32(np.exp(-ts / 0.04)))
    th = t[: int(0.06 * sr)]
    hat = np.diff(rng.standard_normal(len(th) + 1)) * _f32(np.exp(-th / 0.012))
    return {"kick": kick, "snare": snare / np.abs(snare).max(), "hat": hat / np.abs(hat).max()}


def _render_song(sr: int, seconds: int, grid: np.ndarray, v_row: np.ndarray, a_row: np.ndarray, sp: dict,
                 rng: np.random.Generator) -> np.ndarray:
    """A song as int16 PCM, rendered from its latent trajectory (see the module docstring)."""
    ok = np.isfinite(v_row)
    grid, v_row, a_row = grid[ok], v_row[ok], a_row[ok]

    def ctl(t):
        return _controls(np.interp(t, grid, v_row), np.interp(t, grid, a_row), sp["tempo_off"], sp["mode_bias"],
                         sp["reg_off"], sp["bright_off"], sp["drum_off"])

    # Beat times: integrate the (drifting) tempo.
    dt = 0.05
    tf = np.arange(0.0, seconds + 4.0, dt)
    cum = np.concatenate([[0.0], np.cumsum(ctl(tf)["tempo"] / 60.0 * dt)])
    beats = np.interp(np.arange(0.0, np.floor(cum[-1])), cum, np.arange(len(cum)) * dt)
    beats = beats[beats < seconds]
    bar_starts = beats[::4]

    mix = _Mixer(sr, seconds)
    kit = _drum_kit(sr, rng)
    tonic = int(sp["tonic"])
    walk = 0
    for b, t0 in enumerate(bar_starts):
        t1 = bar_starts[b + 1] if b + 1 < len(bar_starts) else float(seconds)
        c = ctl(t0)
        major = bool(c["major"])
        center = float(c["center"])
        loud = float(_f32(10 ** (c["loud_db"] / 20)))
        level = int(round(7 * float(c["bright"])))
        prog = _PROGRESSIONS[major][int(sp["prog_major"] if major else sp["prog_minor"])]
        degree, quality = prog[b % 4]
        root_pc = (tonic + degree) % 12
        # Chord in the pad register (an octave under the melody centre), optional dissonance.
        root = center - 12.0 + ((root_pc - (center - 12.0)) % 12 + 6) % 12 - 6
        root = float(np.round(root))
        chord = [root + i for i in _TRIADS[quality]]
        if rng.random() < float(c["dissonance"]):
            chord.append(root + (1 if rng.random() < 0.5 else 6))
        for m in chord:
            mix.note(t0, t1 - t0, m, 0.09 * loud, max(0, level - 1), tau=1.6, attack=0.03, phase=rng.random())
        # Melody notes on the scale around the centre.
        scale = _MAJOR_SCALE if major else _MINOR_SCALE
        lo, hi = int(np.floor(center - 8)), int(np.ceil(center + 10))
        pitches = [m for m in range(lo, hi + 1) if (m - tonic) % 12 in scale]
        walk = min(max(walk, 0), len(pitches) - 1)
        bar_beats = beats[(beats >= t0 - 1e-9) & (beats < t1 - 1e-9)]
        for j, bt in enumerate(bar_beats):
            nxt = bar_beats[j + 1] if j + 1 < len(bar_beats) else t1
            bl = nxt - bt
            cb = ctl(bt)
            gain = float(_f32(10 ** (cb["loud_db"] / 20)))
            sub = int(cb["subdiv"])
            drums = float(cb["drums"])
            # Bass on beats 1 and 3 (every beat when aroused).
            if j % 2 == 0 or sub == 4:
                bass = root - 12.0
                mix.note(bt, bl * (2 if sub < 4 else 1) * 0.95, bass, 0.2 * gain, max(0, level - 3), tau=0.35,
                         phase=rng.random())
            for s in range(sub):
                on = bt + s * bl / sub
                if drums > 0.5:
                    mix.add(on, kit["hat"], 0.12 * drums * gain * (1.0 if s % 2 == 0 else 0.7))
                if rng.random() < float(cb["rest"]):
                    continue
                walk = int(np.clip(walk + rng.integers(-2, 3), 0, len(pitches) - 1))
                m = pitches[walk]
                if rng.random() < 0.35 * float(cb["dissonance"]):
                    m += 1  # chromatic clash
                length = bl / sub * (0.9 if sub > 1 else 1.5)
                accent = 1.0 if s == 0 else 0.8
                mix.note(on, length, m, 0.26 * gain * accent, level, tau=0.12 + 0.5 * (1 - float(cb["drums"])),
                         phase=rng.random())
            if drums > 0.05 and (j % 2 == 0 or drums > 0.6):
                mix.add(bt, kit["kick"], 0.45 * drums * gain)
            if drums > 0.35 and j % 2 == 1:
                mix.add(bt, kit["snare"], 0.3 * drums * gain)

    out = mix.out + 4e-4 * rng.standard_normal(len(mix.out))  # quiet noise floor: no digital silence
    peak = np.abs(out).max()
    if peak > 0.98:
        out *= 0.98 / peak
    return np.round(out * 32767).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# Images


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _render_image(v: float, a: float, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An abstract image whose colour follows valence and whose texture/edges follow arousal."""
    # Blue (240 deg) -> purple -> magenta -> red -> orange (30 deg): red minus blue rises monotonically.
    hue = (0.667 + 0.43 * v + rng.normal(0.0, 0.025)) % 1.0
    sat = float(np.clip(0.35 + 0.45 * v + rng.normal(0.0, 0.05), 0.05, 1.0))
    val = float(np.clip(0.2 + 0.68 * v + rng.normal(0.0, 0.04), 0.08, 0.92))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    scale = min(width, height)

    # Oriented gratings: frequency (cycles per pixel) and contrast rise with arousal.
    tex = np.zeros((height, width))
    n_gr = 2 + int(rng.integers(0, 2))
    for _ in range(n_gr):
        freq = (0.012 + 0.2 * a) * float(np.exp(rng.normal(0.0, 0.15)))
        theta = rng.uniform(0.0, np.pi)
        tex += _f32(np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi)))
    tex /= n_gr
    # A slow colour wash so that images are not flat.
    kx, ky = rng.uniform(0.5, 1.5, 2)
    wash = _f32(np.sin(2 * np.pi * (kx * xx / width + ky * yy / height) + rng.uniform(0, 2 * np.pi)))
    contrast = 0.03 + 0.3 * a
    h = (hue + 0.025 * wash) % 1.0
    s = np.clip(sat * (1.0 + 0.1 * wash), 0.0, 1.0)
    vv = np.clip(val + contrast * tex + 0.04 * wash, 0.0, 1.0)
    hsv = np.stack([np.floor(h * 256) % 256, np.round(s * 255), np.round(vv * 255)], axis=-1).astype(np.uint8)
    img = Image.fromarray(hsv, mode="HSV").convert("RGB")

    # Hard-edged shapes: more, smaller and higher-contrast for high arousal.
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.poisson(1 + 24 * a))):
        kind = int(rng.integers(0, 4))
        size = scale * rng.uniform(0.05, 0.4 - 0.25 * a)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        shade = val + (1 if rng.random() < 0.5 else -1) * rng.uniform(0.05, 0.12 + 0.45 * a)
        color = _hsv_rgb(hue + rng.normal(0, 0.04), sat * rng.uniform(0.8, 1.15), shade)
        box = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
        if kind == 0:
            draw.rectangle(box, fill=color)
        elif kind == 1:
            draw.ellipse(box, fill=color)
        elif kind == 2:
            ang = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2])
            draw.polygon([(float(cx + size * np.cos(t)), float(cy + size * np.sin(t))) for t in ang], fill=color)
        else:
            ang = rng.uniform(0, np.pi)
            dx, dy = size * np.cos(ang), size * np.sin(ang)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=color, width=max(1, int(scale / 80)))
    if a < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(radius=(0.4 - a) * scale / 60))
    return img


def _save_jpeg(img: Image.Image, path: Path) -> None:
    img.save(path, format="JPEG", quality=90, optimize=False)


def _scale(latent: np.ndarray, noise: float, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Latent [0, 1] + rater noise -> the rating scale [lo, hi] (clipped)."""
    return lo + (hi - lo) * np.clip(latent + noise * rng.standard_normal(len(latent)), 0.0, 1.0)


def _render_all(items: list[tuple[Path, float, float, int, int]], seed: int, src: int, desc: str,
                progress: bool) -> None:
    for i, (path, v, a, w, h) in enumerate(tqdm(items, desc=desc, unit="img", disable=not progress)):
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_jpeg(_render_image(v, a, w, h, _rng(seed, src, 9, i)), path)


_IAPS_WORDS = ["Snake", "Puppies", "Beach", "Cemetery", "Mutilation", "Flowers", "Baby", "Gun", "Storm",
               "Sunset", "Kitten", "Shark", "Fire", "Rafting", "Skier", "Couple", "Food", "Mushroom", "Basket",
               "Chair", "Office", "Garbage", "Spider", "AttackDog", "Rollercoaster", "Waterfall", "Bees", "Clouds",
               "Dentist", "Candle", "Tornado", "Boy", "Girl", "Dog", "Cat", "Crowd", "Car", "Plane", "Bread",
               "Rocks", "Seal", "Soldier", "Nature", "Abstract", "Erotic", "Skull", "Surgery", "Icecream"]
_IAPS_PREAMBLE = [
    "International Affective Picture System (IAPS): Affective ratings of pictures",
    "GENERATED EMBEDDED CORPUS - NOT REAL DATA (imem synth); same layout as the technical-report export",
    "All subjects, picture sets 1-20",
    "",
    "valmn/valsd: valence, aromn/arosd: arousal, dom1/dom2: dominance; means and SDs on 1-9 scales",
    "",
    "",
]


def _write_iaps(root: Path, p: dict, n: int, labels_only: bool, progress: bool) -> int:
    seed, noise = p["seed"], float(p["label_noise"])
    rng = _rng(seed, _SRC_IAPS, 0)
    base = np.sort(rng.choice(np.arange(1000, 10000), n, replace=False))
    sub = np.where(rng.random(n) < 0.1, rng.choice([1, 1, 1, 2], n), 0)
    ids = [f"{b}.{s}" if s else f"{b}" for b, s in zip(base, sub, strict=True)]
    # Boomerang: arousal rises with |valence - 0.5|, more steeply for negative pictures.
    v = rng.beta(1.3, 1.3, n) * 0.9 + 0.05
    dist = np.abs(v - 0.5)
    a = np.clip(0.25 + np.where(v < 0.5, 1.1, 0.9) * dist + rng.normal(0.0, 0.08, n), 0.03, 0.97)
    lrng = _rng(seed, _SRC_IAPS, 1)
    dom = np.clip(0.25 + 0.45 * v + 0.2 * (1 - a), 0, 1)
    table = pd.DataFrame({
        "desc": [_IAPS_WORDS[k] for k in rng.integers(0, len(_IAPS_WORDS), n)],
        "IAPS": ids,
        "valmn": _fmt(_scale(v, noise, lrng, 1, 9), "%.2f"),
        "valsd": _fmt(lrng.uniform(0.9, 2.4, n), "%.2f"),
        "aromn": _fmt(_scale(a, noise, lrng, 1, 9), "%.2f"),
        "arosd": _fmt(lrng.uniform(1.6, 2.6, n), "%.2f"),
        "dom1mn": _fmt(_scale(dom, noise, lrng, 1, 9), "%.2f"),
        "dom1sd": _fmt(lrng.uniform(1.5, 2.5, n), "%.2f"),
        "dom2mn": _fmt(_scale(dom, noise, lrng, 1, 9), "%.2f"),
        "dom2sd": _fmt(lrng.uniform(1.5, 2.5, n), "%.2f"),
        "set": [str(x) for x in lrng.integers(1, 21, n)],
    })
    lines = _IAPS_PREAMBLE + ["\t".join(IAPS_COLUMNS)] + ["\t".join(r) for r in table.itertuples(index=False)]
    _write_lines(root / "IAPS" / "AllSubjects_1-20.txt", lines)
    _write_frame(root / "IAPS" / "emotions.csv", pd.DataFrame({"image_id": ids, "emotion": image_emotion(v, a)}))
    if not labels_only:
        ext = np.where(rng.random(n) < 0.05, ".JPG", ".jpg")
        items = [(root / "IAPS" / "images" / f"{i}{e}", float(vv), float(aa), p["image_width"], p["image_height"])
                 for i, e, vv, aa in zip(ids, ext, v, a, strict=True)]
        _render_all(items, seed, _SRC_IAPS, "synth: IAPS", progress)
    return n


_NAPS_WORDS = {
    "Animals": ["dog", "cat", "horse", "spider", "snake", "birds", "fish", "cow", "insects", "wolf"],
    "Faces": ["smiling woman", "crying child", "angry man", "neutral face", "old man", "wounded face"],
    "Landscapes": ["mountains", "beach", "forest", "desert", "city at night", "flood", "storm clouds"],
    "Objects": ["food", "chair", "gun", "toys", "garbage", "flowers", "car wreck", "tools"],
    "People": ["family", "party", "funeral", "sport", "war", "couple", "crowd", "surgery"],
}


def _write_naps(root: Path, p: dict, n: int, labels_only: bool, progress: bool) -> int:
    seed, noise = p["seed"], float(p["label_noise"])
    rng = _rng(seed, _SRC_NAPS, 0)
    cats = list(NAPS_CATEGORIES)
    props = np.array(list(NAPS_CATEGORIES.values()))
    counts = np.floor(props * n).astype(np.int64)
    counts[np.argsort(-(props * n - counts), kind="stable")[: n - counts.sum()]] += 1
    rows = []
    for cat, k in zip(cats, counts, strict=True):
        for nr in np.sort(rng.choice(np.arange(1, 1000), int(k), replace=False)):
            rows.append((cat, int(nr)))
    vert = rng.random(n) < 0.2
    ids = [f"{cat}_{nr:03d}_{'v' if vt else 'h'}" for (cat, nr), vt in zip(rows, vert, strict=True)]
    order = np.argsort(ids, kind="stable")
    rows = [rows[i] for i in order]
    vert = vert[order]
    ids = [ids[i] for i in order]
    # Linear: arousal falls with valence.
    v = np.clip(rng.uniform(0.05, 0.95, n), 0, 1)
    a = np.clip(0.78 - 0.5 * v + rng.normal(0.0, 0.08, n), 0.03, 0.97)
    lrng = _rng(seed, _SRC_NAPS, 1)
    table = pd.DataFrame({
        "ID": ids,
        "Category": [c for c, _ in rows],
        "Nr": [nr for _, nr in rows],
        "V/H": np.where(vert, "V", "H"),
        "Description": [_NAPS_WORDS[c][k % len(_NAPS_WORDS[c])] for (c, _), k in
                        zip(rows, rng.integers(0, 1 << 20, n), strict=True)],
        "Valence_M": _scale(v, noise, lrng, 1, 9),
        "Valence_SD": lrng.uniform(0.8, 2.2, n),
        "Arousal_M": _scale(a, noise, lrng, 1, 9),
        "Arousal_SD": lrng.uniform(1.0, 2.4, n),
        "Approach-avoidance_M": _scale(np.clip(0.1 + 0.8 * v, 0, 1), noise, lrng, 1, 9),
        "Approach-avoidance_SD": lrng.uniform(0.9, 2.2, n),
    }, columns=NAPS_COLUMNS)
    path = root / "NAPS" / "NAPS_ratings.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.2f", lineterminator="\n")
    _write_frame(root / "NAPS" / "emotions.csv", pd.DataFrame({"image_id": ids, "emotion": image_emotion(v, a)}))
    if not labels_only:
        w, h = p["image_width"], p["image_height"]
        items = [(root / "NAPS" / "images" / f"{i}.jpg", float(vv), float(aa), h if vt else w, w if vt else h)
                 for i, vv, aa, vt in zip(ids, v, a, vert, strict=True)]
        _render_all(items, seed, _SRC_NAPS, "synth: NAPS", progress)
    return n


_LOWER = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_ALNUM = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))


def _emotic_filename(db: str, split: str, rng: np.random.Generator) -> str:
    if db == "mscoco":
        part = "train2014" if split == "train" or rng.random() < 0.6 else "val2014"
        return f"COCO_{part}_{int(rng.integers(1, 581930)):012d}.jpg"
    if db == "ade20k":
        return "sun_" + "".join(rng.choice(_LOWER, 16)) + ".jpg"
    if db == "framesdb":
        return "frame_" + "".join(rng.choice(_ALNUM, 16)) + ".jpg"
    return "".join(rng.choice(_ALNUM, 18)) + ".jpg"


def _write_emotic(root: Path, p: dict, n: int, labels_only: bool, progress: bool) -> int:
    seed, noise = p["seed"], float(p["label_noise"])
    rng = _rng(seed, _SRC_EMOTIC, 0)
    w, h = int(p["image_width"]), int(p["image_height"])
    n_val = n_test = int(round(0.1 * n))
    split = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)[rng.permutation(n)]
    dbs = list(EMOTIC_DATABASES)
    db = rng.choice(len(dbs), n, p=np.array(list(EMOTIC_DATABASES.values())))
    names, seen = [], set()
    for i in range(n):
        while True:
            name = _emotic_filename(dbs[db[i]], str(split[i]), rng)
            if Path(name).stem not in seen:
                break
        seen.add(Path(name).stem)
        names.append(name)
    v = rng.beta(1.1, 1.1, n) * 0.94 + 0.03
    a = rng.beta(1.1, 1.1, n) * 0.94 + 0.03
    lrng = _rng(seed, _SRC_EMOTIC, 1)
    # Persons (1-3 per image) and their annotators (1 in train, 2-4 in val/test), drawn in bulk.
    m = lrng.integers(1, 4, n)
    owner = np.repeat(np.arange(n), m)
    n_p = len(owner)
    pv = np.clip(v[owner] + lrng.normal(0, 0.04, n_p), 0, 1)
    pa = np.clip(a[owner] + lrng.normal(0, 0.04, n_p), 0, 1)
    pdom = np.clip(0.3 + 0.3 * pv + 0.3 * pa + lrng.normal(0, 0.05, n_p), 0, 1)
    r = np.where(split[owner] == "train", 1, lrng.integers(2, 5, n_p))
    rater_of = np.repeat(np.arange(n_p), r)
    lat = np.stack([pv, pa, pdom], axis=1)[rater_of]
    votes = np.rint(1 + 9 * np.clip(lat + noise * lrng.standard_normal(lat.shape), 0, 1)).tolist()
    x1 = np.floor(lrng.uniform(0, 0.6 * w, n_p))
    y1 = np.floor(lrng.uniform(0, 0.5 * h, n_p))
    x2 = np.floor(lrng.uniform(x1 + 0.15 * w, w))
    y2 = np.floor(lrng.uniform(y1 + 0.3 * h, h))
    bboxes = np.stack([x1, y1, x2, y2], axis=1).tolist()
    gender = np.where(lrng.random(n_p) < 0.55, "Male", "Female").tolist()
    age = np.array(["Adult", "Teenager", "Kid"])[lrng.choice(3, n_p, p=[0.75, 0.1, 0.15])].tolist()
    ann_fields = ("valence", "arousal", "dominance")
    person_fields = ("body_bbox", "annotations_continuous", "gender", "age")
    size = MatStruct(("n_col", "n_row"), ((float(w), float(h)),))
    records = {"train": [], "val": [], "test": []}
    rater_start = np.concatenate([[0], np.cumsum(r)]).tolist()
    k = 0
    for i in range(n):
        persons = []
        for _ in range(int(m[i])):
            ann = MatStruct(ann_fields, tuple(tuple(x) for x in votes[rater_start[k]:rater_start[k + 1]]))
            persons.append((tuple(bboxes[k]), ann, gender[k], age[k]))
            k += 1
        rec = (names[i], f"{dbs[db[i]]}/images", size, MatStruct(("name",), ((dbs[db[i]],),)),
               MatStruct(person_fields, tuple(persons)))
        records[str(split[i])].append(rec)
    fields = ("filename", "folder", "image_size", "original_database", "person")
    variables = {k: MatStruct(fields, tuple(sorted(recs, key=lambda r: (r[1], r[0]))))
                 for k, recs in records.items()}
    (root / "EMOTIC").mkdir(parents=True, exist_ok=True)
    write_mat5(root / "EMOTIC" / "Annotations.mat", variables,
               "EMOTIC annotations, generated embedded corpus (imem synth), not real data")
    ids = [Path(x).stem for x in names]
    order = np.argsort(ids, kind="stable")
    _write_frame(root / "EMOTIC" / "emotions.csv",
                 pd.DataFrame({"image_id": [ids[i] for i in order], "emotion": image_emotion(v, a)[order]}))
    if not labels_only:
        items = [(root / "EMOTIC" / "images" / f"{dbs[db[i]]}/images" / names[i], float(v[i]), float(a[i]), w, h)
                 for i in order]
        _render_all(items, seed, _SRC_EMOTIC, "synth: EMOTIC", progress)
    return n


# --------------------------------------------------------------------------------------------------


def _readme(p: dict, labels_only: bool, summary: dict) -> list[str]:
    lo, hi = p["long_song_seconds"]
    lines = [
        "imem embedded corpus: generated embedded corpus, not real data.",
        "",
        "Written by imem.data.synth in the file formats of DEAM (music), IAPS, NAPS and EMOTIC (images);",
        "the labels are a latent valence-arousal point plus rater noise, the media are rendered from it.",
        "",
        f"seed: {p['seed']}",
        f"mode: {'labels only (annotation files at IMEMNet scale, no audio, no images)' if labels_only else 'full'}",
        f"label_noise: {p['label_noise']}",
        f"songs: {summary['songs']} ({summary['songs'] - summary['long_songs']} of 45 s, "
        f"{summary['long_songs']} long)",
        f"clips: {summary['clips']}",
        f"images: IAPS {summary['iaps']}, NAPS {summary['naps']}, EMOTIC {summary['emotic']}",
    ]
    if not labels_only:
        long_songs = ("lengths chosen so that all songs give IMEMNet's 35,817 clips (IMEMNet scale)"
                      if summary.get("imemnet_scale") else f"{lo}-{hi} s")
        lines += [f"long songs: {long_songs}", f"sample_rate: {p['sample_rate']} Hz, mono PCM_16",
                  f"image size: {p['image_width']}x{p['image_height']} (NAPS _v portrait), JPEG quality 90"]
    return lines


def synthesize(params: dict, out: str | Path, labels_only: bool = False, progress: bool = True,
               imemnet_scale: bool = False) -> dict:
    """Write the embedded corpus into ``out`` (atomically: a failure leaves no half corpus).

    ``params`` is the ``synth`` section (missing keys take their defaults, unknown keys are an error;
    ``params['out']`` is ignored in favour of ``out``). With ``labels_only`` only the annotation files
    are written, at IMEMNet's scale; with ``imemnet_scale`` the full corpus (audio and images too) at
    IMEMNet's counts instead of the ``n_*`` params (the on-demand IMEMNet-scale run). Returns counts: songs (incl. long), long_songs, clips, iaps, naps,
    emotic, images.
    """
    p = section("synth", {"synth": dict(params)})
    _check_params(p)
    imemnet = bool(labels_only or imemnet_scale)
    sizes = {k: IMEMNET[k] if imemnet else p[f"n_{k}"] for k in ("iaps", "naps", "emotic")}
    with atomic_dir(out) as tmp:
        songs = _deam_songs(p, imemnet)
        summary = {"labels_only": bool(labels_only)}
        if imemnet_scale:
            summary["imemnet_scale"] = True
        summary.update(_write_deam(tmp, songs, p, labels_only, progress, imemnet))
        summary["iaps"] = _write_iaps(tmp, p, sizes["iaps"], labels_only, progress)
        summary["naps"] = _write_naps(tmp, p, sizes["naps"], labels_only, progress)
        summary["emotic"] = _write_emotic(tmp, p, sizes["emotic"], labels_only, progress)
        summary["images"] = summary["iaps"] + summary["naps"] + summary["emotic"]
        _write_lines(tmp / "README.txt", _readme(p, labels_only, summary))
    _ENVELOPES.clear()
    return summary
