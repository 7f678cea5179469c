"""What the other methods of the field share (issue 7): the data of the prepared splits, frozen-backbone
features, the comparison's metric columns, and the runner that writes a method's outputs and MLflow run.

A method module (``imem.methods.<name>``) defines

    LABEL: str                      # its row name in the comparison, e.g. "Emo-CLIM"
    DEFAULTS: dict                  # its params.yaml section ``methods.<name>`` (checked against these keys)
    def fit_evaluate(cfg: dict, data: MethodData, ctx: RunContext) -> MethodResult

and :func:`run_method` does the rest: the seed, the checkpoint (``models/methods/<name>/model.pt``),
``reports/methods/<name>/{metrics.json,history.csv,results.md}`` (all written atomically), and one MLflow run
in the experiment ``imem-methods`` with the per-epoch losses, the test metrics and the tables.

Every method is trained on the train split of the same song-level split as the CDCML variants, selected
on val, and scored on ``evaluate.split`` (test) with the column names below, so one table compares them.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from imem.data.pairs import similarity_matrix
from imem.errors import ImemError
from imem.features.store import FeatureStore
from imem.io import atomic_dir, write_csv, write_json, write_text
from imem.runtime import torch_threads  # noqa: F401 -- the methods' thread pinning (re-exported)

CORPUS_LABEL = "embedded (generated) corpus"
SPLITS = ("train", "val", "test")
VA = ("valence", "arousal")

# The comparison's columns, by group. Every value a method reports must use one of these names; a metric that
# does not apply to a method is simply absent (blank in the table).
COLUMN_GROUPS: dict[str, dict[str, str]] = {
    "regression": {
        **{f"sim_{m}": f"similarity {m.upper()} on the split's pairs" for m in ("mse", "mae")},
        **{f"{side}_{dim}_{m}": f"{side} {dim} {m.upper()} on the split's items"
           for side in ("image", "music") for dim in VA for m in ("mse", "mae")},
    },
    # relevant: true S > evaluate.relevance_threshold; sim = the method's predicted matching score,
    # emb = proximity in its shared embedding space (CDCML's negative squared distance, Emo-CLIM's cosine)
    "matching": {
        f"{d}_{s}_{m}": f"{'music->image' if d == 'm2i' else 'image->music'} by {s}: {m}"
        for s in ("sim", "emb") for d in ("m2i", "i2m") for m in ("ndcg10", "r1", "r5", "r10", "mrr")
    },
    # Emo-CLIM's protocol: relevant = same emotion class (image taxonomy mapped to music's), averaged per
    # query class, then across classes
    "emotion_class": {
        f"cls_{d}_{m}": f"{name} same-class {m}"
        for d, name in (("i2m", "image->music"), ("m2i", "music->image"), ("i2i", "image->image"),
                        ("m2m", "music->music")) for m in ("p1", "p5", "mrr")
    },
    # MMVA's protocol: text (a clip's caption) -> music
    "text_music": {f"t2m_{m}": f"caption->music {m}" for m in ("r1", "r5", "r10", "map10")},
    # CMER-CL's protocol: music <-> emotion (a clip's VA sequence); relevant = the clip's own sequence
    "music_emotion": {
        f"{d}_{m}": f"{'music->emotion' if d == 'm2e' else 'emotion->music'} {m}"
        for d in ("m2e", "e2m") for m in ("mrr", "avg_rank", "median_rank")
    },
}
COLUMNS: dict[str, str] = {k: v for group in COLUMN_GROUPS.values() for k, v in group.items()}
# lower is better for these (the table marks the best value per column)
LOWER_IS_BETTER = {c for c in COLUMNS if c.endswith(("_mse", "_mae", "_rank"))}
CHANCE_ROW = "random ranking"  # a method's chance-level row; the comparison merges them into one row


# --- data ----------------------------------------------------------------------------------------------

@dataclass
class MethodData:
    """The prepared splits (``artifacts/prepare``) and the feature store (``artifacts/features``).

    ``clips[split]``: clip_id, song_id, valence, arousal, emotion, caption, ..., ``row`` (feature-store row);
    ``images[split]``: image_id, valence, arousal, emotion, ..., ``row``;
    ``pairs[split]``: clip_id, image_id, score, ``clip_idx`` / ``image_idx`` (positions in that split's tables).
    ``sigma``: the S = exp(-d / sigma) of the prepare stage (reports/prepare/stats.json).
    """

    prepare_dir: Path
    store: FeatureStore
    sigma: float
    clips: dict[str, pd.DataFrame]
    images: dict[str, pd.DataFrame]
    pairs: dict[str, pd.DataFrame]
    memo: object | None = None  # frozen-backbone cache shared with the train stage (imem.features.frozen)
    # the seed every frozen backbone is built with, whatever training seed asks (set by run_method: the
    # backbones stand in for pretrained weights, the same for every training seed)
    backbone_seed: int | None = None
    _frozen: dict = field(default_factory=dict)
    # what a method derives from the data alone, once per run and shared by its training seeds (e.g. MMVA's
    # frozen caption embeddings): key -> value, owned by the method that writes it
    derived: dict = field(default_factory=dict)

    def va(self, side: str, split: str) -> np.ndarray:
        t = self.clips if side == "music" else self.images
        return t[split][list(VA)].to_numpy(np.float32)

    def truth(self, split: str) -> np.ndarray:
        """Clips x images ground-truth S of every combination of the split (not only the sampled pairs)."""
        return similarity_matrix(self.va("music", split), self.va("image", split), self.sigma)

    def frozen(self, side: str, spec: dict, seed: int, split: str, device: str = "cpu", batch_size: int = 32,
               pool: str = "mean", progress: bool = True) -> torch.Tensor:
        """Frozen-backbone features (n_items, D) of ``split``'s images or clips, in table order.

        The backbone is built right after ``torch.manual_seed(seed)`` -- the same weights a train-stage
        variant with that seed builds first -- and run once over the items of all three splits, so its
        outputs are shared through the on-disk cache with the train stage. Transformer outputs (B, N, D)
        are pooled: ``mean`` over tokens or ``cls`` (the first token)."""
        from imem.training import Inputs, _device, backbone_cache, cache_key

        seed = self.backbone_seed if self.backbone_seed is not None else seed
        key = (side, json.dumps(spec, sort_keys=True), int(seed), pool)
        if key not in self._frozen:
            from imem.models.encoders import build_backbone

            torch.manual_seed(int(seed))
            backbone = build_backbone(spec)
            for p in backbone.parameters():
                p.requires_grad_(False)
            rows = torch.as_tensor(np.concatenate([self._table(side)[s]["row"].to_numpy() for s in SPLITS]))
            ck = cache_key(backbone, spec, self.store, rows, batch_size=int(batch_size)) if self.memo is not None else None
            hit = self.memo.get(ck) if ck is not None else None
            if hit is not None:
                feats, index = hit
            else:
                feats, index = backbone_cache(backbone, Inputs(self.store, spec, side), rows, int(batch_size),
                                              _device(device), f"{spec.get('name', spec['type'])}: frozen {side} features",
                                              progress)
                if ck is not None:
                    self.memo[ck] = (feats, index)
            if feats.dim() == 3:
                feats = feats[:, 0] if pool == "cls" else feats.mean(dim=1)
            elif feats.dim() != 2:
                raise ImemError(f"encoder {spec.get('name')!r}: {feats.dim()}-d outputs cannot be pooled to vectors")
            self._frozen[key] = (feats, index)
        feats, index = self._frozen[key]
        sel = [index[int(r)] for r in self._table(side)[split]["row"]]
        return feats[torch.tensor(sel, dtype=torch.long)]

    def _table(self, side: str) -> dict[str, pd.DataFrame]:
        if side not in ("image", "music"):
            raise ImemError(f"side {side!r} is not one of: image, music")
        return self.images if side == "image" else self.clips


def load_data(prepare_dir: str | Path, features_dir: str | Path, stats_path: str | Path,
              memo: object | None = None) -> MethodData:
    prepare_dir = Path(prepare_dir)
    store = FeatureStore(features_dir)
    try:
        sigma = float(json.loads(Path(stats_path).read_text())["sigma"])
    except (OSError, KeyError, ValueError) as exc:
        raise ImemError(f"{stats_path}: no sigma (run the prepare stage): {exc}") from exc
    clips, images, pairs = {}, {}, {}
    for s in SPLITS:
        d = prepare_dir / s
        if not (d / "pairs.csv").is_file():
            raise ImemError(f"no prepared split {s!r} in {prepare_dir} (run the prepare stage)")
        c = pd.read_csv(d / "clips.csv", dtype={"clip_id": str, "song_id": str})
        i = pd.read_csv(d / "images.csv", dtype={"image_id": str})
        p = pd.read_csv(d / "pairs.csv", dtype={"clip_id": str, "image_id": str})
        c["row"] = store.clip_rows(c["clip_id"])
        i["row"] = store.image_rows(i["image_id"])
        p["clip_idx"] = pd.Index(c["clip_id"]).get_indexer(p["clip_id"])
        p["image_idx"] = pd.Index(i["image_id"]).get_indexer(p["image_id"])
        if (p[["clip_idx", "image_idx"]] < 0).any().any():
            raise ImemError(f"{d / 'pairs.csv'}: a pair names a clip or image that is not in the split's tables")
        clips[s], images[s], pairs[s] = c, i, p
    return MethodData(prepare_dir, store, sigma, clips, images, pairs, memo)


# --- metrics in the comparison's columns ---------------------------------------------------------------

def feature_scale(train: torch.Tensor, dims: tuple[int, ...] = (0,), unbiased: bool = True,
                  keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the training split's features for z-scoring ``(x - mean) / std``. A feature that is
    (nearly) constant on the training split -- std at most 1e-3 x the median std, or 1e-6 -- gets std = inf,
    so its z-score is 0 everywhere: the training split never varied it, so nothing can be learned from it, and
    dividing by a std clamped to 1e-6 blew validation values up to |z| = 3,350 (measured on CMER-CL's frozen
    ResNet18 features: one ReLU unit silent on every training clip), which wrecked model selection."""
    mean = train.mean(dim=dims, keepdim=keepdim)
    std = train.std(dim=dims, keepdim=keepdim, unbiased=unbiased)
    floor = max(1e-3 * float(std.median()), 1e-6)
    return mean, torch.where(std <= floor, torch.full_like(std, math.inf), std)


def regression_columns(pred_va: dict[str, np.ndarray] | None = None, true_va: dict[str, np.ndarray] | None = None,
                       pred_sim: np.ndarray | None = None, true_sim: np.ndarray | None = None) -> dict[str, float]:
    """``sim_mse`` ... ``music_arousal_mae`` for what is given (``pred_va``: {"image": (n, 2), "music": ...})."""
    from imem.metrics import regression

    row = {}
    if pred_sim is not None:
        row.update({f"sim_{k}": v for k, v in regression(np.asarray(pred_sim), np.asarray(true_sim)).items()})
    for side, pred in (pred_va or {}).items():
        for j, dim in enumerate(VA):
            row.update({f"{side}_{dim}_{k}": v for k, v in regression(pred[:, j], true_va[side][:, j]).items()})
    return row


def matching_columns(scores_m2i: np.ndarray, truth: np.ndarray, scorer: str, threshold: float,
                     k_ndcg: int = 10) -> dict[str, float]:
    """``m2i_<scorer>_*`` and ``i2m_<scorer>_*`` from a clips x images score matrix (higher = better),
    against the ground-truth S (:meth:`MethodData.truth`), relevant when S > ``threshold``."""
    return Rankings(scores_m2i, truth, threshold, k_ndcg).columns(scorer)


class Rankings:
    """The ranking metrics of a clips x images score matrix per query, both directions, computed once
    (:class:`imem.metrics.PerQuery`): the split's columns and every bootstrap resample's are weighted means
    of them (:meth:`columns`), with no re-ranking per resample."""

    def __init__(self, scores_m2i: np.ndarray, truth: np.ndarray, threshold: float, k_ndcg: int = 10):
        from imem.metrics import PerQuery

        s, t = np.asarray(scores_m2i, dtype=np.float64), np.asarray(truth, dtype=np.float64)
        self.k_ndcg = int(k_ndcg)
        self.shape = s.shape
        self.m2i = PerQuery.of(s, t, threshold, k_ndcg=self.k_ndcg, spearman=False)
        self.i2m = PerQuery.of(s.T, t.T, threshold, k_ndcg=self.k_ndcg, spearman=False)

    def columns(self, scorer: str, ci: np.ndarray | None = None, ii: np.ndarray | None = None) -> dict[str, float]:
        """The columns on the drawn queries -- clips ``ci`` for music->image, images ``ii`` for
        image->music, a query drawn k times counted k times -- each ranking the split's **whole** candidate
        pool (resampling the candidates too would put duplicated non-relevant items into the top k and bias
        R@k and MRR low: measured for CDCML's music->image R@10, resample mean 0.69 against 0.80 on the
        split). ``None``: every query once (the split's columns)."""
        if scorer not in ("sim", "emb"):
            raise ImemError(f"scorer {scorer!r} is not one of: sim, emb")
        row = {}
        for short, pq, idx, n in (("m2i", self.m2i, ci, self.shape[0]), ("i2m", self.i2m, ii, self.shape[1])):
            w = None if idx is None else np.bincount(np.asarray(idx, np.intp), minlength=n)
            m = pq.summary(w)
            row.update({f"{short}_{scorer}_{name}": m[name] for name in (f"ndcg{self.k_ndcg}", "r1", "r5", "r10", "mrr")})
        return row


def matching_resampled(scores_m2i: np.ndarray | Rankings, truth: np.ndarray, scorer: str, threshold: float,
                       k_ndcg: int, ci: np.ndarray, ii: np.ndarray) -> dict[str, float]:
    """:func:`matching_columns` on a bootstrap resample (:meth:`Rankings.columns`); pass a :class:`Rankings`
    built once as ``scores_m2i`` when scoring many resamples (``truth``, ``threshold`` and ``k_ndcg`` are then
    its own). With ``np.arange`` indices it equals :func:`matching_columns` on the whole split."""
    r = scores_m2i if isinstance(scores_m2i, Rankings) else Rankings(scores_m2i, truth, threshold, k_ndcg)
    return r.columns(scorer, ci, ii)


def matching_chance(truth: np.ndarray, threshold: float, k_ndcg: int = 10) -> dict[str, float]:
    """The exact chance level of :func:`matching_columns` (both scorers get the same values)."""
    from imem.metrics import random_ranking

    row = {}
    for short, t in (("m2i", truth), ("i2m", truth.T)):
        m = random_ranking(t, threshold, k_ndcg=k_ndcg)
        for scorer in ("sim", "emb"):
            row.update({f"{short}_{scorer}_{name}": m[name] for name in (f"ndcg{k_ndcg}", "r1", "r5", "r10", "mrr")})
    return row


# --- running a method ------------------------------------------------------------------------------------

@dataclass
class MethodResult:
    rows: dict[str, dict[str, float]]  # row label -> {column: value}; the first row is the method itself
    history: list[dict]  # per epoch: {"epoch": n, "train/<loss>": .., "val/<loss>": ..}
    state: dict  # what models/methods/<name>/model.pt holds (state dicts, config); torch.save-able
    notes: dict = field(default_factory=dict)  # extra scalars/strings for metrics.json (best_epoch, ...)
    # the rows (chance row excluded) recomputed on one bootstrap resample of the split: clip and image
    # indices into ``data.clips[split]`` / ``data.images[split]``, repeated when drawn twice (imem.bootstrap)
    rescore: Callable[[np.ndarray, np.ndarray], dict[str, dict[str, float]]] | None = None


@dataclass
class RunContext:
    split: str = "test"
    relevance_threshold: float = 0.7
    ndcg_k: int = 10
    progress: bool = True
    log: Callable[[dict, int], None] = lambda metrics, step: None  # per-epoch metrics -> MLflow


def method_module(name: str):
    import importlib

    from imem.methods import METHODS

    if name not in METHODS:
        raise ImemError(f"no method {name!r} (have: {', '.join(METHODS)})")
    return importlib.import_module(f"imem.methods.{name}")


def method_config(name: str, methods_params: dict) -> dict:
    """``methods.common`` + the merged ``methods.<name>`` section (unknown keys refused)."""
    from imem.params import merge

    mod = method_module(name)
    cfg = dict(methods_params["common"])
    cfg.update(merge(mod.DEFAULTS, methods_params.get(name) or {}, f"methods.{name}"))
    cfg["method"] = name
    return cfg


def check_result(name: str, result: MethodResult) -> None:
    if not result.rows:
        raise ImemError(f"method {name}: no result rows")
    for label, row in result.rows.items():
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ImemError(f"method {name}, row {label!r}: {unknown[0]!r} is not a comparison column (imem.methods.base.COLUMNS)")
        bad = [k for k, v in row.items() if not (isinstance(v, (int, float)) and math.isfinite(v))]
        if bad:
            raise ImemError(f"method {name}, row {label!r}: {bad[0]} = {row[bad[0]]!r} is not a finite number")


def parse_overrides(items: list[str], prefix: str) -> dict:
    """``["key=value", ...]`` (``--set`` of stages/method.py) -> ``{key: value}``, each value read as YAML
    (``false``, ``3``, ``[512, 512]``); a malformed item is an ImemError naming it."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ImemError(f"--set {item!r}: expected KEY=VALUE (a key of {prefix})")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ImemError(f"--set {item!r}: the value is not YAML ({str(exc).splitlines()[0]})") from exc
    return out


def run_method(name: str, methods_params: dict, eval_params: dict, prepare_dir: str | Path,
               features_dir: str | Path, stats_path: str | Path, model_dir: str | Path, report_dir: str | Path,
               train_encoders: dict | None = None, track: bool = True, progress: bool = True,
               memo: object | None = None, overrides: dict | None = None, run_name: str | None = None) -> dict:
    """Train and evaluate one method; write its checkpoint, reports and MLflow run; return metrics.json.
    ``overrides``: keys of ``methods.<name>`` set on top of params.yaml (an ablation row, e.g. MMVA's
    ``matching: pairs``), checked like params; ``run_name``: the run's name (default ``name``)."""
    mod = method_module(name)
    if overrides:
        methods_params = {**methods_params, name: {**(methods_params.get(name) or {}), **overrides}}
    cfg = method_config(name, methods_params)
    cfg = resolve_encoders(cfg, train_encoders or {})
    data = load_data(prepare_dir, features_dir, stats_path, memo)
    if eval_params["split"] not in SPLITS:
        raise ImemError(f"params: evaluate.split {eval_params['split']!r} is not one of: {', '.join(SPLITS)}")
    model_dir, report_dir = Path(model_dir), Path(report_dir)
    n_seeds = int(cfg.get("n_seeds", 1))
    if n_seeds < 1:
        raise ImemError(f"params: methods.common.n_seeds = {n_seeds}: must be an integer >= 1")
    data.backbone_seed = int(cfg["seed"])
    bs = dict(eval_params.get("bootstrap") or {"n": 1000, "seed": 2026, "level": 0.95})
    run_name = run_name or name
    with (_tracking(name, cfg, run_name) if track else contextlib.nullcontext()):
        t0 = time.perf_counter()
        results, reps = [], []
        for k in range(n_seeds):  # training seeds seed, seed + 1, ... (issue 14); the first one is logged per epoch
            seed_k = int(cfg["seed"]) + k
            torch.manual_seed(seed_k)
            np.random.seed(seed_k % 2**32)
            ctx = RunContext(split=eval_params["split"], relevance_threshold=float(eval_params["relevance_threshold"]),
                             ndcg_k=int(eval_params["ndcg_k"]), progress=progress,
                             log=_mlflow_log if (track and k == 0) else (lambda m, s: None))
            result = mod.fit_evaluate(dict(cfg, seed=seed_k), data, ctx)
            check_result(name, result)
            results.append(result)
            if result.rescore is not None:
                reps.append(_bootstrap(data, ctx.split, result.rescore, bs, f"bootstrap {name} seed {seed_k}", progress))
        rows, extra = seed_rows([r.rows for r in results], [int(cfg["seed"]) + k for k in range(n_seeds)])
        boot = None
        if reps:
            from imem import bootstrap

            labels = [lab for lab in reps[0][0] if all(lab in r[0] for r in reps)]
            boot = ({lab: bootstrap.mean_over([r[0][lab] for r in reps]) for lab in labels}, reps[0][1])
            extra["bootstrap"] = {"resamples": boot[1].n, "seed": boot[1].seed, "level": float(bs["level"]),
                                  "units": "songs of the split (a song's clips together) and images, with replacement"}
            extra["rows_ci"] = {lab: bootstrap.intervals(v, float(bs["level"])) for lab, v in boot[0].items()}
        metrics = {"method": name, "label": getattr(mod, "label", lambda c: mod.LABEL)(cfg), "split": ctx.split, "corpus": CORPUS_LABEL, "sigma": data.sigma,
                   "relevance_threshold": ctx.relevance_threshold, **results[0].notes,
                   "seconds": round(time.perf_counter() - t0, 1), "rows": rows, **extra}
        seeds_extra = {int(cfg["seed"]) + k: r for k, r in enumerate(results) if k > 0}
        write_reports(report_dir, {k: v for k, v in metrics.items() if k != "seconds"}, results[0].history,
                      checkpoint=({**results[0].state, "config": cfg}, model_dir / "model.pt"), bootstrap_file=boot)
        for seed_k, r in seeds_extra.items():
            from imem.checkpoints import save

            d = model_dir / "seeds" / str(seed_k)
            save({**r.state, "config": dict(cfg, seed=seed_k, backbone_seed=int(cfg["seed"]))}, d / "model.pt")
            write_csv(d / "history.csv", pd.DataFrame(r.history), float_format="%.6g")
        if track:
            _finish_run(metrics, model_dir, report_dir)
    return metrics


def _bootstrap(data: MethodData, split: str, rescore, settings: dict, desc: str, progress: bool):
    from imem import bootstrap

    plan = bootstrap.make_plan(data.clips[split]["song_id"].to_numpy(), data.images[split]["image_id"].to_numpy(),
                               int(settings["n"]), int(settings["seed"]))
    return bootstrap.replicate(rescore, plan, desc=desc, progress=progress), plan


def seed_rows(per_seed: list[dict[str, dict[str, float]]], seeds: list[int]) -> tuple[dict, dict]:
    """Rows averaged over training seeds (a column only where every seed has it) and
    ``{"seeds": {...}, "rows_std": {...}}`` (std with two or more seeds)."""
    rows, std = {}, {}
    for label in per_seed[0]:
        cols = [c for c in per_seed[0][label] if all(c in r.get(label, {}) for r in per_seed)]
        vals = {c: np.array([float(r[label][c]) for r in per_seed]) for c in cols}
        rows[label] = {c: round(float(v.mean()), 6) for c, v in vals.items()}
        if len(per_seed) > 1 and label != CHANCE_ROW:
            std[label] = {c: round(float(v.std(ddof=1)), 6) for c, v in vals.items()}
    extra = {"seeds": {"n": len(per_seed), "train_seeds": [int(s) for s in seeds]}}
    if std:
        extra["rows_std"] = std
    return rows, extra


def write_reports(report_dir: Path, metrics: dict, history: list[dict] | None = None,
                  checkpoint: tuple[dict, Path] | None = None, bootstrap_file: tuple | None = None) -> None:
    """Every payload is built first; then the checkpoint and the report directory (metrics.json,
    results.md, history.csv) are each replaced whole, so a failure never leaves a new checkpoint beside
    stale reports or a half-written directory."""
    from imem.checkpoints import save

    text = results_markdown(metrics)
    hist = pd.DataFrame(history) if history is not None else None
    if checkpoint is not None:
        save(checkpoint[0], checkpoint[1])
    with atomic_dir(report_dir) as tmp:
        if (report_dir / ".gitignore").is_file():  # DVC's entry for the cached bootstrap.npz: keep it
            (tmp / ".gitignore").write_bytes((report_dir / ".gitignore").read_bytes())
        if hist is not None:
            write_csv(tmp / "history.csv", hist, float_format="%.6g")
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "results.md", text)
        if bootstrap_file is not None:  # {row: {column: resample values}}, plan (imem.bootstrap)
            from imem import bootstrap

            bootstrap.save(tmp / "bootstrap.npz", *bootstrap_file)


