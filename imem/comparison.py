"""One comparison of every method and variant (issue 7): a row per method/variant, a column per metric
(:data:`imem.methods.base.COLUMNS`), blank where a metric does not apply.

Sources: the ``evaluate@<variant>`` outputs of the train-stage variants (CDCML, thesis CNN/transformers,
ACP-Net, L3-Net, the ablation rows; best checkpoint) and the ``reports/methods/<name>/metrics.json`` of the
other methods (SP-Net, MMVA, Emo-CLIM, CMER-CL and their baselines). Two reference rows close the table:
the *mean predictor* (training-set means) and the *random ranking* (exact chance level of every ranking
metric, from the evaluate stage and each method's own protocol).

A variant whose loss weight for the similarity or a VA decoder is 0 leaves that decoder untrained, so those
columns are blank for it (CDCML's ablation rows without a VA loss train a separate VA predictor instead,
``va_decoder: separate``, and report VA); without a cross-modal loss (CFR and CFM both 0: ACP-Net, L3-Net, the
Sim and Sim + VA ablation rows) nothing aligns f_I with f_M, so the embedding-proximity columns are blank. Everything is measured on the split of ``evaluate.split``
of the corpus the pipeline ran on -- by default the embedded (generated) corpus, which the report says.

Uncertainty (issue 14): a model row's value is the mean over its training seeds, shown with their standard
deviation and the 95 % bootstrap interval of that mean (test songs and images resampled; imem.bootstrap).
Every source draws the same resamples, so two rows are compared *paired*: the interval of their difference
on the same resamples. A column's best value is bold only where its difference to the runner-up has an
interval that excludes 0; the paired differences against a reference row (CDCML) are a table of their own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
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
    "cdcml_sim_cfr": "CDCML ablation: Sim + CFR",
    "cdcml_sim_cfr_cfm": "CDCML ablation: Sim + CFR + CFM",
    "cdcml_sim_va": "CDCML ablation: Sim + VA",
}
ABLATION = ("cdcml_sim", "cdcml_sim_cfr", "cdcml_sim_cfr_cfm", "cdcml_sim_va", "cnn")  # CDCML table 4's rows
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


def variant_row(metrics: dict, key: str = "best") -> dict[str, float]:
    """``metrics[key]``'s values in the comparison's columns (``best``: the first seed's best checkpoint), blank
    for decoders trained with weight 0."""
    row = {k: v for k, v in metrics[key].items() if k in COLUMNS}
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


def _boot(path: Path, row: str, keep: set[str], plans: set, need: bool) -> dict[str, np.ndarray]:
    """The resample values of ``row`` in a bootstrap file, for the columns ``keep``; {} when the source was
    written without a bootstrap (``need`` False)."""
    from imem import bootstrap

    if not path.is_file() and not need:
        return {}
    reps, n, seed = bootstrap.load(path)
    if row not in reps:
        raise ImemError(f"{path}: no bootstrap values for row {row!r} (re-run its stage)")
    plans.add((n, seed))
    return {c: v for c, v in reps[row].items() if c in keep}


def _with_uncertainty(row: dict, std: dict | None, ci: dict | None) -> dict:
    out = dict(row)
    for c in row:
        if std and c in std:
            out[f"{c}_std"] = std[c]
        if ci and c in ci.get("lo", {}) and c in ci.get("hi", {}):
            out[f"{c}_lo"], out[f"{c}_hi"] = ci["lo"][c], ci["hi"][c]
    return out


def collect(variants: list[str], methods: list[str], evaluate_dir: str | Path, methods_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """(table, info): one row per variant / method row, then the mean-predictor and random-ranking rows.

    A model row holds, per metric column ``c``: ``c`` (mean over training seeds), ``c_std`` (their std, two or
    more seeds), ``c_lo`` / ``c_hi`` (95 % bootstrap interval of the mean). ``info["reps"]``: per row the
    resample values of every column (for :func:`paired_table`); ``info["level"]``: the interval level."""
    evaluate_dir, methods_dir = Path(evaluate_dir), Path(methods_dir)
    rows, mean_row, chance_row, reps = [], {}, {}, {}
    splits, thresholds, plans, levels = set(), set(), set(), set()
    mean_extra: dict = {}
    for v in variants:
        path = evaluate_dir / v / "metrics.json"
        m = _read(path)
        splits.add(m["split"])
        thresholds.add(float(m["relevance_threshold"]))
        seeds = m.get("seeds", {})
        row = variant_row(m, "best")
        if "mean" in seeds:
            row = {c: x for c, x in variant_row({**m, "best": seeds["mean"]}).items() if c in row}
        label = VARIANT_LABELS.get(v, v)
        rows.append({"row": label, "source": f"train@{v}", "seeds": int(seeds.get("n", 1)),
                     **_with_uncertainty(row, seeds.get("std"), m.get("ci"))})
        if "bootstrap" in m:
            levels.add(float(m["bootstrap"]["level"]))
        npz = evaluate_dir / v / "predictions" / "bootstrap.npz"
        reps[label] = _boot(npz, "model", set(row), plans, "bootstrap" in m)
        _merge_reference(mean_row, {k: x for k, x in m["mean_predictor"].items() if k in COLUMNS}, str(path))
        if "mean_predictor_ci" in m:  # each variant adds the mean predictor's columns of its sides
            new = [c for c in m["mean_predictor"] if c in COLUMNS and c not in mean_extra
                   and c in m["mean_predictor_ci"]["lo"]]
            for c in new:
                mean_extra[c] = (m["mean_predictor_ci"]["lo"][c], m["mean_predictor_ci"]["hi"][c])
            if new:
                reps.setdefault(MEAN_ROW, {}).update(_boot(npz, "mean_predictor", set(new), plans, True))
        if "random_ranking" in m:  # evaluate writes m2i_ndcg10 ...: the same chance for both scorers
            rr = {f"{k[:3]}_{s}_{k[4:]}": x for k, x in m["random_ranking"].items() for s in ("sim", "emb")}
            _merge_reference(chance_row, {k: x for k, x in rr.items() if k in COLUMNS}, str(path))
    for name in methods:
        path = methods_dir / name / "metrics.json"
        m = _read(path)
        splits.add(m["split"])
        thresholds.add(float(m["relevance_threshold"]))
        if "bootstrap" in m:
            levels.add(float(m["bootstrap"]["level"]))
        for label, r in m["rows"].items():
            if label == CHANCE_ROW:
                _merge_reference(chance_row, r, str(path))
                continue
            shown = label if label == m["label"] else f"{label} ({m['label']} baseline)"
            rows.append({"row": shown, "source": f"{'sp_net' if name == 'sp_net' else 'method@' + name}",
                         "seeds": int(m.get("seeds", {}).get("n", 1)),
                         **_with_uncertainty(r, m.get("rows_std", {}).get(label), m.get("rows_ci", {}).get(label))})
            reps[shown] = _boot(methods_dir / name / "bootstrap.npz", label, set(r), plans, "bootstrap" in m)
    if len(splits) > 1 or len(thresholds) > 1:
        raise ImemError(f"the reports were scored on different splits {sorted(splits)} or relevance thresholds "
                        f"{sorted(thresholds)}: re-run dvc repro")
    if len(plans) > 1 or len(levels) > 1:
        raise ImemError(f"the reports were bootstrapped with different settings (resamples, seed) {sorted(plans)} or "
                        f"levels {sorted(levels)}: re-run dvc repro")
    if mean_row:
        ci = {"lo": {c: lo for c, (lo, _) in mean_extra.items()}, "hi": {c: hi for c, (_, hi) in mean_extra.items()}}
        rows.append({"row": MEAN_ROW, "source": "training-set means", **_with_uncertainty(mean_row, None, ci)})
    if chance_row:
        rows.append({"row": CHANCE_ROW, "source": "exact expectation", **chance_row})
    df = pd.DataFrame(rows)
    cols = ["row", "source"] + (["seeds"] if "seeds" in df.columns else [])
    for c in COLUMNS:
        if c in df.columns:
            cols += [c] + [f"{c}_{x}" for x in ("std", "lo", "hi") if f"{c}_{x}" in df.columns]
    info = {"split": splits.pop() if splits else "test", "relevance_threshold": thresholds.pop() if thresholds else None,
            "reps": reps, "level": levels.pop() if levels else 0.95,
            "resamples": plans.pop()[0] if plans else 0}
    return df[cols], info


# --- paired comparisons ------------------------------------------------------------------------------------

def _side(c: str, lo: float, hi: float) -> str:
    """Where the interval of a difference (row - other) lies for column ``c``: "better" when it excludes 0 on
    the good side (below for errors and ranks, above otherwise), "worse" on the other side, else "not
    significant"."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not significant"
    if hi < 0:
        return "better" if c in LOWER_IS_BETTER else "worse"
    if lo > 0:
        return "worse" if c in LOWER_IS_BETTER else "better"
    return "not significant"


def winners(df: pd.DataFrame, info: dict, cols: list[str]) -> dict[str, dict]:
    """Per column: the best model row, the runner-up, their paired difference (best - runner-up) with its
    interval, and ``significant``: the interval excludes 0 (only then is the best value bold)."""
    from imem import bootstrap

    out = {}
    models = df[~df["row"].isin([MEAN_ROW, CHANCE_ROW])]
    for c in cols:
        if c not in models.columns:
            continue
        vals = models[["row", c]].dropna()
        if len(vals) == 0:
            continue
        order = sorted(vals.itertuples(index=False), key=lambda t: t[1], reverse=c not in LOWER_IS_BETTER)
        best = order[0]
        w = {"column": c, "best": best[0], "value": float(best[1]), "runner_up": None, "diff": math.nan,
             "lo": math.nan, "hi": math.nan, "significant": False}  # a lone candidate beats nobody
        if len(order) > 1:
            second = order[1]
            w["runner_up"] = second[0]
            ra, rb = info["reps"].get(best[0], {}).get(c), info["reps"].get(second[0], {}).get(c)
            if ra is not None and rb is not None:
                d, lo, hi = bootstrap.paired(ra, rb, info["level"])
                w.update(diff=float(best[1]) - float(second[1]), lo=lo, hi=hi,
                         significant=_side(c, lo, hi) == "better")
        out[c] = w
    return out


def paired_table(df: pd.DataFrame, info: dict, reference: str) -> pd.DataFrame:
    """Every model row (and the mean predictor) against ``reference``: per column the difference of the
    values (row - reference), its paired bootstrap interval and the verdict of :func:`_side` (better /
    worse only where the interval excludes 0, read on the interval, not on the point difference)."""
    from imem import bootstrap

    out = []
    ref = info["reps"].get(reference, {})
    base = df.set_index("row")
    for label in df["row"]:
        if label in (reference, CHANCE_ROW):
            continue
        for c, rb in ref.items():
            ra = info["reps"].get(label, {}).get(c)
            if ra is None or pd.isna(base.loc[label, c]) or pd.isna(base.loc[reference, c]):
                continue
            _, lo, hi = bootstrap.paired(ra, rb, info["level"])
            diff = float(base.loc[label, c]) - float(base.loc[reference, c])
            out.append({"row": label, "reference": reference, "column": c, "diff": round(diff, 6),
                        "lo": round(lo, 6), "hi": round(hi, 6), "verdict": _side(c, lo, hi)})
    return pd.DataFrame(out, columns=["row", "reference", "column", "diff", "lo", "hi", "verdict"])


# --- markdown ----------------------------------------------------------------------------------------------

def _num(c: str, x: float) -> str:
    return f"{x:.1f}" if c.endswith("_rank") else f"{x:.4f}"


def _cell(df_row: pd.Series, c: str, bold: bool) -> str:
    x = df_row.get(c)
    if x is None or pd.isna(x):
        return ""
    s = _num(c, float(x))
    s = f"**{s}**" if bold else s
    std, lo, hi = df_row.get(f"{c}_std"), df_row.get(f"{c}_lo"), df_row.get(f"{c}_hi")
    if std is not None and not pd.isna(std):
        s += f" ±{_num(c, float(std))}"
    if lo is not None and not pd.isna(lo) and hi is not None and not pd.isna(hi):
        s += f" [{_num(c, float(lo))}, {_num(c, float(hi))}]"
    return s


def _fmt_group(df: pd.DataFrame, cols: list[str], wins: dict, rename: dict | None = None) -> str:
    """Markdown for one metric group: rows with a value in it; a column's best model value in bold when
    its paired difference to the runner-up excludes 0."""
    sub = df[df[cols].notna().any(axis=1)].reset_index(drop=True)
    table = {"row": list(sub["row"])}
    for c in cols:
        w = wins.get(c)
        table[(rename or {}).get(c, c)] = [_cell(r, c, bool(w and w["significant"] and w["best"] == r["row"]))
                                           for _, r in sub.iterrows()]
    return pd.DataFrame(table).to_markdown(index=False, disable_numparse=True)


SUBGROUPS = {
    "regression": [("similarity", ("sim_",)), ("image valence-arousal", ("image_",)),
                   ("music valence-arousal", ("music_",))],
}


def markdown(df: pd.DataFrame, info: dict, title: str, reference: str | None = None) -> str:
    reps_n = info.get("resamples", 0)
    level = int(round(100 * info.get("level", 0.95)))
    parts = [f"# {title}\n",
             f"Measured on the **{CORPUS_LABEL}**, {info['split']} split, by `dvc repro` (docs/comparison.md). "
             "These numbers compare the methods on the same generated data; they are **not** a reproduction of "
             "any paper's table. Blank: the metric does not apply to that row.\n",
             f"Each model cell is `mean ±std [lo, hi]`: the mean over the row's training seeds (column `seeds` of "
             f"comparison.csv), their standard deviation, and the {level} % bootstrap interval of that mean "
             f"({reps_n} resamples of the test songs, a song's clips together, and images). Bold: the best model "
             "value of the column, **only** where its paired difference to the runner-up (same resamples) has an "
             f"interval that excludes 0; `best.csv` holds every such test. The mean predictor and the random "
             "ranking are references, not candidates; the random ranking is an exact expectation.\n"]
    all_cols = [c for c in COLUMNS if c in df.columns and df[c].notna().any()]
    wins = winners(df, info, all_cols)
    for group, cols in COLUMN_GROUPS.items():
        present = [c for c in cols if c in all_cols]
        if not present:
            continue
        head = GROUP_TITLES[group].format(thr=info.get("relevance_threshold"))
        if group == "matching":
            for scorer, what in (("sim", "ranked by the predicted matching score"),
                                 ("emb", "ranked by proximity in the shared space (CDCML and the thesis: "
                                         "squared distance of f_I and f_M; Emo-CLIM: cosine; MMVA: distance of "
                                         "the predicted VA)")):
                for d, dname in (("m2i", "music -> image"), ("i2m", "image -> music")):
                    sc = [c for c in present if c.startswith(f"{d}_{scorer}_")]
                    if sc:
                        parts.append(f"## {head}, {dname}, {what}\n\n"
                                     f"{_fmt_group(df, sc, wins, {c: c.replace(f'_{scorer}_', '_') for c in sc})}\n")
            continue
        if group in SUBGROUPS:
            for name, prefixes in SUBGROUPS[group]:
                sc = [c for c in present if c.startswith(prefixes)]
                if sc:
                    parts.append(f"## {head}: {name}\n\n{_fmt_group(df, sc, wins)}\n")
            continue
        parts.append(f"## {head}\n\n{_fmt_group(df, present, wins)}\n")
    abl = [VARIANT_LABELS[v] for v in ABLATION]
    if set(abl[:-1]) & set(df["row"]):
        cols = [c for c in ("sim_mse", "image_valence_mse", "image_arousal_mse", "music_valence_mse",
                            "music_arousal_mse", "m2i_sim_mrr", "m2i_emb_mrr") if c in df.columns]
        sub = df[df["row"].isin(abl)].set_index("row").reindex([a for a in abl if a in set(df["row"])]).reset_index()
        parts.append("## CDCML ablation (table 4 layout; the last row uses all seven losses)\n\n"
                     + _fmt_group(sub, cols, winners(sub, info, cols)) + "\n")
    if reference is not None and reference in set(df["row"]):
        pt = paired_table(df, info, reference)
        heads = [c for c in HEADLINE if c in set(pt["column"])]
        if len(pt) and heads:
            table = {"row": []} | {c: [] for c in heads}
            for label in dict.fromkeys(pt["row"]):
                sub = pt[pt["row"] == label].set_index("column")
                table["row"].append(label)
                for c in heads:
                    if c in sub.index:
                        r = sub.loc[c]
                        mark = {"better": " (better)", "worse": " (worse)"}.get(r["verdict"], "")
                        table[c].append(f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{mark}")
                    else:
                        table[c].append("")
            parts.append(f"## Paired differences against {reference}\n\nRow minus reference on the same "
                         f"resamples, with the {level} % interval; \"better\"/\"worse\" only where the interval "
                         "excludes 0 (lower is better for errors and ranks). Every column: `paired.csv`.\n\n"
                         + pd.DataFrame(table).to_markdown(index=False, disable_numparse=True) + "\n")
    return "\n".join(parts)


# the columns of the paired-difference table in the markdown (paired.csv has them all)
HEADLINE = ("sim_mse", "image_valence_mse", "image_arousal_mse", "music_valence_mse", "music_arousal_mse",
            "m2i_sim_r10", "m2i_sim_mrr", "i2m_sim_mrr", "m2i_emb_mrr", "i2m_emb_mrr")
REFERENCE_VARIANT = "cnn"


def write_comparison(variants: list[str], methods: list[str], evaluate_dir: str | Path, methods_dir: str | Path,
                     out_dir: str | Path, title: str = "Comparison of methods", track: bool = True) -> pd.DataFrame:
    df, info = collect(variants, methods, evaluate_dir, methods_dir)
    reference = VARIANT_LABELS[REFERENCE_VARIANT] if REFERENCE_VARIANT in variants else None
    pairs = paired_table(df, info, reference) if reference else paired_table(df.iloc[:0], info, "")
    best = pd.DataFrame(list(winners(df, info, [c for c in COLUMNS if c in df.columns]).values()))
    text = markdown(df, info, title, reference)
    out_dir = Path(out_dir)
    from imem.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        write_csv(tmp / "comparison.csv", df)
        write_csv(tmp / "paired.csv", pairs)
        write_csv(tmp / "best.csv", best)
        write_text(tmp / "comparison.md", text)
    if track:
        import mlflow

        from imem.tracking import mlflow_run

        with mlflow_run("imem-compare", out_dir.name, {"variants": variants, "methods": methods,
                                                        "split": info["split"], "corpus": CORPUS_LABEL,
                                                        "bootstrap_resamples": info["resamples"],
                                                        "level": info["level"]}):
            mlflow.log_table(df, artifact_file="comparison.json")
            mlflow.log_table(pairs, artifact_file="paired.json")
            mlflow.log_table(best, artifact_file="best.json")
            for f in ("comparison.csv", "comparison.md", "paired.csv", "best.csv"):
                mlflow.log_artifact(str(out_dir / f))
    return df
