"""imem.metrics against values computed by hand on small arrays."""

import itertools
import math
import warnings

import numpy as np
import pytest

from imem.metrics import random_ranking, ranks_of_first_relevant, regression, retrieval


def test_regression_mse_and_mae_by_hand():
    r = regression(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.5, 0.5]))
    assert r["mse"] == pytest.approx((0.01 + 0 + 0.16) / 3)
    assert r["mae"] == pytest.approx((0.1 + 0 + 0.4) / 3)


def test_weighted_regression_equals_scikit_learns_definition():
    # the bootstrap's resample counts as sample weights (0 = not drawn, 2 = drawn twice)
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    rng = np.random.default_rng(0)
    p, t, w = rng.random(50), rng.random(50), rng.integers(0, 3, 50)
    r = regression(p, t, w)
    assert r["mse"] == pytest.approx(mean_squared_error(t, p, sample_weight=w), rel=1e-12)
    assert r["mae"] == pytest.approx(mean_absolute_error(t, p, sample_weight=w), rel=1e-12)
    assert r["mse"] != pytest.approx(regression(p, t)["mse"], rel=1e-3)  # the weights matter


def test_regression_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="must be equal"):
        regression(np.zeros(3), np.zeros(4))


# One query, four candidates. Scores rank them c2 > c0 > c3 > c1; true S = [0.9, 0.1, 0.5, 0.8].
SCORES = np.array([[0.7, 0.1, 0.9, 0.3]])
TRUTH = np.array([[0.9, 0.1, 0.5, 0.8]])


def test_ndcg_by_hand():
    # ranked gains 0.5, 0.9, 0.8, 0.1; ideal 0.9, 0.8, 0.5, 0.1; discounts 1/log2(i+1)
    disc = 1 / np.log2(np.arange(2, 6))
    dcg2 = 0.5 * disc[0] + 0.9 * disc[1]
    idcg2 = 0.9 * disc[0] + 0.8 * disc[1]
    dcg4 = dcg2 + 0.8 * disc[2] + 0.1 * disc[3]
    idcg4 = idcg2 + 0.5 * disc[2] + 0.1 * disc[3]
    assert retrieval(SCORES, TRUTH, 0.7, k_ndcg=2)["ndcg2"] == pytest.approx(dcg2 / idcg2)
    assert retrieval(SCORES, TRUTH, 0.7, k_ndcg=4)["ndcg4"] == pytest.approx(dcg4 / idcg4)


def test_spearman_by_hand():
    # score ranks (1 = lowest) [3, 1, 4, 2], truth ranks [4, 1, 2, 3]: d = [-1, 0, 2, -1], sum d^2 = 6
    rho = 1 - 6 * 6 / (4 * (16 - 1))
    assert retrieval(SCORES, TRUTH, 0.7)["spearman"] == pytest.approx(rho)


