"""DVC stage `evaluate@<variant>`: models/<variant> + artifacts/{prepare,features} -> reports/evaluate/<variant>/."""

import argparse

from imem.cli import run_stage
from imem.evaluation import evaluate_variant
from imem.features.frozen import default_memo
from imem.params import section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variant")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    evaluate_variant(f"models/{args.variant}", "artifacts/prepare", "artifacts/features", "reports/prepare/stats.json",
                     f"reports/evaluate/{args.variant}", section("evaluate"), track=not args.no_track,
                     cache_memo=default_memo())


if __name__ == "__main__":
    run_stage(main)
