"""Batched handcrafted features (imem.features.handcrafted) against the per-clip librosa reference."""

from __future__ import annotations

import warnings

import librosa
import numpy as np
import pytest
import scipy.ndimage
import torch

from imem.features import handcrafted as hc
from imem.features.handcrafted import (
    N_FEATURES,
    ROW_GROUPS,
    HandcraftedExtractor,
    extract_handcrafted,
    librosa_reference,
)

SR = 44100
N = 88200
T = 87


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20201012)
    t = np.arange(N) / SR
    sig: dict[str, np.ndarray] = {}
    for f in (110.0, 261.63, 440.0, 1000.0, 3000.0):
        sig[f"tone_{f:g}"] = 0.5 * np.sin(2 * np.pi * f * t)
    sig["tone_detuned"] = 0.5 * np.sin(2 * np.pi * 440.0 * 2 ** (0.3 / 12) * t)
    sig["chord_Cmaj"] = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0))
    sig["chord_Am7"] = sum(0.2 * np.sin(2 * np.pi * f * t) for f in (220.0, 261.63, 329.63, 392.0))
    sig["white"] = 0.1 * rng.standard_normal(N)
    spec = np.fft.rfft(rng.standard_normal(N))
    spec[1:] /= np.sqrt(np.fft.rfftfreq(N)[1:])
    spec[0] = 0
    pink = np.fft.irfft(spec, n=N)
    sig["pink"] = 0.1 * pink / pink.std()
    clicks = np.zeros(N)
    clicks[::11025] = 1.0
    sig["clicks"] = clicks
    bursts = np.zeros(N)
    for s in range(0, N, 8820):
        bursts[s : s + 441] = rng.standard_normal(441) * np.exp(-np.arange(441) / 80)
    sig["bursts"] = bursts
    sig["chirp"] = 0.4 * np.sin(2 * np.pi * (100 * t + (4000 - 100) / 4 * t**2))
    sig["am_tone"] = 0.5 * (1 + 0.8 * np.sin(2 * np.pi * 4 * t)) * np.sin(2 * np.pi * 523.25 * t)
    sig["harmonic_tone"] = sum(0.3 / k * np.sin(2 * np.pi * 196 * k * t) for k in range(1, 8))
    return {k: v.astype(np.float32) for k, v in sig.items()}


SIGNALS = _signals()
NAMES = list(SIGNALS)


@pytest.fixture(scope="module")
def waves() -> np.ndarray:
    return np.stack([SIGNALS[n] for n in NAMES])


@pytest.fixture(scope="module")
def reference(waves) -> np.ndarray:
    return np.stack([librosa_reference(w) for w in waves])


@pytest.fixture(scope="module")
def batched(waves) -> np.ndarray:
    return HandcraftedExtractor(device="cpu", batch_size=8).extract(waves)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


# --- shape, layout -----------------------------------------------------------------------------------


def test_shapes_and_dtype(batched, reference):
    assert batched.shape == (len(NAMES), N_FEATURES, T) == (len(NAMES), 193, 87)
    assert batched.dtype == np.float32
    assert reference.shape == batched.shape and reference.dtype == np.float32
    assert np.isfinite(batched).all()


def test_row_groups_partition_the_rows_in_order():
    order = ["mfcc", "chroma", "contrast", "tonnetz", "mel"]
    assert list(ROW_GROUPS) == order
    sizes = [40, 12, 7, 6, 128]
    start = 0
    for name, size in zip(order, sizes, strict=True):
        assert ROW_GROUPS[name] == slice(start, start + size)
        start += size
    assert start == N_FEATURES


def test_row_order_matches_each_librosa_call_alone(batched):
    """Each row group of the batched output against the matching librosa call on its own."""
    i = NAMES.index("chord_Am7")
    y = SIGNALS["chord_Am7"]
    kw = {"n_fft": 2048, "hop_length": 1024}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        alone = {
            "mfcc": librosa.feature.mfcc(y=y, sr=SR, n_mfcc=40, **kw),
            "chroma": librosa.feature.chroma_stft(y=y, sr=SR, **kw),
            "contrast": librosa.feature.spectral_contrast(y=y, sr=SR, **kw),
            "tonnetz": librosa.feature.tonnetz(y=librosa.effects.harmonic(y), sr=SR, hop_length=1024),
            "mel": librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=SR, n_mels=128, **kw)),
        }
    tol = {"mfcc": 1e-2, "chroma": 1e-4, "contrast": 1e-3, "tonnetz": 0.05, "mel": 1e-2}
    for name, sl in ROW_GROUPS.items():
        got = batched[i, sl]
        assert got.shape == alone[name].shape, name
        np.testing.assert_allclose(got, alone[name], atol=tol[name], rtol=0, err_msg=name)
        # one row off would not match (guards against an off-by-one in the layout)
        lo = sl.start + 1 if sl.stop < N_FEATURES else sl.start - 1
        shifted = batched[i, lo : lo + (sl.stop - sl.start)]
        assert not np.allclose(shifted, alone[name], atol=tol[name]), name


# --- agreement with the reference ------------------------------------------------------------------

