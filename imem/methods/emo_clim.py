"""Emo-CLIM (Stewart, Avramidis, Feng & Narayanan, "Emotion-Aligned Contrastive Learning Between Images and
Music", ICASSP 2024; reference code github.com/shantistewart/Emo-CLIM), on the prepared splits.

Categorical emotions: an image's class is its image-taxonomy emotion mapped to the music taxonomy as the
paper's table 2 does (:data:`imem.data.synth.IMAGE_TO_MUSIC_EMOTION`: excitement->exciting, amusement->funny,
contentment->happy, anger->angry, sadness->sad, fear->scary); images with another emotion (awe, disgust,
tender, ...) and clips whose emotion is not one of the six music classes are dropped (counted in the notes).

Model: the frozen backbones' outputs (``methods.common`` encoders), optionally standardised with the train
split's per-dimension mean and std, go through one projection head per modality (Linear -> ReLU -> Dropout
-> Linear to ``proj_dim``) and are L2-normalised. Loss: four supervised-contrastive (SupCon) terms,
image->image and music->music (intra-modal, the anchor itself excluded) and image->music and music->image
(cross-modal: anchors of one modality against the candidates of the other, positives = same class),
weighted 0.25 each. AdamW; each step draws ``batch_size`` images and ``batch_size`` clips independently and
class-balanced, as the reference code's ``Multimodal.__getitem__`` does: per item an emotion class uniformly
over the classes that modality has in the train split, then one item of that class uniformly (with
replacement), from a ``torch.Generator`` seeded with ``seed`` (:func:`balanced_batch`); an epoch is
ceil(n_train_clips / batch_size) steps. The validation loss is the same weighted total over the whole val
split as one batch (deterministic); the epoch with the lowest one is kept and scored on ``evaluate.split``.
Training and scoring run with ``cpu_threads`` torch threads (:func:`imem.methods.base.torch_threads`).

Evaluation: image->music and music->image retrieval over all of the split's items, score 0.5 (cos + 1);
per query P@1, P@5 (relevant items in the top k, / k) and MRR with relevant = same class, averaged within
each query class and then across classes (the reference code's macro average) -> ``cls_*``. Queries whose
class has no item in the other modality are skipped (counted in the notes). The same scores also give the
CDCML-protocol ``*_emb_*`` columns against the true S. The chance row holds the exact expectations under a
uniformly random ranking, averaged the same way. ``MethodResult.rescore`` recomputes the model's row on a
bootstrap resample of clips and images (:func:`resample_row`, the function that scores the split too) from
the score matrix computed once: the resample draws the queries, each ranking the split's whole candidate pool.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from imem.data.synth import IMAGE_TO_MUSIC_EMOTION
from imem.errors import ImemError
from imem.methods import base
from imem.methods.base import CHANCE_ROW, MethodData, MethodResult, RunContext
from imem.metrics import expected_reciprocal_rank

LABEL = "Emo-CLIM"
# weight_decay 0.01: torch.optim.AdamW's default, which the reference code uses (it sets only the lr).
DEFAULTS = {
    "epochs": 15,  # section 4.4: "We train all our models for 15 epochs" (the reference repository's config: 30)
    "batch_size": 64,
    "lr": 1.0e-4,
    "weight_decay": 0.01,
    "temperature": 0.07,
    "proj_dim": 128,
    "hidden": 256,
    "dropout": 0.5,
    "standardize": True,  # z-score the frozen features with the train split's statistics (see docs)
    "loss_weights": {"i2i": 0.25, "m2m": 0.25, "i2m": 0.25, "m2i": 0.25},
    "cpu_threads": 1,  # torch CPU threads while training and scoring (0 = unchanged); see base.torch_threads
}
TERMS = ("i2i", "m2m", "i2m", "m2i")
CLASSES = list(IMAGE_TO_MUSIC_EMOTION.values())  # the music taxonomy: the shared label space
KS = (1, 5)
SIDES = {"image": "image_encoder", "music": "music_encoder"}


# --- settings ------------------------------------------------------------------------------------------

def settings(cfg: dict) -> dict:
    """The method's settings from ``cfg`` (missing keys take :data:`DEFAULTS`), checked."""
    p = {k: copy.deepcopy(cfg.get(k, v)) for k, v in DEFAULTS.items()}
    lw = p["loss_weights"]
    if not isinstance(lw, dict):
        raise ImemError(f"params: methods.emo_clim.loss_weights must be a mapping of {', '.join(TERMS)}")
    unknown = sorted(set(lw) - set(TERMS))
    if unknown:
        raise ImemError(f"params: unknown key 'methods.emo_clim.loss_weights.{unknown[0]}' (known: {', '.join(TERMS)})")
    p["loss_weights"] = {**DEFAULTS["loss_weights"], **lw}

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ImemError(f"params: methods.emo_clim.{key} must be {rule}, got {_get(p, key)!r}")

    def num(key: str) -> bool:
        v = _get(p, key)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def whole(key: str, low: int) -> bool:
        v = _get(p, key)
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    need(whole("epochs", 1), "epochs", "an integer >= 1")
    need(whole("batch_size", 2), "batch_size", "an integer >= 2")
    need(whole("proj_dim", 1), "proj_dim", "an integer >= 1")
    need(whole("hidden", 1), "hidden", "an integer >= 1")
    need(whole("cpu_threads", 0), "cpu_threads", "an integer >= 0")
    need(num("lr") and p["lr"] > 0, "lr", "> 0")
    need(num("weight_decay") and p["weight_decay"] >= 0, "weight_decay", ">= 0")
    need(num("temperature") and p["temperature"] > 0, "temperature", "> 0")
    need(num("dropout") and 0 <= p["dropout"] < 1, "dropout", "in [0, 1)")
    need(isinstance(p["standardize"], bool), "standardize", "true or false")
    for t in TERMS:
        need(num(f"loss_weights.{t}") and p["loss_weights"][t] >= 0, f"loss_weights.{t}", ">= 0")
    need(sum(p["loss_weights"].values()) > 0, "loss_weights", "a mapping with a positive weight")
    return p


