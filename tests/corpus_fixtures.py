"""Tiny corpora in the real formats (DEAM, PMEmo, IAPS, NAPS, EMOTIC, IMEMNet lists), written by the tests.

They are made here, independently of ``imem synth``, so the loaders are checked against the formats
themselves and not against the project's own generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from PIL import Image

SR = 8000  # fixture audio rate: small files; the loaders read the header's duration, whatever the rate


def write_deam(base: Path, songs: dict[str, float], rng: np.random.Generator, ext: str = "wav",
               annotated_until_ms: dict[str, int] | None = None) -> dict:
    """``songs``: id -> duration in s. Dynamic annotations from 15000 ms to the song's last half second."""
    (base / "MEMD_audio").mkdir(parents=True, exist_ok=True)
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    ends = {s: (annotated_until_ms or {}).get(s, int(d * 1000) - 500) for s, d in songs.items()}
    times = np.arange(15000, max(ends.values()) + 1, 500)
    dyn = {}
    for dim in ("valence", "arousal"):
        rows = []
        for s in songs:
            vals = np.clip(rng.normal(0.2, 0.3, len(times)), -1, 1)
            cells = [f"{v:.4f}" if t <= ends[s] else "" for t, v in zip(times, vals, strict=True)]
            rows.append(",".join([s, *cells]))
            dyn[(dim, s)] = np.where(times <= ends[s], np.round(vals, 4), np.nan)
        header = ",".join(["song_id", *[f"sample_{t}ms" for t in times]])
        (base / "annotations" / f"{dim}.csv").write_text("\n".join([header, *rows]) + "\n")
    for name, ids in (("static_annotations_averaged_songs_1_2000.csv", [s for s in songs if int(s) <= 2000]),
                      ("static_annotations_averaged_songs_2000_2058.csv", [s for s in songs if int(s) > 2000])):
        lines = ["song_id, valence_mean, valence_std, arousal_mean, arousal_std"]
        lines += [f"{s}, {rng.uniform(2, 8):.2f}, 1.10, {rng.uniform(2, 8):.2f}, 0.90" for s in ids]
        (base / "annotations" / name).write_text("\n".join(lines) + "\n")
    for s, d in songs.items():
        y = (0.1 * rng.standard_normal(int(d * SR))).astype(np.float32)
        sf.write(base / "MEMD_audio" / f"{s}.{ext}", y, SR, format=ext.upper())
    return {"times": times, "dyn": dyn}


def write_pmemo(base: Path, songs: dict[str, float], rng: np.random.Generator) -> dict:
    (base / "chorus").mkdir(parents=True, exist_ok=True)
    rows, dyn = [], {}
    for s, d in songs.items():
        t = np.arange(15.5, d - 0.25, 0.5)
        a, v = rng.uniform(0, 1, len(t)).round(4), rng.uniform(0, 1, len(t)).round(4)
        dyn[s] = (t, v, a)
        rows += [f"{s},{tt:.1f},{aa:.4f},{vv:.4f}" for tt, aa, vv in zip(t, a, v, strict=True)]
        sf.write(base / "chorus" / f"{s}.mp3", (0.1 * rng.standard_normal(int(d * SR))).astype(np.float32), SR,
                 format="MP3")
    (base / "dynamic_annotations.csv").write_text("musicId,frameTime,Arousal(mean),Valence(mean)\n" + "\n".join(rows) + "\n")
    st = ["musicId,Arousal(mean),Valence(mean)"] + [f"{s},{rng.uniform():.3f},{rng.uniform():.3f}" for s in songs]
    (base / "static_annotations.csv").write_text("\n".join(st) + "\n")
    return dyn


