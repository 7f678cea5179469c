"""The bootstrap over test songs and images (imem.bootstrap), the vectorised Spearman it relies on, and the
comparison's significance rule (imem.comparison.winners / paired_table)."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from imem import bootstrap
from imem.comparison import MEAN_ROW, paired_table, winners
from imem.errors import ImemError
from imem.metrics import retrieval, rowwise_spearman


def test_plan_resamples_songs_with_all_their_clips_and_is_independent_of_table_order():
    songs = np.array(["s1", "s1", "s1", "s2", "s2", "s3"])  # 3 songs: 3 + 2 + 1 clips
    images = np.array(["a", "b", "c", "d"])
    plan = bootstrap.make_plan(songs, images, n=500, seed=7)
    assert plan.clip_counts.shape == (500, 6) and plan.image_counts.shape == (500, 4)
    # clips of one song are drawn together: equal counts within a song
    for b in range(plan.n):
        c = plan.clip_counts[b]
        assert c[0] == c[1] == c[2] and c[3] == c[4]
        # 3 songs drawn with replacement: the song counts sum to 3, the image counts to 4
        assert c[0] + c[3] + c[5] == 3 and plan.image_counts[b].sum() == 4
    assert len(plan.clips(0)) == int(plan.clip_counts[0].sum())
    # every song is absent from some resamples and doubled in others: a real resample, not a permutation
    assert (plan.clip_counts[:, 0] == 0).any() and (plan.clip_counts[:, 0] >= 2).any()
    # the same draws for the same ids in another table order (each stage reads its own tables)
    perm = np.array([5, 3, 0, 4, 1, 2])
    other = bootstrap.make_plan(songs[perm], images[::-1], n=500, seed=7)
    np.testing.assert_array_equal(other.clip_counts, plan.clip_counts[:, perm])
    np.testing.assert_array_equal(other.image_counts, plan.image_counts[:, ::-1])
    # another seed, other draws
    assert not np.array_equal(bootstrap.make_plan(songs, images, 500, 8).clip_counts, plan.clip_counts)
    with pytest.raises(ImemError, match="evaluate.bootstrap.n"):
        bootstrap.make_plan(songs, images, 0, 1)


def test_interval_of_the_mean_matches_the_normal_theory_width():
    """The percentile interval of a sample mean over 2000 resamples is close to mean +- 1.96 s / sqrt(n)."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=400)
    ids = [str(i) for i in range(len(x))]
    plan = bootstrap.make_plan(ids, [], n=2000, seed=1)
    reps = bootstrap.replicate(lambda ci, ii: {"m": {"mean": x[ci].mean()}}, plan, progress=False)
    lo, hi = bootstrap.interval(reps["m"]["mean"], 0.95)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    print(f"bootstrap [{lo:.4f}, {hi:.4f}] vs normal theory [{x.mean() - half:.4f}, {x.mean() + half:.4f}]")
    assert lo < x.mean() < hi
    assert (hi - lo) / (2 * half) == pytest.approx(1.0, abs=0.1)