def resolve_encoders(cfg: dict, encoders: dict) -> dict:
    """Replace ``image_encoder`` / ``music_encoder`` names by their ``train.encoders`` specs (with the name)."""
    cfg = dict(cfg)
    for key in ("image_encoder", "music_encoder"):
        if key in cfg and isinstance(cfg[key], str):
            if cfg[key] not in encoders:
                raise ImemError(f"params: methods.{cfg['method']}.{key} = {cfg[key]!r} is not under train.encoders "
                                f"(have: {', '.join(encoders)})")
            cfg[key] = dict(encoders[cfg[key]], name=cfg[key])
    return cfg


def results_markdown(metrics: dict) -> str:
    rows = pd.DataFrame.from_dict(metrics["rows"], orient="index")
    rows = rows[[c for c in COLUMNS if c in rows.columns]]
    rows.index.name = "row"
    body = rows.reset_index().astype(object).where(rows.reset_index().notna(), None).to_markdown(
        index=False, floatfmt=".4f", missingval="")
    return (f"# {metrics['label']}: {metrics['split']} split\n\nMeasured on the {metrics['corpus']}; not a "
            f"reproduction of the paper's numbers.\n\n{body}\n")


def _tracking(name: str, cfg: dict, run_name: str):
    from imem.tracking import mlflow_run

    return mlflow_run("imem-methods", run_name, {**cfg, "corpus": CORPUS_LABEL}, tags={"imem.method": name,
                                                                                       "imem.run": run_name})


