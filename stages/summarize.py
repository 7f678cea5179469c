"""DVC stage `summarize`: reports/evaluate/<variant>/metrics.json of every variant -> reports/evaluate/summary/."""

import argparse

from imem.cli import run_stage
from imem.evaluation import summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    summarize([f"reports/evaluate/{v}" for v in args.variants], "reports/evaluate/summary")


if __name__ == "__main__":
    run_stage(main)
