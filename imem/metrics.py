"""Evaluation metrics: regression errors and ranking quality, per query, in NumPy.

Regression: MSE and MAE (NumPy weighted means: scikit-learn's input validation costs ~1 ms a call, and the
bootstrap calls them 20,000 times per evaluate stage -- 56 s of cnn's 200 s, measured). Retrieval: for each query (a clip, or an image) every candidate
of the other modality is ranked by a model score (higher = better match) and scored against the
ground-truth similarity S of the pair:

- nDCG@k with S as the graded gain (scikit-learn's ``ndcg_score`` definition, vectorised: :func:`ndcg_at_k`);
- Spearman's rho between the model score and S over all candidates of the query (SciPy);
- R@k: the share of queries that have at least one *relevant* candidate (S > threshold) in their top k
  (the "Recall@K" of cross-modal retrieval benchmarks);
- MRR: the mean over queries of 1 / (rank of the first relevant candidate).

R@k and MRR average over the queries that have at least one relevant candidate; nDCG and rho over the
queries whose S is not constant. ``random_ranking`` gives the exact expectation of each metric under a
uniformly random ranking, the reference a learned ranking has to beat. scikit-learn and SciPy have no
R@k / MRR for graded-relevance matrices nor these exact expectations, so those are written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

RETRIEVAL_KS = (1, 5, 10)


def regression(pred: np.ndarray, true: np.ndarray, sample_weight: np.ndarray | None = None) -> dict[str, float]:
    """MSE and MAE of a 1-D prediction; ``sample_weight``: how often each item counts (a bootstrap resample)."""
    pred, true = np.asarray(pred, np.float64).ravel(), np.asarray(true, np.float64).ravel()
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"regression: prediction {pred.shape} and target {true.shape} must be equal and non-empty")
    err = pred - true
    w = None if sample_weight is None else np.asarray(sample_weight, np.float64).ravel()
    # the definitions of sklearn.metrics.mean_squared_error / mean_absolute_error with sample_weight
    return {"mse": float(np.average(err * err, weights=w)), "mae": float(np.average(np.abs(err), weights=w))}


def _check(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, np.float64)
    if scores.ndim != 2 or scores.shape != truth.shape or scores.shape[1] < 2:
        raise ValueError(f"retrieval: scores {scores.shape} and truth {truth.shape} must be equal (queries, >= 2 candidates)")
    return scores, truth


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row of ``a`` with the same row of ``b`` (average ranks for ties, as
    ``scipy.stats.spearmanr``), vectorised over rows: the bootstrap recomputes it a thousand times.
    NaN where a row is constant."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def ndcg_at_k(truth: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k of every row (query), exactly scikit-learn's ``ndcg_score(truth, scores, k=k)`` per sample
    (linear gains, 1/log2(rank+1) discounts, tied scores share the mean gain of their group over the
    positions the group occupies), vectorised over rows: sklearn loops over queries in Python, ~20 ms per
    call on the test split, and the bootstrap calls it thousands of times. 0 where the ideal DCG is 0."""
    truth, scores = np.asarray(truth, np.float64), np.asarray(scores, np.float64)
    n_q, n = scores.shape
    disc = np.zeros(n)
    kk = min(int(k), n)
    disc[:kk] = 1.0 / np.log2(np.arange(kk) + 2.0)
    order = np.argsort(-scores, axis=1, kind="stable")
    s_sorted = np.take_along_axis(scores, order, axis=1)
    g_sorted = np.take_along_axis(truth, order, axis=1)
    starts = np.ones((n_q, n), dtype=bool)
    starts[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
    group = (np.cumsum(starts, axis=1) - 1) + (np.arange(n_q) * n)[:, None]  # a tie group id, unique over rows
    flat = group.ravel()
    gain = np.bincount(flat, weights=g_sorted.ravel(), minlength=n_q * n)
    count = np.bincount(flat, minlength=n_q * n)
    discount = np.bincount(flat, weights=np.broadcast_to(disc, (n_q, n)).ravel(), minlength=n_q * n)
    dcg = (gain / np.maximum(count, 1) * discount).reshape(n_q, n).sum(axis=1)
    idcg = (-np.sort(-truth, axis=1) * disc).sum(axis=1)
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)


