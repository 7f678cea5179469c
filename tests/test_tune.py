"""`imem tune`: a short Optuna study end to end on a tiny pipeline (trials, pruning, best-params file,
nested MLflow runs, the optuna CLI and optuna-dashboard), and several workers on a real PostgreSQL
server, one of them killed in the middle of a trial."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState
from pg import pg_bindir, postgres_server

from corpus_fixtures import prepared_pipeline
from imem import tuning
from imem.errors import ImemError
from imem.params import section
from imem.tuning import Tuner, make_sampler, run_tune, suggest

BIN = Path(sys.executable).parent
TINY_TRAIN = {
    "common": {"epochs": 2, "batch_size": 16, "cache_batch_size": 16},
    "encoders": {
        "vit_tiny": {"type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "image_size": 32, "patch_size": 8, "pretrained": None},
        "beats_small": {"type": "beats", "size": "small", "pretrained": None},
        "r18": {"type": "resnet", "arch": "resnet18", "pretrained": None},
    },
    "variants": {
        "transformer_v2": {"kind": "matching", "image_encoder": "vit_tiny", "music_encoder": "beats_small",
                           "image_head": "cls", "music_head": "cls"},
        "cnn": {"kind": "matching", "image_encoder": "r18", "music_encoder": "r18"},
        # what the tests tune: a transformer image side (head choice) and a cheap CNN music side (pool only)
        "mixed": {"kind": "matching", "image_encoder": "vit_tiny", "music_encoder": "r18", "image_head": "cls"},
    },
}
TINY_TUNE = {"variant": "mixed", "n_trials": 5, "epochs": 3, "seed": 3, "sampler_startup_trials": 3, "pruner_startup_trials": 1,
             "pruner_warmup_epochs": 0, "heartbeat_interval": 1, "grace_period": 3,
             "space": {"lr": {"low": 1e-3, "high": 100.0, "log": True}, "head": ["cls", "mean"], "batch_size": [16, 32]}}


def tiny_pipeline(tmp: Path) -> Path:
    """prepare + features of a 3-song corpus, and a params.yaml with tiny encoders and a short study."""
    prepared_pipeline(tmp)
    (tmp / "params.yaml").write_text(yaml.safe_dump({"train": TINY_TRAIN, "tune": TINY_TUNE}))
    return tmp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tune"))


@pytest.fixture(scope="module")
def study(tiny):
    """One short study: 5 trials of 3 epochs; trial 0 is enqueued with lr = 100 (diverges: NaN -> pruned)."""
    uri = f"sqlite:///{tiny / 'mlflow.db'}"
    storage = f"sqlite:///{tiny / 'optuna.db'}"
    params_before = (tiny / "params.yaml").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("OPTUNA_STORAGE", raising=False)
        t0 = time.perf_counter()
        tuner = Tuner(section("tune", path=tiny / "params.yaml"), section("train", path=tiny / "params.yaml"),
                      tiny / "prepare", tiny / "features", storage=storage, progress=False)
        tuner.study.enqueue_trial({"lr": 100.0, "head": "cls", "margin": 2.0, "loss_mode": "sum", "batch_size": 16})
        name = tuner.study_name
        assert name.startswith("imem-mixed-") and len(name) == len("imem-mixed-") + 8
        summary = run_tune(tiny / "params.yaml", storage=storage, prepare_dir=tiny / "prepare",
                           features_dir=tiny / "features", out_dir=tiny / "reports", progress=False)
        seconds = time.perf_counter() - t0
    assert (tiny / "params.yaml").read_bytes() == params_before  # never rewritten
    return {"summary": summary, "storage": storage, "uri": uri, "dir": tiny, "seconds": seconds,
            "study": optuna.load_study(study_name=name, storage=storage), "name": name}


@pytest.mark.slow
def test_study_runs_the_requested_trials_prunes_nan_and_reports_every_epoch(study):
    trials = study["study"].get_trials()
    assert len(trials) == 5
    states = [t.state for t in trials]
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    nan = trials[0]
    assert nan.params["lr"] == 100.0 and nan.state == TrialState.PRUNED
    assert "non-finite loss" in nan.user_attrs["pruned_reason"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert sorted(t.intermediate_values) == [1, 2, 3]
        assert t.value in t.intermediate_values.values()  # the kept epoch's val/sim
        assert set(t.params) == {"lr", "margin", "head", "loss_mode", "batch_size"}
        assert t.params["head"] in ("cls", "mean")
    best = min(complete, key=lambda t: t.value)
    s = study["summary"]
    assert s["best"]["number"] == best.number and s["complete"] + s["pruned"] == 5


@pytest.mark.slow
def test_best_params_file_and_promote_command(study):
    doc = yaml.safe_load((study["dir"] / "reports" / "best_params.yaml").read_text())
    best = study["study"].best_trial
    assert doc["best_trial"] == best.number and doc["best_value"] == pytest.approx(best.value)
    keys = doc["params"]
    v = "train.variants.mixed"
    assert keys[f"{v}.lr"] == pytest.approx(best.params["lr"])
    assert keys[f"{v}.image_head"] == best.params["head"] and f"{v}.music_head" not in keys  # CNN side: pool
    # params.yaml has image_head for the variant but no lr: '+' adds a key, plain '-S' changes one
    assert f"-S '+{v}.lr=" in doc["promote"] and f"-S '{v}.image_head={best.params['head']}'" in doc["promote"]
    rows = (study["dir"] / "reports" / "trials.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("number,state,value")


@pytest.mark.slow
def test_nested_mlflow_runs_one_per_trial(study):
    import mlflow

    mlflow.set_tracking_uri(study["uri"])
    runs = mlflow.search_runs(experiment_names=["imem-tune"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == f"{study['name']} @{parents[0].data.tags['git.commit'][:7]}"
    assert parents[0].data.tags["optuna.study"] == study["name"]
    assert "Optuna study" in mlflow.get_experiment_by_name("imem-tune").tags["mlflow.note.content"]
    assert study["study"].user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert len(children) == 5
    client = mlflow.tracking.MlflowClient()
    for t in study["study"].get_trials():
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["optuna.state"] == t.state.name
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        hist = client.get_metric_history(run.info.run_id, "val/sim")
        assert [m.value for m in hist] == pytest.approx([t.intermediate_values[m.step] for m in hist])
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.metrics["value"] == pytest.approx(t.value)
            assert [m.step for m in hist] == [1, 2, 3]
        else:
            assert run.info.status == "KILLED" and "value" not in run.data.metrics
    assert parents[0].data.metrics["best_value"] == pytest.approx(study["study"].best_value)
    assert parents[0].data.tags["best.trial"] == str(study["study"].best_trial.number)


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


@pytest.mark.slow
def test_each_trial_run_logs_its_error_table_and_checkpoint_or_why_it_was_pruned(study):
    """Issue 22: a complete trial's run holds its validation MSE/MAE table (log_table and Markdown) and its best
    checkpoint without the frozen backbones; a pruned trial's run says why. The table's mean-predictor errors
    are recomputed by hand from the prepared CSVs; its model errors equal the MSEs training logged."""
    import mlflow

    mlflow.set_tracking_uri(study["uri"])
    client = mlflow.tracking.MlflowClient()
    prep = study["dir"] / "prepare"
    tr_pairs, val_pairs = pd.read_csv(prep / "train" / "pairs.csv"), pd.read_csv(prep / "val" / "pairs.csv")
    for t in study["study"].get_trials():
        run_id = t.user_attrs["mlflow_run_id"]
        run = client.get_run(run_id)
        if t.state == TrialState.PRUNED:
            assert run.data.tags["optuna.pruned_reason"] == t.user_attrs["pruned_reason"]
            assert "checkpoints" not in _artifacts(client, run_id) and "model_uri" not in t.user_attrs
            continue
        assert {"val_errors.json", "val_errors.md", "checkpoints"} <= _artifacts(client, run_id)
        table = mlflow.load_table("val_errors.json", run_ids=[run_id]).set_index("target")
        assert list(table.index) == ["sim", "image_valence", "image_arousal", "music_valence", "music_arousal"]
        sim = table.loc["sim"]
        base = val_pairs["score"] - tr_pairs["score"].mean()
        assert sim["mean_predictor_mse"] == pytest.approx((base ** 2).mean(), abs=1e-6)
        assert sim["mean_predictor_mae"] == pytest.approx(base.abs().mean(), abs=1e-6)
        for target in table.index:
            assert table.loc[target, "mse"] == pytest.approx(run.data.metrics[f"val/{target}_mse"], abs=1e-6)
        assert 0 < sim["mae"] ** 2 <= sim["mse"] + 1e-12  # MAE^2 <= MSE (Jensen)
        md = Path(client.download_artifacts(run_id, "val_errors.md", str(study["dir"] / f"md{t.number}")))
        text = md.read_text()
        assert text.startswith(f"# Trial {t.number}: validation errors of the best epoch "
                               f"({int(run.data.metrics['best_epoch'])})")
        assert "| sim " in text and "mean_predictor_mse" in text
        uri = f"runs:/{run_id}/checkpoints/best.pt"
        assert t.user_attrs["model_uri"] == uri and run.data.tags["imem.model_uri"] == uri
        ck_path = client.download_artifacts(run_id, "checkpoints/best.pt", str(study["dir"] / f"ck{t.number}"))
        ck = torch.load(ck_path, weights_only=True)
        assert set(ck["backbones"]) == {"image_backbone", "music_backbone"}  # fc_only: heads and decoders only
        assert not [k for k in ck["model"] if "backbone" in k.split(".", 1)[0]]
        assert ck["config"]["lr"] == pytest.approx(t.params["lr"]) and ck["epoch"] == run.data.metrics["best_epoch"]


@pytest.mark.slow
def test_the_parent_run_holds_the_trials_table_and_optunas_figures(study):
    import mlflow

    mlflow.set_tracking_uri(study["uri"])
    client = mlflow.tracking.MlflowClient()
    parent = study["study"].user_attrs["mlflow_parent_run_id"]
    assert "trials.json" in _artifacts(client, parent)
    table = mlflow.load_table("trials.json", run_ids=[parent]).set_index("number")
    trials = study["study"].get_trials()
    assert sorted(table.index) == [t.number for t in trials]  # each trial once, though refreshed 5 times
    for t in trials:
        row = table.loc[t.number]
        assert row["state"] == t.state.name and row["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
        assert row["params.lr"] == pytest.approx(t.params["lr"]) and row["params.head"] == t.params["head"]
        if t.state == TrialState.COMPLETE:
            assert row["val/sim"] == pytest.approx(t.value) and row["model_uri"] == t.user_attrs["model_uri"]
        else:
            assert row["pruned_reason"] == t.user_attrs["pruned_reason"]
    figures = _artifacts(client, parent, "figures")
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    assert complete >= 1 and figures == {f"figures/{n}.png" for n in ("optimization_history", "slice", "parallel_coordinate")
                                         + (("param_importances",) if complete >= 2 else ())}
    for f in figures:
        png = Path(client.download_artifacts(parent, f, str(study["dir"] / "figs")))
        width, height = struct.unpack(">II", png.read_bytes()[16:24])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and width > 200 and height > 200


def test_study_figures_are_optunas_own_plots_once_trials_are_complete(tmp_path):
    """History, slice and parallel coordinates from the first complete trial, fANOVA importances from the
    second (Optuna needs two); nothing before any trial is complete."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    study = optuna.create_study()
    assert tuning.study_figures(study, tmp_path, "val/sim", 0) == []
    dists = {"lr": FloatDistribution(1e-4, 1.0, log=True), "head": CategoricalDistribution(["cls", "mean"])}
    names = []
    for i, (lr, head) in enumerate(((0.01, "cls"), (0.001, "mean"), (0.1, "cls"), (0.003, "mean"))):
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "head": head}, distributions=dists,
                                                  value=lr * (i + 1)))
        out = tmp_path / str(i)
        out.mkdir()
        names.append(sorted(p.name for p in tuning.study_figures(study, out, "val/sim", 0)))
        assert sorted(p.name for p in out.iterdir()) == names[-1]
    assert names[0] == ["optimization_history.png", "parallel_coordinate.png", "slice.png"]
    assert names[1] == names[3] == ["optimization_history.png", "parallel_coordinate.png", "param_importances.png",
                                    "slice.png"]
    for f in (tmp_path / "3").iterdir():
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


