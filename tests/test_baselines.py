"""CDCML's baselines (issue 7): ACP-Net's handcrafted statistics, L3-Net's subnetworks, SP-Net, the
ablation rows as loss-weight overrides, the on-disk frozen-backbone memo, and the comparison table."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from corpus_fixtures import prepared_pipeline
from imem.comparison import MEAN_ROW, collect, markdown, variant_row
from imem.errors import ImemError
from imem.features.frozen import BackboneMemo
from imem.methods.base import CHANCE_ROW, MethodResult, check_result
from imem.methods.sp_net import sp_net
from imem.models.encoders import HandcraftedStats, L3Subnetwork, build_backbone, l3_log_mel
from imem.params import section
from imem.training import Trainer, cache_key, train_variant, variant_config

EVAL = {"split": "test", "relevance_threshold": 0.7, "ndcg_k": 10}


def test_handcrafted_stats_are_mean_and_std_over_time():
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]]])  # (1, 2 rows, 4 frames)
    out = HandcraftedStats(rows=2)(x)
    # row 0: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4); row 1: mean 1, std sqrt((1 + 1 + 9 + 1) / 4)
    assert torch.allclose(out, torch.tensor([[3.0, 1.0, math.sqrt(14 / 4), math.sqrt(12 / 4)]]))
    tiled = x.unsqueeze(1).expand(-1, 3, -1, -1)  # the (n, 3, rows, T) CNN layout gives the same values
    assert torch.equal(HandcraftedStats(rows=2)(tiled), out)
    assert build_backbone({"type": "handcrafted_stats"}).out_dim == 386


def test_l3_subnetworks_shapes_and_global_max_pool():
    torch.manual_seed(0)
    vis = L3Subnetwork("vision", width=4, image_size=48)
    assert vis(torch.randn(2, 3, 48, 48)).shape == (2, 32)
    mel = l3_log_mel(torch.randn(3, 32000) * 0.1)
    assert mel.shape == (3, 1, 64, 101)  # 2 s at 16 kHz, 20-ms hop (centred frames)
    aud = L3Subnetwork("audio", width=4)
    h = aud.net(mel)
    assert torch.equal(aud(mel), h.amax(dim=(2, 3)))
    with pytest.raises(ImemError, match="modality"):
        L3Subnetwork("video")
    with pytest.raises(ImemError, match="unknown key 'depth'"):
        build_backbone({"type": "l3", "depth": 3})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepared_pipeline(tmp_path_factory.mktemp("baselines"), n_songs=3)


def _cfg(variant: str, **over) -> dict:
    cfg = variant_config(section("train"), variant)
    cfg.update({"epochs": 2, "batch_size": 16, "cache_batch_size": 8, **over})
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["acp_net", "l3_net"])
def test_baseline_variants_train_and_learn(tiny, tmp_path, variant):
    """ACP-Net (frozen image CNN + statistics) and L3-Net (both subnetworks trained from scratch) train
    through the same Trainer: finite decreasing similarity loss, only the sim + VA losses, checkpoints."""
    cfg = _cfg(variant, epochs=3, lr=0.01 if variant == "acp_net" else 0.003)
    if variant == "l3_net":
        cfg["image_encoder"]["width"] = cfg["music_encoder"]["width"] = 4
    rep = train_variant(cfg, tiny / "prepare", tiny / "features", tmp_path / "m", tmp_path / "r", track=False,
                        progress=False)
    hist = pd.read_csv(tmp_path / "r" / "history.csv")
    assert {"train/sim", "train/va_image", "train/va_music"} <= set(hist.columns)
    assert not {"train/cfr", "train/cfm", "train/sfr_image"} & set(hist.columns)
    assert np.isfinite(hist.filter(like="train/").to_numpy()).all()
    assert hist["train/sim"].iloc[-1] < hist["train/sim"].iloc[0]
    assert (tmp_path / "m" / "best.pt").is_file() and rep["finished"]
    if variant == "l3_net":  # trained end to end: the backbones' weights moved
        t = Trainer(cfg, tiny / "prepare", tiny / "features", progress=False)
        best = torch.load(tmp_path / "m" / "best.pt", weights_only=False)["model"]
        k = "image_backbone.net.0.weight"
        assert not torch.equal(t.model.state_dict()[k], best[k])


def test_ablation_rows_are_loss_weight_overrides():
    t = section("train")
    # CDCML table 4: Sim | Sim + CFR | Sim + CFR + CFM | Sim + VA | all; the rows without a VA loss train their VA
    # decoders on detached features (a separate VA predictor, 6.1.2), so the VA weight is on but shapes nothing
    va = {"va_image", "va_music"}
    want = {"cdcml_sim": ({"sim"}, "separate"), "cdcml_sim_cfr": ({"sim", "cfr"}, "separate"),
            "cdcml_sim_cfr_cfm": ({"sim", "cfr", "cfm"}, "separate"), "cdcml_sim_va": ({"sim"}, "joint")}
    for v, (active, va_decoder) in want.items():
        c = variant_config(t, v)
        assert {k for k, x in c["loss_weights"].items() if x != 0} == active | va, v
        assert c["va_decoder"] == va_decoder, v
    assert all(x == 1.0 for x in variant_config(t, "cnn")["loss_weights"].values())
    assert variant_config(t, "cnn")["va_decoder"] == "joint"
    assert {variant_config(t, v)["va_decoder"] for v in ("acp_net", "l3_net")} == {"separate"}
    thesis = variant_config(t, "cnn_thesis")
    assert (thesis["loss_mode"], thesis["reduction"], thesis["margin"]) == ("first_batch", "mean", 15.0)
    assert variant_config(t, "cnn")["reduction"] == "sum"


def test_backbone_memo_hits_misses_and_survives_a_corrupt_entry(tiny, tmp_path):
    cfg = _cfg("unimodal_music")
    memo = BackboneMemo(tmp_path / "memo")
    a = Trainer(cfg, tiny / "prepare", tiny / "features", progress=False)
    a.build_cache(memo=memo)
    assert (memo.hits, memo.misses) == (0, 1) and len(list((tmp_path / "memo").glob("*.pt"))) == 1
    b = Trainer(cfg, tiny / "prepare", tiny / "features", progress=False)
    b.build_cache(memo=memo)
    assert memo.hits == 1
    assert torch.equal(a.cache["music"][0], b.cache["music"][0]) and a.cache["music"][1] == b.cache["music"][1]
    # other weights (another seed) -> another key
    c = Trainer(dict(cfg, seed=2), tiny / "prepare", tiny / "features", progress=False)
    rows = torch.cat([c.data[s].items_music[0] for s in ("train", "val", "test")])
    assert cache_key(c.backbones["music"], cfg["music_encoder"], c.store, rows) != \
        cache_key(b.backbones["music"], cfg["music_encoder"], b.store, rows)
    # a truncated entry is a miss, recomputed (and rewritten), not a crash
    entry = next((tmp_path / "memo").glob("*.pt"))
    entry.write_bytes(b"broken")
    d = Trainer(cfg, tiny / "prepare", tiny / "features", progress=False)
    d.build_cache(memo=memo)
    assert torch.allclose(d.cache["music"][0], a.cache["music"][0])
    bs = int(cfg["cache_batch_size"])
    assert memo.get(cache_key(d.backbones["music"], cfg["music_encoder"], d.store, rows, batch_size=bs)) is not None
    # what changes the float rounding changes the key: another batch size (a method's 32 against a train stage's
    # cache_batch_size once shared an entry) or thread count
    assert cache_key(d.backbones["music"], cfg["music_encoder"], d.store, rows, batch_size=bs) != \
        cache_key(d.backbones["music"], cfg["music_encoder"], d.store, rows, batch_size=bs + 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert memo.get(cache_key(d.backbones["music"], cfg["music_encoder"], d.store, rows, batch_size=bs)) is None
    finally:
        torch.set_num_threads(threads)


def _sp_reports(tmp: Path, sigma: float = 0.5) -> Path:
    """Hand-made evaluate outputs of the two unimodal variants and a prepared test split."""
    img = pd.DataFrame({"id": ["a", "b"], "valence": [0.9, 0.1], "arousal": [0.8, 0.2],
                        "valence_best": [0.7, 0.3], "arousal_best": [0.6, 0.3]})
    mus = pd.DataFrame({"id": ["x-1", "y-1"], "valence": [0.8, 0.2], "arousal": [0.9, 0.1],
                        "valence_best": [0.7, 0.2], "arousal_best": [0.5, 0.3]})
    for v, side, df in (("unimodal_image", "image", img), ("unimodal_music", "music", mus)):
        (tmp / "ev" / v / "predictions").mkdir(parents=True)
        df.to_csv(tmp / "ev" / v / "predictions" / f"{side}_va.csv", index=False)
        (tmp / "ev" / v / "metrics.json").write_text(json.dumps({"split": "test"}))
    (tmp / "prep" / "test").mkdir(parents=True)
    pd.DataFrame({"clip_id": ["x-1", "y-1", "x-1"], "image_id": ["a", "a", "b"], "score": [0.9, 0.2, 0.1]}).to_csv(
        tmp / "prep" / "test" / "pairs.csv", index=False)
    # the split's tables in another order than the predictions (SP-Net follows the tables: bootstrap indices)
    pd.DataFrame({"clip_id": ["y-1", "x-1"], "song_id": ["y", "x"]}).to_csv(tmp / "prep" / "test" / "clips.csv", index=False)
    pd.DataFrame({"image_id": ["b", "a"]}).to_csv(tmp / "prep" / "test" / "images.csv", index=False)
    (tmp / "stats.json").write_text(json.dumps({"sigma": sigma}))
    return tmp


def test_sp_net_similarity_is_exp_of_predicted_va_distance(tmp_path):
    t = _sp_reports(tmp_path)
    res = sp_net({"image_variant": "unimodal_image", "music_variant": "unimodal_music", "checkpoint": "best"},
                 t / "ev", t / "prep", t / "stats.json", EVAL)
    check_result("sp_net", res)
    # pairs: (x-1, a): d = |(0.7,0.5)-(0.7,0.6)| = 0.1; (y-1, a): |(0.2,0.3)-(0.7,0.6)| = sqrt(0.34); (x-1, b): |(0.7,0.5)-(0.3,0.3)| = sqrt(0.2)
    s_hat = np.exp(-np.array([0.1, math.sqrt(0.34), math.sqrt(0.2)]) / 0.5)
    row = res.rows["SP-Net"]
    assert row["sim_mse"] == pytest.approx(np.mean((s_hat - [0.9, 0.2, 0.1]) ** 2))
    assert row["sim_mae"] == pytest.approx(np.mean(np.abs(s_hat - [0.9, 0.2, 0.1])))
    assert row["image_valence_mse"] == pytest.approx(np.mean(([0.7, 0.3] - np.array([0.9, 0.1])) ** 2))
    assert row["music_arousal_mae"] == pytest.approx(np.mean(np.abs([0.5 - 0.9, 0.3 - 0.1])))
    assert "m2i_sim_mrr" in row and not any("_emb_" in c for c in row)
    assert set(res.rows[CHANCE_ROW]) == {c for c in row if "_sim_" in c}
    # two images per clip query: a relevant one is always within the top 5 (fewer candidates than k)
    assert res.rows[CHANCE_ROW]["m2i_sim_r5"] == 1.0


def test_sp_net_over_training_seeds_reports_mean_std_and_bootstrap(tmp_path):
    """Extra seeds' columns (valence_seed_<n>) pair up k-th image seed with k-th music seed; the row is their
    mean, with the std and a bootstrap interval; the identity resample gives each seed's full row."""
    from imem import bootstrap
    from imem.methods.sp_net import run_sp_net, sp_net_seeds

    t = _sp_reports(tmp_path)
    for v, side in (("unimodal_image", "image"), ("unimodal_music", "music")):
        f = t / "ev" / v / "predictions" / f"{side}_va.csv"
        df = pd.read_csv(f)
        df["valence_seed_2"], df["arousal_seed_2"] = df["valence"], df["arousal"]  # a perfect second seed
        df.to_csv(f, index=False)
    cfg = {"image_variant": "unimodal_image", "music_variant": "unimodal_music", "checkpoint": "best"}
    res = sp_net_seeds(cfg, t / "ev", t / "prep", t / "stats.json", EVAL)
    assert len(res) == 2
    assert res[1].rows["SP-Net"]["image_valence_mse"] == 0 and res[1].rows["SP-Net"]["music_arousal_mae"] == 0
    for r in res:
        same = r.rescore(np.arange(2), np.arange(2))["SP-Net"]
        assert all(same[c] == pytest.approx(v, abs=1e-12) for c, v in r.rows["SP-Net"].items())
    # a resample drawing clip x-1 twice and image a twice: pair (x-1, a) counts 4 times, the others 0
    only = res[0].rescore(np.array([1, 1]), np.array([1, 1]))["SP-Net"]
    assert only["sim_mse"] == pytest.approx((np.exp(-0.1 / 0.5) - 0.9) ** 2)
    m = run_sp_net(cfg, t / "ev", t / "prep", t / "stats.json", dict(EVAL, bootstrap={"n": 50, "seed": 1, "level": 0.9}),
                   t / "out", track=False, progress=False)
    first = res[0].rows["SP-Net"]["image_valence_mse"]
    assert m["rows"]["SP-Net"]["image_valence_mse"] == pytest.approx(first / 2, abs=1e-6)
    assert m["rows_std"]["SP-Net"]["image_valence_mse"] == pytest.approx(np.std([first, 0.0], ddof=1), abs=1e-6)
    assert m["seeds"]["n"] == 2 and m["bootstrap"]["resamples"] == 50
    lo, hi = m["rows_ci"]["SP-Net"]["lo"]["sim_mse"], m["rows_ci"]["SP-Net"]["hi"]["sim_mse"]
    assert 0 <= lo <= hi
    reps, n, _ = bootstrap.load(t / "out" / "bootstrap.npz")
    assert n == 50 and reps["SP-Net"]["sim_mse"].shape == (50,)


