"""DVC stage `train@<variant>`: artifacts/{prepare,features} -> models/<variant>/, reports/train/<variant>/."""

import argparse

from imem.cli import run_stage
from imem.features.frozen import default_memo
from imem.params import section
from imem.training import train_seeds, variant_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variant")
    ap.add_argument("--resume", action="store_true",
                    help="continue from models/<variant>/last.pt (and each extra seed's seeds/<seed>/last.pt)")
    args = ap.parse_args()
    cfg = variant_config(section("train"), args.variant)
    train_seeds(cfg, "artifacts/prepare", "artifacts/features", f"models/{args.variant}",
                f"reports/train/{args.variant}", resume=args.resume, cache_memo=default_memo())


if __name__ == "__main__":
    run_stage(main)
