"""The evaluate / visualize / summarize stages on a tiny trained pipeline: tables, metrics JSON schema,
mean-predictor row, consistency of the saved predictions, figures, MLflow logging and bad input."""

import json
import shutil
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from corpus_fixtures import prepared_pipeline
from imem.checkpoints import safe_load, save
from imem.data.pairs import similarity
from imem.errors import ImemError
from imem.evaluation import evaluate_variant, summarize
from imem.metrics import retrieval
from imem.params import section
from imem.plots import visualize_variant
from imem.training import train_variant, variant_config

pytestmark = pytest.mark.slow

ENCODERS = {"r18": {"type": "resnet", "arch": "resnet18", "pretrained": None}}
VARIANTS = {
    "cnn": {"kind": "matching", "image_encoder": "r18", "music_encoder": "r18", "image_head": "pool", "music_head": "pool"},
    "unimodal_music": {"kind": "unimodal_music", "music_encoder": "r18", "music_head": "pool"},
}
REG_KEYS = {f"{t}_{m}" for t in ("sim", "image_valence", "image_arousal", "music_valence", "music_arousal")
            for m in ("mse", "mae")}
RET_KEYS = {f"{d}_{s}_{m}" for d in ("m2i", "i2m") for s in ("sim", "emb")
            for m in ("ndcg10", "spearman", "r1", "r5", "r10", "mrr")}


def _cfg(variant):
    raw = {"train": {"common": {"epochs": 3, "batch_size": 16, "cache_batch_size": 16}, "encoders": ENCODERS,
                     "variants": VARIANTS}}
    return variant_config(section("train", raw), variant)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny corpus, prepared, featurised, both variants trained (tracked in a temp MLflow store)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    prepared_pipeline(tmp, n_songs=4, split={"train": 0.5, "val": 0.25, "test": 0.25})
    for v in VARIANTS:  # only cnn is tracked (MLflow logging is what takes time here)
        track = v == "cnn"
        train_variant(_cfg(v), tmp / "prepare", tmp / "features", tmp / "models" / v, tmp / "train" / v,
                      track=track, progress=False)
        evaluate_variant(tmp / "models" / v, tmp / "prepare", tmp / "features", tmp / "rep" / "stats.json",
                         tmp / "eval" / v, section("evaluate"), track=track, progress=False)
    yield tmp
    mp.undo()


def _metrics(run, v="cnn"):
    return json.loads((run / "eval" / v / "metrics.json").read_text())


def test_metrics_json_schema(run):
    m = _metrics(run)
    assert {"variant", "split", "corpus", "sigma", "relevance_threshold", "best_epoch", "last_epoch",
            "best_sha256"} <= set(m)
    assert m["variant"] == "cnn" and m["split"] == "test" and "embedded" in m["corpus"]
    assert m["last_epoch"] == 3 and 1 <= m["best_epoch"] <= 3
    for name in ("best", "last", "untrained"):
        assert set(m[name]) == REG_KEYS | RET_KEYS, name
        assert all(np.isfinite(v) for v in m[name].values())
    assert set(m["mean_predictor"]) == REG_KEYS
    assert set(m["random_ranking"]) == {f"{d}_{k}" for d in ("m2i", "i2m") for k in
                                        ("ndcg10", "spearman", "r1", "r5", "r10", "mrr", "queries",
                                         "queries_with_relevant")}
    u = _metrics(run, "unimodal_music")
    assert set(u["best"]) == {k for k in REG_KEYS if k.startswith("music_")} and "random_ranking" not in u


def test_mean_predictor_row_by_hand(run):
    prep = run / "prepare"
    tr_pairs, te_pairs = pd.read_csv(prep / "train" / "pairs.csv"), pd.read_csv(prep / "test" / "pairs.csv")
    sim_mean = tr_pairs["score"].mean()
    mp = _metrics(run)["mean_predictor"]
    assert mp["sim_mse"] == pytest.approx(((te_pairs["score"] - sim_mean) ** 2).mean(), abs=1e-6)
    assert mp["sim_mae"] == pytest.approx((te_pairs["score"] - sim_mean).abs().mean(), abs=1e-6)
    for side, f in (("image", "images.csv"), ("music", "clips.csv")):
        tr, te = pd.read_csv(prep / "train" / f), pd.read_csv(prep / "test" / f)
        for dim in ("valence", "arousal"):
            assert mp[f"{side}_{dim}_mse"] == pytest.approx(((te[dim] - tr[dim].mean()) ** 2).mean(), abs=1e-6)
            assert mp[f"{side}_{dim}_mae"] == pytest.approx((te[dim] - tr[dim].mean()).abs().mean(), abs=1e-6)
    table = pd.read_csv(run / "eval" / "cnn" / "regression.csv")
    assert table["model"].tolist() == ["best", "last", "untrained", "mean_predictor", "mean over 1 seed",
                                       "95 % CI low", "95 % CI high"]
    assert table.set_index("model").loc["mean_predictor", "sim_mse"] == pytest.approx(mp["sim_mse"], abs=1e-6)


