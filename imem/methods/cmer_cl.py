"""CMER-CL: cross-modal music emotion recognition with composite loss-based embeddings (issues 7, 15).

Takashima, Li, Grzegorzek, Shirahama, "Cross-modal Music Emotion Recognition Using Composite Loss-based
Embeddings", arXiv:2112.07192 (full text: shared/papers/001_b713675a1af9457a.txt). Retrieval units are
**songs** (§4.1.1): a song's 30-s segment ``segment_start_s``-``segment_end_s`` (15-45 s), its emotion the
2-Hz VA sequence of the segment (T = 60) and its music input the mean frozen feature of its clips inside the
segment (the MLP music encoder of §3.1 on the mean feature, the best on DEAM). The music encoder (five softplus
FC layers) and the emotion encoder (BiGRU + five softplus FC layers) each end in three FC heads (§3.4): a CCA
embedding FC(f̂) and the mean / log-variance of a diagonal Gaussian, trained with

    CL = lambda * CCA(FC(f̂_m), FC(f̂_e)) + (1 - lambda) * KL-ranking(Gaussians)          (eq. 1)

Retrieval both ways (§3.4): score = lambda * Pearson(E_q, E_t) + (1 - lambda) * (-KL(N_q || N_t)), E = W^T FC(f̂)
with the CCA projections W fitted on the training split (eq. 3), ranked by MRR, average and median rank. The
paper's regression baselines (§4.5, table 3) are two rows: RegMLP (M2E: MLP on the mean audio feature -> mean
VA; E2M: MLP on the mean VA -> mean audio feature) and RegBiGRU (M2E: BiGRU over the segment's clip features ->
mean VA; E2M: BiGRU over the VA sequence -> mean audio feature), MAE losses, ranked by absolute error.
docs/methods/cmer_cl.md maps every quantity to the paper and states each deviation.

The VA samples are read from the raw corpus under ``corpus_root`` and mapped to [0, 1] with the per-source
affine map the prepare stage applied to the clip means (recovered exactly from clips.csv's raw and normalised
columns).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from imem.data.clips import DynamicAnnotations
from imem.errors import ImemError
from imem.methods.base import (
    CHANCE_ROW,
    SPLITS,
    VA,
    MethodData,
    MethodResult,
    RunContext,
    batches,
    feature_scale,
    regression_columns,
    torch_threads,
)
from imem.metrics import expected_reciprocal_rank

LABEL = "CMER-CL"

DEFAULTS = {
    # raw corpus holding the dynamic annotations (the prepare stage's corpus_root / music source)
    "corpus_root": "data",
    "music_format": "deam",  # deam | pmemo
    "music_dir": "DEAM",
    # the song's segment (§4.1.1: 15-45 s of every DEAM song, T = 60 samples at 2 Hz)
    "segment_start_s": 15.0,
    "segment_end_s": 45.0,
    # CMER-CL (§4.3)
    "epochs": 60,  # paper: 5,001 at lr 1e-5 (CPU budget, see the docs)
    "batch_size": 128,  # songs per batch: the whole train split (115 songs) in one, for the CCA covariances
    "lr": 1.0e-3,
    "weight_decay": 0.0,
    "embed_dim": 1024,  # d of the Gaussian space C^(kl) (§4.3.2)
    "cca_dim": 32,  # D of the CCA space C^(cca) (paper 1024: rank-deficient on ~115 songs, see the docs)
    "music_layers": [256, 512, 512, 1024, 1024],  # softplus FC layers of the music MLP (§4.3.1)
    "emotion_layers": [512, 512, 512, 1024, 1024],  # softplus FC layers after the emotion BiGRU (§4.3.1)
    "gru_hidden": 64,  # emotion BiGRU units per direction (paper 512, §4.3.1: 3.5x slower per epoch here)
    "dropout": 0.0,  # paper 0.5 (§4.3.1): on ~115 train songs the dropout noise is all the CCA fits (see the docs)
    "lambda_cca": 0.8,  # lambda of eq. 1 and of the retrieval score (§4.4.2, DEAM)
    "margin": 1.0,  # alpha of eq. 6 (§4.4.2, DEAM)
    "hinge": "eq6",  # eq6: [D_pos - alpha - D_neg]_+ as eq. 6 prints it | triplet: [alpha + D_pos - D_neg]_+
    "cca_eps": 1.0e-3,  # ridge added to the CCA covariance matrices
    # RegMLP / RegBiGRU baselines (§4.5, table 3: hidden FC layers; the output layer is the target's width)
    "baseline_epochs": 60,  # paper: 2,000-19,200 (table 3)
    "baseline_lr": 1.0e-3,
    "regmlp_m2e_layers": [128, 64, 16, 128, 512],
    "regmlp_e2m_layers": [32],
    "regbigru_m2e_layers": [64, 32, 16, 32],
    "regbigru_m2e_hidden": 64,  # paper 512 (table 3): 5x slower per epoch here
    "regbigru_e2m_layers": [128, 32, 128, 128],
    "regbigru_e2m_hidden": 128,
    # torch CPU threads while training (0: leave torch's setting)
    "cpu_threads": 1,
}
BASELINES = ("RegMLP", "RegBiGRU")
LOGVAR_BOUND = 8.0  # log-variances are squashed into (-8, 8) (smoothly, by tanh) for numerical safety


# --- the paper's formulas ------------------------------------------------------------------------------


def pairwise_kl(
    mu_a: torch.Tensor, lv_a: torch.Tensor, mu_b: torch.Tensor, lv_b: torch.Tensor
) -> torch.Tensor:
    """(n_a, n_b) matrix D[i, j] = KL(N(mu_a_i, diag e^lv_a_i) || N(mu_b_j, diag e^lv_b_j)), every sum over
    the d dims written as a matrix product (O(n_a n_b d) in BLAS, not an (n_a, n_b, d) tensor)."""
    ib = torch.exp(-lv_b)  # 1 / sigma_b
    # Takashima et al., eq. 8: 1/2 {sum sigma_a/sigma_b - d + ln prod sigma_b/prod sigma_a + sum (mu_b - mu_a)^2/sigma_b}
    return 0.5 * (
        torch.exp(lv_a) @ ib.T
        - mu_a.shape[-1]
        + lv_b.sum(-1)[None]
        - lv_a.sum(-1)[:, None]
        + (mu_a**2) @ ib.T
        - 2 * mu_a @ (mu_b * ib).T
        + (mu_b**2 * ib).sum(-1)[None]
    )


def _whitened_cross(h1: torch.Tensor, h2: torch.Tensor, eps: float):
    """Centred float64 views, Cholesky factors L1, L2 of the ridged covariances and T = L1^-1 S12 L2^-T
    (same singular values as S11^-1/2 S12 S22^-1/2)."""
    n, d1 = h1.shape
    if n < 2:
        raise ImemError(f"CCA needs at least 2 samples, got {n}")
    x = h1.double() - h1.double().mean(0)
    y = h2.double() - h2.double().mean(0)
    s11 = x.T @ x / (n - 1) + eps * torch.eye(d1, dtype=torch.float64, device=h1.device)
    s22 = y.T @ y / (n - 1) + eps * torch.eye(h2.shape[1], dtype=torch.float64, device=h1.device)
    l1, l2 = torch.linalg.cholesky(s11), torch.linalg.cholesky(s22)
    t = torch.linalg.solve_triangular(l1, x.T @ y / (n - 1), upper=False)  # L1^-1 S12
    t = torch.linalg.solve_triangular(l2, t.T, upper=False).T  # ... L2^-T
    return l1, l2, t


def cca_loss(h1: torch.Tensor, h2: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Minus the sum of the canonical correlations of two (n, D) views: eq. 3's -tr(W_m^T S_me W_e) at its
    optimum under W_m^T S_mm W_m = W_e^T S_ee W_e = I (Andrew et al. 2013), ``eps`` a ridge on S_mm, S_ee."""
    # Takashima et al., eq. 3 (the nuclear norm of S_mm^-1/2 S_me S_ee^-1/2)
    return (-torch.linalg.svdvals(_whitened_cross(h1, h2, eps)[2]).sum()).to(h1.dtype)


