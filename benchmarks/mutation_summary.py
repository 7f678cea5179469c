"""Per-module mutation score of the last `mutmut run` (`make mutation`, docs/testing.md).

Reads `mutmut results --all true` (one "<mutant>: <status>" line per mutant) and the mutants docs/testing.md
lists as equivalent (a backticked mutant name at the start of a list item of its "Equivalent mutants" section),
and prints, per module: killed, survived, no tests, timeouts, equivalent, not yet checked, and the score =
killed / (mutants that are not equivalent and were checked). A surviving mutant that is listed as equivalent
counts as equivalent; a listed one that is killed counts as killed (the list is then out of date: reported).

Usage: python benchmarks/mutation_summary.py [--results FILE] [--doc docs/testing.md]
(without --results it runs `mutmut results --all true` in the current directory).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

LINE = re.compile(r"^\s*(?P<name>[\w.ǁ]+__mutmut_\d+): (?P<status>.+?)\s*$")
EQUIV_ITEM = re.compile(r"^\s*[-*] `(?P<name>[\w.ǁ]+__mutmut_\d+)`")
KILLED = ("killed", "timeout", "caught by type check")  # a timeout or a type error stops the mutant too


def parse_results(text: str) -> dict[str, str]:
    """Mutant name -> status from `mutmut results --all true`."""
    return {m["name"]: m["status"] for m in map(LINE.match, text.splitlines()) if m}


def equivalent_names(markdown: str) -> set[str]:
    """The mutant names listed under the "Equivalent mutants" heading (until the next heading of that level
    or above)."""
    names: set[str] = set()
    level = 0
    for line in markdown.splitlines():
        head = re.match(r"^(#+)\s+(.*)", line)
        if head:
            if level and len(head[1]) <= level:
                level = 0
            if head[2].strip().lower().startswith("equivalent mutants"):
                level = len(head[1])
            continue
        item = EQUIV_ITEM.match(line)
        if level and item:
            names.add(item["name"])
    return names


def module_of(name: str) -> str:
    """``imem.metrics.x_ndcg_at_k__mutmut_3`` / ``imem.losses.xǁLossCombinerǁ__call____mutmut_1`` -> the module."""
    return re.split(r"\.x(?:ǁ|_)", name, maxsplit=1)[0]


def summarize(results: dict[str, str], equivalent: set[str]) -> tuple[dict[str, Counter], list[str]]:
    """Per module a Counter of killed / survived / no tests / equivalent / not checked / other; and the listed
    equivalent mutants that were killed after all."""
    table: dict[str, Counter] = {}
    stale = []
    for name, status in sorted(results.items()):
        c = table.setdefault(module_of(name), Counter())
        if status in KILLED:
            c["killed"] += 1
            if name in equivalent:
                stale.append(name)
        elif name in equivalent and status in ("survived", "no tests"):
            c["equivalent"] += 1
        elif status in ("survived", "no tests", "not checked"):
            c[status] += 1
        else:
            c["other"] += 1
    return table, stale


def score(c: Counter) -> float:
    """Killed over the checked non-equivalent mutants (survivors and mutants no test reaches count against)."""
    den = c["killed"] + c["survived"] + c["no tests"] + c["other"]
    return c["killed"] / den if den else float("nan")


def render(table: dict[str, Counter]) -> str:
    cols = ("killed", "survived", "no tests", "other", "equivalent", "not checked")
    rows = [f"{'module':28} " + " ".join(f"{c:>11}" for c in cols) + f" {'score':>7}"]
    total: Counter = Counter()
    for mod in sorted(table):
        total.update(table[mod])
        rows.append(f"{mod:28} " + " ".join(f"{table[mod][c]:>11}" for c in cols) + f" {score(table[mod]):>7.1%}")
    rows.append(f"{'all':28} " + " ".join(f"{total[c]:>11}" for c in cols) + f" {score(total):>7.1%}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="a saved `mutmut results --all true` output (default: run it)")
    ap.add_argument("--doc", default="docs/testing.md", help="the document that lists the equivalent mutants")
    args = ap.parse_args(argv)
    if args.results:
        text = Path(args.results).read_text(encoding="utf-8")
    else:
        text = subprocess.run(["mutmut", "results", "--all", "true"], check=True, capture_output=True,
                              text=True).stdout
    doc = Path(args.doc)
    table, stale = summarize(parse_results(text), equivalent_names(doc.read_text(encoding="utf-8"))
                             if doc.is_file() else set())
    print(render(table))
    for name in stale:
        print(f"note: {name} is listed as equivalent in {doc} but was killed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