# (minimum Pearson r over all signals, maximum |deviation| over all signals and frames)
# MFCC/mel/contrast follow librosa's arithmetic (float rounding only; mel and contrast in dB).
# chroma: also float rounding, except that a per-clip tuning estimate may land one 0.01 histogram bin
# away (ties and bin edges under float32 vs float64 FFT rounding), shifting the chroma filters.
# tonnetz: not bit-exact by construction (full-rate CQT with exact wavelet spectra instead of
# librosa's multirate soxr-resampled, sparsified CQT; HPSS only below 5 kHz); measured r ~ 0.99997,
# max |dev| ~ 0.045 on these signals (tonnetz values lie in [-1, 1]).
BOUNDS = {
    "mfcc": (0.99999, 0.01),
    "chroma": (0.9999, 0.05),
    "contrast": (0.99999, 0.01),
    "tonnetz": (0.999, 0.1),
    "mel": (0.99999, 0.01),
}


@pytest.mark.parametrize("group", list(ROW_GROUPS))
def test_agreement_with_reference(group, batched, reference):
    sl = ROW_GROUPS[group]
    r_min, dev_max = BOUNDS[group]
    r = _pearson(reference[:, sl], batched[:, sl])
    dev = float(np.abs(reference[:, sl] - batched[:, sl]).max())
    print(f"{group}: r={r:.6f} max|dev|={dev:.4g}")
    assert r >= r_min, (group, r)
    assert dev <= dev_max, (group, dev)


@pytest.mark.parametrize("group", list(ROW_GROUPS))
def test_agreement_per_signal(group, batched, reference):
    """Per signal, r >= 0.99 wherever the reference group is not (near) constant."""
    sl = ROW_GROUPS[group]
    for i, name in enumerate(NAMES):
        ref, got = reference[i, sl], batched[i, sl]
        if ref.std() < 1e-3:  # e.g. tonnetz of clicks: no harmonic part, all zeros on both sides
            np.testing.assert_allclose(got, ref, atol=BOUNDS[group][1], err_msg=f"{group} {name}")
            continue
        assert _pearson(ref, got) >= 0.99, (group, name, _pearson(ref, got))


# --- building blocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_numba", [True, False])
@pytest.mark.parametrize("length", [173, 40, 31])
def test_sliding_median_equals_scipy_reflect(monkeypatch, use_numba, length):
    rng = np.random.default_rng(1)
    x = (rng.random((3, length, 300)) ** 3).astype(np.float32)
    x[1, 5:30, 7] = 0.25  # ties
    x[2, :, 11] = 0.0  # a constant column
    if not use_numba:
        monkeypatch.setattr(hc, "_HAVE_NUMBA", False)
    idx = hc._reflect_index(-15, length + 15, length)
    got = hc._sliding_median(torch.from_numpy(x[:, idx]), 31).numpy()
    want = scipy.ndimage.median_filter(x, size=(1, 31, 1), mode="reflect")
    np.testing.assert_array_equal(got, want)


def test_cqt_kernels_numba_equal_numpy(monkeypatch):
    banks = hc._Banks(SR, torch.device("cpu"))  # a private instance: its kernel cache starts empty
    bins_a, w_a = banks.cqt_kernels(0.27)
    banks._cqt.clear()
    monkeypatch.setattr(hc, "_HAVE_NUMBA", False)
    bins_b, w_b = banks.cqt_kernels(0.27)
    assert torch.equal(bins_a, bins_b)
    assert float((w_a - w_b).abs().max()) < 1e-6 * float(w_b.abs().max())


def test_without_numba_same_features(monkeypatch, waves, batched):
    """The pure-torch path (used on CUDA, or without numba) gives the same features."""
    monkeypatch.setattr(hc, "_HAVE_NUMBA", False)
    got = HandcraftedExtractor(device="cpu", batch_size=8).extract(waves[6:8])
    np.testing.assert_allclose(got, batched[6:8], atol=1e-3, rtol=0)


@pytest.mark.parametrize("cents", [0.0, 23.0, -41.0])
def test_tuning_estimate_matches_librosa(cents):
    t = np.arange(N) / SR
    y = sum(np.sin(2 * np.pi * f * 2 ** (cents / 1200) * t) for f in (220.0, 330.0, 440.0))
    y = y.astype(np.float32)
    ex = HandcraftedExtractor(device="cpu")
    bk = ex._b
    spec = ex._stft(torch.from_numpy(y)[None], 1024, double=True)
    power = spec.abs() ** 2
    for bpo, edges in ((12, bk.edges12), (36, bk.edges36)):
        got = hc._estimate_tuning(
            power[:, bk.pip_lo : bk.pip_hi], power.amax(dim=1, keepdim=True), bk.pip_lo, SR, 2048, bpo, edges
        )[0]
        S = np.abs(librosa.stft(y, n_fft=2048, hop_length=1024)) ** 2
        want = librosa.estimate_tuning(S=S, sr=SR, bins_per_octave=bpo)
        assert got == pytest.approx(want, abs=0.0101), (bpo, got, want)