def test_saved_predictions_reproduce_the_metrics(run):
    pred, m = run / "eval" / "cnn" / "predictions", _metrics(run)
    pairs = pd.read_csv(pred / "pairs.csv")
    assert m["best"]["sim_mse"] == pytest.approx(((pairs["sim_best"] - pairs["score"]) ** 2).mean(), abs=1e-5)
    iva = pd.read_csv(pred / "image_va.csv")
    assert m["last"]["image_arousal_mae"] == pytest.approx((iva["arousal_last"] - iva["arousal"]).abs().mean(), abs=1e-5)
    # the ground-truth matrix is eq. 1 of the items' VA, and agrees with the prepared pairs' scores
    mva = pd.read_csv(pred / "music_va.csv")
    truth = np.load(pred / "truth.npy")
    d = np.sqrt(((mva[["valence", "arousal"]].to_numpy()[:, None] - iva[["valence", "arousal"]].to_numpy()[None]) ** 2)
                .sum(-1))
    np.testing.assert_allclose(truth, similarity(d, m["sigma"]), atol=1e-5)
    ci = {c: i for i, c in enumerate(mva["id"].astype(str))}
    ii = {c: i for i, c in enumerate(iva["id"].astype(str))}
    got = [truth[ci[str(c)], ii[str(i)]] for c, i in zip(pairs["clip_id"], pairs["image_id"], strict=True)]
    np.testing.assert_allclose(got, pairs["score"], atol=2e-5)
    # ranking by embedding distance, recomputed from the saved embeddings
    ei, em = np.load(pred / "image_embeddings_best.npy"), np.load(pred / "music_embeddings_best.npy")
    dist = ((em[:, None].astype(np.float64) - ei[None]) ** 2).sum(-1)
    r = retrieval(-dist, truth, m["relevance_threshold"])
    for k in ("ndcg10", "spearman", "r1", "mrr"):
        assert m["best"][f"m2i_emb_{k}"] == pytest.approx(r[k], abs=1e-5)
    # the top lists follow the scores
    top = pd.read_csv(pred / "top.csv", dtype={"query_id": str, "candidate_id": str})
    q = top[(top["direction"] == "music_to_image") & (top["ranked_by"] == "emb")]
    first = q[q["rank"] == 1].set_index("query_id")["candidate_id"]
    ids = iva["id"].astype(str).to_numpy()
    for clip, row in ci.items():
        assert first[clip] == ids[np.argmin(dist[row])]


def test_best_and_last_rows_come_from_their_own_checkpoints(run, tmp_path):
    """last.pt replaced by the same model with every decoder's output layer zeroed, so it predicts sigmoid(0) =
    0.5 for S and VA alike: the last row equals that constant predictor's errors computed by hand from the
    prepared tables, and the best row stays the trained model's."""
    model_dir = tmp_path / "cnn"
    shutil.copytree(run / "models" / "cnn", model_dir)
    ck = safe_load(model_dir / "last.pt")
    for decoder in ("sim", "va_image", "va_music"):  # MLPDecoder: the last Linear is layer 8, before the sigmoid
        for p in ("weight", "bias"):
            ck["model"][f"{decoder}.8.{p}"].zero_()
    save(ck, model_dir / "last.pt")
    evaluate_variant(model_dir, run / "prepare", run / "features", run / "rep" / "stats.json", tmp_path / "eval",
                     section("evaluate"), track=False, progress=False)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    test = run / "prepare" / "test"
    pairs = pd.read_csv(test / "pairs.csv")
    assert m["last"]["sim_mse"] == pytest.approx(((pairs["score"] - 0.5) ** 2).mean(), abs=1e-6)
    assert m["last"]["sim_mae"] == pytest.approx((pairs["score"] - 0.5).abs().mean(), abs=1e-6)
    for side, f in (("image", "images.csv"), ("music", "clips.csv")):
        va = pd.read_csv(test / f)
        for dim in ("valence", "arousal"):
            assert m["last"][f"{side}_{dim}_mse"] == pytest.approx(((va[dim] - 0.5) ** 2).mean(), abs=1e-6)
    assert m["best"] == pytest.approx(_metrics(run)["best"], abs=1e-6)
    assert abs(m["best"]["sim_mse"] - m["last"]["sim_mse"]) > 1e-4