@pytest.mark.slow
def test_the_best_trial_predicts_from_its_run_without_retraining(study):
    """best_params.yaml names the best trial's checkpoint URI; `imem predict --model <uri>` on the val images'
    files reproduces the image valence MSE the trial's table reports (raw files, not the feature store)."""
    import mlflow

    from imem.cli import main as cli

    doc = yaml.safe_load((study["dir"] / "reports" / "best_params.yaml").read_text())
    best = study["study"].best_trial
    assert doc["model_uri"] == f"runs:/{best.user_attrs['mlflow_run_id']}/checkpoints/best.pt"
    images = pd.read_csv(study["dir"] / "prepare" / "val" / "images.csv")
    out = study["dir"] / "predicted.csv"
    params = study["dir"] / "predict_params.yaml"
    params.write_text("features:\n  image_size: 32\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", study["uri"])
        mp.chdir(study["dir"])
        cli(["predict", *images["path"], "--model", doc["model_uri"], "--out", str(out), "--params", str(params),
             "--quiet"])
    pred = pd.read_csv(out)
    mse = float(((pred["valence"].to_numpy() - images["valence"].to_numpy()) ** 2).mean())
    mlflow.set_tracking_uri(study["uri"])
    table = mlflow.load_table("val_errors.json", run_ids=[best.user_attrs["mlflow_run_id"]]).set_index("target")
    assert mse == pytest.approx(table.loc["image_valence", "mse"], abs=1e-5)


