"""sigma + pair construction at IMEMNet scale (25,620 images x 35,817 clips, every distance).

Generates the label-only embedded corpus (IMEMNet-scale annotations, no media), loads it through the
same loaders as the real corpora, then times, each in a fresh child process so peak RSS is the step's
own (torch import included, reported separately):

* imem: ``sample_pairs`` -- exact sigma over all 917,634,600 clip x image pairs and, per clip, the top /
  bottom / random images of its split, in one chunked pass;
* baseline: a straightforward per-clip NumPy loop (distances to every image, argsort, random draw),
  timed on ``--baseline-clips`` clips and extrapolated linearly to all clips.

Goal (issue 2): <= 10 s and <= 2 GB peak RSS on 2 cores.

    python benchmarks/bench_pairs.py [--baseline-clips 400] [--chunk-size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _child(kind: str, data: Path, n: int, chunk: int) -> None:
    t_imp = time.perf_counter()
    import pandas as pd

    from imem.data.pairs import sample_pairs

    clips = pd.read_pickle(data / "clips.pkl")
    images = pd.read_pickle(data / "images.pkl")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_imp = time.perf_counter() - t_imp
    t0 = time.perf_counter()
    if kind == "imem":
        out = sample_pairs(clips, images, seed=0, chunk_size=chunk, progress=False)
        result = {"sigma": out.sigma, "pairs": {k: len(v) for k, v in out.pairs.items()}}
    else:
        rng = np.random.default_rng(0)
        img_va = images[["valence", "arousal"]].to_numpy()
        img_split = images["split"].to_numpy()
        total, count = 0.0, 0
        sub = clips.iloc[:n]
        for va, split in zip(sub[["valence", "arousal"]].to_numpy(), sub["split"], strict=True):
            d = np.sqrt(((img_va - va) ** 2).sum(axis=1))
            total += d.sum()
            count += len(d)
            pool = np.nonzero(img_split == split)[0]
            order = np.argsort(d[pool])
            chosen = set(pool[order[:10]]) | set(pool[order[-10:]])
            rest = np.setdiff1d(pool, np.fromiter(chosen, dtype=np.int64))
            rng.choice(rest, size=30, replace=False)
        result = {"mean_distance_subset": total / count}
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": dt, "peak_rss_mb": peak, "import_rss_mb": base_rss, "load_s": t_imp, **result}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-clips", type=int, default=400)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]), args.baseline_clips, args.chunk_size)
        return

    from imem.data.prepare import assign_splits, load_items
    from imem.data.synth import synthesize
    from imem.params import section

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        synthesize(section("synth"), tmp / "corpus", labels_only=True, progress=False)
        t_synth = time.perf_counter() - t
        p = section("prepare", {"prepare": {"corpus_root": str(tmp / "corpus"), "check_media": False}})
        t = time.perf_counter()
        clips, images, _ = load_items(p)
        assign_splits(clips, images, p)
        t_load = time.perf_counter() - t
        clips.to_pickle(tmp / "clips.pkl")
        images.to_pickle(tmp / "images.pkl")
        print(f"label-only embedded corpus: {len(clips):,} clips, {len(images):,} images "
              f"({len(clips) * len(images):,} pairs); generated in {t_synth:.1f} s, loaded in {t_load:.1f} s")

        def run(kind):
            r = subprocess.run([sys.executable, __file__, "--child", kind, str(tmp),
                                "--baseline-clips", str(args.baseline_clips), "--chunk-size", str(args.chunk_size)],
                               capture_output=True, text=True, check=True)
            return json.loads(r.stdout.strip().splitlines()[-1])

        imem = run("imem")
        base = run("baseline")
    per_clip = base["seconds"] / args.baseline_clips
    base_total = per_clip * len(clips)
    print(f"threads: torch default on {os.cpu_count()} cores")
    print(f"imem sample_pairs (sigma + pairs, all clips): {imem['seconds']:.2f} s, "
          f"peak RSS {imem['peak_rss_mb']:.0f} MB (of which {imem['import_rss_mb']:.0f} MB imports + tables)")
    print(f"  sigma = {imem['sigma']:.6f}; pairs per split: {imem['pairs']}")
    print(f"baseline per-clip loop: {per_clip * 1000:.1f} ms/clip on {args.baseline_clips} clips -> "
          f"{base_total:.0f} s extrapolated to {len(clips):,} clips")
    print(f"speed-up: {base_total / imem['seconds']:.1f}x; goal <= 10 s: "
          f"{'met' if imem['seconds'] <= 10 else 'NOT met'}; goal <= 2048 MB: "
          f"{'met' if imem['peak_rss_mb'] <= 2048 else 'NOT met'}")


if __name__ == "__main__":
    main()
