"""Hyperparameter tuning with Optuna (`imem tune`): learning rate, the CFM margin alpha, the head strategy
(and the loss-combination mode and batch size) of one variant, tracked in MLflow.

* Objective: a validation loss of the epoch rows (``tune.objective``; default ``sim``: the validation
  similarity MSE, CDCML eq. 7), reported to Optuna after every epoch (median or Hyperband pruner); the
  trial's value is that metric at the epoch whose checkpoint training keeps (lowest validation total,
  ``best.pt``), i.e. the model the trial would deliver. A NaN/inf loss prunes the trial.
* Sampler: TPE, re-seeded for every trial with ``tune.seed + trial number``, so a study is reproducible
  however many workers share it (with one worker it is fully deterministic).
* Storage: ``--storage`` / ``$OPTUNA_STORAGE`` / ``tune.storage``, else the SQLite file ``optuna.db`` at the
  repository root. Any SQLAlchemy URL works (PostgreSQL for several machines); a path ending in
  ``.journal`` selects Optuna's journal file (no server, but no heartbeat either).
* Workers: run ``imem tune`` several times against one storage. Each worker claims a trial under a
  storage-wide lock (PostgreSQL advisory lock; ``flock`` on a file next to SQLite/journal files), so the
  workers finish exactly ``tune.n_trials`` COMPLETE + PRUNED trials between them. A worker records a
  trial's first heartbeat when it claims it and then every ``heartbeat_interval`` s; a trial without one
  for ``grace_period`` s (a killed worker) is marked FAIL by the next worker that claims, and re-enqueued
  with the same parameters (RetryHeartbeatStaleTrialCallback, up to ``max_retry`` times), both under the
  claim lock. A journal file has no heartbeat: a worker stops waiting for other workers' RUNNING trials
  after ``$IMEM_TUNE_WAIT_S`` s (default 3600) without progress, with one clear error.
* MLflow: one parent run per study (experiment ``imem-tune``; its id is kept in the study's user
  attributes so every worker nests under it) and one nested run per trial with the trial's parameters,
  per-epoch metrics, the final value and its state (tag ``optuna.state``; a pruned trial's run ends KILLED).
  The trial keeps the run id in its user attribute ``mlflow_run_id``. A complete trial's run also logs its
  validation MSE/MAE table (``val_errors.json`` via ``log_table``, and ``val_errors.md``) and, with
  ``tune.log_checkpoints: best``, its best checkpoint as ``checkpoints/best.pt`` (frozen backbones left out:
  heads and decoders only, :func:`imem.checkpoints.trained_part`), so ``imem predict --model
  runs:/<run id>/checkpoints/best.pt`` uses the trial's model without retraining; a pruned trial's run is
  tagged ``optuna.pruned_reason``. After every trial, under the claim lock, the parent run gets the finished
  trials' rows appended to its ``trials.json`` table and Optuna's figures (``figures/``: optimization history,
  parameter importances, slice, parallel coordinates) redrawn. Workers on several machines need
  one shared ``MLFLOW_TRACKING_URI`` (an ``mlflow server``); without it a worker that cannot find the
  parent run warns and opens its own.
* Output: ``reports/tune/best_params.yaml`` (the best trial as params.yaml keys, plus the settings that
  one-value lists of ``tune.space`` fix, the ``dvc exp run -S`` command that promotes them, and the MLflow
  URI of the best trial's checkpoint; params.yaml itself is never rewritten) and ``reports/tune/trials.csv``.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import math
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from imem import distributed as ddp
from imem.errors import ImemError
from imem.io import scratch_dir, write_csv, write_text
from imem.losses import LOSS_NAMES, NonFiniteLoss
from imem.models.encoders import SEQUENCE_ENCODERS, SEQUENCE_HEADS
from imem.tracking import SHARED_PID
from imem.training import StoppedByRank0, train_variant, variant_config

EXPERIMENT = "imem-tune"
# The worker loop below is ask/tell with its own heartbeat thread (Study.optimize cannot stop at an exact
# trial count across workers); Optuna warns about heartbeats outside optimize and marks fail_stale_trials
# experimental: both are intended here.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="imem.tuning")
warnings.filterwarnings("ignore", message=r"Argument ``(heartbeat_interval|grace_period)`` is an experimental")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
CHECKPOINT_MODES = ("best", "none")  # tune.log_checkpoints
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"  # where a trial's run keeps its model (what imem predict reads)


# --- storage --------------------------------------------------------------------------------------------

def storage_url(arg: str | None, params: dict) -> str:
    """``--storage``, else ``$OPTUNA_STORAGE``, else ``tune.storage``, else ``sqlite:///<repo>/optuna.db``."""
    from imem.tracking import repo_root

    url = arg or os.environ.get("OPTUNA_STORAGE") or params.get("storage") or ""
    return url or f"sqlite:///{repo_root() / 'optuna.db'}"


