"""MLflow tracking: where runs go, what every run records, and how a failure is marked.

Tracking URI: ``$MLFLOW_TRACKING_URI`` when set (a server, or any store URI), otherwise a SQLite file
``mlflow.db`` at the repository root -- resolved from ``$DVC_ROOT`` (set by DVC inside stages and
queued experiments), else the git top level, else the working directory -- so that a stage run from
any working directory logs to the same store. Browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

Run names (issue 20): the given name plus the DVC experiment (``cnn (exp-3f2a1)``) when ``dvc exp run`` runs the
stage, else plus the git short sha (``cnn @5d08fda``), so re-runs of one variant can be told apart. Each
experiment carries a description (MLflow's ``mlflow.note.content`` tag). Evaluation and figures re-open the
training run (:func:`variant_run`) and then put its end time back: its duration stays the training's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from imem.errors import ImemError


def repo_root() -> Path:
    """The project's root. DVC's temporary and queued experiments run in a copy of the workspace at
    ``<root>/.dvc/tmp/exps/...`` (and set ``DVC_ROOT`` to that copy), which DVC deletes afterwards: their
    runs must still land in ``<root>/mlflow.db``, so a path inside ``.dvc/tmp`` is mapped back to ``<root>``."""
    if os.environ.get("DVC_ROOT"):
        root = Path(os.environ["DVC_ROOT"]).resolve()
    else:
        try:
            out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
            root = Path(out.stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            root = Path.cwd()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def ensure_store(uri: str) -> None:
    """A SQLite store that does not exist yet is created whole in a temporary file beside it and linked into
    place (no-clobber), so a process killed while MLflow creates its tables leaves no half-made ``mlflow.db``
    (its next start failed on "table ... already exists"; tests/test_faults.py). Another process that created
    the file first wins; other URIs are left to MLflow."""
    if not uri.startswith("sqlite:///"):
        return
    import tempfile

    from imem.io import clean_stale, publish_mode

    path = Path(uri[len("sqlite:///"):])
    if path.parent.is_dir():
        clean_stale(path)  # a killed creator's temporary
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)  # runs the migrations
        publish_mode(Path(tmp), directory=False)  # mkstemp's 0600 -> what a plain create would give
        try:
            os.link(tmp, path)
        except FileExistsError:  # a concurrent stage made it first: use theirs
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=repo_root())
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else ",".join(map(str, v))
    return out


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_tags() -> dict:
    """Where a run's process lives: host, boot and pid, so a later start can tell a dead RUNNING run."""
    import socket

    return {"imem.host": socket.gethostname(), "imem.boot_id": _boot_id(), "imem.pid": str(os.getpid())}


SHARED_PID = "shared"  # the imem.pid tag of a run several processes hold (an Optuna study's parent run)


def mark_dead_runs(client, experiment_id: str, keep: tuple[str, ...] = ()) -> list[str]:
    """RUNNING runs of the experiment whose process is gone (kill -9, OOM killer, power loss) are marked
    KILLED (issue 16 item 6); returns their ids. Only runs started on this host in this boot are judged, by
    their ``imem.pid`` tag: a run of another machine (or of before a reboot) cannot be checked from here and
    is left as it is. A pid reused by a live process keeps its run RUNNING (the safe side). A run several
    processes share (an Optuna study's parent run, tagged ``imem.pid = shared``) is never judged by one pid:
    its workers end it (imem.tuning)."""
    import mlflow

    from imem.io import process_alive

    me = process_tags()
    active = mlflow.active_run()  # this process holds it (and, nested, its parent): alive by definition
    keep = (*keep, *((active.info.run_id, active.data.tags.get("mlflow.parentRunId", "")) if active else ()))
    try:
        runs = client.search_runs([experiment_id], max_results=1000,
                                  filter_string=f"attributes.status = 'RUNNING' and tags.`imem.host` = '{me['imem.host']}'")
    except Exception:  # an old store without these tags, or a server that cannot filter: nothing to judge
        return []
    dead = []
    for r in runs:
        tags = r.data.tags
        pid = tags.get("imem.pid", "")
        if r.info.run_id in keep or tags.get("imem.boot_id") != me["imem.boot_id"] or not pid.isdigit():
            continue
        if not process_alive(int(pid)):
            client.set_tag(r.info.run_id, "imem.killed", "its process was gone when a later run of this "
                                                        f"experiment started (pid {pid})")
            client.set_terminated(r.info.run_id, status="KILLED")
            dead.append(r.info.run_id)
    return dead


