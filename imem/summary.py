"""`imem summary`: the comparison's headline numbers in a table that fits 100 columns (issue 20).

`make repro` used to print three Markdown tables (about 106 lines, up to 376 characters wide). This reads
``reports/comparison/comparison.csv`` (the compare stage's output: one row per variant and method, the mean
over training seeds with its 95 % bootstrap interval) and prints one line per row with the similarity MSE
and its interval, the valence errors and two retrieval scores, each column marked lower- or higher-is-better,
then where the full tables are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from imem.errors import ImemError
from imem.methods.base import LOWER_IS_BETTER

# (column of comparison.csv, header); the first also shows its interval
COLUMNS = (("sim_mse", "sim MSE"), ("image_valence_mse", "img V MSE"), ("music_valence_mse", "mus V MSE"),
           ("m2i_sim_r10", "m2i R@10"), ("i2m_sim_mrr", "i2m MRR"))
NAME_WIDTH = 27
FULL_TABLES = ("reports/comparison/comparison.md (every metric, paired differences)",
               "reports/evaluate/summary/{regression,retrieval}.md (best and last checkpoints of each variant)")


def _num(x: object, digits: int) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{float(x):.{digits}f}"


def compact(path: str | Path = "reports/comparison/comparison.csv", width: int = 100,
            stats: str | Path = "reports/prepare/stats.json") -> str:
    """The summary text of a comparison.csv; every line at most ``width`` characters. ``stats``: the prepare
    stage's stats.json, which names the corpus (left out when absent)."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ImemError(f"{path}: no comparison table (run `make repro` or `dvc repro compare`): {exc}") from exc
    missing = [c for c in (*(c for c, _ in COLUMNS), "row") if c not in df.columns]
    if missing:
        raise ImemError(f"{path}: not a comparison table (no column {missing[0]!r})")
    first = COLUMNS[0][0]
    heads = [f"{h} {'v' if c in LOWER_IS_BETTER else '^'}" for c, h in COLUMNS]
    cell = [24] + [12] * (len(COLUMNS) - 1)
    try:
        corpus = json.loads(Path(stats).read_text())["corpus"]
    except (OSError, ValueError, KeyError):
        corpus = "corpus not recorded"
    lines = [f"Test split, {corpus}.",
             "Mean over training seeds, [95 % bootstrap interval]; v lower is better, ^ higher is better.",
             f"{'model':<{NAME_WIDTH}}" + "".join(f"{h:>{w}}" for h, w in zip(heads, cell, strict=True))]
    for _, r in df.iterrows():
        name = str(r["row"])
        if len(name) >= NAME_WIDTH:  # "CDCML (ResNet50 + ...)" -> "CDCML": the parenthesis is in comparison.md
            name = name.split(" (")[0]
        name = name if len(name) < NAME_WIDTH else name[:NAME_WIDTH - 2] + "~"
        lo, hi = r.get(f"{first}_lo"), r.get(f"{first}_hi")
        head = _num(r[first], 4) + (f" [{_num(lo, 4)} {_num(hi, 4)}]" if pd.notna(lo) and pd.notna(hi) else "")
        rest = [_num(r[c], 4 if c.endswith(("_mse", "_mae")) else 3) for c, _ in COLUMNS[1:]]
        lines.append(f"{name:<{NAME_WIDTH}}" + f"{head:>{cell[0]}}" + "".join(f"{v:>{w}}" for v, w in
                                                                           zip(rest, cell[1:], strict=True)))
    lines.append("-: not a metric of that row (Emo-CLIM and CMER-CL retrieve by class and emotion; see comparison.md).")
    lines.append("Full tables: " + FULL_TABLES[0] + ";")
    lines.append("  " + FULL_TABLES[1] + ".")
    too_wide = [ln for ln in lines if len(ln) > width]
    if too_wide:  # a guard on the layout above, not on the data: names are cut to fit
        raise ImemError(f"imem summary: a line of {len(too_wide[0])} characters exceeds {width}")
    return "\n".join(lines)
