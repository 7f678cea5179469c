"""The ``prepare`` stage's logic (CDCML section 3, thesis section 3.2): corpus -> clips, images, pairs.

1. Load the music corpus (DEAM or PMEmo) and cut 2-s clips from its dynamic annotations
   (:mod:`imem.data.clips`); load the image corpora (IAPS, NAPS, EMOTIC).
2. Normalise VA to [0, 1] per source: ``(x - min) / range`` with the minimum and range of that source's
   item labels (``normalization: data``, as IMEMNet-C's constants are) or of its rating scale
   (``normalization: scale``). The constants go into the stats.
3. Split music by song and images by image (seeded), or take the splits from IMEMNet's pair lists.
4. sigma = mean Euclidean VA distance over all image-clip pairs, exactly; S = exp(-d / sigma); pairs
   per clip from its own split (:func:`imem.data.pairs.sample_pairs`).
5. Leakage audit of the resulting splits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from imem.data.clips import clip_windows, song_sort_key
from imem.data.images import SCALES, load_images
from imem.data.music import load_music
from imem.data.pairs import check_pairs_resolve, leakage_audit, mean_distance, read_pair_list, sample_pairs
from imem.errors import ImemError
from imem.io import atomic_dir, write_csv, write_json, write_text

SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    clips: dict[str, pd.DataFrame]
    images: dict[str, pd.DataFrame]
    pairs: dict[str, pd.DataFrame]
    stats: dict
    audit: dict
    extra: dict = field(default_factory=dict)


def normalise(values: pd.DataFrame, by: pd.Series, scales: dict[str, tuple[float, float]], mode: str) -> tuple[pd.DataFrame, dict]:
    """Per source (``by``), map valence/arousal to [0, 1] by minimum and range; return the constants."""
    if mode not in ("data", "scale"):
        raise ImemError(f"params: prepare.normalization = {mode!r} is not one of: data, scale")
    out = values.copy()
    constants = {}
    for source in pd.unique(by):
        m = (by == source).to_numpy()
        constants[source] = {}
        for dim in ("valence", "arousal"):
            x = values.loc[m, dim].to_numpy(dtype=float)
            lo, hi = (float(x.min()), float(x.max())) if mode == "data" else scales[source]
            rng = hi - lo
            if rng <= 0:
                raise ImemError(f"normalisation: source {source} has a constant {dim} ({lo}); cannot scale by its range")
            out.loc[m, dim] = (x - lo) / rng
            constants[source][dim] = {"min": lo, "range": rng}
    return out, constants


def split_ids(ids: np.ndarray, fractions: dict, seed: int, what: str) -> dict[str, str]:
    """Seeded split of unique ids into train/val/test by the given fractions (val and test rounded)."""
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise ImemError(f"params: unknown key 'prepare.split.{unknown[0]}' (known: {', '.join(SPLITS)})")
    f = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    if any(v < 0 for v in f.values()) or abs(sum(f.values()) - 1.0) > 1e-6:
        raise ImemError(f"params: prepare.split fractions must be >= 0 and sum to 1, got {f}")
    ids = np.array(sorted(set(ids), key=str), dtype=object)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_val, n_test = int(round(f["val"] * len(ids))), int(round(f["test"] * len(ids)))
    n_train = len(ids) - n_val - n_test
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for s in SPLITS:
        if counts[s] <= 0:
            raise ImemError(f"split {s!r} is empty: {len(ids)} {what} with fractions {f}")
    assign = {}
    bounds = np.cumsum([0, n_train, n_val, n_test])
    for i, s in enumerate(SPLITS):
        for idx in perm[bounds[i]:bounds[i + 1]]:
            assign[ids[idx]] = s
    return assign


def load_items(params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Clips and images with VA normalised per source (columns valence/arousal, raw ones kept)."""
    root = Path(params["corpus_root"])
    if not root.is_dir():
        raise ImemError(f"corpus directory not found: {root} (run `imem synth` or put the corpora there)")
    check = bool(params["check_media"])
    music = load_music(root, params["music"], check)
    durations = music.songs["duration_s"].to_numpy(dtype=float) if check else None
    if check:
        durations = _short_audio(music, durations, params["short_audio"])
    clips = clip_windows(music.dynamic, durations, clip_seconds=float(params["clip_seconds"]))
    if clips.empty:
        raise ImemError(f"{music.directory}: no song has a complete {params['clip_seconds']}-s annotated window")
    clips = clips.merge(music.songs[["song_id", "audio_path"]], on="song_id", how="left")
    if music.extras is not None:
        clips = clips.join(music.extras, on="clip_id")
    clips.insert(2, "source", music.name)
    images = load_images(root, params["images"], check)

    scales = {music.name: music.scale, **SCALES}
    clips[["valence_raw", "arousal_raw"]] = clips[["valence", "arousal"]]
    images[["valence_raw", "arousal_raw"]] = images[["valence", "arousal"]]
    clips[["valence", "arousal"]], c_norm = normalise(clips[["valence", "arousal"]], clips["source"], scales,
                                                     params["normalization"])
    images[["valence", "arousal"]], i_norm = normalise(images[["valence", "arousal"]], images["source"], scales,
                                                      params["normalization"])
    return clips, images, {**c_norm, **i_norm}


