"""Handcrafted 193 x 87 per-clip features for the CNN music encoder (CDCML, Zhao et al. 2020).

One 2-s clip at 44.1 kHz (88,200 samples) gives a (193, 87) float32 matrix. Columns are centred STFT
frames (n_fft 2048, hop 1024, zero padding); rows, in this order (see :data:`ROW_GROUPS`):

* 0-39 ``mfcc``: ``librosa.feature.mfcc(n_mfcc=40)``, the DCT-II (ortho) of the dB mel rows below;
* 40-51 ``chroma``: ``chroma_stft`` (power STFT, tuning estimated per clip, inf-norm per frame);
* 52-58 ``contrast``: ``spectral_contrast`` (magnitude STFT, 6 octave bands from 200 Hz + the rest,
  quantile 0.02, ``power_to_db(peak) - power_to_db(valley)`` as librosa does);
* 59-64 ``tonnetz``: ``tonnetz(y=effects.harmonic(y), hop_length=1024)``: HPSS harmonic part, then
  ``chroma_cqt`` (36 bins/octave, 7 octaves from C1, tuning estimated per clip), Harte's projection;
* 65-192 ``mel``: ``power_to_db(melspectrogram(n_mels=128))``, ref 1, amin 1e-10, top_db 80 per clip.

The mel rows are in dB, not raw power: raw mel power spans 10+ decades between silent and loud
bands, which a CNN input layer handles badly; the dB version is also what the MFCCs are the DCT of.

:func:`librosa_reference` is the definition (plain librosa calls, one clip at a time).
:class:`HandcraftedExtractor` / :func:`extract_handcrafted` compute the same thing batched with torch
on CPU or CUDA, reusing librosa's filter banks. MFCC, chroma, contrast and mel follow librosa's
arithmetic step by step (agreement is float rounding, except where a clip's tuning estimate lands in
a neighbouring 0.01 histogram bin). Tonnetz is close but not bit-for-bit, by construction:

* HPSS is exact (same STFT, same 31-tap median filters with scipy's ``reflect`` edges, same soft
  mask) but computed only for STFT bins below :data:`HPSS_FMAX_HZ` (5 kHz; the CQT's highest filter
  reaches ~4.4 kHz), so the harmonic waveform has nothing above that. This matters only through
  chroma_cqt's tuning estimate, whose 10 %-of-frame-maximum threshold sees the whole spectrum in
  librosa (broadband noise can then land on another tuning bin).
* The CQT is computed at the full sample rate with the exact (closed-form) spectra of librosa's
  Hann-windowed, L1-normalised, length-scaled wavelets, instead of librosa's multirate recursion
  (soxr resampling by 2 per octave, kernels sparsified on coarse FFT grids). The two agree to ~0.1 %
  where the signal is; they differ in weak skirts, mostly the low octaves' response to the clip's
  boundary transients (filters up to 1.6 s long), which lifts the chroma floor slightly differently.

Measured agreement and speed are in ``docs/features.md``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import librosa
import numpy as np
import scipy.fft
import torch

from imem.errors import ImemError

SAMPLE_RATE = 44100
CLIP_SECONDS = 2.0
N_FFT = 2048
HOP_LENGTH = 1024
N_MFCC = 40
N_CHROMA = 12
N_CONTRAST_BANDS = 6  # librosa's default; 6 octave bands + the rest = 7 rows
N_TONNETZ = 6
N_MELS = 128
N_FEATURES = N_MFCC + N_CHROMA + (N_CONTRAST_BANDS + 1) + N_TONNETZ + N_MELS  # 193
TOP_DB = 80.0
AMIN = 1e-10

#: row slices of the (193, T) matrix, in order
ROW_GROUPS: dict[str, slice] = {
    "mfcc": slice(0, 40),
    "chroma": slice(40, 52),
    "contrast": slice(52, 59),
    "tonnetz": slice(59, 65),
    "mel": slice(65, 193),
}

# HPSS (librosa.effects.harmonic defaults) and chroma_cqt (librosa.feature.chroma_cqt defaults)
HPSS_HOP = 512
HPSS_KERNEL = 31
CQT_BINS_PER_OCTAVE = 36
CQT_OCTAVES = 7
#: the batched HPSS is computed on STFT bins below this frequency only (see module docstring)
HPSS_FMAX_HZ = 5000.0
TUNING_RESOLUTION = 0.01


class HandcraftedFeatureError(ImemError, ValueError):
    """Bad input to the feature extractor (shape, length, non-finite values); names the clip."""


def n_frames(n_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Frames of a centred STFT: 1 + n // hop (87 for a 2-s clip at 44.1 kHz, hop 1024)."""
    return 1 + n_samples // hop_length


def clip_samples(sr: int = SAMPLE_RATE) -> int:
    return int(round(CLIP_SECONDS * sr))


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------