class StaleTrial:
    """Heartbeat-stale trial (its worker died): retry it with the same parameters (Optuna's
    RetryHeartbeatStaleTrialCallback: ``failed_trial`` / ``retry_history`` system attributes) and mark
    its MLflow run FAILED (the dead worker could not)."""

    def __init__(self, max_retry: int, track: bool):
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.track = track

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.track and run_id:
            import mlflow

            from imem.tracking import tracking_uri

            client = mlflow.tracking.MlflowClient(tracking_uri())
            client.set_tag(run_id, "optuna.state", "FAIL")
            client.set_terminated(run_id, status="FAILED")


def open_storage(url: str, params: dict, track: bool = False) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats and the retry callback, or a journal file (``*.journal``)."""
    if url.endswith(".journal") and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    retry = StaleTrial(int(params["max_retry"]), track)
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=int(params["heartbeat_interval"]), grace_period=int(params["grace_period"]),
            heartbeat_stale_trial_callback=retry, engine_kwargs=_engine_kwargs(url))
    except Exception as exc:  # bad URL, unreachable server, missing driver
        raise ImemError(f"Optuna storage {_redact(url)}: {str(exc).splitlines()[0]}") from exc


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several local workers wait for the write lock
    return {"pool_pre_ping": True}


def _redact(url: str) -> str:
    """The URL without a password (``user:secret@host`` -> ``user:***@host``)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


@contextlib.contextmanager
def claim_lock(storage: optuna.storages.BaseStorage, url: str) -> Iterator[None]:
    """A lock shared by every worker of the storage, held while a worker claims its next trial."""
    engine = getattr(storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        with engine.connect() as conn, _pg_advisory_lock(conn, b"imem-tune-claim"):
            yield
        return
    if engine is not None and engine.dialect.name == "sqlite":
        path = Path(engine.url.database or "optuna.db")
    elif url.endswith(".journal"):
        path = Path(url)
    else:
        raise ImemError(f"Optuna storage {_redact(url)}: workers can share only PostgreSQL, SQLite or journal "
                        "files (no claim lock for this backend)")
    with _file_lock(path):
        yield


@contextlib.contextmanager
def _pg_advisory_lock(conn, name: bytes) -> Iterator[None]:
    """A PostgreSQL session advisory lock named ``name``, held on ``conn`` for the block."""
    from sqlalchemy import text

    key = zlib.crc32(name)
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
    try:
        yield
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.commit()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # not "<file>.lock": Optuna's journal backend takes that name for its own (symlink) lock, and a regular
    # file there made every journal write wait for that lock's 30-s timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.claim-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def setup_lock(url: str) -> Iterator[None]:
    """Held while a worker opens the storage (Optuna creates its tables and alembic version on first use)
    and creates or loads the study: two workers starting on a new storage otherwise race there
    (``UNIQUE constraint failed: alembic_version.version_num``, ``table studies already exists``; issue 16
    item 3). The same file lock as :func:`claim_lock` for SQLite and journal files; a PostgreSQL advisory
    lock of its own key on a short-lived connection."""
    if url.endswith(".journal") and "://" not in url:
        with _file_lock(Path(url)):
            yield
        return
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as exc:  # not a URL at all: the storage's own error says more
        raise ImemError(f"Optuna storage {_redact(url)}: {str(exc).splitlines()[0]}") from exc
    if parsed.get_backend_name() == "sqlite":
        with _file_lock(Path(parsed.database or "optuna.db")):
            yield
        return
    if parsed.get_backend_name() != "postgresql":
        yield  # claim_lock refuses such a storage for several workers anyway
        return
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(url, poolclass=NullPool, pool_pre_ping=True)
        conn = engine.connect()
    except Exception as exc:  # unreachable server, bad credentials, missing driver
        raise ImemError(f"Optuna storage {_redact(url)}: {str(exc).splitlines()[0]}") from exc
    try:
        with _pg_advisory_lock(conn, b"imem-tune-setup"):
            yield
    finally:
        conn.close()
        engine.dispose()


def open_study(url: str, params: dict, study_name: str, track: bool = False) -> tuple:
    """The storage and the study (created on first use), both under :func:`setup_lock`."""
    with setup_lock(url):
        storage = open_storage(url, params, track)
        study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize",
                                    pruner=make_pruner(params), sampler=make_sampler(params, 0), load_if_exists=True)
        if study.metric_names is None:  # optuna-dashboard then labels the objective val/sim, not "Objective 0"
            study.set_metric_names([objective_name(params)])  # its ExperimentalWarning: filtered at the top
    return storage, study


