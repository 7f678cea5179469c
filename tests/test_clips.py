import numpy as np
import pytest

from imem.data.clips import DynamicAnnotations, clip_windows, split_clip_id


def _dyn(ends_ms, start=15000, step=500, seed=0):
    rng = np.random.default_rng(seed)
    times = np.arange(start, max(ends_ms) + 1, step)
    v = rng.uniform(-1, 1, (len(ends_ms), len(times)))
    a = rng.uniform(-1, 1, (len(ends_ms), len(times)))
    for i, e in enumerate(ends_ms):
        v[i, times > e] = np.nan
        a[i, times > e] = np.nan
    return DynamicAnnotations([str(100 + i) for i in range(len(ends_ms))], times, v, a)


def test_45s_deam_song_gives_the_published_clip_ids_9_to_21():
    dyn = _dyn([44500])
    clips = clip_windows(dyn, np.array([45.0]))
    assert clips["k"].tolist() == list(range(9, 22))
    assert clips["clip_id"].iloc[0] == "100-9"
    assert clips["start_s"].iloc[0] == 16.0 and clips["end_s"].iloc[-1] == 42.0


def test_clip_label_is_the_mean_of_its_four_samples():
    dyn = _dyn([44500])
    clips = clip_windows(dyn, None)
    # k = 9 covers 16..18 s: samples 16000, 16500, 17000, 17500 ms, grid positions 2..5.
    np.testing.assert_allclose(clips["valence"].iloc[0], dyn.valence[0, 2:6].mean())
    np.testing.assert_allclose(clips["arousal"].iloc[-1], dyn.arousal[0, (40000 - 15000) // 500:(42000 - 15000) // 500].mean())


def test_long_song_and_last_window_dropped():
    # annotated to 100.5 s: last complete window k = 50 (98..100 s) is dropped -> k = 9..49
    dyn = _dyn([44500, 100500])
    clips = clip_windows(dyn, np.array([45.0, 101.0]))
    long = clips[clips["song_id"] == "101"]
    assert long["k"].min() == 9 and long["k"].max() == 49 and len(long) == 41
    assert len(clips) == 13 + 41


def test_audio_shorter_than_annotations_bounds_the_windows():
    dyn = _dyn([44500])
    clips = clip_windows(dyn, np.array([30.0]))  # windows must end by 30 s: k <= 15, minus the last -> 9..14
    assert clips["k"].tolist() == list(range(9, 15))


def test_incomplete_window_is_skipped_and_pmemo_start_works():
    dyn = _dyn([44500])
    dyn.valence[0, (20000 - 15000) // 500] = np.nan  # a hole in window k = 11 (20..22 s)
    ks = clip_windows(dyn, None)["k"].tolist()
    assert 11 not in ks and ks[0] == 9
    pm = _dyn([40000], start=15500)  # PMEmo starts at 15.5 s: window 9 (16..18) is complete
    assert clip_windows(pm, None)["k"].iloc[0] == 9


def test_split_clip_id():
    assert split_clip_id("1967-11") == ("1967", 11)
    with pytest.raises(ValueError, match="malformed clip id"):
        split_clip_id("1967_11")


# Mutation testing (issue 21, docs/testing.md): the window rule's other settings and edges.

def test_keeping_the_last_window_and_one_second_clips():
    dyn = _dyn([44500])
    assert clip_windows(dyn, np.array([45.0]), drop_last=False)["k"].tolist() == list(range(9, 23))
    # 1-s clips of two samples: window k covers k-1 .. k s, the first complete one 15..16 s (k = 16)
    one = clip_windows(dyn, None, clip_seconds=1.0)
    # the last complete one is 44..45 s (samples at 44 and 44.5 s), dropped: the last kept is k = 44
    assert one["k"].iloc[0] == 16 and one["k"].iloc[-1] == 44 and len(one) == 44 - 16 + 1
    assert (one["start_s"].iloc[0], one["end_s"].iloc[0]) == (15.0, 16.0)
    assert one["valence"].iloc[0] == pytest.approx(dyn.valence[0, :2].mean())
    assert one["arousal"].iloc[1] == pytest.approx(dyn.arousal[0, 2:4].mean())
    with pytest.raises(ValueError, match="not a multiple of the annotation step 500 ms"):
        clip_windows(dyn, None, clip_seconds=0.75)


def test_audio_length_bound_is_inclusive_and_a_song_without_a_complete_window_gives_no_clip():
    dyn = _dyn([44500, 16500])  # the second song is annotated for 15..16.5 s only: no complete 2-s window
    clips = clip_windows(dyn, np.array([29.999, 45.0]))
    assert clips["song_id"].unique().tolist() == ["100"]
    assert clips["k"].tolist() == list(range(9, 14))  # windows must end by 29.999 s: k <= 14, minus the last
    assert clip_windows(dyn, np.array([30.0 - 1e-10, 45.0]))["k"].tolist() == list(range(9, 15))


def test_off_grid_and_empty_annotations():
    off = _dyn([44500], start=15250)  # samples at x.25 / x.75 s: no window's samples lie on this grid
    assert clip_windows(off, None).empty
    empty = clip_windows(DynamicAnnotations(["1"], np.zeros(0, dtype=np.int64), np.zeros((1, 0)), np.zeros((1, 0))))
    assert empty.empty and list(empty.columns) == ["clip_id", "song_id", "k", "start_s", "end_s", "valence", "arousal"]
    assert empty["k"].dtype == int and empty["valence"].dtype == float
    assert DynamicAnnotations(["1"], np.array([15000]), np.zeros((1, 1)), np.zeros((1, 1))).step_ms == 500
    assert DynamicAnnotations(["1"], np.array([0, 250, 500]), np.zeros((1, 3)), np.zeros((1, 3))).step_ms == 250


def test_clip_id_parts_and_song_order():
    from imem.data.clips import song_sort_key

    assert split_clip_id("a-b-12") == ("a-b", 12)
    for bad in ("1967", "-3", "1967-x", "1967-", "1967-1.5"):
        with pytest.raises(ValueError, match="malformed clip id"):
            split_clip_id(bad)
    assert sorted(["10", "b", "2", "abc", "2001", "a10"], key=song_sort_key) == ["2", "10", "2001", "a10", "abc", "b"]
    assert song_sort_key(7) == (0, 7, "")
