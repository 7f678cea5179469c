"""Training under ``torchrun --nproc-per-node 2`` (gloo, CPU) against the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tune import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("ddp"))


def _env(tmp: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1"}


def _workspace(tiny: Path, d: Path) -> Path:
    (d / "artifacts").mkdir(parents=True)
    (d / "artifacts" / "prepare").symlink_to(tiny / "prepare")
    (d / "artifacts" / "features").symlink_to(tiny / "features")
    (d / "params.yaml").write_text((tiny / "params.yaml").read_text())
    return d


@pytest.mark.slow
def test_sharded_step_gives_the_single_process_gradient(tiny, tmp_path):
    """The distributed step's gradient (shards through DistributedDataParallel, gathered outputs, DDP-averaged
    gradients) equals the gradient of
    the whole global batch in one process when BatchNorm and dropout are deterministic (eval mode)."""
    script = tmp_path / "grad_check.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from imem import distributed as ddp
        from imem.params import section
        from imem.training import Trainer, variant_config
        with ddp.session():
            assert ddp.active() and ddp.world() == 2
            out = {{}}
            for variant, fc_only in (("mixed", True), ("cnn", True), ("mixed", False)):  # False: backbones in DDP
                cfg = variant_config(section("train", path={str(tiny / 'params.yaml')!r}), variant)
                cfg["fc_only"] = fc_only
                tr = Trainer(cfg, {str(tiny / 'prepare')!r}, {str(tiny / 'features')!r}, progress=False)
                tr.build_cache()
                assert isinstance(tr.step_module, torch.nn.parallel.DistributedDataParallel)
                tr.model.eval()
                idx = torch.arange(13)  # an odd batch: shards of 7 and 6
                d = tr.data["train"]
                def grads(shard):
                    tr.opt.zero_grad(set_to_none=True)
                    total = tr.combiner(tr._losses(d, idx, shard=shard))
                    total.backward()  # sharded: DDP's reducer averages the gradients over the ranks
                    return total.detach(), [p.grad.clone() for p in tr.params]
                t_shard, g_shard = grads(True)
                t_full, g_full = grads(False)
                num = max(float((a - b).abs().max()) for a, b in zip(g_shard, g_full))
                den = max(float(b.abs().max()) for b in g_full)
                out[f"{{variant}}-fc_only={{fc_only}}"] = {{"loss_diff": float((t_shard - t_full).abs()), "grad_rel": num / den}}
            # a hook that raises on rank 0 (a pruned trial) stops every rank at the same epoch
            from imem.training import StoppedByRank0, _epoch_hook
            def prune(row):
                raise KeyError("pruned")
            try:
                _epoch_hook(prune, {{"epoch": 1}}, ddp.is_main(), True)
                out["hook"] = "went on"
            except KeyError:
                out["hook"] = "rank0 raised its own error"
            except StoppedByRank0:
                out["hook"] = "stopped by rank 0"
            _epoch_hook(lambda row: None, {{"epoch": 2}}, ddp.is_main(), True)  # no stop: both go on
            hooks = [None, None]
            torch.distributed.all_gather_object(hooks, out.pop("hook"))
            out["hooks"] = hooks
            if ddp.is_main():
                open({str(tmp_path / 'grad.json')!r}, "w").write(json.dumps(out))
    """))
    r = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "grad.json").read_text())
    assert res.pop("hooks") == ["rank0 raised its own error", "stopped by rank 0"]
    for variant, v in res.items():
        assert v["loss_diff"] < 1e-5, (variant, v)
        assert v["grad_rel"] < 1e-5, (variant, v)


@pytest.mark.slow
def _two_seeds(d: Path) -> None:
    """params.yaml of a workspace with n_seeds: 2 (both training seeds run in one process group)."""
    import yaml

    p = yaml.safe_load((d / "params.yaml").read_text())
    p.setdefault("train", {}).setdefault("common", {})["n_seeds"] = 2
    (d / "params.yaml").write_text(yaml.safe_dump(p))