def test_cqt_matches_librosa_cqt():
    y = (SIGNALS["chord_Am7"] + 0.3 * SIGNALS["tone_110"] + 0.05 * SIGNALS["white"]).astype(np.float32)
    ex = HandcraftedExtractor(device="cpu")
    for tuning in (0.0, 0.17):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            want = np.abs(
                librosa.cqt(y, sr=SR, hop_length=1024, n_bins=252, bins_per_octave=36, tuning=tuning)
            )
        got = ex._cqt(torch.from_numpy(y)[None], np.array([tuning]))[0].numpy()
        assert got.shape == want.shape
        assert _pearson(want, got) > 0.9999
        # librosa low octaves come from soxr-resampled signals; the skirts of its filters differ a little
        assert np.abs(got - want).max() < 0.02 * want.max()


def test_harmonic_matches_librosa_below_5khz():
    y = SIGNALS["chord_Cmaj"] + SIGNALS["bursts"]
    ex = HandcraftedExtractor(device="cpu")
    got = ex._harmonic(torch.from_numpy(y)[None])[0].numpy()
    want = librosa.effects.harmonic(y)
    band = slice(0, 200)  # below ~4.3 kHz
    s_got = np.abs(librosa.stft(got))[band]
    s_want = np.abs(librosa.stft(want))[band]
    assert _pearson(s_want, s_got) > 0.999


# --- batching, determinism, guards ---------------------------------------------------------------


def test_batch_vs_single_clip(waves, batched):
    sub = waves[:6]
    one_by_one = np.concatenate([extract_handcrafted(w[None], device="cpu") for w in sub])
    uneven = HandcraftedExtractor(device="cpu", batch_size=4).extract(sub)  # chunks of 4 + 2
    # float rounding only (BLAS blocking depends on the batch shape)
    np.testing.assert_allclose(one_by_one, batched[:6], atol=1e-3, rtol=0)
    np.testing.assert_allclose(uneven, batched[:6], atol=1e-3, rtol=0)
    one = HandcraftedExtractor(device="cpu").extract(waves[2])  # a single 1-D clip is a batch of one
    assert one.shape == (1, 193, 87)


def test_deterministic(waves):
    ex = HandcraftedExtractor(device="cpu", batch_size=3)
    a = ex.extract(waves[:5])
    b = ex.extract(waves[:5])
    c = HandcraftedExtractor(device="cpu", batch_size=3).extract(waves[:5])
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_silence_is_finite_and_matches_librosa():
    """librosa on silence: mel/MFCC at the -100 dB floor, contrast 0, chroma and tonnetz 0 (its
    util.normalize leaves all-zero frames as they are instead of dividing 0 by 0). Same here."""
    rng = np.random.default_rng(5)
    clips = np.zeros((3, N), dtype=np.float32)
    clips[1, 40000] = 1.0  # a single impulse
    clips[2] = 1e-20 * rng.standard_normal(N)  # far below float32 power resolution
    got = extract_handcrafted(clips, device="cpu")
    assert np.isfinite(got).all()
    ref = np.stack([librosa_reference(c) for c in clips])
    assert np.isfinite(ref).all()
    for group, sl in ROW_GROUPS.items():
        np.testing.assert_allclose(got[:, sl], ref[:, sl], atol=BOUNDS[group][1], rtol=0, err_msg=group)
    silent = got[0]
    np.testing.assert_allclose(silent[ROW_GROUPS["mel"]], -100.0, atol=1e-4)
    assert np.all(silent[ROW_GROUPS["chroma"]] == 0) and np.all(silent[ROW_GROUPS["tonnetz"]] == 0)
    assert np.all(silent[ROW_GROUPS["contrast"]] == 0)


def test_wrong_length_raises_naming_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 88199\)"):
        extract_handcrafted(np.zeros((2, N - 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(1, 2, 88200\)"):
        extract_handcrafted(np.zeros((1, 2, N), dtype=np.float32))
    with pytest.raises(ValueError, match="88200"):
        librosa_reference(np.zeros((2, N), dtype=np.float32))


def test_non_finite_input_raises_naming_the_clip():
    clips = np.zeros((4, N), dtype=np.float32)
    clips[2, 17] = np.nan
    with pytest.raises(ValueError, match="clip 2"):
        extract_handcrafted(clips)
    clips[2, 17] = 0.0
    clips[3, 5] = np.inf
    with pytest.raises(ValueError, match="clip 3"):
        extract_handcrafted(clips)


def test_non_finite_output_raises_naming_the_clip(monkeypatch, waves):
    ex = HandcraftedExtractor(device="cpu", batch_size=2)
    real = ex._extract_chunk
    calls = []

    def poisoned(x):
        out = real(x)
        calls.append(1)
        if len(calls) == 2:  # second chunk = clips 2, 3
            out[1, 60, 4] = float("nan")
        return out

    monkeypatch.setattr(ex, "_extract_chunk", poisoned)
    with pytest.raises(ValueError, match="clip 3"):
        ex.extract(waves[:4])


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        HandcraftedExtractor(batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            HandcraftedExtractor(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(waves, batched):
    got = HandcraftedExtractor(device="cuda", batch_size=8).extract(waves)
    np.testing.assert_allclose(got, batched, atol=1e-2, rtol=0)
