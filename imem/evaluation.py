"""The `evaluate` stage: a trained variant's test-split tables, retrieval metrics and per-item predictions.

For each checkpoint (``best`` = lowest val total loss, ``last`` = final epoch) plus two references --
the *mean predictor* (training-set means: what "learned" has to beat) and the *untrained* model (the
seeded initial weights: the "zero-shot" embedding space) -- it computes

- regression (thesis tables 5.1-5.5, CDCML table 3): similarity MSE/MAE on the split's pairs, and image
  and music valence/arousal MSE/MAE on the split's items;
- retrieval (matching variants): every test clip ranks every test image and every image ranks every clip,
  once by the predicted similarity and once by (negative squared) distance in the shared embedding space,
  scored against the ground-truth S with :mod:`imem.metrics`; a *random ranking* row gives the exact
  chance level.

Outputs (all written atomically): ``metrics.json`` (for ``dvc metrics``), ``regression.{csv,md}``,
``retrieval.{csv,md}`` and, under ``predictions/``, per-item and per-pair predictions, the top-k lists of
every query and the test embeddings (``.npy``) that the `visualize` stage draws.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from imem.checkpoints import read_checkpoint
from imem.data.pairs import similarity_matrix
from imem.errors import ImemError
from imem.io import atomic_dir, file_sha256, write_csv, write_json, write_text
from imem.metrics import random_ranking, regression
from imem.models.decoders import all_combinations, first_linear_blocks
from imem.models.matching import MatchingModel
from imem.training import Trainer

CORPUS_LABEL = "embedded (generated) corpus"
CHECKPOINTS = ("best", "last")
DIRECTIONS = {"music_to_image": "m2i", "image_to_music": "i2m"}
SCORERS = {"sim": "predicted similarity", "emb": "embedding distance"}
VA = ("valence", "arousal")


def load_checkpoints(model_dir: Path) -> dict[str, dict]:
    """``{"best": {...}, "last": {...}}`` with keys model, config, epoch; a missing file is one error line."""
    out = {}
    for name in CHECKPOINTS:
        path = model_dir / f"{name}.pt"
        if not path.is_file():
            raise ImemError(f"{path}: no checkpoint (run the train stage for this variant)")
        ck = read_checkpoint(path, ("model", "config", "epoch"), complete=True)
        out[name] = {"model": ck["model"], "config": ck["config"], "epoch": int(ck["epoch"]), "sha256": file_sha256(path)}
    return out


def load_seed_checkpoints(model_dir: Path, cfg: dict) -> dict[int, dict]:
    """The best checkpoints of the variant's extra training seeds (``n_seeds`` of the first seed's config),
    ``models/<variant>/seeds/<train_seed>/best.pt``, by seed; stale seed directories are not read."""
    from imem.training import seed_runs

    out = {}
    for c in seed_runs(cfg)[1:]:
        ts = int(c["train_seed"])
        path = model_dir / "seeds" / str(ts) / "best.pt"
        if not path.is_file():
            raise ImemError(f"{path}: no checkpoint for training seed {ts} (re-run the train stage)")
        ck = read_checkpoint(path, ("model", "config", "epoch"), complete=True)
        out[ts] = {"model": ck["model"], "epoch": int(ck["epoch"])}
    return out


class Evaluator:
    """Predictions of one variant on one split, for any weights loaded into its model."""

    def __init__(self, cfg: dict, prepare_dir: str | Path, features_dir: str | Path, split: str, sigma: float,
                 batch_size: int = 4096, progress: bool = True, cache_memo: object | None = None):
        self.trainer = Trainer(cfg, prepare_dir, features_dir, progress=progress)
        if split not in self.trainer.data:
            raise ImemError(f"params: evaluate.split {split!r} is not one of: {', '.join(self.trainer.data)}")
        self.cfg, self.split, self.sigma, self.batch_size = cfg, split, float(sigma), int(batch_size)
        self.kind, self.sides = self.trainer.kind, self.trainer.sides
        self.d, self.train = self.trainer.data[split], self.trainer.data["train"]
        self.init_state = copy.deepcopy(self.trainer.model.state_dict())  # the seeded weights training started from
        tables = Path(prepare_dir) / split
        self.song_of_clip = pd.read_csv(tables / "clips.csv", dtype={"clip_id": str, "song_id": str})["song_id"].to_numpy()
        self.image_ids = pd.read_csv(tables / "images.csv", dtype={"image_id": str})["image_id"].to_numpy()
        # positions of every pair's clip and image in the item tables (load_split keeps the tables' order)
        pos_c = {int(r): i for i, r in enumerate(self.d.items_music[0].tolist())}
        pos_i = {int(r): i for i, r in enumerate(self.d.items_image[0].tolist())}
        self.pair_clip = np.array([pos_c[int(r)] for r in self.d.music_rows.tolist()], dtype=np.int64)
        self.pair_image = np.array([pos_i[int(r)] for r in self.d.image_rows.tolist()], dtype=np.int64)
        if self.trainer.fc_only:  # frozen backbones: identical in every checkpoint, so one cache serves all
            # with the train stage's memo: the very entry it wrote (every split's rows, same key), read from disk
            # instead of running the backbone over the split again (ResNet50 over 1,800 test images: ~3 min)
            if cache_memo is not None:
                self.trainer.build_cache(memo=cache_memo)
            else:
                self.trainer.build_cache((split,))
        if self.kind == "matching":
            self.truth = similarity_matrix(self.d.items_music[1].numpy(), self.d.items_image[1].numpy(), self.sigma)

    def load(self, state: dict) -> None:
        self.trainer.model.load_state_dict(state)

    @torch.no_grad()
    def predict(self) -> dict[str, np.ndarray]:
        """Item VA and embeddings per side; for matching models also the pairs' similarity and the full
        clips x images similarity matrix."""
        t, out = self.trainer, {}
        for side in self.sides:
            rows = getattr(self.d, f"items_{side}")[0]
            out[f"{side}_va"] = t.predict_va(side, rows).numpy()
            out[f"{side}_emb"] = t.embed(side, rows).numpy()
        if self.kind == "matching":
            out["pair_sim"] = t.predict_sim(self.d).numpy()
            out["sim_matrix"] = self._sim_matrix(torch.from_numpy(out["music_emb"]), torch.from_numpy(out["image_emb"]))
        return out

    def _sim_matrix(self, f_music: torch.Tensor, f_image: torch.Tensor) -> np.ndarray:
        """The similarity decoder on [f_I, f_M] for every clip-image combination, its first Linear split per
        modality (:func:`imem.models.decoders.all_combinations`: the image part once per image, the music part
        once per clip)."""
        model: MatchingModel = self.trainer.model
        model.eval()
        dev = self.trainer.device
        (part_image, part_music), rest = first_linear_blocks(model.sim, f_image.to(dev), f_music.to(dev))
        part_music = part_music + model.sim[0].bias
        return all_combinations(rest, part_music.float(), part_image.float(), self.batch_size)

    def targets(self) -> dict[str, np.ndarray]:
        out = {f"{side}_va": getattr(self.d, f"items_{side}")[1].numpy() for side in self.sides}
        if self.kind == "matching":
            out["pair_sim"] = self.d.score.numpy()
        return out

    def mean_predictor(self) -> dict[str, np.ndarray]:
        """Training-set means broadcast to the split: pair S for similarity, item VA per side."""
        out = {}
        for side in self.sides:
            va_tr = getattr(self.train, f"items_{side}")[1].numpy()
            out[f"{side}_va"] = np.broadcast_to(va_tr.mean(axis=0), getattr(self.d, f"items_{side}")[1].shape)
        if self.kind == "matching":
            out["pair_sim"] = np.full(len(self.d), float(self.train.score.numpy().mean()))
        return out


def regression_row(pred: dict[str, np.ndarray], true: dict[str, np.ndarray]) -> dict[str, float]:
    """``sim_mse``, ``sim_mae``, ``image_valence_mse`` ... for what the prediction holds."""
    row = {}
    if "pair_sim" in pred:
        row.update({f"sim_{k}": v for k, v in regression(pred["pair_sim"], true["pair_sim"]).items()})
    for side in ("image", "music"):
        if f"{side}_va" in pred:
            for j, dim in enumerate(VA):
                row.update({f"{side}_{dim}_{k}": v
                            for k, v in regression(pred[f"{side}_va"][:, j], true[f"{side}_va"][:, j]).items()})
    return row


def _scores(pred: dict[str, np.ndarray], scorer: str, direction: str) -> np.ndarray:
    """Queries x candidates, higher = better; music_to_image queries are clips (rows of the matrices)."""
    if scorer == "sim":
        s = pred["sim_matrix"]
    else:  # negative squared Euclidean distance in the shared space (CDCML's D)
        fm, fi = torch.from_numpy(pred["music_emb"]).double(), torch.from_numpy(pred["image_emb"]).double()
        s = -(torch.cdist(fm, fi) ** 2).numpy()
    return s if direction == "music_to_image" else s.T


def retrieval_rows(pred: dict[str, np.ndarray], truth: np.ndarray, threshold: float, k: int,
                   rankings: dict[str, dict] | None = None) -> dict[str, float]:
    """``m2i_sim_ndcg10``, ``i2m_emb_mrr`` ...: both directions, both scorers (from ``rankings``, the
    prediction's :func:`query_rankings`, when the caller has them: ranking 1,513 x 1,800 scores is the
    costly part, and the bootstrap needs the same per-query values)."""
    rankings = rankings if rankings is not None else query_rankings(pred, truth, threshold, k)
    row = {}
    for short in DIRECTIONS.values():
        for scorer in SCORERS:
            m = rankings[scorer][short].summary()
            row.update({f"{short}_{scorer}_{name}": v for name, v in m.items() if not name.startswith("queries")})
    return row


def resampled_row(pred: dict[str, np.ndarray], true: dict[str, np.ndarray], ev: Evaluator, ci: np.ndarray,
                  ii: np.ndarray, threshold: float, k: int, rankings: dict[str, dict] | None) -> dict[str, float]:
    """The columns of :func:`regression_row` and :func:`retrieval_rows` on one bootstrap resample: clips
    ``ci`` and images ``ii`` (indices into the split's tables, repeated when drawn several times). A pair
    counts as often as its clip times its image. Rankings resample the queries only (clips for
    music->image, images for image->music) over the split's whole candidate pool: duplicated candidates would
    fill the top k and bias R@k and MRR low (measured: CDCML's music->image R@10, resample mean 0.69 against
    0.80 on the split). So a query's metrics do not depend on the draw: ``rankings`` holds them per query
    (:func:`query_rankings`) and a resample weights each by how often it was drawn."""
    row = {}
    if "pair_sim" in pred:
        w = np.bincount(ci, minlength=len(ev.song_of_clip))[ev.pair_clip] * \
            np.bincount(ii, minlength=len(ev.image_ids))[ev.pair_image]
        if w.sum() > 0:
            row.update({f"sim_{m}": v for m, v in regression(pred["pair_sim"], true["pair_sim"], w).items()})
    for side, idx in (("image", ii), ("music", ci)):
        if f"{side}_va" in pred:
            p, t = np.asarray(pred[f"{side}_va"])[idx], true[f"{side}_va"][idx]
            for j, dim in enumerate(VA):
                row.update({f"{side}_{dim}_{m}": v for m, v in regression(p[:, j], t[:, j]).items()})
    if rankings is not None:
        w = {"m2i": np.bincount(ci, minlength=len(ev.song_of_clip)), "i2m": np.bincount(ii, minlength=len(ev.image_ids))}
        for scorer, per in rankings.items():
            for short, pq in per.items():
                row.update({f"{short}_{scorer}_{name}": v for name, v in pq.summary(w[short]).items()
                            if not name.startswith("queries")})
    return row


def query_rankings(pred: dict[str, np.ndarray], truth: np.ndarray, threshold: float, k: int) -> dict[str, dict]:
    """Per-query ranking metrics (:class:`imem.metrics.PerQuery`) of both scorers and directions over the
    split's whole candidate pool: ``{scorer: {"m2i": .., "i2m": ..}}``."""
    from imem.metrics import PerQuery

    return {sc: {short: PerQuery.of(_scores(pred, sc, d), truth if d == "music_to_image" else truth.T, threshold, k)
                 for d, short in DIRECTIONS.items()} for sc in SCORERS}


def bootstrap_rows(ev: Evaluator, preds: dict[str, dict], true: dict[str, np.ndarray], models: list[str],
                   threshold: float, k: int, settings: dict, progress: bool = True,
                   rankings: dict[str, dict] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Resample values (:mod:`imem.bootstrap`) of ``model`` -- the mean over the training seeds ``models``
    (prediction names) -- and of the mean predictor, on the plan of ``evaluate.bootstrap``. ``rankings``:
    the predictions' :func:`query_rankings` where already computed."""
    from imem import bootstrap

    plan = bootstrap.make_plan(ev.song_of_clip, ev.image_ids, settings["n"], settings["seed"])
    matching, rankings = ev.kind == "matching", rankings or {}
    ranks = {name: (rankings.get(name) or query_rankings(preds[name], ev.truth, threshold, k) if matching else None)
             for name in models}

    def score(ci: np.ndarray, ii: np.ndarray) -> dict[str, dict[str, float]]:
        out = {name: resampled_row(preds[name], true, ev, ci, ii, threshold, k, ranks[name]) for name in models}
        out["mean_predictor"] = resampled_row(preds["mean_predictor"], true, ev, ci, ii, threshold, k, None)
        return out

    reps = bootstrap.replicate(score, plan, desc=f"bootstrap {ev.cfg['variant']}", progress=progress)
    return {"model": bootstrap.mean_over([reps[name] for name in models]), "mean_predictor": reps["mean_predictor"]}, plan


def random_rows(truth: np.ndarray, threshold: float, k: int) -> dict[str, float]:
    row = {}
    for direction, short in DIRECTIONS.items():
        m = random_ranking(truth if direction == "music_to_image" else truth.T, threshold, k_ndcg=k)
        row.update({f"{short}_{name}": v for name, v in m.items()})
    return row


def _round(d: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in d.items()}


def markdown_table(df: pd.DataFrame, title: str, note: str = "") -> str:
    """A Markdown table (tabulate via pandas); blank where a metric does not apply."""
    body = df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="")
    return f"# {title}\n\n{note}\n\n{body}\n" if note else f"# {title}\n\n{body}\n"


def evaluate_variant(model_dir: str | Path, prepare_dir: str | Path, features_dir: str | Path, stats_path: str | Path,
                     out_dir: str | Path, params: dict, track: bool = True, progress: bool = True,
                     cache_memo: object | None = None) -> dict:
    """Evaluate ``models/<variant>`` on ``params['split']``; write the outputs to ``out_dir``; return metrics.
    ``cache_memo``: the frozen-backbone memo the train stage used (:meth:`imem.training.Trainer.build_cache`)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cks = load_checkpoints(model_dir)
    cfg = dict(cks["best"]["config"], device=params["device"])
    variant = cfg["variant"]
    try:
        sigma = float(json.loads(Path(stats_path).read_text())["sigma"])
    except (OSError, KeyError, ValueError) as exc:
        raise ImemError(f"{stats_path}: no sigma (run the prepare stage): {exc}") from exc
    ev = Evaluator(cfg, prepare_dir, features_dir, params["split"], sigma, params["batch_size"], progress, cache_memo)
    split, thr, k = params["split"], float(params["relevance_threshold"]), int(params["ndcg_k"])
    true = ev.targets()
    seeds = load_seed_checkpoints(model_dir, cks["best"]["config"])
    states = {"best": cks["best"]["model"], "last": cks["last"]["model"], "untrained": ev.init_state,
              **{f"seed_{ts}": ck["model"] for ts, ck in seeds.items()}}
    preds = {}
    for name, state in tqdm(states.items(), desc=f"evaluate {variant}", unit="checkpoint", disable=not progress):
        ev.load(state)
        with ev.trainer.threads():
            preds[name] = ev.predict()
    preds["mean_predictor"] = ev.mean_predictor()

    metrics: dict = {"variant": variant, "split": split, "corpus": CORPUS_LABEL, "sigma": sigma,
                     "relevance_threshold": thr, "best_epoch": cks["best"]["epoch"], "last_epoch": cks["last"]["epoch"],
                     "best_sha256": cks["best"]["sha256"],
                     # a loss weighted 0 leaves its decoder untrained: the comparison blanks its metrics
                     "loss_weights": {k: float(v) for k, v in cfg["loss_weights"].items()}}
    reg_rows, ret_rows = [], []
    # per-query rankings of every checkpoint, computed once: the rows below and the bootstrap read them
    ranks = ({name: query_rankings(preds[name], ev.truth, thr, k) for name in states}
             if ev.kind == "matching" else {})
    for name in ("best", "last", "untrained", "mean_predictor"):
        row = regression_row(preds[name], true)
        if ev.kind == "matching" and name != "mean_predictor":
            row.update(retrieval_rows(preds[name], ev.truth, thr, k, ranks[name]))
        metrics[name] = _round(row)
        reg_rows.append({"model": name, **{c: v for c, v in row.items() if c.endswith(("_mse", "_mae"))}})
    if ev.kind == "matching":
        metrics["random_ranking"] = _round(random_rows(ev.truth, thr, k))
        ret_rows = _retrieval_table(metrics, k)
    # every training seed (issue 14): the mean and std over seeds, and the 95 % bootstrap interval of that mean
    seed_names = ["best"] + [f"seed_{ts}" for ts in seeds]
    seed_rows = [metrics["best"]] + [
        {**regression_row(preds[n], true), **(retrieval_rows(preds[n], ev.truth, thr, k, ranks[n]) if ev.kind == "matching" else {})}
        for n in seed_names[1:]]
    metrics["seeds"] = seed_summary(seed_rows, [int(cfg.get("train_seed", cfg["seed"]))] + list(seeds),
                                    [cks["best"]["epoch"]] + [ck["epoch"] for ck in seeds.values()])
    from imem import bootstrap

    bs = params["bootstrap"]
    reps, plan = bootstrap_rows(ev, preds, true, seed_names, thr, k, bs, progress, ranks)
    metrics["bootstrap"] = {"resamples": plan.n, "seed": plan.seed, "level": float(bs["level"]),
                            "units": "songs of the split (a song's clips together) and images, with replacement"}
    metrics["ci"] = bootstrap.intervals(reps["model"], float(bs["level"]))
    metrics["mean_predictor_ci"] = bootstrap.intervals(reps["mean_predictor"], float(bs["level"]))
    pct = f"{100 * float(bs['level']):g} %"
    for name, label in (("seeds_mean", f"mean over {len(seed_names)} seed{'s' if len(seed_names) > 1 else ''}"), ("ci_lo", f"{pct} CI low"),
                        ("ci_hi", f"{pct} CI high")):
        src = metrics["seeds"]["mean"] if name == "seeds_mean" else metrics["ci"][name[3:]]
        reg_rows.append({"model": label, **{c: v for c, v in src.items() if c.endswith(("_mse", "_mae"))}})

    reg = pd.DataFrame(reg_rows)
    ret = pd.DataFrame(ret_rows)
    _write(out_dir, metrics, reg, ret, ev, preds, true, params, (reps, plan))
    if track:
        _track(variant, cks["best"]["sha256"], cfg, metrics, reg, ret, out_dir, split)
    return metrics


def seed_summary(rows: list[dict[str, float]], train_seeds: list[int], best_epochs: list[int]) -> dict:
    """``{"n", "train_seeds", "best_epochs", "mean": {column: mean}, "std": {column: sample std}}`` over the
    training seeds' rows (std only with two or more seeds)."""
    cols = [c for c in rows[0] if all(c in r for r in rows)]
    vals = {c: np.array([r[c] for r in rows], dtype=np.float64) for c in cols}
    out = {"n": len(rows), "train_seeds": [int(s) for s in train_seeds], "best_epochs": [int(e) for e in best_epochs],
           "mean": _round({c: float(np.mean(v)) for c, v in vals.items()})}
    if len(rows) > 1:
        out["std"] = _round({c: float(np.std(v, ddof=1)) for c, v in vals.items()})
    return out


def _retrieval_table(metrics: dict, k: int) -> list[dict]:
    cols = [f"ndcg{k}", "spearman", "r1", "r5", "r10", "mrr"]
    rows = []
    for direction, short in DIRECTIONS.items():
        for name in ("best", "last", "untrained"):
            for scorer, label in SCORERS.items():
                m = metrics[name]
                rows.append({"direction": direction, "model": name, "ranked by": label,
                             **{c: m[f"{short}_{scorer}_{c}"] for c in cols}})
        rr = metrics["random_ranking"]
        rows.append({"direction": direction, "model": "random ranking", "ranked by": "chance (exact expectation)",
                     **{c: rr[f"{short}_{c}"] for c in cols},
                     })
    return rows


def _write(out_dir: Path, metrics: dict, reg: pd.DataFrame, ret: pd.DataFrame, ev: Evaluator,
           preds: dict, true: dict, params: dict, boot: tuple) -> None:
    from imem import bootstrap

    variant, split = metrics["variant"], metrics["split"]
    note = (f"Variant `{variant}`, {split} split, {CORPUS_LABEL}: not a reproduction of any paper's table. "
            f"best = epoch {metrics['best_epoch']} (lowest val total loss), last = epoch {metrics['last_epoch']}; "
            "mean_predictor = training-set means; untrained = the seeded initial weights.")
    write_csv(out_dir / "regression.csv", reg)
    write_text(out_dir / "regression.md", markdown_table(reg, f"Regression errors: {variant}", note))
    if len(ret):
        rnote = (note + f" Relevant = true S > {metrics['relevance_threshold']}; R@k = share of queries with a relevant "
                 "item in the top k; nDCG uses S as the gain.")
        write_csv(out_dir / "retrieval.csv", ret)
        write_text(out_dir / "retrieval.md", markdown_table(ret, f"Retrieval: {variant}", rnote))
    else:  # same files for every variant, so the DVC stage declares one set of outputs
        write_csv(out_dir / "retrieval.csv", pd.DataFrame(columns=["direction", "model", "ranked by"]))
        write_text(out_dir / "retrieval.md", f"# Retrieval: {variant}\n\nNot applicable: `{variant}` is a unimodal "
                   "variant (VA of one modality, no image-music similarity).\n")
    write_json(out_dir / "metrics.json", metrics)
    with atomic_dir(out_dir / "predictions") as tmp:
        bootstrap.save(tmp / "bootstrap.npz", *boot)
        d, store = ev.d, ev.trainer.store
        for side in ev.sides:
            rows = getattr(d, f"items_{side}")[0].numpy()
            ids = _ids(store.images, rows, "image_id") if side == "image" else _ids(store.clips, rows, "clip_id")
            df = pd.DataFrame({"id": ids, "valence": true[f"{side}_va"][:, 0], "arousal": true[f"{side}_va"][:, 1]})
            seeds = [n for n in preds if n.startswith("seed_")]  # extra training seeds' best checkpoints
            for name in ("best", "last", "untrained", "mean_predictor", *seeds):
                for j, dim in enumerate(VA):
                    df[f"{dim}_{name}"] = preds[name][f"{side}_va"][:, j]
            write_csv(tmp / f"{side}_va.csv", df)
            for name in ("best", "untrained"):
                np.save(tmp / f"{side}_embeddings_{name}.npy", preds[name][f"{side}_emb"].astype(np.float32))
        if ev.kind == "matching":
            ci, ii = _ids(store.clips, d.music_rows.numpy(), "clip_id"), _ids(store.images, d.image_rows.numpy(), "image_id")
            pairs = pd.DataFrame({"clip_id": ci, "image_id": ii, "score": true["pair_sim"],
                                  **{f"sim_{n}": preds[n]["pair_sim"] for n in ("best", "last", "untrained")}})
            write_csv(tmp / "pairs.csv", pairs)
            write_csv(tmp / "top.csv", _top_lists(ev, preds["best"], int(params["top_k"])))
            np.save(tmp / "truth.npy", ev.truth.astype(np.float32))


def _ids(table: pd.DataFrame, rows: np.ndarray, column: str) -> np.ndarray:
    """Item ids of feature-store rows."""
    return table.set_index("row").loc[rows, column].to_numpy()


def _top_lists(ev: Evaluator, pred: dict, top_k: int) -> pd.DataFrame:
    """The best checkpoint's top-k candidates of every query, both directions, both scorers."""
    store, d = ev.trainer.store, ev.d
    clip_ids = _ids(store.clips, d.items_music[0].numpy(), "clip_id")
    image_ids = _ids(store.images, d.items_image[0].numpy(), "image_id")
    frames = []
    for direction in DIRECTIONS:
        q_ids, c_ids = (clip_ids, image_ids) if direction == "music_to_image" else (image_ids, clip_ids)
        t = ev.truth if direction == "music_to_image" else ev.truth.T
        for scorer in SCORERS:
            s = _scores(pred, scorer, direction)
            order = np.argsort(-s, axis=1, kind="stable")[:, :top_k]
            q = np.repeat(np.arange(len(q_ids)), order.shape[1])
            c = order.ravel()
            frames.append(pd.DataFrame({"direction": direction, "ranked_by": scorer, "query_id": q_ids[q],
                                        "rank": np.tile(np.arange(1, order.shape[1] + 1), len(q_ids)),
                                        "candidate_id": c_ids[c], "score": s[q, c], "true_s": t[q, c]}))
    return pd.concat(frames, ignore_index=True)


def _track(variant: str, best_sha: str, cfg: dict, metrics: dict, reg: pd.DataFrame, ret: pd.DataFrame,
           out_dir: Path, split: str) -> None:
    """Log to the variant's training run (found by its best checkpoint's hash), else to a new run."""
    import mlflow

    from imem.tracking import variant_run

    with variant_run(variant, best_sha, cfg):
        for name, prefix in (("best", split), ("last", f"{split}_last"), ("mean_predictor", f"{split}_mean_predictor")):
            mlflow.log_metrics({f"{prefix}/{k}": float(v) for k, v in metrics[name].items()
                                if isinstance(v, float) and math.isfinite(v)})
        mlflow.log_table(data=reg, artifact_file="evaluate/regression.json")
        if len(ret):
            mlflow.log_table(data=ret, artifact_file="evaluate/retrieval.json")
        for f in ("metrics.json", "regression.md", "retrieval.md"):
            if (out_dir / f).is_file():
                mlflow.log_artifact(str(out_dir / f), artifact_path="evaluate")


def summarize(eval_dirs: list[str | Path], out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One regression table and one retrieval table across variants (CDCML table 3 layout: a row per
    model, a column per metric), from the variants' ``metrics.json``; blank where a metric does not apply."""
    reg_rows, ret_rows, ref, mean_row = [], [], None, {}
    for d in map(Path, eval_dirs):
        path = d / "metrics.json"
        if not path.is_file():
            raise ImemError(f"{path}: missing (run evaluate for this variant)")
        m = json.loads(path.read_text())
        mean_row.update(m["mean_predictor"])  # the same training-set means; each variant adds its columns
        for name in CHECKPOINTS:
            reg_rows.append({"model": f"{m['variant']} ({name}, epoch {m[f'{name}_epoch']})",
                             **{k: v for k, v in m[name].items() if k.endswith(("_mse", "_mae"))}})
            if "random_ranking" in m and name == "best":
                for direction, short in DIRECTIONS.items():
                    for scorer, label in SCORERS.items():
                        ret_rows.append({"direction": direction, "model": f"{m['variant']} (best)", "ranked by": label,
                                         **{c.split("_", 2)[2]: v for c, v in m[name].items()
                                            if c.startswith(f"{short}_{scorer}_")}})
        if "random_ranking" in m and ref is None:  # the same split and truth for every matching variant
            ref = m
    reg_rows.append({"model": "mean predictor (training-set means)", **mean_row})
    if ref is not None:
        for direction, short in DIRECTIONS.items():
            ret_rows.append({"direction": direction, "model": "random ranking", "ranked by": "chance (exact expectation)",
                             **{c[len(short) + 1:]: v for c, v in ref["random_ranking"].items()
                                if c.startswith(f"{short}_") and "queries" not in c}})
    reg, ret = pd.DataFrame(reg_rows), pd.DataFrame(ret_rows)
    if len(ret):
        ret = ret.sort_values("direction", kind="stable", key=lambda s: s.map(list(DIRECTIONS).index))
    out_dir = Path(out_dir)
    split = ref["split"] if ref else "test"
    note = (f"{split} split, {CORPUS_LABEL}: not a reproduction of any paper's table. best = the epoch with the "
            "lowest val total loss; last = the final epoch.")
    write_csv(out_dir / "regression.csv", reg)
    write_text(out_dir / "regression.md", markdown_table(reg, "Regression errors of every variant", note))
    if len(ret):
        thr = ref["relevance_threshold"]
        write_csv(out_dir / "retrieval.csv", ret)
        write_text(out_dir / "retrieval.md", markdown_table(
            ret, "Retrieval of every matching variant",
            note + f" Relevant = true S > {thr:g}; R@k = share of queries with a relevant item in the top k."))
    return reg, ret
