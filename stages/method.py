"""DVC stage `method@<name>`: one of the field's other methods (MMVA, Emo-CLIM, CMER-CL; imem/methods/),
trained and scored on the prepared split -> models/methods/<name>/, reports/methods/<name>/."""

import argparse

from imem.cli import run_stage
from imem.features.frozen import default_memo
from imem.methods.base import run_method
from imem.params import section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("method")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    m = run_method(args.method, section("methods"), section("evaluate"), "artifacts/prepare", "artifacts/features",
                   "reports/prepare/stats.json", f"models/methods/{args.method}", f"reports/methods/{args.method}",
                   train_encoders=section("train")["encoders"], track=not args.no_track, memo=default_memo())
    print(f"{m['label']}: wrote reports/methods/{args.method}/ ({m['seconds']} s)")


if __name__ == "__main__":
    run_stage(main)
