"""The evaluate stages' hot spots against the straightforward forms they replaced (CI time, issue 14).

Each line times imem's form and the baseline in the same run, on the default corpus's test-split sizes:

* all-pairs similarity: CDCML's similarity decoder (imem.models.decoders.MLPDecoder, [f_I, f_M] 1,024 ->
  256 -> 128 -> 1, eval mode) on every one of 1,513 clips x 1,800 images. Baseline: the decoder on the
  concatenated embeddings in batches of 4,096 combinations (the evaluate stage before); imem: the first Linear
  split per modality (imem.models.decoders.all_combinations, as imem.evaluation.Evaluator._sim_matrix runs it). Also checks they agree.
* bootstrap regression errors: MSE + MAE of 7,565 pair predictions on 1,000 weighted resamples. Baseline:
  scikit-learn's mean_squared_error / mean_absolute_error with sample_weight; imem: imem.metrics.regression.
* frozen ResNet50 over 224-px images (imem.training.backbone_cache): default memory layout against
  channels-last, ``--images`` random images, extrapolated to the corpus's 4,000.

    python benchmarks/bench_scoring.py [--images 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t) / repeat, out


def bench_sim_matrix(n_c: int = 1513, n_i: int = 1800, d: int = 512, batch: int = 4096) -> None:
    from imem.models.decoders import MLPDecoder, all_combinations, first_linear_blocks

    torch.manual_seed(0)
    dec = MLPDecoder(2 * d, 1, (256, 128), 0.5).eval()
    fm, fi = torch.randn(n_c, d), torch.randn(n_i, d)

    @torch.no_grad()
    def concat():
        flat = []
        for start in range(0, n_c * n_i, batch):
            idx = torch.arange(start, min(start + batch, n_c * n_i))
            flat.append(dec(torch.cat([fi[idx % n_i], fm[idx // n_i]], dim=1)).squeeze(1))
        return torch.cat(flat).reshape(n_c, n_i)

    @torch.no_grad()
    def split():  # what imem.evaluation.Evaluator._sim_matrix runs
        (pi, pm), rest = first_linear_blocks(dec, fi, fm)
        return torch.from_numpy(all_combinations(rest, pm + dec[0].bias, pi, batch))

    t_base, a = timed(concat)
    t_imem, b = timed(split)
    print(f"all-pairs similarity, {n_c:,} x {n_i:,}: concatenation {t_base:.1f} s, split first Linear {t_imem:.1f} s "
          f"-> {t_base / t_imem:.1f}x (max |difference| {float((a - b).abs().max()):.1e})")


def bench_regression(n_pairs: int = 7565, n_c: int = 1513, n_i: int = 1800, n: int = 1000) -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    from imem.metrics import regression

    rng = np.random.default_rng(0)
    pred, true = rng.random(n_pairs), rng.random(n_pairs)
    pc, pi = rng.integers(0, n_c, n_pairs), rng.integers(0, n_i, n_pairs)
    counts_c, counts_i = rng.multinomial(n_c, np.full(n_c, 1 / n_c), n), rng.multinomial(n_i, np.full(n_i, 1 / n_i), n)
    weights = [counts_c[b][pc] * counts_i[b][pi] for b in range(n)]

    def base():
        return [(mean_squared_error(true, pred, sample_weight=w), mean_absolute_error(true, pred, sample_weight=w))
                for w in weights]

    def imem():
        return [tuple(regression(pred, true, w).values()) for w in weights]

    t_base, a = timed(base)
    t_imem, b = timed(imem)
    print(f"bootstrap MSE + MAE, {n:,} resamples of {n_pairs:,} pairs: scikit-learn {t_base:.2f} s, NumPy "
          f"{t_imem:.2f} s -> {t_base / t_imem:.0f}x (max |difference| {np.abs(np.array(a) - np.array(b)).max():.1e})")


def bench_backbone(n_images: int, total: int = 4000, batch: int = 32) -> None:
    import torchvision

    from imem.training import backbone_cache

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    images = torch.rand(n_images, 3, 224, 224)
    rows = torch.arange(n_images)

    @torch.no_grad()
    def base():
        net.eval()
        return torch.cat([net(images[s:s + batch]) for s in range(0, n_images, batch)])

    @torch.no_grad()
    def imem():
        return backbone_cache(net, lambda r: images[r], rows, batch, torch.device("cpu"), "", False)[0]

    t_base, a = timed(base)
    t_imem, b = timed(imem)
    scale = total / n_images / 60
    print(f"frozen ResNet50, 224 px, extrapolated to {total:,} images: default layout {t_base * scale:.1f} min, "
          f"channels-last {t_imem * scale:.1f} min -> {t_base / t_imem:.2f}x (max |difference| "
          f"{float((a - b).abs().max()):.1e} on features of mean |x| {float(a.abs().mean()):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images timed for the ResNet50 line")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_sim_matrix()
    bench_regression()
    bench_backbone(args.images)


if __name__ == "__main__":
    main()
