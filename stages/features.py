"""DVC stage `features`: artifacts/prepare + audio/images -> artifacts/features/ (memory-mapped inputs)."""

from imem.cli import run_stage
from imem.features.store import build_store
from imem.params import section


def main() -> None:
    build_store("artifacts/prepare", "artifacts/features", section("features"))


if __name__ == "__main__":
    run_stage(main)
