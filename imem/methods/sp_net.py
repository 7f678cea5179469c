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
    check_result,
    log_results,
    matching_chance,
    matching_columns,
    regression_columns,
    write_reports,
)

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


def sp_net(cfg: dict, reports_dir: str | Path, prepare_dir: str | Path, stats_path: str | Path,
           eval_params: dict) -> MethodResult:
    """SP-Net's rows from the two unimodal variants' evaluation outputs (``reports_dir/<variant>/``)."""
    reports_dir, prepare_dir = Path(reports_dir), Path(prepare_dir)
    split, ck = eval_params["split"], cfg["checkpoint"]
    metas = {}
    for side in ("image", "music"):
        mpath = reports_dir / cfg[f"{side}_variant"] / "metrics.json"
        if not mpath.is_file():
            raise ImemError(f"{mpath}: missing (run evaluate@{cfg[side + '_variant']})")
        metas[side] = json.loads(mpath.read_text())
        if metas[side]["split"] != split:
            raise ImemError(f"{mpath}: evaluated on split {metas[side]['split']!r}, but evaluate.split is {split!r}")
    sigma = float(json.loads(Path(stats_path).read_text())["sigma"])
    img = _predictions(reports_dir / cfg["image_variant"], "image", ck)
    mus = _predictions(reports_dir / cfg["music_variant"], "music", ck)
    pairs = pd.read_csv(prepare_dir / split / "pairs.csv", dtype={"clip_id": str, "image_id": str})
    for ids, table, what in ((pairs["image_id"], img, "image"), (pairs["clip_id"], mus, "clip")):
        missing = sorted(set(ids) - set(table.index))
        if missing:
            raise ImemError(f"{what} {missing[0]!r} of {prepare_dir / split / 'pairs.csv'} has no SP-Net prediction "
                            "(evaluate outputs older than the prepared split? re-run dvc repro)")
    cols = [f"valence_{ck}", f"arousal_{ck}"]
    pi = img.loc[pairs["image_id"], cols].to_numpy(np.float64)
    pm = mus.loc[pairs["clip_id"], cols].to_numpy(np.float64)
    # CDCML section 6.1.2 (SP-Net): S_hat = exp(-d(VA_I_hat, VA_M_hat) / sigma), through the one similarity formula
    pair_sim = similarity(np.linalg.norm(pi - pm, axis=1), sigma)
    va_pred = {"image": img[cols].to_numpy(np.float64), "music": mus[cols].to_numpy(np.float64)}
    va_true = {"image": img[["valence", "arousal"]].to_numpy(np.float64),
               "music": mus[["valence", "arousal"]].to_numpy(np.float64)}
    row = regression_columns(va_pred, va_true, pair_sim, pairs["score"].to_numpy(np.float64))
    thr, k = float(eval_params["relevance_threshold"]), int(eval_params["ndcg_k"])
    truth = similarity_matrix(va_true["music"], va_true["image"], sigma)
    scores = similarity_matrix(va_pred["music"], va_pred["image"], sigma)  # S_hat of every clip-image combination
    row.update(matching_columns(scores, truth, "sim", thr, k))
    chance = {c: v for c, v in matching_chance(truth, thr, k).items() if "_sim_" in c}
    notes = {"sigma": sigma, "image_variant": cfg["image_variant"], "music_variant": cfg["music_variant"],
             "checkpoint": ck, "pairs": len(pairs), "clips": len(mus), "images": len(img)}
    return MethodResult(rows={LABEL: row, CHANCE_ROW: chance}, history=[], state={}, notes=notes)


def run_sp_net(cfg: dict, reports_dir: str | Path, prepare_dir: str | Path, stats_path: str | Path,
               eval_params: dict, out_dir: str | Path, track: bool = True) -> dict:
    """Write ``out_dir/{metrics.json,results.md}`` in the methods' schema (and log an MLflow run)."""
    result = sp_net(cfg, reports_dir, prepare_dir, stats_path, eval_params)
    check_result("sp_net", result)
    metrics = {"method": "sp_net", "label": LABEL, "split": eval_params["split"], "corpus": CORPUS_LABEL,
               "relevance_threshold": float(eval_params["relevance_threshold"]), **result.notes,
               "rows": {k: {c: round(float(v), 6) for c, v in r.items()} for k, r in result.rows.items()}}
    out_dir = Path(out_dir)
    write_reports(out_dir, metrics)
    if track:
        from imem.tracking import mlflow_run

        with mlflow_run("imem-methods", "sp_net", {**cfg, "corpus": CORPUS_LABEL}, tags={"imem.method": "sp_net"}):
            log_results(metrics, [out_dir / "metrics.json", out_dir / "results.md"])
    return metrics
