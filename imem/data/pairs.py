"""Image-music pairs: the similarity S, exact sigma, CDCML pair sampling, IMEMNet lists, leakage audit."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from imem.data.clips import split_clip_id
from imem.errors import ImemError


def similarity(distance: np.ndarray, sigma: float) -> np.ndarray:
    # CDCML (Zhao et al. 2020) eq. 1: S = exp(-d / sigma), d the Euclidean VA distance of the pair.
    return np.exp(-np.asarray(distance, dtype=np.float64) / sigma)


def _distances(clip_va: torch.Tensor, image_va: torch.Tensor) -> torch.Tensor:
    """(c, m) Euclidean VA distances, float32, computed element-wise (no matmul expansion)."""
    return torch.cdist(clip_va, image_va, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


def similarity_matrix(clip_va: np.ndarray, image_va: np.ndarray, sigma: float) -> np.ndarray:
    """(clips, images) ground-truth S of every clip-image combination (eq. 1 above)."""
    d = _distances(torch.as_tensor(np.asarray(clip_va), dtype=torch.float32),
                   torch.as_tensor(np.asarray(image_va), dtype=torch.float32))
    return similarity(d.numpy(), sigma)


def _sum(d: torch.Tensor) -> float:
    """Sum of a distance block: float32 row sums (torch sums in cascades: ~1e-9 relative error, measured),
    accumulated in float64. A float64 sum of the whole block costs 30x more for no visible gain."""
    return float(d.sum(dim=1).double().sum())


def mean_distance(clip_va: np.ndarray, image_va: np.ndarray, chunk_size: int = 2048) -> float:
    """Exact mean Euclidean VA distance over ALL clip x image pairs (chunked, vectorised, not sampled)."""
    total, n = 0.0, 0
    img = torch.as_tensor(np.asarray(image_va, dtype=np.float32))
    for start in range(0, len(clip_va), chunk_size):
        c = torch.as_tensor(np.asarray(clip_va[start:start + chunk_size], dtype=np.float32))
        total += _sum(_distances(c, img))
        n += c.shape[0] * img.shape[0]
    if n == 0:
        raise ImemError("sigma: no image-clip pairs (no clips or no images)")
    return total / n


@dataclass
class SampledPairs:
    sigma: float
    pairs: dict[str, pd.DataFrame]  # split -> clip_id, image_id, distance, score, kind


def sample_pairs(
    clips: pd.DataFrame,
    images: pd.DataFrame,
    top: int = 10,
    bottom: int = 10,
    random: int = 30,
    keep_fraction: float = 0.1,
    seed: int = 0,
    chunk_size: int = 2048,
    progress: bool = True,
) -> SampledPairs:
    """CDCML's pair construction (Zhao et al. 2020 section 3), with sigma computed in the same pass.

    ``clips`` and ``images`` need columns ``split, valence, arousal`` (normalised) and their ids.
    sigma is the mean distance over all clips x all images (every split); per clip, from the images of
    the clip's own split: the ``top`` highest-S, the ``bottom`` lowest-S and ``random`` others drawn
    uniformly without replacement; then ``keep_fraction`` of all those pairs, uniformly. S is monotone
    in the distance, so the selection needs no sigma and one pass over the distances serves both.
    The random draws depend only on ``seed`` (not on ``chunk_size``).
    """
    for name, df in (("clips", clips), ("images", images)):
        for col in ("split", "valence", "arousal"):
            if col not in df.columns:
                raise ImemError(f"sample_pairs: {name} table has no column {col!r}")
    rng = np.random.default_rng(seed)
    img_order = np.argsort(images["split"].to_numpy(), kind="stable")
    img_split = images["split"].to_numpy()[img_order]
    img_va = torch.as_tensor(images[["valence", "arousal"]].to_numpy(dtype=np.float32)[img_order])
    clip_va_all = clips[["valence", "arousal"]].to_numpy(dtype=np.float32)
    total = 0.0
    per_split_sel: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    bar = tqdm(total=len(clips), desc="pairs", unit="clip", disable=not progress)
    for split in pd.unique(clips["split"]):
        rows = np.nonzero(clips["split"].to_numpy() == split)[0]
        cols = np.nonzero(img_split == split)[0]
        if len(cols) == 0:
            raise ImemError(f"split {split!r} has clips but no images")
        lo, hi = int(cols[0]), int(cols[-1]) + 1  # images sorted by split: a contiguous block
        n_img = hi - lo
        k_top, k_bot = min(top, n_img), min(bottom, max(n_img - top, 0))
        chosen = np.empty((len(rows), k_top + k_bot), dtype=np.int64)
        for start in range(0, len(rows), chunk_size):
            r = rows[start:start + chunk_size]
            d = _distances(torch.as_tensor(clip_va_all[r]), img_va)
            total += _sum(d)
            ds = d[:, lo:hi]
            parts = []
            if k_top:
                parts.append(torch.topk(ds, k_top, dim=1, largest=False, sorted=True).indices)
            if k_bot:
                parts.append(torch.topk(ds, k_bot, dim=1, largest=True, sorted=True).indices)
            if parts:
                chosen[start:start + len(r)] = torch.cat(parts, dim=1).numpy()
            bar.update(len(r))
        rnd = _random_others(chosen, n_img, random, rng)
        per_split_sel[split] = (rows, np.concatenate([chosen, rnd], axis=1) + lo, (k_top, k_bot, rnd.shape[1]))
    bar.close()
    n_pairs = len(clips) * len(images)
    if n_pairs == 0:
        raise ImemError("sigma: no image-clip pairs (no clips or no images)")
    sigma = total / n_pairs

    img_ids = images["image_id"].to_numpy()[img_order]
    img_va_np = img_va.numpy().astype(np.float64)
    out = {}
    for split, (rows, sel, (k_top, k_bot, k_rnd)) in per_split_sel.items():
        kinds = np.array(["top"] * k_top + ["bottom"] * k_bot + ["random"] * k_rnd, dtype=object)
        n = sel.size
        keep = np.sort(rng.choice(n, size=int(round(keep_fraction * n)), replace=False))
        r_idx, c_idx = np.divmod(keep, sel.shape[1])
        clip_rows = rows[r_idx]
        img_idx = sel[r_idx, c_idx]
        dist = np.sqrt(((clip_va_all[clip_rows].astype(np.float64) - img_va_np[img_idx]) ** 2).sum(axis=1))
        out[split] = pd.DataFrame({
            "clip_id": clips["clip_id"].to_numpy()[clip_rows],
            "image_id": img_ids[img_idx],
            "distance": dist,
            "score": similarity(dist, sigma),
            "kind": kinds[c_idx],
        })
    return SampledPairs(sigma, out)


def _random_others(chosen: np.ndarray, n_img: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, ``k`` distinct indices in [0, n_img) not in that row of ``chosen`` (fewer if too few remain)."""
    n_rows, n_chosen = chosen.shape
    k = max(0, min(k, n_img - n_chosen))
    if k == 0 or n_rows == 0:
        return np.empty((n_rows, 0), dtype=np.int64)
    if n_img <= 4 * (n_chosen + k):
        # Small pools: a random permutation per row with the chosen ones pushed to the end.
        keys = rng.random((n_rows, n_img))
        np.put_along_axis(keys, chosen, 2.0, axis=1)
        return np.argsort(keys, axis=1, kind="stable")[:, :k]
    # Large pools: draw, then redraw the (rare) rows with a repeat or a clash with the chosen ones.
    out = rng.integers(0, n_img, size=(n_rows, k))
    todo = np.arange(n_rows)
    while len(todo):
        both = np.sort(np.concatenate([chosen[todo], out[todo]], axis=1), axis=1)
        bad = (both[:, 1:] == both[:, :-1]).any(axis=1)
        todo = todo[bad]
        out[todo] = rng.integers(0, n_img, size=(len(todo), k))
    return out