def _jpeg(path: Path, rng: np.random.Generator, size=(32, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="JPEG")


def write_iaps(base: Path, ratings: dict[str, tuple[float, float]], rng: np.random.Generator,
               upper: tuple[str, ...] = ()) -> None:
    pre = ["IAPS Technical Report A-8", "All subjects", "", "Means and standard deviations", "", "", ""]
    cols = "desc\tIAPS\tvalmn\tvalsd\taromn\tarosd\tdom1mn\tdom1sd\tdom2mn\tdom2sd\tset"
    rows = [f"Thing\t{i}\t{v:.2f}\t1.50\t{a:.2f}\t2.00\t5.00\t2.00\t5.00\t2.00\t{k % 20 + 1}"
            for k, (i, (v, a)) in enumerate(ratings.items())]
    base.mkdir(parents=True, exist_ok=True)
    (base / "AllSubjects_1-20.txt").write_text("\n".join(pre + [cols] + rows) + "\n")
    for i in ratings:
        _jpeg(base / "images" / f"{i}.{'JPG' if i in upper else 'jpg'}", rng)


def write_naps(base: Path, ratings: dict[str, tuple[float, float]], rng: np.random.Generator) -> None:
    base.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([{"ID": i, "Category": i.split("_")[0], "Nr": i.split("_")[1], "V/H": i.split("_")[2],
                        "Description": "x", "Valence_M": v, "Valence_SD": 1.0, "Arousal_M": a, "Arousal_SD": 1.0}
                       for i, (v, a) in ratings.items()])
    df.to_csv(base / "NAPS_ratings.csv", index=False)
    for i in ratings:
        _jpeg(base / "images" / f"{i}.jpg", rng)


def write_emotic(base: Path, images: dict[str, list[list[tuple[int, int]]]], rng: np.random.Generator,
                 parts: dict[str, list[str]] | None = None) -> None:
    """``images``: stem -> per person a list of (valence, arousal) per annotator (1-10)."""
    from scipy.io import savemat

    parts = parts or {"train": list(images)}
    person_dt = [("body_bbox", "O"), ("annotations_continuous", "O"), ("gender", "O"), ("age", "O")]
    entry_dt = [("filename", "O"), ("folder", "O"), ("image_size", "O"), ("original_database", "O"), ("person", "O")]
    ann_dt = [("valence", "O"), ("arousal", "O"), ("dominance", "O")]
    out = {}
    for part, stems in parts.items():
        arr = np.zeros((1, len(stems)), dtype=entry_dt)
        for j, stem in enumerate(stems):
            people = images[stem]
            parr = np.zeros((1, len(people)), dtype=person_dt)
            for p, anns in enumerate(people):
                a = np.zeros((1, len(anns)), dtype=ann_dt)
                for r, (v, ar) in enumerate(anns):
                    a[0, r] = (v, ar, 5)
                parr[0, p] = (np.array([1.0, 2.0, 10.0, 20.0]), a if len(anns) > 1 else a[0, 0], "Male", "Adult")
            size = np.zeros((1,), dtype=[("n_col", "O"), ("n_row", "O")])
            size[0] = (32, 24)
            db = np.zeros((1,), dtype=[("name", "O")])
            db[0] = ("mscoco",)
            arr[0, j] = (f"{stem}.jpg", "mscoco/images", size, db, parr if len(people) > 1 else parr[0, 0])
            _jpeg(base / "images" / "mscoco" / "images" / f"{stem}.jpg", rng)
        out[part] = arr
    base.mkdir(parents=True, exist_ok=True)
    savemat(base / "Annotations.mat", out)


def write_small_corpus(root: Path, seed: int = 0, n_songs: int = 6) -> dict:
    """A complete small corpus: ``n_songs`` 45-s DEAM songs + one 61-s long song, 3 image sources."""
    rng = np.random.default_rng(seed)
    songs = {str(10 + 7 * i): 45.0 for i in range(n_songs)}
    songs["2005"] = 61.0
    deam = write_deam(root / "DEAM", songs, rng)
    iaps = {str(1000 + 13 * i) if i % 5 else f"{2000 + i}.1": (rng.uniform(1.5, 8.5), rng.uniform(1.5, 8.5))
            for i in range(20)}
    write_iaps(root / "IAPS", iaps, rng, upper=(list(iaps)[3],))
    naps = {f"{c}_{i:03d}_{'h' if i % 2 else 'v'}": (rng.uniform(1, 9), rng.uniform(1, 9))
            for c in ("Animals", "Faces") for i in range(1, 9)}
    write_naps(root / "NAPS", naps, rng)
    emo = {f"COCO_train2014_{i:012d}": [[(int(rng.integers(1, 11)), int(rng.integers(1, 11)))]
                                         for _ in range(1 + i % 2)] for i in range(12)}
    write_emotic(root / "EMOTIC", emo, rng)
    return {"songs": songs, "deam": deam, "iaps": iaps, "naps": naps, "emotic": emo}


def prepared_pipeline(tmp: Path, n_songs: int = 3, split: dict | None = None, image_size: int = 32) -> Path:
    """A small corpus under ``tmp/corpus``, prepared to ``tmp/prepare`` (reports in ``tmp/rep``) and its
    feature store in ``tmp/features``: the starting point of the training, tuning, evaluation and
    inference tests."""
    from imem.data.prepare import prepare, write_outputs
    from imem.features.store import build_store
    from imem.params import section

    write_small_corpus(tmp / "corpus", n_songs=n_songs)
    p = section("prepare", {"prepare": {"corpus_root": str(tmp / "corpus")}})
    p["pairs"].update(top=3, bottom=3, random=4, keep_fraction=0.6)
    p["split"] = split or {"train": 0.6, "val": 0.2, "test": 0.2}
    write_outputs(prepare(p, progress=False), tmp / "prepare", tmp / "rep")
    build_store(tmp / "prepare", tmp / "features", section("features", {"features": {"image_size": image_size}}),
                progress=False)
    return tmp


def synth_pipeline(tmp: Path, n_songs: int = 6, image_size: int = 32, seed: int = 5) -> Path:
    """Like :func:`prepared_pipeline`, but the corpus is a small embedded (generated) one from ``imem synth``,
    which also ships clip captions and image/music emotion classes (MMVA, Emo-CLIM, CMER-CL tests).
    Layout: ``tmp/corpus``, ``tmp/prepare``, ``tmp/rep/stats.json``, ``tmp/features``."""
    from imem.data.prepare import prepare, write_outputs
    from imem.data.synth import synthesize
    from imem.features.store import build_store
    from imem.params import section

    sp = section("synth", {"synth": {"seed": seed, "n_songs": n_songs, "n_long_songs": 1, "long_song_seconds": [50, 50],
                                     "n_iaps": 16, "n_naps": 10, "n_emotic": 10, "image_width": 48, "image_height": 36,
                                     "sample_rate": 22050}})
    synthesize(sp, tmp / "corpus", progress=False)
    p = section("prepare", {"prepare": {"corpus_root": str(tmp / "corpus")}})
    p["pairs"].update(top=3, bottom=3, random=4, keep_fraction=0.6)
    p["split"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    write_outputs(prepare(p, progress=False), tmp / "prepare", tmp / "rep")
    build_store(tmp / "prepare", tmp / "features", section("features", {"features": {"image_size": image_size}}),
                progress=False)
    return tmp
