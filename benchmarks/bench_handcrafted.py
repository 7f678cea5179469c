"""Benchmark: per-clip librosa reference vs the batched torch extractor (imem.features.handcrafted).

Builds N synthetic 2-s clips (tones, chords, noise, clicks, chirps, AM tones, harmonic tones, at random
pitches and levels), times ``librosa_reference`` on a subset (per clip, extrapolated), times
``HandcraftedExtractor`` on all N in the same process, and prints clips/s for both, the speed-up, the
per-group agreement on the subset (Pearson r, max |deviation|) and the peak RSS.

    .venv/bin/python benchmarks/bench_handcrafted.py --clips 256 --batch-size 32 --device cpu

torch's thread count is left at its default.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imem.features.handcrafted import (  # noqa: E402
    ROW_GROUPS,
    SAMPLE_RATE,
    HandcraftedExtractor,
    clip_samples,
    librosa_reference,
)

KINDS = ("tone", "chord", "white", "pink", "clicks", "chirp", "am", "harmonic")


def synth_clips(n: int, seed: int, sr: int = SAMPLE_RATE) -> tuple[np.ndarray, list[str]]:
    """n synthetic clips (float32, (n, 2*sr)), cycling through KINDS with random parameters."""
    rng = np.random.default_rng(seed)
    ns = clip_samples(sr)
    t = np.arange(ns) / sr
    out = np.empty((n, ns), dtype=np.float32)
    kinds = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        f0 = 55.0 * 2 ** rng.uniform(0, 5)  # A1 .. A6
        level = 10 ** rng.uniform(-1.5, -0.3)
        if kind == "tone":
            y = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
        elif kind == "chord":
            y = sum(np.sin(2 * np.pi * f0 * 2 ** (s / 12) * t) for s in (0, 4, 7, 11)) / 4
        elif kind == "white":
            y = rng.standard_normal(ns)
        elif kind == "pink":
            spec = np.fft.rfft(rng.standard_normal(ns))
            f = np.fft.rfftfreq(ns)
            spec[1:] /= np.sqrt(f[1:])
            spec[0] = 0
            y = np.fft.irfft(spec, n=ns)
        elif kind == "clicks":
            y = np.zeros(ns)
            for s in rng.integers(0, ns - 500, size=rng.integers(4, 16)):
                y[s : s + 500] += rng.standard_normal(500) * np.exp(-np.arange(500) / rng.uniform(20, 120))
        elif kind == "chirp":
            f1 = f0 * 2 ** rng.uniform(1, 4)
            y = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * t[-1]) * t**2))
        elif kind == "am":
            y = (1 + 0.9 * np.sin(2 * np.pi * rng.uniform(1, 12) * t)) * np.sin(2 * np.pi * f0 * t)
        else:  # harmonic: a sawtooth-like tone with vibrato
            vib = 1 + 0.005 * np.sin(2 * np.pi * 5.5 * t)
            phase = 2 * np.pi * f0 * np.cumsum(vib) / sr
            y = sum(np.sin(k * phase) / k for k in range(1, 12))
        y = y / (np.max(np.abs(y)) + 1e-12) * level
        out[i] = y.astype(np.float32)
        kinds.append(kind)
    return out, kinds


def agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, dict[str, float]]:
    res = {}
    for name, sl in ROW_GROUPS.items():
        a, b = ref[:, sl].ravel().astype(np.float64), got[:, sl].ravel().astype(np.float64)
        res[name] = {"r": float(np.corrcoef(a, b)[0, 1]), "max_abs_dev": float(np.max(np.abs(a - b)))}
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=256, help="clips for the batched extractor (default 256)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--ref-clips", type=int, default=16, help="clips for the per-clip librosa reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    waves, _ = synth_clips(args.clips, args.seed)
    n_ref = min(args.ref_clips, args.clips)

    librosa_reference(waves[-1])  # librosa's own first-call costs (numba cache loads) are not timed
    t0 = time.perf_counter()
    ref = np.stack([librosa_reference(w) for w in waves[:n_ref]])
    t_ref = (time.perf_counter() - t0) / n_ref

    # first use in a process: numba compile (or cache load) of the median filter, filter banks
    t0 = time.perf_counter()
    HandcraftedExtractor(device=args.device, batch_size=args.batch_size).extract(waves[:1])
    t_warm = time.perf_counter() - t0

    ext = HandcraftedExtractor(device=args.device, batch_size=args.batch_size)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = ext.extract(waves)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t_batch = (time.perf_counter() - t0) / args.clips

    agree = agreement(ref, feats[:n_ref])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result = {
        "clips": args.clips,
        "ref_clips": n_ref,
        "batch_size": args.batch_size,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "reference_clips_per_s": 1.0 / t_ref,
        "batched_clips_per_s": 1.0 / t_batch,
        "speedup": t_ref / t_batch,
        "reference_ms_per_clip": 1000 * t_ref,
        "batched_ms_per_clip": 1000 * t_batch,
        "first_use_s": t_warm,
        "tuning_values_cached": len(ext._b._cqt),
        "peak_rss_mb": rss_mb,
        "agreement": agree,
    }
    print(
        f"device={args.device} torch_threads={torch.get_num_threads()} clips={args.clips} "
        f"batch_size={args.batch_size} ref_clips={n_ref}"
    )
    print(f"librosa reference : {1.0 / t_ref:8.2f} clips/s  ({1000 * t_ref:.1f} ms/clip)")
    print(f"batched extractor : {1.0 / t_batch:8.2f} clips/s  ({1000 * t_batch:.2f} ms/clip)")
    print(
        f"speed-up          : {t_ref / t_batch:8.1f} x   (first use in the process: {t_warm:.2f} s, "
        f"not included)"
    )
    print(f"peak RSS          : {rss_mb:8.0f} MB")
    print("agreement with librosa_reference on the reference clips:")
    for name, a in agree.items():
        print(f"  {name:9s} r = {a['r']:.6f}   max |dev| = {a['max_abs_dev']:.4g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
