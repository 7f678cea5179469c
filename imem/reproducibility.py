"""The reproducibility contract (issue 14): what `make repro` must give on any machine, and how it is checked.

Two kinds of output, two promises:

- **Data stages** (the corpus of ``imem synth``, ``prepare``, ``features``) are byte-identical anywhere:
  ``data.dvc`` and ``reports/prepare`` equal git's copies, and the ``prepare`` and ``features`` entries of
  ``dvc.lock`` (every dependency and output hash) equal the committed ones.
- **Trained outputs** (``train``, ``evaluate``, the methods, the comparison) move with the CPU: another
  instruction set (AVX2 against AVX-512) or another thread count changes float reductions in the last
  bits, and training amplifies that. Every committed metric of those stages must lie within a stated
  tolerance of the regenerated one. The tolerances live in ``reproducibility.yaml``, each rule with the
  deviation it was derived from; ``imem repro perturb`` measures them again (:func:`perturbed_run`).

:func:`check_metrics` is a pure function over ``dvc metrics diff --json --all <rev>``'s output, so the
rule matching is tested without DVC; :func:`check` adds the DVC and git calls that CI runs.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from imem.errors import ImemError

TOLERANCE_FILE = "reproducibility.yaml"
DATA_STAGES = ("prepare", "features")
# Byte-identical anywhere: prepare (measured identical under every perturbation). The features stage computes
# its float16 matrices with torch: under AVX2 kernels and one thread 0.015 % of the handcrafted values moved by
# one float16 step (measured, docs/reproducibility.md), so only its inputs must match and its output hash may not.
EXACT_STAGES = ("prepare",)


# --- tolerance rules --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """``|new - old| <= abs + rel * |old|`` for metrics whose ``<file>:<key>`` matches ``match``; ``exact``
    means equality; ``skip`` exempts the metric (with ``why``)."""

    match: str
    abs: float = 0.0
    rel: float = 0.0
    exact: bool = False
    skip: bool = False
    why: str = ""

    def allows(self, old: float, new: float) -> bool:
        if self.skip:
            return True
        if self.exact:
            return old == new or (_nan(old) and _nan(new))
        if _nan(old) or _nan(new):
            return _nan(old) and _nan(new)
        return abs(new - old) <= self.abs + self.rel * abs(old) + 1e-12

    def limit(self, old: float) -> float:
        return 0.0 if self.exact else self.abs + self.rel * abs(old)

    def allowed(self) -> str:
        """The tolerance as text: skipped, exact, or ``abs + rel*|old|``."""
        if self.skip or self.exact:
            return "skipped" if self.skip else "exact"
        return f"{self.abs:.3g}" + (f" + {self.rel:.3g}*|old|" if self.rel else "")


NO_RULE = Rule("(no rule: exact)", exact=True)  # a metric no rule names must be exact


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def load_rules(path: str | os.PathLike = TOLERANCE_FILE) -> list[Rule]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ImemError(f"{path}: cannot read the tolerance file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ImemError(f"{path}: not valid YAML ({exc})") from exc
    rules = []
    for i, r in enumerate((doc or {}).get("rules") or []):
        where = f"{path}: rules[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("match"), str):
            raise ImemError(f"{where}: needs a 'match' pattern (a string)")
        unknown = sorted(set(r) - {"match", "abs", "rel", "exact", "skip", "why", "measured"})
        if unknown:
            raise ImemError(f"{where}: unknown key {unknown[0]!r}")
        for k in ("abs", "rel"):
            v = r.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ImemError(f"{where}.{k} = {v!r}: must be a finite number >= 0")
        if r.get("skip") and not r.get("why"):
            raise ImemError(f"{where}: a skipped metric needs a 'why'")
        rules.append(Rule(r["match"], float(r.get("abs", 0.0)), float(r.get("rel", 0.0)), bool(r.get("exact", False)),
                          bool(r.get("skip", False)), str(r.get("why", ""))))
    if not rules:
        raise ImemError(f"{path}: no rules")
    return rules


def rule_for(name: str, rules: list[Rule]) -> Rule:
    """The first rule whose pattern matches ``<file>:<key>``; a metric no rule covers must be exact."""
    for r in rules:
        if fnmatch.fnmatchcase(name, r.match):
            return r
    return NO_RULE


# --- checking -----------------------------------------------------------------------------------------

@dataclass
class Finding:
    name: str
    old: object
    new: object
    rule: Rule

    def line(self) -> str:
        if self.old is None or self.new is None:
            return f"{self.name}: {'missing in the regenerated outputs' if self.new is None else 'not committed'}"
        if not (_number(self.old) and _number(self.new)):
            return f"{self.name}: committed {self.old!r}, regenerated {self.new!r} (must be equal)"
        lim = "must be equal" if self.rule.exact else f"allowed {self.rule.limit(float(self.old)):.4g}"
        return (f"{self.name}: committed {self.old!r}, regenerated {self.new!r} "
                f"(|diff| {abs(float(self.new) - float(self.old)):.4g}, {lim}; rule {self.rule.match!r})")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_metrics(diff: dict, rules: list[Rule]) -> tuple[list[Finding], int]:
    """Violations in ``dvc metrics diff --json --all`` output ({file: {key: {old, new, diff}}}), and the
    number of metrics checked. A metric that appears or disappears is a violation (unless skipped)."""
    bad, n = [], 0
    for path, metrics in sorted(diff.items()):
        for key, v in sorted(metrics.items()):
            name = f"{path}:{key}"
            rule = rule_for(name, rules)
            old, new = v.get("old"), v.get("new")
            if rule.skip:
                continue
            n += 1
            if old is None or new is None:
                if old is not None or new is not None:
                    bad.append(Finding(name, old, new, rule))
                continue
            if not (_number(old) and _number(new)):
                if old != new:
                    bad.append(Finding(name, old, new, rule))
                continue
            if not rule.allows(float(old), float(new)):
                bad.append(Finding(name, old, new, rule))
    return bad, n


def lock_entries(text: str) -> dict:
    doc = yaml.safe_load(text) or {}
    return {s: doc.get("stages", {}).get(s) for s in DATA_STAGES}


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise ImemError(f"cannot run {cmd[0]}: {exc.strerror}") from exc
    if res.returncode != 0:
        raise ImemError(f"`{' '.join(cmd)}` failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return res.stdout


def check(root: str | os.PathLike = ".", rev: str = "HEAD", tolerance: str | os.PathLike | None = None,
          out=sys.stdout) -> bool:
    """CI's check after `make repro`: data stages byte-identical to ``rev``, every metric within tolerance.
    Prints what it checked and every violation; returns True when the contract holds."""
    root = Path(root).resolve()
    rules = load_rules(tolerance or root / TOLERANCE_FILE)
    ok = True
    # 1. data stages: data.dvc and reports/prepare as committed, the dvc.lock entries of prepare and features equal
    changed = _run(["git", "diff", "--name-only", rev, "--", "data.dvc", "reports/prepare"], root).split()
    committed = lock_entries(_run(["git", "show", f"{rev}:dvc.lock"], root))
    current = lock_entries((root / "dvc.lock").read_text())
    for stage in DATA_STAGES:
        old, new = committed[stage] or {}, current[stage] or {}
        if stage in EXACT_STAGES and old != new:
            changed.append(f"dvc.lock: stage {stage}")
        elif {k: v for k, v in old.items() if k != "outs"} != {k: v for k, v in new.items() if k != "outs"}:
            changed.append(f"dvc.lock: the inputs of stage {stage}")
    print(f"data stages (synth corpus, {', '.join(EXACT_STAGES)}): "
          + ("byte-identical to " + rev if not changed else "CHANGED: " + ", ".join(changed)), file=out)
    feats_same = (committed["features"] or {}).get("outs") == (current["features"] or {}).get("outs")
    print("features: " + ("byte-identical to " + rev if feats_same else
                          "same inputs, output hash differs from " + rev + " (expected on another CPU: float16 rounding "
                          "of the handcrafted matrices, docs/reproducibility.md; the metrics below are what counts)"),
          file=out)
    ok &= not changed
    # 2. every metric of the pipeline within its tolerance
    diff = json.loads(_run([_dvc(), "metrics", "diff", rev, "--all", "--json"], root) or "{}")
    bad, n = check_metrics(diff, rules)
    moved = sum(1 for m in diff.values() for v in m.values() if v.get("old") != v.get("new"))
    print(f"metrics: {n} checked against {rev}, {moved} moved, {len(bad)} outside the tolerance "
          f"({TOLERANCE_FILE})", file=out)
    print("per rule (what moved, and the largest share of its tolerance used):", file=out)
    for line in deviation_lines(diff, rules) or ["(nothing moved)"]:
        print("  " + line, file=out)
    for f in bad:
        print("  OUTSIDE: " + f.line(), file=out)
    return ok and not bad


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else "dvc"


# --- measuring the tolerance ------------------------------------------------------------------------------

# Environment settings that make this CPU compute like another one (oneDNN, MKL and OpenBLAS kernels of an
# older instruction set) and another thread count; see `imem repro perturb --help`.
_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
         "OPENBLAS_CORETYPE": "Haswell"}
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PERTURBATIONS = {
    "avx2": _AVX2,  # torch's own kernels, oneDNN, MKL and OpenBLAS as on an AVX2-only CPU (e.g. older AMD EPYC)
    "avx2-1thread": {**_AVX2, **_ONE_THREAD},
    "1thread": _ONE_THREAD,
}
COPY_PATHS = ("data", "artifacts/prepare", "artifacts/features")


def metrics_files(root: Path) -> list[str]:
    """Every metrics file of the default pipeline (``dvc metrics show``'s list, relative to ``root``)."""
    out = json.loads(_run([_dvc(), "metrics", "show", "--json"], root) or "{}")
    files = []
    for rev in out.values():
        files += list((rev.get("data") or {}).keys())
    return sorted(set(files))


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the key names `dvc metrics` uses)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def diff_dirs(a: Path, b: Path, files: list[str]) -> dict:
    """The ``dvc metrics diff --json --all`` shape for the numeric metrics of ``files`` under ``a`` (old) and ``b``."""
    out = {}
    for f in files:
        old = flatten(json.loads((a / f).read_text())) if (a / f).is_file() else {}
        new = flatten(json.loads((b / f).read_text())) if (b / f).is_file() else {}
        out[f] = {k: {"old": old.get(k), "new": new.get(k)} for k in sorted(set(old) | set(new))
                  if _number(old.get(k)) or _number(new.get(k))}
    return out