def _mlflow_log(metrics: dict, step: int) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def row_slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label.lower()).strip("_")


def log_results(metrics: dict, files: list[Path]) -> None:
    """Into the active MLflow run: ``test/<column>`` for the method's row, ``test_<row>/<column>`` for the
    others (baselines, chance), the rows as a table, and ``files``."""
    import mlflow

    for i, (label, row) in enumerate(metrics["rows"].items()):
        prefix = "test" if i == 0 else f"test_{row_slug(label)}"
        mlflow.log_metrics({f"{prefix}/{k}": float(v) for k, v in row.items()})
    table = pd.DataFrame.from_dict(metrics["rows"], orient="index").reset_index(names="row")
    mlflow.log_table(table, artifact_file="results.json")
    for f in files:
        mlflow.log_artifact(str(f))


def _finish_run(metrics: dict, model_dir: Path, report_dir: Path) -> None:
    log_results(metrics, [model_dir / "model.pt"] + [report_dir / f for f in ("metrics.json", "history.csv", "results.md")])


# --- small shared helpers ------------------------------------------------------------------------------

def batches(n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True,
            min_last: int = 2) -> list[torch.Tensor]:
    """Index batches over ``n`` items; a last batch smaller than ``min_last`` joins the one before
    (BatchNorm needs two samples in training mode)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < min_last:
        out[-2] = torch.cat([out[-2], out.pop()])
    return out
