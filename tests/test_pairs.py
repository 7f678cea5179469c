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