def perturbed_run(root: str | os.PathLike, work: str | os.PathLike, setting: str, out=sys.stdout,
                  stages: list[str] | None = None) -> dict:
    """Re-run the trained stages of ``root``'s pipeline (its working tree) in a clone at ``work`` under the
    environment ``PERTURBATIONS[setting]``; return the metrics diff (``root``'s current outputs -> perturbed).
    ``stages``: only these `dvc repro` targets (and what they need); the other metrics files are ``root``'s own
    copies, so they show no deviation.

    The clone gets ``root``'s data-stage outputs (byte-identical anywhere by the contract) and no DVC cache,
    so every trained stage runs; its own MLflow store and frozen-backbone cache keep ``root``'s untouched."""
    if setting not in PERTURBATIONS:
        raise ImemError(f"unknown perturbation {setting!r} (have: {', '.join(PERTURBATIONS)})")
    root, work = Path(root).resolve(), Path(work).resolve()
    if work.exists():
        raise ImemError(f"{work}: exists; give a new directory")
    _run(["git", "clone", "--quiet", str(root), str(work)], root)
    # the working tree as it is (modified and new files that git does not ignore), so uncommitted code is measured too
    for rel in _run(["git", "ls-files", "-mo", "--exclude-standard"], root).splitlines():
        src = root / rel
        if src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
        elif not src.exists() and (work / rel).exists():
            (work / rel).unlink()
    for p in COPY_PATHS:
        if not (root / p).exists():
            raise ImemError(f"{root / p}: missing (run `make repro` in {root} first)")
        shutil.copytree(root / p, work / p)
    env = dict(os.environ, **PERTURBATIONS[setting], PYTHONPATH=str(work),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the stages' `python`
               IMEM_BACKBONE_CACHE=str(work / ".backbones"), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    t0 = time.perf_counter()
    print(f"perturbed run '{setting}' ({' '.join(f'{k}={v}' for k, v in PERTURBATIONS[setting].items())}) in {work}",
          file=out, flush=True)
    res = subprocess.run([_dvc(), "repro", *(stages or ["dvc.yaml"])], cwd=work, env=env)
    if res.returncode != 0:
        raise ImemError(f"the perturbed `dvc repro` in {work} failed (exit {res.returncode})")
    print(f"perturbed run took {time.perf_counter() - t0:.0f} s", file=out)
    ours, theirs = lock_entries((root / "dvc.lock").read_text()), lock_entries((work / "dvc.lock").read_text())
    for stage in DATA_STAGES:  # the data stages ran again under the perturbation: still byte-identical?
        same = ours[stage] == theirs[stage]
        print(f"data stage {stage}: {'byte-identical' if same else 'DIFFERENT'} outputs and dependencies", file=out)
    _compare_features(root, work, out)
    return diff_dirs(root, work, metrics_files(root))


def _compare_features(a: Path, b: Path, out) -> None:
    """How many values of each feature-store array differ between two checkouts, and by how much."""
    import numpy as np

    for f in sorted((a / "artifacts" / "features").glob("*.npy")):
        x, y = np.load(f, mmap_mode="r"), np.load(b / "artifacts" / "features" / f.name, mmap_mode="r")
        if x.shape != y.shape:
            print(f"features {f.name}: shapes {x.shape} and {y.shape}", file=out)
            continue
        n_diff, max_abs = 0, 0.0
        for i in range(0, len(x), 64):  # in chunks: the arrays are memory-mapped
            xa, ya = np.asarray(x[i:i + 64], np.float64), np.asarray(y[i:i + 64], np.float64)
            d = np.abs(xa - ya)
            n_diff += int((d > 0).sum())
            max_abs = max(max_abs, float(d.max()) if d.size else 0.0)
        print(f"features {f.name}: {n_diff} of {x.size} values differ ({100 * n_diff / max(x.size, 1):.4f} %), "
              f"largest |diff| {max_abs:.4g}", file=out)


def summarize_deviation(diff: dict, rules: list[Rule]) -> list[dict]:
    """Per rule: the metrics it covers, how many moved, the largest |diff|, the largest |diff| / |old| and the
    largest share of the allowed deviation used (``used``: |diff| / (abs + rel * |old|); above 1 breaks the rule)."""
    def row(r: Rule) -> dict:
        return {"rule": r.match, "metrics": 0, "moved": 0, "max_abs": 0.0, "max_rel": 0.0, "used": 0.0, "worst": "",
                "_score": -1.0}

    rows = {r.match: row(r) for r in rules}
    rows[NO_RULE.match] = row(NO_RULE)
    for path, metrics in diff.items():
        for key, v in metrics.items():
            old, new = v.get("old"), v.get("new")
            rule = rule_for(f"{path}:{key}", rules)
            r = rows[rule.match]
            r["metrics"] += 1
            if not (_number(old) and _number(new)) or old == new:
                continue
            d = abs(float(new) - float(old))
            r["moved"] += 1
            if d > r["max_abs"]:
                r["max_abs"] = d
            if float(old) != 0:
                r["max_rel"] = max(r["max_rel"], d / abs(float(old)))
            # the worst metric: the largest share of the tolerance used (a skipped rule allows anything: the
            # largest move)
            lim = rule.limit(float(old))
            score = d if rule.skip else (d / lim if lim > 0 else math.inf)
            if score >= r["_score"]:
                r["_score"], r["worst"] = score, f"{path}:{key} {old} -> {new}"
                if not rule.skip:
                    r["used"] = score
    for r in rows.values():
        del r["_score"]
    return [r for r in rows.values() if r["metrics"]]


def deviation_lines(diff: dict, rules: list[Rule]) -> list[str]:
    """The per-rule summary as text, one line per rule under which a metric moved: what a run on another CPU
    measured (CI prints it, so every CI run is a measurement of the tolerances' headroom)."""
    by_rule = {NO_RULE.match: NO_RULE, **{r.match: r for r in rules}}
    lines = []
    for r in summarize_deviation(diff, rules):
        if not r["moved"]:
            continue
        rule = by_rule[r["rule"]]
        used = "" if rule.skip else f", {100 * r['used']:.0f} % of allowed"
        lines.append(f"{r['rule']!r}: {r['moved']}/{r['metrics']} moved, largest |diff| {r['max_abs']:.4g} "
                     f"(allowed {rule.allowed()}{used}; worst {r['worst']})")
    return lines