def test_recall_at_k_and_mrr_by_hand():
    # relevant (S > 0.7): c0 and c3, at ranks 2 and 3 -> first relevant at rank 2
    m = retrieval(SCORES, TRUTH, 0.7, ks=(1, 2, 3))
    assert (m["r1"], m["r2"], m["r3"]) == (0.0, 1.0, 1.0)
    assert m["mrr"] == pytest.approx(0.5)
    # a second query whose best candidate is relevant; a third with nothing relevant is left out
    scores = np.vstack([SCORES, [[0.9, 0.1, 0.2, 0.3]], [[0.1, 0.2, 0.3, 0.4]]])
    truth = np.vstack([TRUTH, [[0.95, 0.1, 0.2, 0.3]], [[0.1, 0.2, 0.3, 0.4]]])
    m = retrieval(scores, truth, 0.7, ks=(1,))
    assert m["r1"] == pytest.approx(0.5) and m["mrr"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["queries"] == 3 and m["queries_with_relevant"] == 2


def test_a_candidate_exactly_at_the_threshold_is_not_relevant():
    """Relevant means S > threshold (strictly): the top candidate's S equals the threshold, so the first relevant
    one is at rank 2 for the ranking metrics and for the random-ranking expectations (1 of 3 relevant)."""
    scores, truth = np.array([[0.9, 0.5, 0.1]]), np.array([[0.7, 0.8, 0.2]])
    r = retrieval(scores, truth, threshold=0.7, ks=(1, 2))
    assert (r["r1"], r["r2"], r["mrr"], r["queries_with_relevant"]) == (0.0, 1.0, 0.5, 1)
    rnd = random_ranking(truth, 0.7, ks=(1,))
    assert rnd["r1"] == pytest.approx(1 / 3) and rnd["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # nothing above the threshold: the query has no relevant candidate at all
    assert retrieval(scores, np.array([[0.7, 0.7, 0.2]]), threshold=0.7)["queries_with_relevant"] == 0


def test_first_relevant_rank_breaks_ties_by_candidate_order():
    ranks = ranks_of_first_relevant(np.array([[0.5, 0.5, 0.5], [0.1, 0.2, 0.3]]),
                                    np.array([[False, True, False], [False, False, False]]))
    assert ranks.tolist() == [2, 0]


def test_a_perfect_ranking_scores_one():
    truth = np.random.default_rng(0).random((5, 12))
    m = retrieval(truth * 3 + 1, truth, 0.6)
    assert m["ndcg10"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["r1"] == 1.0 and m["mrr"] == 1.0


def _brute_force_random(truth, threshold, k_ndcg, ks):
    """Average of each metric over every permutation of the candidates."""
    acc = {}
    perms = list(itertools.permutations(range(truth.shape[1])))
    for p in perms:
        scores = np.zeros_like(truth)
        scores[:, list(p)] = np.arange(truth.shape[1], 0, -1)  # candidate p[0] ranked first
        for k, v in retrieval(scores, truth, threshold, k_ndcg=k_ndcg, ks=ks).items():
            acc[k] = acc.get(k, 0.0) + v / len(perms)
    return acc


def test_random_ranking_expectations_equal_the_average_over_all_permutations():
    truth = np.array([[0.9, 0.1, 0.5, 0.8, 0.3], [0.2, 0.75, 0.1, 0.72, 0.71]])
    exact = random_ranking(truth, 0.7, k_ndcg=3, ks=(1, 2))
    brute = _brute_force_random(truth, 0.7, 3, (1, 2))
    for key in ("ndcg3", "spearman", "r1", "r2", "mrr"):
        assert exact[key] == pytest.approx(brute[key], abs=1e-12), key
    # by hand for query 1 (2 relevant of 5): P(hit@1) = 2/5; E[1/rank] = 2/5 + 1/2 * 3/10 + 1/3 * 1/5 + 1/4 * 1/10
    q1 = random_ranking(truth[:1], 0.7, ks=(1,))
    assert q1["r1"] == pytest.approx(0.4)
    assert q1["mrr"] == pytest.approx(0.4 + 0.15 + 1 / 15 + 0.025)


def test_constant_truth_rows_are_left_out_of_ndcg_and_spearman():
    truth = np.array([[0.5, 0.5, 0.5], [0.9, 0.1, 0.2]])
    m = retrieval(np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]), truth, 0.7)
    assert m["spearman"] == pytest.approx(0.5)  # only row 2: ranks [3,2,1] vs [3,1,2]


def test_per_query_weights_equal_re_ranking_the_repeated_queries():
    """A bootstrap resample of the queries (each ranking all candidates) re-weights the per-query metrics:
    the same numbers as re-ranking the repeated queries, including the queries a metric leaves out
    (constant S: no nDCG/rho; no relevant candidate: no R@k/MRR) and an undrawn query."""
    from imem.metrics import PerQuery

    rng = np.random.default_rng(4)
    truth = rng.uniform(0, 1, (9, 12))
    truth[2] = 0.5  # constant S: left out of nDCG and rho
    truth[5] = np.minimum(truth[5], 0.6)  # no relevant candidate: left out of R@k and MRR
    scores = truth + rng.normal(0, 0.3, truth.shape)
    scores[7, :4] = scores[7, 0]  # ties
    pq = PerQuery.of(scores, truth, 0.7)
    assert pq.summary() == retrieval(scores, truth, 0.7)
    idx = np.array([0, 0, 0, 2, 3, 5, 5, 7, 8, 8])  # query 1, 4 and 6 not drawn
    got = pq.summary(np.bincount(idx, minlength=9))
    want = retrieval(scores[idx], truth[idx], 0.7)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert got["queries"] == 10 and got["queries_with_relevant"] < 8  # e.g. query 5 (drawn twice) has no relevant candidate
    assert pq.values["mrr"][5] != pq.values["mrr"][5] and pq.values["ndcg10"][2] != pq.values["ndcg10"][2]  # NaN


# Mutation testing (issue 21, docs/testing.md): each metric against an independent value on inputs that reach
# every branch -- ties across many rows, k beyond the candidate count, queries a metric leaves out.

def test_ndcg_at_k_per_query_equals_scikit_learn_with_ties_and_any_k():
    """Every row against sklearn's ndcg_score on that row alone: scores drawn from four values (long tie groups
    that straddle the cut-off k), k below, at and above the candidate count, and an all-zero truth row (0)."""
    from sklearn.metrics import ndcg_score

    from imem.metrics import ndcg_at_k

    rng = np.random.default_rng(11)
    truth = rng.random((25, 9)) * (rng.random((25, 9)) > 0.3)  # some zero gains
    truth[4] = 0.0
    scores = rng.integers(0, 4, (25, 9)).astype(float)
    scores[6] = 2.0  # one tie group over the whole row
    for k in (1, 3, 9, 14):
        got = ndcg_at_k(truth, scores, k)
        assert got.shape == (25,)
        for i in range(25):
            assert got[i] == pytest.approx(ndcg_score(truth[i:i + 1], scores[i:i + 1], k=k), abs=1e-12), (k, i)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the all-zero row is 0 without a 0 / 0
        assert ndcg_at_k(truth, scores, 3)[4] == 0.0


def test_first_relevant_rank_ties_by_candidate_order_in_long_rows():
    """With 300 candidates in few tie groups (numpy's default sort is not stable there): the rank of the first
    relevant candidate when ties go by candidate order, found by walking the candidates in (-score, index) order."""
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, (6, 300)).astype(float)
    relevant = rng.random((6, 300)) < 0.02
    relevant[5] = False
    got = ranks_of_first_relevant(scores, relevant)
    for q in range(6):
        walk = sorted(range(300), key=lambda c: (-scores[q, c], c))
        want = next((pos + 1 for pos, c in enumerate(walk) if relevant[q, c]), 0)
        assert got[q] == want, q
    assert got[5] == 0