def objective_name(params: dict) -> str:
    """The metric a study minimises under the name its trials' MLflow runs log it: ``val/<objective>``
    (``val/sim``: the similarity loss on the validation pairs, a mean squared error for the thesis' variants
    and a sum for CDCML's, as each paper reduces it)."""
    return f"val/{params['objective']}"


class Heartbeat:
    """Records the trial's heartbeat now and every ``heartbeat_interval`` seconds in a thread (what
    ``Study.optimize`` does internally; the ask/tell loop here has to do it itself)."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _heartbeat_enabled(storage) -> bool:
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


# --- search space -----------------------------------------------------------------------------------------

def head_choices(cfg: dict, wanted: list[str]) -> dict[str, list[str]]:
    """Per side: the head strategies to try. An encoder whose output is one vector (ResNet, L3-Net's
    subnetworks, the handcrafted statistics) offers only ``pool``; a transformer (ViT, BEATs) the ``wanted``
    ones among flatten (v1), cls (v2) and mean."""
    out = {}
    for side in ("image", "music"):
        spec = cfg.get(f"{side}_encoder")
        if spec is None:
            continue
        if spec["type"] not in SEQUENCE_ENCODERS:
            out[side] = ["pool"]
        else:
            bad = [h for h in wanted if h not in SEQUENCE_HEADS]
            if bad:
                raise ImemError(f"params: tune.space.head: {bad[0]!r} is not a transformer head "
                                f"(one of: {', '.join(SEQUENCE_HEADS)})")
            out[side] = list(wanted) or [cfg[f"{side}_head"]]
    return out


def suggest(trial: optuna.Trial, base: dict, space: dict) -> dict:
    """The trial's variant config: ``base`` with the sampled values. One ``head`` parameter sets the head
    of every transformer side (the thesis compares v1/v2 with the same strategy on both sides)."""
    cfg = copy.deepcopy(base)
    lr = space["lr"]
    cfg["lr"] = trial.suggest_float("lr", float(lr["low"]), float(lr["high"]), log=bool(lr["log"]))
    m = space["margin"]
    cfg["margin"] = trial.suggest_float("margin", float(m["low"]), float(m["high"]), log=bool(m["log"]))
    choices = head_choices(cfg, list(space["head"]))
    tunable = sorted({h for c in choices.values() if c != ["pool"] for h in c}, key=SEQUENCE_HEADS.index)
    if len(tunable) > 1:
        head = trial.suggest_categorical("head", tunable)
        for side, c in choices.items():
            if c != ["pool"]:
                cfg[f"{side}_head"] = head
    for key in ("loss_mode", "batch_size"):
        if len(space[key]) > 1:
            cfg[key] = trial.suggest_categorical(key, list(space[key]))
    cfg.update(fixed_settings(base, space))
    return cfg


def fixed_settings(base: dict, space: dict) -> dict:
    """The variant config keys a one-value list of ``tune.space`` fixes for every trial (not Optuna
    parameters, so the best trial's ``params`` lack them; the promote command must set them too)."""
    out: dict = {}
    if len(space["head"]) == 1:
        for side, c in head_choices(base, list(space["head"])).items():
            if c != ["pool"]:
                out[f"{side}_head"] = space["head"][0]
    for key in ("loss_mode", "batch_size"):
        if len(space[key]) == 1:
            out[key] = space[key][0]
    return out


def make_pruner(params: dict) -> optuna.pruners.BasePruner:
    name = params["pruner"]
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(params["pruner_startup_trials"]),
                                           n_warmup_steps=int(params["pruner_warmup_epochs"]))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=int(params["epochs"]))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ImemError(f"params: tune.pruner = {name!r} is not one of: median, hyperband, none")


def make_sampler(params: dict, trial_number: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=int(params["seed"]) + trial_number,
                                      n_startup_trials=int(params["sampler_startup_trials"]))


def default_study_name(tune_params: dict, cfg: dict, prepare_dir: Path, features_dir: Path) -> str:
    """``imem-<variant>-<digest>``: the digest covers what makes trials comparable (the tune settings but
    n_trials/storage/name, the variant's config, the prepared pairs and the feature store's manifest), so a
    changed search space or new data starts a new study while re-running the same command resumes (or,
    when complete, just re-reports) the existing one; raising n_trials extends it."""
    import hashlib
    import json

    h = hashlib.sha256()
    keep = {k: v for k, v in tune_params.items() if k not in ("n_trials", "storage", "study_name")}
    h.update(json.dumps([keep, cfg], sort_keys=True, default=str).encode())
    for f in [*(prepare_dir / s / "pairs.csv" for s in ("train", "val")), features_dir / "manifest.json"]:
        h.update(f.read_bytes() if f.is_file() else b"-")
    return f"imem-{tune_params['variant']}-{h.hexdigest()[:8]}"