def cca_projections(h1: torch.Tensor, h2: torch.Tensor, eps: float = 1e-3):
    """The W_m, W_e solving eq. 3 on (n, D) views (columns sorted by canonical correlation) and the views'
    means: E = (h - mean) @ W. Projected, both views have identity covariance and cross-covariance diag(rho)."""
    l1, l2, t = _whitened_cross(h1, h2, eps)
    u, _, vh = torch.linalg.svd(t)
    w1 = torch.linalg.solve_triangular(l1.T, u, upper=True)  # L1^-T U
    w2 = torch.linalg.solve_triangular(l2.T, vh.T, upper=True)  # L2^-T V
    return w1, w2, h1.double().mean(0), h2.double().mean(0)


def kl_rank_loss(d_me: torch.Tensor, d_em: torch.Tensor, margin: float, hinge: str = "eq6") -> torch.Tensor:
    """Eq. 6 summed over the batch's positive pairs: d_me[n, n'] = D(N^m_n, N^e_n'), d_em[n, n'] =
    D(N^e_n, N^m_n'), both (N, N) with the positive pairs on the diagonal. ``eq6``: the hinge as printed,
    max{0, D_pos - alpha - D_neg}; ``triplet``: max{0, alpha + D_pos - D_neg} (the reading of the prose)."""
    b = d_me.shape[0]
    if b < 2 or d_me.shape != (b, b) or d_em.shape != (b, b):
        raise ImemError(
            f"KL-ranking loss needs two square divergence matrices of >= 2 pairs, got {tuple(d_me.shape)}"
        )
    if hinge not in ("eq6", "triplet"):
        raise ImemError(f"params: methods.cmer_cl.hinge = {hinge!r} is not one of: eq6, triplet")
    off = ~torch.eye(b, dtype=torch.bool, device=d_me.device)
    alpha = -margin if hinge == "eq6" else margin
    # Takashima et al., eq. 6 (music anchors + emotion anchors), KL(G) = sum over n of r(N^m_n, N^e_n)
    return sum(torch.relu(alpha + d.diagonal()[:, None] - d)[off].sum() for d in (d_me, d_em))


def composite_loss(cca: torch.Tensor, kl_rank: torch.Tensor, lam: float) -> torch.Tensor:
    # Takashima et al., eq. 1: CL = lambda * CCA + (1 - lambda) * KL
    return lam * cca + (1.0 - lam) * kl_rank


def pearson_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n_a, n_b) Pearson correlation between the rows of a (n_a, D) and b (n_b, D), over the D dims."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def retrieval_score(pearson: torch.Tensor, kl: torch.Tensor, lam: float) -> torch.Tensor:
    # Takashima et al., §3.4: similarity = lambda * Pearson(E_q, E_t) + (1 - lambda) * (-KL(N_q || N_t))
    return lam * pearson - (1.0 - lam) * kl


# --- retrieval -----------------------------------------------------------------------------------------


