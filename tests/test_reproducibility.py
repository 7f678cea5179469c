"""The reproducibility contract's checker (imem.reproducibility): tolerance rules, the metrics-diff check,
the data-stage lock comparison, and the committed tolerance file itself."""

import json
from pathlib import Path

import pytest

from imem.errors import ImemError
from imem.reproducibility import (
    DATA_STAGES,
    EXACT_STAGES,
    Rule,
    check_metrics,
    deviation_lines,
    diff_dirs,
    flatten,
    load_rules,
    lock_entries,
    rule_for,
    summarize_deviation,
)

ROOT = Path(__file__).resolve().parents[1]


def _rules(tmp_path, text):
    p = tmp_path / "tol.yaml"
    p.write_text(text)
    return load_rules(p)


RULES = """
rules:
  - {match: "reports/prepare/*", exact: true}
  - {match: "*:*best_epoch*", skip: true, why: "a flat validation curve: any epoch"}
  - {match: "*_mse*", abs: 0.001, rel: 0.1}
  - {match: "*", abs: 0.05}
"""


def test_rules_first_match_wins_and_limits(tmp_path):
    rules = _rules(tmp_path, RULES)
    assert rule_for("reports/prepare/stats.json:sigma", rules).exact
    assert rule_for("reports/train/cnn/metrics.json:best_epoch", rules).skip
    r = rule_for("reports/evaluate/cnn/metrics.json:best.sim_mse", rules)
    assert r.allows(0.040, 0.040 + 0.001 + 0.004 - 1e-9) and not r.allows(0.040, 0.0451)
    assert rule_for("x.json:m2i_sim_r10", rules).abs == 0.05
    assert not Rule("e", exact=True).allows(1.0, 1.0 + 1e-15)
    assert Rule("n", abs=1).allows(float("nan"), float("nan")) and not Rule("n", abs=1).allows(float("nan"), 1.0)


def test_check_metrics_reports_each_violation(tmp_path):
    rules = _rules(tmp_path, RULES)
    diff = {"reports/prepare/stats.json": {"sigma": {"old": 0.3, "new": 0.3}, "pairs": {"old": 10, "new": 11}},
            "reports/train/cnn/metrics.json": {"best_epoch": {"old": 6, "new": 14},
                                               "val/sim_mse": {"old": 0.04, "new": 0.0409},
                                               "val/r10": {"old": 0.8, "new": 0.9},
                                               "gone": {"old": 0.5, "new": None},
                                               "split": {"old": "test", "new": "val"}}}
    bad, n = check_metrics(diff, rules)
    names = sorted(f.name for f in bad)
    assert n == 6  # best_epoch is skipped
    assert names == ["reports/prepare/stats.json:pairs", "reports/train/cnn/metrics.json:gone",
                     "reports/train/cnn/metrics.json:split", "reports/train/cnn/metrics.json:val/r10"]
    lines = [f.line() for f in bad]
    assert any("must be equal" in x for x in lines) and any("missing in the regenerated" in x for x in lines)
    assert any("allowed 0.05" in x for x in lines) and any("committed 'test', regenerated 'val'" in x for x in lines)


@pytest.mark.parametrize("text, msg", [
    ("rules: []", "no rules"),
    ("rules: [{abs: 1}]", "needs a 'match'"),
    ("rules: [{match: '*', abs: -1}]", "must be a finite number >= 0"),
    ("rules: [{match: '*', abz: 1}]", "unknown key 'abz'"),
    ("rules: [{match: '*', skip: true}]", "needs a 'why'"),
    ("rules: [", "not valid YAML"),
])
def test_bad_tolerance_files_are_one_line(tmp_path, text, msg):
    with pytest.raises(ImemError, match=msg):
        _rules(tmp_path, text)