@pytest.mark.slow
def test_two_sqlite_workers_share_one_trials_table_and_figures(tiny, tmp_path):
    """Two workers on one SQLite study of 3 trials: the parent's table holds each trial once, every complete
    trial has its checkpoint; with tune.log_checkpoints: none no checkpoint is logged."""
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    env.pop("OPTUNA_STORAGE", None)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    workers = [_worker(tiny, storage, 3, env, name="sq") for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outs)
    st = optuna.load_study(study_name="sq", storage=storage)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.tracking.MlflowClient()
    parent = st.user_attrs["mlflow_parent_run_id"]
    table = mlflow.load_table("trials.json", run_ids=[parent])
    assert sorted(table["number"]) == [t.number for t in st.get_trials()] and len(table) == 3
    assert {"figures/optimization_history.png", "figures/slice.png"} <= _artifacts(client, parent, "figures")
    for t in st.get_trials(states=(TrialState.COMPLETE,)):
        assert "checkpoints/best.pt" in _artifacts(client, t.user_attrs["mlflow_run_id"], "checkpoints")
    # off switch: one more trial with log_checkpoints none
    p = {**section("tune", path=tiny / "params.yaml"), "n_trials": 1, "log_checkpoints": "none"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        tuner = Tuner(p, section("train", path=tiny / "params.yaml"), tiny / "prepare", tiny / "features",
                      storage=storage, study_name="sq-none", progress=False)
        tuner.study.enqueue_trial({"lr": 0.01, "head": "cls", "margin": 2.0, "loss_mode": "sum", "batch_size": 16})
        tuner.run()
    (t,) = tuner.study.get_trials()
    assert t.state == TrialState.COMPLETE and "model_uri" not in t.user_attrs
    assert "checkpoints" not in _artifacts(client, t.user_attrs["mlflow_run_id"])
    assert "val_errors.json" in _artifacts(client, t.user_attrs["mlflow_run_id"])
    with pytest.raises(ImemError, match=r"tune.log_checkpoints = 'all' is not one of: best, none"):
        Tuner({**p, "log_checkpoints": "all"}, section("train", path=tiny / "params.yaml"), tiny / "prepare",
              tiny / "features", storage=storage, study_name="sq-bad", track=False)


@pytest.mark.slow
def test_optuna_cli_and_dashboard_read_the_storage(study):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run([str(BIN / "optuna"), "trials", "--storage", study["storage"], "--study-name",
                          study["name"], "-f", "json"], capture_output=True, text=True, check=True, env=env)
    assert len(json.loads(out.stdout)) == 5
    out = subprocess.run([str(BIN / "optuna"), "best-trial", "--storage", study["storage"], "--study-name",
                          study["name"], "-f", "json"], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout)["number"] == study["study"].best_trial.number
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dash = subprocess.Popen([str(BIN / "optuna-dashboard"), study["storage"], "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError("optuna-dashboard did not answer")
        names = [st["study_name"] for st in body["study_summaries"]]
        assert names == [study["name"]]
    finally:
        dash.terminate()
        dash.wait(10)


def test_sampler_is_seeded_per_trial_number(tiny):
    p = section("tune", path=tiny / "params.yaml")
    cfgs = []
    for _ in range(2):
        st = optuna.create_study(sampler=make_sampler(p, 4))
        cfgs.append(suggest(st.ask(), _variant(), p["space"]))
    assert cfgs[0] == cfgs[1]
    other = suggest(optuna.create_study(sampler=make_sampler(p, 5)).ask(), _variant(), p["space"])
    assert other["lr"] != cfgs[0]["lr"]


def _variant(name="transformer_v2"):
    from imem.training import variant_config

    return variant_config(section("train", {"train": TINY_TRAIN}), name)


def test_head_choices_follow_the_encoder():
    st = optuna.create_study()
    space = section("tune")["space"]
    t = st.ask()
    cfg = suggest(t, _variant("cnn"), space)
    assert "head" not in t.params and cfg["image_head"] == cfg["music_head"] == "pool"  # a CNN offers pool only
    t = st.ask()
    cfg = suggest(t, _variant(), space)
    assert t.params["head"] in ("flatten", "cls", "mean") and cfg["image_head"] == cfg["music_head"] == t.params["head"]
    with pytest.raises(ImemError, match=r"tune.space.head: 'pool' is not a transformer head"):
        suggest(st.ask(), _variant(), {**space, "head": ["pool", "cls"]})
    # L3-Net's subnetworks and ACP-Net's handcrafted statistics output one vector too: pool only (they were
    # offered flatten/cls/mean, which the head then refused; issue 17)
    from imem.models.encoders import SEQUENCE_HEADS
    from imem.training import variant_config

    repo = section("train", path=Path(__file__).resolve().parents[1] / "params.yaml")
    for name in ("l3_net", "acp_net"):
        t = st.ask()
        cfg = suggest(t, variant_config(repo, name), space)
        assert "head" not in t.params and cfg["image_head"] == cfg["music_head"] == "pool", name
    assert tuple(space["head"]) == SEQUENCE_HEADS  # the schema's default lists the same heads


def test_bad_tune_params_are_one_clear_error(tiny, tmp_path):
    train = section("train", path=tiny / "params.yaml")
    with pytest.raises(ImemError, match=r"tune.objective = 'simm' is not one of"):
        Tuner({**section("tune"), "objective": "simm"}, train, tiny / "prepare", tiny / "features",
              storage=f"sqlite:///{tmp_path / 'o.db'}")
    with pytest.raises(ImemError, match=r"unknown key 'tune.space.lrr'"):
        section("tune", {"tune": {"space": {"lrr": {}}}})
    with pytest.raises(ImemError, match=r"Optuna storage postgresql\+psycopg2://u:\*\*\*@127.0.0.1:1/x: "):
        Tuner(section("tune"), train, tiny / "prepare", tiny / "features",
              storage="postgresql+psycopg2://u:secret@127.0.0.1:1/x")


# --- PostgreSQL: several workers, one killed mid-trial ------------------------------------------------------

def _worker(tiny: Path, storage: str, n: int, env: dict, name: str = "pg") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imem.cli", "tune", "--params", str(tiny / "params.yaml"),
                             "--storage", storage, "--study-name", name, "--n-trials", str(n), "--prepare", str(tiny / "prepare"),
                             "--features", str(tiny / "features"), "--out", str(tiny / f"{name}_reports"), "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.skipif(pg_bindir() is None, reason="PostgreSQL binaries absent (.ci/run installs Debian's postgresql)")
def test_postgres_workers_finish_exactly_n_trials_and_retry_a_killed_workers_trial(tiny, tmp_path):
    """Three workers start together; one is SIGKILLed in the middle of a trial while the others are working.
    The survivors fail its trial once its heartbeat is stale, retry it, and finish exactly n trials. MLflow:
    the killed trial's run ends FAILED like its trial, the study's shared parent run ends FINISHED and is never
    marked killed; the killed worker's scratch directory is removed (issue 16's fault suite)."""
    import mlflow

    n = 4
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    env.pop("OPTUNA_STORAGE", None)
    with postgres_server() as url:
        workers = [_worker(tiny, url, n, env) for _ in range(3)]
        by_name = {f"{os.uname().nodename}:{w.pid}": w for w in workers}
        storage = optuna.storages.RDBStorage(url)
        killed = victim = None
        deadline = time.time() + 120
        while killed is None and time.time() < deadline:
            try:
                st = optuna.load_study(study_name="pg", storage=storage)
            except KeyError:
                time.sleep(0.2)
                continue
            trials = st.get_trials(deepcopy=False)
            running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values
                       and t.user_attrs.get("worker") in by_name]
            # kill only while another worker is busy too (a trial RUNNING, or the study not started by all)
            if running and sum(t.state == TrialState.RUNNING for t in trials) >= 2:
                victim = by_name[running[0].user_attrs["worker"]]
                os.kill(victim.pid, signal.SIGKILL)
                killed = running[0].number
            time.sleep(0.05)
        assert killed is not None, "no two trials ran at the same time"
        victim.wait(30)
        survivors = [w for w in workers if w is not victim]
        outs = [w.communicate(timeout=300)[0] for w in survivors]
        assert [w.returncode for w in survivors] == [0, 0], "\n".join(o[-2000:] for o in outs)
        trials = optuna.load_study(study_name="pg", storage=storage).get_trials()
        storage.engine.dispose()
    states = [t.state for t in trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == n  # exactly n, none lost
    assert states.count(TrialState.FAIL) == 1 and trials[killed].state == TrialState.FAIL
    assert states.count(TrialState.RUNNING) == states.count(TrialState.WAITING) == 0
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].system_attrs["retry_history"] == [killed]
    assert retried[0].params == trials[killed].params and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    alive = {f"{os.uname().nodename}:{w.pid}" for w in survivors}
    assert retried[0].user_attrs["worker"] in alive
    assert {t.user_attrs["worker"] for t in trials if t.number > killed} <= alive
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the work was shared
    assert not list(scratch.glob("imem-tune-*"))  # the killed worker's trial directory went with the next trial
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("imem-tune").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    assert "imem.killed" not in parents[0].data.tags and parents[0].data.tags["imem.pid"] == "shared"
    # the killed trial's run ends FAILED, as its Optuna trial (the stale-trial callback; a survivor's sweep may
    # have marked it KILLED first, tagging imem.killed); no other run is marked killed
    (victim_run,) = [r for r in runs if r.data.tags.get("optuna.trial_number") == str(killed)]
    assert victim_run.info.status == "FAILED" and victim_run.data.tags["optuna.state"] == "FAIL"
    assert all(r.info.run_id == victim_run.info.run_id for r in runs if "imem.killed" in r.data.tags)
    # the parent's trials table: every trial once (the killed one as FAIL), whichever worker finished it
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    table = mlflow.load_table("trials.json", run_ids=[parents[0].info.run_id])
    assert sorted(table["number"]) == [t.number for t in trials]
    assert table.set_index("number").loc[killed, "state"] == "FAIL"


def test_median_pruner_prunes_a_trial_that_is_behind(tiny, tmp_path, monkeypatch, capsys):
    """The median pruner itself (not a NaN loss) stops a trial whose epoch-1 value is worse than the median
    of the earlier trials: training is replaced by a stub whose val/sim is the trial's lr at every epoch.
    Each finished trial prints one line (k/N, its parameters, its value or why it was pruned; issue 20), and
    the study names its objective for optuna-dashboard."""
    import imem.tuning as tuning

    def fake_train(cfg, prepare_dir, features_dir, model_dir, report_dir, on_epoch=None, **kw):
        for epoch in (1, 2, 3):
            on_epoch({"epoch": epoch, "val/total": cfg["lr"], "val/sim": cfg["lr"]})
        return {"best_epoch": 3}

    monkeypatch.setattr(tuning, "train_variant", fake_train)
    p = {**section("tune", path=tiny / "params.yaml"), "n_trials": 3, "pruner": "median", "pruner_startup_trials": 1,
         "pruner_warmup_epochs": 0}
    tuner = Tuner(p, section("train", path=tiny / "params.yaml"), tiny / "prepare", tiny / "features",
                  storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="median", track=False, progress=False)
    for lr in (0.01, 0.5, 0.001):
        tuner.study.enqueue_trial({"lr": lr, "head": "cls", "margin": 2.0, "loss_mode": "sum", "batch_size": 16})
    tuner.run()
    trials = tuner.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert list(trials[1].intermediate_values) == [1]
    assert trials[1].user_attrs["pruned_reason"] == ("pruned at epoch 1: val/sim = 0.5, above the median of the "
                                                     "earlier trials at that epoch")
    assert tuner.study.metric_names == ["val/sim"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tune median:")]
    assert len(lines) == 3, lines
    assert lines[0].startswith("tune median: 1/3 done; trial 0 (") and "lr=0.01" in lines[0]
    assert lines[0].endswith("): val/sim = 0.01, the best so far")
    assert lines[1].startswith("tune median: 2/3 done; trial 1 (") and "lr=0.5" in lines[1]
    assert lines[1].endswith("): pruned at epoch 1: val/sim = 0.5, above the median of the earlier trials at that epoch")
    assert lines[2].endswith("): val/sim = 0.001, the best so far") and "head=cls" in lines[2]


def test_fixed_settings_are_applied_and_promoted(tiny, tmp_path, monkeypatch):
    """One-value lists of tune.space are no Optuna parameters but every trial uses them: the promote
    command must set them as well."""
    import imem.tuning as tuning

    seen = []

    def fake_train(cfg, prepare_dir, features_dir, model_dir, report_dir, on_epoch=None, **kw):
        seen.append(cfg)
        on_epoch({"epoch": 1, "val/total": cfg["lr"], "val/sim": cfg["lr"]})
        return {"best_epoch": 1}

    monkeypatch.setattr(tuning, "train_variant", fake_train)
    p = section("tune", path=tiny / "params.yaml")
    p = {**p, "n_trials": 2, "space": {**p["space"], "head": ["mean"], "loss_mode": ["first_batch"],
                                       "batch_size": [32]}}
    tuner = Tuner(p, section("train", path=tiny / "params.yaml"), tiny / "prepare", tiny / "features",
                  storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="fixed", track=False, progress=False)
    tuner.run()
    assert all(c["image_head"] == "mean" and c["loss_mode"] == "first_batch" and c["batch_size"] == 32 for c in seen)
    doc = tuning.best_params_doc(tuner, tiny / "params.yaml")
    v = "train.variants.mixed"
    assert doc["params"][f"{v}.image_head"] == "mean" and f"{v}.music_head" not in doc["params"]
    assert doc["params"][f"{v}.loss_mode"] == "first_batch" and doc["params"][f"{v}.batch_size"] == 32
    assert f"{v}.loss_mode=first_batch'" in doc["promote"] and f"{v}.batch_size=32'" in doc["promote"]


def test_a_claimed_trial_goes_stale_without_a_heartbeat_thread_and_is_retried(tiny, tmp_path):
    """claim() records the first heartbeat: a worker that dies right after claiming leaves a trial that the
    next claim (under the lock) fails and re-enqueues; the retry is the next trial claimed, not a new one."""
    p = {**section("tune", path=tiny / "params.yaml"), "n_trials": 1, "heartbeat_interval": 1, "grace_period": 1}
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    args = (p, section("train", path=tiny / "params.yaml"), tiny / "prepare", tiny / "features")
    dead = Tuner(*args, storage=storage, study_name="stale", track=False, progress=False)
    first = dead.claim()
    assert isinstance(first, optuna.Trial)
    time.sleep(2.5)
    other = Tuner(*args, storage=storage, study_name="stale", track=False, progress=False)
    retry = other.claim()
    assert isinstance(retry, optuna.Trial) and retry.number == 1
    trials = other.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING]
    assert trials[1].system_attrs["failed_trial"] == 0


def test_journal_worker_stops_waiting_for_a_dead_workers_trial(tiny, tmp_path, monkeypatch):
    """A journal file has no heartbeat: a worker left only with another worker's RUNNING trial gives up with
    one clear error after $IMEM_TUNE_WAIT_S seconds instead of waiting for ever."""
    monkeypatch.setenv("IMEM_TUNE_WAIT_S", "1")
    p = {**section("tune", path=tiny / "params.yaml"), "n_trials": 1, "heartbeat_interval": 1}
    args = (p, section("train", path=tiny / "params.yaml"), tiny / "prepare", tiny / "features")
    journal = str(tmp_path / "study.journal")
    Tuner(*args, storage=journal, study_name="j", track=False, progress=False).claim()  # its worker "dies"
    t0 = time.monotonic()
    with pytest.raises(ImemError, match=r"waited 1 s for trial\(s\) \[0\] of other workers, still RUNNING; journal"):
        Tuner(*args, storage=journal, study_name="j", track=False, progress=False).run()
    assert time.monotonic() - t0 < 10


def test_missing_parent_run_opens_a_new_one_and_a_busy_study_keeps_it_running(tiny, tmp_path, monkeypatch):
    """A worker whose tracking store lacks the study's parent run (another machine without the shared
    MLFLOW_TRACKING_URI) warns and opens its own; a worker leaving while another trial runs puts the shared
    parent run back to RUNNING, the last one leaves it FINISHED."""
    import mlflow

    import imem.tuning as tuning

    def fake_train(cfg, prepare_dir, features_dir, model_dir, report_dir, on_epoch=None, **kw):
        on_epoch({"epoch": 1, "val/total": cfg["lr"], "val/sim": cfg["lr"]})
        return {"best_epoch": 1}

    monkeypatch.setattr(tuning, "train_variant", fake_train)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = {**section("tune", path=tiny / "params.yaml"), "n_trials": 1}
    args = (p, section("train", path=tiny / "params.yaml"), tiny / "prepare", tiny / "features")
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    tuner = Tuner(*args, storage=storage, study_name="par", progress=False)
    tuner.study.set_user_attr("mlflow_parent_run_id", "0" * 32)
    with pytest.warns(UserWarning, match="is not in the tracking store"):
        tuner.run()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["imem-tune"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 2 and parents[0].info.status == "FINISHED"
    busy = Tuner(*args, storage=storage, study_name="par", n_trials=2, progress=False)
    assert isinstance(busy.claim(), optuna.Trial)  # another worker's trial is RUNNING
    tuner._reopen_parent_if_busy(parents[0].info.run_id)
    assert mlflow.get_run(parents[0].info.run_id).info.status == "RUNNING"


def test_the_files_a_sqlite_study_writes_beside_its_storage_are_git_ignored(tiny, tmp_path, monkeypatch):
    """.gitignore listed optuna.db.lock while tune wrote optuna.db.claim-lock, which showed up as untracked
    (issue 20): every file a study writes next to optuna.db must be ignored by the repository's rules."""
    monkeypatch.chdir(tmp_path)
    p = {**section("tune", path=tiny / "params.yaml"), "n_trials": 1}
    tuner = Tuner(p, section("train", path=tiny / "params.yaml"), tiny / "prepare", tiny / "features",
                  storage="sqlite:///optuna.db", study_name="ignored", track=False, progress=False)
    with tuning.claim_lock(tuner.storage, tuner.url):
        pass
    written = sorted(f.name for f in tmp_path.iterdir())
    assert "optuna.db" in written and "optuna.db.claim-lock" in written, written
    root = Path(__file__).resolve().parents[1]
    for name in written:  # checked against the repository's .gitignore as if the file sat at its root
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=root)
        assert r.returncode == 0, f"{name} is not ignored by .gitignore"