# --- the study -----------------------------------------------------------------------------------------------

class Tuner:
    """One worker of a study: claims trials until the study has ``n_trials`` COMPLETE + PRUNED ones."""

    def __init__(self, tune_params: dict, train_params: dict, prepare_dir: str | Path, features_dir: str | Path,
                 storage: str | None = None, study_name: str | None = None, n_trials: int | None = None,
                 track: bool = True, progress: bool = True):
        self.p = copy.deepcopy(tune_params)
        if n_trials is not None:
            self.p["n_trials"] = n_trials
        if int(self.p["n_trials"]) < 1:
            raise ImemError(f"params: tune.n_trials = {self.p['n_trials']} must be at least 1")
        if int(self.p["epochs"]) < 1:
            raise ImemError(f"params: tune.epochs = {self.p['epochs']} must be at least 1")
        if self.p["objective"] not in (*LOSS_NAMES, "total"):
            raise ImemError(f"params: tune.objective = {self.p['objective']!r} is not one of: "
                            f"{', '.join((*LOSS_NAMES, 'total'))}")
        if self.p["log_checkpoints"] not in CHECKPOINT_MODES:
            raise ImemError(f"params: tune.log_checkpoints = {self.p['log_checkpoints']!r} is not one of: "
                            f"{', '.join(CHECKPOINT_MODES)}")
        self.base = variant_config(train_params, self.p["variant"])
        self.base["epochs"] = int(self.p["epochs"])
        self.prepare_dir, self.features_dir = Path(prepare_dir), Path(features_dir)
        self.url = storage_url(storage, self.p)
        self.study_name = study_name or self.p["study_name"] or default_study_name(self.p, self.base, self.prepare_dir,
                                                                                   self.features_dir)
        self.track, self.progress = track, progress
        self.storage, self.study = open_study(self.url, self.p, self.study_name, track)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.cache_memo: dict = {}  # frozen-backbone outputs shared by this worker's trials (same backbone)
        self.parent_run_id: str | None = None  # the study's MLflow parent run, while this worker tracks

    # ----- claiming
    def claim(self) -> optuna.Trial | str | None:
        """Under the storage lock: fail the heartbeat-stale trials (and enqueue their retries: both inside
        the lock, so no other worker can ask a new trial between the FAIL and the retry), then a waiting
        (retried) trial, else a new one while fewer than n_trials are done, running or waiting; ``"wait"``
        when only other workers' running trials are left (one of them may turn stale and come back as a
        retry); None when the study is complete. A claimed trial gets its first heartbeat at once, so it
        goes stale even if this worker dies before the trial's heartbeat thread starts."""
        with claim_lock(self.storage, self.url):
            optuna.storages.fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            n = {s: sum(t.state == s for t in trials) for s in TrialState}
            done = n[TrialState.COMPLETE] + n[TrialState.PRUNED]
            if n[TrialState.WAITING]:
                trial = self.study.ask()
            elif done + n[TrialState.RUNNING] < int(self.p["n_trials"]):
                self.study.sampler = make_sampler(self.p, len(trials))
                trial = self.study.ask()
            else:
                return "wait" if n[TrialState.RUNNING] else None
            if _heartbeat_enabled(self.storage):
                self.storage.record_heartbeat(trial._trial_id)
            return trial

    def run(self) -> dict:
        """Work on the study until it is complete; then write nothing (see :func:`write_best`)."""
        with self._parent_run():
            poll = max(0.5, min(5.0, float(self.p["heartbeat_interval"]) / 2))
            waiting_since, waiting_on = None, None
            while True:
                trial = self.claim()
                if trial is None:
                    break
                if trial == "wait":
                    self._check_wait(waiting_on, waiting_since)
                    running = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
                    if running != waiting_on:  # progress: another worker's trial ended or began
                        waiting_since, waiting_on = time.monotonic(), running
                    time.sleep(poll)
                    continue
                waiting_since, waiting_on = None, None
                self._run_trial(trial)
            summary = self.summary()
            if self.track and summary["best"] is not None:
                import mlflow

                # tags, not params (params are immutable and a later, extended run of the study may find
                # a new best), written under the lock (workers finishing together share the parent run)
                with claim_lock(self.storage, self.url):
                    mlflow.set_tags({f"best.{k}": str(v) for k, v in summary["best"]["params"].items()}
                                    | {"best.trial": str(summary["best"]["number"])})
                    mlflow.log_metrics({"best_value": summary["best"]["value"], "n_complete": summary["complete"],
                                        "n_pruned": summary["pruned"], "n_failed": summary["failed"]})
        return summary

    def _check_wait(self, waiting_on: set | None, since: float | None) -> None:
        """Without heartbeats (journal storage) a dead worker's trial stays RUNNING for ever: stop waiting
        for other workers' trials after ``$IMEM_TUNE_WAIT_S`` seconds (default 3600) without progress."""
        if _heartbeat_enabled(self.storage) or since is None:
            return
        limit = float(os.environ.get("IMEM_TUNE_WAIT_S", 3600))
        if time.monotonic() - since > limit:
            raise ImemError(
                f"study {self.study_name}: waited {limit:.0f} s for trial(s) {sorted(waiting_on or ())} of other "
                "workers, still RUNNING; journal storage has no heartbeat, so a killed worker's trial never ends: "
                "if its worker is dead, mark it failed (optuna.load_study(...).tell(<number>, state=TrialState.FAIL)) "
                "and re-run; use SQLite/PostgreSQL for workers that may die (raise $IMEM_TUNE_WAIT_S for long trials)")

    @contextlib.contextmanager
    def _parent_run(self):
        if not self.track:
            yield None
            return
        import mlflow

        from imem.tracking import mlflow_run, set_experiment, tracking_uri

        run_id = None
        try:
            with contextlib.ExitStack() as stack:
                with claim_lock(self.storage, self.url):
                    parent = self.study.user_attrs.get("mlflow_parent_run_id")
                    if parent is None:
                        params = {"study": self.study_name, "storage": _redact(self.url),
                                  **{f"tune.{k}": v for k, v in self.p.items() if k not in ("storage", "study_name")}}
                        # shared by every worker of the study: no one process's pid may judge it dead
                        run = stack.enter_context(mlflow_run(EXPERIMENT, self.study_name, params,
                                                             tags={"optuna.study": self.study_name,
                                                                   "imem.pid": SHARED_PID}))
                        self.study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
                if parent is not None:
                    mlflow.set_tracking_uri(tracking_uri())
                    set_experiment(EXPERIMENT)
                    try:
                        stack.enter_context(mlflow.start_run(run_id=parent))
                    except mlflow.exceptions.MlflowException as exc:
                        # another tracking store (a worker on another machine without the shared
                        # MLFLOW_TRACKING_URI): this worker's trials get a parent run of their own there
                        warnings.warn(f"MLflow parent run {parent} of study {self.study_name} is not in the tracking "
                                      f"store {tracking_uri()} ({str(exc).splitlines()[0]}): opening a new parent "
                                      "run; share one MLFLOW_TRACKING_URI (an `mlflow server`) between the workers",
                                      stacklevel=2)
                        stack.enter_context(mlflow_run(EXPERIMENT, self.study_name,
                                                       {"study": self.study_name, "storage": _redact(self.url)},
                                                       tags={"optuna.study": self.study_name,
                                                             "imem.pid": SHARED_PID}))
                run_id = self.parent_run_id = mlflow.active_run().info.run_id
                yield  # leaving the stack ends the parent run: FINISHED, or FAILED on an error
        finally:
            self.parent_run_id = None
            if run_id is not None:
                self._reopen_parent_if_busy(run_id)

    def _reopen_parent_if_busy(self, run_id: str) -> None:
        """The parent run is shared: while other workers' trials are RUNNING/WAITING or the study is not
        complete, the leaving worker puts it back to RUNNING; the last worker's exit ends it."""
        import mlflow

        from imem.tracking import tracking_uri

        with contextlib.suppress(Exception), claim_lock(self.storage, self.url):  # never hide this worker's error
            trials = self.study.get_trials(deepcopy=False)
            busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
            if busy or sum(t.state in DONE for t in trials) < int(self.p["n_trials"]):
                mlflow.tracking.MlflowClient(tracking_uri()).update_run(run_id, status="RUNNING")

    # ----- one trial
    def _run_trial(self, trial: optuna.Trial) -> None:
        trial.set_user_attr("worker", self.worker)
        with Heartbeat(self.storage, trial._trial_id):
            try:
                cfg = suggest(trial, self.base, self.p["space"])
                value = self._train(trial, cfg)
            except optuna.TrialPruned as exc:
                self.study.tell(trial, state=TrialState.PRUNED)
                self._say(trial, None, str(exc) or "pruned")
                self._refresh_parent()
                return
            except BaseException:
                self.study.tell(trial, state=TrialState.FAIL)
                raise
        self.study.tell(trial, value)
        self._say(trial, value, None)
        self._refresh_parent()

    def _refresh_parent(self) -> None:
        """The parent run's view of the study, after every trial and under the claim lock (workers finishing
        together take turns): the rows of newly finished trials appended to its ``trials.json`` table (a
        finished trial's row never changes; ``log_table`` appends), Optuna's figures redrawn."""
        if not self.track or self.parent_run_id is None:
            return
        import mlflow

        with claim_lock(self.storage, self.url):
            client = mlflow.tracking.MlflowClient()
            table = trials_table(self.study, objective_name(self.p))
            if "trials.json" in {a.path for a in client.list_artifacts(self.parent_run_id)}:
                logged = mlflow.load_table("trials.json", run_ids=[self.parent_run_id])
                table = table[~table["number"].isin(logged["number"])]
            if len(table):
                mlflow.log_table(table, artifact_file="trials.json", run_id=self.parent_run_id)
            with scratch_dir("imem-tune-figures-") as tmp:
                if study_figures(self.study, Path(tmp), objective_name(self.p), int(self.p["seed"])):
                    client.log_artifacts(self.parent_run_id, tmp, artifact_path="figures")

    def _log_trial(self, trial: optuna.Trial, trainer, report: dict) -> None:
        """A complete trial's run (the active MLflow run): its validation MSE/MAE table, as a table and as
        Markdown, and (``tune.log_checkpoints: best``) its best checkpoint, the frozen backbones left out."""
        import mlflow

        from imem.checkpoints import save, trained_part
        from imem.evaluation import markdown_table

        table = trainer.error_table("val")
        mlflow.log_table(table, artifact_file="val_errors.json")
        with scratch_dir("imem-tune-trial-") as tmp:
            md = Path(tmp) / "val_errors.md"
            md.write_text(markdown_table(table, f"Trial {trial.number}: validation errors of the best epoch "
                                                f"({report['best_epoch']})",
                                         "mean_predictor: the training split's mean, as in evaluation's tables."))
            mlflow.log_artifact(str(md))
            if self.p["log_checkpoints"] == "best":
                ck = {"model": trainer.model.state_dict(), "config": trainer.cfg, "epoch": int(report["best_epoch"])}
                path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
                save(trained_part(ck) if trainer.fc_only else ck, path)
                mlflow.log_artifact(str(path), artifact_path=str(Path(CHECKPOINT_ARTIFACT).parent))
                uri = f"runs:/{mlflow.active_run().info.run_id}/{CHECKPOINT_ARTIFACT}"
                trial.set_user_attr("model_uri", uri)
                mlflow.set_tag("imem.model_uri", uri)

    def _say(self, trial: optuna.Trial, value: float | None, pruned: str | None) -> None:
        """One line per finished trial (issue 20): k/N of the study, its number, parameters and value, the
        best so far, or why it was pruned."""
        done = sum(t.state in DONE for t in self.study.get_trials(deepcopy=False))
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        if pruned is not None:
            tail = pruned if pruned.startswith("pruned") else f"pruned: {pruned}"
        else:
            best = self.study.best_trial
            tail = f"{objective_name(self.p)} = {value:.6g}" + (
                ", the best so far" if best.number == trial.number else f" (best: trial {best.number}, {best.value:.6g})")
        print(f"tune {self.study_name}: {done}/{self.p['n_trials']} done; trial {trial.number} ({params}): {tail}",
              flush=True)

    def _train(self, trial: optuna.Trial, cfg: dict) -> float:
        key = objective_name(self.p)

        def on_epoch(row: dict) -> None:
            if key not in row:
                raise ImemError(f"params: tune.objective = {self.p['objective']!r}: the variant "
                                f"{cfg['variant']} reports no {key} (is its loss weight 0?)")
            if self.track:
                import mlflow

                mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            value = float(row[key])
            trial.report(value, row["epoch"])
            if trial.should_prune():
                why = {"median": "above the median of the earlier trials at that epoch",
                       "hyperband": "cut by its Hyperband bracket"}.get(self.p["pruner"], self.p["pruner"])
                raise optuna.TrialPruned(f"pruned at epoch {row['epoch']}: {key} = {value:.6g}, {why}")

        run_id, state = None, "PRUNED"
        try:
            with contextlib.ExitStack() as stack:
                if self.track:
                    from imem.tracking import mlflow_run

                    run = stack.enter_context(mlflow_run(
                        EXPERIMENT, f"{self.study_name}-trial-{trial.number}",
                        {**cfg, "optuna.trial_number": trial.number},
                        tags={"optuna.study": self.study_name, "optuna.trial_number": str(trial.number),
                              "imem.variant": cfg["variant"], "imem.worker": self.worker}, nested=True))
                    run_id = run.info.run_id
                    trial.set_user_attr("mlflow_run_id", run_id)
                try:
                    value, rep = self._fit(cfg, key, on_epoch,
                                           (lambda trainer, report: self._log_trial(trial, trainer, report))
                                           if self.track else None)
                    state = "COMPLETE"
                    if self.track:
                        import mlflow

                        mlflow.log_metrics({"value": value, "best_epoch": float(rep["best_epoch"]),
                                            **{k: float(v) for k, v in rep.items() if k.startswith("val/")}})
                    return value
                except NonFiniteLoss as exc:
                    self._pruned(trial, str(exc))
                    raise optuna.TrialPruned(str(exc)) from exc
                except optuna.TrialPruned as exc:
                    self._pruned(trial, str(exc) or "pruned")
                    raise
                except BaseException:
                    state = "FAIL"
                    raise
                finally:
                    if self.track:
                        import mlflow

                        mlflow.set_tag("optuna.state", state)
        finally:
            if run_id is not None and state == "PRUNED":
                # the nested run's context marked it FAILED (an exception left it): pruned is KILLED
                import mlflow

                mlflow.tracking.MlflowClient().set_terminated(run_id, status="KILLED")

    def _pruned(self, trial: optuna.Trial, why: str) -> None:
        """Why a trial was pruned: its user attribute and its run's tag ``optuna.pruned_reason``."""
        trial.set_user_attr("pruned_reason", why)
        if self.track:
            import mlflow

            mlflow.set_tag("optuna.pruned_reason", why[:5000])

    def _fit(self, cfg: dict, key: str, on_epoch, on_finish=None) -> tuple[float, dict]:
        """Train the trial's config in a temporary directory (never models/); the value at the kept epoch.
        ``on_finish(trainer, report)``: called with the kept epoch's weights loaded (:func:`train_variant`)."""
        values: dict[int, float] = {}

        def hook(row: dict) -> None:
            on_epoch(row)
            values[row["epoch"]] = float(row[key])

        if ddp.active():  # torchrun: the other ranks train the same config with rank 0 (see follow_trials)
            _share_config(cfg)
        with scratch_dir("imem-tune-") as tmp:
            rep = train_variant(cfg, self.prepare_dir, self.features_dir, Path(tmp) / "model", Path(tmp) / "report",
                                track=False, progress=self.progress, on_epoch=hook, cache_memo=self.cache_memo,
                                on_finish=on_finish)
        value = values[rep["best_epoch"]]
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{key} = {value}")
        return value, rep

    # ----- results
    def summary(self) -> dict:
        trials = self.study.get_trials(deepcopy=False)
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = min(complete, key=lambda t: (t.value, t.number)) if complete else None
        return {"study": self.study_name, "storage": _redact(self.url), "complete": count[TrialState.COMPLETE],
                "pruned": count[TrialState.PRUNED], "failed": count[TrialState.FAIL],
                "best": None if best is None else {"number": best.number, "value": best.value,
                                                   "params": dict(best.params)}}


