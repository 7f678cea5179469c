"""Where the width of CDCML's similarity-MSE interval comes from (docs/reproducibility.md section 6).

After `make repro`, reads models/cnn (first seed's best checkpoint) and reports/evaluate/cnn/predictions, applies
the similarity decoder to every test clip x image combination, and prints the 95 % bootstrap half-width of the
similarity MSE (as a fraction of the value) when resampling the test songs only, the images only, or both:

- over the split's own pairs (pairs.csv) and over every combination;
- over pairs re-drawn per clip like the prepare stage does (10 nearest + 10 farthest + 30 random images, then
  a kept fraction), for several kept fractions: does a denser test pair list narrow the interval?

Usage: python benchmarks/power_split.py [--resamples 600] [--seed 1]
Numbers come from the embedded (generated) corpus; they size the split, they compare no models.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from imem.models.decoders import MLPDecoder

PRED = "reports/evaluate/cnn/predictions/"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resamples", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    state = torch.load("models/cnn/best.pt", weights_only=True, map_location="cpu")["model"]
    dec = MLPDecoder(state["sim.0.weight"].shape[1], 1)
    dec.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("sim.")})
    dec.eval()
    f_img = torch.from_numpy(np.load(PRED + "image_embeddings_best.npy")).float()
    f_mus = torch.from_numpy(np.load(PRED + "music_embeddings_best.npy")).float()
    truth = np.load(PRED + "truth.npy")
    n_c, n_i = truth.shape
    with torch.no_grad():  # the decoder on [f_I, f_M], as imem.evaluation.Evaluator._sim_matrix
        pred = np.stack([dec(torch.cat([f_img, f_mus[c].expand(n_i, -1)], 1)).squeeze(1).numpy() for c in range(n_c)])
    err = (pred - truth) ** 2
    music = pd.read_csv(PRED + "music_va.csv", dtype={"id": str})
    songs, song_idx = np.unique(music["id"].str.split("-").str[0].to_numpy(), return_inverse=True)
    rng = np.random.default_rng(args.seed)

    def half_width(rows: np.ndarray, cols: np.ndarray, mode: str) -> float:
        e, vals = err[rows, cols], []
        for _ in range(args.resamples):
            ws = rng.multinomial(len(songs), np.full(len(songs), 1 / len(songs))) if "s" in mode else np.ones(len(songs))
            wi = rng.multinomial(n_i, np.full(n_i, 1 / n_i)) if "i" in mode else np.ones(n_i)
            w = ws[song_idx[rows]] * wi[cols]
            vals.append((w * e).sum() / w.sum())
        lo, hi = np.percentile(vals, [2.5, 97.5])
        return (hi - lo) / 2 / e.mean()

    pairs = pd.read_csv(PRED + "pairs.csv", dtype={"clip_id": str, "image_id": str})
    images = pd.read_csv(PRED + "image_va.csv", dtype={"id": str})
    pos_c = {c: i for i, c in enumerate(music["id"])}
    pos_i = {c: i for i, c in enumerate(images["id"])}
    split_rows = pairs["clip_id"].map(pos_c).to_numpy()
    split_cols = pairs["image_id"].map(pos_i).to_numpy()
    all_rows, all_cols = np.divmod(np.arange(n_c * n_i), n_i)
    print(f"test split: {len(songs)} songs, {n_c} clips, {n_i} images, {len(pairs)} pairs (embedded corpus)")
    for name, (r, c) in (("split's pairs", (split_rows, split_cols)), ("every combination", (all_rows, all_cols))):
        print(name + ": " + ", ".join(f"{m} {half_width(r, c, m):.1%}" for m in ("s", "i", "si"))
              + "   (s: songs only, i: images only, si: both)")
    order = np.argsort(-truth, axis=1)  # per clip: images by true S, highest first
    for keep in (0.1, 0.2, 0.3, 0.5, 1.0):
        g, r, c = np.random.default_rng(args.seed), [], []
        for clip in range(n_c):
            cand = np.concatenate([order[clip, :10], order[clip, -10:], g.choice(order[clip, 10:-10], 30, replace=False)])
            kept = g.choice(50, int(round(50 * keep)), replace=False)
            r += [clip] * len(kept)
            c += list(cand[kept])
        print(f"re-drawn pairs, keep {keep:.0%} of 50 per clip: both {half_width(np.array(r), np.array(c), 'si'):.1%}")


if __name__ == "__main__":
    main()
