"""Image corpora: IAPS, NAPS and EMOTIC, read into one table of image id, file and raw VA.

IAPS (Lang et al.): ``AllSubjects_1-20.txt``, tab-separated, a free-text preamble then the column row
``desc IAPS valmn valsd aromn arosd dom1mn dom1sd dom2mn dom2sd set`` (1-9); ids may carry one decimal
(``2352.1``) and a few files are ``.JPG``.
NAPS (Marchewka et al. 2014): the ratings sheet exported to CSV (or read as .xls/.xlsx when pandas has
an Excel engine); the id/valence/arousal column names are options because the sheet's headers vary
between releases; 1-9.
EMOTIC (Kosti et al.): ``Annotations.mat`` with struct arrays ``train``/``val``/``test``; per image
``filename``, ``folder``, ``person`` whose ``annotations_continuous`` holds integer valence/arousal on
1-10 per annotator. An image's VA is the mean over its people of the mean over their annotators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from imem.data.common import IMAGE_EXTS, check_image, check_range, find_file, read_extras, stem_index
from imem.errors import ImemError

SCALES = {"iaps": (1.0, 9.0), "naps": (1.0, 9.0), "emotic": (1.0, 10.0)}

OPTIONS = {
    "iaps": {"format": "iaps", "dir": "IAPS", "ratings": "AllSubjects_1-20.txt", "image_dir": "images"},
    "naps": {"format": "naps", "dir": "NAPS", "ratings": "NAPS_ratings.csv", "image_dir": "images",
             "id_column": "ID", "valence_column": "Valence_M", "arousal_column": "Arousal_M"},
    "emotic": {"format": "emotic", "dir": "EMOTIC", "annotations": "Annotations.mat", "image_dir": "images"},
}


def load_images(root: Path, sources: list[dict], check_media: bool = True) -> pd.DataFrame:
    """All configured image sources as one frame: image_id, source, path, valence, arousal (raw)
    plus emotion/caption columns when the source ships them."""
    if not sources:
        raise ImemError("params: prepare.images lists no image source")
    frames = []
    for i, opts in enumerate(sources):
        fmt = str(opts.get("format", "")).lower()
        if fmt not in OPTIONS:
            raise ImemError(f"params: prepare.images[{i}].format = {fmt!r} is not one of: {', '.join(OPTIONS)}")
        unknown = sorted(set(opts) - set(OPTIONS[fmt]))
        if unknown:
            raise ImemError(f"params: unknown key 'prepare.images[{i}].{unknown[0]}' "
                            f"(known: {', '.join(sorted(OPTIONS[fmt]))})")
        o = {**OPTIONS[fmt], **opts}
        base = Path(root) / o["dir"]
        df = {"iaps": _iaps, "naps": _naps, "emotic": _emotic}[fmt](base, o)
        df.insert(1, "source", fmt)
        if fmt != "emotic":  # EMOTIC paths come from the annotation file's folder field
            index = stem_index(base / o["image_dir"], IMAGE_EXTS, fmt.upper()) if check_media else {}
            df["path"] = [str(index.get(i, "")) for i in df["image_id"]]
        if check_media:
            for image_id, p in zip(df["image_id"], df["path"], strict=True):
                if not p or not Path(p).is_file():
                    raise ImemError(f"{fmt.upper()}: image {image_id}: file not found under {base / o['image_dir']}")
                check_image(Path(p))
        extras = read_extras(base, "image_id")
        if extras is not None:
            df = df.join(extras, on="image_id")
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    dup = out["image_id"].duplicated()
    if dup.any():
        raise ImemError(f"image id {out['image_id'][dup].iloc[0]} appears in more than one image source")
    return out


def _iaps(base: Path, o: dict) -> pd.DataFrame:
    path = find_file(base, o["ratings"], "IAPS ratings")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    header = next((i for i, ln in enumerate(lines)
                   if {"IAPS", "valmn", "aromn"} <= {c.strip() for c in ln.split("\t")}), None)
    if header is None:
        raise ImemError(f"{path}: no column row with 'IAPS', 'valmn' and 'aromn' (tab-separated)")
    df = pd.read_csv(path, sep="\t", skiprows=header, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    df["IAPS"] = df["IAPS"].str.strip()
    df = df[df["IAPS"] != ""]
    check_range(df, "IAPS", ["valmn", "aromn"], *SCALES["iaps"], str(path))
    df = df.drop_duplicates("IAPS")
    return pd.DataFrame({"image_id": df["IAPS"].to_numpy(), "valence": df["valmn"].astype(float).to_numpy(),
                         "arousal": df["aromn"].astype(float).to_numpy()})


def _naps(base: Path, o: dict) -> pd.DataFrame:
    path = find_file(base, o["ratings"], "NAPS ratings")
    if path.suffix.lower() in (".xls", ".xlsx"):
        try:
            df = pd.read_excel(path, dtype=str)
        except ImportError as exc:
            raise ImemError(f"{path}: reading Excel needs an engine ({exc.name}); install it or export "
                            "the sheet to CSV") from exc
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    df.columns = [str(c).strip() for c in df.columns]
    cols = [o["id_column"], o["valence_column"], o["arousal_column"]]
    for c in cols:
        if c not in df.columns:
            raise ImemError(f"{path}: missing column {c!r} (set prepare.images[].{'id_column' if c == cols[0] else 'valence_column' if c == cols[1] else 'arousal_column'})")
    df[o["id_column"]] = df[o["id_column"]].astype(str).str.strip()
    check_range(df, o["id_column"], cols[1:], *SCALES["naps"], str(path))
    return pd.DataFrame({"image_id": df[cols[0]].to_numpy(), "valence": df[cols[1]].astype(float).to_numpy(),
                         "arousal": df[cols[2]].astype(float).to_numpy()})


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return list(x.ravel())
    return [x]


def _emotic(base: Path, o: dict) -> pd.DataFrame:
    from scipy.io import loadmat

    path = find_file(base, o["annotations"], "EMOTIC annotations")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:
        raise ImemError(f"{path}: unreadable MATLAB file ({str(exc).splitlines()[0]})") from exc
    parts = [k for k in ("train", "val", "test") if k in mat]
    if not parts:
        raise ImemError(f"{path}: none of the variables train, val, test")
    rows: dict[str, list] = {}
    lo, hi = SCALES["emotic"]
    for part in parts:
        for entry in _as_list(mat[part]):
            filename = str(entry.filename)
            image_id = Path(filename).stem
            per_person = []
            for person in _as_list(getattr(entry, "person", None)):
                anns = _as_list(getattr(person, "annotations_continuous", None))
                vals = []
                for ann in anns:
                    v, a = float(getattr(ann, "valence", np.nan)), float(getattr(ann, "arousal", np.nan))
                    for dim, x in (("valence", v), ("arousal", a)):
                        if not np.isfinite(x) or x < lo or x > hi:
                            raise ImemError(f"{path}: {part} image {image_id}: {dim} = {x!r} is "
                                            f"{'missing' if not np.isfinite(x) else f'outside the scale [{lo:g}, {hi:g}]'}")
                    vals.append((v, a))
                if vals:
                    per_person.append(np.mean(vals, axis=0))
            if not per_person:
                raise ImemError(f"{path}: {part} image {image_id}: no continuous valence/arousal annotation")
            img_path = base / o["image_dir"] / str(entry.folder) / filename
            rows.setdefault(image_id, [str(img_path), []])[1].append(np.mean(per_person, axis=0))
    ids = sorted(rows)
    va = np.array([np.mean(rows[i][1], axis=0) for i in ids]).reshape(-1, 2)
    return pd.DataFrame({"image_id": ids, "valence": va[:, 0], "arousal": va[:, 1],
                         "path": [rows[i][0] for i in ids]})