# --- the study's table and figures (MLflow parent run) --------------------------------------------------

def trials_table(study: optuna.Study, objective: str) -> pd.DataFrame:
    """One row per finished trial (COMPLETE, PRUNED, FAIL): number, state, the objective's value, each
    parameter, its MLflow run, its model URI and why it was pruned (empty where none)."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        rows.append({"number": t.number, "state": t.state.name, objective: t.value,
                     **{f"params.{k}": v for k, v in t.params.items()},
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""), "model_uri": t.user_attrs.get("model_uri", ""),
                     "pruned_reason": t.user_attrs.get("pruned_reason", ""), "worker": t.user_attrs.get("worker", ""),
                     "duration_s": t.duration.total_seconds() if t.duration is not None else None})
    return pd.DataFrame(rows, columns=None if rows else ["number", "state", objective])


def study_figures(study: optuna.Study, out_dir: Path, objective: str, seed: int) -> list[Path]:
    """Optuna's own figures of the study (optuna.visualization.matplotlib) as PNGs in ``out_dir``: the
    optimization history, slice and parallel-coordinate plots once a trial is complete, the parameter
    importances (fANOVA, seeded) once two are. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    n = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if n < 1:
        return []
    plots = {"optimization_history": lambda: ovm.plot_optimization_history(study, target_name=objective),
             "slice": lambda: ovm.plot_slice(study, target_name=objective),
             "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, target_name=objective)}
    if n >= 2:
        plots["param_importances"] = lambda: ovm.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=seed), target_name=objective)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib: a one-trial axis has equal limits (widened)
        for name, draw in plots.items():
            ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


