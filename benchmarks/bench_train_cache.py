"""Epoch time with cached frozen-backbone outputs vs recomputing the frozen backbones every epoch.

Uses the pipeline's own artifacts (run `make repro` first) and a variant from params.yaml (default
`cnn`: ResNet50 on 224x224 images + ResNet18 on 193x87x3 music features). Both sides run the same
heads, decoders, losses and optimizer steps; the only difference is where the backbone outputs come
from. A recomputing epoch takes minutes on 2 CPU cores, so it is timed on `--batches` batches and
extrapolated to a full epoch (the per-batch cost is uniform); the cached epoch is timed whole.
Goal (issue 4): >= 50x.

    python benchmarks/bench_train_cache.py [--variant cnn] [--batches 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="cnn")
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args()

    from imem.params import section
    from imem.training import Trainer, variant_config

    cfg = variant_config(section("train"), args.variant)
    tr = Trainer(cfg, "artifacts/prepare", "artifacts/features", progress=False)
    cache_s = tr.build_cache()
    t = time.perf_counter()
    tr.run_epoch()
    cached_epoch = time.perf_counter() - t
    n_batches = len(tr._step_batches(tr._n(tr.data["train"]), shuffle=False))

    # Recompute: the frozen backbones run on every batch (eval mode, no grad), as without the cache.
    def recompute(side, rows):
        with torch.no_grad():
            return tr.backbones[side](tr.fetch[side](rows).to(tr.device))

    tr._h = recompute
    tr.model.train()
    for bb in tr.backbones.values():
        bb.eval()
    d = tr.data["train"]
    batches = tr._step_batches(tr._n(d), shuffle=True)[: args.batches]
    t = time.perf_counter()
    for idx in batches:
        total = tr.combiner(tr._losses(d, idx))
        tr.opt.zero_grad(set_to_none=True)
        total.backward()
        tr.opt.step()
    per_batch = (time.perf_counter() - t) / len(batches)
    recompute_epoch = per_batch * n_batches
    print(f"variant {args.variant}: {tr._n(d):,} training pairs, {n_batches} batches of {cfg['batch_size']}; "
          f"torch threads {torch.get_num_threads()} on {os.cpu_count()} cores")
    print(f"one-off cache build: {cache_s:.1f} s")
    print(f"cached epoch: {cached_epoch:.2f} s")
    print(f"recomputing epoch: {per_batch:.2f} s/batch x {n_batches} = {recompute_epoch:.0f} s (from {len(batches)} batches)")
    print(f"speed-up: {recompute_epoch / cached_epoch:.0f}x (goal >= 50x: {'met' if recompute_epoch / cached_epoch >= 50 else 'NOT met'})")


if __name__ == "__main__":
    main()
