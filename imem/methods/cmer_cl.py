"""CMER-CL: cross-modal music emotion recognition with composite loss-based embeddings (issue 7).

Takashima, Li, Grzegorzek, Shirahama, "Cross-modal Music Emotion Recognition Using Composite Loss-based
Embeddings", arXiv:2112.07192 (Dec 2021; later IEEE Access 2023 as "Embedding-based Music Emotion
Recognition Using Composite Loss"). A music encoder and an emotion encoder map a clip's audio and its
valence-arousal *sequence* to diagonal Gaussians in one space, trained with

    L = lambda * CCA(mu_music, mu_emotion) + (1 - lambda) * KL-ranking(music, emotion),

and retrieval runs both ways: music -> emotion (each clip ranks every clip's VA sequence; its own is the
relevant one) and emotion -> music, scored by MRR, mean rank and median rank. Two regression baselines of the
paper sit in the same module: RegMLP (frozen music features -> MLP -> VA sequence) and RegBiGRU (the
handcrafted 193 x 87 matrix as 87 frames -> BiGRU -> VA sequence), retrieving by Euclidean distance between
the predicted and the true sequences. docs/methods/cmer_cl.md lists what the public text of the paper
confirms and what is this project's choice.

The emotion sequence of a clip is its dynamic VA samples inside its window (DEAM / PMEmo: 2 Hz, four samples
per 2-s clip), read from the raw corpus under ``corpus_root`` and mapped to [0, 1] with the same per-source
affine map the prepare stage applied to the clip means (recovered exactly from clips.csv's raw and
normalised columns), so the mean of a clip's sequence is its clips.csv valence / arousal.
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
    # CMER-CL
    "epochs": 40,
    "batch_size": 128,
    "lr": 1.0e-3,
    "weight_decay": 0.0,
    "embed_dim": 32,  # d of the diagonal Gaussians
    "music_hidden": 256,  # music encoder MLP hidden units
    "gru_hidden": 32,  # emotion encoder BiGRU hidden units per direction
    "dropout": 0.2,
    "lambda_cca": 0.5,  # lambda in lambda * CCA + (1 - lambda) * KL-ranking
    "margin": 1.0,  # alpha of the KL-ranking hinge
    "cca_eps": 1.0e-3,  # ridge added to the CCA covariance matrices
    "divergence": "kl",  # kl: KL(music || emotion) | symmetric: KL(m || e) + KL(e || m)
    # RegMLP / RegBiGRU baselines
    "baseline_epochs": 40,
    "baseline_lr": 1.0e-3,
    "baseline_hidden": 256,  # RegMLP hidden units
    "baseline_gru_hidden": 32,  # RegBiGRU hidden units per direction
    "baseline_frame_pool": 3,  # RegBiGRU: handcrafted frames averaged in groups of this many (87 -> 29)
    # torch CPU threads while training (0: leave torch's setting). These models are tiny: one thread measured
    # 3.5x faster than two per RegBiGRU epoch on the 2-core box (0.18 vs 0.67 s), far more under CPU contention
    "cpu_threads": 1,
}
BASELINES = ("RegMLP", "RegBiGRU")
LOGVAR_BOUND = 8.0  # log-variances are squashed into (-8, 8) (smoothly, by tanh) for numerical safety


# --- the paper's formulas ------------------------------------------------------------------------------


def kl_diag_gaussian(
    mu_p: torch.Tensor, logvar_p: torch.Tensor, mu_q: torch.Tensor, logvar_q: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_p, diag e^logvar_p) || N(mu_q, diag e^logvar_q)), summed over the last dim (broadcasts)."""
    # Takashima et al. 2021 (arXiv:2112.07192), KL between music/emotion Gaussians; eq. no. unconfirmed
    return 0.5 * (logvar_q - logvar_p + (logvar_p.exp() + (mu_p - mu_q) ** 2) / logvar_q.exp() - 1.0).sum(-1)


