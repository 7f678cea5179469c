"""The `visualize` stage: Matplotlib figures of one variant, from what `train` and `evaluate` wrote.

- ``losses.png``: train and val curves of every loss and of the total, per epoch;
- ``va_image.png`` / ``va_music.png``: predicted against true VA (thesis figs. 5.1-5.2);
- ``embedding_pca.png``: the shared space of the test items in 2-D by PCA, untrained ("zero-shot")
  beside trained, the highest- and lowest-S pairs drawn as lines (thesis figs. 5.3-5.4);
- ``retrieval_sheet.png``: a few test clips, each with the top images by predicted similarity.

Every figure carries the variant, the split and the corpus label. Files are written atomically with
fixed metadata, so the same inputs give the same bytes (DVC hashes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from imem.errors import ImemError  # noqa: E402
from imem.io import atomic_path  # noqa: E402

LOSS_TITLES = {"cfr": "CFR (cross-modal feature relation)", "cfm": "CFM (cross-modal matching margin)",
               "sfr_image": "SFR image (single-modal relation)", "sfr_music": "SFR music (single-modal relation)",
               "sim": "similarity MSE", "va_image": "image VA MSE", "va_music": "music VA MSE",
               "total": "total (weighted sum)"}
TRAIN_C, VAL_C = "#1f77b4", "#d62728"
HIGH_C, LOW_C = "#2ca02c", "#d62728"


def _save(fig: plt.Figure, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path


def _read_csv(path: Path, **kw) -> pd.DataFrame:
    if not path.is_file():
        raise ImemError(f"{path}: missing (run the train and evaluate stages first)")
    return pd.read_csv(path, **kw)


def loss_curves(history: pd.DataFrame, variant: str, corpus: str) -> plt.Figure:
    """One panel per loss (and the total): train and val per epoch."""
    names = [c.split("/", 1)[1] for c in history.columns if c.startswith("train/")]
    if not names:
        raise ImemError(f"history of {variant}: no train/<loss> columns")
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.9 * nrow + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(history["epoch"], history[f"train/{name}"], color=TRAIN_C, marker=".", label="train")
        if f"val/{name}" in history:
            ax.plot(history["epoch"], history[f"val/{name}"], color=VAL_C, marker=".", label="val")
        ax.set_title(LOSS_TITLES.get(name, name), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{variant}: training and validation losses per epoch ({corpus})", fontsize=11)
    fig.tight_layout()
    return fig


def va_distribution(df: pd.DataFrame, side: str, variant: str, corpus: str, split: str) -> plt.Figure:
    """True against predicted (best checkpoint) VA of the split's items of one modality."""
    what = {"image": "images", "music": "music clips"}[side]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.4))
    ax = axes[0, 0]
    ax.scatter(df["valence"], df["arousal"], s=14, color="0.55", alpha=0.7, label="true")
    ax.scatter(df["valence_best"], df["arousal_best"], s=14, color=TRAIN_C, alpha=0.7, label="predicted")
    ax.set(xlabel="valence", ylabel="arousal", title=f"VA plane ({len(df)} {what})", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for dim, color in (("valence", "#9467bd"), ("arousal", "#ff7f0e")):
        r = np.corrcoef(df[dim], df[f"{dim}_best"])[0, 1]
        ax.scatter(df[dim], df[f"{dim}_best"], s=12, alpha=0.6, color=color, label=f"{dim} (Pearson r = {r:.2f})")
    ax.plot([0, 1], [0, 1], color="k", lw=1, ls="--", label="predicted = true")
    ax.set(xlabel="true", ylabel="predicted", title="predicted against true", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    bins = np.linspace(0, 1, 21)
    for ax, dim in zip(axes[1], ("valence", "arousal"), strict=True):
        ax.hist(df[dim], bins=bins, alpha=0.55, color="0.45", label="true")
        ax.hist(df[f"{dim}_best"], bins=bins, alpha=0.55, color=TRAIN_C, label="predicted")
        ax.axvline(df[f"{dim}_mean_predictor"].iloc[0], color="k", ls=":", lw=1.2, label="training mean")
        ax.set(xlabel=dim, ylabel=f"number of {what}", title=f"{dim} distribution")
        ax.legend(fontsize=8)
    fig.suptitle(f"{variant}: predicted vs true VA of the {split} {what} (best checkpoint; {corpus})", fontsize=11)
    fig.tight_layout()
    return fig


def _pca_panel(ax, emb_i: np.ndarray, emb_m: np.ndarray, va_i: np.ndarray, va_m: np.ndarray,
               high: list, low: list, title: str):
    z = PCA(n_components=2, random_state=0).fit(np.vstack([emb_i, emb_m]))
    zi, zm = z.transform(emb_i), z.transform(emb_m)
    for pairs, color in ((low, LOW_C), (high, HIGH_C)):
        for c, i in pairs:
            ax.plot([zm[c, 0], zi[i, 0]], [zm[c, 1], zi[i, 1]], color=color, lw=0.8, alpha=0.55, zorder=1)
    ax.scatter(zi[:, 0], zi[:, 1], c=va_i[:, 0], cmap="coolwarm", vmin=0, vmax=1, marker="o", s=22,
               edgecolors="k", linewidths=0.3, zorder=2)
    sc = ax.scatter(zm[:, 0], zm[:, 1], c=va_m[:, 0], cmap="coolwarm", vmin=0, vmax=1, marker="^", s=18,
                    edgecolors="k", linewidths=0.3, zorder=2)
    ev = z.explained_variance_ratio_
    ax.set(title=title, xlabel=f"PC1 ({ev[0]:.0%} of variance)", ylabel=f"PC2 ({ev[1]:.0%})")
    return sc


def _pair_distance_ratio(emb_i, emb_m, high, low) -> float:
    """Mean squared distance of the low-S pairs over that of the high-S pairs, in the full space."""
    d = lambda pairs: np.mean([np.sum((emb_m[c] - emb_i[i]) ** 2) for c, i in pairs])  # noqa: E731
    return float(d(low) / d(high))


def embedding_pca(pred_dir: Path, variant: str, corpus: str, split: str, n_pairs: int) -> plt.Figure:
    truth = np.load(pred_dir / "truth.npy")
    va_i = _read_csv(pred_dir / "image_va.csv")[["valence", "arousal"]].to_numpy()
    va_m = _read_csv(pred_dir / "music_va.csv")[["valence", "arousal"]].to_numpy()
    order = np.argsort(truth, axis=None, kind="stable")
    n_pairs = min(n_pairs, truth.size // 2)
    low = [divmod(int(x), truth.shape[1]) for x in order[:n_pairs]]
    high = [divmod(int(x), truth.shape[1]) for x in order[::-1][:n_pairs]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, name, label in zip(axes, ("untrained", "best"), ("untrained (zero-shot)", "trained (best checkpoint)"),
                               strict=True):
        ei, em = np.load(pred_dir / f"image_embeddings_{name}.npy"), np.load(pred_dir / f"music_embeddings_{name}.npy")
        ratio = _pair_distance_ratio(ei, em, high, low)
        sc = _pca_panel(ax, ei, em, va_i, va_m, high, low,
                        f"{label}\nlow-S / high-S pair distance in the full space: {ratio:.2f}x")
    cb = fig.colorbar(sc, ax=axes, fraction=0.025, pad=0.02)
    cb.set_label("true valence of the item")
    handles = [Line2D([], [], marker="o", ls="", color="0.5", markeredgecolor="k", label="image"),
               Line2D([], [], marker="^", ls="", color="0.5", markeredgecolor="k", label="music clip"),
               Line2D([], [], color=HIGH_C, label=f"the {n_pairs} highest-S clip-image pairs"),
               Line2D([], [], color=LOW_C, label=f"the {n_pairs} lowest-S pairs")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"{variant}: the shared embedding space of the {split} items, PCA to 2-D ({corpus})", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.88, top=0.86, bottom=0.15, wspace=0.22)
    return fig


def pick_queries(music_va: pd.DataFrame, n: int) -> list[str]:
    """``n`` test clips spread over the VA plane: the clip nearest to each of n points on the diagonal
    from (low V, low A) to (high V, high A) and on the anti-diagonal, alternating; no repeats."""
    va = music_va[["valence", "arousal"]].to_numpy()
    lo, hi = va.min(axis=0), va.max(axis=0)
    targets = []
    for j, t in enumerate(np.linspace(0.1, 0.9, max(n, 1))):
        targets.append(lo + (hi - lo) * (np.array([t, t]) if j % 2 == 0 else np.array([t, 1 - t])))
    chosen: list[int] = []
    for tgt in targets[:n]:
        d = np.sum((va - tgt) ** 2, axis=1)
        d[chosen] = np.inf
        chosen.append(int(np.argmin(d)))
    return [str(music_va["id"].iloc[i]) for i in chosen]


SCORER_LABELS = {"sim": "predicted similarity", "emb": "embedding distance"}


def retrieval_sheet(pred_dir: Path, thumbs: dict[str, np.ndarray], variant: str, corpus: str, split: str,
                    n_queries: int, n_top: int, threshold: float, ranked_by: list[str]) -> plt.Figure:
    """Rows: test clips (one row per ranking); columns: their top images by the best checkpoint."""
    top = _read_csv(pred_dir / "top.csv", dtype={"query_id": str, "candidate_id": str})
    top = top[(top["direction"] == "music_to_image") & (top["rank"] <= n_top)]
    mva = _read_csv(pred_dir / "music_va.csv", dtype={"id": str})
    iva = _read_csv(pred_dir / "image_va.csv", dtype={"id": str}).set_index("id")
    queries = pick_queries(mva, n_queries)
    mva = mva.set_index("id")
    unknown = sorted(set(ranked_by) - set(SCORER_LABELS))
    if unknown or not ranked_by:
        raise ImemError(f"params: visualize.sheet_ranked_by {ranked_by!r}: use a non-empty list of: sim, emb")
    n_rows = len(queries) * len(ranked_by)
    fig, axes = plt.subplots(n_rows, n_top + 1, figsize=(2.3 * (n_top + 1), 3.15 * n_rows + 0.9), squeeze=False)
    r = 0
    for q in queries:
        m = mva.loc[q]
        for scorer in ranked_by:
            ax = axes[r, 0]
            ax.axis("off")
            ax.text(0.0, 0.5, f"query clip {q}\ntrue V {m['valence']:.2f} A {m['arousal']:.2f}\n"
                    f"pred V {m['valence_best']:.2f} A {m['arousal_best']:.2f}\n\nranked by\n{SCORER_LABELS[scorer]}",
                    fontsize=8.5, va="center", transform=ax.transAxes, family="monospace")
            rows = top[(top["query_id"] == q) & (top["ranked_by"] == scorer)].sort_values("rank")
            for c, (_, row) in enumerate(rows.iterrows(), start=1):
                ax = axes[r, c]
                ax.imshow(thumbs[row["candidate_id"]])
                ax.set_xticks([])
                ax.set_yticks([])
                good = row["true_s"] > threshold
                for sp in ax.spines.values():
                    sp.set_edgecolor(HIGH_C if good else "0.6")
                    sp.set_linewidth(3 if good else 1)
                im = iva.loc[row["candidate_id"]]
                score = f"pred S {row['score']:.2f}" if scorer == "sim" else f"dist {-row['score']:.1f}"
                ax.set_title(f"#{int(row['rank'])}  {score}\ntrue S {row['true_s']:.2f}", fontsize=8.5)
                ax.set_xlabel(f"{row['candidate_id'][:16]}\nV {im['valence']:.2f}  A {im['arousal']:.2f}", fontsize=8)
            for c in range(len(rows) + 1, n_top + 1):
                axes[r, c].axis("off")
            r += 1
    fig.suptitle(f"{variant}: top-{n_top} {split} images per query clip, best checkpoint\n"
                 f"green frame: true S > {threshold:g}; V/A under an image: its true VA ({corpus})", fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.99, top=1 - 1.2 / (3.15 * n_rows + 0.5), bottom=0.45 / (3.15 * n_rows + 0.5),
                        hspace=0.62, wspace=0.08)
    return fig


def visualize_variant(train_report_dir: str | Path, eval_dir: str | Path, features_dir: str | Path,
                      out_dir: str | Path, params: dict, track: bool = True) -> list[Path]:
    """Write the variant's figures to ``out_dir`` (replacing it); return their paths."""
    from imem.features.store import FeatureStore
    from imem.io import atomic_dir

    train_report_dir, eval_dir, out_dir = Path(train_report_dir), Path(eval_dir), Path(out_dir)
    mpath = eval_dir / "metrics.json"
    if not mpath.is_file():
        raise ImemError(f"{mpath}: missing (run the evaluate stage first)")
    metrics = json.loads(mpath.read_text())
    variant, split, corpus = metrics["variant"], metrics["split"], metrics["corpus"]
    pred_dir, dpi = eval_dir / "predictions", int(params["dpi"])
    names = []
    with atomic_dir(out_dir) as tmp:
        hist = _read_csv(train_report_dir / "history.csv")
        names.append(_save(loss_curves(hist, variant, corpus), tmp / "losses.png", dpi).name)
        for side in ("image", "music"):
            if (pred_dir / f"{side}_va.csv").is_file():
                df = _read_csv(pred_dir / f"{side}_va.csv", dtype={"id": str})
                names.append(_save(va_distribution(df, side, variant, corpus, split), tmp / f"va_{side}.png", dpi).name)
        if (pred_dir / "truth.npy").is_file():
            names.append(_save(embedding_pca(pred_dir, variant, corpus, split, int(params["pca_pairs"])),
                               tmp / "embedding_pca.png", dpi).name)
            store = FeatureStore(features_dir)
            ids = _read_csv(pred_dir / "image_va.csv", dtype={"id": str})["id"].tolist()
            imgs = store.array(f"images_{store.manifest['params']['image_size']}")[store.image_rows(ids)]
            thumbs = dict(zip(ids, imgs, strict=True))
            names.append(_save(retrieval_sheet(pred_dir, thumbs, variant, corpus, split, int(params["sheet_queries"]),
                                               int(params["sheet_top"]), float(metrics["relevance_threshold"]),
                                               list(params["sheet_ranked_by"])), tmp / "retrieval_sheet.png", dpi).name)
    paths = [out_dir / n for n in names]
    if track:
        _track(variant, metrics, paths)
    return paths


def _track(variant: str, metrics: dict, paths: list[Path]) -> None:
    import mlflow

    from imem.tracking import variant_run

    sha = metrics.get("best_sha256", "")
    with variant_run(variant, sha, {"variant": variant, "corpus": metrics["corpus"]}):
        for p in paths:
            mlflow.log_artifact(str(p), artifact_path="figures")