def test_sp_net_refuses_a_split_mismatch_and_missing_predictions(tmp_path):
    t = _sp_reports(tmp_path)
    cfg = {"image_variant": "unimodal_image", "music_variant": "unimodal_music", "checkpoint": "best"}
    with pytest.raises(ImemError, match="split 'test'"):
        sp_net(cfg, t / "ev", t / "prep", t / "stats.json", dict(EVAL, split="val"))
    (t / "ev" / "unimodal_music" / "predictions" / "music_va.csv").unlink()
    with pytest.raises(ImemError, match="music_va.csv: no music predictions"):
        sp_net(cfg, t / "ev", t / "prep", t / "stats.json", EVAL)


def _eval_metrics(weights: dict, sim_mse: float, mean_sim: float = 0.05) -> dict:
    best = {"sim_mse": sim_mse, "image_valence_mse": 0.02, "music_valence_mse": 0.03, "m2i_sim_mrr": 0.3,
            "m2i_emb_mrr": 0.4, "m2i_sim_spearman": 0.5}
    return {"split": "test", "relevance_threshold": 0.7, "loss_weights": weights, "best": best,
            "mean_predictor": {"sim_mse": mean_sim, "image_valence_mse": 0.08},
            "random_ranking": {"m2i_mrr": 0.2, "m2i_queries": 10}}