def test_random_ranking_equals_all_permutations_with_left_out_queries_and_k_beyond_the_candidates():
    """k_ndcg and a recall k above the 5 candidates (every candidate is in the top k), a constant-S query (no
    nDCG) and a query with nothing relevant (no R@k / MRR) among the queries: the exact expectations against
    the average over all 120 rankings, and the query counts by hand."""
    truth = np.array([[0.9, 0.1, 0.5, 0.8, 0.3], [0.4, 0.4, 0.4, 0.4, 0.4], [0.2, 0.75, 0.1, 0.72, 0.71],
                      [0.1, 0.6, 0.2, 0.65, 0.3]])
    exact = random_ranking(truth, 0.7, k_ndcg=10, ks=(1, 3, 7))
    brute = _brute_force_random(truth, 0.7, 10, (1, 3, 7))
    for key in ("ndcg10", "spearman", "r1", "r3", "r7", "mrr"):
        assert exact[key] == pytest.approx(brute[key], abs=1e-12), key
    assert exact["r7"] == 1.0 and exact["spearman"] == 0.0
    assert (exact["queries"], exact["queries_with_relevant"]) == (4, 2)
    # nothing relevant anywhere and nothing varied: NaN, not 0, and quietly (no mean-of-empty warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = random_ranking(np.full((2, 4), 0.5), 0.7)
    assert np.isnan(flat["ndcg10"]) and np.isnan(flat["r1"]) and np.isnan(flat["mrr"])
    assert (flat["queries"], flat["queries_with_relevant"]) == (2, 0)


def test_expected_hit_and_reciprocal_rank_equal_exact_fractions():
    """P(hit@k) and E[1/rank] of the first of r relevant among n, from exact rational sums over the rank of the
    first relevant candidate (C(n - j, r - 1) / C(n, r)), for every r <= n <= 9; and H_n / n for one relevant
    candidate among 4000 (the log-space sum, no overflow)."""
    from fractions import Fraction
    from math import comb

    from imem.metrics import expected_hit_at_k, expected_reciprocal_rank

    for n in range(1, 10):
        for r in range(1, n + 1):
            p_first = {j: Fraction(comb(n - j, r - 1), comb(n, r)) for j in range(1, n - r + 2)}
            assert sum(p_first.values()) == 1
            err = float(sum(p / j for j, p in p_first.items()))
            assert expected_reciprocal_rank(n, r) == pytest.approx(err, rel=1e-12), (n, r)
            for k in (1, 2, 5, 12):
                hit = float(sum(p for j, p in p_first.items() if j <= k))
                assert expected_hit_at_k(n, r, k) == pytest.approx(hit, abs=1e-12), (n, r, k)
    harmonic = sum(1.0 / j for j in range(1, 4001))
    assert expected_reciprocal_rank(4000, 1) == pytest.approx(harmonic / 4000, rel=1e-10)