def ranks_from_distances(dist: np.ndarray, relevant: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's (row's) relevant candidate among all candidates of its row, lower
    distance first; ``relevant`` (a bool matrix like ``dist``, one relevant candidate or more per row)
    defaults to the diagonal of a square ``dist`` (each query's own candidate). ``dist`` may be (k, n): k
    queries (a bootstrap resample's draws, repeats allowed) over n >= 2 candidates. Ties count against the
    query: rank = 1 + #{j not relevant: D_ij <= min over relevant D_ij}, so a collapsed model whose distances
    are all equal gets rank n, not a lucky order."""
    dist = np.asarray(dist, dtype=np.float64)
    if (
        dist.ndim != 2
        or dist.shape[0] < 1
        or dist.shape[1] < 2
        or (relevant is None and dist.shape[0] != dist.shape[1])
    ):
        raise ImemError(
            f"retrieval needs a (queries x candidates) distance matrix over >= 2 candidates (square without "
            f"a relevance mask), got {dist.shape}"
        )
    if relevant is None:
        relevant = np.eye(len(dist), dtype=bool)
    elif (relevant := np.asarray(relevant, dtype=bool)).shape != dist.shape or not relevant.any(axis=1).all():
        raise ImemError(
            f"retrieval: relevance mask {relevant.shape} must be like the distances {dist.shape}, "
            "with a relevant candidate in every row"
        )
    best = np.where(relevant, dist, np.inf).min(axis=1, keepdims=True)  # NaN stays NaN, as D_ii did
    return 1 + ((dist <= best) & ~relevant).sum(axis=1)


def abs_error_distances(pred: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """(n_pred, n_true) absolute errors sum_k |pred_ik - true_jk| (the baselines' AE of §4.5), float64."""
    a, b = pred.detach().double().cpu().flatten(1), true.detach().double().cpu().flatten(1)
    return torch.cdist(a, b, p=1.0).numpy()


def query_ranks(dist_m2e: np.ndarray, dist_e2m: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every song's rank as a query, both directions, over the split's whole candidate pool: ``m2e`` from the
    rows of the square (music x emotion) ``dist_m2e``, ``e2m`` from the rows of the (emotion x music)
    ``dist_e2m`` (default ``dist_m2e.T``, one symmetric distance). Computed once; a bootstrap resample then
    only indexes them (:func:`columns_from_ranks`)."""
    dist_m2e = np.asarray(dist_m2e, dtype=np.float64)
    dist_e2m = dist_m2e.T if dist_e2m is None else np.asarray(dist_e2m, dtype=np.float64)
    if dist_m2e.ndim != 2 or dist_m2e.shape[0] != dist_m2e.shape[1] or dist_e2m.shape != dist_m2e.shape:
        raise ImemError(f"retrieval needs square (music x emotion) distance matrices, got {dist_m2e.shape}")
    return {s: ranks_from_distances(d).astype(np.float64) for s, d in (("m2e", dist_m2e), ("e2m", dist_e2m))}


def retrieval_columns(dist_m2e: np.ndarray, dist_e2m: np.ndarray | None = None) -> dict[str, float]:
    """``m2e_*`` / ``e2m_*`` of the whole split (:func:`query_ranks` then :func:`columns_from_ranks`)."""
    return columns_from_ranks(query_ranks(dist_m2e, dist_e2m))


def columns_from_ranks(ranks: dict[str, np.ndarray], idx: np.ndarray | None = None) -> dict[str, float]:
    """MRR, average and median rank of the queries ``idx`` (repeats counted; None: all) from :func:`query_ranks`."""
    row = {}
    for short, full in ranks.items():
        r = full if idx is None else full[np.asarray(idx, dtype=np.intp)]
        row.update(
            {
                f"{short}_mrr": float(np.mean(1.0 / r)),
                f"{short}_avg_rank": float(np.mean(r)),
                f"{short}_median_rank": float(np.median(r)),
            }
        )
    return row


@dataclass(frozen=True)
class Scored:
    """What one row is scored from, computed once after training: the split's (music songs x emotion songs)
    distances ``dist`` for m2e and (emotion x music) ``dist_e2m`` for e2m (None: ``dist.T``) and, for the
    regression baselines, the predicted and true song mean VA ((n, 2) valence, arousal)."""

    dist: np.ndarray
    dist_e2m: np.ndarray | None = None
    pred_va: np.ndarray | None = None
    true_va: np.ndarray | None = None

    @functools.cached_property
    def ranks(self) -> dict[str, np.ndarray]:
        """:func:`query_ranks` of the distances, once for the split and all its bootstrap resamples."""
        return query_ranks(self.dist, self.dist_e2m)


def score_rows(scored: dict[str, Scored], si: np.ndarray) -> dict[str, dict[str, float]]:
    """The rows on the songs ``si`` of the split (``arange(n)``: the reported rows; a bootstrap resample:
    repeated indices): the drawn songs are the queries, each ranked over the split's whole candidate pool.
    Only numpy indexing, no forward pass. The M2E baselines' song-mean VA errors are not row columns: the
    comparison's ``music_*`` columns are per 2-s clip for every other row, and a song mean is another unit
    (:func:`song_va_errors` puts them in the run notes instead)."""
    si = np.asarray(si, dtype=np.intp)
    return {label: columns_from_ranks(s.ranks, si) for label, s in scored.items()}


def song_va_errors(scored: dict[str, Scored]) -> dict[str, float]:
    """``<row>_song_{valence,arousal}_{mse,mae}``: each M2E baseline's error on the split's song-mean VA."""
    out = {}
    for label, s in scored.items():
        if s.pred_va is not None:
            for k, v in regression_columns({"music": s.pred_va}, {"music": s.true_va}).items():
                out[f"{label.lower()}_song_{k.removeprefix('music_')}"] = v
    return out


def make_rescore(
    scored: dict[str, Scored], song_of_clip: np.ndarray
) -> Callable[[np.ndarray, np.ndarray], dict[str, dict[str, float]]]:
    """``MethodResult.rescore``: clip indices ``ci`` of a resample (a song drawn k times: each of its clips k
    times), image indices ``ii`` (ignored: CMER-CL is music-only). ``song_of_clip[c]`` is the song index of
    clip c where c is its song's first clip in the split's table, else -1: so a song drawn k times is k
    queries."""
    song_of_clip = np.asarray(song_of_clip, dtype=np.intp)

    def rescore(ci: np.ndarray, ii: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        si = song_of_clip[np.asarray(ci, dtype=np.intp)]
        return score_rows(scored, si[si >= 0])

    return rescore


def chance_columns(n: int) -> dict[str, float]:
    """Exact expectations under a uniformly random ranking of ``n`` candidates (the own one uniform on 1..n):
    MRR = H_n / n, mean rank = (n + 1) / 2; median rank (n + 1) / 2, which is both the midpoint median of the
    uniform rank and, by the symmetry r <-> n + 1 - r, the exact expected sample median over queries."""
    mrr = expected_reciprocal_rank(n, 1)  # = H_n / n
    mid = (n + 1) / 2
    return {
        f"{d}_{m}": v
        for d in ("m2e", "e2m")
        for m, v in (("mrr", mrr), ("avg_rank", mid), ("median_rank", mid))
    }


# --- the emotion sequences -----------------------------------------------------------------------------


def load_dynamic(cfg: dict) -> tuple[str, DynamicAnnotations]:
    """The raw corpus' dynamic annotations (source name, grid), from ``corpus_root`` / ``music_dir``."""
    from imem.data.music import load_music

    root = Path(str(cfg["corpus_root"]))
    if not root.is_dir():
        raise ImemError(
            f"params: methods.cmer_cl.corpus_root = {str(root)!r} is not a directory "
            "(CMER-CL reads the dynamic VA annotations of the raw corpus)"
        )
    music = load_music(root, {"format": cfg["music_format"], "dir": cfg["music_dir"]}, check_media=False)
    return music.name, music.dynamic


def affine_maps(clips: list[pd.DataFrame], tol: float = 1e-5) -> dict[str, dict[str, tuple[float, float]]]:
    """Per source and dimension the prepare stage's ``normalised = (raw - min) / range``, recovered by a
    least-squares line through the clips' (``<dim>_raw``, ``<dim>``) columns:
    {source: {dim: (min, range)}}."""
    allc = pd.concat(clips, ignore_index=True)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for source, g in allc.groupby("source"):
        out[str(source)] = {}
        for dim in VA:
            raw, norm = g[f"{dim}_raw"].to_numpy(float), g[dim].to_numpy(float)
            if np.ptp(raw) <= 0:
                raise ImemError(
                    f"clips.csv: source {source} has a constant raw {dim}; its normalisation "
                    "cannot be recovered"
                )
            slope, icpt = np.polyfit(raw, norm, 1)
            if np.max(np.abs(slope * raw + icpt - norm)) > tol:
                raise ImemError(
                    f"clips.csv: source {source}: {dim} is not an affine map of {dim}_raw "
                    "(not written by the prepare stage?)"
                )
            out[str(source)][dim] = (float(-icpt / slope), float(1.0 / slope))
    return out


def va_sequences(
    clips: pd.DataFrame, dyn: DynamicAnnotations, maps: dict, source: str, tol: float = 1e-5
) -> np.ndarray:
    """(n_clips, T, 2) normalised (valence, arousal) samples of each clip's window [start_s, end_s).

    ImemError naming the clip when a sample is missing, and when the mean of a clip's raw samples is not its
    clips.csv ``<dim>_raw`` (the corpus under corpus_root is not the one the clips were cut from)."""
    if len(clips) == 0:
        return np.zeros((0, 0, 2), np.float32)
    other = sorted(set(clips["source"].astype(str)) - {source})
    if other:
        raise ImemError(
            f"clips.csv has {other[0]!r} clips but methods.cmer_cl.music_format reads {source!r} annotations"
        )
    step = dyn.step_ms
    start = np.round(clips["start_s"].to_numpy(float) * 1000).astype(np.int64)
    end = np.round(clips["end_s"].to_numpy(float) * 1000).astype(np.int64)
    lengths = (end - start) // step
    if (lengths != lengths[0]).any() or lengths[0] < 1 or ((end - start) % step).any():
        raise ImemError(f"clips.csv: clip windows are not all the same whole number of {step}-ms samples")
    t = int(lengths[0])
    song_pos = {s: i for i, s in enumerate(dyn.song_ids)}
    sidx = np.array([song_pos.get(str(s), -1) for s in clips["song_id"]])
    times = start[:, None] + np.arange(t)[None, :] * step  # (n, T) expected sample times
    t0 = int(dyn.times_ms[0]) if len(dyn.times_ms) else 0
    pos = (times - t0) // step
    ok = (sidx[:, None] >= 0) & ((times - t0) % step == 0) & (pos >= 0) & (pos < len(dyn.times_ms))
    pos = np.clip(pos, 0, max(len(dyn.times_ms) - 1, 0))
    safe = np.maximum(sidx, 0)[:, None]
    raw = (
        np.stack([dyn.valence[safe, pos], dyn.arousal[safe, pos]], axis=-1)
        if len(dyn.times_ms)
        else np.full((len(clips), t, 2), np.nan)
    )
    ok &= np.isfinite(raw).all(axis=-1)
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        raise ImemError(
            f"clip {clips['clip_id'].iloc[i]}: no dynamic VA sample at {times[i, j]} ms in the "
            f"{source} annotations (CMER-CL needs every sample of the window)"
        )
    seq = np.empty_like(raw)
    for k, dim in enumerate(VA):
        mean_raw = raw[..., k].mean(axis=1)
        bad = np.abs(mean_raw - clips[f"{dim}_raw"].to_numpy(float)) > tol
        if bad.any():
            i = int(np.argmax(bad))
            raise ImemError(
                f"clip {clips['clip_id'].iloc[i]}: mean dynamic {dim} {mean_raw[i]:.6f} != clips.csv "
                f"{dim}_raw {clips[f'{dim}_raw'].iloc[i]:.6f} (corpus_root is not the prepared corpus)"
            )
        lo, rng = maps[source][dim]
        seq[..., k] = (raw[..., k] - lo) / rng
    return seq.astype(np.float32)


@dataclass(frozen=True)
class Songs:
    """A split's retrieval units (§4.1.1): ``song_ids`` in order of first appearance in clips.csv, ``seq``
    (n_songs, T, 2) normalised VA of each song's segment, ``va`` its mean (n_songs, 2), ``clips`` per song the
    positions (in the split's clip table) of its clips inside the segment, ``song_of_clip`` the song index of
    each song's first clip in the table (-1 for every other clip: the bootstrap's queries)."""

    song_ids: list[str]
    seq: np.ndarray
    clips: list[np.ndarray]
    song_of_clip: np.ndarray

    @property
    def va(self) -> np.ndarray:
        return self.seq.mean(axis=1)


def song_segments(
    clips: pd.DataFrame, dyn: DynamicAnnotations, maps: dict, source: str, start_s: float, end_s: float
) -> Songs:
    """The songs of ``clips`` with the VA samples at start_s, start_s + step, ... < end_s of their dynamic
    annotations (DEAM: 15, 15.5, ..., 44.5 s: T = 60), normalised with ``maps``; ImemError naming the song when
    a sample is missing or no clip lies inside the segment. The clips' own windows are checked against
    clips.csv by :func:`va_sequences` first (the corpus under corpus_root must be the prepared one)."""
    va_sequences(clips, dyn, maps, source)
    step = dyn.step_ms
    t0_ms, t1_ms = round(start_s * 1000), round(end_s * 1000)
    if (t1_ms - t0_ms) % step or t1_ms <= t0_ms:
        raise ImemError(
            f"params: methods.cmer_cl.segment_end_s = {end_s!r} - segment_start_s must be a positive whole "
            f"number of {step}-ms samples"
        )
    times = t0_ms + step * np.arange((t1_ms - t0_ms) // step)
    col = {int(t): i for i, t in enumerate(dyn.times_ms)}
    song_pos = {s: i for i, s in enumerate(dyn.song_ids)}
    song_ids = list(dict.fromkeys(clips["song_id"].astype(str)))
    sid = clips["song_id"].astype(str).to_numpy()
    cs = np.round(clips["start_s"].to_numpy(float) * 1000)
    ce = np.round(clips["end_s"].to_numpy(float) * 1000)
    inside = (cs >= t0_ms) & (ce <= t1_ms)
    seq = np.empty((len(song_ids), len(times), 2), np.float32)
    members, song_of_clip = [], np.full(len(clips), -1, np.intp)
    for k, s in enumerate(song_ids):
        cols = [col.get(int(t), -1) for t in times]
        raw = (
            np.stack([dyn.valence[song_pos[s], cols], dyn.arousal[song_pos[s], cols]], axis=-1)
            if s in song_pos and min(cols) >= 0
            else np.full((len(times), 2), np.nan)
        )
        if not np.isfinite(raw).all():
            raise ImemError(
                f"song {s}: the {source} annotations lack dynamic VA samples in {start_s:g}-{end_s:g} s "
                "(CMER-CL needs every sample of the segment)"
            )
        for j, dim in enumerate(VA):
            lo, rng = maps[source][dim]
            seq[k, :, j] = (raw[:, j] - lo) / rng
        mine = np.flatnonzero(sid == s)
        song_of_clip[mine[0]] = k
        members.append(mine[inside[mine]])
        if len(members[-1]) == 0:
            raise ImemError(f"song {s}: no clip lies inside the segment {start_s:g}-{end_s:g} s")
    return Songs(song_ids, seq, members, song_of_clip)


def emotion_sequences(cfg: dict, data: MethodData) -> dict[str, Songs]:
    source, dyn = load_dynamic(cfg)
    maps = affine_maps([data.clips[s] for s in SPLITS])
    start, end = float(cfg["segment_start_s"]), float(cfg["segment_end_s"])
    return {s: song_segments(data.clips[s], dyn, maps, source, start, end) for s in SPLITS}


# --- models --------------------------------------------------------------------------------------------


def softplus_stack(d_in: int, layers: list[int], dropout: float = 0.0) -> nn.Sequential:
    """FC layers of the given widths, each followed by softplus (§4.3.1), dropout after all but the last."""
    mods: list[nn.Module] = []
    for k, width in enumerate(layers):
        mods += [nn.Linear(d_in, int(width)), nn.Softplus()]
        if dropout > 0 and k < len(layers) - 1:
            mods.append(nn.Dropout(dropout))
        d_in = int(width)
    return nn.Sequential(*mods)


def variance_preserving_(stack: nn.Sequential) -> nn.Sequential:
    """He (Kaiming) normal weights, zero biases for every Linear of a softplus stack, in place. torch's default
    Linear init (variance 1/(3 fan_in)) shrinks the between-sample spread ~3.5x per softplus layer while the
    softplus offset stays, so after the encoders' five layers the songs differ by 2e-3 (std) around 0.7 and,
    in eval mode, every song gets nearly the same f̂ (measured; Glorot, TF 1.15's default that the paper's code
    had, leaves 3e-2); He init keeps ~0.3 (a deviation of ours, docs/methods/cmer_cl.md)."""
    for m in stack:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return stack


def tf_gru_init_(gru: nn.GRU) -> nn.GRU:
    """TensorFlow 1.15's GRU defaults (the paper's library, §4.3.2) in place of torch's uniform +-1/sqrt(h):
    Glorot-uniform input kernels, orthogonal recurrent kernels (per gate), zero biases."""
    for name, p in gru.named_parameters():
        with torch.no_grad():
            for w in p.chunk(3, 0):  # torch stacks the reset, update and new gates
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(w)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(w)
                else:
                    nn.init.zeros_(w)
    return gru


class Heads(nn.Module):
    """The three FC heads of an encoder's f̂ (§3, §3.4): the CCA embedding FC(f̂) (linear), and the mean and
    log-variance of the diagonal Gaussian."""

    def __init__(self, d_f: int, cca_dim: int, d: int):
        super().__init__()
        self.cca, self.mu, self.logvar = nn.Linear(d_f, cca_dim), nn.Linear(d_f, d), nn.Linear(d_f, d)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.cca(f), self.mu(f), LOGVAR_BOUND * torch.tanh(self.logvar(f) / LOGVAR_BOUND)


class MusicEncoder(nn.Module):
    """Mean audio feature -> five softplus FC layers (dropout between) -> f̂ -> (FC(f̂), mu, log-variance)."""

    def __init__(self, d_in: int, layers: list[int], dropout: float, cca_dim: int, d: int):
        super().__init__()
        self.body = variance_preserving_(softplus_stack(d_in, layers, dropout))
        self.heads = Heads(int(layers[-1]), cca_dim, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.body(x))


def bigru_last(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, F) -> the forward direction's state at T and the backward one's at 1, concatenated (§3.1);
    ``lengths``: the true lengths of a padded batch."""
    if lengths is not None:
        x = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    _, h = gru(x)  # h: (2, B, hidden)
    return torch.cat([h[0], h[1]], dim=-1)


class EmotionEncoder(nn.Module):
    """(B, T, 2) VA sequence (z-scored on the train songs) -> BiGRU -> five softplus FC layers (dropout between)
    -> f̂ -> heads."""

    def __init__(self, hidden: int, layers: list[int], dropout: float, cca_dim: int, d: int):
        super().__init__()
        self.gru = tf_gru_init_(nn.GRU(2, hidden, batch_first=True, bidirectional=True))
        self.body = variance_preserving_(softplus_stack(2 * hidden, layers, dropout))
        self.heads = Heads(int(layers[-1]), cca_dim, d)

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.body(bigru_last(self.gru, seq)))


class Regressor(nn.Module):
    """A baseline of §4.5: (B, F) -> softplus FC layers -> Linear(d_out), or, with ``gru_hidden``, a (B, T, F)
    sequence -> BiGRU (last states) -> the same."""

    def __init__(self, d_in: int, layers: list[int], d_out: int, gru_hidden: int = 0):
        super().__init__()
        self.gru = nn.GRU(d_in, gru_hidden, batch_first=True, bidirectional=True) if gru_hidden else None
        d = 2 * gru_hidden if gru_hidden else d_in
        self.body = softplus_stack(d, layers)
        self.out = nn.Linear(int(layers[-1]) if layers else d, d_out)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.gru is not None:
            x = bigru_last(self.gru, x, lengths)
        return self.out(self.body(x))


# --- training ------------------------------------------------------------------------------------------

LAYER_KEYS = (
    "music_layers",
    "emotion_layers",
    "regmlp_m2e_layers",
    "regmlp_e2m_layers",
    "regbigru_m2e_layers",
    "regbigru_e2m_layers",
)


def check_config(cfg: dict) -> dict:
    """DEFAULTS merged under ``cfg`` and every value checked (one-line ImemError naming the parameter)."""
    from imem.params import METHODS

    out = {**copy.deepcopy(DEFAULTS), **cfg}
    unknown = sorted(set(cfg) - set(DEFAULTS) - set(METHODS["common"]) - {"method"})
    if unknown:
        raise ImemError(
            f"params: unknown key 'methods.cmer_cl.{unknown[0]}' (known: {', '.join(sorted(DEFAULTS))})"
        )

    def bad(key: str, why: str) -> ImemError:
        return ImemError(f"params: methods.cmer_cl.{key} = {out[key]!r} {why}")

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in (
        "epochs",
        "batch_size",
        "embed_dim",
        "cca_dim",
        "gru_hidden",
        "baseline_epochs",
        "regbigru_m2e_hidden",
        "regbigru_e2m_hidden",
        "cpu_threads",
    ):
        lo = {"batch_size": 2, "cpu_threads": 0}.get(key, 1)
        if not integer(out[key]) or out[key] < lo:
            raise bad(key, f"must be an integer >= {lo}")
    for key in LAYER_KEYS:
        v = out[key]
        empty_ok = key.startswith("reg")
        if not isinstance(v, list) or not all(integer(w) and w >= 1 for w in v) or (not v and not empty_ok):
            raise bad(key, f"must be a list of integers >= 1{' (may be empty)' if empty_ok else ''}")

    def number(key: str) -> bool:  # a finite int or float; not a bool (True is an int in Python)
        v = out[key]
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("lr", "baseline_lr", "cca_eps"):
        if not number(key) or not out[key] > 0:
            raise bad(key, "must be a finite number > 0")
    for key, lo, hi in (("lambda_cca", 0.0, 1.0), ("dropout", 0.0, 0.99)):
        if not number(key) or not lo <= out[key] <= hi:
            raise bad(key, f"must be a number in [{lo}, {hi}]")
    for key in ("margin", "weight_decay", "segment_start_s"):
        if not number(key) or out[key] < 0:
            raise bad(key, "must be a finite number >= 0")
    if not number("segment_end_s") or not out["segment_end_s"] > out["segment_start_s"]:
        raise bad("segment_end_s", "must be a finite number > segment_start_s")
    if out["hinge"] not in ("eq6", "triplet"):
        raise bad("hinge", "is not one of: eq6, triplet")
    if str(out["music_format"]).lower() not in ("deam", "pmemo"):
        raise bad(
            "music_format",
            "is not one of: deam, pmemo (CMER-CL needs DEAM- or PMEmo-format dynamic annotations)",
        )
    if not isinstance(out.get("music_encoder"), dict):
        raise ImemError(
            f"methods.cmer_cl: music_encoder {out.get('music_encoder')!r} is not resolved to a "
            "train.encoders spec"
        )
    return out


def _standardise(train: torch.Tensor, *others: torch.Tensor, dims=(0,)) -> tuple[torch.Tensor, ...]:
    mean, std = feature_scale(train, dims, keepdim=True)
    return tuple((x - mean) / std for x in (train, *others))


def _fit(
    name: str,
    modules: list[nn.Module],
    n_train: int,
    cfg: dict,
    epochs: int,
    lr: float,
    losses,
    val_losses,
    select: str,
    gen: torch.Generator,
    ctx: RunContext,
    history: dict[int, dict],
    val_select: str | None = None,
) -> int:
    """Adam over ``modules``. ``losses(idx)`` / ``val_losses()`` return {name: loss}; the one named ``select``
    is minimised. Per epoch the batch-size-weighted train losses and the val losses go into ``history``
    (``train/<name>``, ``val/<name>``) and ``ctx.log``; the weights of the lowest ``val/<val_select>``
    (default ``select``) are loaded back at the end. Returns the best epoch."""
    val_select = val_select or select
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=float(cfg["weight_decay"]))
    bs = int(cfg["batch_size"])
    best, best_epoch, best_state = math.inf, 0, None
    bar = tqdm(range(1, epochs + 1), desc=name, unit="epoch", disable=not ctx.progress, leave=False)
    for epoch in bar:
        for m in modules:
            m.train()
        sums: dict[str, float] = {}
        for idx in batches(n_train, bs, gen, shuffle=True, min_last=max(2, bs // 2)):
            parts = losses(idx)
            opt.zero_grad()
            parts[select].backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
        for m in modules:
            m.eval()
        with torch.no_grad():
            val = {k: float(v) for k, v in val_losses().items()}
        metrics = {
            **{f"train/{k}": v / n_train for k, v in sums.items()},
            **{f"val/{k}": v for k, v in val.items()},
        }
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise ImemError(
                f"{name}: {bad[0]} is not finite in epoch {epoch} (lower the methods.cmer_cl lr?)"
            )
        history.setdefault(epoch, {"epoch": epoch}).update(metrics)
        ctx.log(metrics, epoch)
        bar.set_postfix({f"val/{val_select}": f"{val[val_select]:.4f}"})
        if val[val_select] < best:
            best, best_epoch = val[val_select], epoch
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
    for m, sd in zip(modules, best_state, strict=True):
        m.load_state_dict(sd)
        m.eval()
    return best_epoch


def fit_evaluate(cfg: dict, data: MethodData, ctx: RunContext) -> MethodResult:
    from imem.training import _device

    cfg = check_config(cfg)
    device = _device(str(cfg["device"]))
    seed = int(cfg["seed"])
    songs = emotion_sequences(cfg, data)
    for s in ("train", "val", ctx.split):
        if len(songs[s].song_ids) < 2:
            raise ImemError(
                f"CMER-CL: split {s!r} has {len(songs[s].song_ids)} song(s); the losses and retrieval need >= 2"
            )
    clip_feats = [
        data.frozen(
            "music", cfg["music_encoder"], seed, s, device=str(cfg["device"]), progress=ctx.progress
        ).float()
        for s in SPLITS
    ]
    clip_feats = dict(zip(SPLITS, _standardise(*clip_feats), strict=True))
    # the VA sequences z-scored per dimension on the train songs (over songs and time): in [0, 1] they vary
    # between songs by ~0.1, which the BiGRU barely passes on (the emotion f̂ then differed by 1e-4, measured)
    seq_mean, seq_std = feature_scale(torch.from_numpy(songs["train"].seq), dims=(0, 1), keepdim=True)
    inputs = {}
    for s in SPLITS:
        # per song: its segment clips' features as a padded sequence (RegBiGRU-M2E) and their mean (§3.1)
        seqs = [clip_feats[s][torch.as_tensor(m)] for m in songs[s].clips]
        lengths = torch.tensor([len(m) for m in songs[s].clips])
        inputs[s] = {
            "mean": torch.stack([x.mean(0) for x in seqs]).to(device),
            "clips": nn.utils.rnn.pad_sequence(seqs, batch_first=True).to(device),
            "lengths": lengths,
            "seq": ((torch.from_numpy(songs[s].seq) - seq_mean) / seq_std).to(device),
        }
    with torch_threads(int(cfg["cpu_threads"]) if device.type == "cpu" else 0):
        result = _train_evaluate(cfg, ctx, device, songs, inputs)
    result.state["seq_scale"] = {"mean": seq_mean.flatten(), "std": seq_std.flatten()}  # for model.pt's users
    return result


def _cmer_distances(music, emotion, proj, x: torch.Tensor, seq: torch.Tensor, lam: float):
    """(m2e (music x emotion), e2m (emotion x music)) distances = minus the §3.4 similarity."""
    w1, w2, m1, m2 = proj
    e_m, mu_m, lv_m = music(x)
    e_e, mu_e, lv_e = emotion(seq)
    pear = pearson_matrix((e_m.double() - m1) @ w1, (e_e.double() - m2) @ w2)
    mu_m, lv_m, mu_e, lv_e = (v.double() for v in (mu_m, lv_m, mu_e, lv_e))
    s_m2e = retrieval_score(pear, pairwise_kl(mu_m, lv_m, mu_e, lv_e), lam)
    s_e2m = retrieval_score(pear.T, pairwise_kl(mu_e, lv_e, mu_m, lv_m), lam)
    return (-s_m2e).cpu().numpy(), (-s_e2m).cpu().numpy()


def _train_evaluate(
    cfg: dict, ctx: RunContext, device: torch.device, songs: dict, inputs: dict
) -> MethodResult:
    seed, split, t = int(cfg["seed"]), ctx.split, inputs["train"]["seq"].shape[1]
    n = {s: len(songs[s].song_ids) for s in SPLITS}
    lam, margin, hinge, eps = (
        float(cfg["lambda_cca"]),
        float(cfg["margin"]),
        cfg["hinge"],
        float(cfg["cca_eps"]),
    )
    d_feat = inputs["train"]["mean"].shape[1]
    history: dict[int, dict] = {}

    # CMER-CL: music encoder + emotion encoder, composite loss (eq. 1)
    torch.manual_seed(seed)
    cca_dim, d, drop = int(cfg["cca_dim"]), int(cfg["embed_dim"]), float(cfg["dropout"])
    music = MusicEncoder(d_feat, cfg["music_layers"], drop, cca_dim, d).to(device)
    emotion = EmotionEncoder(int(cfg["gru_hidden"]), cfg["emotion_layers"], drop, cca_dim, d).to(device)

    def cmer_losses(x: torch.Tensor, seq: torch.Tensor) -> dict[str, torch.Tensor]:
        e_m, mu_m, lv_m = music(x)
        e_e, mu_e, lv_e = emotion(seq)
        cca = cca_loss(e_m, e_e, eps)
        rank = kl_rank_loss(
            pairwise_kl(mu_m, lv_m, mu_e, lv_e), pairwise_kl(mu_e, lv_e, mu_m, lv_m), margin, hinge
        )
        return {"total": composite_loss(cca, rank, lam), "cca": cca, "kl_rank": rank}

    tr, va = inputs["train"], inputs["val"]

    def val_losses() -> dict[str, torch.Tensor]:
        # model selection by val retrieval: the mean rank of the own song over both directions, as a fraction
        # of the val songs (0 best, ~0.5 chance). The val total cannot select: eq. 3's CCA on 25 val songs in
        # cca_dim = 32 dimensions is degenerate (~-3e-4 every epoch), and the printed eq. 6 hinge is 0 on val
        out = cmer_losses(va["mean"], va["seq"])
        proj = cca_projections(music(tr["mean"])[0], emotion(tr["seq"])[0], eps)
        ranks = query_ranks(*_cmer_distances(music, emotion, proj, va["mean"], va["seq"], lam))
        out["rank"] = torch.tensor(float(np.mean([r.mean() for r in ranks.values()])) / n["val"])
        return out

    best_epoch = _fit(
        LABEL,
        [music, emotion],
        n["train"],
        cfg,
        int(cfg["epochs"]),
        float(cfg["lr"]),
        lambda idx: cmer_losses(tr["mean"][idx], tr["seq"][idx]),
        val_losses,
        "total",
        torch.Generator().manual_seed(seed),
        ctx,
        history,
        val_select="rank",
    )
    with torch.no_grad():
        proj = cca_projections(
            music(tr["mean"])[0], emotion(tr["seq"])[0], eps
        )  # eq. 3's W on the train split
        dist = _cmer_distances(music, emotion, proj, inputs[split]["mean"], inputs[split]["seq"], lam)
    scored = {LABEL: Scored(*dist)}

    # baselines (§4.5): M2E regresses the song's mean VA, E2M its mean audio feature; MAE; ranked by AE
    va_t = {s: torch.from_numpy(songs[s].va).to(device) for s in SPLITS}
    specs = {  # key: (model, input of split s, target of split s)
        "regmlp_m2e": (
            Regressor(d_feat, cfg["regmlp_m2e_layers"], 2),
            lambda s, i=slice(None): (inputs[s]["mean"][i],),
            va_t,
        ),
        "regmlp_e2m": (
            Regressor(2, cfg["regmlp_e2m_layers"], d_feat),
            lambda s, i=slice(None): (inputs[s]["seq"][i].mean(1),),
            {s: inputs[s]["mean"] for s in SPLITS},
        ),
        "regbigru_m2e": (
            Regressor(d_feat, cfg["regbigru_m2e_layers"], 2, int(cfg["regbigru_m2e_hidden"])),
            lambda s, i=slice(None): (inputs[s]["clips"][i], inputs[s]["lengths"][i]),
            va_t,
        ),
        "regbigru_e2m": (
            Regressor(2, cfg["regbigru_e2m_layers"], d_feat, int(cfg["regbigru_e2m_hidden"])),
            lambda s, i=slice(None): (inputs[s]["seq"][i],),
            {s: inputs[s]["mean"] for s in SPLITS},
        ),
    }
    baseline_epochs, states, preds = {}, {}, {}
    for k, (key, (model, x_of, y_of)) in enumerate(specs.items(), start=1):
        torch.manual_seed(seed + k)
        model = model.to(device)
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)

        def mae(
            s: str, idx=slice(None), model=model, x_of=x_of, y_of=y_of, key=key
        ) -> dict[str, torch.Tensor]:
            return {key: torch.mean(torch.abs(model(*x_of(s, idx)) - y_of[s][idx]))}

        baseline_epochs[key] = _fit(
            key,
            [model],
            n["train"],
            cfg,
            int(cfg["baseline_epochs"]),
            float(cfg["baseline_lr"]),
            lambda idx, f=mae: f("train", idx),
            lambda f=mae: f("val"),
            key,
            torch.Generator().manual_seed(seed + k),
            ctx,
            history,
        )
        with torch.no_grad():
            preds[key] = model(*x_of(split)).double().cpu()
        states[key] = model.state_dict()
    true_va, true_feat = va_t[split].double().cpu(), inputs[split]["mean"].double().cpu()
    for label in BASELINES:
        m2e, e2m = preds[f"{label.lower()}_m2e"], preds[f"{label.lower()}_e2m"]
        scored[label] = Scored(
            abs_error_distances(m2e, true_va),
            abs_error_distances(e2m, true_feat),
            m2e.numpy(),
            true_va.numpy(),
        )
    # one formula for the reported rows and the bootstrap resamples: the rows are the identity resample
    rescore = make_rescore(scored, songs[split].song_of_clip)
    rows = {**score_rows(scored, np.arange(n[split])), CHANCE_ROW: chance_columns(n[split])}

    state = {
        "music_encoder": music.state_dict(),
        "emotion_encoder": emotion.state_dict(),
        "cca_projections": {
            k: v.cpu()
            for k, v in zip(("w_music", "w_emotion", "mean_music", "mean_emotion"), proj, strict=True)
        },
        **states,
        "seq_len": t,
        "settings": cfg,  # the checked settings, DEFAULTS included
    }
    notes = {
        "best_epoch": best_epoch,
        **{f"best_epoch_{k}": v for k, v in baseline_epochs.items()},
        "N": n[split],
        "units": "songs",
        "seq_len": t,
        "hinge": hinge,
        **song_va_errors(scored),
    }
    return MethodResult(
        rows=rows, history=[history[e] for e in sorted(history)], state=state, notes=notes, rescore=rescore
    )
