"""SP-Net (CDCML section 6.1.2): two separately trained VA regressors, one per modality (the train-stage
variants ``unimodal_image`` and ``unimodal_music``), and a similarity computed from their predictions:
S_hat = exp(-||VA_image_hat - VA_music_hat|| / sigma), the same formula and sigma that define the ground
truth (imem.data.pairs.similarity). Nothing is trained here: the stage ``sp_net`` combines the two
variants' test-split predictions (``reports/evaluate/<variant>/predictions/*_va.csv``, best checkpoints).

Columns: similarity MSE/MAE on the split's pairs, image and music VA MSE/MAE, and music<->image retrieval
ranked by S_hat (``*_sim_*``; SP-Net has no shared embedding space, so no ``*_emb_*``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from imem.data.pairs import similarity, similarity_matrix
from imem.errors import ImemError
from imem.methods.base import (
    CHANCE_ROW,
    CORPUS_LABEL,
    MethodResult,
    Rankings,
    check_result,
    log_results,
    matching_chance,
    matching_resampled,
    regression_columns,
    seed_rows,
    write_reports,
)
from imem.metrics import regression

LABEL = "SP-Net"
DEFAULTS: dict = {"image_variant": "unimodal_image", "music_variant": "unimodal_music", "checkpoint": "best"}


def _predictions(eval_dir: Path, side: str, checkpoint: str) -> pd.DataFrame:
    path = eval_dir / "predictions" / f"{side}_va.csv"
    if not path.is_file():
        raise ImemError(f"{path}: no {side} predictions (run the evaluate stage of that variant)")
    df = pd.read_csv(path, dtype={"id": str})
    cols = [f"valence_{checkpoint}", f"arousal_{checkpoint}"]
    if not set(cols) <= set(df.columns):
        raise ImemError(f"{path}: no columns {cols} (params: methods.sp_net.checkpoint is best or last)")
    return df.set_index("id")


def _seed_columns(table: pd.DataFrame, checkpoint: str) -> list[str]:
    """The prediction names of every training seed in a ``*_va.csv``: the checkpoint's own (``best``/``last``,
    the first seed) and, for ``best``, ``seed_<n>`` of each extra seed (evaluate writes ``valence_seed_<n>``)."""
    extra = sorted({c[len("valence_"):] for c in table.columns if c.startswith("valence_seed_")},
                   key=lambda n: int(n.rsplit("_", 1)[1]))
    return [checkpoint] + (extra if checkpoint == "best" else [])


def sp_net_seeds(cfg: dict, reports_dir: str | Path, prepare_dir: str | Path, stats_path: str | Path,
                 eval_params: dict) -> list[MethodResult]:
    """SP-Net's rows from the two unimodal variants' evaluation outputs (``reports_dir/<variant>/``), one
    result per training seed (the k-th seed of the image regressor with the k-th of the music one), each
    with its bootstrap ``rescore``."""
    reports_dir, prepare_dir = Path(reports_dir), Path(prepare_dir)
    split, ck = eval_params["split"], cfg["checkpoint"]
    for side in ("image", "music"):
        mpath = reports_dir / cfg[f"{side}_variant"] / "metrics.json"
        if not mpath.is_file():
            raise ImemError(f"{mpath}: missing (run evaluate@{cfg[side + '_variant']})")
        meta = json.loads(mpath.read_text())
        if meta["split"] != split:
            raise ImemError(f"{mpath}: evaluated on split {meta['split']!r}, but evaluate.split is {split!r}")
    sigma = float(json.loads(Path(stats_path).read_text())["sigma"])
    img = _predictions(reports_dir / cfg["image_variant"], "image", ck)
    mus = _predictions(reports_dir / cfg["music_variant"], "music", ck)
    d = prepare_dir / split
    clips = pd.read_csv(d / "clips.csv", dtype={"clip_id": str, "song_id": str})
    images = pd.read_csv(d / "images.csv", dtype={"image_id": str})
    pairs = pd.read_csv(d / "pairs.csv", dtype={"clip_id": str, "image_id": str})
    for ids, table, what in ((images["image_id"], img, "image"), (clips["clip_id"], mus, "clip")):
        missing = sorted(set(ids) - set(table.index))
        if missing:
            raise ImemError(f"{what} {missing[0]!r} of {d} has no SP-Net prediction "
                            "(evaluate outputs older than the prepared split? re-run dvc repro)")
    img, mus = img.loc[images["image_id"]], mus.loc[clips["clip_id"]]  # the split tables' order: bootstrap indices
    pair_c = pd.Index(clips["clip_id"]).get_indexer(pairs["clip_id"])
    pair_i = pd.Index(images["image_id"]).get_indexer(pairs["image_id"])
    if (pair_c < 0).any() or (pair_i < 0).any():
        raise ImemError(f"{d / 'pairs.csv'}: a pair names a clip or image that is not in the split's tables")
    va_true = {"image": img[["valence", "arousal"]].to_numpy(np.float64),
               "music": mus[["valence", "arousal"]].to_numpy(np.float64)}
    true_sim = pairs["score"].to_numpy(np.float64)
    thr, k = float(eval_params["relevance_threshold"]), int(eval_params["ndcg_k"])
    truth = similarity_matrix(va_true["music"], va_true["image"], sigma)
    chance = {c: v for c, v in matching_chance(truth, thr, k).items() if "_sim_" in c}
    names_i, names_m = _seed_columns(img, ck), _seed_columns(mus, ck)
    results = []
    for name_i, name_m in zip(names_i, names_m, strict=False):  # as many seeds as both regressors have
        va_pred = {"image": img[[f"valence_{name_i}", f"arousal_{name_i}"]].to_numpy(np.float64),
                   "music": mus[[f"valence_{name_m}", f"arousal_{name_m}"]].to_numpy(np.float64)}
        # CDCML section 6.1.2 (SP-Net): S_hat = exp(-d(VA_I_hat, VA_M_hat) / sigma), through the one similarity formula
        pair_sim = similarity(np.linalg.norm(va_pred["image"][pair_i] - va_pred["music"][pair_c], axis=1), sigma)
        scores = similarity_matrix(va_pred["music"], va_pred["image"], sigma)  # S_hat of every clip-image combination
        ranks = Rankings(scores, truth, thr, k)  # per-query rankings, once: a resample re-weights them

        def rows_on(ci: np.ndarray, ii: np.ndarray, va_pred=va_pred, pair_sim=pair_sim, ranks=ranks) -> dict:
            """SP-Net's row on clips ``ci`` and images ``ii`` of the split (a bootstrap resample, or all)."""
            w = np.bincount(ci, minlength=len(clips))[pair_c] * np.bincount(ii, minlength=len(images))[pair_i]
            row = regression_columns({"image": va_pred["image"][ii], "music": va_pred["music"][ci]},
                                     {"image": va_true["image"][ii], "music": va_true["music"][ci]})
            if w.sum() > 0:
                row.update({f"sim_{m}": v for m, v in regression(pair_sim, true_sim, w).items()})
            row.update(matching_resampled(ranks, truth, "sim", thr, k, ci, ii))
            return {LABEL: row}

        row = rows_on(np.arange(len(clips)), np.arange(len(images)))[LABEL]
        notes = {"sigma": sigma, "image_variant": cfg["image_variant"], "music_variant": cfg["music_variant"],
                 "checkpoint": ck, "pairs": len(pairs), "clips": len(mus), "images": len(img)}
        results.append(MethodResult(rows={LABEL: row, CHANCE_ROW: chance}, history=[], state={}, notes=notes,
                                    rescore=rows_on))
    return results


