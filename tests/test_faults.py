"""Fault injection (issue 16): each long stage -- features, train, evaluate, a method -- is killed with
SIGKILL at a random point (a new one on every run; IMEM_FAULT_SEED replays one) and re-run with the same
command, as ``dvc repro`` would. Its outputs must equal those of an uninterrupted run, no temporary file may
be left, and the killed MLflow run must be marked KILLED.
(A killed tune worker: tests/test_tune.py; train --resume after kill -9: tests/test_training.py.)"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from corpus_fixtures import synth_pipeline

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "features": {"image_size": 32},
    "train": {"common": {"epochs": 4, "batch_size": 16, "cache_batch_size": 16, "n_seeds": 1},
              "encoders": {"r18": {"type": "resnet", "arch": "resnet18", "pretrained": None}},
              "variants": {"cnn": {"kind": "matching", "image_encoder": "r18", "music_encoder": "r18",
                                   "image_head": "pool", "music_head": "pool"}}},
    "evaluate": {"bootstrap": {"n": 50, "seed": 2026, "level": 0.95}},
    "methods": {"common": {"seed": 1, "device": "cpu", "image_encoder": "r18", "music_encoder": "r18"},
                "emo_clim": {"epochs": 4, "batch_size": 16, "lr": 1.0e-3}},
}
# stage -> (command, outputs compared, the MLflow experiment it logs to or None)
STAGES = {
    "features": (["stages/features.py"], ["artifacts/features"], None),
    "train": (["stages/train.py", "cnn"], ["models/cnn/best.pt", "models/cnn/last.pt", "reports/train/cnn/metrics.json"],
              "imem-train"),
    "evaluate": (["stages/evaluate.py", "cnn"], ["reports/evaluate/cnn/metrics.json", "reports/evaluate/cnn/regression.md"],
                 "imem-train"),
    "method": (["stages/method.py", "emo_clim"], ["models/methods/emo_clim/model.pt",
                                                 "reports/methods/emo_clim/metrics.json"], "imem-methods"),
}
ORDER = ["features", "train", "evaluate", "method"]


def _env(work: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "IMEM_BACKBONE_CACHE": "off",
            "PYTHONPATH": str(ROOT)}


def _run(work: Path, stage: str, kill_after: float | None = None) -> tuple[int, float]:
    cmd, _, _ = STAGES[stage]
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], cwd=work, env=_env(work),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    rc = p.wait(timeout=900)
    if kill_after is None:
        assert rc == 0, p.stderr.read()
    return rc, time.perf_counter() - t0


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _snapshot(work: Path, outputs: list[str]) -> dict:
    out = {}
    for o in outputs:
        p = work / o
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            data = f.read_bytes()
            out[str(f.relative_to(work))] = (_without_timings(json.loads(data)) if f.suffix == ".json" else data)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A work directory laid out like the repository, every stage run once without interruption."""
    tmp = tmp_path_factory.mktemp("faults")
    synth_pipeline(tmp / "build")
    work = tmp / "ref"
    (work / "artifacts").mkdir(parents=True)
    shutil.copytree(tmp / "build" / "prepare", work / "artifacts" / "prepare")
    (work / "reports" / "prepare").mkdir(parents=True)
    shutil.copy2(tmp / "build" / "rep" / "stats.json", work / "reports" / "prepare" / "stats.json")
    (work / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    before, seconds = {}, {}
    for stage in ORDER:
        before[stage] = work.with_name(f"before_{stage}")
        shutil.copytree(work, before[stage], ignore=shutil.ignore_patterns("mlflow.db"))
        _, seconds[stage] = _run(work, stage)
    return work, before, seconds


def _leftovers(work: Path) -> list[str]:
    return [str(p.relative_to(work)) for p in work.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ORDER)
def test_a_stage_killed_at_a_random_point_reruns_to_the_same_outputs(reference, stage, tmp_path):
    import mlflow

    work, before, seconds = reference
    _, outputs, experiment = STAGES[stage]
    trial = tmp_path / "w"
    shutil.copytree(before[stage], trial)
    # a new random point on every run (the contract must hold at any); IMEM_FAULT_SEED=<seed> replays one
    seed = os.environ.get("IMEM_FAULT_SEED") or str(random.SystemRandom().randrange(10**9))
    rng = random.Random(f"{stage}-{seed}")
    when = rng.uniform(0.4, 0.7) * seconds[stage]  # past the imports (about a third of a short stage's time)
    replay = f"(replay: IMEM_FAULT_SEED={seed})"
    for _ in range(3):  # a loaded machine can make this run faster than the reference: then kill earlier
        rc, _ = _run(trial, stage, kill_after=when)
        if rc == -signal.SIGKILL:
            break
        shutil.rmtree(trial)
        shutil.copytree(before[stage], trial)
        when /= 2
    assert rc == -signal.SIGKILL, f"{stage} finished within {when:.1f} s; the kill came too late to test anything"
    _run(trial, stage)  # the same command again, as `dvc repro` would
    assert _snapshot(trial, outputs) == _snapshot(work, outputs), f"killed after {when:.1f} s {replay}"
    assert _leftovers(trial) == [], replay
    if experiment:
        mlflow.set_tracking_uri(f"sqlite:///{trial / 'mlflow.db'}")
        runs = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time ASC"])
        statuses = runs["status"].tolist()
        # the killed run (if it had started one) is KILLED, the re-run FINISHED; nothing is left RUNNING
        assert statuses[-1] == "FINISHED" and set(statuses[:-1]) <= {"KILLED"}, (statuses, replay)