def _short_audio(music, durations: np.ndarray, policy: str) -> np.ndarray:
    """Refuse (``error``) or drop with a warning that lists them (``drop``) the songs whose audio is
    truncated or shorter than their annotations (:func:`imem.data.music.short_songs`); returns the
    durations clip_windows uses (0 for a dropped song, so none of its clips is kept)."""
    from imem.data.music import short_songs

    if policy not in ("error", "drop"):
        raise ImemError(f"params: prepare.short_audio = {policy!r} is not one of: error, drop")
    bad = short_songs(music)
    if bad.empty:
        return durations
    if policy == "error":
        first = bad.iloc[0]
        more = f" (and {len(bad) - 1} more songs)" if len(bad) > 1 else ""
        raise ImemError(f"{first['audio_path']}: song {first['song_id']}: {first['why']}{more}; "
                        "replace the file, or set prepare.short_audio: drop to leave such songs out")
    lines = [f"  {r.song_id}: {r.audio_path}: {r.why}" for r in bad.itertuples()]
    print(f"warning: prepare.short_audio = drop: {len(bad)} songs left out, with all their clips:\n" + "\n".join(lines),
          file=sys.stderr)
    out = durations.copy()
    out[music.songs["song_id"].isin(set(bad["song_id"])).to_numpy()] = 0.0
    return out


def assign_splits(clips: pd.DataFrame, images: pd.DataFrame, params: dict) -> None:
    """Music split by song, images by image (seeded, in place)."""
    seed = int(params["seed"])
    clips["split"] = clips["song_id"].map(split_ids(clips["song_id"].to_numpy(), params["split"], seed, "songs"))
    images["split"] = images["image_id"].map(
        split_ids(images["image_id"].to_numpy(), params["split"], seed + 1, "images"))


