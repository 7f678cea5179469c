"""DVC stage `prepare`: corpus under data/ -> artifacts/prepare/{train,val,test}/, reports/prepare/."""

from imem.cli import run_stage
from imem.data.prepare import prepare, write_outputs
from imem.params import section


def main() -> None:
    prep = prepare(section("prepare"))
    write_outputs(prep, "artifacts/prepare", "reports/prepare")


if __name__ == "__main__":
    run_stage(main)