def ranks_of_first_relevant(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of the best-scored relevant candidate per query (ties broken by candidate order);
    0 where a query has no relevant candidate."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    first = rel_sorted.argmax(axis=1) + 1
    return np.where(rel_sorted.any(axis=1), first, 0)


def retrieval(scores: np.ndarray, truth: np.ndarray, threshold: float, k_ndcg: int = 10,
              ks: tuple[int, ...] = RETRIEVAL_KS, spearman: bool = True) -> dict[str, float]:
    """Ranking metrics of ``scores`` (queries x candidates; higher ranks first) against the true S
    (``spearman=False`` leaves out rho, the costliest of them, for callers that do not report it)."""
    return PerQuery.of(scores, truth, threshold, k_ndcg, ks, spearman).summary()


def weighted_means(per_query: dict[str, np.ndarray], weights: np.ndarray | None = None) -> dict[str, float]:
    """Per metric, the mean of its per-query values over the queries it covers (finite values), each counted
    ``weights`` times (default once: a bootstrap resample's draw counts); NaN where no such query is left."""
    out: dict[str, float] = {}
    for name, v in per_query.items():
        w = np.ones(len(v)) if weights is None else np.asarray(weights, np.float64)
        ok = np.isfinite(v) & (w > 0)
        out[name] = float(np.dot(w[ok], v[ok]) / w[ok].sum()) if ok.any() else math.nan
    return out


@dataclass(frozen=True)
class PerQuery:
    """Every ranking metric of :func:`retrieval` per query, so that a bootstrap resample of the *queries*
    (each ranking the whole candidate pool) is a weighted mean (:meth:`summary` with ``weights`` = how
    often each query is drawn) instead of a re-ranking: exactly the same numbers, about a thousand times
    cheaper. NaN marks a query a metric leaves out (constant S for nDCG and rho, no relevant candidate for
    R@k and MRR)."""

    values: dict[str, np.ndarray]  # metric -> (queries,)

    @classmethod
    def of(cls, scores: np.ndarray, truth: np.ndarray, threshold: float, k_ndcg: int = 10,
           ks: tuple[int, ...] = RETRIEVAL_KS, spearman: bool = True) -> PerQuery:
        scores, truth = _check(scores, truth)
        varied = truth.max(axis=1) > truth.min(axis=1)
        relevant = truth > threshold
        has_rel = relevant.any(axis=1)
        nan = np.full(len(truth), np.nan)
        values: dict[str, np.ndarray] = {}
        nd = nan.copy()
        if varied.any():
            nd[varied] = ndcg_at_k(truth[varied], scores[varied], k_ndcg)
        values[f"ndcg{k_ndcg}"] = nd
        if spearman:
            rho = nan.copy()
            if varied.any():
                rho[varied] = rowwise_spearman(scores[varied], truth[varied])
            values["spearman"] = rho
        first = ranks_of_first_relevant(scores, relevant).astype(np.float64)
        first[~has_rel] = np.nan
        for k in ks:
            values[f"r{k}"] = np.where(has_rel, first <= k, np.nan)
        values["mrr"] = 1.0 / first
        return cls(values)

    def summary(self, weights: np.ndarray | None = None) -> dict[str, float]:
        """The metrics of the queries counted ``weights`` times each (default: once), as :func:`retrieval`."""
        n = len(next(iter(self.values.values())))
        w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        out = weighted_means(self.values, w)
        out["queries"] = int(round(w.sum()))
        out["queries_with_relevant"] = int(round(w[np.isfinite(self.values["mrr"])].sum()))
        return out


def expected_hit_at_k(n: int, r: int, k: int) -> float:
    """P(at least one of ``r`` relevant among the first ``k`` of ``n`` candidates, uniformly random ranking)
    = 1 - C(n-r, k) / C(n, k); with fewer candidates than k all of them are in the top k."""
    k = min(k, n)
    return 1.0 - math.comb(n - r, k) / math.comb(n, k)


def expected_reciprocal_rank(n: int, r: int) -> float:
    """E[1 / rank of the first of ``r`` relevant among ``n`` candidates], uniformly random ranking:
    P(first relevant at rank j) = C(n-j, r-1) / C(n, r), summed in log space (no overflow at large n);
    r = 1 gives H_n / n."""
    from scipy.special import gammaln

    def log_comb(a, b):
        return gammaln(np.asarray(a, np.float64) + 1.0) - gammaln(b + 1.0) - gammaln(np.asarray(a, np.float64) - b + 1.0)

    j = np.arange(1, n - r + 2)
    return float(np.sum(np.exp(log_comb(n - j, r - 1) - log_comb(n, r)) / j))


def random_ranking(truth: np.ndarray, threshold: float, k_ndcg: int = 10,
                   ks: tuple[int, ...] = RETRIEVAL_KS) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking (same query filters as :func:`retrieval`)."""
    truth = np.asarray(truth, np.float64)
    n = truth.shape[1]
    varied = truth.max(axis=1) > truth.min(axis=1)
    relevant = truth > threshold
    r = relevant.sum(axis=1)[relevant.any(axis=1)]
    out: dict[str, float] = {}
    # E[DCG@k] = mean gain x sum of the first k discounts; IDCG@k from the sorted gains.
    disc = 1.0 / np.log2(np.arange(2, min(k_ndcg, n) + 2))
    t = truth[varied]
    idcg = (-np.sort(-t, axis=1)[:, :len(disc)] * disc).sum(axis=1)
    out[f"ndcg{k_ndcg}"] = float(np.mean(t.mean(axis=1) * disc.sum() / idcg)) if len(t) else math.nan
    out["spearman"] = 0.0
    for k in ks:
        out[f"r{k}"] = float(np.mean([expected_hit_at_k(n, int(ri), k) for ri in r])) if len(r) else math.nan
    out["mrr"] = float(np.mean([expected_reciprocal_rank(n, int(ri)) for ri in r])) if len(r) else math.nan
    out["queries"] = int(len(truth))
    out["queries_with_relevant"] = int(len(r))
    return out
