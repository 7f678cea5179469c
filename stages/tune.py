"""Tuning stage (tune/dvc.yaml, not part of the default `dvc repro`): an Optuna study over
params.yaml's `tune` section -> reports/tune/{best_params.yaml,trials.csv}. Same as `imem tune`."""

import argparse

from imem.cli import run_stage
from imem.tuning import run_tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, tune.storage, sqlite:///optuna.db)")
    args = ap.parse_args()
    s = run_tune(storage=args.storage)
    if s is None:  # a torchrun rank > 0: rank 0 reports
        return
    print(f"study {s['study']}: {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed; "
          f"best trial {s['best']['number']} (value {s['best']['value']:.6g}); promote with:\n"
          f"  {s['best_params']['promote']}")


if __name__ == "__main__":
    run_stage(main)
