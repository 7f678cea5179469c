from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imem.data.pairs import leakage_audit, mean_distance, read_pair_list, sample_pairs, similarity

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imemnet"


def _tables(n_clips=120, n_images=90, seed=0, splits=("train", "val", "test")):
    rng = np.random.default_rng(seed)
    clips = pd.DataFrame({"clip_id": [f"{i // 10}-{9 + i % 10}" for i in range(n_clips)],
                          "valence": rng.random(n_clips), "arousal": rng.random(n_clips),
                          "split": [splits[(i // 10) % len(splits)] for i in range(n_clips)]})
    images = pd.DataFrame({"image_id": [f"img{i}" for i in range(n_images)],
                           "valence": rng.random(n_images), "arousal": rng.random(n_images),
                           "split": [splits[i % len(splits)] for i in range(n_images)]})
    return clips, images


def _brute_mean(c, i):
    return float(np.mean([[np.hypot(*(a - b)) for b in i] for a in c]))


def test_sigma_is_exact_against_brute_force():
    clips, images = _tables(57, 43)
    c, i = clips[["valence", "arousal"]].to_numpy(), images[["valence", "arousal"]].to_numpy()
    brute = _brute_mean(c, i)
    assert mean_distance(c, i, chunk_size=5) == pytest.approx(brute, rel=1e-6)
    assert sample_pairs(clips, images, seed=1, chunk_size=7, progress=False).sigma == pytest.approx(brute, rel=1e-6)


def test_similarity_formula():
    np.testing.assert_allclose(similarity(np.array([0.0, 0.36, 0.72]), 0.36), [1.0, np.exp(-1), np.exp(-2)])


def test_pair_counts_splits_and_extremes():
    clips, images = _tables(120, 300)
    sp = sample_pairs(clips, images, top=10, bottom=10, random=30, keep_fraction=1.0, seed=3, progress=False)
    split_of_img = images.set_index("image_id")["split"]
    va_img = images.set_index("image_id")[["valence", "arousal"]]
    for split, p in sp.pairs.items():
        n_clips = (clips["split"] == split).sum()
        assert len(p) == n_clips * 50
        assert (p["image_id"].map(split_of_img) == split).all()  # same split only
        assert not p.duplicated(["clip_id", "image_id"]).any()   # random ones avoid top/bottom and repeats
        assert p.groupby("kind").size().to_dict() == {"bottom": n_clips * 10, "random": n_clips * 30, "top": n_clips * 10}
    # the 'top' images of a clip are exactly its 10 nearest in VA among its split's images (brute force)
    row = clips.iloc[0]
    pool = images[images["split"] == row["split"]]
    d = np.hypot(pool["valence"] - row["valence"], pool["arousal"] - row["arousal"])
    nearest = set(pool["image_id"].to_numpy()[np.argsort(d.to_numpy())[:10]])
    farthest = set(pool["image_id"].to_numpy()[np.argsort(d.to_numpy())[-10:]])
    p = sp.pairs[row["split"]]
    assert set(p[(p["clip_id"] == row["clip_id"]) & (p["kind"] == "top")]["image_id"]) == nearest
    assert set(p[(p["clip_id"] == row["clip_id"]) & (p["kind"] == "bottom")]["image_id"]) == farthest
    # scores: S = exp(-d / sigma) with the pair's own distance
    one = p.iloc[5]
    dv = va_img.loc[one["image_id"]] - clips.set_index("clip_id").loc[one["clip_id"], ["valence", "arousal"]]
    assert one["score"] == pytest.approx(np.exp(-np.hypot(*dv) / sp.sigma))


def test_keep_fraction_seed_and_chunk_independence():
    clips, images = _tables(100, 400)
    a = sample_pairs(clips, images, keep_fraction=0.1, seed=5, chunk_size=4, progress=False)
    b = sample_pairs(clips, images, keep_fraction=0.1, seed=5, chunk_size=1000, progress=False)
    c = sample_pairs(clips, images, keep_fraction=0.1, seed=6, chunk_size=4, progress=False)
    for s in a.pairs:
        n = (clips["split"] == s).sum() * 50
        assert len(a.pairs[s]) == round(0.1 * n)
        pd.testing.assert_frame_equal(a.pairs[s], b.pairs[s])
    assert not all(a.pairs[s].equals(c.pairs[s]) for s in a.pairs)


def test_small_pool_takes_what_exists():
    clips, images = _tables(30, 36)  # 12 images per split: 10 top, 2 bottom, 0 random
    sp = sample_pairs(clips, images, keep_fraction=1.0, seed=0, progress=False)
    for _s, p in sp.pairs.items():
        assert p.groupby("clip_id").size().eq(12).all()
        assert not p.duplicated(["clip_id", "image_id"]).any()


def test_audit_counts_shared_items_and_duplicates():
    tr = pd.DataFrame({"clip_id": ["1-9", "1-10", "2-9"], "image_id": ["a", "b", "a"], "score": [0.1, 0.2, 0.3]})
    te = pd.DataFrame({"clip_id": ["3-9", "2-9", "3-9"], "image_id": ["c", "a", "c"], "score": [0.4, 0.3, 0.4]})
    r = leakage_audit({"train": tr, "test": te})
    assert r["shared"]["train~test"]["songs"] == 1
    assert r["shared"]["train~test"]["clips"] == 1
    assert r["shared"]["train~test"]["images"] == 1
    assert r["shared"]["train~test"]["pairs"] == 1
    assert r["splits"]["test"]["duplicate_lines"] == 1
    assert r["clean"] is False
    clean = leakage_audit({"train": tr, "test": pd.DataFrame({"clip_id": ["9-9"], "image_id": ["z"], "score": [1.0]})})
    assert clean["clean"] is True


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"published IMEMNet lists not present at {SHARED} (a user's clone)")
def test_audit_of_the_published_imemnet_lists():
    lists = {s: read_pair_list(SHARED / f"{s}_matching.txt") for s in ("val", "test")}
    r = leakage_audit(lists)
    assert r["splits"]["test"]["songs"] == 360 and r["splits"]["test"]["clips"] == 6760
    assert r["splits"]["test"]["images"] == 4937 and r["splits"]["test"]["pair_lines"] == 26115
    assert r["splits"]["val"]["songs"] == 90 and r["splits"]["val"]["pair_lines"] == 8795
    shared = r["shared"]["val~test"]
    assert shared["songs"] == 90  # every val song is also a test song
    assert shared["songs_of_val_in_test"] == "90/90"
    assert shared["pair_lines_of_val"] == 4114
    assert (r["splits"]["test"]["duplicate_lines"], r["splits"]["val"]["duplicate_lines"]) == (9, 7)
    assert r["clean"] is False


# Mutation testing (issue 21, docs/testing.md): the branches the tests above do not reach.

def test_similarity_matrix_is_element_wise_accurate_and_one_on_identical_va():
    """S of every clip x image from the element-wise distance: within 2 float32 ulps of the float64 distance
    (torch's matrix-product expansion errs ~100x more at these scales), exactly 1 where the VA are equal."""
    from imem.data.pairs import similarity_matrix

    rng = np.random.default_rng(0)
    c, i = rng.random((300, 2)).astype(np.float32), rng.random((200, 2)).astype(np.float32)
    c[5] = i[7]
    d64 = np.sqrt(((c[:, None, :].astype(np.float64) - i[None]) ** 2).sum(-1))
    s = similarity_matrix(c, i, 0.4)
    assert s.shape == (300, 200) and s.dtype == np.float64 and s[5, 7] == 1.0
    d = -0.4 * np.log(s)
    assert np.abs(d - d64).max() < 2.5e-7
    # the distances are float32 whatever the input's dtype (the committed S depend on it): float64 VA give the
    # very same S as their float32 values
    c64, i64 = c.astype(np.float64) + 1e-12, i.astype(np.float64)
    np.testing.assert_array_equal(similarity_matrix(c64, i64, 0.4), similarity_matrix(c64.astype(np.float32), i, 0.4))
    np.testing.assert_array_equal(similarity_matrix(c, i64, 0.4), s)


def test_random_others_in_a_large_pool_are_distinct_new_and_uniform():
    """The large-pool branch (draw, then redraw rows with a repeat or a clash): per row k distinct indices in
    range and outside the row's chosen ones, each index about equally often; a pool just above the branch's
    threshold (many clashes to redraw) still gives valid rows."""
    from imem.data.pairs import _random_others

    rng = np.random.default_rng(1)
    chosen = np.stack([rng.choice(500, 20, replace=False) for _ in range(400)])
    out = _random_others(chosen, 500, 30, np.random.default_rng(2))
    assert out.shape == (400, 30) and out.min() >= 0 and out.max() < 500
    for row, ch in zip(out, chosen, strict=True):
        assert len(set(row)) == 30 and not set(row) & set(ch)
    counts = np.bincount(out.ravel(), minlength=500)
    assert counts.mean() == 24.0 and counts.std() < 2 * np.sqrt(24.0)  # about binomial, no index favoured
    tight = _random_others(chosen[:50, :5], 4 * (5 + 5) + 1, 5, np.random.default_rng(3))
    for row, ch in zip(tight, chosen[:50, :5], strict=True):
        assert len(set(row)) == 5 and not set(row) & set(ch) and row.max() <= 40
    # small pools: what is left, all of it; none asked or none left: an empty (rows, 0) block
    left = _random_others(np.array([[0, 2, 4]]), 6, 10, np.random.default_rng(0))
    assert sorted(left[0]) == [1, 3, 5]
    assert _random_others(np.array([[0, 1]]), 2, 5, rng).shape == (1, 0)
    assert _random_others(np.zeros((0, 2), dtype=np.int64), 50, 5, rng).shape == (0, 0)


def test_more_top_images_asked_than_the_split_has():
    clips, images = _tables(30, 36)  # 12 images per split: all 12 are 'top', none 'bottom' or 'random'
    sp = sample_pairs(clips, images, top=15, bottom=10, random=30, keep_fraction=1.0, seed=0, progress=False)
    for p in sp.pairs.values():
        assert set(p["kind"]) == {"top"} and p.groupby("clip_id").size().eq(12).all()
    sp = sample_pairs(clips, images, top=0, bottom=3, random=2, keep_fraction=1.0, seed=0, progress=False)
    for p in sp.pairs.values():
        assert p.groupby("kind").size().to_dict() == {"bottom": 10 * 3, "random": 10 * 2}
    with pytest.raises(Exception, match="has clips but no images"):
        sample_pairs(clips, images[images["split"] != "val"], progress=False)
    with pytest.raises(Exception, match="no column 'arousal'"):
        sample_pairs(clips, images.drop(columns="arousal"), progress=False)


def test_pair_list_blank_lines_field_count_and_non_finite_scores(tmp_path):
    from imem.errors import ImemError

    p = tmp_path / "val_matching.txt"
    p.write_text("\n1967-11 7033 0\n   \n1967-12 7034 1\n")
    df = read_pair_list(p)
    assert df["score"].tolist() == [0.0, 1.0] and df["image_id"].tolist() == ["7033", "7034"]
    for body, msg in (("1967-11 7033\n", r"val_matching.txt:1: expected '<clip_id> <image_id> <score>'"),
                      ("1967-11 7033 0.5 x\n", r":1: expected"), ("1967-11 7033 nan\n", r":1: score nan is outside"),
                      ("1967-11 7033 -0.01\n", r":1: score -0.01 is outside"), ("1967-11 7033 abc\n", r":1: could not"),
                      ("\n\n", r"no pairs in the file")):
        p.write_text(body)
        with pytest.raises(ImemError, match=msg):
            read_pair_list(p)
    with pytest.raises(ImemError, match="pair list not found"):
        read_pair_list(tmp_path / "nope.txt")


def test_pairs_must_name_prepared_items():
    from imem.data.pairs import check_pairs_resolve
    from imem.errors import ImemError

    pairs = pd.DataFrame({"clip_id": ["1-9", "1-10", "2-9"], "image_id": ["a", "b", "b"]})
    check_pairs_resolve(pairs, {"1-9", "1-10", "2-9"}, {"a", "b"}, "val")
    with pytest.raises(ImemError, match=r"val: image id 'b' matches no image of the corpus \(2 pairs affected\)"):
        check_pairs_resolve(pairs, {"1-9", "1-10", "2-9"}, {"a"}, "val")
    with pytest.raises(ImemError, match=r"val: clip id '1-10' matches no clip of the corpus \(1 pairs affected\)"):
        check_pairs_resolve(pairs, {"1-9", "2-9"}, set(), "val")


def test_audit_counts_by_hand_and_its_markdown():
    tr = pd.DataFrame({"clip_id": ["1-9", "1-10", "2-9", "2-9"], "image_id": ["a", "b", "a", "a"],
                       "score": [0.1, 0.2, 0.3, 0.35]})
    te = pd.DataFrame({"clip_id": ["3-9", "1-9", "3-10"], "image_id": ["c", "a", "d"], "score": [0.4, 0.1, 0.5]})
    va = pd.DataFrame({"clip_id": ["4-9"], "image_id": ["e"]})  # no score column
    r = leakage_audit({"train": tr, "test": te, "val": va})
    assert r["splits"]["train"] == {"songs": 2, "clips": 3, "images": 2, "pairs": 3, "pair_lines": 4,
                                    "duplicate_lines": 0, "duplicate_pair_keys": 1}
    assert r["splits"]["val"]["duplicate_lines"] == 0 and r["splits"]["val"]["pairs"] == 1
    assert r["shared"]["train~test"] == {"songs": 1, "clips": 1, "images": 1, "pairs": 1, "pair_lines_of_train": 1,
                                         "songs_of_train_in_test": "1/2"}
    assert r["shared"]["train~val"]["songs"] == 0 and r["shared"]["test~val"]["songs_of_test_in_val"] == "0/2"
    assert set(r["shared"]) == {"train~test", "train~val", "test~val"}
    # a repeated (clip, image) key alone makes the corpus unclean
    assert leakage_audit({"train": tr, "val": va})["clean"] is False
    assert leakage_audit({"train": tr.iloc[:3], "val": va})["clean"] is True
    from imem.data.pairs import audit_markdown

    text = audit_markdown(r, "Leakage audit (x)")
    md = text.splitlines()
    assert md[0] == "# Leakage audit (x)"
    assert "| train | 2 | 3 | 2 | 4 | 3 | 0 | 1 |" in md and "| train~test | 1 | 1 | 1 | 1 |" in md
    assert md[-1] == "Verdict: LEAKAGE or duplicates found (see the counts above)." and text.endswith(".\n")
    assert md[-2] == "" and md[1] == "" and md[3] == "|---|---|---|---|---|---|---|---|"
    clean = audit_markdown(leakage_audit({"val": va}), "t")
    assert clean.endswith("\nVerdict: no leakage between splits and no duplicate pairs.\n")