def pairwise_divergence(
    mu_m: torch.Tensor, lv_m: torch.Tensor, mu_e: torch.Tensor, lv_e: torch.Tensor, kind: str = "kl"
) -> torch.Tensor:
    """(n_music, n_emotion) divergences: ``kl`` = KL(music_i || emotion_j); ``symmetric`` adds
    KL(emotion_j || music_i)."""
    a = (mu_m[:, None], lv_m[:, None])
    b = (mu_e[None], lv_e[None])
    d = kl_diag_gaussian(*a, *b)
    if kind == "symmetric":
        d = d + kl_diag_gaussian(*b, *a)
    elif kind != "kl":
        raise ImemError(f"params: methods.cmer_cl.divergence = {kind!r} is not one of: kl, symmetric")
    return d


def cca_loss(h1: torch.Tensor, h2: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Minus the mean canonical correlation of two (n, d) views (Deep CCA's objective, divided by d).

    The sum of canonical correlations is the nuclear norm of Sigma11^-1/2 Sigma12 Sigma22^-1/2, computed
    with Cholesky whitening (same singular values, stable gradients); ``eps`` is a ridge on both covariances.
    """
    # Takashima et al. 2021, CCA term (form of Andrew et al. 2013's Deep CCA); eq. no. unconfirmed
    n, d = h1.shape
    if n < 2:
        raise ImemError(f"CCA loss needs at least 2 samples, got {n}")
    x = h1.double() - h1.double().mean(0)
    y = h2.double() - h2.double().mean(0)
    eye = torch.eye(d, dtype=torch.float64, device=h1.device)
    s11 = x.T @ x / (n - 1) + eps * eye
    s22 = y.T @ y / (n - 1) + eps * eye
    s12 = x.T @ y / (n - 1)
    l1, l2 = torch.linalg.cholesky(s11), torch.linalg.cholesky(s22)
    t = torch.linalg.solve_triangular(l1, s12, upper=False)  # L1^-1 S12
    t = torch.linalg.solve_triangular(l2, t.T, upper=False).T  # ... L2^-T
    return (-torch.linalg.svdvals(t).sum() / d).to(h1.dtype)


def kl_rank_loss(div: torch.Tensor, margin: float) -> torch.Tensor:
    """Bidirectional hinge on a (B, B) divergence matrix whose diagonal holds the matched pairs: the mean over
    mismatched (i, j) of [alpha + D_ii - D_ij]_+ (music anchors) plus the mean of [alpha + D_jj - D_ij]_+
    (emotion anchors)."""
    # Takashima et al. 2021, KL-divergence ranking loss, margin alpha (in-batch negatives); eq. unconfirmed
    b = div.shape[0]
    if b < 2 or div.shape != (b, b):
        raise ImemError(
            f"KL-ranking loss needs a square divergence matrix of >= 2 pairs, got {tuple(div.shape)}"
        )
    pos = div.diagonal()
    off = ~torch.eye(b, dtype=torch.bool, device=div.device)
    music_anchor = torch.relu(margin + pos[:, None] - div)[off].mean()
    emotion_anchor = torch.relu(margin + pos[None, :] - div)[off].mean()
    return music_anchor + emotion_anchor


def composite_loss(cca: torch.Tensor, kl_rank: torch.Tensor, lam: float) -> torch.Tensor:
    # Takashima et al. 2021, composite loss lambda * CCA + (1 - lambda) * KL-ranking (as the issue states it)
    return lam * cca + (1.0 - lam) * kl_rank


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


def sequence_distances(pred: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """(n_pred, n_true) Euclidean distances between flattened sequences, in float64 from the differences
    themselves: torch.cdist's default for > 25 rows uses ||a||^2 + ||b||^2 - 2ab, which is off by up to
    ~1e-13 here (~1e-7 in float32), enough to flip near-ties, and ties count against the query."""
    a, b = pred.detach().double().cpu().flatten(1), true.detach().double().cpu().flatten(1)
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").numpy()


def retrieval_columns(dist: np.ndarray, idx: np.ndarray | None = None) -> dict[str, float]:
    """``m2e_*`` from the rows of a square (music x emotion) distance matrix over the split's n clips,
    ``e2m_*`` from its columns.

    ``idx`` (clip indices, repeated where a bootstrap resample drew a clip twice) draws only the queries:
    each drawn query ranks the split's whole candidate pool, its own clip the one relevant candidate
    (m2e: ``dist[idx, :]``, e2m: ``dist.T[idx, :]``, relevance ``eye(n)[idx, :]``), so its rank is its plain
    full-split rank and a clip drawn k times counts k times. Without ``idx``: ``arange(n)``, the full split
    (the same code path, the same numbers)."""
    return columns_from_ranks(query_ranks(dist), idx)


def query_ranks(dist: np.ndarray) -> dict[str, np.ndarray]:
    """Every clip's rank as a query of the square (music x emotion) distance matrix, both directions
    (``m2e``: rows, ``e2m``: columns), over the split's whole candidate pool: computed once, a bootstrap
    resample then only indexes them (:func:`columns_from_ranks`)."""
    dist = np.asarray(dist, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ImemError(f"retrieval needs a square (music x emotion) distance matrix, got {dist.shape}")
    return {short: ranks_from_distances(d).astype(np.float64) for short, d in (("m2e", dist), ("e2m", dist.T))}


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
    """What one row is scored from, computed once after training: the (music clips x emotion sequences)
    distance matrix of the split and, for the regression baselines, the predicted and true clip mean VA
    ((n, 2) valence, arousal)."""

    dist: np.ndarray
    pred_va: np.ndarray | None = None
    true_va: np.ndarray | None = None

    @functools.cached_property
    def ranks(self) -> dict[str, np.ndarray]:
        """:func:`query_ranks` of ``dist``, once for the split and all its bootstrap resamples."""
        return query_ranks(self.dist)


def score_rows(scored: dict[str, Scored], ci: np.ndarray) -> dict[str, dict[str, float]]:
    """The rows on the clips ``ci`` of the split (``arange(n)``: the reported rows; a bootstrap resample:
    repeated indices). Retrieval: the drawn clips are the queries, each ranked over the split's whole
    candidate pool (``retrieval_columns``); regression: ``pred[ci]`` vs ``true[ci]``. Only numpy indexing,
    no forward pass."""
    ci = np.asarray(ci, dtype=np.intp)
    rows = {}
    for label, s in scored.items():
        rows[label] = columns_from_ranks(s.ranks, ci)
        if s.pred_va is not None:
            rows[label].update(regression_columns({"music": s.pred_va[ci]}, {"music": s.true_va[ci]}))
    return rows


def make_rescore(
    scored: dict[str, Scored],
) -> Callable[[np.ndarray, np.ndarray], dict[str, dict[str, float]]]:
    """``MethodResult.rescore``: clip indices ``ci``, image indices ``ii`` (ignored: CMER-CL is music-only)."""

    def rescore(ci: np.ndarray, ii: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        return score_rows(scored, ci)

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


def emotion_sequences(cfg: dict, data: MethodData) -> dict[str, np.ndarray]:
    source, dyn = load_dynamic(cfg)
    maps = affine_maps([data.clips[s] for s in SPLITS])
    return {s: va_sequences(data.clips[s], dyn, maps, source) for s in SPLITS}


# --- models --------------------------------------------------------------------------------------------


def _gaussian(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, lv = raw.chunk(2, dim=-1)
    return mu, LOGVAR_BOUND * torch.tanh(lv / LOGVAR_BOUND)


class MusicEncoder(nn.Module):
    """Frozen music features -> MLP -> (mean, log-variance) of a d-dim diagonal Gaussian."""

    def __init__(self, d_in: int, hidden: int, d: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2 * d)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _gaussian(self.net(x))


class EmotionEncoder(nn.Module):
    """(B, T, 2) VA sequence -> BiGRU -> last states of both directions -> (mean, log-variance)."""

    def __init__(self, hidden: int, d: int):
        super().__init__()
        self.gru = nn.GRU(2, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, 2 * d)

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, h = self.gru(seq - 0.5)  # h: (2, B, hidden)
        return _gaussian(self.out(torch.cat([h[0], h[1]], dim=-1)))


class RegMLP(nn.Module):
    """Frozen music features -> MLP -> (B, T, 2) VA sequence."""

    def __init__(self, d_in: int, hidden: int, t: int, dropout: float):
        super().__init__()
        self.t = t
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2 * t)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.t, 2)


class RegBiGRU(nn.Module):
    """(B, frames, features) -> frames averaged in groups of ``frame_pool`` -> BiGRU -> outputs averaged over
    T equal spans of frames -> (B, T, 2)."""

    def __init__(self, n_feat: int, hidden: int, t: int, frame_pool: int = 1):
        super().__init__()
        self.frame_pool = int(frame_pool)
        self.gru = nn.GRU(n_feat, hidden, batch_first=True, bidirectional=True)
        self.pool = nn.AdaptiveAvgPool1d(t)
        self.out = nn.Linear(2 * hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frame_pool > 1:
            x = nn.functional.avg_pool1d(x.transpose(1, 2), self.frame_pool, ceil_mode=True).transpose(1, 2)
        h, _ = self.gru(x)
        return self.out(self.pool(h.transpose(1, 2)).transpose(1, 2))


# --- training ------------------------------------------------------------------------------------------


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

    for key in (
        "epochs",
        "batch_size",
        "embed_dim",
        "music_hidden",
        "gru_hidden",
        "baseline_epochs",
        "baseline_hidden",
        "baseline_gru_hidden",
        "baseline_frame_pool",
        "cpu_threads",
    ):
        lo = {"batch_size": 2, "cpu_threads": 0}.get(key, 1)
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < lo:
            raise bad(key, f"must be an integer >= {lo}")

    def number(key: str) -> bool:  # a finite int or float; not a bool (True is an int in Python)
        v = out[key]
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("lr", "baseline_lr", "cca_eps"):
        if not number(key) or not out[key] > 0:
            raise bad(key, "must be a finite number > 0")
    for key, lo, hi in (("lambda_cca", 0.0, 1.0), ("dropout", 0.0, 0.99)):
        if not number(key) or not lo <= out[key] <= hi:
            raise bad(key, f"must be a number in [{lo}, {hi}]")
    for key in ("margin", "weight_decay"):
        if not number(key) or out[key] < 0:
            raise bad(key, "must be a finite number >= 0")
    if out["divergence"] not in ("kl", "symmetric"):
        raise bad("divergence", "is not one of: kl, symmetric")
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
) -> int:
    """Adam over ``modules``. ``losses(idx)`` / ``val_losses()`` return {name: loss}; the one named ``select``
    is minimised. Per epoch the batch-size-weighted train losses and the val losses go into ``history``
    (``train/<name>``, ``val/<name>``) and ``ctx.log``; the weights of the lowest ``val/<select>`` are loaded
    back at the end. Returns the best epoch."""
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
        bar.set_postfix({f"val/{select}": f"{val[select]:.4f}"})
        if val[select] < best:
            best, best_epoch = val[select], epoch
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
    split = ctx.split
    n = {s: len(data.clips[s]) for s in SPLITS}
    for s in ("train", "val", split):
        if n[s] < 2:
            raise ImemError(f"CMER-CL: split {s!r} has {n[s]} clip(s); the losses and retrieval need >= 2")
    seqs = {s: torch.from_numpy(v).to(device) for s, v in emotion_sequences(cfg, data).items()}
    feats = [
        data.frozen(
            "music", cfg["music_encoder"], seed, s, device=str(cfg["device"]), progress=ctx.progress
        ).float()
        for s in SPLITS
    ]
    feats = dict(zip(SPLITS, (x.to(device) for x in _standardise(*feats)), strict=True))
    with torch_threads(int(cfg["cpu_threads"]) if device.type == "cpu" else 0):
        return _train_evaluate(cfg, data, ctx, device, seqs, feats)


def _train_evaluate(
    cfg: dict, data: MethodData, ctx: RunContext, device: torch.device, seqs: dict, feats: dict
) -> MethodResult:
    seed, split, t = int(cfg["seed"]), ctx.split, seqs["train"].shape[1]
    n = {s: len(data.clips[s]) for s in SPLITS}
    lam, margin, kind, eps = (
        float(cfg["lambda_cca"]),
        float(cfg["margin"]),
        cfg["divergence"],
        float(cfg["cca_eps"]),
    )
    history: dict[int, dict] = {}

    # CMER-CL: music encoder + emotion encoder, composite loss
    torch.manual_seed(seed)
    music = MusicEncoder(
        feats["train"].shape[1], int(cfg["music_hidden"]), int(cfg["embed_dim"]), float(cfg["dropout"])
    ).to(device)
    emotion = EmotionEncoder(int(cfg["gru_hidden"]), int(cfg["embed_dim"])).to(device)

    def cmer_losses(x: torch.Tensor, seq: torch.Tensor) -> dict[str, torch.Tensor]:
        mu_m, lv_m = music(x)
        mu_e, lv_e = emotion(seq)
        cca = cca_loss(mu_m, mu_e, eps)
        rank = kl_rank_loss(pairwise_divergence(mu_m, lv_m, mu_e, lv_e, kind), margin)
        return {"total": composite_loss(cca, rank, lam), "cca": cca, "kl_rank": rank}

    best_epoch = _fit(
        LABEL,
        [music, emotion],
        n["train"],
        cfg,
        int(cfg["epochs"]),
        float(cfg["lr"]),
        lambda idx: cmer_losses(feats["train"][idx], seqs["train"][idx]),
        lambda: cmer_losses(feats["val"], seqs["val"]),
        "total",
        torch.Generator().manual_seed(seed),
        ctx,
        history,
    )
    with torch.no_grad():
        div = pairwise_divergence(*music(feats[split]), *emotion(seqs[split]), kind).double().cpu().numpy()
    scored = {LABEL: Scored(div)}

    # baselines: RegMLP on the frozen features, RegBiGRU on the handcrafted frames (trained with MSE)
    hand = [
        data.store.handcrafted(data.clips[s]["row"].to_numpy(), tile=False).transpose(1, 2) for s in SPLITS
    ]
    hand = dict(zip(SPLITS, (x.to(device) for x in _standardise(*hand, dims=(0, 1))), strict=True))
    baseline_epochs, states = {}, {}
    for k, label in enumerate(BASELINES, start=1):
        torch.manual_seed(seed + k)
        if label == "RegMLP":
            model, inputs = (
                RegMLP(feats["train"].shape[1], int(cfg["baseline_hidden"]), t, float(cfg["dropout"])),
                feats,
            )
        else:
            model, inputs = (
                RegBiGRU(
                    hand["train"].shape[2],
                    int(cfg["baseline_gru_hidden"]),
                    t,
                    int(cfg["baseline_frame_pool"]),
                ),
                hand,
            )
        model, key = model.to(device), label.lower()

        def reg_loss(x: torch.Tensor, seq: torch.Tensor, model=model, key=key) -> dict[str, torch.Tensor]:
            return {key: torch.mean((model(x) - seq) ** 2)}

        baseline_epochs[label] = _fit(
            label,
            [model],
            n["train"],
            cfg,
            int(cfg["baseline_epochs"]),
            float(cfg["baseline_lr"]),
            lambda idx, inputs=inputs, f=reg_loss: f(inputs["train"][idx], seqs["train"][idx]),
            lambda inputs=inputs, f=reg_loss: f(inputs["val"], seqs["val"]),
            key,
            torch.Generator().manual_seed(seed + k),
            ctx,
            history,
        )
        with torch.no_grad():
            pred = model(inputs[split]).double().cpu()
        scored[label] = Scored(
            sequence_distances(pred, seqs[split]), pred.mean(1).numpy(), data.va("music", split)
        )
        states[key] = model.state_dict()
    # one formula for the reported rows and the bootstrap resamples: the rows are the identity resample
    rescore = make_rescore(scored)
    rows = {**rescore(np.arange(n[split]), np.arange(0)), CHANCE_ROW: chance_columns(n[split])}

    state = {
        "music_encoder": music.state_dict(),
        "emotion_encoder": emotion.state_dict(),
        **states,
        "seq_len": t,
        "settings": cfg,  # the checked settings, DEFAULTS included
    }
    notes = {
        "best_epoch": best_epoch,
        **{f"best_epoch_{k.lower()}": v for k, v in baseline_epochs.items()},
        "N": n[split],
        "seq_len": t,
        "divergence": kind,
    }
    return MethodResult(
        rows=rows, history=[history[e] for e in sorted(history)], state=state, notes=notes, rescore=rescore
    )
