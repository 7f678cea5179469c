"""Size of a whole checkpoint against its trained part (frozen backbones left out, what a tuning trial logs;
imem.checkpoints.trained_part) for variants of params.yaml, as built untrained from their config.

    python benchmarks/checkpoint_sizes.py [variant ...]      # default: transformer_v2 cnn
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from imem.checkpoints import save, trained_part
from imem.models.matching import build_model
from imem.params import section
from imem.training import variant_config


def sizes(variant: str, tmp: Path) -> tuple[float, float]:
    """(MB of the whole checkpoint, MB of its trained part) of ``variant``."""
    cfg = variant_config(section("train"), variant)
    torch.manual_seed(int(cfg["seed"]))
    ck = {"model": build_model(cfg).state_dict(), "config": cfg, "epoch": 1}
    save(ck, tmp / "full.pt")
    save(trained_part(ck), tmp / "part.pt")
    return (tmp / "full.pt").stat().st_size / 1e6, (tmp / "part.pt").stat().st_size / 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for variant in sys.argv[1:] or ["transformer_v2", "cnn"]:
            full, part = sizes(variant, Path(tmp))
            print(f"{variant}: whole checkpoint {full:.1f} MB, trained part {part:.1f} MB ({part / full:.0%})")


if __name__ == "__main__":
    main()
