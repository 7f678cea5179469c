"""DVC stage `compare` (and `compare_full` in compare/dvc.yaml): one table of every method and variant ->
<out>/comparison.{md,csv}, also logged to MLflow (experiment imem-compare)."""

import argparse

from imem.cli import run_stage
from imem.comparison import write_comparison


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="*", default=[], help="train variants (reports/evaluate/<variant>/metrics.json)")
    ap.add_argument("--methods", nargs="*", default=[], help="methods (reports/methods/<name>/metrics.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="Comparison of methods")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    df = write_comparison(args.variants, args.methods, "reports/evaluate", "reports/methods", args.out, args.title,
                          track=not args.no_track)
    print(f"wrote {args.out}/comparison.md and comparison.csv ({len(df)} rows)")


if __name__ == "__main__":
    run_stage(main)