def test_sim_matrix_matches_pairwise_prediction(run):
    """The batched clips x images similarity equals the model run on each listed pair."""
    pred = run / "eval" / "cnn" / "predictions"
    pairs = pd.read_csv(pred / "pairs.csv", dtype={"clip_id": str, "image_id": str})
    top = pd.read_csv(pred / "top.csv", dtype={"query_id": str, "candidate_id": str})
    sim = top[(top["ranked_by"] == "sim") & (top["direction"] == "music_to_image")]
    merged = sim.merge(pairs, left_on=["query_id", "candidate_id"], right_on=["clip_id", "image_id"])
    assert len(merged) > 0
    np.testing.assert_allclose(merged["score_x"], merged["sim_best"], atol=1e-5)


def test_tables_and_markdown(run):
    for v in VARIANTS:
        for f in ("regression.csv", "regression.md", "retrieval.csv", "retrieval.md"):
            assert (run / "eval" / v / f).is_file(), (v, f)
    md = (run / "eval" / "cnn" / "retrieval.md").read_text()
    assert "random ranking" in md and "embedding distance" in md and "embedded (generated) corpus" in md
    assert "Not applicable" in (run / "eval" / "unimodal_music" / "retrieval.md").read_text()
    reg, ret = summarize([run / "eval" / v for v in VARIANTS], run / "summary")
    assert len(reg) == 2 * 2 + 1 and reg["model"].iloc[-1].startswith("mean predictor")
    uni = reg[reg["model"].str.startswith("unimodal_music (best")].iloc[0]
    assert np.isnan(uni["sim_mse"]) and uni["music_valence_mse"] == _metrics(run, "unimodal_music")["best"]["music_valence_mse"]
    assert set(ret["model"]) == {"cnn (best)", "random ranking"}
    row = (run / "summary" / "regression.md").read_text().splitlines()
    uni_line = next(line for line in row if line.startswith("| unimodal_music (best"))
    assert "nan" not in uni_line


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_figures_are_written_and_deterministic(run, tmp_path):
    vp = section("visualize")
    out = visualize_variant(run / "train" / "cnn", run / "eval" / "cnn", run / "features", tmp_path / "a", vp, track=False)
    assert [p.name for p in out] == ["losses.png", "va_image.png", "va_music.png", "embedding_pca.png",
                                     "retrieval_sheet.png"]
    for p in out:
        w, h = _png_size(p)
        assert w >= 600 and h >= 400, p
    again = visualize_variant(run / "train" / "cnn", run / "eval" / "cnn", run / "features", tmp_path / "b", vp,
                              track=False)
    assert [p.read_bytes() for p in out] == [p.read_bytes() for p in again]
    uni = visualize_variant(run / "train" / "unimodal_music", run / "eval" / "unimodal_music", run / "features",
                            tmp_path / "u", vp, track=False)
    assert [p.name for p in uni] == ["losses.png", "va_music.png"]


