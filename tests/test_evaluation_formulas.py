"""The evaluate stage's row formulas (imem.evaluation) on hand-made predictions: fast, unlike test_evaluation's
end-to-end runs, so that mutation testing (issue 21, docs/testing.md) reaches them."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from imem import evaluation as ev
from imem.metrics import PerQuery, random_ranking, retrieval


def test_regression_row_per_output_by_hand():
    pred = {"pair_sim": np.array([0.5, 0.2]), "image_va": np.array([[0.1, 0.9], [0.4, 0.4]]),
            "music_va": np.array([[0.0, 0.0]])}
    true = {"pair_sim": np.array([0.1, 0.2]), "image_va": np.array([[0.2, 0.5], [0.4, 0.6]]),
            "music_va": np.array([[0.3, -0.1]])}
    row = ev.regression_row(pred, true)
    assert set(row) == {f"{p}_{m}" for p in ("sim", "image_valence", "image_arousal", "music_valence",
                                             "music_arousal") for m in ("mse", "mae")}
    assert row["sim_mse"] == pytest.approx(0.16 / 2) and row["sim_mae"] == pytest.approx(0.4 / 2)
    assert row["image_valence_mse"] == pytest.approx(0.01 / 2) and row["image_arousal_mae"] == pytest.approx(0.3)
    assert row["music_valence_mae"] == pytest.approx(0.3) and row["music_arousal_mse"] == pytest.approx(0.01)
    assert ev.regression_row({"image_va": pred["image_va"]}, true).keys() == {
        "image_valence_mse", "image_valence_mae", "image_arousal_mse", "image_arousal_mae"}


PRED = {"sim_matrix": np.array([[0.9, 0.1, 0.4], [0.2, 0.8, 0.3]]),  # 2 clips x 3 images
        "music_emb": np.array([[0.0, 0.0], [1.0, 1.0]]), "image_emb": np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])}
TRUTH = np.array([[0.9, 0.3, 0.75], [0.1, 0.6, 0.8]])


def test_scores_are_the_similarity_or_minus_the_squared_distance_in_both_directions():
    emb = -np.array([[1.0, 4.0, 2.0], [1.0, 2.0, 0.0]])  # squared distances of clip i to image j
    np.testing.assert_allclose(ev._scores(PRED, "emb", "music_to_image"), emb, atol=1e-12)
    np.testing.assert_allclose(ev._scores(PRED, "emb", "image_to_music"), emb.T, atol=1e-12)
    np.testing.assert_array_equal(ev._scores(PRED, "sim", "music_to_image"), PRED["sim_matrix"])
    np.testing.assert_array_equal(ev._scores(PRED, "sim", "image_to_music"), PRED["sim_matrix"].T)


def test_retrieval_and_random_rows_name_each_direction_and_scorer():
    row = ev.retrieval_rows(PRED, TRUTH, 0.7, 2)
    emb = -np.array([[1.0, 4.0, 2.0], [1.0, 2.0, 0.0]])
    for short, scorer, scores, truth in (("m2i", "sim", PRED["sim_matrix"], TRUTH), ("i2m", "sim", PRED["sim_matrix"].T, TRUTH.T),
                                         ("m2i", "emb", emb, TRUTH), ("i2m", "emb", emb.T, TRUTH.T)):
        for name, v in retrieval(scores, truth, 0.7, k_ndcg=2).items():
            key = f"{short}_{scorer}_{name}"
            if name.startswith("queries"):
                assert key not in row
            else:
                assert row[key] == pytest.approx(v, nan_ok=True), key
    # clip 0's best image (0.9) is relevant, clip 1's (image 1, 0.6) is not, its second (image 2, 0.8) is
    assert row["m2i_sim_r1"] == 0.5 and row["m2i_sim_mrr"] == pytest.approx(0.75)
    rnd = ev.random_rows(TRUTH, 0.7, 2)
    assert rnd == {**{f"m2i_{n}": v for n, v in random_ranking(TRUTH, 0.7, k_ndcg=2).items()},
                   **{f"i2m_{n}": v for n, v in random_ranking(TRUTH.T, 0.7, k_ndcg=2).items()}}
    assert rnd["m2i_r1"] == pytest.approx((2 / 3 + 1 / 3) / 2) and rnd["i2m_queries"] == 3  # 2 and 1 of 3 relevant


def test_resampled_row_weights_pairs_by_clip_times_image_draws_and_queries_by_their_draws():
    """Pairs (clip, image): (0, 0), (1, 2), (0, 1); clips drawn [0, 0, 1] and images [2, 2, 0]: the pairs count
    2 x 1, 1 x 2 and 2 x 0 times."""
    e = SimpleNamespace(song_of_clip=np.array(["s0", "s1"]), image_ids=np.array(["a", "b", "c"]),
                        pair_clip=np.array([0, 1, 0]), pair_image=np.array([0, 2, 1]))
    pred = {"pair_sim": np.array([0.5, 0.1, 0.9]), "image_va": np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])}
    true = {"pair_sim": np.array([0.2, 0.3, 0.0]), "image_va": np.array([[0.0, 0.2], [0.3, 0.0], [0.6, 0.6]])}
    ci, ii = np.array([0, 0, 1]), np.array([2, 2, 0])
    ranks = {"sim": {"m2i": PerQuery.of(PRED["sim_matrix"], TRUTH, 0.7, 2),
                     "i2m": PerQuery.of(PRED["sim_matrix"].T, TRUTH.T, 0.7, 2)}}
    row = ev.resampled_row(pred, true, e, ci, ii, 0.7, 2, ranks)
    assert row["sim_mse"] == pytest.approx((2 * 0.09 + 2 * 0.04) / 4) and row["sim_mae"] == pytest.approx((2 * 0.3 + 2 * 0.2) / 4)
    assert row["image_valence_mse"] == pytest.approx((0.01 + 0.01 + 0.01) / 3)
    assert row["image_arousal_mae"] == pytest.approx(0.0)
    # queries: clip 0 twice and clip 1 once (m2i); image 2 twice and image 0 once (i2m)
    assert row["m2i_sim_r1"] == pytest.approx(retrieval(PRED["sim_matrix"][[0, 0, 1]], TRUTH[[0, 0, 1]], 0.7)["r1"])
    assert row["m2i_sim_r1"] == pytest.approx(2 / 3)
    want = retrieval(PRED["sim_matrix"].T[[2, 2, 0]], TRUTH.T[[2, 2, 0]], 0.7, k_ndcg=2)
    for name in ("ndcg2", "mrr", "r1", "spearman"):
        assert row[f"i2m_sim_{name}"] == pytest.approx(want[name]), name
    assert not any(k.endswith("queries") or "queries_" in k for k in row)
    # no drawn pair: no similarity columns; no rankings: no ranking columns
    none = ev.resampled_row(pred, true, e, np.array([1]), np.array([0]), 0.7, 2, None)
    assert "sim_mse" not in none and not any(k.startswith("m2i") for k in none)
    # a single pair drawn once still has its columns; the last clip and image undrawn (counts padded to the
    # tables' lengths); the music side's VA from the drawn clips
    pred["music_va"], true["music_va"] = np.array([[0.5, 0.5], [0.9, 0.1]]), np.array([[0.5, 0.7], [0.6, 0.1]])
    one = ev.resampled_row(pred, true, e, np.array([1]), np.array([2]), 0.7, 2, None)
    assert one["sim_mse"] == pytest.approx(0.04) and one["music_valence_mae"] == pytest.approx(0.3)
    first = ev.resampled_row(pred, true, e, np.array([0, 0]), np.array([0, 1]), 0.7, 2, ranks)
    assert first["sim_mse"] == pytest.approx((2 * 0.09 + 2 * 0.81) / 4)
    assert first["music_arousal_mse"] == pytest.approx(0.04) and first["m2i_sim_r1"] == 1.0
    assert first["i2m_sim_mrr"] == pytest.approx(retrieval(PRED["sim_matrix"].T[[0, 1]], TRUTH.T[[0, 1]], 0.7)["mrr"])


def test_seed_summary_means_sample_stds_and_common_columns():
    rows = [{"a": 1.0, "b": 2.0, "c": 5.0}, {"a": 2.0, "b": 4.0}, {"a": 4.0, "b": 9.0, "c": 1.0}]
    s = ev.seed_summary(rows, [1, 2, 3], [4, 5, 6])
    assert (s["n"], s["train_seeds"], s["best_epochs"]) == (3, [1, 2, 3], [4, 5, 6])
    assert s["mean"] == {"a": round(7 / 3, 6), "b": 5.0}
    assert s["std"]["a"] == round(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2), 6)
    assert s["std"]["b"] == round(math.sqrt((9 + 1 + 16) / 2), 6)
    two = ev.seed_summary(rows[:2], [1, 2], [4, 5])
    assert two["std"] == {"a": round(math.sqrt(0.5), 6), "b": round(math.sqrt(2.0), 6)}
    one = ev.seed_summary(rows[:1], [7], [2])
    assert "std" not in one and one["mean"] == {"a": 1.0, "b": 2.0, "c": 5.0}
    assert ev._round({"x": 0.12345678, "y": math.nan, "z": 3}) == {"x": 0.123457, "y": pytest.approx(math.nan, nan_ok=True), "z": 3}


def test_markdown_table_leaves_missing_metrics_blank():
    df = pd.DataFrame({"model": ["a", "b"], "mse": [0.123456, np.nan]})
    md = ev.markdown_table(df, "T", "a note")
    assert md.startswith("# T\n\na note\n\n|") and md.endswith("|\n")
    lines = md.splitlines()
    assert "0.1235" in lines[-2] and lines[-1].replace(" ", "") == "|b||"
    assert ev.markdown_table(df, "T").startswith("# T\n\n|")