def librosa_reference(y: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The reference features of one clip with plain librosa calls: float32 (193, n_frames).

    ``y`` is cast to float32 (what ``librosa.load`` returns). All STFT-based features use
    n_fft=2048, hop_length=1024, centred frames with zero padding (librosa >= 0.10 default).

    * mfcc: ``mfcc(y, n_mfcc=40)`` (power_to_db of the 128-band mel power, DCT-II ortho).
    * chroma: ``chroma_stft(y)``, tuning estimated per clip (librosa's default ``tuning=None``).
    * contrast: ``spectral_contrast(y)`` (7 rows, librosa defaults: fmin 200 Hz, quantile 0.02, dB).
    * tonnetz: ``tonnetz(y=effects.harmonic(y), hop_length=1024)``, the common "193 features" recipe
      (harmonic part by median-filter HPSS, then chroma_cqt with its default 36 bins/octave and
      estimated tuning) but at hop 1024 so that it has the same 87 frames as the rest.
    * mel: ``power_to_db(melspectrogram(y, n_mels=128))`` with ref=1.0, amin=1e-10, top_db=80 over
      the clip. dB rather than raw power: raw mel power spans too many decades for a CNN input.

    Pure silence is finite here: mel/MFCC sit at the -100 dB floor, contrast is 0, chroma and tonnetz
    are 0 (librosa's ``util.normalize`` leaves all-zero frames unnormalised).
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1:
        raise HandcraftedFeatureError(f"librosa_reference expects one 1-D clip, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise HandcraftedFeatureError("librosa_reference: clip holds NaN or inf samples")
    kw = {"n_fft": N_FFT, "hop_length": HOP_LENGTH}
    with warnings.catch_warnings():
        # chroma_cqt warns about short low-octave signals; pitch_tuning warns on silence
        warnings.simplefilter("ignore", UserWarning)
        mel_db = librosa.power_to_db(
            librosa.feature.melspectrogram(y=y, sr=sr, n_mels=N_MELS, **kw),
            ref=1.0,
            amin=AMIN,
            top_db=TOP_DB,
        )
        mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=N_MFCC, n_mels=N_MELS, **kw)
        chroma = librosa.feature.chroma_stft(y=y, sr=sr, n_chroma=N_CHROMA, **kw)
        contrast = librosa.feature.spectral_contrast(y=y, sr=sr, n_bands=N_CONTRAST_BANDS, **kw)
        tonnetz = librosa.feature.tonnetz(y=librosa.effects.harmonic(y), sr=sr, hop_length=HOP_LENGTH)
    return np.vstack([mfcc, chroma, contrast, tonnetz, mel_db]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# sliding median (scipy.ndimage.median_filter along one axis, mode="reflect")
# ---------------------------------------------------------------------------------------------------


def _reflect_index(lo: int, hi: int, n: int) -> np.ndarray:
    """Indices lo..hi-1 into an axis of length n with scipy's 'reflect' (d c b a | a b c d | d c b a)."""
    i = np.arange(lo, hi)
    i = np.where(i < 0, -i - 1, i)
    i = np.where(i >= n, 2 * n - 1 - i, i)
    if i.min() < 0 or i.max() >= n:
        raise ValueError(f"median filter wider than the axis ({n})")
    return i


def _oddeven_merge_sort(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network for n (a power of two) inputs: comparators (i, j), i < j."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=4)
def _middle_pair_network(n_in: int) -> tuple[int, np.ndarray]:
    """A comparator network that puts the order statistics h-1 and h (h = n_in // 2, n_in even) of
    n_in inputs on wires h-1 and h: Batcher's sort of the next power of two, with the extra wires fed
    +inf (constant-propagated) and every comparator that cannot reach wires h-1, h pruned.

    Returns (n_wires, ops) with ops rows (kind, i, j): 1 compare-exchange, 2 min only to i, 3 max
    only to j, 0 copy j to i (a comparator against a +inf wire).
    """
    n = 1
    while n < n_in:
        n *= 2
    inf = set(range(n_in, n))
    simple = []
    for i, j in _oddeven_merge_sort(n):
        if j in inf:
            continue  # min(x, inf) = x stays on i, inf stays on j
        if i in inf:  # inf on i, x on j: they swap
            simple.append((0, i, j))
            inf.discard(i)
            inf.add(j)
            continue
        simple.append((1, i, j))
    h = n_in // 2
    need = {h - 1, h}
    ops = []
    for kind, i, j in reversed(simple):
        ni, nj = i in need, j in need
        if kind == 0:
            if ni or nj:
                ops.append((0, i, j))
                need.discard(i)
                need.discard(j)
                if ni:
                    need.add(j)
            continue
        if not (ni or nj):
            continue
        ops.append((1 if ni and nj else 2 if ni else 3, i, j))
        need.update((i, j))
    ops.reverse()
    return n, np.asarray(ops, dtype=np.int64)


try:  # numba is a librosa dependency; without it the torch path below is used (slower on CPU)
    import numba

    @numba.njit(nogil=True, cache=True)
    def _median_axis1_numba(xp, out, ops, n_wires, r_lo, r_hi):  # pragma: no cover - compiled
        """Running median of odd width w = xp.shape[1] - out.shape[1] + 1 along axis 1 of xp (B, L, R),
        columns r_lo..r_hi-1, into out (B, L - w + 1, R). Exact (selects input values).

        Outputs t and t+1 share the w-1 inputs t+1 .. t+w-1. A comparator network (vectorised over a
        block of columns) finds their order statistics s[h-1] <= s[h] (h = (w-1) / 2); the median of
        the shared ones plus one more value x is then min(max(x, s[h-1]), s[h]).
        """
        n_b, length, _ = xp.shape
        n_out = out.shape[1]
        w = length - n_out + 1
        h = (w - 1) // 2
        block = 256
        buf = np.empty((n_wires, block), dtype=xp.dtype)
        inf = np.inf
        n_ops = ops.shape[0]
        for bi in range(n_b):
            for r0 in range(r_lo, r_hi, block):
                rb = min(block, r_hi - r0)
                for t in range(0, n_out, 2):
                    for q in range(w - 1):
                        for r in range(rb):
                            buf[q, r] = xp[bi, t + 1 + q, r0 + r]
                    for q in range(w - 1, n_wires):
                        for r in range(rb):
                            buf[q, r] = inf
                    for o in range(n_ops):
                        kind = ops[o, 0]
                        i = ops[o, 1]
                        j = ops[o, 2]
                        if kind == 1:
                            for r in range(rb):
                                a = buf[i, r]
                                c = buf[j, r]
                                buf[i, r] = a if a < c else c
                                buf[j, r] = c if a < c else a
                        elif kind == 2:
                            for r in range(rb):
                                a = buf[i, r]
                                c = buf[j, r]
                                buf[i, r] = a if a < c else c
                        elif kind == 3:
                            for r in range(rb):
                                a = buf[i, r]
                                c = buf[j, r]
                                buf[j, r] = c if a < c else a
                        else:
                            for r in range(rb):
                                buf[i, r] = buf[j, r]
                    for r in range(rb):
                        lo = buf[h - 1, r]
                        hi = buf[h, r]
                        x = xp[bi, t, r0 + r]
                        v = x if x > lo else lo
                        out[bi, t, r0 + r] = v if v < hi else hi
                        if t + 1 < n_out:
                            x = xp[bi, t + w, r0 + r]
                            v = x if x > lo else lo
                            out[bi, t + 1, r0 + r] = v if v < hi else hi

    @numba.njit(cache=True)
    def _cqt_kernel_values_numba(h0, n_win, centre, scale, width, block_len, delta, out):  # pragma: no cover
        """Same values as :func:`_cqt_kernel_values_numpy`, band by band; along a band h decreases by
        delta per bin, so e^{ih}, e^{iNh} and the phase e^{2ih centre} are updated by fixed rotations
        (float64; the drift over ~2000 steps is ~1e-13). Entries past ``width`` (block padding) are 0."""
        pos = 0
        for k in range(h0.shape[0]):
            n = n_win[k]
            cn = np.cos(np.pi / n)
            sn = np.sin(np.pi / n)
            ph_m = complex(cn, -sn)
            ph_p = complex(cn, sn)
            z1 = np.exp(1j * h0[k])
            r1 = np.exp(-1j * delta)
            zn = np.exp(1j * n * h0[k])
            rn = np.exp(-1j * n * delta)
            zc = np.exp(2j * h0[k] * centre[k])
            rc = np.exp(-2j * delta * centre[k])
            for u in range(width[k]):
                sh = z1.imag
                ch = z1.real
                snh = zn.imag
                den0 = sh
                denp = sh * cn + ch * sn
                denm = sh * cn - ch * sn
                if min(abs(den0), abs(denp), abs(denm)) < 1e-6:  # near a 0/0: no recurrence drift
                    hu = h0[k] - u * delta
                    sh = np.sin(hu)
                    ch = np.cos(hu)
                    snh = np.sin(n * hu)
                    den0 = sh
                    denp = sh * cn + ch * sn
                    denm = sh * cn - ch * sn
                d0 = n if abs(den0) < 1e-12 else snh / den0
                dp = n if abs(denp) < 1e-12 else -snh / denp
                dm = n if abs(denm) < 1e-12 else -snh / denm
                g = (0.5 * d0 + 0.25 * ph_m * dp + 0.25 * ph_p * dm) * zc
                out[pos + u] = g.conjugate() * scale[k]
                z1 *= r1
                zn *= rn
                zc *= rc
            for u in range(width[k], block_len[k]):
                out[pos + u] = 0
            pos += block_len[k]

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False


def _sliding_median(xp: torch.Tensor, w: int) -> torch.Tensor:
    """Median of every width-w (odd) window along axis 1 of a padded (B, L, R) float tensor."""
    if w % 2 != 1:
        raise ValueError(f"median width must be odd, got {w}")
    if xp.device.type == "cpu" and _HAVE_NUMBA and w > 1:
        x = xp.contiguous().numpy()
        n_b, length, n_r = x.shape
        out = np.empty((n_b, length - w + 1, n_r), dtype=x.dtype)
        n_wires, ops = _middle_pair_network(w - 1)
        n_threads = max(1, min(torch.get_num_threads(), n_r // 64))
        edges = np.linspace(0, n_r, n_threads + 1).astype(int)
        if n_threads == 1:
            _median_axis1_numba(x, out, ops, n_wires, 0, n_r)
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                jobs = [
                    pool.submit(_median_axis1_numba, x, out, ops, n_wires, int(a), int(b))
                    for a, b in zip(edges[:-1], edges[1:], strict=True)
                ]
                for job in jobs:
                    job.result()
        return torch.from_numpy(out)
    return xp.unfold(1, w, 1).median(dim=-1).values


# ---------------------------------------------------------------------------------------------------
# batched building blocks (leading batch axis; librosa arithmetic)
# ---------------------------------------------------------------------------------------------------


def _power_to_db(s: torch.Tensor, top_db: float = TOP_DB) -> torch.Tensor:
    """librosa.power_to_db(ref=1.0, amin=1e-10, top_db) with the top_db floor taken per clip."""
    db = 10.0 * torch.log10(torch.clamp(s, min=AMIN))
    peak = db.amax(dim=tuple(range(1, db.ndim)), keepdim=True)
    return torch.maximum(db, peak - top_db)


def _normalize(x: torch.Tensor, norm: float, dim: int) -> torch.Tensor:
    """librosa.util.normalize(norm, axis=dim, threshold=None, fill=None): frames whose norm is below
    the dtype's tiny value are left as they are (so an all-zero frame stays zero, no 0/0)."""
    mag = x.abs()
    length = mag.amax(dim=dim, keepdim=True) if math.isinf(norm) else mag.pow(norm).sum(dim, keepdim=True)
    if not math.isinf(norm) and norm != 1:
        length = length.pow(1.0 / norm)
    tiny = torch.finfo(x.dtype).tiny
    length = torch.where(length < tiny, torch.ones_like(length), length)
    return x / length


def _piptrack_band(sr: int, n_fft: int) -> tuple[int, int]:
    """Bins lo..hi-1 that piptrack (fmin 150 Hz, fmax 4000 Hz) can report, plus one neighbour each side."""
    fft_freqs = np.linspace(0, float(sr) / 2, 1 + n_fft // 2)
    band = np.flatnonzero((fft_freqs >= 150.0) & (fft_freqs < min(4000.0, sr / 2)))
    return int(band[0]) - 1, int(band[-1]) + 2


def _estimate_tuning(
    s_band: torch.Tensor,
    frame_max: torch.Tensor,
    lo: int,
    sr: int,
    n_fft: int,
    bins_per_octave: int,
    edges: np.ndarray,
) -> np.ndarray:
    """librosa.estimate_tuning(S=s) for every clip of a batch, vectorised.

    piptrack: local maxima (along frequency, 150-4000 Hz) of S * (S > 0.1 x frame max), parabolic
    interpolation of their frequency and magnitude; keep the peaks whose magnitude is >= the clip's
    median peak magnitude (np.median); histogram of their residuals to the nearest 1/bins_per_octave
    bin at 0.01 resolution; the left edge of the fullest bin (0.0 when there are no peaks, as librosa).

    s_band: (B, F', T) rows lo.. of S covering :func:`_piptrack_band`; frame_max: (B, 1, T) max of S
    over all frequencies. The arithmetic follows librosa's dtypes (float32 S, float64 residuals).
    """
    b = s_band.shape[0]
    dev = s_band.device
    ref = 0.1 * frame_max
    xm = s_band * (s_band > ref)
    c, left, right = xm[:, 1:-1], xm[:, :-2], xm[:, 2:]
    peaks = (c > left) & (c >= right)  # numba stencil of librosa.util.localmax (interior)
    bi, fi, ti = peaks.nonzero(as_tuple=True)
    tunings = np.zeros(b)
    if bi.numel() == 0:
        return tunings
    sc = s_band[bi, fi + 1, ti]
    s_left = s_band[bi, fi, ti]
    s_right = s_band[bi, fi + 2, ti]
    a = s_right.double() + s_left.double() - 2 * sc.double()  # librosa's stencil promotes to float64
    bb = (s_right - s_left).double() / 2
    shift = torch.where(bb.abs() >= a.abs(), torch.zeros_like(a), -bb / torch.where(a == 0, 1.0, a)).float()
    avg = (s_right - s_left) / 2  # np.gradient (float32)
    mags = sc + (0.5 * avg) * shift
    pitch = ((fi + (lo + 1)).double() + shift.double()) * (float(sr) / n_fft)
    pitch = pitch.float().double()  # piptrack stores float32 pitches
    # per-clip median of the peak magnitudes (np.median: mean of the two middle values if even)
    order = torch.argsort(mags, stable=True)
    order = order[torch.argsort(bi[order], stable=True)]
    msorted = mags[order]
    counts = torch.bincount(bi, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    has = counts > 0
    n = counts.clamp(min=1)
    last = msorted.numel() - 1
    lo_mid = msorted[(starts + (n - 1) // 2).clamp(max=last)]
    hi_mid = msorted[(starts + n // 2).clamp(max=last)]
    thr = torch.where(n % 2 == 1, lo_mid, (lo_mid + hi_mid) / 2)
    keep = mags >= thr[bi]
    resid = torch.remainder(bins_per_octave * torch.log2(pitch[keep] / (440.0 / 16)), 1.0)
    resid = torch.where(resid >= 0.5, resid - 1.0, resid)
    e = torch.as_tensor(edges, dtype=torch.float64, device=dev)
    n_hist = len(edges) - 1
    idx = (torch.searchsorted(e, resid, right=True) - 1).clamp(0, n_hist - 1)
    hist = torch.bincount(bi[keep] * n_hist + idx, minlength=b * n_hist).view(b, n_hist)
    best = torch.argmax(hist, dim=1).cpu().numpy()
    kept = (hist.sum(dim=1) > 0) & has
    return np.where(kept.cpu().numpy(), edges[best], 0.0)


class _Banks:
    """Filter banks and constants for one (sample rate, device), built once and cached."""

    def __init__(self, sr: int, device: torch.device):
        self.sr = sr
        self.device = device
        self.n_samples = clip_samples(sr)
        self.n_frames = n_frames(self.n_samples)
        self.n_bins = 1 + N_FFT // 2
        dev = device
        self.window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=dev)
        self.window64 = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64, device=dev)
        self.mel = torch.as_tensor(librosa.filters.mel(sr=sr, n_fft=N_FFT, n_mels=N_MELS), device=dev)
        dct = scipy.fft.dct(np.eye(N_MELS), type=2, norm="ortho", axis=0)[:N_MFCC]
        self.dct = torch.as_tensor(dct, dtype=torch.float32, device=dev)
        self.edges12 = np.linspace(-0.5, 0.5, int(np.ceil(1.0 / TUNING_RESOLUTION)) + 1)
        self.edges36 = self.edges12
        self._chroma_fb: dict[int, torch.Tensor] = {}
        # spectral contrast: librosa's band rows (same loop as librosa.feature.spectral_contrast)
        freq = librosa.fft_frequencies(sr=sr, n_fft=N_FFT)
        octa = np.zeros(N_CONTRAST_BANDS + 2)
        octa[1:] = 200.0 * (2.0 ** np.arange(0, N_CONTRAST_BANDS + 1))
        self.contrast_bands: list[tuple[int, int, int]] = []
        for k, (f_low, f_high) in enumerate(zip(octa[:-1], octa[1:], strict=True)):
            current = np.logical_and(freq >= f_low, freq <= f_high)
            idx = np.flatnonzero(current)
            if k > 0:
                current[idx[0] - 1] = True
            if k == N_CONTRAST_BANDS:
                current[idx[-1] + 1 :] = True
            rows = np.flatnonzero(current)
            if k < N_CONTRAST_BANDS:
                rows = rows[:-1]
            q = int(np.maximum(np.rint(0.02 * np.sum(current)), 1))
            if not np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)):
                raise AssertionError("contrast band rows are not contiguous")  # pragma: no cover
            self.contrast_bands.append((int(rows[0]), int(rows[-1]) + 1, q))
        # tonnetz: HPSS band, CQT grid, cq->chroma and Harte's projection (taken from librosa itself)
        self.hpss_bins = min(self.n_bins, int(math.ceil(HPSS_FMAX_HZ * N_FFT / sr)))
        self.hpss_rows_in = min(self.n_bins, self.hpss_bins + HPSS_KERNEL // 2)
        self.n_cqt = CQT_OCTAVES * CQT_BINS_PER_OCTAVE
        lengths_max = self._freqs_lengths(-0.5)[1]
        half = int(lengths_max.max() // 2) + 2
        m = 1
        while m * HOP_LENGTH < self.n_samples + half or m < self.n_frames:
            m *= 2
        self.fold_m = m
        self.fft_len = m * HOP_LENGTH
        self._cqt: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # band half-widths, fixed across tunings so that all tunings share one layout: 2 main-lobe
        # half-widths (2 f / Q each) at the highest tuning (librosa's 1 % sparsification keeps ~1.8)
        f_hi, _, q = self._freqs_lengths(0.5)
        self.cqt_half = (np.ceil(2.0 * (2.0 * f_hi / q) * self.fft_len / sr) + 1).astype(np.int64)
        self.cqt_blocks = -(-(2 * self.cqt_half + 1) // m)  # ceil division
        if (self._freqs_lengths(-0.5)[0][0] * self.fft_len / sr - self.cqt_half[0] < 1) or (
            f_hi[-1] * self.fft_len / sr + self.cqt_blocks[-1] * m > self.fft_len // 2
        ):
            raise HandcraftedFeatureError(f"CQT bands do not fit the FFT grid at sr={sr}")
        entry_k = np.repeat(np.arange(self.n_cqt), self.cqt_blocks * m)
        entry_u = np.concatenate([np.arange(p * m) for p in self.cqt_blocks])
        self._entry_k, self._entry_u = entry_k, entry_u
        self._entry_pad = entry_u >= 2 * self.cqt_half[entry_k] + 1
        self.cqt_block_owner = torch.as_tensor(
            np.repeat(np.arange(self.n_cqt), self.cqt_blocks), dtype=torch.int64, device=dev
        )
        cq_to_chroma = librosa.filters.cq_to_chroma(
            self.n_cqt, bins_per_octave=CQT_BINS_PER_OCTAVE, n_chroma=N_CHROMA
        )
        self.cq_to_chroma = torch.as_tensor(cq_to_chroma, dtype=torch.float32, device=dev)
        phi = librosa.feature.tonnetz(chroma=np.eye(N_CHROMA))  # = Harte's 6 x 12 projection
        self.phi = torch.as_tensor(phi, dtype=torch.float32, device=dev)
        self.pip_lo, self.pip_hi = _piptrack_band(sr, N_FFT)
        if self.pip_hi > self.hpss_rows_in:
            raise HandcraftedFeatureError(f"HPSS band below the tuning band at sr={sr}")  # pragma: no cover
        # inverse STFT (hop 512) of a clip: overlap-added squared window, as torch/librosa istft
        t2 = n_frames(self.n_samples, HPSS_HOP)
        self.ola_len = N_FFT + HPSS_HOP * (t2 - 1)
        env = torch.nn.functional.fold(
            (self.window**2).view(1, N_FFT, 1).expand(1, N_FFT, t2),
            output_size=(1, self.ola_len),
            kernel_size=(1, N_FFT),
            stride=(1, HPSS_HOP),
        ).view(-1)[N_FFT // 2 : N_FFT // 2 + self.n_samples]
        tiny = torch.finfo(env.dtype).tiny
        self.ola_inv_env = torch.where(env > tiny, 1.0 / torch.where(env > tiny, env, 1.0), 1.0)

    # -- chroma filter bank per tuning value ----------------------------------------------------------
    def chroma_fb(self, tuning: float) -> torch.Tensor:
        key = int(round(tuning * 1000))
        if key not in self._chroma_fb:
            fb = librosa.filters.chroma(sr=self.sr, n_fft=N_FFT, tuning=tuning, n_chroma=N_CHROMA)
            self._chroma_fb[key] = torch.as_tensor(fb, dtype=torch.float32, device=self.device)
        return self._chroma_fb[key]

    # -- CQT kernels per tuning value ------------------------------------------------------------------
    def _freqs_lengths(self, tuning: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """librosa.vqt's frequencies, full-rate filter lengths and Q for this tuning."""
        fmin = librosa.note_to_hz("C1") * 2.0 ** (tuning / CQT_BINS_PER_OCTAVE)
        freqs = librosa.cqt_frequencies(self.n_cqt, fmin=fmin, bins_per_octave=CQT_BINS_PER_OCTAVE)
        alpha = librosa.filters._relative_bandwidth(freqs=freqs)
        lengths, _ = librosa.filters.wavelet_lengths(
            freqs=freqs, sr=self.sr, window="hann", filter_scale=1, gamma=0, alpha=alpha
        )
        return freqs, lengths, 1.0 / alpha

    def cqt_band_start(self, tuning: float) -> np.ndarray:
        """(K,) first FFT bin of each filter's band for this tuning."""
        freqs = self._freqs_lengths(tuning)[0]
        return np.round(freqs * self.fft_len / self.sr).astype(np.int64) - self.cqt_half

    def cqt_kernels(self, tuning: float) -> tuple[torch.Tensor, torch.Tensor]:
        """FFT bins (nnz,) int32 and weights (nnz,) complex64 conj(G_k) * sqrt(L_k) / sum(w_k) of every
        filter's band, for this tuning (filter k's band: ``cqt_blocks[k]`` blocks of m bins).

        G_k is the exact spectrum (closed form, float64) on the M-point grid of librosa's CQT wavelet
        at the full sample rate: a periodic Hann of N_k = len(arange(-L_k // 2, L_k // 2)) samples
        times exp(2 pi i f_k n / sr), n from floor(-L_k / 2); L1-normalised (sum w = N_k / 2) and
        scaled by sqrt(L_k) (vqt's ``scale=True``). Cached per tuning value (at most 100 values).
        """
        key = int(round(tuning * 1000))
        if key in self._cqt:
            return self._cqt[key]
        freqs, lengths, _ = self._freqs_lengths(tuning)
        start = np.floor(-lengths / 2)
        n_win = np.floor(lengths / 2) - start  # == len(np.arange(-L // 2, L // 2, dtype=float))
        band_start = self.cqt_band_start(tuning)
        fb = band_start[self._entry_k] + self._entry_u
        scale = np.sqrt(lengths) / (n_win / 2.0)
        # h = half the angular frequency offset of a grid bin from f_k, at the band's first bin
        h0 = np.pi * (freqs / self.sr - band_start / self.fft_len)
        if _HAVE_NUMBA:  # fused loop with rotation recurrences along each band: ~1 ms
            g = np.empty(len(fb), dtype=np.complex128)
            _cqt_kernel_values_numba(
                h0,
                n_win,
                start + (n_win - 1) / 2,
                scale,
                2 * self.cqt_half + 1,
                self.cqt_blocks * self.fold_m,
                np.pi / self.fft_len,
                g,
            )
        else:  # same closed form, vectorised numpy: ~10 ms
            g = _cqt_kernel_values_numpy(h0, n_win, start, scale, self._entry_k, self._entry_u, self.fft_len)
            g[self._entry_pad] = 0
        kern = (
            torch.as_tensor(fb.astype(np.int32), device=self.device),
            torch.as_tensor(g.astype(np.complex64), device=self.device),
        )
        self._cqt[key] = kern
        return kern


def _cqt_kernel_values_numpy(h0, n_win, start, scale, k, u, fft_len):
    """conj(G_k) * scale_k on each band entry (filter k[e], offset u[e] from the band start).

    sum_j w_j e^{i x j} = e^{i x (N-1)/2} [0.5 D(x) - 0.25 D(x + 2pi/N) - 0.25 D(x - 2pi/N)] with
    D(y) = e^{-i y (N-1)/2} sum_j e^{i y j} = sin(N y / 2) / sin(y / 2); shifting y by +-2pi/N
    multiplies the phase factor by -e^{-+ i pi/N} and turns the numerator into -sin(N x / 2). Here
    x = 2 h, and the wavelet starts at sample ``start`` (phase e^{i x start}).
    """
    nw = n_win[k]
    h = h0[k] - np.pi * u / fft_len
    sin_h, cos_h = np.sin(h), np.cos(h)
    sin_nh = np.sin(nw * h)
    c_n, s_n = np.cos(np.pi / n_win)[k], np.sin(np.pi / n_win)[k]

    def ratio(numer: np.ndarray, den: np.ndarray) -> np.ndarray:
        small = np.abs(den) < 1e-12  # removable singularity: the Dirichlet kernel's peak, N
        return np.where(small, nw, numer / np.where(small, 1.0, den))

    d0 = ratio(sin_nh, sin_h)
    dp = ratio(-sin_nh, sin_h * c_n + cos_h * s_n)
    dm = ratio(-sin_nh, sin_h * c_n - cos_h * s_n)
    g = 0.5 * d0 + 0.25 * (c_n - 1j * s_n) * dp + 0.25 * (c_n + 1j * s_n) * dm
    g = g * np.exp(2j * h * (start[k] + (nw - 1) / 2))
    return np.conj(g) * scale[k]


@functools.lru_cache(maxsize=8)
def _banks(sr: int, device: str) -> _Banks:
    return _Banks(sr, torch.device(device))


# ---------------------------------------------------------------------------------------------------
# the extractor
# ---------------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HandcraftedFeatureError(f"device={device!s} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class HandcraftedExtractor:
    """Batched (B, 193, 87) handcrafted features, same definition as :func:`librosa_reference`.

    ``device``: "cpu", "cuda", "cuda:1", or None (CUDA if available, else CPU). ``batch_size`` clips
    are processed at a time, so memory stays bounded whatever the number of clips (roughly 15 MB per
    clip in flight on CPU, plus the cached CQT kernels: 1.4 MB per distinct tuning value seen, at most
    100 values). Not thread-safe: use one extractor per thread.
    """

    def __init__(self, sr: int = SAMPLE_RATE, device: str | torch.device | None = None, batch_size: int = 16):
        if batch_size < 1:
            raise HandcraftedFeatureError(f"batch_size must be >= 1, got {batch_size}")
        self.sr = int(sr)
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        self.n_samples = clip_samples(self.sr)
        self.n_frames = n_frames(self.n_samples)
        self._b = _banks(self.sr, str(self.device))
        self._scratch_buf: torch.Tensor | None = None

    # -- public ---------------------------------------------------------------------------------------
    def __call__(self, waves: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
        return self.extract(waves)

    def extract(self, waves: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
        """waves: (B, n_samples) (or one clip (n_samples,)) -> float32 (B, 193, n_frames) numpy."""
        x = self._as_batch(waves)
        out = np.empty((x.shape[0], N_FEATURES, self.n_frames), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start : start + self.batch_size].to(self.device, dtype=torch.float32)
                feats = self._extract_chunk(chunk)
                finite = torch.isfinite(feats).flatten(1).all(dim=1)
                if not bool(finite.all()):
                    bad = start + int(torch.nonzero(~finite)[0])
                    raise HandcraftedFeatureError(f"non-finite handcrafted features for clip {bad}")
                out[start : start + chunk.shape[0]] = feats.cpu().numpy()
        return out

    # -- internals ------------------------------------------------------------------------------------
    def _as_batch(self, waves) -> torch.Tensor:
        if isinstance(waves, torch.Tensor):
            x = waves.detach().to("cpu", dtype=torch.float32)
        else:
            x = torch.as_tensor(np.asarray(waves, dtype=np.float32))
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2 or x.shape[1] != self.n_samples:
            raise HandcraftedFeatureError(
                f"expected clips of shape (B, {self.n_samples}) ({CLIP_SECONDS:g} s at {self.sr} Hz), "
                f"got shape {tuple(np.shape(waves))}"
            )
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            bad = int(torch.nonzero(~finite)[0])
            raise HandcraftedFeatureError(f"clip {bad} holds NaN or inf samples")
        return x

    def _stft(self, x: torch.Tensor, hop: int, double: bool = False) -> torch.Tensor:
        """librosa.stft: periodic Hann, centred, zero padding. ``double``: compute in float64 and round
        to complex64, as librosa does (its float64 window promotes the frames); this matters for the
        spectral-contrast valleys of clean tones, which sit below float32 FFT rounding noise."""
        window = self._b.window64 if double else self._b.window
        spec = torch.stft(
            x.double() if double else x,
            n_fft=N_FFT,
            hop_length=hop,
            window=window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        return spec.to(torch.complex64) if double else spec

    def _extract_chunk(self, x: torch.Tensor) -> torch.Tensor:
        bk = self._b
        spec = self._stft(x, HOP_LENGTH, double=True)  # (b, 1025, T)
        mag = spec.abs()
        power = mag * mag
        mel_db = _power_to_db(torch.matmul(bk.mel, power))
        mfcc = torch.matmul(bk.dct, mel_db)
        chroma = self._chroma_stft(power)
        contrast = self._contrast(mag)
        tonnetz = self._tonnetz(x)
        return torch.cat([mfcc, chroma, contrast, tonnetz, mel_db], dim=1)

    def _chroma_stft(self, power: torch.Tensor) -> torch.Tensor:
        """librosa.feature.chroma_stft: tuning estimated from the power STFT, chroma filter bank of
        that tuning, inf-norm per frame."""
        bk = self._b
        tunings = _estimate_tuning(
            power[:, bk.pip_lo : bk.pip_hi],
            power.amax(dim=1, keepdim=True),
            bk.pip_lo,
            self.sr,
            N_FFT,
            N_CHROMA,
            bk.edges12,
        )
        fb = torch.stack([bk.chroma_fb(t) for t in tunings])  # (b, 12, 1025)
        return _normalize(torch.bmm(fb, power), math.inf, dim=1)

    def _contrast(self, mag: torch.Tensor) -> torch.Tensor:
        """librosa.feature.spectral_contrast on the magnitude: per band, the mean of the q lowest
        (valley) and q highest (peak) bins of each frame, then power_to_db(peak) - power_to_db(valley)
        (librosa applies power_to_db, top_db=80 over the clip, to the magnitudes; so do we)."""
        mag_t = mag.transpose(1, 2).contiguous()  # (b, T, F): bands are contiguous along the last axis
        valleys, peaks = [], []
        for lo, hi, q in self._b.contrast_bands:
            band = mag_t[..., lo:hi]
            if q == 1:
                valleys.append(band.amin(dim=-1).double())
                peaks.append(band.amax(dim=-1).double())
            else:
                low = torch.topk(band, q, dim=-1, largest=False, sorted=False).values
                high = torch.topk(band, q, dim=-1, largest=True, sorted=False).values
                valleys.append(low.double().mean(-1))
                peaks.append(high.double().mean(-1))
        valley = torch.stack(valleys, dim=1)
        peak = torch.stack(peaks, dim=1)
        return (_power_to_db(peak) - _power_to_db(valley)).float()

    def _scratch(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zero-initialised buffer whose bins >= hpss_bins are never written (so stay zero)."""
        buf = self._scratch_buf
        if (
            buf is None
            or buf.shape[0] < shape[0]
            or buf.shape[1:] != shape[1:]
            or buf.device != device
            or buf.is_inference() != torch.is_inference_mode_enabled()
        ):
            buf = self._scratch_buf = torch.zeros(shape, dtype=dtype, device=device)
        return buf[: shape[0]]

    def _stft_tf(self, x: torch.Tensor, hop: int) -> torch.Tensor:
        """Same as :meth:`_stft` (float32) but laid out (b, T, F), frequency contiguous."""
        xp = torch.nn.functional.pad(x, (N_FFT // 2, N_FFT // 2))  # centre, zero padding
        return torch.fft.rfft(xp.unfold(-1, N_FFT, hop) * self._b.window, dim=-1)

    def _harmonic(self, x: torch.Tensor) -> torch.Tensor:
        """librosa.effects.harmonic(y) (n_fft 2048, hop 512, kernel 31, power 2, margin 1), computed on
        the STFT bins below HPSS_FMAX_HZ; the harmonic signal has no content above that band."""
        bk = self._b
        spec = self._stft_tf(x, HPSS_HOP)  # (b, T2, 1025)
        b, t2, n_bins = spec.shape
        kb, kin, w, h = bk.hpss_bins, bk.hpss_rows_in, HPSS_KERNEL, HPSS_KERNEL // 2
        mag = spec[..., :kin].abs()  # (b, T2, kin)
        # vertical (frequency) median -> percussive-enhanced, scipy 'reflect' edges; rows >= kin are
        # only ever needed when kin is the whole spectrum (then they reflect back inside)
        fi = _reflect_index(-h, kb + h, n_bins)
        if fi.max() >= kin:
            raise AssertionError("HPSS band bookkeeping")  # pragma: no cover
        xp = mag.transpose(1, 2).index_select(1, torch.as_tensor(fi, device=x.device))  # (b, kb+2h, T2)
        perc = _sliding_median(xp, w).to(x.device).transpose(1, 2)  # (b, T2, kb)
        # horizontal (time) median -> harmonic-enhanced
        ti = torch.as_tensor(_reflect_index(-h, t2 + h, t2), device=x.device)
        harm = _sliding_median(mag[..., :kb].index_select(1, ti), w).to(x.device)  # (b, T2, kb)
        # librosa.util.softmask(harm, perc, power=2, split_zeros=True)
        z = torch.maximum(harm, perc)
        bad = z < torch.finfo(z.dtype).tiny
        z = torch.where(bad, torch.ones_like(z), z)
        mh = (harm / z) ** 2
        mp = (perc / z) ** 2
        mask = torch.where(bad, torch.full_like(z, 0.5), mh / torch.where(bad, 1.0, mh + mp))
        # inverse STFT with torch.istft / librosa.istft arithmetic: irfft (bins >= kb are zero),
        # window, overlap-add (hop = n_fft / 4: sum of four shifted quarter-frames), divide by the
        # overlap-added squared window, drop the centring pad
        full = self._scratch(spec.shape, spec.dtype, x.device)  # zeros beyond kb, reused across chunks
        torch.mul(spec[..., :kb], mask, out=full[..., :kb])
        frames = torch.fft.irfft(full, n=N_FFT, dim=-1) * bk.window  # (b, T2, 2048)
        n_q = N_FFT // HPSS_HOP
        quarters = frames.view(b, t2, n_q, HPSS_HOP)
        ola = torch.zeros(b, t2 + n_q - 1, HPSS_HOP, dtype=frames.dtype, device=x.device)
        for q in range(n_q):
            ola[:, q : q + t2] += quarters[:, :, q]
        y = ola.view(b, -1)[:, N_FFT // 2 : N_FFT // 2 + x.shape[1]]
        return y * bk.ola_inv_env

    def _tonnetz(self, x: torch.Tensor) -> torch.Tensor:
        """librosa.feature.tonnetz(y=librosa.effects.harmonic(y), hop_length=1024)."""
        bk = self._b
        yh = self._harmonic(x)
        # chroma_cqt's tuning: estimate_tuning(y=yh, bins_per_octave=36) (magnitude STFT, hop 512).
        # yh has no content above the HPSS band, so the frame maximum is taken below it.
        mag = self._stft_tf(yh, HPSS_HOP)[..., : bk.hpss_rows_in].abs().transpose(1, 2)
        tunings = _estimate_tuning(
            mag[:, bk.pip_lo : bk.pip_hi],
            mag.amax(dim=1, keepdim=True),
            bk.pip_lo,
            self.sr,
            N_FFT,
            CQT_BINS_PER_OCTAVE,
            bk.edges36,
        )
        cqt = self._cqt(yh, tunings)  # (b, 252, T)
        chroma = _normalize(torch.matmul(bk.cq_to_chroma, cqt), math.inf, dim=1)
        return torch.matmul(bk.phi, _normalize(chroma, 1.0, dim=1))

    def _cqt(self, yh: torch.Tensor, tunings: np.ndarray) -> torch.Tensor:
        """|CQT| at hop 1024 of each clip: full sample rate, exact wavelet spectra, folded IFFT.

        For filter g_k the response at frame t is r_k[t] = sum_n y[n] conj(g_k[n - t*hop]). On an
        M-point FFT grid (M = m * hop, long enough that nothing wraps) its samples at multiples of hop
        are the m-point IFFT of Y * conj(G_k) folded modulo m. G_k is non-zero only in a narrow band,
        so the fold is: take the band in blocks of m bins and add the blocks. (Starting the blocks at
        the band edge instead of at a multiple of m only rotates the folded array, i.e. multiplies
        r_k by a unit phase, which the magnitude drops.)
        """
        bk = self._b
        b = yh.shape[0]
        m, n_k = bk.fold_m, bk.n_cqt
        spec = torch.fft.rfft(torch.nn.functional.pad(yh, (0, bk.fft_len - yh.shape[1])))  # (b, M/2+1)
        prod = torch.empty(b, bk.cqt_block_owner.numel() * m, dtype=spec.dtype, device=yh.device)
        for i, tuning in enumerate(tunings):
            bins, weight = bk.cqt_kernels(tuning)
            torch.mul(spec[i].index_select(0, bins), weight, out=prod[i])
        blocks = torch.view_as_real(prod).view(b, -1, m, 2)
        acc = torch.zeros(b, n_k, m, 2, dtype=blocks.dtype, device=yh.device)
        acc.index_add_(1, bk.cqt_block_owner, blocks)
        resp = torch.fft.ifft(torch.view_as_complex(acc), dim=-1)[..., : self.n_frames] / HOP_LENGTH
        return resp.abs()


def extract_handcrafted(
    waves: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    sr: int = SAMPLE_RATE,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Batched handcrafted features: (B, n_samples) clips -> float32 (B, 193, 87). See the module doc."""
    return HandcraftedExtractor(sr=sr, device=device, batch_size=batch_size).extract(waves)