def test_results_land_in_the_training_run(run):
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("imem-train").experiment_id],
                              filter_string="tags.`imem.variant` = 'cnn'")
    assert len(runs) == 1  # evaluation re-opened the training run instead of making another
    r = runs[0]
    assert r.data.tags["imem.best_sha256"] == _metrics(run)["best_sha256"]
    assert r.data.metrics["test/sim_mse"] == pytest.approx(_metrics(run)["best"]["sim_mse"], abs=1e-6)
    assert "test_last/image_valence_mae" in r.data.metrics and "test/m2i_emb_ndcg10" in r.data.metrics
    assert "test_mean_predictor/sim_mse" in r.data.metrics
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "evaluate")}
    assert {"evaluate/regression.json", "evaluate/retrieval.json", "evaluate/metrics.json"} <= arts
    visualize_variant(run / "train" / "cnn", run / "eval" / "cnn", run / "features", run / "fig" / "cnn",
                      section("visualize"))
    figs = {a.path for a in client.list_artifacts(r.info.run_id, "figures")}
    assert "figures/embedding_pca.png" in figs and "figures/retrieval_sheet.png" in figs
    # re-opening the run for evaluation and figures leaves its end time, so its duration stays the training's:
    # the last epoch's metric was logged before the run ended, the figures after
    after = client.get_run(r.info.run_id).info
    assert after.status == "FINISHED" and after.end_time == r.info.end_time
    last_epoch = max(m.timestamp for m in client.get_metric_history(r.info.run_id, "val/total"))
    assert last_epoch <= after.end_time < max(m.timestamp for m in client.get_metric_history(r.info.run_id, "test/sim_mse"))