# --- the best parameters -------------------------------------------------------------------------------

def best_params_doc(tuner: Tuner, params_file: str | Path = "params.yaml") -> dict:
    """The best trial as params.yaml keys plus the command that promotes them (nothing is rewritten)."""
    s = tuner.summary()
    if s["best"] is None:
        raise ImemError(f"study {tuner.study_name}: no COMPLETE trial (all {s['pruned']} pruned, "
                        f"{s['failed']} failed): widen tune.space or lower the learning-rate range")
    v = tuner.p["variant"]
    keys: dict[str, object] = {}
    for name, value in s["best"]["params"].items():
        if name == "head":
            for side in ("image", "music"):
                if tuner.base.get(f"{side}_encoder", {}).get("type") in SEQUENCE_ENCODERS:
                    keys[f"train.variants.{v}.{side}_head"] = value
        else:
            keys[f"train.variants.{v}.{name}"] = value
    for name, value in fixed_settings(tuner.base, tuner.p["space"]).items():  # one-value lists: every trial's
        keys.setdefault(f"train.variants.{v}.{name}", value)
    existing = _flat(yaml.safe_load(Path(params_file).read_text()) or {}) if Path(params_file).is_file() else {}
    # dvc exp run -S: "key=value" modifies a key params.yaml has, "+key=value" adds one it lacks
    sets = [f"'{'' if k in existing else '+'}{k}={_yaml_scalar(val)}'" for k, val in keys.items()]
    best_trial = tuner.study.trials[s["best"]["number"]]
    return {"study": s["study"], "storage": s["storage"], "variant": v, "objective": objective_name(tuner.p),
            "epochs_per_trial": int(tuner.p["epochs"]), "trials": {k: s[k] for k in ("complete", "pruned", "failed")},
            "best_trial": s["best"]["number"], "best_value": s["best"]["value"],
            "mlflow_run_id": best_trial.user_attrs.get("mlflow_run_id"),
            # the trial's own model, usable without retraining (tune.log_checkpoints: best, tracked studies)
            "model_uri": best_trial.user_attrs.get("model_uri"),
            "params": keys, "promote": "dvc exp run " + " ".join(f"-S {x}" for x in sets)}