def test_comparison_rows_blanks_and_references(tmp_path):
    ones = dict.fromkeys(("cfr", "cfm", "sfr_image", "sfr_music", "sim", "va_image", "va_music"), 1.0)
    sim_only = {**dict.fromkeys(ones, 0.0), "sim": 1.0}
    assert "image_valence_mse" not in variant_row(_eval_metrics(sim_only, 0.04))  # untrained VA decoder: blank
    assert "m2i_sim_spearman" not in variant_row(_eval_metrics(ones, 0.04))  # not a comparison column
    # no cross-modal loss (CFR, CFM = 0): f_I and f_M share no space, so no embedding-proximity columns
    assert "m2i_emb_mrr" in variant_row(_eval_metrics(ones, 0.04))
    assert "m2i_emb_mrr" not in variant_row(_eval_metrics(sim_only, 0.04))
    for v, w, s in (("cnn", ones, 0.04), ("cdcml_sim", sim_only, 0.045)):
        (tmp_path / "ev" / v).mkdir(parents=True)
        (tmp_path / "ev" / v / "metrics.json").write_text(json.dumps(_eval_metrics(w, s)))
    (tmp_path / "me" / "emo").mkdir(parents=True)
    (tmp_path / "me" / "emo" / "metrics.json").write_text(json.dumps({
        "split": "test", "relevance_threshold": 0.7, "label": "Emo-CLIM",
        "rows": {"Emo-CLIM": {"cls_i2m_p1": 0.5, "m2i_emb_mrr": 0.35}, CHANCE_ROW: {"cls_i2m_p1": 0.25}}}))
    df, info = collect(["cnn", "cdcml_sim"], ["emo"], tmp_path / "ev", tmp_path / "me")
    by = df.set_index("row")
    assert list(df["row"])[-2:] == [MEAN_ROW, CHANCE_ROW]
    assert by.loc[CHANCE_ROW, "m2i_sim_mrr"] == 0.2 and by.loc[CHANCE_ROW, "m2i_emb_mrr"] == 0.2
    assert by.loc[CHANCE_ROW, "cls_i2m_p1"] == 0.25
    assert by.loc[MEAN_ROW, "sim_mse"] == 0.05
    assert pd.isna(by.loc["CDCML ablation: Sim", "image_valence_mse"])
    assert pd.isna(by.loc["Emo-CLIM", "sim_mse"]) and by.loc["Emo-CLIM", "cls_i2m_p1"] == 0.5
    md = markdown(df, info, "t")
    assert "embedded (generated) corpus" in md and "0.0400" in md
    # the lower sim MSE is not bold: without bootstrap resamples no difference is shown to exclude 0
    assert "**" not in md.split("## Regression")[1].split("##")[0]
    assert "Emotion-class retrieval" in md and "CDCML ablation (table 4 layout" in md
    # reference rows from two sources must agree
    bad = _eval_metrics(sim_only, 0.045, mean_sim=0.07)
    (tmp_path / "ev" / "cdcml_sim" / "metrics.json").write_text(json.dumps(bad))
    with pytest.raises(ImemError, match="disagrees"):
        collect(["cnn", "cdcml_sim"], [], tmp_path / "ev", tmp_path / "me")


