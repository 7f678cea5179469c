"""Decoders (CDCML section 5.3, 6.1.3): 3 FC layers with BatchNorm, ReLU, dropout, sigmoid output."""

from __future__ import annotations

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