def _yaml_scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        out[f"{prefix}{k}"] = v
    return out


def write_best(tuner: Tuner, out_dir: str | Path, params_file: str | Path = "params.yaml") -> dict:
    """``best_params.yaml`` and ``trials.csv`` (one row per trial) under ``out_dir``."""
    out_dir = Path(out_dir)
    doc = best_params_doc(tuner, params_file)
    head = ("# The best trial of an `imem tune` study. params.yaml is NOT changed: promote these values with\n"
            "# the `promote` command (a DVC experiment), then `dvc exp apply` the run you want to keep.\n")
    write_text(out_dir / "best_params.yaml", head + yaml.safe_dump(doc, sort_keys=False, width=10**6))
    df = tuner.study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    if "duration" in df:
        df["duration"] = df["duration"].dt.total_seconds()
    write_csv(out_dir / "trials.csv", df, float_format="%.6g")
    return doc


def run_tune(params_file: str | Path = "params.yaml", storage: str | None = None, study_name: str | None = None,
             n_trials: int | None = None, prepare_dir: str | Path = "artifacts/prepare",
             features_dir: str | Path = "artifacts/features", out_dir: str | Path | None = "reports/tune",
             track: bool = True, progress: bool = True) -> dict | None:
    """`imem tune` / stages/tune.py: work on the study until it is complete, then (``out_dir``) write the
    best parameters. Several invocations against one storage share the study's trials. Under
    ``torchrun --nproc-per-node N`` every trial trains on N ranks: rank 0 is the Optuna worker (storage,
    MLflow, pruning, reports); the other ranks follow it and return None."""
    from imem.params import section

    tune_p, train_p = section("tune", path=params_file), section("train", path=params_file)
    device = torch_device(variant_config(train_p, tune_p["variant"])["device"])
    with ddp.session(device):
        if not ddp.is_main():
            follow_trials(prepare_dir, features_dir)
            return None
        try:
            tuner = Tuner(tune_p, train_p, prepare_dir, features_dir, storage=storage, study_name=study_name,
                          n_trials=n_trials, track=track, progress=progress)
            summary = tuner.run()
        finally:
            if ddp.active():
                _share_config(None)  # releases the other ranks
        if out_dir is not None:
            summary["best_params"] = write_best(tuner, out_dir, params_file)
        return summary


def torch_device(name: str):
    from imem.training import _device

    return _device(name)


def _share_config(cfg: dict | None) -> dict | None:
    """Rank 0's trial config (None: the study is over) on every rank."""
    import torch.distributed as dist

    box = [cfg]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow_trials(prepare_dir: str | Path, features_dir: str | Path) -> None:
    """A rank > 0 of a torchrun study: train each config rank 0 sends, until it sends None. A trial that
    rank 0 prunes (or that fails there) stops on every rank (imem.training._epoch_hook); a NaN loss is
    seen by all ranks at the same step."""
    memo: dict = {}
    while (cfg := _share_config(None)) is not None:
        with scratch_dir("imem-tune-rank-") as tmp:
            try:
                train_variant(cfg, prepare_dir, features_dir, Path(tmp) / "model", Path(tmp) / "report", track=False,
                              progress=False, cache_memo=memo)
            except (StoppedByRank0, NonFiniteLoss):
                continue