def sp_net(cfg: dict, reports_dir: str | Path, prepare_dir: str | Path, stats_path: str | Path,
           eval_params: dict) -> MethodResult:
    """SP-Net of the first training seed of both regressors."""
    return sp_net_seeds(cfg, reports_dir, prepare_dir, stats_path, eval_params)[0]


def run_sp_net(cfg: dict, reports_dir: str | Path, prepare_dir: str | Path, stats_path: str | Path,
               eval_params: dict, out_dir: str | Path, track: bool = True, progress: bool = True) -> dict:
    """Write ``out_dir/{metrics.json,results.md,bootstrap.npz}`` in the methods' schema (and log an MLflow
    run): the mean over the regressors' training seeds, their std and the 95 % bootstrap interval."""
    from imem import bootstrap

    results = sp_net_seeds(cfg, reports_dir, prepare_dir, stats_path, eval_params)
    for r in results:
        check_result("sp_net", r)
    split = eval_params["split"]
    bs = dict(eval_params.get("bootstrap") or {"n": 1000, "seed": 2026, "level": 0.95})
    clips = pd.read_csv(Path(prepare_dir) / split / "clips.csv", dtype={"clip_id": str, "song_id": str})
    images = pd.read_csv(Path(prepare_dir) / split / "images.csv", dtype={"image_id": str})
    plan = bootstrap.make_plan(clips["song_id"].to_numpy(), images["image_id"].to_numpy(), int(bs["n"]), int(bs["seed"]))
    reps = [bootstrap.replicate(r.rescore, plan, desc=f"bootstrap sp_net seed {k + 1}/{len(results)}", progress=progress)
            for k, r in enumerate(results)]
    boot = {LABEL: bootstrap.mean_over([r[LABEL] for r in reps])}
    seeds = {}
    for side in ("image", "music"):
        m = json.loads((Path(reports_dir) / cfg[f"{side}_variant"] / "metrics.json").read_text())
        seeds[side] = [int(x) for x in m.get("seeds", {}).get("train_seeds", [])][:len(results)]
    rows, extra = seed_rows([r.rows for r in results], seeds["image"] or list(range(1, len(results) + 1)))
    extra["seeds"].update(music_train_seeds=seeds["music"],
                          note="the k-th training seed of the image regressor with the k-th of the music regressor")
    metrics = {"method": "sp_net", "label": LABEL, "split": split, "corpus": CORPUS_LABEL,
               "relevance_threshold": float(eval_params["relevance_threshold"]), **results[0].notes,
               "rows": rows, **extra,
               "bootstrap": {"resamples": plan.n, "seed": plan.seed, "level": float(bs["level"]),
                             "units": "songs of the split (a song's clips together) and images, with replacement"},
               "rows_ci": {LABEL: bootstrap.intervals(boot[LABEL], float(bs["level"]))}}
    out_dir = Path(out_dir)
    write_reports(out_dir, metrics, bootstrap_file=(boot, plan))
    if track:
        from imem.tracking import mlflow_run

        with mlflow_run("imem-methods", "sp_net", {**cfg, "corpus": CORPUS_LABEL}, tags={"imem.method": "sp_net"}):
            log_results(metrics, [out_dir / "metrics.json", out_dir / "results.md"])
    return metrics
