"""Evaluation metrics: regression errors and ranking quality, per query, in NumPy.

Regression: MSE and MAE (scikit-learn). Retrieval: for each query (a clip, or an image) every candidate
of the other modality is ranked by a model score (higher = better match) and scored against the
ground-truth similarity S of the pair:

- nDCG@k with S as the graded gain (scikit-learn's ``ndcg_score``: linear gains, 1/log2(rank+1) discounts);
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

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error, ndcg_score

RETRIEVAL_KS = (1, 5, 10)


def regression(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MSE and MAE of a 1-D prediction."""
    pred, true = np.asarray(pred, np.float64).ravel(), np.asarray(true, np.float64).ravel()
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"regression: prediction {pred.shape} and target {true.shape} must be equal and non-empty")
    return {"mse": float(mean_squared_error(true, pred)), "mae": float(mean_absolute_error(true, pred))}


def _check(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, np.float64)
    if scores.ndim != 2 or scores.shape != truth.shape or scores.shape[1] < 2:
        raise ValueError(f"retrieval: scores {scores.shape} and truth {truth.shape} must be equal (queries, >= 2 candidates)")
    return scores, truth


def ranks_of_first_relevant(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of the best-scored relevant candidate per query (ties broken by candidate order);
    0 where a query has no relevant candidate."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    first = rel_sorted.argmax(axis=1) + 1
    return np.where(rel_sorted.any(axis=1), first, 0)


def retrieval(scores: np.ndarray, truth: np.ndarray, threshold: float, k_ndcg: int = 10,
              ks: tuple[int, ...] = RETRIEVAL_KS) -> dict[str, float]:
    """Ranking metrics of ``scores`` (queries x candidates; higher ranks first) against the true S."""
    scores, truth = _check(scores, truth)
    varied = truth.max(axis=1) > truth.min(axis=1)
    relevant = truth > threshold
    has_rel = relevant.any(axis=1)
    out: dict[str, float] = {}
    out[f"ndcg{k_ndcg}"] = float(ndcg_score(truth[varied], scores[varied], k=k_ndcg)) if varied.sum() else math.nan
    rhos = [spearmanr(s, t).statistic for s, t in zip(scores[varied], truth[varied], strict=True)]
    out["spearman"] = float(np.nanmean(rhos)) if rhos else math.nan
    first = ranks_of_first_relevant(scores, relevant)[has_rel]
    for k in ks:
        out[f"r{k}"] = float(np.mean(first <= k)) if has_rel.any() else math.nan
    out["mrr"] = float(np.mean(1.0 / first)) if has_rel.any() else math.nan
    out["queries"] = int(len(truth))
    out["queries_with_relevant"] = int(has_rel.sum())
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
