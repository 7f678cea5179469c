"""One comparison of every method and variant (issue 7): a row per method/variant, a column per metric
(:data:`imem.methods.base.COLUMNS`), blank where a metric does not apply.

Sources: the ``evaluate@<variant>`` outputs of the train-stage variants (CDCML, thesis CNN/transformers,
ACP-Net, L3-Net, the ablation rows; best checkpoint) and the ``reports/methods/<name>/metrics.json`` of the
other methods (SP-Net, MMVA, Emo-CLIM, CMER-CL and their baselines). Two reference rows close the table:
the *mean predictor* (training-set means) and the *random ranking* (exact chance level of every ranking
metric, from the evaluate stage and each method's own protocol).

A variant whose loss weight for the similarity or a VA decoder is 0 leaves that decoder untrained, so those
columns are blank for it (CDCML's ablation rows); without a cross-modal loss (CFR and CFM both 0: ACP-Net,
L3-Net, the first two ablation rows) nothing aligns f_I with f_M, so the embedding-proximity columns are blank. Everything is measured on the split of ``evaluate.split``
of the corpus the pipeline ran on -- by default the embedded (generated) corpus, which the report says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from imem.errors import ImemError
from imem.io import write_csv, write_text
from imem.methods.base import CHANCE_ROW, COLUMN_GROUPS, COLUMNS, CORPUS_LABEL, LOWER_IS_BETTER

VARIANT_LABELS = {
    "cnn": "CDCML (ResNet50 + ResNet18, all losses, eq. 8 sum)",
    "cnn_thesis": "thesis CNN (all losses, eq. 3.10 first-batch normalised)",
    "transformer_v1": "thesis transformer v1 (ViT + BEATs, flatten)",
    "transformer_v2": "thesis transformer v2 (ViT + BEATs, CLS)",
    "unimodal_image": "image VA regressor (SP-Net's image half)",
    "unimodal_music": "music VA regressor (SP-Net's music half)",
    "acp_net": "ACP-Net (frozen image CNN + handcrafted audio statistics)",
    "l3_net": "L3-Net (image + log-mel subnetworks from scratch)",
    "cdcml_sim": "CDCML ablation: Sim",
    "cdcml_sim_va": "CDCML ablation: Sim + VA",
    "cdcml_sim_va_cfr": "CDCML ablation: Sim + VA + CFR",
    "cdcml_sim_va_cfr_cfm": "CDCML ablation: Sim + VA + CFR + CFM",
}
ABLATION = ("cdcml_sim", "cdcml_sim_va", "cdcml_sim_va_cfr", "cdcml_sim_va_cfr_cfm", "cnn")
MEAN_ROW = "mean predictor"
GROUP_TITLES = {
    "regression": "Regression (MSE / MAE; lower is better)",
    "matching": "Image-music retrieval: relevant when true S > {thr} (higher is better)",
    "emotion_class": "Emotion-class retrieval, Emo-CLIM protocol (same class = relevant; per class, then across classes)",
    "text_music": "Caption -> music retrieval, MMVA protocol",
    "music_emotion": "Music <-> emotion retrieval, CMER-CL protocol (its own VA sequence is relevant; ranks: lower is better)",
}


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ImemError(f"{path}: missing (run its stage first)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ImemError(f"{path}: not valid JSON ({exc})") from exc


def variant_row(metrics: dict) -> dict[str, float]:
    """The best checkpoint's values in the comparison's columns, blank for decoders trained with weight 0."""
    row = {k: v for k, v in metrics["best"].items() if k in COLUMNS}
    w = metrics.get("loss_weights", {})
    drop = []
    if w.get("sim", 1.0) == 0:
        drop += [c for c in row if c.startswith("sim_") or "_sim_" in c]
    for side in ("image", "music"):
        if w.get(f"va_{side}", 1.0) == 0:
            drop += [c for c in row if c.startswith(f"{side}_")]
    if w.get("cfr", 1.0) == 0 and w.get("cfm", 1.0) == 0:  # no cross-modal loss aligns f_I with f_M: no shared space
        drop += [c for c in row if "_emb_" in c]
    return {k: v for k, v in row.items() if k not in drop}


def _merge_reference(into: dict, row: dict, where: str) -> None:
    """Reference rows (mean predictor, chance) from several sources must agree where they overlap."""
    for k, v in row.items():
        if k in into and not math.isclose(into[k], v, rel_tol=1e-4, abs_tol=1e-5):
            raise ImemError(f"{where}: reference value {k} = {v} disagrees with {into[k]} from another source "
                            "(reports from different runs or splits? re-run dvc repro)")
        into.setdefault(k, v)


def collect(variants: list[str], methods: list[str], evaluate_dir: str | Path, methods_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """(table, info): one row per variant / method row, then the mean-predictor and random-ranking rows."""
    evaluate_dir, methods_dir = Path(evaluate_dir), Path(methods_dir)
    rows, mean_row, chance_row = [], {}, {}
    splits, thresholds = set(), set()
    for v in variants:
        path = evaluate_dir / v / "metrics.json"
        m = _read(path)
        splits.add(m["split"])
        thresholds.add(float(m["relevance_threshold"]))
        rows.append({"row": VARIANT_LABELS.get(v, v), "source": f"train@{v}", **variant_row(m)})
        _merge_reference(mean_row, {k: x for k, x in m["mean_predictor"].items() if k in COLUMNS}, str(path))
        if "random_ranking" in m:  # evaluate writes m2i_ndcg10 ...: the same chance for both scorers
            rr = {f"{k[:3]}_{s}_{k[4:]}": x for k, x in m["random_ranking"].items() for s in ("sim", "emb")}
            _merge_reference(chance_row, {k: x for k, x in rr.items() if k in COLUMNS}, str(path))
    for name in methods:
        path = methods_dir / name / "metrics.json"
        m = _read(path)
        splits.add(m["split"])
        thresholds.add(float(m["relevance_threshold"]))
        for label, r in m["rows"].items():
            if label == CHANCE_ROW:
                _merge_reference(chance_row, r, str(path))
                continue
            shown = label if label == m["label"] else f"{label} ({m['label']} baseline)"
            rows.append({"row": shown, "source": f"{'sp_net' if name == 'sp_net' else 'method@' + name}", **r})
    if len(splits) > 1 or len(thresholds) > 1:
        raise ImemError(f"the reports were scored on different splits {sorted(splits)} or relevance thresholds "
                        f"{sorted(thresholds)}: re-run dvc repro")
    if mean_row:
        rows.append({"row": MEAN_ROW, "source": "training-set means", **mean_row})
    if chance_row:
        rows.append({"row": CHANCE_ROW, "source": "exact expectation", **chance_row})
    df = pd.DataFrame(rows)
    cols = ["row", "source"] + [c for c in COLUMNS if c in df.columns]
    info = {"split": splits.pop() if splits else "test", "relevance_threshold": thresholds.pop() if thresholds else None}
    return df[cols], info


def _fmt_group(df: pd.DataFrame, cols: list[str]) -> str:
    """Markdown for one metric group: rows with a value in it; the best model value per column in bold."""
    sub = df[["row"] + cols][df[cols].notna().any(axis=1)].reset_index(drop=True)
    models = ~sub["row"].isin([MEAN_ROW, CHANCE_ROW])
    out = sub.astype(object)
    for c in cols:
        vals = sub.loc[models, c].dropna()
        best = (vals.min() if c in LOWER_IS_BETTER else vals.max()) if len(vals) else None
        out[c] = [("" if pd.isna(x) else (f"**{x:.4f}**" if (best is not None and m and x == best) else f"{x:.4f}"))
                  for x, m in zip(sub[c], models, strict=True)]
    return out.to_markdown(index=False, disable_numparse=True)


def markdown(df: pd.DataFrame, info: dict, title: str) -> str:
    parts = [f"# {title}\n",
             f"Measured on the **{CORPUS_LABEL}**, {info['split']} split, by `dvc repro` (docs/comparison.md). "
             "These numbers compare the methods on the same generated data; they are **not** a reproduction of "
             "any paper's table. Blank: the metric does not apply to that row. Bold: the best model value in "
             "the column (the mean predictor and the random ranking are references, not candidates).\n"]
    for group, cols in COLUMN_GROUPS.items():
        present = [c for c in cols if c in df.columns and df[c].notna().any()]
        if not present:
            continue
        head = GROUP_TITLES[group].format(thr=info.get("relevance_threshold"))
        if group == "matching":
            for scorer, what in (("sim", "ranked by the predicted matching score"),
                                 ("emb", "ranked by proximity in the shared space (CDCML and the thesis: "
                                         "squared distance of f_I and f_M; Emo-CLIM: cosine; MMVA: distance of "
                                         "the predicted VA)")):
                sc = [c for c in present if f"_{scorer}_" in c]
                if sc:
                    renamed = df.rename(columns={c: c.replace(f"_{scorer}_", "_") for c in sc})
                    parts.append(f"## {head}, {what}\n\n{_fmt_group(renamed, [c.replace(f'_{scorer}_', '_') for c in sc])}\n")
            continue
        parts.append(f"## {head}\n\n{_fmt_group(df, present)}\n")
    abl = [VARIANT_LABELS[v] for v in ABLATION]
    if set(abl[:-1]) & set(df["row"]):
        cols = [c for c in ("sim_mse", "image_valence_mse", "image_arousal_mse", "music_valence_mse",
                            "music_arousal_mse", "m2i_sim_mrr", "m2i_emb_mrr") if c in df.columns]
        sub = df[df["row"].isin(abl)].set_index("row").reindex([a for a in abl if a in set(df["row"])]).reset_index()
        parts.append("## CDCML ablation (table 4 layout; the last row uses all seven losses)\n\n"
                     + _fmt_group(sub, cols) + "\n")
    return "\n".join(parts)


def write_comparison(variants: list[str], methods: list[str], evaluate_dir: str | Path, methods_dir: str | Path,
                     out_dir: str | Path, title: str = "Comparison of methods", track: bool = True) -> pd.DataFrame:
    df, info = collect(variants, methods, evaluate_dir, methods_dir)
    out_dir = Path(out_dir)
    write_csv(out_dir / "comparison.csv", df)
    write_text(out_dir / "comparison.md", markdown(df, info, title))
    if track:
        import mlflow

        from imem.tracking import mlflow_run

        with mlflow_run("imem-compare", out_dir.name, {"variants": variants, "methods": methods,
                                                        "split": info["split"], "corpus": CORPUS_LABEL}):
            mlflow.log_table(df, artifact_file="comparison.json")
            for f in ("comparison.csv", "comparison.md"):
                mlflow.log_artifact(str(out_dir / f))
    return df
