"""MLflow tracking: where runs go, what every run records, and how a failure is marked.

Tracking URI: ``$MLFLOW_TRACKING_URI`` when set (a server, or any store URI), otherwise a SQLite file
``mlflow.db`` at the repository root -- resolved from ``$DVC_ROOT`` (set by DVC inside stages and
queued experiments), else the git top level, else the working directory -- so that a stage run from
any working directory logs to the same store. Browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
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


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str, params: dict, tags: dict | None = None,
               nested: bool = False) -> Iterator[object]:
    """An MLflow run with all params and the standard tags; an exception marks it FAILED."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    try:
        mlflow.set_experiment(experiment)
    except Exception as exc:  # a broken or unreachable store
        raise ImemError(f"MLflow tracking store {tracking_uri()}: {str(exc).splitlines()[0]}") from exc
    std_tags = {"git.commit": git_commit(), "dvc.stage": os.environ.get("DVC_STAGE", ""),
                "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
                "imem.corpus": params.get("corpus", "")}
    with mlflow.start_run(run_name=run_name, nested=nested, tags={**std_tags, **(tags or {})}) as run:
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

    mlflow.set_tracking_uri(tracking_uri())
    try:
        exp = mlflow.set_experiment("imem-train")
        found = mlflow.search_runs([exp.experiment_id], output_format="list", max_results=1,
                                   filter_string=f"tags.`imem.variant` = '{variant}' and "
                                                 f"tags.`imem.best_sha256` = '{best_sha256}'",
                                   order_by=["attributes.start_time DESC"])
    except Exception as exc:  # a broken or unreachable store
        raise ImemError(f"MLflow tracking store {tracking_uri()}: {str(exc).splitlines()[0]}") from exc
    if found:
        with mlflow.start_run(run_id=found[0].info.run_id) as run:
            yield run
        return
    with mlflow_run("imem-train", variant, params, tags={"imem.variant": variant, "imem.best_sha256": best_sha256,
                                                        "imem.run_origin": "evaluate"}) as run:
        yield run
