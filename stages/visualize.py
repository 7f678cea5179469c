"""DVC stage `visualize@<variant>`: reports/{train,evaluate}/<variant> -> reports/figures/<variant>/*.png."""

import argparse

from imem.cli import run_stage
from imem.params import section
from imem.plots import visualize_variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variant")
    ap.add_argument("--no-track", action="store_true", help="do not attach the figures to MLflow")
    args = ap.parse_args()
    paths = visualize_variant(f"reports/train/{args.variant}", f"reports/evaluate/{args.variant}", "artifacts/features",
                              f"reports/figures/{args.variant}", section("visualize"), track=not args.no_track)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    run_stage(main)
