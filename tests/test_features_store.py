"""The feature store: layouts, memory-mapped round trips, tiling, normalisation, windows, bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from PIL import Image

from corpus_fixtures import write_small_corpus
from imem.data.prepare import prepare, write_outputs
from imem.errors import ImemError
from imem.features.store import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureStore,
    beats_fbank,
    build_store,
    load_image,
    read_audio,
    resample,
    to_int16,
)
from imem.params import section


def _prepared(root, out):
    p = section("prepare", {"prepare": {"corpus_root": str(root)}})
    p["pairs"].update(top=2, bottom=2, random=2, keep_fraction=1.0)
    p["split"] = {"train": 0.6, "val": 0.2, "test": 0.2}
    write_outputs(prepare(p, progress=False), out / "prepare", out / "reports")
    return out / "prepare"


def _fparams(**over):
    p = section("features", {"features": {"image_size": 32, "batch_size": 16}})
    p.update(over)
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    write_small_corpus(tmp / "corpus", n_songs=3)
    prep = _prepared(tmp / "corpus", tmp)
    manifest = build_store(prep, tmp / "features", _fparams(waveform_rates=[16000, 8000]), progress=False)
    return tmp, prep, manifest


def test_layout_shapes_and_dtypes(built):
    tmp, _, manifest = built
    store = FeatureStore(tmp / "features")
    n = len(store.clips)
    assert n == 3 * 13 + 21 and manifest["clips"] == n
    hc = store.array("handcrafted")
    assert hc.dtype == np.float16 and hc.shape == (n, 193, 87)
    assert isinstance(hc, np.memmap)
    assert store.array("waveform_16000").shape == (n, 32000) and store.array("waveform_16000").dtype == np.int16
    assert store.array("waveform_8000").shape == (n, 16000)
    assert store.array("images_32").shape == (len(store.images), 32, 32, 3) and store.array("images_32").dtype == np.uint8
    assert np.isfinite(hc.astype(np.float32)).all()
    mf = json.loads((tmp / "features" / "manifest.json").read_text())
    assert mf["arrays"]["handcrafted"]["row_groups"]["mfcc"] == [0, 40]
    assert mf["arrays"]["handcrafted"]["row_groups"]["mel"] == [65, 193]
    # clips of a song in k order, consecutive rows
    song = store.clips[store.clips["song_id"] == "2005"]
    assert song["k"].tolist() == list(range(9, 30)) and (np.diff(song["row"]) == 1).all()


def test_waveform_round_trip(built):
    tmp, prep, _ = built
    store = FeatureStore(tmp / "features")
    row = store.clips.iloc[17]
    path = tmp / "corpus" / "DEAM" / "MEMD_audio" / f"{row['song_id']}.wav"
    y, sr = read_audio(path)
    y16 = resample(y, sr, 16000)
    s0 = int(round(row["start_s"] * 16000))
    expect = to_int16(y16[s0:s0 + 32000])
    np.testing.assert_array_equal(store.array("waveform_16000")[row["row"]], expect)
    w = store.waveform([row["row"]], 16000)
    assert w.dtype == torch.float32 and w.shape == (1, 32000)
    np.testing.assert_allclose(w[0].numpy(), expect / 32768.0)


def test_handcrafted_tiling_keeps_request_order(built):
    tmp, _, _ = built
    store = FeatureStore(tmp / "features")
    rows = np.array([5, 2, 9])
    x = store.handcrafted(rows)
    assert x.shape == (3, 3, 193, 87) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # the matrix tiled to 3 channels
    np.testing.assert_array_equal(x[1, 0].numpy(), store.array("handcrafted")[2].astype(np.float32))
    assert store.handcrafted(rows, tile=False).shape == (3, 193, 87)


def test_handcrafted_matches_the_extractor_on_a_stored_clip(built):
    from imem.features.handcrafted import HandcraftedExtractor

    tmp, _, _ = built
    store = FeatureStore(tmp / "features")
    row = store.clips.iloc[3]
    y, sr = read_audio(tmp / "corpus" / "DEAM" / "MEMD_audio" / f"{row['song_id']}.wav")
    y44 = resample(y, sr, 44100)
    s0 = int(round(row["start_s"] * 44100))
    direct = HandcraftedExtractor(device="cpu")(y44[s0:s0 + 88200][None])[0]
    stored = store.array("handcrafted")[row["row"]].astype(np.float32)
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=0.06)  # float16 storage


def test_images_uint8_and_normalised_when_batched(built):
    tmp, _, _ = built
    store = FeatureStore(tmp / "features")
    img_row = store.images.iloc[4]
    path = next((tmp / "corpus").rglob(f"{img_row['image_id']}.*"))
    raw = load_image(path, 32)
    np.testing.assert_array_equal(store.array("images_32")[img_row["row"]], raw)
    batch = store.image_batch([img_row["row"]])
    assert batch.shape == (1, 3, 32, 32)
    for c in range(3):
        expect = (raw[7, 11, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert batch[0, c, 7, 11].item() == pytest.approx(expect, abs=1e-6)


def test_window_of_consecutive_clips(built):
    tmp, _, _ = built
    store = FeatureStore(tmp / "features")
    first = store.clips[store.clips["song_id"] == "2005"].iloc[0]
    w = store.window(first["clip_id"], 10.0, 16000)
    assert w.shape == (160000,)
    np.testing.assert_array_equal(w[32000:64000].numpy(), store.waveform([first["row"] + 1], 16000)[0].numpy())
    last = store.clips[store.clips["song_id"] == "2005"].iloc[-1]
    with pytest.raises(ImemError, match=r"song 2005 has no 5 consecutive clips from k=29"):
        store.window(last["clip_id"], 10.0, 16000)
    with pytest.raises(ImemError, match="not a whole number"):
        store.window(first["clip_id"], 3.0, 16000)


def test_beats_fbank_gives_96_patch_tokens():
    x = beats_fbank(torch.randn(2, 32000) * 0.1)
    assert x.shape == (2, 198, 128)
    assert (x.shape[1] // 16) * (x.shape[2] // 16) == 96
    assert abs(float(x.mean())) < 3  # normalised scale, not raw log-energies (~15)


def test_unknown_clip_or_image_id(built):
    tmp, _, _ = built
    store = FeatureStore(tmp / "features")
    with pytest.raises(ImemError, match=r"clip id '999-9' is not in the feature store"):
        store.clip_rows(["999-9"])
    with pytest.raises(ImemError, match=r"no array 'waveform_22050'"):
        store.waveform([0], 22050)


# --- bad input: one line naming the clip/file, nothing half-written ---------------------------------

@pytest.fixture()
def small(tmp_path):
    write_small_corpus(tmp_path / "corpus", n_songs=2)
    return tmp_path, _prepared(tmp_path / "corpus", tmp_path)


def _truncate(path, seconds):
    y, sr = sf.read(path)
    sf.write(path, y[: int(seconds * sr)], sr)


def test_short_clip_refused_or_padded(small):
    tmp, prep = small
    _truncate(tmp / "corpus" / "DEAM" / "MEMD_audio" / "10.wav", 41.0)  # clip 10-21 covers 40-42 s
    with pytest.raises(ImemError, match=r"clip 10-21: audio .*10.wav is 41.00 s, shorter than its window 40-42 s"):
        build_store(prep, tmp / "f", _fparams(handcrafted=False), progress=False)
    assert not (tmp / "f").exists()
    build_store(prep, tmp / "f", _fparams(handcrafted=False, short_clip="pad"), progress=False)
    store = FeatureStore(tmp / "f")
    row = store.clip_rows(["10-21"])[0]
    assert (store.array("waveform_16000")[row][16000:] == 0).all()


def test_corrupt_image_and_missing_audio(small):
    tmp, prep = small
    img = next((tmp / "corpus" / "NAPS" / "images").iterdir())
    img.write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(ImemError, match=rf"unreadable image file .*{img.name}"):
        build_store(prep, tmp / "f", _fparams(handcrafted=False), progress=False)
    assert not (tmp / "f").exists() and not list(tmp.glob(".f.*"))
    (tmp / "corpus" / "DEAM" / "MEMD_audio" / "17.wav").unlink()
    with pytest.raises(ImemError, match=r"song 17: audio file not found"):
        build_store(prep, tmp / "f", _fparams(handcrafted=False), progress=False)


def test_silent_clip_is_named(small):
    tmp, prep = small
    path = tmp / "corpus" / "DEAM" / "MEMD_audio" / "10.wav"
    y, sr = sf.read(path)
    y[int(14 * sr):int(20 * sr)] = 0.0  # clip 10-9 covers 16-18 s (resampling rings only near 14 and 20 s)
    sf.write(path, y, sr)
    with pytest.raises(ImemError, match=r"clip 10-9: audio .*10.wav is silent in 16-18 s"):
        build_store(prep, tmp / "f", _fparams(), progress=False)
    assert not (tmp / "f").exists()


def test_bad_params(small):
    tmp, prep = small
    with pytest.raises(ImemError, match=r"features.short_clip = 'trim'"):
        build_store(prep, tmp / "f", _fparams(short_clip="trim"), progress=False)
    with pytest.raises(ImemError, match=r"unknown key 'features.hopp'"):
        section("features", {"features": {"hopp": 512}})


def test_unreadable_image_file_helper(tmp_path):
    p = tmp_path / "x.jpg"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    assert load_image(p, 8).shape == (8, 8, 3)


@pytest.mark.slow
def test_agreement_with_librosa_on_the_embedded_corpus(tmp_path):
    """Per feature group, batched extractor vs per-clip librosa on clips of a generated (embedded) corpus."""
    from imem.data.clips import clip_windows  # noqa: F401  (the corpus' clip rule is what synth uses)
    from imem.data.synth import synthesize
    from imem.features.handcrafted import ROW_GROUPS, HandcraftedExtractor, librosa_reference

    p = section("synth", {"synth": {"n_songs": 2, "n_long_songs": 0, "n_iaps": 2, "n_naps": 2, "n_emotic": 2,
                                    "image_width": 32, "image_height": 24}})
    synthesize(p, tmp_path / "c", progress=False)
    clips = []
    for wav in sorted((tmp_path / "c" / "DEAM" / "MEMD_audio").glob("*.wav")):
        y, sr = read_audio(wav)
        assert sr == 44100
        clips += [y[int(s * sr):int(s * sr) + 88200] for s in (16.0, 26.0, 40.0)]
    batch = HandcraftedExtractor(device="cpu")(np.stack(clips))
    ref = np.stack([librosa_reference(c) for c in clips])
    for group, rows in ROW_GROUPS.items():
        a, b = batch[:, rows].ravel(), ref[:, rows].ravel()
        r = np.corrcoef(a, b)[0, 1]
        print(f"{group}: r = {r:.6f}, max |dev| = {np.abs(a - b).max():.4g}")
        assert r >= 0.99, group


def test_arrays_are_reserved_on_disk_and_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    """A sparse memmap written on a full disk dies with SIGBUS (CI saw it); the store reserves each array's
    bytes first, so a full disk is an ImemError naming the file, the size and the free space."""
    import errno
    import os

    from imem.features import store

    arr = store._open_array(tmp_path / "a.npy", np.int16, (64, 1024))
    assert arr.shape == (64, 1024) and not arr.any()
    st = os.stat(tmp_path / "a.npy")
    assert st.st_blocks * 512 >= st.st_size  # allocated, not sparse
    del arr

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "posix_fallocate", full)
    with pytest.raises(ImemError, match=r"cannot reserve 1 MiB for b\.npy under .* MiB free\): No space left"):
        store._open_array(tmp_path / "b.npy", np.uint8, (1024, 1024))


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc (RssFile)")
def test_release_drops_the_mapped_pages_from_the_resident_set_and_keeps_the_data(tmp_path):
    """A pass over a large memory-mapped array keeps every page it touched resident (train transformer_v2 at
    IMEMNet scale: 6.15 GB of its 12.19 GB peak RSS); FeatureStore.release drops them, and the backbone cache
    calls it after each batch."""
    from imem.features.store import FeatureStore
    from imem.training import backbone_cache

    n, width = 512, 65536  # 64 MiB of int16
    wave = (np.arange(n * width, dtype=np.int64) % 20011 - 10000).astype(np.int16).reshape(n, width)
    np.save(tmp_path / "waveform_16000.npy", wave)
    (tmp_path / "manifest.json").write_text(json.dumps({"arrays": {"waveform_16000": [n, width]}}))
    pd.DataFrame({"clip_id": [str(i) for i in range(n)], "song_id": "s", "k": range(n), "row": range(n)}).to_csv(
        tmp_path / "clips.csv", index=False)
    pd.DataFrame({"image_id": [], "row": []}).to_csv(tmp_path / "images.csv", index=False)
    fs = FeatureStore(tmp_path)
    before = _rss_file_kib()
    assert int(fs.array("waveform_16000").sum(dtype=np.int64)) == int(wave.sum(dtype=np.int64))
    touched = _rss_file_kib()
    assert touched - before > 48 * 1024, (before, touched)  # the 64 MiB map is resident after the pass
    fs.release()
    assert touched - _rss_file_kib() > 48 * 1024  # and dropped
    assert np.array_equal(fs.waveform(np.arange(3), 16000).numpy(), wave[:3] / 32768.0)  # the data is still there

    class Fetch:  # the shape of imem.training.Inputs: a callable with the store it reads
        store = fs

        def __call__(self, rows):
            return fs.waveform(rows.numpy(), 16000)

    fs.release()
    rss = []
    bb = torch.nn.Sequential(torch.nn.Linear(width, 2))
    real_release = fs.release
    fs.release = lambda: (rss.append(_rss_file_kib()), real_release())  # noqa: E731 - RssFile before each release
    feats, index = backbone_cache(bb, Fetch(), torch.arange(n), 64, torch.device("cpu"), "t", False)
    assert feats.shape == (n, 2) and len(rss) == n // 64
    assert _rss_file_kib() < before + 16 * 1024  # after the last batch's release: nothing of the 64 MiB left
