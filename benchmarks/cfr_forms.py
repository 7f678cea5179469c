"""What each CFR form learns (issue 15): CDCML eq. 2 as printed (``cfr: literal``), imem's reading of it
(``cfr: pair``, the default) and imem's earlier dense log-ratio (``cfr: dense``), on the embedded corpus.

Each form trains the same variant (default ``cnn``, one seed, frozen backbones) with CFR as its ONLY loss,
so the shared space is shaped by CFR alone, then measures on the test pairs how the embedding distance
||f_I - f_M||^2 relates to the pair's VA distance (eq. 1's d): Spearman's rho over the pairs (a space that
preserves emotion distances has rho > 0), and the mean distance of the 25 % lowest-S pairs over that of the
25 % highest-S pairs (> 1: dissimilar pairs lie further apart). The untrained space is the baseline of the
same run. Figures: docs/training.md ("CFR: eq. 2 as printed pushes similar pairs apart").

    python benchmarks/cfr_forms.py                       # after `make repro` (needs artifacts/prepare, features)
    python benchmarks/cfr_forms.py --epochs 5 --forms literal pair
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imem.errors import ImemError  # noqa: E402
from imem.features.frozen import default_memo  # noqa: E402
from imem.params import section  # noqa: E402
from imem.training import Trainer, variant_config  # noqa: E402


def geometry(tr: Trainer) -> dict:
    d = tr.data["test"]
    fi, fm = tr.embed("image", d.image_rows), tr.embed("music", d.music_rows)
    dist = (fi - fm).pow(2).sum(dim=1).numpy()
    va = (d.image_va - d.music_va).norm(dim=1).numpy()
    s = d.score.numpy()
    lo, hi = s <= torch.quantile(d.score, 0.25).item(), s >= torch.quantile(d.score, 0.75).item()
    return {"spearman_dist_va": round(float(spearmanr(dist, va).statistic), 4),
            "low_over_high_S_distance": round(float(dist[lo].mean() / dist[hi].mean()), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="cnn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--forms", nargs="+", default=["literal", "pair", "dense"])
    ap.add_argument("--prepare", default="artifacts/prepare")
    ap.add_argument("--features", default="artifacts/features")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    try:
        base = variant_config(section("train"), a.variant)
        memo = default_memo() or {}  # the train stages' on-disk cache of frozen-backbone outputs
        results = {}
        for form in a.forms:
            cfg = copy.deepcopy(base)
            cfg.update(cfr=form, epochs=a.epochs, n_seeds=1,
                       loss_weights={k: (1.0 if k == "cfr" else 0.0) for k in cfg["loss_weights"]})
            t0 = time.perf_counter()
            tr = Trainer(cfg, a.prepare, a.features, progress=False)
            tr.build_cache(memo=memo)
            row = {"untrained": geometry(tr)}
            for _ in range(a.epochs):
                last = tr.run_epoch()
            row["trained"] = geometry(tr)
            row["train_cfr_last_epoch"] = round(float(last["train/cfr"]), 4)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results[form] = row
            print(f"cfr: {form:8s} untrained {row['untrained']}  after {a.epochs} epochs {row['trained']}  "
                  f"({row['seconds']} s)", flush=True)
    except ImemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = {"variant": a.variant, "epochs": a.epochs, "reduction": base["reduction"], "lr": base["lr"],
           "corpus": "embedded (generated) corpus", "results": results}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