def test_retrieval_refuses_shapes_that_are_not_queries_by_candidates():
    for scores, truth in ((np.zeros(4), np.zeros(4)), (np.zeros((2, 3)), np.zeros((3, 2))),
                          (np.zeros((3, 1)), np.zeros((3, 1))), (np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))):
        with pytest.raises(ValueError, match="must be equal"):
            retrieval(scores, truth, 0.5)
    # two candidates are enough: the relevant one ranked second
    m = retrieval(np.array([[0.9, 0.1]]), np.array([[0.2, 0.8]]), 0.5, ks=(1, 2))
    assert (m["r1"], m["r2"], m["mrr"], m["spearman"]) == (0.0, 1.0, 0.5, -1.0)


def test_regression_flattens_any_shape_and_refuses_empty_input():
    r = regression(np.array([[0.1], [0.5], [0.9]]), np.array([0.2, 0.5, 0.5]), np.array([[1], [0], [3]]))
    assert r["mse"] == pytest.approx((0.01 + 3 * 0.16) / 4) and r["mae"] == pytest.approx((0.1 + 3 * 0.4) / 4)
    with pytest.raises(ValueError, match="non-empty"):
        regression(np.zeros(0), np.zeros(0))


def test_weighted_means_leave_out_undrawn_and_undefined_queries():
    from imem.metrics import weighted_means

    v = {"a": np.array([1.0, np.nan, 4.0, 10.0]), "b": np.array([np.nan, 2.0, np.nan, np.nan])}
    assert weighted_means(v) == {"a": pytest.approx(5.0), "b": 2.0}
    got = weighted_means(v, np.array([2, 5, 1, 0]))  # query 4 not drawn: its 10 does not count
    assert got["a"] == pytest.approx((2 * 1.0 + 4.0) / 3) and got["b"] == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined quietly: no 0 / 0 over zero-weight queries
        got = weighted_means(v, np.array([1, 0, 1, 1]))  # b's only defined query not drawn: undefined
        assert math.isnan(got["b"])
        assert math.isnan(weighted_means({"c": np.array([np.nan, np.nan])})["c"])


def test_retrieval_without_spearman_and_binary_relevance_as_gains():
    """spearman=False leaves rho out (the other metrics unchanged); a boolean truth matrix (binary gains) gives
    the same expectations as its 0/1 floats, against all rankings."""
    truth = np.array([[True, False, False, True, False], [False, False, True, False, False]])
    scores = np.array([[0.1, 0.5, 0.3, 0.2, 0.4], [0.3, 0.1, 0.2, 0.5, 0.4]])
    full, quick = retrieval(scores, truth, 0.5), retrieval(scores, truth, 0.5, spearman=False)
    assert "spearman" in full and "spearman" not in quick
    assert quick == {k: v for k, v in full.items() if k != "spearman"}
    exact = random_ranking(truth, 0.5, k_ndcg=3, ks=(1, 2))
    brute = _brute_force_random(truth.astype(float), 0.5, 3, (1, 2))
    for key in ("ndcg3", "r1", "r2", "mrr"):
        assert exact[key] == pytest.approx(brute[key], abs=1e-12), key


def test_ndcg_at_k_takes_boolean_gains():
    """Binary relevance as a boolean matrix: the gains 0 and 1 (scikit-learn on the same matrix as floats)."""
    from sklearn.metrics import ndcg_score

    from imem.metrics import ndcg_at_k

    rng = np.random.default_rng(3)
    truth, scores = rng.random((6, 8)) > 0.6, rng.random((6, 8))
    truth[:, 0] = True
    got = ndcg_at_k(truth, scores, 3)
    for i in range(6):
        assert got[i] == pytest.approx(ndcg_score(truth[i:i + 1].astype(float), scores[i:i + 1], k=3), abs=1e-12)