def test_torchrun_two_processes_match_the_single_process_run(tiny, tmp_path):
    one = _workspace(tiny, tmp_path / "one")
    two = _workspace(tiny, tmp_path / "two")
    for d in (one, two):
        _two_seeds(d)
    # rank 1 runs in a workspace of its own (same inputs, same MLflow store): anything it wrote to models/ or
    # reports/ would land there, so "only rank 0 writes" is checked per rank
    _two_seeds(_workspace(tiny, tmp_path / "two_rank1"))
    per_rank = tmp_path / "per_rank_cwd.py"
    per_rank.write_text(textwrap.dedent(f"""
        import os, runpy, sys
        if os.environ["RANK"] != "0":
            os.chdir({str(tmp_path / 'two')!r} + "_rank" + os.environ["RANK"])
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    stage = str(REPO / "stages" / "train.py")
    r1 = subprocess.run([sys.executable, stage, "transformer_v2"], cwd=one, env=_env(one), capture_output=True,
                        text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([*TORCHRUN, str(per_rank), stage, "transformer_v2"], cwd=two, env=_env(two),
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    h1 = pd.read_csv(one / "reports/train/transformer_v2/history.csv")
    h2 = pd.read_csv(two / "reports/train/transformer_v2/history.csv")
    assert list(h1.columns) == list(h2.columns) and len(h1) == len(h2) == 2
    # Same global batches and losses; BatchNorm normalises each rank's half-batch with its own statistics and
    # dropout masks are drawn per rank, so the runs differ slightly (the exact equivalence of one step's
    # losses and gradients is test_sharded_step_gives_the_single_process_gradient above). transformer_v2
    # follows the thesis since issue 15: mean reductions and the first-batch normalisation (eq. 3.10), whose divisors are the first batch's losses,
    # themselves computed under per-shard BatchNorm -- so the runs weigh the losses slightly differently from
    # the first step on. Measured on this fixture (batch 16 -> two shards of 8), largest relative gap over the
    # 2 epochs: val/total 4.0 %, val/sim 1.9 %, val/sfr_image 5.5 % (5.2 % on CI's CPU), val/sfr_music 8.0 %;
    # train/total 31 %, train/sfr_image 69 % (per-shard BatchNorm in train mode). Tolerance: 5 % on val/sim (what
    # the similarity MSE scores), 15 % on the other validation losses (val/total holds the normalised SFR
    # terms), 50 % on train/total. (With the old CDCML-style sum on this variant the gaps were under 2 % on every validation
    # loss; with a random ResNet18 on the music side, whose unnormalised features make BatchNorm's shard
    # statistics matter more, the gap after 2-3 epochs reaches 10-20 % on val/sim: still inside SGD's
    # run-to-run noise there, but not a tight check.)
    rel = {c: float(np.max(np.abs(h2[c].to_numpy() / h1[c].to_numpy() - 1)))
           for c in h1.columns if c.startswith(("val/", "train/")) and np.all(h1[c].to_numpy() != 0)}
    print("largest relative gap, two ranks vs one process:", {c: round(v, 4) for c, v in rel.items()})
    for col in [c for c in h1.columns if c.startswith("val/")]:
        tol = 0.05 if col == "val/sim" else 0.15
        assert h2[col].to_numpy() == pytest.approx(h1[col].to_numpy(), rel=tol, nan_ok=True), col
    assert h2["train/total"].to_numpy() == pytest.approx(h1["train/total"].to_numpy(), rel=0.5)
    m1 = json.loads((one / "reports/train/transformer_v2/metrics.json").read_text())
    m2 = json.loads((two / "reports/train/transformer_v2/metrics.json").read_text())
    assert m2["finished"] and m2["val/sim_mse"] == pytest.approx(m1["val/sim_mse"], rel=0.05)
    assert (two / "models/transformer_v2/best.pt").is_file() and (two / "models/transformer_v2/last.pt").is_file()
    # the second training seed ran in the same process group (no second rendezvous), written by rank 0 only
    assert (two / "models/transformer_v2/seeds/2/best.pt").is_file()
    h1b = pd.read_csv(one / "models/transformer_v2/seeds/2/history.csv")
    h2b = pd.read_csv(two / "models/transformer_v2/seeds/2/history.csv")
    assert h2b["val/total"].to_numpy() == pytest.approx(h1b["val/total"].to_numpy(), rel=0.05)
    assert not h1b["val/total"].equals(h1["val/total"])  # another seed, other heads
    rank1 = tmp_path / "two_rank1"
    assert not (rank1 / "models").exists() and not (rank1 / "reports").exists(), sorted(map(str, rank1.rglob("*")))
    # only rank 0 logged: one MLflow run, with both epochs
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{two / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["imem-train"], output_format="list")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # one run per training seed
    assert sorted(r.data.tags["imem.train_seed"] for r in runs) == ["1", "2"]
    for r in runs:
        hist = mlflow.tracking.MlflowClient().get_metric_history(r.info.run_id, "val/total")
        assert [m.step for m in hist] == [1, 2]


@pytest.mark.slow
def test_tune_under_torchrun_trains_each_trial_on_two_ranks(tiny, tmp_path):
    """`torchrun -m imem.cli tune`: rank 0 is the Optuna worker and the only MLflow writer; rank 1 follows its
    trials (an enqueued NaN trial is pruned on both ranks at the same step)."""
    import mlflow
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=storage, study_name="ddp").enqueue_trial(
        {"lr": 100.0, "head": "cls", "margin": 0.5, "loss_mode": "sum", "batch_size": 16})
    r = subprocess.run([*TORCHRUN, "-m", "imem.cli", "tune", "--params", str(tiny / "params.yaml"), "--storage", storage,
                        "--study-name", "ddp", "--n-trials", "3", "--prepare", str(tiny / "prepare"), "--features",
                        str(tiny / "features"), "--out", str(tmp_path / "rep"), "--quiet"],
                       capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("best trial") == 1  # rank 0 reports, rank 1 is silent
    trials = optuna.load_study(study_name="ddp", storage=storage).get_trials()
    assert [t.state.name for t in trials][0] == "PRUNED" and "non-finite" in trials[0].user_attrs["pruned_reason"]
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 3 == len(trials)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["imem-tune"], output_format="list")
    assert len(runs) == 4 and sum("mlflow.parentRunId" in x.data.tags for x in runs) == 3
    assert (tmp_path / "rep" / "best_params.yaml").is_file()
