"""The ``imem`` command line. Every subcommand turns an ImemError into one line and exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from imem.errors import ImemError


def run_stage(fn: Callable[[], object]) -> None:
    """Run a stage/subcommand body: a user error becomes ``error: <one line>`` on stderr and exit 1."""
    try:
        fn()
    except ImemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def _synth(args: argparse.Namespace) -> None:
    from imem.data.synth import synthesize
    from imem.params import section

    p = section("synth", path=args.params)
    out = Path(args.out or p["out"])
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ImemError(f"{out} exists and is not empty: pass --force to regenerate it")
    summary = synthesize(p, out, labels_only=args.labels_only, progress=not args.quiet)
    print(f"wrote the embedded corpus (generated, not real data) to {out}: {summary}")


def _prepare(args: argparse.Namespace) -> None:
    from imem.data.prepare import prepare, write_outputs
    from imem.params import section

    p = section("prepare", path=args.params)
    prep = prepare(p, progress=not args.quiet)
    write_outputs(prep, args.out, args.reports)
    print(f"sigma = {prep.stats['sigma']:.6f}; pairs: "
          + ", ".join(f"{s} {c['pairs']}" for s, c in prep.stats["counts"].items()))


def _audit(args: argparse.Namespace) -> None:
    from imem.data.pairs import audit_markdown, leakage_audit, read_pair_list
    from imem.io import write_json

    lists = {}
    for item in args.lists:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem.replace("_matching", ""), item
        lists[name] = read_pair_list(path)
    report = leakage_audit(lists)
    print(audit_markdown(report, "Leakage audit"))
    if args.json:
        write_json(args.json, report)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imem", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the embedded corpus (real corpora's formats, generated data)")
    s.add_argument("--params", default="params.yaml", help="params file (section 'synth')")
    s.add_argument("--out", help="output directory (default: synth.out)")
    s.add_argument("--labels-only", action="store_true",
                   help="IMEMNet-scale annotations only (1,802 songs / 35,817 clips, 25,620 images), no media")
    s.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_synth)

    p = sub.add_parser("prepare", help="clips, images, pairs and the leakage audit (the DVC stage's work)")
    p.add_argument("--params", default="params.yaml", help="params file (section 'prepare')")
    p.add_argument("--out", default="artifacts/prepare")
    p.add_argument("--reports", default="reports/prepare")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=_prepare)

    a = sub.add_parser("audit", help="leakage audit of pair lists: NAME=PATH ... (IMEMNet format)")
    a.add_argument("lists", nargs="+", help="e.g. val=val_matching.txt test=test_matching.txt")
    a.add_argument("--json", help="also write the report as JSON")
    a.set_defaults(fn=_audit)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_stage(lambda: args.fn(args))


if __name__ == "__main__":
    main()
