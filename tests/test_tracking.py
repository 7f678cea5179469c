from pathlib import Path

import pytest

from imem.errors import ImemError
from imem.tracking import flatten, repo_root, tracking_uri


def test_tracking_uri_defaults_to_sqlite_at_the_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_temporary_and_queued_experiments_log_to_the_main_root(monkeypatch, tmp_path):
    exp = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    exp.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(exp))
    assert repo_root() == (tmp_path / "proj").resolve()


def test_repo_root_without_dvc_is_the_git_top_level(monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(Path(__file__).parent)
    assert repo_root() == Path(__file__).resolve().parents[1]


def test_flatten_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "1,2", "d": "x"}


def test_params_come_from_the_stage_workspace_not_dvc_root(monkeypatch, tmp_path):
    """DVC points DVC_ROOT at the parent repo in --temp/queued experiments; the -S overrides live in the
    experiment's own workspace (the cwd)."""
    from imem.params import section

    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "params.yaml").write_text("prepare:\n  seed: 1\n")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "params.yaml").write_text("prepare:\n  seed: 2\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "parent"))
    monkeypatch.chdir(tmp_path / "exp")
    assert section("prepare")["seed"] == 2


_KILLED_WHILE_CREATING = """
import os, signal, sys
os.environ["DVC_ROOT"] = sys.argv[1]
os.environ.pop("MLFLOW_TRACKING_URI", None)
real_link = os.link
def link(src, dst, *a, **k):  # the tables are made; die before the store is linked into place
    os.kill(os.getpid(), signal.SIGKILL)
os.link = link
from imem.tracking import mlflow_run
with mlflow_run("imem-test", "r", {"a": 1}):
    pass
"""

_ONE_RUN = """
import os, sys
os.environ["DVC_ROOT"] = sys.argv[1]
os.environ.pop("MLFLOW_TRACKING_URI", None)
from imem.tracking import mlflow_run
with mlflow_run("imem-test", "r" + sys.argv[2], {"a": 1}) as run:
    print(run.info.run_id)
"""


def test_a_process_killed_while_creating_the_store_leaves_no_half_made_mlflow_db(tmp_path):
    """tests/test_faults.py once failed with "table registered_models already exists": a stage killed while
    MLflow created mlflow.db's tables left a half-made store that every later run refused. The store is made
    in a temporary file and linked into place: the kill leaves only that temporary, the next run removes it."""
    import signal
    import subprocess
    import sys

    import mlflow

    r = subprocess.run([sys.executable, "-c", _KILLED_WHILE_CREATING, str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()
    left = list(tmp_path.glob(".mlflow.db.*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size > 0  # the tables were being written there
    # three runs at once on the store that does not exist yet: all succeed, one store, three runs
    procs = [subprocess.Popen([sys.executable, "-c", _ONE_RUN, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    assert not list(tmp_path.glob(".mlflow.db.*.tmp"))  # the killed process's temporary is gone
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imem-test")
    ids = {o.strip().splitlines()[-1] for o, _ in outs}
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == ids and len(ids) == 3


def test_a_dead_pid_kills_a_run_but_never_a_shared_or_active_one(monkeypatch, tmp_path):
    """mark_dead_runs (issue 16 item 6) marks a RUNNING run of this host and boot KILLED when its process is
    gone; an Optuna study's parent run, shared by several workers (imem.pid = shared), and the run this
    process holds (a trial's parent, even with another worker's pid) are never judged dead."""
    import subprocess
    import sys

    import mlflow

    from imem.tracking import SHARED_PID, mark_dead_runs, mlflow_run, process_tags

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = str(gone.pid)
    with mlflow_run("imem-t", "first", {}):
        pass
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("imem-t").experiment_id
    ids = {}
    for name, pid in (("killed", dead), ("shared", SHARED_PID), ("parent", dead)):
        run = client.create_run(exp, run_name=name, tags={**process_tags(), "imem.pid": pid})
        ids[name] = run.info.run_id
    with mlflow.start_run(run_id=ids["parent"]):  # this process joins a run another (dead) pid created
        with mlflow_run("imem-t", "trial", {}, nested=True):  # its start sweeps the experiment
            pass
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {"killed": "KILLED", "shared": "RUNNING", "parent": "FINISHED"}, status
    assert "pid " + dead in client.get_run(ids["killed"]).data.tags["imem.killed"]
    assert "imem.killed" not in client.get_run(ids["parent"]).data.tags  # not killed, then ended FINISHED
    assert mark_dead_runs(client, exp) == []  # nothing left to judge: the shared run stays RUNNING


def test_artifacts_live_beside_the_store_and_a_copied_store_is_refused(monkeypatch, tmp_path):
    """A new experiment keeps its artifacts in <store folder>/mlruns/<name>, whatever the working directory; a
    checkout copied with its mlflow.db would log new runs into the original's folder (absolute paths in the
    store), so imem refuses it in one line naming both folders (issue 20)."""
    import shutil

    import mlflow

    from imem.tracking import mlflow_run

    first, elsewhere = tmp_path / "checkout", tmp_path / "cwd"
    first.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's own default root would be ./mlruns here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{first / 'mlflow.db'}")
    with mlflow_run("imem-train", "cnn", {"corpus": ""}) as run:
        mlflow.log_text("x", "a.txt")
    art = Path(mlflow.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://"))
    assert art.is_relative_to(first / "mlruns" / "imem-train") and (art / "a.txt").is_file()
    assert not (elsewhere / "mlruns").exists()
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    with pytest.raises(ImemError, match=rf"experiment 'imem-train' keeps its artifacts in {first}/mlruns/imem-train, "
                                        rf"outside this store's folder {copy}: the store was copied") as e:
        with mlflow_run("imem-train", "cnn", {"corpus": ""}):
            pass
    assert "\n" not in str(e.value)
    assert len(list((first / "mlruns" / "imem-train").iterdir())) == 1  # nothing was written into the original