def test_without_the_training_run_a_new_run_is_made(run, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")
    evaluate_variant(run / "models" / "cnn", run / "prepare", run / "features", run / "rep" / "stats.json",
                     tmp_path / "e", section("evaluate"), progress=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'fresh.db'}")
    runs = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("imem-train").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["imem.run_origin"] == "evaluate"
    assert "test/sim_mse" in runs[0].data.metrics


def test_missing_or_foreign_checkpoint_is_one_clear_error(run, tmp_path):
    with pytest.raises(ImemError, match=r"best\.pt: no checkpoint"):
        evaluate_variant(tmp_path / "nomodel", run / "prepare", run / "features", run / "rep" / "stats.json",
                         tmp_path / "e", section("evaluate"), track=False, progress=False)
    (tmp_path / "bad").mkdir()
    torch.save({"weights": 1}, tmp_path / "bad" / "best.pt")
    torch.save({"weights": 1}, tmp_path / "bad" / "last.pt")
    with pytest.raises(ImemError, match="not an imem checkpoint"):
        evaluate_variant(tmp_path / "bad", run / "prepare", run / "features", run / "rep" / "stats.json",
                         tmp_path / "e", section("evaluate"), track=False, progress=False)
    with pytest.raises(ImemError, match="evaluate.split"):
        evaluate_variant(run / "models" / "cnn", run / "prepare", run / "features", run / "rep" / "stats.json",
                         tmp_path / "e", {**section("evaluate"), "split": "holdout"}, track=False, progress=False)
    with pytest.raises(ImemError, match=r"missing \(run the evaluate stage"):
        visualize_variant(run / "train" / "cnn", tmp_path / "noeval", run / "features", tmp_path / "f",
                          section("visualize"), track=False)


def test_training_seeds_share_the_backbone_and_evaluate_reports_their_mean_std_and_bootstrap(run, tmp_path):
    """n_seeds = 2: the second seed trains into models/<variant>/seeds/<seed>/ with the same frozen backbone
    and other heads; evaluate reports the mean and std over both seeds and the bootstrap interval of the
    mean; the identity resample gives back the full-split numbers."""
    from imem import bootstrap
    from imem.evaluation import Evaluator, regression_row, resampled_row, retrieval_rows
    from imem.training import train_seeds

    cfg = dict(_cfg("cnn"), n_seeds=2)
    ev_params = dict(section("evaluate"), bootstrap={"n": 200, "seed": 3, "level": 0.95})
    reports = train_seeds(cfg, run / "prepare", run / "features", tmp_path / "m", tmp_path / "t", track=False,
                          progress=False)
    assert len(reports) == 2 and (tmp_path / "m" / "seeds" / "2" / "best.pt").is_file()
    a = torch.load(tmp_path / "m" / "best.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "m" / "seeds" / "2" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if "backbone" in k)  # same frozen backbones
    assert not torch.equal(a["sim.0.weight"], b["sim.0.weight"])  # other trained heads
    m = evaluate_variant(tmp_path / "m", run / "prepare", run / "features", run / "rep" / "stats.json",
                         tmp_path / "e", ev_params, track=False, progress=False)
    s = m["seeds"]
    assert s["n"] == 2 and s["train_seeds"] == [1, 2] and len(s["best_epochs"]) == 2
    first = m["best"]["sim_mse"]
    va = pd.read_csv(tmp_path / "e" / "predictions" / "music_va.csv")
    assert {"valence_best", "valence_seed_2"} <= set(va.columns)
    true_va = va[["valence", "arousal"]].to_numpy()
    second = float(np.mean((va["valence_seed_2"] - true_va[:, 0]) ** 2))
    assert s["mean"]["music_valence_mse"] == pytest.approx((m["best"]["music_valence_mse"] + second) / 2, abs=2e-6)
    assert s["std"]["sim_mse"] >= 0 and first > 0
    assert m["bootstrap"]["resamples"] == 200
    for c in ("sim_mse", "image_valence_mse", "music_arousal_mse"):
        # the reports round to 6 decimals, so a mean at an interval's end may pass it by one unit of rounding
        assert m["ci"]["lo"][c] - 1e-6 <= s["mean"][c] <= m["ci"]["hi"][c] + 1e-6, c
    reps, n, seed = bootstrap.load(tmp_path / "e" / "predictions" / "bootstrap.npz")
    assert (n, seed) == (200, 3) and set(reps) == {"model", "mean_predictor"}
    assert reps["model"]["sim_mse"].shape == (200,)
    # one formula: the identity resample equals the full-split rows of the first seed
    ck = torch.load(tmp_path / "m" / "best.pt", weights_only=False)
    ev = Evaluator(ck["config"], run / "prepare", run / "features", "test", m["sigma"], progress=False)
    ev.load(ck["model"])
    pred, true = ev.predict(), ev.targets()
    full = {**regression_row(pred, true), **retrieval_rows(pred, ev.truth, 0.7, 10)}
    from imem.evaluation import _scores, query_rankings

    ranks = query_rankings(pred, ev.truth, 0.7, 10)
    same = resampled_row(pred, true, ev, np.arange(len(ev.song_of_clip)), np.arange(len(ev.image_ids)), 0.7, 10, ranks)
    assert set(same) == set(full)
    for c, v in full.items():
        assert same[c] == pytest.approx(v, abs=1e-9, nan_ok=True), c
    # a real resample: the re-weighted per-query metrics equal re-ranking the drawn queries over all candidates
    plan = bootstrap.make_plan(ev.song_of_clip, ev.image_ids, 3, 5)
    ci, ii = plan.clips(1), plan.images(1)
    got = resampled_row(pred, true, ev, ci, ii, 0.7, 10, ranks)
    for sc in ("sim", "emb"):
        s = _scores(pred, sc, "music_to_image")
        for short, m in (("m2i", retrieval(s[ci], ev.truth[ci], 0.7)), ("i2m", retrieval(s.T[ii], ev.truth.T[ii], 0.7))):
            for name in ("ndcg10", "spearman", "r1", "r10", "mrr"):
                assert got[f"{short}_{sc}_{name}"] == pytest.approx(m[name], abs=1e-12), (short, sc, name)


def test_evaluate_reads_the_train_stages_backbone_memo_instead_of_rerunning_the_backbone(run, tmp_path, monkeypatch):
    """stages/evaluate.py passes the on-disk memo the train stage wrote (every split's rows under one key): the
    evaluation must hit it, never run the frozen backbone, and score exactly as a fresh backbone pass does."""
    import imem.training as training
    from imem.evaluation import load_checkpoints
    from imem.features.frozen import BackboneMemo
    from imem.training import Trainer

    memo = BackboneMemo(tmp_path / "memo")
    cfg = dict(load_checkpoints(run / "models" / "cnn")["best"]["config"], device="cpu")
    Trainer(cfg, run / "prepare", run / "features", progress=False).build_cache(memo=memo)  # what train stores
    assert memo.misses == 2 and len(list((tmp_path / "memo").glob("*.pt"))) == 2  # image and music entries

    def no_backbone(*a, **k):
        raise AssertionError("the backbone ran although the memo holds its outputs")

    monkeypatch.setattr(training, "backbone_cache", no_backbone)
    m = evaluate_variant(run / "models" / "cnn", run / "prepare", run / "features", run / "rep" / "stats.json",
                         tmp_path / "e", section("evaluate"), track=False, progress=False, cache_memo=memo)
    assert memo.hits == 2
    fresh = _metrics(run)
    for key in ("sim_mse", "image_valence_mse", "music_arousal_mae"):
        got, want = m["best"][key], fresh["best"][key]
        assert got == pytest.approx(want, abs=1e-6), key