def _get(p: dict, key: str):
    for part in key.split("."):
        p = p[part]
    return p


# --- loss ----------------------------------------------------------------------------------------------

def supcon(anchors: torch.Tensor, anchor_labels: torch.Tensor, candidates: torch.Tensor | None = None,
           candidate_labels: torch.Tensor | None = None, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss of L2-normalised ``anchors`` (n, d) against ``candidates`` (m, d).

    Cross-modal (candidates given): every candidate is in an anchor's denominator A(i), the same-class ones
    are its positives P(i). Intra-modal (``candidates=None``): the anchors contrast with each other, the
    anchor itself excluded from A(i) and P(i). Every anchor counts in the mean, as eq. 2's -1/N sum_i does
    and the reference code does (its |P(i)| is clamped to 1): an anchor without a positive adds 0 to the
    sum but still counts in N. Labels are integer class codes."""
    intra = candidates is None
    if intra:
        candidates, candidate_labels = anchors, anchor_labels
    logits = anchors @ candidates.T / temperature
    pos = anchor_labels[:, None] == candidate_labels[None, :]
    if intra:
        self_mask = torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)
        pos = pos & ~self_mask
        logits = logits.masked_fill(self_mask, torch.finfo(logits.dtype).min)  # finite: no NaN gradients
    n_pos = pos.sum(dim=1)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    # Emo-CLIM eqs. 2 and 4 (SupCon, Khosla et al. 2020 L_out): -1/N sum_i 1/|P(i)| sum_{p in P(i)} log softmax_p
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(dim=1) / n_pos.clamp(min=1)
    return per_anchor.mean()


def emo_clim_losses(z_img: torch.Tensor, y_img: torch.Tensor, z_mus: torch.Tensor, y_mus: torch.Tensor,
                    temperature: float) -> dict[str, torch.Tensor]:
    """The four SupCon terms: i2i, m2m (intra-modal), i2m, m2i (cross-modal; anchors' modality first)."""
    return {"i2i": supcon(z_img, y_img, temperature=temperature),
            "m2m": supcon(z_mus, y_mus, temperature=temperature),
            "i2m": supcon(z_img, y_img, z_mus, y_mus, temperature),
            "m2i": supcon(z_mus, y_mus, z_img, y_img, temperature)}


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    # Emo-CLIM total loss: L = w_i2i L_i2i + w_m2m L_m2m + w_i2m L_i2m + w_m2i L_m2i (reference config: 0.25 each)
    return sum(weights[t] * terms[t] for t in TERMS)


def balanced_batch(labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` indices into ``labels`` (integer class codes), drawn as the reference code's
    ``Multimodal.__getitem__`` draws each item: a class uniformly over the classes present in ``labels``, then
    one item of that class uniformly; every draw independent (with replacement). Deterministic for a
    ``generator`` state; the batch is class-balanced in expectation however skewed ``labels`` are."""
    labels = torch.as_tensor(labels).cpu()
    if labels.ndim != 1 or not len(labels):
        raise ImemError(f"Emo-CLIM: cannot draw a batch from {tuple(labels.shape)} labels")
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    members = torch.argsort(labels, stable=True)  # item indices grouped by class, classes in sorted order
    starts = torch.cumsum(counts, 0) - counts
    cls = torch.randint(len(classes), (batch_size,), generator=generator)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    pos = torch.minimum((u * counts[cls]).long(), counts[cls] - 1)  # uniform on 0 .. count - 1
    return members[starts[cls] + pos]


class Projection(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear, then L2 normalisation (Emo-CLIM section 3.2)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


# --- retrieval metrics ---------------------------------------------------------------------------------

def macro_average(per_query: dict[str, np.ndarray], query_cls: np.ndarray) -> dict[str, float]:
    """Each metric averaged over the queries of each class, then over the classes ({} without queries: the
    columns are then left out)."""
    classes = np.unique(query_cls)
    if not len(classes):
        return {}
    return {m: float(np.mean([v[query_cls == c].mean() for c in classes])) for m, v in per_query.items()}


def class_per_query(scores: np.ndarray, query_cls: np.ndarray, cand_cls: np.ndarray, ks: tuple[int, ...] = KS,
                    own: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per query of ``scores`` (queries x candidates, higher ranks first; ties by candidate order): P@k
    (relevant in the top k, / k) and RR, relevant = same class; and which queries have a relevant candidate
    (the others hold NaN and are skipped). ``own`` (queries x candidates, intra-modal retrieval): a query's
    own item, which is not a candidate (ranked last and never relevant)."""
    query_cls, cand_cls = np.asarray(query_cls), np.asarray(cand_cls)
    same = query_cls[:, None] == cand_cls[None, :]
    if own is not None:
        same &= ~own
    keep = same.any(axis=1)
    per_query = {m: np.full(len(query_cls), np.nan) for m in (*(f"p{k}" for k in ks), "mrr")}
    if keep.any():
        s = np.asarray(scores, np.float64)[keep]
        if own is not None:
            s = np.where(own[keep], -np.inf, s)
        order = np.argsort(-s, axis=1, kind="stable")
        rel = np.take_along_axis(same[keep], order, axis=1)
        for k in ks:
            per_query[f"p{k}"][keep] = rel[:, :k].sum(axis=1) / k
        per_query["mrr"][keep] = 1.0 / (rel.argmax(axis=1) + 1)
    return per_query, keep


def class_retrieval(scores: np.ndarray, query_cls: np.ndarray, cand_cls: np.ndarray,
                    ks: tuple[int, ...] = KS, own: np.ndarray | None = None) -> tuple[dict[str, float], int]:
    """:func:`class_per_query` macro-averaged over query classes (Emo-CLIM section 5.1.1: per class, then across
    classes), and the number of queries skipped because no candidate has their class ({} without a query
    left: the columns are then left out)."""
    query_cls = np.asarray(query_cls)
    per_query, keep = class_per_query(scores, query_cls, cand_cls, ks, own)
    if not keep.any():
        return {}, int(len(query_cls))
    return macro_average({m: v[keep] for m, v in per_query.items()}, query_cls[keep]), int((~keep).sum())


class ClassRankings:
    """The per-query class-retrieval metrics of every direction over the split's whole pools, computed once:
    image->music and music->image from ``scores_m2i``; image->image and music->music (section 5.1.2's intra-modal
    retrieval, a query's own item excluded) from ``scores_ii`` / ``scores_mm`` when given. A bootstrap draw
    only re-averages its drawn queries: each query ranks the whole pool either way, so the numbers equal
    re-ranking (tests/test_emo_clim.py compares both)."""

    def __init__(self, scores_m2i: np.ndarray, image_cls: np.ndarray, clip_cls: np.ndarray,
                 scores_ii: np.ndarray | None = None, scores_mm: np.ndarray | None = None):
        self.cls = {"image": np.asarray(image_cls, np.int64), "music": np.asarray(clip_cls, np.int64)}
        self.pool = {side: np.flatnonzero(c >= 0) for side, c in self.cls.items()}
        pi, pc = self.pool["image"], self.pool["music"]
        ci_, cm_ = self.cls["image"], self.cls["music"]
        s = np.asarray(scores_m2i, np.float64)
        self.directions = {"i2m": ("image", class_per_query(s.T[np.ix_(pi, pc)], ci_[pi], cm_[pc])),
                           "m2i": ("music", class_per_query(s[np.ix_(pc, pi)], cm_[pc], ci_[pi]))}
        for name, side, intra in (("i2i", "image", scores_ii), ("m2m", "music", scores_mm)):
            if intra is not None:
                p, c = self.pool[side], self.cls[side]
                own = np.eye(len(p), dtype=bool)
                self.directions[name] = (side, class_per_query(np.asarray(intra, np.float64)[np.ix_(p, p)],
                                                               c[p], c[p], own=own))

    def row(self, ci: np.ndarray, ii: np.ndarray) -> tuple[dict[str, float], dict[str, int]]:
        """``cls_<direction>_<metric>`` of the drawn clips ``ci`` and images ``ii`` as queries (repeats kept;
        unclassed ones ignored), and the skipped queries per direction."""
        drawn = {"image": np.asarray(ii, np.intp), "music": np.asarray(ci, np.intp)}
        row, skipped = {}, {}
        for name, (side, (per_query, keep)) in self.directions.items():
            q = drawn[side][self.cls[side][drawn[side]] >= 0]
            pos = np.searchsorted(self.pool[side], q)
            k = keep[pos]
            skipped[name] = int((~k).sum())
            if k.any():
                row.update(_cls_columns(macro_average({m: v[pos[k]] for m, v in per_query.items()},
                                                      self.cls[side][q][k]), name))
        return row, skipped


def class_chance(query_cls: np.ndarray, cand_cls: np.ndarray, ks: tuple[int, ...] = KS,
                 intra: bool = False) -> dict[str, float]:
    """The exact expectation of :func:`class_retrieval` under a uniformly random ranking: E[P@k] =
    min(k, N) R / (N k), E[RR] = :func:`imem.metrics.expected_reciprocal_rank`, with R of the N candidates relevant; averaged alike.
    ``intra``: the queries are the candidates themselves, each query's own item excluded (N - 1, R - 1)."""
    query_cls, cand_cls = np.asarray(query_cls), np.asarray(cand_cls)
    drop = int(intra)
    r = {c: int((cand_cls == c).sum()) - drop for c in np.unique(query_cls)}
    q = query_cls[np.array([r[c] > 0 for c in query_cls], dtype=bool)] if len(query_cls) else query_cls
    n = len(cand_cls) - drop
    per_query = {f"p{k}": np.array([min(k, n) * r[c] / (n * k) for c in q]) for k in ks}
    per_query["mrr"] = np.array([expected_reciprocal_rank(n, r[c]) for c in q])
    return macro_average(per_query, q)


def class_codes(table: pd.DataFrame, side: str, split: str) -> np.ndarray:
    """Index into :data:`CLASSES` per row (image emotions mapped to the music taxonomy); -1 = dropped."""
    if "emotion" not in table.columns:
        raise ImemError(f"prepared {split} {'images' if side == 'image' else 'clips'} have no 'emotion' column: "
                        "Emo-CLIM needs categorical emotions (the embedded corpus has them)")
    emo = table["emotion"]
    names = emo.map(IMAGE_TO_MUSIC_EMOTION) if side == "image" else emo.where(emo.isin(CLASSES))
    return pd.Categorical(names, categories=CLASSES).codes.astype(np.int64)


def _cls_columns(metrics: dict[str, float], direction: str) -> dict[str, float]:
    return {f"cls_{direction}_{m}": v for m, v in metrics.items()}


# --- scoring on the split or on a bootstrap resample -------------------------------------------------------

def resample_row(scores_m2i: np.ndarray, truth: np.ndarray, image_cls: np.ndarray, clip_cls: np.ndarray,
                 ci: np.ndarray, ii: np.ndarray, threshold: float, ndcg_k: int = 10,
                 rankings: base.Rankings | None = None, classes: ClassRankings | None = None
                 ) -> tuple[dict[str, float], dict[str, int]]:
    """The model's row on a bootstrap draw of the split's clips ``ci`` and images ``ii`` (indices into its
    clip and image tables, an item drawn k times listed k times; ``np.arange`` of both for the full split),
    and the number of skipped queries per direction.

    The draw picks the *queries* only: each drawn query ranks the split's **whole** candidate pool
    (resampling the candidates too would put duplicated items into the top k and bias P@k, R@k and MRR).
    ``scores_m2i``: clips x images scores of the whole split; ``truth``: its true S; ``image_cls`` /
    ``clip_cls``: :func:`class_codes` of the whole split. ``cls_*``: :class:`ClassRankings` (``classes``;
    built from ``scores_m2i`` alone, the cross-modal directions, when not given): the classed items among
    the drawn ones as queries (repeats kept), all the split's classed items of the candidate modality as
    candidates, macro-averaged over the classes present among those queries; ``*_emb_*``:
    :func:`imem.methods.base.matching_resampled` (``rankings``: its per-query metrics of ``scores_m2i``,
    built once for many draws). With ``np.arange`` indices the row is the full split's. A column that is
    undefined on the draw (no query left; fewer than 2 clips or images in the split) is left out."""
    ci, ii = np.asarray(ci, np.intp), np.asarray(ii, np.intp)
    if classes is None:
        classes = ClassRankings(scores_m2i, image_cls, clip_cls)
    row, skipped = classes.row(ci, ii)
    if min(np.shape(scores_m2i)) >= 2:  # retrieval needs two candidates each way
        row.update(base.matching_resampled(scores_m2i if rankings is None else rankings, truth, "emb", threshold,
                                           ndcg_k, ci, ii))
    return row, skipped


def rescorer(scores_m2i: np.ndarray, truth: np.ndarray, image_cls: np.ndarray, clip_cls: np.ndarray,
             threshold: float, ndcg_k: int, columns: list[str], classes: ClassRankings | None = None):
    """``rescore(ci, ii) -> {LABEL: {column: value}}`` for :attr:`MethodResult.rescore`: :func:`resample_row`
    on one bootstrap draw, over the precomputed score matrices (no forward pass; ``classes`` as there), with
    exactly ``columns`` (the full-split row's); a column undefined on the draw is NaN."""
    scores_m2i, truth = np.asarray(scores_m2i, np.float64), np.asarray(truth, np.float64)
    image_cls, clip_cls = np.asarray(image_cls, np.int64), np.asarray(clip_cls, np.int64)
    columns = list(columns)
    ranks = base.Rankings(scores_m2i, truth, threshold, ndcg_k) if min(scores_m2i.shape) >= 2 else None
    if classes is None:
        classes = ClassRankings(scores_m2i, image_cls, clip_cls)

    def rescore(ci: np.ndarray, ii: np.ndarray) -> dict[str, dict[str, float]]:
        row, _ = resample_row(scores_m2i, truth, image_cls, clip_cls, ci, ii, threshold, ndcg_k, ranks, classes)
        return {LABEL: {c: float(row.get(c, math.nan)) for c in columns}}

    return rescore


# --- training and evaluation -----------------------------------------------------------------------------

def fit_evaluate(cfg: dict, data: MethodData, ctx: RunContext) -> MethodResult:
    """Train the two projection heads on train (best epoch by val loss) and score them on ``ctx.split``."""
    p = settings(cfg)
    seed = int(cfg["seed"])
    splits = list(dict.fromkeys(("train", "val", ctx.split)))
    # the backbones run (or load from the cache) with torch's own threads; the heads with cpu_threads
    feats = {side: {s: data.frozen(side, cfg[key], seed, s, device=cfg["device"], progress=ctx.progress)
                    for s in splits} for side, key in SIDES.items()}
    with base.torch_threads(p["cpu_threads"]):
        return _fit_evaluate(p, cfg, data, ctx, feats, splits)


def _fit_evaluate(p: dict, cfg: dict, data: MethodData, ctx: RunContext, feats: dict, splits: list[str]
                  ) -> MethodResult:
    from imem.training import _device

    seed, device = int(cfg["seed"]), _device(cfg["device"])
    codes = {side: {s: class_codes((data.images if side == "image" else data.clips)[s], side, s) for s in splits}
             for side in SIDES}
    dropped = {side: sum(int((codes[side][s] < 0).sum()) for s in splits) for side in SIDES}
    stats = {}
    for side in SIDES:
        x = feats[side]["train"]
        mean, std = base.feature_scale(x) if p["standardize"] else \
            (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
        stats[side] = {"mean": mean, "std": std}
        feats[side] = {s: ((f - mean) / std).to(device) for s, f in feats[side].items()}

    def labelled(side: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.as_tensor(codes[side][split] >= 0)
        return feats[side][split][keep.to(device)], torch.as_tensor(codes[side][split][keep.numpy()]).to(device)

    x_tr = {side: labelled(side, "train") for side in SIDES}
    x_va = {side: labelled(side, "val") for side in SIDES}
    for side, (x, _) in x_tr.items():
        if len(x) < 2:
            raise ImemError(f"Emo-CLIM: the train split has {len(x)} {side} items with a mapped emotion class (need 2)")

    torch.manual_seed(seed)
    heads = nn.ModuleDict({side: Projection(feats[side]["train"].shape[1], p["hidden"], p["proj_dim"], p["dropout"])
                           for side in SIDES}).to(device)
    opt = torch.optim.AdamW(heads.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    labels_tr = {side: x_tr[side][1].cpu() for side in SIDES}
    steps = math.ceil(len(x_tr["music"][0]) / p["batch_size"])

    def losses(xi, yi, xm, ym) -> dict[str, torch.Tensor]:
        terms = emo_clim_losses(heads["image"](xi), yi, heads["music"](xm), ym, p["temperature"])
        return {"total": weighted_total(terms, p["loss_weights"]), **terms}

    history, best, best_val, best_epoch = [], None, math.inf, 0
    bar = tqdm(range(1, p["epochs"] + 1), desc="Emo-CLIM", unit="epoch", disable=not ctx.progress)
    for epoch in bar:
        heads.train()
        sums = dict.fromkeys(("total", *TERMS), 0.0)
        for _ in range(steps):
            bi = balanced_batch(labels_tr["image"], p["batch_size"], gen).to(device)
            bm = balanced_batch(labels_tr["music"], p["batch_size"], gen).to(device)
            out = losses(x_tr["image"][0][bi], x_tr["image"][1][bi], x_tr["music"][0][bm], x_tr["music"][1][bm])
            opt.zero_grad()
            out["total"].backward()
            opt.step()
            for k, v in out.items():
                sums[k] += v.item() / steps
        heads.eval()
        with torch.no_grad():
            val = {k: float(v) for k, v in losses(*x_va["image"], *x_va["music"]).items()}
        row = {**{f"train/{k}": v for k, v in sums.items()}, **{f"val/{k}": v for k, v in val.items()}}
        if not all(math.isfinite(v) for v in row.values()):
            raise ImemError(f"Emo-CLIM: non-finite loss in epoch {epoch} (lower methods.emo_clim.lr)")
        history.append({"epoch": epoch, **row})
        ctx.log(row, epoch)
        if val["total"] < best_val:
            best_val, best_epoch, best = val["total"], epoch, copy.deepcopy(heads.state_dict())
        bar.set_postfix(train=f"{sums['total']:.4f}", val=f"{val['total']:.4f}")
    heads.load_state_dict(best)

    heads.eval()
    with torch.no_grad():
        z_img = heads["image"](feats["image"][ctx.split]).cpu().double().numpy()
        z_mus = heads["music"](feats["music"][ctx.split]).cpu().double().numpy()
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return 0.5 * (a @ b.T + 1.0)  # Emo-CLIM's retrieval similarity: 0.5 (cos + 1), unit vectors

    scores_m2i = similarity(z_mus, z_img)
    y_img, y_mus = codes["image"][ctx.split], codes["music"][ctx.split]
    truth = np.asarray(data.truth(ctx.split), np.float64)
    # cross-modal and intra-modal (sections 5.1.1-5.1.2, table 1) class rankings, computed once for the split and every
    # bootstrap resample
    classes = ClassRankings(scores_m2i, y_img, y_mus, similarity(z_img, z_img), similarity(z_mus, z_mus))
    model_row, skipped = resample_row(scores_m2i, truth, y_img, y_mus, np.arange(len(y_mus)), np.arange(len(y_img)),
                                      ctx.relevance_threshold, ctx.ndcg_k, classes=classes)
    rescore = rescorer(scores_m2i, truth, y_img, y_mus, ctx.relevance_threshold, ctx.ndcg_k, list(model_row),
                       classes=classes)
    ki, km = y_img >= 0, y_mus >= 0
    chance = {**_cls_columns(class_chance(y_img[ki], y_mus[km]), "i2m"),
              **_cls_columns(class_chance(y_mus[km], y_img[ki]), "m2i"),
              **_cls_columns(class_chance(y_img[ki], y_img[ki], intra=True), "i2i"),
              **_cls_columns(class_chance(y_mus[km], y_mus[km], intra=True), "m2m"),
              **{k: v for k, v in base.matching_chance(truth, ctx.relevance_threshold, ctx.ndcg_k).items()
                 if "_emb_" in k}}
    notes = {"best_epoch": best_epoch, "best_val_total": round(best_val, 6), "steps_per_epoch": steps,
             "n_dropped_items": dropped["image"] + dropped["music"], "n_dropped_images": dropped["image"],
             "n_dropped_clips": dropped["music"],
             **{f"skipped_{d}_queries": n for d, n in skipped.items()}}
    state = {"image_head": heads["image"].state_dict(), "music_head": heads["music"].state_dict(),
             "feature_stats": stats, "classes": CLASSES, "best_epoch": best_epoch}
    return MethodResult(rows={LABEL: model_row, CHANCE_ROW: chance}, history=history, state=state, notes=notes,
                        rescore=rescore)