# What each experiment holds, shown on its page in the MLflow UI.
EXPERIMENT_DESCRIPTIONS = {
    "imem-train": "imem train stages (dvc.yaml train@<variant>): one run per variant and training seed, with "
                  "per-epoch losses, checkpoints, the val/test MSEs; evaluate@ and visualize@ add the test-split "
                  "tables, bootstrap intervals and figures to the same run. Numbers on the embedded corpus are "
                  "generated data, not a reproduction of any paper.",
    "imem-methods": "The related methods (stage method@<name>: MMVA, Emo-CLIM, CMER-CL; sp_net): one run per "
                    "method with its losses, results table and bootstrap intervals.",
    "imem-compare": "The comparison stage: every variant and method in one table (mean +-std over seeds, 95 % "
                    "bootstrap intervals) and the paired differences.",
    "imem-tune": "imem tune: one parent run per Optuna study (trials table, Optuna's figures, best value) and a "
                 "nested run per trial (per-epoch losses, validation MSE/MAE table, best checkpoint).",
}


def set_experiment(name: str):
    """``mlflow.set_experiment`` that also gives a known experiment its description (once), and, for a SQLite
    store, keeps artifacts beside the store: a new experiment's artifact root is ``<store folder>/mlruns/<name>``
    (MLflow's default, ``./mlruns``, follows the working directory of whichever process created it), and an
    experiment whose root lies outside the store's folder -- a copied or moved checkout's ``mlflow.db`` still
    names the original's absolute paths -- is refused, since its new runs would write into the other checkout."""
    import mlflow

    uri = tracking_uri()
    client = mlflow.tracking.MlflowClient()
    store = Path(uri[len("sqlite:///"):]).resolve().parent if uri.startswith("sqlite:///") else None
    if store is not None and client.get_experiment_by_name(name) is None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # a concurrent stage created it first
            client.create_experiment(name, artifact_location=str(store / "mlruns" / name))
    exp = mlflow.set_experiment(name)
    loc = exp.artifact_location
    if store is not None and (loc.startswith("/") or loc.startswith("file:")):
        from mlflow.utils.file_utils import local_file_uri_to_path

        where = Path(local_file_uri_to_path(loc)).resolve()
        if not where.is_relative_to(store):
            raise ImemError(
                f"{uri}: experiment {name!r} keeps its artifacts in {where}, outside this store's folder {store}: "
                "the store was copied or moved from another checkout, so new runs would write there; move this "
                "checkout's mlflow.db and mlruns/ aside (a fresh store is made) or set MLFLOW_TRACKING_URI "
                "(docs/training.md, 'A copied checkout')")
    text = EXPERIMENT_DESCRIPTIONS.get(name)
    if text and exp.tags.get("mlflow.note.content") != text:
        client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", text)
    return exp