def test_paired_interval_is_narrower_than_the_separate_ones_when_models_share_hard_items():
    rng = np.random.default_rng(3)
    hard = rng.gamma(2.0, 1.0, size=300)  # per-item difficulty shared by both models
    err_a, err_b = hard + rng.normal(0, 0.1, 300), hard + 0.05 + rng.normal(0, 0.1, 300)
    plan = bootstrap.make_plan([str(i) for i in range(300)], [], n=1000, seed=2)
    reps = bootstrap.replicate(lambda ci, ii: {"a": {"e": err_a[ci].mean()}, "b": {"e": err_b[ci].mean()}}, plan,
                               progress=False)
    a_lo, a_hi = bootstrap.interval(reps["a"]["e"])
    b_lo, b_hi = bootstrap.interval(reps["b"]["e"])
    d, lo, hi = bootstrap.paired(reps["a"]["e"], reps["b"]["e"])
    print(f"a [{a_lo:.3f}, {a_hi:.3f}], b [{b_lo:.3f}, {b_hi:.3f}], a - b {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    assert a_lo < b_hi and b_lo < a_hi  # the separate intervals overlap ...
    assert hi < 0  # ... yet a is significantly better on the same resamples
    with pytest.raises(ImemError, match="different plans"):
        bootstrap.paired(np.zeros(3), np.zeros(4))


def test_save_and_load_round_trip(tmp_path):
    plan = bootstrap.make_plan(["s1", "s2"], ["i"], n=5, seed=3)
    reps = {"CDCML (x)": {"sim_mse": np.arange(5.0)}, "MMVA": {"m2i_sim_r1": np.array([np.nan, 1, 2, 3, 4.0])}}
    bootstrap.save(tmp_path / "b.npz", reps, plan)
    back, n, seed = bootstrap.load(tmp_path / "b.npz")
    assert (n, seed) == (5, 3)
    np.testing.assert_array_equal(back["CDCML (x)"]["sim_mse"], np.arange(5.0))
    assert np.isnan(back["MMVA"]["m2i_sim_r1"][0])
    with pytest.raises(ImemError, match="contains '|'"):
        bootstrap.save(tmp_path / "c.npz", {"a|b": {"x": np.zeros(5)}}, plan)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ImemError, match="not a bootstrap file"):
        bootstrap.load(tmp_path / "bad.npz")


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_rowwise_spearman_equals_scipy_with_ties():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 4, size=(30, 12)).astype(float)  # many ties
    b = rng.normal(size=(30, 12))
    b[3] = 1.0  # a constant row: undefined
    ours = rowwise_spearman(a, b)
    for i in range(30):
        ref = spearmanr(a[i], b[i]).statistic
        if np.isnan(ref):
            assert np.isnan(ours[i])
        else:
            assert ours[i] == pytest.approx(ref, abs=1e-12)
    # retrieval's spearman column is the mean of it over queries whose truth varies
    truth = rng.random((30, 12))
    m = retrieval(b, truth, 0.7)
    assert m["spearman"] == pytest.approx(np.nanmean([spearmanr(x, t).statistic for x, t in zip(b, truth, strict=True)]), abs=1e-12)


def _table(rows: dict[str, float], col: str = "sim_mse") -> pd.DataFrame:
    return pd.DataFrame([{"row": r, col: v} for r, v in rows.items()])


def test_bold_only_when_the_paired_difference_excludes_zero():
    rng = np.random.default_rng(1)
    base = rng.normal(0.04, 0.004, 1000)  # shared test-set noise
    reps = {"A": {"sim_mse": base}, "B": {"sim_mse": base + 0.002 + rng.normal(0, 0.0005, 1000)},
            "C": {"sim_mse": base + 0.0001 + rng.normal(0, 0.002, 1000)}, MEAN_ROW: {"sim_mse": base + 0.02}}
    df = _table({"A": 0.0400, "B": 0.0420, MEAN_ROW: 0.06})
    w = winners(df, {"reps": reps, "level": 0.95}, ["sim_mse"])["sim_mse"]
    assert w["best"] == "A" and w["runner_up"] == "B" and w["significant"]
    assert w["hi"] < 0  # lower is better: A - B below 0
    # a runner-up within noise: no bold
    df2 = _table({"A": 0.0400, "C": 0.0401})
    w2 = winners(df2, {"reps": reps, "level": 0.95}, ["sim_mse"])["sim_mse"]
    assert w2["best"] == "A" and not w2["significant"] and w2["lo"] < 0 < w2["hi"]
    # the paired table against a reference row: B worse, C not significant, the mean predictor worse
    pt = paired_table(_table({"A": 0.04, "B": 0.042, "C": 0.0401, MEAN_ROW: 0.06}), {"reps": reps, "level": 0.95}, "A")
    got = dict(zip(pt["row"], pt["verdict"], strict=True))
    assert got == {"B": "worse", "C": "not significant", MEAN_ROW: "worse"}
    # the point values say A is best, but on the resamples A is significantly worse than B: no bold
    flipped = {"A": {"sim_mse": base + 0.003}, "B": {"sim_mse": base}}
    w3 = winners(_table({"A": 0.0400, "B": 0.0401}), {"reps": flipped, "level": 0.95}, ["sim_mse"])["sim_mse"]
    assert w3["best"] == "A" and w3["lo"] > 0 and not w3["significant"]
    # higher is better for a ranking column: a positive interval is a significant win
    up = {"A": {"m2i_sim_mrr": base + 0.01}, "B": {"m2i_sim_mrr": base}}
    w4 = winners(_table({"A": 0.5, "B": 0.4}, "m2i_sim_mrr"), {"reps": up, "level": 0.95}, ["m2i_sim_mrr"])
    assert w4["m2i_sim_mrr"]["significant"]
    assert pt.set_index("row").loc["B", "diff"] == pytest.approx(0.002)