# --- IMEMNet's published pair lists ------------------------------------------------------------------

def read_pair_list(path: str | Path) -> pd.DataFrame:
    """``<song>-<k> <image_id> <score>`` per line, space-separated, no header (linkAmy/IMEMNet)."""
    path = Path(path)
    if not path.is_file():
        raise ImemError(f"IMEMNet pair list not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise ImemError(f"{path}:{lineno}: expected '<clip_id> <image_id> <score>', got {line.strip()!r}")
            clip_id, image_id, score = parts
            try:
                split_clip_id(clip_id)
                s = float(score)
            except ValueError as exc:
                raise ImemError(f"{path}:{lineno}: {exc}") from exc
            if not np.isfinite(s) or s < 0 or s > 1:
                raise ImemError(f"{path}:{lineno}: score {score} is outside [0, 1]")
            rows.append((clip_id, image_id, s))
    if not rows:
        raise ImemError(f"{path}: no pairs in the file (expected lines '<clip_id> <image_id> <score>')")
    df = pd.DataFrame(rows, columns=["clip_id", "image_id", "score"])
    df["song_id"] = df["clip_id"].str.rpartition("-")[0]
    return df


def check_pairs_resolve(pairs: pd.DataFrame, clip_ids: set, image_ids: set, where: str) -> None:
    """Every clip and image id of a pair list must name a prepared clip / image."""
    for col, known, what in (("clip_id", clip_ids, "clip"), ("image_id", image_ids, "image")):
        missing = ~pairs[col].isin(known)
        if missing.any():
            raise ImemError(f"{where}: {what} id {pairs[col][missing].iloc[0]!r} matches no {what} of the corpus "
                            f"({int(missing.sum())} pairs affected)")


# --- leakage audit ------------------------------------------------------------------------------------

def leakage_audit(pairs: dict[str, pd.DataFrame]) -> dict:
    """Items and pairs shared between splits, and duplicate pairs within each split.

    ``pairs`` maps a split name to a frame with ``clip_id, image_id`` (and ``score``). Songs come from
    the clip ids (``<song>-<k>``). Duplicates: identical lines (same clip, image and score) and repeated
    (clip, image) keys.
    """
    def items(df):
        return {
            "songs": set(df["clip_id"].str.rpartition("-")[0]),
            "clips": set(df["clip_id"]),
            "images": set(df["image_id"]),
            "pairs": set(zip(df["clip_id"], df["image_id"], strict=True)),
        }

    sets = {name: items(df) for name, df in pairs.items()}
    report: dict = {"splits": {}, "shared": {}, "clean": True}
    for name, df in pairs.items():
        keyed = df.duplicated(["clip_id", "image_id"]).sum()
        lines = df.duplicated([c for c in ("clip_id", "image_id", "score") if c in df.columns]).sum()
        report["splits"][name] = {
            **{k: len(v) for k, v in sets[name].items()},
            "pair_lines": len(df),
            "duplicate_lines": int(lines),
            "duplicate_pair_keys": int(keyed),
        }
        if keyed:
            report["clean"] = False
    for a, b in combinations(pairs, 2):
        shared = {k: len(sets[a][k] & sets[b][k]) for k in ("songs", "clips", "images", "pairs")}
        la = pairs[a]
        key_b = set(zip(pairs[b]["clip_id"], pairs[b]["image_id"], strict=True))
        shared["pair_lines_of_" + a] = int(sum(k in key_b for k in zip(la["clip_id"], la["image_id"], strict=True)))
        shared["songs_of_" + a + "_in_" + b] = f"{shared['songs']}/{len(sets[a]['songs'])}"
        report["shared"][f"{a}~{b}"] = shared
        if any(shared[k] for k in ("songs", "clips", "images", "pairs")):
            report["clean"] = False
    return report


def audit_markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", "", "| split | songs | clips | images | pair lines | distinct pairs | "
             "duplicate lines | duplicate pair keys |", "|---|---|---|---|---|---|---|---|"]
    for name, s in report["splits"].items():
        lines.append(f"| {name} | {s['songs']} | {s['clips']} | {s['images']} | {s['pair_lines']} | "
                     f"{s['pairs']} | {s['duplicate_lines']} | {s['duplicate_pair_keys']} |")
    lines += ["", "| splits | shared songs | shared clips | shared images | shared pairs |", "|---|---|---|---|---|"]
    for name, s in report["shared"].items():
        lines.append(f"| {name} | {s['songs']} | {s['clips']} | {s['images']} | {s['pairs']} |")
    lines += ["", "Verdict: " + ("no leakage between splits and no duplicate pairs." if report["clean"]
                                 else "LEAKAGE or duplicates found (see the counts above)."), ""]
    return "\n".join(lines)