def run_label(name: str) -> str:
    """``name`` plus what tells re-runs apart: the DVC experiment's name, else the git short sha."""
    exp = os.environ.get("DVC_EXP_NAME", "")
    if exp:
        return f"{name} ({exp})"
    sha = git_commit()
    return name if sha == "unknown" else f"{name} @{sha[:7]}"


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str, params: dict, tags: dict | None = None,
               nested: bool = False, resume_tags: dict | list[dict] | None = None) -> Iterator[object]:
    """An MLflow run with all params and the standard tags; an exception marks it FAILED. Dead RUNNING runs
    of the experiment are marked KILLED first (:func:`mark_dead_runs`). ``resume_tags``: continue the latest
    run of the experiment whose tags have these values (a resumed training finds its run by the content hash
    of the checkpoint it resumes from), or a list of such mappings tried in order; when the store has none, a
    new run tagged ``imem.resumed`` (the caller re-logs the earlier epochs)."""
    import mlflow

    try:
        ensure_store(tracking_uri())
        mlflow.set_tracking_uri(tracking_uri())
        exp = set_experiment(experiment)
        client = mlflow.tracking.MlflowClient()
        found = None
        for alternative in ([resume_tags] if isinstance(resume_tags, dict) else resume_tags or []):
            where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in alternative.items())
            hits = client.search_runs([exp.experiment_id], filter_string=where, max_results=1,
                                      order_by=["attributes.start_time DESC"])
            if hits:
                found = hits[0]
                break
        mark_dead_runs(client, exp.experiment_id, keep=(found.info.run_id,) if found else ())
    except ImemError:
        raise
    except Exception as exc:  # a broken or unreachable store
        raise ImemError(f"MLflow tracking store {tracking_uri()}: {str(exc).splitlines()[0]}") from exc
    if found is not None:
        with mlflow.start_run(run_id=found.info.run_id, nested=nested) as run:
            resumed = int(found.data.tags.get("imem.resumes", "0")) + 1
            mlflow.set_tags({**process_tags(), "imem.resumes": str(resumed)})
            yield run
        return
    std_tags = {"git.commit": git_commit(), "dvc.stage": os.environ.get("DVC_STAGE", ""),
                "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
                "imem.corpus": params.get("corpus", ""), **process_tags()}
    if resume_tags:
        std_tags["imem.resumed"] = "from a checkpoint whose run this store does not hold"
    with mlflow.start_run(run_name=run_label(run_name), nested=nested, tags={**std_tags, **(tags or {})}) as run:
        flat = {k: v for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
        yield run


@contextlib.contextmanager
def variant_run(variant: str, best_sha256: str, params: dict) -> Iterator[object]:
    """Re-open the training run of ``variant`` whose best checkpoint has this content hash (the train stage
    tags it ``imem.best_sha256``), so evaluation results and figures sit beside its losses. When the store
    has no such run -- a fresh store, or DVC restored the checkpoint from its run cache -- a new run tagged
    the same way takes them, marked ``imem.run_origin = evaluate``."""
    import mlflow

    try:
        ensure_store(tracking_uri())
        mlflow.set_tracking_uri(tracking_uri())
        exp = set_experiment("imem-train")
        mark_dead_runs(mlflow.tracking.MlflowClient(), exp.experiment_id)  # e.g. a killed earlier evaluation
        found = mlflow.search_runs([exp.experiment_id], output_format="list", max_results=1,
                                   filter_string=f"tags.`imem.variant` = '{variant}' and "
                                                 f"tags.`imem.best_sha256` = '{best_sha256}'",
                                   order_by=["attributes.start_time DESC"])
    except ImemError:
        raise
    except Exception as exc:  # a broken or unreachable store
        raise ImemError(f"MLflow tracking store {tracking_uri()}: {str(exc).splitlines()[0]}") from exc
    if found:
        before = found[0].info
        with mlflow.start_run(run_id=before.run_id) as run:
            mlflow.set_tags(process_tags())  # this process now holds the run (a kill leaves it to the next sweep)
            yield run
        if before.end_time:  # ending the run again set its end time to now: the training's duration stays true
            mlflow.tracking.MlflowClient().set_terminated(before.run_id, status=before.status, end_time=before.end_time)
        return
    with mlflow_run("imem-train", variant, params, tags={"imem.variant": variant, "imem.best_sha256": best_sha256,
                                                        "imem.run_origin": "evaluate"}) as run:
        yield run