def test_method_results_must_use_comparison_columns():
    with pytest.raises(ImemError, match="'m2i_recall' is not a comparison column"):
        check_result("x", MethodResult(rows={"X": {"m2i_recall": 0.1}}, history=[], state={}))
    with pytest.raises(ImemError, match="not a finite number"):
        check_result("x", MethodResult(rows={"X": {"sim_mse": float("nan")}}, history=[], state={}))


def test_sp_net_stage_writes_reports_and_logs_one_mlflow_run(tmp_path, monkeypatch):
    import mlflow

    from imem.methods.sp_net import run_sp_net

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    t = _sp_reports(tmp_path)
    cfg = {"image_variant": "unimodal_image", "music_variant": "unimodal_music", "checkpoint": "best"}
    m = run_sp_net(cfg, t / "ev", t / "prep", t / "stats.json", EVAL, tmp_path / "out", track=True)
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == m and "SP-Net" in (tmp_path / "out" / "results.md").read_text()
    runs = mlflow.search_runs(experiment_names=["imem-methods"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["imem.method"] == "sp_net"
    assert runs[0].data.metrics["test/sim_mse"] == pytest.approx(m["rows"]["SP-Net"]["sim_mse"])
    assert runs[0].data.metrics["test_random_ranking/m2i_sim_mrr"] == pytest.approx(m["rows"][CHANCE_ROW]["m2i_sim_mrr"])


def _fake_method(monkeypatch):
    """A minimal method module registered as ``imem.methods.fake``: the runner's contract, nothing else."""
    import sys
    import types

    import imem.methods

    mod = types.ModuleType("imem.methods.fake")
    mod.LABEL, mod.DEFAULTS = "Fake", {"epochs": 2, "fail": False}

    def fit_evaluate(cfg, data, ctx):
        for e in range(1, cfg["epochs"] + 1):
            ctx.log({"train/total": 1.0 / e}, e)
        if cfg["fail"]:
            raise ImemError("fake method failed on purpose")
        n = len(data.clips[ctx.split])
        return MethodResult(rows={"Fake": {"sim_mse": 0.25, "m2e_avg_rank": float(n)}}, history=[
            {"epoch": e, "train/total": 1.0 / e} for e in range(1, cfg["epochs"] + 1)], state={"w": torch.ones(2)},
            notes={"best_epoch": cfg["epochs"]})

    mod.fit_evaluate = fit_evaluate
    monkeypatch.setitem(sys.modules, "imem.methods.fake", mod)
    monkeypatch.setattr(imem.methods, "METHODS", imem.methods.METHODS + ("fake",))


def test_method_runner_writes_outputs_logs_mlflow_and_fails_cleanly(tiny, tmp_path, monkeypatch):
    import mlflow

    from imem.methods.base import run_method

    _fake_method(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    common = {"seed": 1, "device": "cpu", "image_encoder": "resnet18", "music_encoder": "resnet18"}
    args = (section("evaluate"), tiny / "prepare", tiny / "features", tiny / "rep" / "stats.json",
            tmp_path / "m", tmp_path / "r")
    m = run_method("fake", {"common": common, "fake": {"epochs": 3}}, *args, train_encoders=section("train")["encoders"])
    assert m["rows"]["Fake"]["sim_mse"] == 0.25 and m["best_epoch"] == 3 and m["corpus"] == "embedded (generated) corpus"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["history.csv", "metrics.json", "results.md"]
    assert torch.equal(torch.load(tmp_path / "m" / "model.pt", weights_only=False)["w"], torch.ones(2))
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(experiment_names=["imem-methods"], output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "3"
    assert [h.step for h in client.get_metric_history(run.info.run_id, "train/total")] == [1, 2, 3]
    assert run.data.metrics["test/sim_mse"] == 0.25
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"model.pt", "metrics.json", "results.json"}
    # a failing method: one error, the run marked FAILED, the earlier reports left whole
    before = (tmp_path / "r" / "metrics.json").read_bytes()
    with pytest.raises(ImemError, match="failed on purpose"):
        run_method("fake", {"common": common, "fake": {"fail": True}}, *args, train_encoders=section("train")["encoders"])
    assert (tmp_path / "r" / "metrics.json").read_bytes() == before
    statuses = [r.info.status for r in mlflow.search_runs(experiment_names=["imem-methods"], output_format="list")]
    assert sorted(statuses) == ["FAILED", "FINISHED"]
    with pytest.raises(ImemError, match="unknown key 'methods.fake.epoch'"):
        run_method("fake", {"common": common, "fake": {"epoch": 3}}, *args, track=False)
    with pytest.raises(ImemError, match="no method 'nope'"):
        run_method("nope", {"common": common}, *args, track=False)


def test_feature_scale_zeroes_features_the_training_split_never_varied():
    """methods.base.feature_scale: ordinary features get the training split's mean and std; a feature that is
    constant (or nearly) on the training split gets std = inf, so its z-score is 0 on every split instead of
    exploding where another split varies it (measured |z| = 3,350 on CMER-CL's val split with a 1e-6 clamp)."""
    import torch

    from imem.methods.base import feature_scale

    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 4, generator=g) * torch.tensor([1.0, 2.0, 0.0, 1e-7]) + torch.tensor([0.0, 5.0, 0.3, 0.0])
    val = torch.randn(50, 4, generator=g)
    mean, std = feature_scale(train)
    assert torch.allclose(mean, train.mean(0)) and torch.allclose(std[:2], train.std(0)[:2])
    assert torch.isinf(std[2:]).all()
    z = (val - mean) / std
    assert torch.isfinite(z).all() and (z[:, 2:] == 0).all() and z[:, :2].abs().max() < 10
    zt = (train - mean) / std
    assert torch.allclose(zt[:, :2].mean(0), torch.zeros(2), atol=1e-5) and torch.allclose(zt[:, :2].std(0), torch.ones(2))
    m3, s3 = feature_scale(train[None].expand(3, -1, -1), dims=(0, 1), keepdim=True)  # CMER-CL's sequence features
    assert s3.shape == (1, 1, 4) and torch.isinf(s3[0, 0, 2:]).all()
    _, s_b = feature_scale(train, unbiased=False)  # MMVA's population std
    assert torch.allclose(s_b[:2], train.std(0, unbiased=False)[:2])