def test_vectorised_ndcg_equals_sklearn_with_ties():
    from sklearn.metrics import ndcg_score

    from imem.metrics import ndcg_at_k

    rng = np.random.default_rng(11)
    truth = rng.random((40, 15))
    scores = np.round(rng.normal(size=(40, 15)), 1)  # many tied scores
    scores[5] = 0.3  # one all-tied row
    for k in (1, 5, 10, 15, 30):
        ours = ndcg_at_k(truth, scores, k)
        ref = [ndcg_score(truth[i:i + 1], scores[i:i + 1], k=k) for i in range(40)]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert retrieval(scores, truth, 0.7)["ndcg10"] == pytest.approx(ndcg_score(truth, scores, k=10), abs=1e-12)


def test_rank_metrics_resample_the_queries_over_the_whole_candidate_pool():
    """matching_resampled: music->image queries are the drawn clips (repeats kept), image->music queries the
    drawn images, each ranking every candidate of the split; the identity resample is matching_columns."""
    from imem.methods.base import matching_columns, matching_resampled

    rng = np.random.default_rng(4)
    truth = rng.random((9, 7))
    scores = truth + rng.normal(0, 0.3, truth.shape)
    full = matching_columns(scores, truth, "sim", 0.7)
    same = matching_resampled(scores, truth, "sim", 0.7, 10, np.arange(9), np.arange(7))
    assert same == pytest.approx(full, abs=1e-12)
    ci, ii = np.array([0, 0, 3, 8, 8, 8]), np.array([6, 1, 1])
    got = matching_resampled(scores, truth, "sim", 0.7, 10, ci, ii)
    m2i = retrieval(scores[ci], truth[ci], 0.7)  # drawn clips x every image
    i2m = retrieval(scores.T[ii], truth.T[ii], 0.7)  # drawn images x every clip
    for name in ("ndcg10", "r1", "r5", "r10", "mrr"):
        assert got[f"m2i_sim_{name}"] == pytest.approx(m2i[name], abs=1e-12)
        assert got[f"i2m_sim_{name}"] == pytest.approx(i2m[name], abs=1e-12)
    # a perfect ranking stays perfect on every resample (no duplicated candidate can push a relevant one down)
    plan = bootstrap.make_plan([str(i // 3) for i in range(9)], [str(j) for j in range(7)], n=50, seed=0)
    reps = bootstrap.replicate(lambda c, i: {"p": matching_resampled(truth, truth, "sim", 0.5, 10, c, i)}, plan,
                               progress=False)
    assert np.nanmin(reps["p"]["m2i_sim_r1"]) == 1.0 and np.nanmin(reps["p"]["i2m_sim_mrr"]) == 1.0


# Mutation testing (issue 21, docs/testing.md): the interval, paired, replicate and mean_over rules by hand.

def test_percentile_interval_by_hand_and_non_finite_values_left_out():
    # 0, 1, ..., 100: the 5th and 95th percentiles of a 90 % interval are 5 and 95 exactly (linear interpolation)
    v = np.concatenate([np.arange(101.0), [np.nan, np.inf]])
    assert bootstrap.interval(v, 0.9) == (pytest.approx(5.0), pytest.approx(95.0))
    # four values: positions 0.075 and 2.925 (0.025 and 0.975 of n - 1 = 3)
    lo, hi = bootstrap.interval(np.array([4.0, 0.0, 2.0, 1.0]))
    assert lo == pytest.approx(0.075) and hi == pytest.approx(2.0 + 0.925 * 2.0)
    assert all(np.isnan(x) for x in bootstrap.interval(np.array([np.nan, -np.inf])))
    iv = bootstrap.intervals({"a": np.array([0.1234567, 0.2, 0.3]), "b": np.full(3, np.nan)}, level=0.5)
    assert iv == {"lo": {"a": round(0.1234567 + 0.5 * (0.2 - 0.1234567), 6)}, "hi": {"a": 0.25}}
    # rounded to 6 decimals on both ends; the default level is 95 %: positions 0.05 and 1.95 of 0, 1, 2 (x 0.1234567)
    iv = bootstrap.intervals({"a": np.array([0.0, 0.1234567, 0.2469134])})
    assert iv == {"lo": {"a": round(0.05 * 0.1234567, 6)}, "hi": {"a": round(1.95 * 0.1234567, 6)}}
    assert iv["hi"]["a"] == 0.240741


def test_paired_difference_over_the_resamples_where_both_are_defined():
    a = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    b = np.array([0.5, 2.5, 1.0, np.nan, 3.0])
    d, lo, hi = bootstrap.paired(a, b, level=0.5)
    assert d == pytest.approx((0.5 - 0.5 + 2.0) / 3)  # differences 0.5, -0.5, 2.0
    assert (lo, hi) == (pytest.approx(0.0), pytest.approx(1.25))  # their 25th and 75th percentiles
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no resample with both defined: NaN, without a mean-of-empty warning
        assert all(np.isnan(x) for x in bootstrap.paired(np.array([np.nan]), np.array([1.0])))


def test_replicate_fills_a_metric_a_resample_leaves_out_with_nan_and_plan_indices_repeat_draws():
    plan = bootstrap.Plan(np.array([[2, 0, 1], [0, 1, 1]]), np.array([[0, 3], [1, 1]]), seed=0)
    assert plan.n == 2
    assert plan.clips(0).tolist() == [0, 0, 2] and plan.clips(1).tolist() == [1, 2]
    assert plan.images(0).tolist() == [1, 1, 1] and plan.images(1).tolist() == [0, 1]

    def score(ci, ii):
        out = {"m": {"n_clips": len(ci)}}
        if len(ii) == 2:
            out["m"]["only_second"] = ci.sum()
            out["x"] = {"y": 7}
        return out

    reps = bootstrap.replicate(score, plan, progress=False)
    assert reps["m"]["n_clips"].tolist() == [3.0, 2.0] and reps["m"]["n_clips"].dtype == np.float64
    assert np.isnan(reps["m"]["only_second"][0]) and reps["m"]["only_second"][1] == 3.0
    assert np.isnan(reps["x"]["y"][0]) and reps["x"]["y"][1] == 7.0


def test_mean_over_seeds_keeps_the_metrics_every_run_has():
    runs = [{"a": np.array([1.0, 2.0]), "b": np.array([0.0, 0.0])}, {"a": np.array([3.0, 6.0]), "c": np.zeros(2)}]
    got = bootstrap.mean_over(runs)
    assert list(got) == ["a"] and got["a"].tolist() == [2.0, 4.0]
    assert bootstrap.mean_over([]) == {}


def test_plan_draws_every_unit_equally_often_on_average_and_empty_tables_draw_nothing():
    """Multinomial draws of n units with probability 1/n each: every unit is drawn once per resample on average
    (and the draw counts sum to n); no images -> a (n, 0) count table."""
    plan = bootstrap.make_plan([str(i) for i in range(5)], [], n=4000, seed=0)
    assert plan.image_counts.shape == (4000, 0) and plan.seed == 0
    assert (plan.clip_counts.sum(axis=1) == 5).all()
    np.testing.assert_allclose(plan.clip_counts.mean(axis=0), 1.0, atol=0.05)
    # P(a given unit is not drawn) = (1 - 1/5)^5 = 0.328
    assert (plan.clip_counts == 0).mean() == pytest.approx(0.8 ** 5, abs=0.02)
    assert bootstrap.make_plan(["a"], ["i"], n=2.0, seed=1).n == 2


def test_one_resample_is_allowed_and_music_and_images_draw_from_separate_streams():
    ids = [str(i) for i in range(30)]
    assert bootstrap.make_plan(ids, ids, n=1, seed=0).n == 1
    plan = bootstrap.make_plan(ids, ids, n=50, seed=4)  # the same ids on both sides: different draws
    assert not np.array_equal(plan.clip_counts, plan.image_counts)