def prepare(params: dict, progress: bool = True) -> Prepared:
    root = Path(params["corpus_root"])
    clips, images, norm = load_items(params)
    pp = params["pairs"]
    seed = int(params["seed"])
    if pp["source"] == "sample":
        assign_splits(clips, images, params)
        sampled = sample_pairs(clips, images, top=int(pp["top"]), bottom=int(pp["bottom"]),
                               random=int(pp["random"]), keep_fraction=float(pp["keep_fraction"]),
                               seed=seed + 2, chunk_size=int(pp["chunk_size"]), progress=progress)
        sigma, pairs = sampled.sigma, sampled.pairs
        clip_sets = {s: clips[clips["split"] == s] for s in SPLITS}
        image_sets = {s: images[images["split"] == s] for s in SPLITS}
    elif pp["source"] == "imemnet":
        lists_dir = root / pp["imemnet_dir"]
        pairs = {}
        for s in SPLITS:
            path = lists_dir / f"{s}_matching.txt"
            if path.is_file():
                pairs[s] = read_pair_list(path)
                check_pairs_resolve(pairs[s], set(clips["clip_id"]), set(images["image_id"]), str(path))
        if not pairs:
            raise ImemError(f"no IMEMNet pair list ({'/'.join(SPLITS)}_matching.txt) in {lists_dir}")
        clip_sets = {s: clips[clips["clip_id"].isin(set(p["clip_id"]))].assign(split=s) for s, p in pairs.items()}
        image_sets = {s: images[images["image_id"].isin(set(p["image_id"]))].assign(split=s) for s, p in pairs.items()}
        used_c = pd.concat(clip_sets.values()).drop_duplicates("clip_id")
        used_i = pd.concat(image_sets.values()).drop_duplicates("image_id")
        sigma = mean_distance(used_c[["valence", "arousal"]].to_numpy(), used_i[["valence", "arousal"]].to_numpy(),
                              int(pp["chunk_size"]))
        for s, p in pairs.items():
            p = p.merge(clips[["clip_id", "valence", "arousal"]], on="clip_id")
            p = p.merge(images[["image_id", "valence", "arousal"]], on="image_id", suffixes=("_c", "_i"))
            d = np.hypot(p["valence_c"] - p["valence_i"], p["arousal_c"] - p["arousal_i"])
            pairs[s] = pd.DataFrame({"clip_id": p["clip_id"], "image_id": p["image_id"], "distance": d,
                                     "score": p["score"], "kind": "imemnet"})
    else:
        raise ImemError(f"params: prepare.pairs.source = {pp['source']!r} is not one of: sample, imemnet")

    pairs = {s: pairs[s] for s in SPLITS if s in pairs}
    for s, p in pairs.items():
        if len(p) == 0:
            raise ImemError(f"split {s!r} has no pairs (keep_fraction {pp['keep_fraction']} too small?)")
    audit = leakage_audit(pairs)
    stats = {
        "corpus": _corpus_label(root),
        "sigma": round(float(sigma), 10),
        "counts": {
            s: {
                "songs": int(clip_sets[s]["song_id"].nunique()) if s in clip_sets else 0,
                "clips": int(len(clip_sets[s])) if s in clip_sets else 0,
                "images": int(len(image_sets[s])) if s in image_sets else 0,
                "pairs": int(len(pairs[s])) if s in pairs else 0,
                "mean_score": round(float(pairs[s]["score"].mean()), 6) if s in pairs else None,
            }
            for s in SPLITS
        },
        "normalization": {"mode": params["normalization"], **norm},
        "pair_source": pp["source"],
        "leakage_clean": bool(audit["clean"]),
    }
    return Prepared(clip_sets, image_sets, pairs, stats, audit)


def _corpus_label(root: Path) -> str:
    readme = root / "README.txt"
    if readme.is_file() and "generated" in readme.read_text(errors="replace").lower():
        return "embedded (generated) corpus - not real data"
    return f"corpora under {root}"


CLIP_COLS = ["clip_id", "song_id", "source", "k", "start_s", "end_s", "valence", "arousal",
             "valence_raw", "arousal_raw", "audio_path"]
IMAGE_COLS = ["image_id", "source", "path", "valence", "arousal", "valence_raw", "arousal_raw"]


def write_outputs(prep: Prepared, out_dir: str | Path, report_dir: str | Path) -> None:
    """Tables per split under ``out_dir`` (written whole via a temp dir), stats and audit under ``report_dir``."""
    from imem.data.pairs import audit_markdown

    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            if s not in prep.pairs:
                continue
            c, i = prep.clips[s], prep.images[s]
            c_cols = CLIP_COLS + [x for x in ("emotion", "caption") if x in c.columns]
            i_cols = IMAGE_COLS + [x for x in ("emotion",) if x in i.columns]
            write_csv(tmp / s / "clips.csv", c[c_cols].sort_values(["song_id", "k"], key=_song_order).reset_index(drop=True))
            write_csv(tmp / s / "images.csv", i[i_cols].sort_values("image_id").reset_index(drop=True))
            write_csv(tmp / s / "pairs.csv", prep.pairs[s].reset_index(drop=True))
    report_dir = Path(report_dir)
    write_json(report_dir / "stats.json", prep.stats)
    write_json(report_dir / "audit.json", prep.audit)
    write_text(report_dir / "audit.md", audit_markdown(prep.audit, f"Leakage audit ({prep.stats['corpus']})"))


def _song_order(col: pd.Series) -> pd.Series:
    return col.map(song_sort_key) if col.name == "song_id" else col


