"""Decoders (CDCML section 5.3, 6.1.3): 3 FC layers with BatchNorm, ReLU, dropout, sigmoid output."""

from __future__ import annotations

import numpy as np
from torch import nn


class MLPDecoder(nn.Sequential):
    """in -> hidden[0] -> hidden[1] -> out, each hidden layer Linear + BatchNorm + ReLU + Dropout; sigmoid out
    (similarity and normalised VA both live in [0, 1])."""

    def __init__(self, in_dim: int, out_dim: int, hidden=(256, 128), dropout: float = 0.5):
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            prev = h
        layers += [nn.Linear(prev, out_dim), nn.Sigmoid()]
        super().__init__(*layers)


# Scoring every (row item, column item) combination with a decoder on a concatenation [x_1, ..., x_k]. Written
# here because torch has no "Linear over a Cartesian product": the first Linear splits over the concatenation,
# W [x_1, ..., x_k] + b = W_1 x_1 + ... + W_k x_k + b, so each block's product is computed once per item and a
# combination costs only the layers after the first (at 512-d inputs and 256 hidden units, 4-5x fewer
# operations than the decoder on each concatenated pair; equal up to float rounding, tested in
# tests/test_evaluation.py and tests/test_mmva.py). Used by imem.evaluation (CDCML's decoder on [f_I, f_M]) and
# imem.methods.mmva (the similarity predictor on [z^Img, z^Mus, z^Cap]).

def first_linear_blocks(decoder: nn.Sequential, *blocks):
    """(x_j @ W_j^T for each block, in concatenation order; the layers after the first Linear). The caller adds
    ``decoder[0].bias`` to one side."""
    first = decoder[0]
    if not isinstance(first, nn.Linear):
        raise TypeError(f"the decoder's first layer is {type(first).__name__}, not Linear")
    widths = [b.shape[-1] for b in blocks]
    if sum(widths) != first.in_features:
        raise ValueError(f"blocks of widths {widths} do not make the first Linear's {first.in_features} inputs")
    out, at = [], 0
    for b, w in zip(blocks, widths, strict=True):
        out.append(b @ first.weight[:, at:at + w].T)
        at += w
    return out, nn.Sequential(*list(decoder)[1:])  # not decoder[1:]: a subclass slices into its own class


def all_combinations(rest: nn.Module, row_part, col_part, chunk: int, dtype=np.float32) -> np.ndarray:
    """(rows, cols) array of ``rest(row_part[r] + col_part[c])`` (a decoder with one output), in chunks of about
    ``chunk`` combinations."""
    n_r, n_c = len(row_part), len(col_part)
    out = np.empty((n_r, n_c), dtype=dtype)
    if not n_r or not n_c:
        return out
    rows = max(1, chunk // n_c)
    for s in range(0, n_r, rows):
        h = row_part[s:s + rows, None, :] + col_part[None, :, :]  # (rows, cols, hidden)
        out[s:s + len(h)] = rest(h.reshape(-1, h.shape[-1])).float().view(len(h), n_c).cpu().numpy()
    return out