def test_lock_entries_flatten_and_diff_dirs(tmp_path):
    lock = "schema: '2.0'\nstages:\n  prepare:\n    cmd: a\n  features:\n    cmd: b\n  train@cnn:\n    cmd: c\n"
    assert lock_entries(lock) == {"prepare": {"cmd": "a"}, "features": {"cmd": "b"}}
    assert set(DATA_STAGES) == {"prepare", "features"} and EXACT_STAGES == ("prepare",)
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": "x"}) == {"a.b": 1, "a.c.d": 2, "e": "x"}
    for d, v in (("old", 0.5), ("new", 0.52)):
        (tmp_path / d / "r").mkdir(parents=True)
        (tmp_path / d / "r" / "m.json").write_text(json.dumps({"best": {"sim_mse": v}, "sha": "abc", "n": 3}))
    diff = diff_dirs(tmp_path / "old", tmp_path / "new", ["r/m.json"])
    assert diff == {"r/m.json": {"best.sim_mse": {"old": 0.5, "new": 0.52}, "n": {"old": 3, "new": 3}}}
    rows = summarize_deviation(diff, [Rule("*_mse", abs=0.1), Rule("*", exact=True)])
    by = {r["rule"]: r for r in rows}
    assert by["*_mse"]["moved"] == 1 and by["*_mse"]["max_abs"] == pytest.approx(0.02)
    assert by["*_mse"]["max_rel"] == pytest.approx(0.04) and by["*"]["moved"] == 0
    assert by["*_mse"]["used"] == pytest.approx(0.2) and by["*_mse"]["worst"] == "r/m.json:best.sim_mse 0.5 -> 0.52"
    # the text CI prints: one line per rule under which something moved, with the share of the tolerance used
    lines = deviation_lines(diff, [Rule("*_mse", abs=0.1), Rule("*", exact=True)])
    assert lines == ["'*_mse': 1/1 moved, largest |diff| 0.02 (allowed 0.1, 20 % of allowed; "
                     "worst r/m.json:best.sim_mse 0.5 -> 0.52)"]
    over = deviation_lines(diff, [Rule("*_mse", abs=0.01, rel=0.01), Rule("*", exact=True)])
    assert "(allowed 0.01 + 0.01*|old|, 133 % of allowed;" in over[0]


def test_the_committed_tolerance_file_covers_every_committed_metric():
    """reproducibility.yaml loads, keeps the data stages exact, and every metric that the pipeline commits
    falls under a rule that names it on purpose (no metric is exact by accident of having no rule)."""
    rules = load_rules(ROOT / "reproducibility.yaml")
    assert rule_for("reports/prepare/stats.json:sigma", rules).exact
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "reports").rglob("metrics.json"))
    files += ["reports/prepare/stats.json"]
    uncovered = []
    for f in files:
        for key, v in flatten(json.loads((ROOT / f).read_text())).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if rule_for(f"{f}:{key}", rules).match == "(no rule: exact)":
                    uncovered.append(f"{f}:{key}")
    assert not uncovered, uncovered[:5]


def test_check_prints_the_headroom_per_rule_and_fails_on_a_violation(tmp_path, monkeypatch):
    """`imem repro check` (what CI runs): data stages compared with git, then every metric against its rule; it
    prints per rule what moved and the share of the tolerance used, and each violation."""
    import io

    from imem import reproducibility as rp

    lock = "schema: '2.0'\nstages:\n  prepare:\n    cmd: a\n  features:\n    cmd: b\n    outs: [x]\n"
    (tmp_path / "dvc.lock").write_text(lock)
    (tmp_path / "tol.yaml").write_text(RULES)
    metrics = {"reports/evaluate/cnn/metrics.json": {"best.sim_mse": {"old": 0.04, "new": 0.0405},
                                                    "best.i2m_r5": {"old": 0.62, "new": 0.66},
                                                    "best_epoch": {"old": 6, "new": 14}}}

    def fake_run(cmd, cwd):
        if cmd[:2] == ["git", "diff"]:
            return ""
        if cmd[:2] == ["git", "show"]:
            return lock
        return json.dumps(metrics)

    monkeypatch.setattr(rp, "_run", fake_run)
    out = io.StringIO()
    assert rp.check(tmp_path, tolerance=tmp_path / "tol.yaml", out=out)
    text = out.getvalue()
    assert "metrics: 2 checked against HEAD, 3 moved, 0 outside" in text
    assert "'*_mse*': 1/1 moved, largest |diff| 0.0005 (allowed 0.001 + 0.1*|old|, 10 % of allowed;" in text
    assert "'*': 1/1 moved, largest |diff| 0.04 (allowed 0.05, 80 % of allowed;" in text
    assert "'*:*best_epoch*': 1/1 moved, largest |diff| 8 (allowed skipped; worst" in text
    metrics["reports/evaluate/cnn/metrics.json"]["best.i2m_r5"]["new"] = 0.68
    out = io.StringIO()
    assert not rp.check(tmp_path, tolerance=tmp_path / "tol.yaml", out=out)
    assert "120 % of allowed" in out.getvalue()
    assert "OUTSIDE: reports/evaluate/cnn/metrics.json:best.i2m_r5: committed 0.62, regenerated 0.68" in out.getvalue()
