"""Chunked search over a large cached collection vs one forward pass per (query, item) pair.

Builds a synthetic collection of ``--items`` (default 1,000,000) image embeddings in the very cache layout
``imem retrieve`` uses (imem.retrieval.EmbeddingCache: shards of 4,096 rows holding f, VA and the sim
decoder's first-layer projection, an sqlite index), with a matching model's decoder (``--model``, default
models/cnn; a randomly initialised `cnn` variant from params.yaml if that is absent). Then, in the same run:

* chunked search for one music query, ranked by embedding distance and by predicted similarity
  (imem.retrieval.search, ``--chunk-size`` rows per chunk), time and peak resident memory;
* the naive baselines, timed on a sample of pairs and extrapolated to the whole collection:
  (a) the similarity decoder called once per pair on cached embeddings, (b) the whole model (both
  backbones, heads, decoder) once per pair, as a retrieval system without an embedding cache would run;
* the memory all embeddings would take at once.

Top-k agreement with a full (non-chunked) ranking is checked on the first chunk-sized slice.

    python benchmarks/bench_retrieval.py [--items 1000000] [--chunk-size 16384] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def rss_mb() -> tuple[float, float]:
    """(current, peak since the last reset) resident set size in MB (Linux /proc)."""
    cur = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def load(model_dir: str):
    from imem.inference import LoadedModel, load_model, weights_key
    from imem.models.matching import build_model
    from imem.params import section
    from imem.training import variant_config

    if (Path(model_dir) / "best.pt").is_file():
        return load_model(model_dir)
    cfg = variant_config(section("train"), "cnn")
    model = build_model(cfg).eval()
    return LoadedModel(model, cfg, "random cnn", weights_key(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--chunk-size", type=int, default=16384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--model", default="models/cnn")
    ap.add_argument("--dir", help="parent folder of the synthetic cache (a temporary folder in it, removed after; "
                                  "default: the system's temporary folder)")
    ap.add_argument("--pairs", type=int, default=2000, help="pairs timed for the per-pair decoder baseline")
    ap.add_argument("--full-pairs", type=int, default=3, help="pairs timed for the whole-model baseline")
    args = ap.parse_args()

    from imem.retrieval import SHARD_ROWS, Collection, EmbeddingCache, SplitSim, search, squared_distances

    torch.manual_seed(0)
    loaded = load(args.model)
    model, split = loaded.model, SplitSim(loaded.model)
    d, h = int(loaded.cfg["embed_dim"]), split.bias.shape[0]
    root = Path(tempfile.mkdtemp(prefix="imem-bench-", dir=args.dir))
    print(f"model {loaded.name}; {args.items:,} items x {d}-d; torch threads {torch.get_num_threads()} on "
          f"{os.cpu_count()} cores; cache under {root}")

    # the collection, written through the cache's own add() in 4,096-row shards
    t = time.perf_counter()
    cache = EmbeddingCache(root, loaded.key, "image", d, h)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(args.items)]
    with torch.no_grad():
        for start in range(0, args.items, SHARD_ROWS):
            n = min(SHARD_ROWS, args.items - start)
            f = torch.randn(n, d)
            cache.add(shas[start:start + n], f, torch.rand(n, 2), split.project(f, "image"), [1] * n)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    found = cache.lookup(shas)
    loc = np.array([found[s] for s in shas], dtype=np.int64)
    coll = Collection([Path(s) for s in shas], loc[:, 0], loc[:, 1], loc[:, 2], cache, args.items, 0)
    lookup_s = time.perf_counter() - t
    disk_mb = sum(p.stat().st_size for p in cache.dir.iterdir()) / 2**20
    print(f"built the cache in {build_s:.1f} s ({disk_mb:,.0f} MB on disk); index lookup of all items {lookup_s:.1f} s")

    query = torch.randn(1, d)
    results = {}
    for rank_by in ("distance", "sim"):
        search(coll, query, "music", split, args.k, args.chunk_size, rank_by)  # warm the page cache
        reset_peak()
        before, _ = rss_mb()
        t = time.perf_counter()
        top, vals = search(coll, query, "music", split, args.k, args.chunk_size, rank_by)
        secs = time.perf_counter() - t
        _, peak = rss_mb()
        results[rank_by] = (secs, peak - before, top)
        print(f"chunked search, rank by {rank_by}: {secs:.2f} s for {args.items:,} items "
              f"({args.items / secs / 1e6:.2f} M items/s), peak RSS +{peak - before:,.0f} MB over {before:,.0f} MB")

    # exactness on the first slice: chunked top-k equals the full ranking of that slice
    sub = Collection(coll.paths[:args.chunk_size], coll.shard[:args.chunk_size], coll.row[:args.chunk_size],
                     coll.windows[:args.chunk_size], cache, 0, 0)
    rows = sub.vectors(np.arange(len(sub)))
    with torch.no_grad():
        full = split.scores(split.project(query, "music"), rows[:, d + 2:])[0]
    top, _ = search(sub, query, "music", split, args.k, max(1, args.chunk_size // 7), "sim")
    assert np.array_equal(top[0], torch.argsort(full, descending=True)[:args.k].numpy())
    top, _ = search(sub, query, "music", split, args.k, max(1, args.chunk_size // 7), "distance")
    assert np.array_equal(top[0], torch.argsort(squared_distances(query, rows[:, :d])[0])[:args.k].numpy())

    # baseline (a): the similarity decoder once per pair, on cached embeddings; one thread, its fastest
    # setting for such tiny ops (with 2 threads each op waits on the other thread)
    f_items = rows[:args.pairs, :d]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        model.sim(torch.cat([f_items[:1], query], dim=1))
        t = time.perf_counter()
        for i in range(len(f_items)):
            model.sim(torch.cat([f_items[i:i + 1], query], dim=1))
        per_pair = (time.perf_counter() - t) / len(f_items)
    torch.set_num_threads(threads)
    naive_dec = per_pair * args.items
    print(f"naive (a), decoder once per pair (1 thread): {per_pair * 1e6:.0f} us/pair -> {naive_dec:,.0f} s for "
          f"{args.items:,} pairs")

    # baseline (b): the whole model once per pair (no embedding cache)
    spec_i = loaded.cfg["image_encoder"]
    size = int(spec_i.get("image_size", 224))
    x_img = torch.randn(1, 3, size, size)
    x_mus = torch.randn(1, 3, 193, 87) if loaded.cfg["music_encoder"]["type"] == "resnet" else torch.randn(1, 198, 128)
    with torch.no_grad():
        model(x_img, x_mus)
        t = time.perf_counter()
        for _ in range(args.full_pairs):
            model(x_img, x_mus)
        per_full = (time.perf_counter() - t) / args.full_pairs
    naive_full = per_full * args.items
    print(f"naive (b), whole model once per pair: {per_full * 1e3:.0f} ms/pair -> {naive_full / 3600:,.1f} h for "
          f"{args.items:,} pairs")

    all_mb = args.items * (d + 2 + h) * 4 / 2**20
    print(f"all cached rows at once would take {all_mb:,.0f} MB; the chunked search stayed within "
          f"+{max(r[1] for r in results.values()):,.0f} MB")
    for rank_by, (secs, _, _) in results.items():
        print(f"speed-up of chunked search ({rank_by}) over naive (a): {naive_dec / secs:,.0f}x; "
              f"over naive (b): {naive_full / secs:,.0f}x")
    cache.close()
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
