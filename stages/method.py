"""DVC stage `method@<name>`: one of the field's other methods (MMVA, Emo-CLIM, CMER-CL; imem/methods/),
trained and scored on the prepared split -> models/methods/<name>/, reports/methods/<name>/."""

import argparse

from imem.cli import run_stage
from imem.features.frozen import default_memo
from imem.methods.base import parse_overrides, run_method
from imem.params import section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("method")
    ap.add_argument("--name", help="output name (models/methods/NAME, reports/methods/NAME); default: the method")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="set methods.<method>.KEY (a YAML value) for this run: an ablation row (compare/dvc.yaml)")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    name = args.name or args.method
    m = run_method(args.method, section("methods"), section("evaluate"), "artifacts/prepare", "artifacts/features",
                   "reports/prepare/stats.json", f"models/methods/{name}", f"reports/methods/{name}",
                   train_encoders=section("train")["encoders"], track=not args.no_track, memo=default_memo(),
                   overrides=parse_overrides(args.set, f"methods.{args.method}"), run_name=name)
    print(f"{m['label']}: wrote reports/methods/{name}/ ({m['seconds']} s)")


if __name__ == "__main__":
    run_stage(main)
