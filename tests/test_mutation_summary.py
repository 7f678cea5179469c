"""benchmarks/mutation_summary.py: the per-module score of `make mutation` (docs/testing.md)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "mutation_summary", Path(__file__).resolve().parents[1] / "benchmarks" / "mutation_summary.py")
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)

RESULTS = """\
    imem.metrics.x_ndcg_at_k__mutmut_1: killed
    imem.metrics.x_ndcg_at_k__mutmut_2: survived
    imem.metrics.x__check__mutmut_3: survived
    imem.metrics.x__check__mutmut_4: timeout
    imem.losses.xǁLossCombinerǁ__call____mutmut_1: killed
    imem.losses.xǁLossCombinerǁ__call____mutmut_2: no tests
    imem.losses.x_mse__mutmut_5: killed
    imem.data.pairs.x_similarity__mutmut_1: not checked
    imem.data.pairs.x_similarity__mutmut_2: suspicious
"""

DOC = """\
# Testing

## Equivalent mutants

- `imem.metrics.x__check__mutmut_3`: np.asarray(x, None) of float64 input
* `imem.losses.x_mse__mutmut_5`: listed, yet killed

### per module
- `imem.losses.xǁLossCombinerǁ__call____mutmut_2`: a subsection still counts

## Survivors

- `imem.metrics.x_ndcg_at_k__mutmut_2`: not equivalent (another section)
"""


def test_results_and_equivalent_list_are_parsed():
    r = ms.parse_results(RESULTS)
    assert len(r) == 9 and r["imem.losses.xǁLossCombinerǁ__call____mutmut_2"] == "no tests"
    assert ms.equivalent_names(DOC) == {"imem.metrics.x__check__mutmut_3", "imem.losses.x_mse__mutmut_5",
                                        "imem.losses.xǁLossCombinerǁ__call____mutmut_2"}
    assert ms.module_of("imem.data.pairs.x_similarity__mutmut_1") == "imem.data.pairs"
    assert ms.module_of("imem.losses.xǁLossCombinerǁ__call____mutmut_2") == "imem.losses"


def test_per_module_counts_and_score():
    table, stale = ms.summarize(ms.parse_results(RESULTS), ms.equivalent_names(DOC))
    assert stale == ["imem.losses.x_mse__mutmut_5"]
    m, lo, p = table["imem.metrics"], table["imem.losses"], table["imem.data.pairs"]
    assert (m["killed"], m["survived"], m["equivalent"]) == (2, 1, 1)  # the timeout counts as killed
    assert ms.score(m) == pytest.approx(2 / 3)
    assert (lo["killed"], lo["equivalent"], lo["no tests"]) == (2, 1, 0) and ms.score(lo) == 1.0
    assert (p["not checked"], p["other"]) == (1, 1) and ms.score(p) == 0.0
    text = ms.render(table)
    assert text.splitlines()[-1].split()[0] == "all" and text.splitlines()[-1].endswith("66.7%")  # 4 of 6
