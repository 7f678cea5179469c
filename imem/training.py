"""Training a variant: data, the frozen-backbone cache, the epoch loop, checkpoints and resume.

Defaults follow the papers: SGD with momentum 0.9, lr 1e-3, StepLR x0.1 every 10 epochs, batch 128
(AdamW + cosine as an option). ``fc_only`` freezes the backbones: their outputs for every clip and image
are computed once (eval mode, no grad) and cached in memory, and the epochs run the heads and decoders
on that cache. That is the fast path, not an approximation: the frozen backbones would produce the
very same outputs every epoch.

Checkpoints (written atomically): ``best.pt`` (lowest validation total) and ``last.pt`` (with the
optimizer, scheduler, loss-combiner state and every RNG state), so ``resume`` continues a stopped run
and ends with the same weights and metrics as an uninterrupted one (CPU; tested).

Under ``torchrun --nproc-per-node N`` the ranks share every global batch (:mod:`imem.distributed`: the
model, wrapped in DistributedDataParallel, runs on a shard, the losses on the gathered batch, DDP averages
the gradients); only rank 0 writes
checkpoints and reports, logs to MLflow and calls ``on_epoch``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from imem import distributed as ddp
from imem.checkpoints import read_checkpoint, safe_load, save
from imem.errors import ImemError
from imem.features.store import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIT_DEFAULT_MEAN,
    VIT_DEFAULT_STD,
    FeatureStore,
    beats_fbank,
)
from imem.io import file_sha256, write_csv, write_json
from imem.losses import LOSS_NAMES, LossCombiner, LossSettings, NonFiniteLoss, cdcml_losses, mse, va_mse
from imem.metrics import regression
from imem.models.matching import MatchingModel, build_model

KINDS = ("matching", "unimodal_image", "unimodal_music")
SPLITS = ("train", "val", "test")


# --- configuration -------------------------------------------------------------------------------------

def variant_config(train_params: dict, variant: str) -> dict:
    """``train.common`` overridden by ``train.variants.<variant>``, encoder names resolved to their specs."""
    variants = train_params["variants"]
    if variant not in variants:
        raise ImemError(f"params: no variant {variant!r} under train.variants (have: {', '.join(variants)})")
    cfg = copy.deepcopy(train_params["common"])
    over = dict(variants[variant])
    unknown = sorted(set(over) - set(cfg) - {"kind", "image_encoder", "music_encoder", "image_head", "music_head"})
    if unknown:
        raise ImemError(f"params: unknown key 'train.variants.{variant}.{unknown[0]}'")
    cfg.update(over)
    from imem.params import Common, validate

    # a variant's overrides get the types and ranges of train.common, named by where they were set
    cfg.update(validate(Common, {k: v for k, v in cfg.items() if k in Common.model_fields}, "train.common",
                        keys_from={k: f"train.variants.{variant}" for k in over}))
    cfg["variant"] = variant
    if cfg.get("kind") not in KINDS:
        raise ImemError(f"params: train.variants.{variant}.kind = {cfg.get('kind')!r} is not one of: {', '.join(KINDS)}")
    for side in ("image", "music"):
        key = f"{side}_encoder"
        needed = cfg["kind"] in ("matching", f"unimodal_{side}")
        if not needed:
            cfg.pop(key, None)
            cfg.pop(f"{side}_head", None)
            continue
        name = cfg.get(key)
        if name not in train_params["encoders"]:
            raise ImemError(f"params: train.variants.{variant}.{key} = {name!r} is not under train.encoders "
                            f"(have: {', '.join(train_params['encoders'])})")
        cfg[key] = dict(train_params["encoders"][name], name=name)
        cfg.setdefault(f"{side}_head", "pool")
    unknown_w = sorted(set(cfg["loss_weights"]) - set(LOSS_NAMES))
    if unknown_w:
        raise ImemError(f"params: unknown loss 'train.common.loss_weights.{unknown_w[0]}' (known: {', '.join(LOSS_NAMES)})")
    return cfg


# --- data ----------------------------------------------------------------------------------------------

@dataclass
class SplitData:
    music_rows: torch.Tensor  # (P,) store rows of the pairs' clips
    image_rows: torch.Tensor
    score: torch.Tensor  # (P,)
    image_va: torch.Tensor  # (P, 2)
    music_va: torch.Tensor  # (P, 2)
    items_image: tuple[torch.Tensor, torch.Tensor]  # every image of the split: rows, VA
    items_music: tuple[torch.Tensor, torch.Tensor]

    def __len__(self) -> int:
        return len(self.score)


def load_split(prepare_dir: Path, store: FeatureStore, split: str) -> SplitData:
    d = Path(prepare_dir) / split
    if not (d / "pairs.csv").is_file():
        raise ImemError(f"no prepared split {split!r} in {prepare_dir} (run the prepare stage)")
    clips = pd.read_csv(d / "clips.csv", dtype={"clip_id": str, "song_id": str})
    images = pd.read_csv(d / "images.csv", dtype={"image_id": str})
    pairs = pd.read_csv(d / "pairs.csv", dtype={"clip_id": str, "image_id": str})
    pairs = pairs.merge(clips[["clip_id", "valence", "arousal"]], on="clip_id")
    pairs = pairs.merge(images[["image_id", "valence", "arousal"]], on="image_id", suffixes=("_m", "_i"))

    def t(x, dtype=torch.float32):
        return torch.as_tensor(np.array(x), dtype=dtype)

    return SplitData(
        music_rows=t(store.clip_rows(pairs["clip_id"]), torch.long),
        image_rows=t(store.image_rows(pairs["image_id"]), torch.long),
        score=t(pairs["score"]),
        image_va=t(pairs[["valence_i", "arousal_i"]].to_numpy()),
        music_va=t(pairs[["valence_m", "arousal_m"]].to_numpy()),
        items_image=(t(store.image_rows(images["image_id"]), torch.long), t(images[["valence", "arousal"]].to_numpy())),
        items_music=(t(store.clip_rows(clips["clip_id"]), torch.long), t(clips[["valence", "arousal"]].to_numpy())),
    )


def image_normalisation(spec: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std for an image encoder: a ViT's from its pretrained directory's
    ``preprocessor_config.json`` (``image_mean`` / ``image_std``) when there is one, else ViTImageProcessor's
    default (0.5, that of google's ViT checkpoints); every other encoder ImageNet's (torchvision's weights)."""
    if spec.get("type") != "vit":
        return IMAGENET_MEAN, IMAGENET_STD
    pre = spec.get("pretrained")
    cfg_path = Path(pre) / "preprocessor_config.json" if pre else None
    if cfg_path is None or not cfg_path.is_file():
        return VIT_DEFAULT_MEAN, VIT_DEFAULT_STD
    try:
        cfg = json.loads(cfg_path.read_text())
        mean, std = tuple(float(v) for v in cfg["image_mean"]), tuple(float(v) for v in cfg["image_std"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImemError(f"{cfg_path}: no usable image_mean / image_std ({exc})") from exc
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ImemError(f"{cfg_path}: image_mean / image_std must be 3 values each, std > 0")
    return mean, std


class Inputs:
    """Model inputs from the feature store for an encoder spec (ResNet/ViT/L3 images; handcrafted matrix for
    ResNet and ACP statistics, BEATs fbank, L3 log-mel)."""

    def __init__(self, store: FeatureStore, spec: dict, side: str):
        self.store, self.side, self.type, self.spec = store, side, spec["type"], spec
        self.image_size = (int(spec.get("image_size", 224 if self.type == "vit" else 48))
                           if self.type in ("vit", "l3") else None)
        if self.type == "l3" and spec.get("modality", "vision") != ("vision" if side == "image" else "audio"):
            raise ImemError(f"params: the l3 encoder {spec.get('name', '')!r} has modality {spec.get('modality')!r}, "
                            f"which cannot take {side} input")
        if self.type == "handcrafted_stats" and side != "music":
            raise ImemError("params: a handcrafted_stats encoder takes music input only")
        self.mean, self.std = image_normalisation(spec) if side == "image" else (None, None)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.numpy()
        if self.side == "image":
            x = self.store.image_batch(rows, mean=self.mean, std=self.std)
            if self.image_size and x.shape[-1] != self.image_size:
                x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                                    antialias=True, align_corners=False)
            return x
        if self.type == "beats":
            return beats_fbank(self.store.waveform(rows, 16000))
        if self.type in ("resnet", "handcrafted_stats"):
            return self.store.handcrafted(rows, tile=self.type == "resnet")
        if self.type == "l3":
            from imem.models.encoders import l3_log_mel

            return l3_log_mel(self.store.waveform(rows, 16000), int(self.spec.get("n_mels", 64)),
                              float(self.spec.get("hop_ms", 20.0)))
        raise ImemError(f"params: a {self.type} encoder cannot take music input (use resnet, beats, l3 or handcrafted_stats)")


@torch.no_grad()
def backbone_cache(backbone: torch.nn.Module, fetch: Inputs, rows: torch.Tensor, batch_size: int,
                   device: torch.device, desc: str, progress: bool,
                   reduce=None) -> tuple[torch.Tensor, dict[int, int]]:
    """Frozen-backbone outputs for the unique ``rows``: (n, ...) float32 on CPU and row -> index.
    ``reduce``: applied to each batch's outputs before they are kept (a head's parameter-free token
    selection, :meth:`imem.models.encoders.Head.reduce`), so a CLS head's cache holds one token per item
    instead of the whole sequence (issue 14: 197x less memory at IMEMNet scale)."""
    uniq = torch.unique(rows)
    backbone.eval()
    outs = []
    store = getattr(fetch, "store", None)  # its memory maps' pages are dropped after each batch (FeatureStore.release)
    # image and spectrogram batches (4-D) run channels-last: oneDNN's faster convolutions (ResNet50 over 4,000
    # images on 2 cores: 8.2 min against 10.7); the weights go back to the default layout afterwards
    channels_last = False
    try:
        for start in tqdm(range(0, len(uniq), batch_size), desc=desc, unit="batch", disable=not progress):
            x = fetch(uniq[start:start + batch_size]).to(device)
            if x.dim() == 4:
                if not channels_last:
                    backbone.to(memory_format=torch.channels_last)
                    channels_last = True
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                out = backbone(x).float()
            outs.append((reduce(out) if reduce is not None else out).cpu())
            if store is not None:
                store.release()
    finally:
        if channels_last:
            backbone.to(memory_format=torch.contiguous_format)
    return torch.cat(outs), {int(r): i for i, r in enumerate(uniq.tolist())}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ImemError(f"params: train.common.device = {name!r} but CUDA is not available")
    return torch.device(name)


# --- the loop ---------------------------------------------------------------------------------------------

def reinit_after_backbones(model: torch.nn.Module, backbones: list[torch.nn.Module]) -> int:
    """Fresh default initialisation (``reset_parameters``, from torch's global RNG) of every module of
    ``model`` outside ``backbones``; returns how many modules were reset."""
    inside = {id(m) for bb in backbones for m in bb.modules()}
    n = 0
    for m in model.modules():
        if id(m) not in inside and hasattr(m, "reset_parameters"):
            m.reset_parameters()
            n += 1
    return n


def seed_runs(cfg: dict) -> list[dict]:
    """The configs of a variant's training seeds: ``seed``, ``seed + 1``, ... (``n_seeds`` of them)."""
    n = int(cfg.get("n_seeds", 1))
    return [dict(cfg, train_seed=int(cfg["seed"]) + k) for k in range(n)]


def seed_dir(base: str | Path, cfg: dict) -> Path:
    """Where a seed's checkpoints go: ``base`` for the first (``models/<variant>``, what predict/retrieve
    use), ``base/seeds/<train_seed>`` for the others."""
    ts = int(cfg.get("train_seed", cfg["seed"]))
    return Path(base) if ts == int(cfg["seed"]) else Path(base) / "seeds" / str(ts)


class Trainer:
    def __init__(self, cfg: dict, prepare_dir: str | Path, features_dir: str | Path, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.device = _device(cfg["device"])
        torch.manual_seed(int(cfg["seed"]))
        self.kind = cfg["kind"]
        self.store = FeatureStore(features_dir)
        self.data = {s: load_split(Path(prepare_dir), self.store, s) for s in SPLITS}
        for s, d in self.data.items():
            n = len(d) if cfg["kind"] == "matching" else len(self._items(d)[0])
            if n < 2:
                raise ImemError(f"split {s!r} has {n} training examples for variant {cfg['variant']}: need at least 2")
        self.model = build_model(cfg).to(self.device)
        self.sides = {"matching": ("image", "music"), "unimodal_image": ("image",), "unimodal_music": ("music",)}[self.kind]
        self.backbones = {side: self._backbone(side) for side in self.sides}
        # One of several training seeds (issue 14; train.common.n_seeds): the backbones stay the ones built
        # from ``seed`` (they stand in for pretrained weights, the same for every seed), everything after them
        # (heads, decoders), the batch order and dropout draw from ``train_seed``.
        self.train_seed = int(cfg.get("train_seed", cfg["seed"]))
        if self.train_seed != int(cfg["seed"]):
            torch.manual_seed(self.train_seed)
            # a backbone trained from scratch (fc_only: false without pretrained weights) is part of what the
            # seed draws; a frozen or pretrained one is not
            scratch = not cfg["fc_only"] and not any(cfg[f"{s}_encoder"].get("pretrained") for s in self.sides)
            reinit_after_backbones(self.model, [] if scratch else list(self.backbones.values()))
        self.fetch = {side: Inputs(self.store, cfg[f"{side}_encoder"], side) for side in self.sides}
        self.fc_only = bool(cfg["fc_only"])
        if self.fc_only:
            for bb in self.backbones.values():
                for p in bb.parameters():
                    p.requires_grad_(False)
        self.combiner = LossCombiner(cfg["loss_mode"], cfg["loss_weights"])
        self.loss_settings = LossSettings.from_config(cfg)
        names = LOSS_NAMES if self.kind == "matching" else (f"va_{self.sides[0]}",)
        self.active = self.combiner.active(names)
        if not self.active:
            raise ImemError("params: every loss weight is 0: nothing to train")
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.dist = ddp.active()
        self.step_module = ddp.wrap(_ShardStep(self.model, self.sides, self.fc_only, self._needed_outputs()),
                                    self.device) if self.dist else None
        if cfg["optimizer"] == "sgd":
            self.opt = torch.optim.SGD(params, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                                       weight_decay=float(cfg["weight_decay"]))
        elif cfg["optimizer"] == "adamw":
            self.opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        else:
            raise ImemError(f"params: train optimizer {cfg['optimizer']!r} is not one of: sgd, adamw")
        if cfg["scheduler"] == "step":
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, int(cfg["step_size"]), float(cfg["gamma"]))
        elif cfg["scheduler"] == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, int(cfg["epochs"]))
        else:
            raise ImemError(f"params: train scheduler {cfg['scheduler']!r} is not one of: step, cosine")
        self.gen = torch.Generator().manual_seed(self.train_seed)
        self.cache: dict[str, tuple[torch.Tensor, dict]] = {}
        self.epoch = 0
        self.history: list[dict] = []
        self.best = {"val_total": math.inf, "epoch": -1}

    def threads(self):
        """torch CPU threads for the epochs and predictions: ``cpu_threads`` when the backbones are frozen
        and cached on the CPU (small heads), torch's own count otherwise (0: unchanged)."""
        from imem.runtime import torch_threads

        n = int(self.cfg.get("cpu_threads", 0))
        return torch_threads(n if self.fc_only and self.device.type == "cpu" else 0)

    def _backbone(self, side: str) -> torch.nn.Module:
        m = self.model
        return (m.image_backbone if side == "image" else m.music_backbone) if isinstance(m, MatchingModel) else m.backbone

    def _head(self, side: str):
        m = self.model
        return (m.image_head if side == "image" else m.music_head) if isinstance(m, MatchingModel) else m.head

    def _items(self, d: SplitData):
        return d.items_image if self.kind == "unimodal_image" else d.items_music

    def build_cache(self, splits: tuple[str, ...] = SPLITS, memo: dict | None = None) -> float:
        """Frozen-backbone outputs for every row the given splits use; returns the seconds it took.
        ``memo``: a dict kept by the caller across trainers (tuning trials), or the on-disk
        :class:`imem.features.frozen.BackboneMemo` (train stages, methods): an entry is reused when the
        backbone's weights, its input spec, the feature store and the rows are the same (:func:`cache_key`)."""
        t0 = time.perf_counter()
        data = [self.data[s] for s in splits]
        for side in self.sides:
            rows = torch.cat([getattr(d, f"{side}_rows") if self.kind == "matching" else self._items(d)[0]
                              for d in data] + [getattr(d, f"items_{side}")[0] for d in data])
            head = self._head(side)
            key = (cache_key(self.backbones[side], self.cfg[f"{side}_encoder"], self.store, rows, head.reduction,
                             int(self.cfg["cache_batch_size"])) if memo is not None else None)
            hit = memo.get(key) if key is not None else None
            if hit is not None:
                self.cache[side] = hit
                continue
            self.cache[side] = backbone_cache(self.backbones[side], self.fetch[side], rows, int(self.cfg["cache_batch_size"]),
                                              self.device, f"{self.cfg['variant']}: {side} backbone cache", self.progress,
                                              head.reduce if head.reduction != "none" else None)
            if key is not None:
                memo[key] = self.cache[side]
        return time.perf_counter() - t0

    def _h(self, side: str, rows: torch.Tensor) -> torch.Tensor:
        if self.fc_only:
            feats, index = self.cache[side]
            return feats[torch.tensor([index[int(r)] for r in rows])].to(self.device)
        return self.backbones[side](self.fetch[side](rows).to(self.device))

    def _step_batches(self, n: int, shuffle: bool) -> list[torch.Tensor]:
        order = torch.randperm(n, generator=self.gen) if shuffle else torch.arange(n)
        bs = int(self.cfg["batch_size"])
        batches = [order[i:i + bs] for i in range(0, n, bs)]
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm needs >= 2 samples in training mode
            batches[-2] = torch.cat([batches[-2], batches.pop()])
        return batches

    def _losses(self, d: SplitData, idx: torch.Tensor, shard: bool = False) -> dict:
        dev = self.device
        if shard and self.dist:
            return self._sharded_losses(d, idx)
        if self.kind == "matching":
            with _autocast(dev):
                out = self.model.heads(self._h("image", d.image_rows[idx]), self._h("music", d.music_rows[idx]))
            batch = {"image_va": d.image_va[idx].to(dev), "music_va": d.music_va[idx].to(dev), "score": d.score[idx].to(dev)}
            return cdcml_losses(out, batch, self.loss_settings, self.active)
        rows, va = self._items(d)
        with _autocast(dev):
            out = self.model.heads(self._h(self.sides[0], rows[idx]))
        return {self.active[0]: va_mse(out["va"].float(), va[idx].to(dev))}

    def _x(self, side: str, rows: torch.Tensor) -> torch.Tensor:
        """The backbone's input (full fine-tuning) or its cached output (``fc_only``) for ``rows``."""
        if self.fc_only:
            return self._h(side, rows)
        return self.fetch[side](rows).to(self.device)

    def _needed_outputs(self) -> tuple[str, ...]:
        """The outputs of ``model.heads`` that the active losses read."""
        if self.kind != "matching":
            return ("va",)
        need = {"cfr": ("f_image", "f_music"), "cfm": ("f_image", "f_music"), "sfr_image": ("f_image",),
                "sfr_music": ("f_music",), "sim": ("sim",), "va_image": ("va_image",), "va_music": ("va_music",)}
        keys = {k for name in self.active for k in need[name]}
        return tuple(k for k in ("f_image", "f_music", "sim", "va_image", "va_music") if k in keys)

    def _sharded_losses(self, d: SplitData, idx: torch.Tensor) -> dict:
        """The global batch's losses, the model (DistributedDataParallel) run on this rank's shard only and
        its outputs gathered (see imem.distributed)."""
        dev = self.device
        local, sizes = ddp.shard(idx)
        if self.kind == "matching":
            with _autocast(dev):
                out = self.step_module(self._x("image", d.image_rows[local]), self._x("music", d.music_rows[local]))
            out = {k: ddp.gather_rows(v, sizes) for k, v in out.items()}
            batch = {"image_va": d.image_va[idx].to(dev), "music_va": d.music_va[idx].to(dev), "score": d.score[idx].to(dev)}
            return cdcml_losses(out, batch, self.loss_settings, self.active)
        rows, va = self._items(d)
        with _autocast(dev):
            pred = ddp.gather_rows(self.step_module(self._x(self.sides[0], rows[local]))["va"], sizes)
        return {self.active[0]: va_mse(pred.float(), va[idx].to(dev))}

    def _n(self, d: SplitData) -> int:
        return len(d) if self.kind == "matching" else len(self._items(d)[0])

    def run_epoch(self) -> dict:
        t0 = time.perf_counter()
        self.model.train()
        if self.fc_only:
            for bb in self.backbones.values():
                bb.eval()
        sums: dict[str, float] = {}
        n_seen = 0
        d = self.data["train"]
        for idx in self._step_batches(self._n(d), shuffle=True):
            losses = self._losses(d, idx, shard=True)
            try:
                total = self.combiner(losses)
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(f"variant {self.cfg['variant']}, epoch {self.epoch + 1}: {exc}") from exc
            self.opt.zero_grad(set_to_none=True)
            total.backward()  # distributed: DDP's reducer averages the gradients over ranks here
            self.opt.step()
            if self.dist:
                ddp.average_buffers(self.model)
            for k, v in {**losses, "total": total}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
            n_seen += len(idx)
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        row = {"epoch": self.epoch + 1, "lr": lr}
        row.update({f"train/{k}": v / n_seen for k, v in sums.items()})
        row.update({f"val/{k}": v for k, v in self.evaluate_losses("val").items()})
        self.epoch += 1
        self.history.append(row)
        return {**row, "epoch_seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate_losses(self, split: str) -> dict:
        self.model.eval()
        d = self.data[split]
        sums: dict[str, float] = {}
        n = 0
        for idx in self._step_batches(self._n(d), shuffle=False):
            losses = self._losses(d, idx)
            total = self.combiner(losses)
            for k, v in {**losses, "total": total}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            n += len(idx)
        return {k: v / n for k, v in sums.items()}

    @torch.no_grad()
    def predict_va(self, side: str, rows: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        outs = []
        for start in range(0, len(rows), 256):
            h = self._h(side, rows[start:start + 256])
            if isinstance(self.model, MatchingModel):
                f = self.model.image_head(h) if side == "image" else self.model.music_head(h)
                outs.append((self.model.va_image if side == "image" else self.model.va_music)(f).float().cpu())
            else:
                outs.append(self.model.heads(h)["va"].float().cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def embed(self, side: str, rows: torch.Tensor) -> torch.Tensor:
        """The head outputs f_I / f_M (the shared embedding space) for item rows of one modality."""
        self.model.eval()
        head = self._head(side)
        return torch.cat([head(self._h(side, rows[i:i + 256])).float().cpu() for i in range(0, len(rows), 256)])

    @torch.no_grad()
    def predict_sim(self, d: SplitData) -> torch.Tensor:
        self.model.eval()
        outs = []
        for start in range(0, len(d), 256):
            sl = slice(start, start + 256)
            out = self.model.heads(self._h("image", d.image_rows[sl]), self._h("music", d.music_rows[sl]))
            outs.append(out["sim"].float().cpu())
        return torch.cat(outs)

    def _targets(self, split: str) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        """Per target (sim, then each side's valence and arousal) on ``split``: (name, prediction, truth, the
        training set's mean of the truth: the mean predictor's constant)."""
        tr, d = self.data["train"], self.data[split]
        out = []
        if self.kind == "matching":
            out.append(("sim", self.predict_sim(d), d.score, float(tr.score.mean())))
        for side in self.sides:
            rows, va = getattr(d, f"items_{side}")
            _, va_tr = getattr(tr, f"items_{side}")
            pred = self.predict_va(side, rows)
            out += [(f"{side}_{dim}", pred[:, j], va[:, j], float(va_tr[:, j].mean()))
                    for j, dim in enumerate(("valence", "arousal"))]
        return out

    def mse_report(self, split: str) -> dict:
        """MSE of the model and of the mean predictor (training-set means) on ``split``, per target."""
        return {f"{name}_mse": (float(mse(pred, true)), float(mse(torch.full_like(true, mean), true)))
                for name, pred, true, mean in self._targets(split)}

    def error_table(self, split: str) -> pd.DataFrame:
        """Per target: MSE and MAE of the model and of the mean predictor on ``split``, as evaluation's
        regression table reports them (a tuning trial's table)."""
        out = []
        for name, pred, true, mean in self._targets(split):
            true = true.double().cpu().numpy()
            model, base = regression(pred.double().cpu().numpy(), true), regression(np.full_like(true, mean), true)
            out.append({"split": split, "target": name, "mse": model["mse"], "mae": model["mae"],
                        "mean_predictor_mse": base["mse"], "mean_predictor_mae": base["mae"]})
        return pd.DataFrame(out)

    # --- checkpoints -----------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "combiner": self.combiner.state_dict(), "epoch": self.epoch, "history": self.history, "best": self.best,
                "torch_rng": torch.get_rng_state(), "generator": self.gen.get_state(), "config": self.cfg}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.combiner.load_state_dict(state["combiner"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        torch.set_rng_state(state["torch_rng"])
        self.gen.set_state(state["generator"])


class _ShardStep(torch.nn.Module):
    """What DistributedDataParallel wraps: the backbones (unless frozen: ``fc_only`` feeds their cached
    outputs) and ``model.heads`` on this rank's shard. It returns only the outputs the active losses read,
    so DDP can tell which parameters get no gradient (a head or decoder whose loss weight is 0)."""

    def __init__(self, model: torch.nn.Module, sides: tuple[str, ...], fc_only: bool, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.sides, self.fc_only, self.keys = model, sides, fc_only, keys

    def forward(self, *xs: torch.Tensor) -> dict:
        m = self.model
        if not self.fc_only:
            bbs = ((m.image_backbone, m.music_backbone) if isinstance(m, MatchingModel) else (m.backbone,))
            xs = tuple(bb(x) for bb, x in zip(bbs, xs, strict=True))
        out = m.heads(*xs)
        return {k: out[k] for k in self.keys}


# The numerical recipe of backbone_cache (channels-last 4-D batches): part of the memo key, so entries written by
# an earlier recipe miss instead of feeding training features that differ in the last bits (up to 4e-5).
BACKBONE_PASS = "channels-last-1"


def cache_key(backbone: torch.nn.Module, spec: dict, store: FeatureStore, rows: torch.Tensor,
              reduction: str = "none", batch_size: int = 0) -> tuple:
    """What a frozen backbone's cached outputs depend on: its weights, its input spec, the feature store
    (path and manifest), the rows, the torch version and device, the head's token reduction
    (:attr:`imem.models.encoders.Head.reduction`; see :class:`imem.features.frozen.BackboneMemo`), and what
    changes their float rounding: the batch size, the thread count and the pass's recipe (a train stage and a
    method with another batch size used to share one entry, so a stage's numbers depended on which ran first)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    rows_digest = hashlib.sha256(torch.unique(rows).numpy().tobytes()).hexdigest()
    return (h.hexdigest(), json.dumps([spec, image_normalisation(spec)], sort_keys=True), str(store.dir.resolve()),
            json.dumps(store.manifest, sort_keys=True), rows_digest, torch.__version__, _module_device(backbone),
            reduction, int(batch_size), torch.get_num_threads(), BACKBONE_PASS)


def _module_device(m: torch.nn.Module) -> str:
    """``cpu`` or ``cuda`` (bf16 autocast there: different outputs, so a different cache entry)."""
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device.type
    return "cpu"


def train_variant(cfg: dict, prepare_dir: str | Path, features_dir: str | Path, model_dir: str | Path,
                  report_dir: str | Path, resume: bool = False, stop_after: int | None = None,
                  track: bool = True, progress: bool = True, on_epoch=None, cache_memo: dict | None = None,
                  on_finish=None) -> dict:
    """Train one variant end to end; returns the final report. ``stop_after``: leave after that many
    epochs of this call (an interruption, for resume tests). ``on_epoch(row)``: a hook (Optuna pruning).
    ``cache_memo``: see :meth:`Trainer.build_cache`. ``on_finish(trainer, report)``: called once a run has
    finished its epochs, with the best checkpoint's weights loaded (a tuning trial logs its tables and
    checkpoint). Under torchrun only rank 0 writes, logs and calls the hooks; if ``on_epoch`` raises there,
    every rank stops."""
    with ddp.session(_device(cfg["device"])):
        main = ddp.is_main()
        return _train(cfg, Path(prepare_dir), Path(features_dir), Path(model_dir), Path(report_dir), resume,
                      stop_after, track and main, progress and main, on_epoch, cache_memo, main, on_finish)


def train_seeds(cfg: dict, prepare_dir: str | Path, features_dir: str | Path, model_dir: str | Path,
                report_dir: str | Path, resume: bool = False, track: bool = True, progress: bool = True,
                cache_memo: dict | None = None) -> list[dict]:
    """Every training seed of a variant (``n_seeds``; :func:`seed_runs`): the first into ``model_dir`` and
    ``report_dir``, the others into ``model_dir/seeds/<train_seed>/`` (checkpoints, history, metrics).
    ``resume`` continues each seed from its ``last.pt`` (the first seed must have one; a later seed without
    one starts fresh: it had not begun); without it, seed directories that ``n_seeds`` no longer names are
    removed. Under torchrun all seeds share one process group (opening and closing one per seed would reuse
    the rendezvous keys) and only rank 0 removes directories."""
    import shutil

    if isinstance(cfg.get("n_seeds", 1), bool) or int(cfg.get("n_seeds", 1)) < 1:
        raise ImemError(f"params: train n_seeds = {cfg.get('n_seeds')!r}: must be an integer >= 1")
    runs = seed_runs(cfg)
    if resume and not (Path(model_dir) / "last.pt").is_file():
        raise ImemError(f"--resume: no checkpoint at {Path(model_dir) / 'last.pt'}")
    wanted = {seed_dir(model_dir, c) for c in runs}
    reports = []
    with ddp.session(_device(cfg["device"])):
        if not resume and (Path(model_dir) / "seeds").is_dir() and ddp.is_main():
            for d in (Path(model_dir) / "seeds").iterdir():
                if d not in wanted:
                    shutil.rmtree(d)
        if ddp.active():
            ddp.barrier()
        for c in runs:
            d = seed_dir(model_dir, c)
            first = d == Path(model_dir)
            reports.append(train_variant(c, prepare_dir, features_dir, d, report_dir if first else d,
                                         resume=resume and (d / "last.pt").is_file(), track=track,
                                         progress=progress, cache_memo=cache_memo))
    return reports


def _train(cfg, prepare_dir, features_dir, model_dir, report_dir, resume, stop_after, track, progress, on_epoch,
           cache_memo, main, on_finish=None) -> dict:
    trainer = Trainer(cfg, prepare_dir, features_dir, progress)
    last = model_dir / "last.pt"
    if resume and last.is_file():
        state = safe_load(last, "training state")
        check_resume_config(state.get("config", {}), cfg, last)
        trainer.load_state(state)
        if progress:
            print(f"resuming {cfg['variant']} from {last} after epoch {trainer.epoch} of {cfg['epochs']}, "
                  "with the config it was started with", file=sys.stderr)
    elif resume:
        raise ImemError(f"--resume: no checkpoint at {last}")
    # The run that wrote last.pt is found by last.pt's content hash: the checkpoint itself holds no run id, so
    # identical trainings keep byte-identical checkpoints (DVC hashes). Before each write of last.pt its run is
    # tagged with the new hash (imem.last_sha256) and the one it replaces (imem.prev_last_sha256): a kill between
    # the tag and the rename leaves the previous file, found by the second.
    sha = file_sha256(last) if resume else ""
    resume_tags = [{"imem.last_sha256": sha}, {"imem.prev_last_sha256": sha}] if resume else None

    def tag(new: str) -> None:  # what --resume looks the run up by (see above)
        nonlocal sha
        if track:
            import mlflow

            mlflow.set_tags({"imem.prev_last_sha256": sha, "imem.last_sha256": new})
        sha = new

    with _tracking(cfg, track, resume_tags) as run:
        if run is not None and resume and sha not in (run.data.tags.get("imem.last_sha256"),
                                                      run.data.tags.get("imem.prev_last_sha256")):
            for row in trainer.history:  # a new run (the store lost the old one): it gets the whole history
                _log({k: v for k, v in row.items() if k != "epoch"}, row["epoch"], track)
        cache_s = trainer.build_cache(memo=cache_memo) if trainer.fc_only else 0.0
        _log({"cache_seconds": cache_s}, 0, track)
        epochs = int(cfg["epochs"])
        done = 0
        bar = tqdm(total=epochs, initial=trainer.epoch, desc=f"train {cfg['variant']}", unit="epoch", disable=not progress)
        while trainer.epoch < epochs and (stop_after is None or done < stop_after):
            with trainer.threads():
                row = trainer.run_epoch()
            done += 1
            bar.update(1)
            bar.set_postfix({"train": f"{row['train/total']:.4f}", "val": f"{row['val/total']:.4f}"})
            _log({k: v for k, v in row.items() if k != "epoch"}, row["epoch"], track)
            if row["val/total"] < trainer.best["val_total"]:
                trainer.best = {"val_total": row["val/total"], "epoch": row["epoch"]}
                if main:
                    save({"model": trainer.model.state_dict(), "config": cfg, "epoch": row["epoch"]}, model_dir / "best.pt")
            if main:
                save(trainer.state(), last, before_write=tag)
            _epoch_hook(on_epoch, row, main, trainer.dist)
        bar.close()
        report = {"variant": cfg["variant"], "epochs": trainer.epoch, "best_epoch": trainer.best["epoch"],
                  "best_val_total": trainer.best["val_total"], "finished": trainer.epoch >= epochs}
        if not main:  # rank 0 evaluates and writes; the others wait for it
            ddp.barrier()
            return report
        hist = pd.DataFrame(trainer.history)
        write_csv(report_dir / "history.csv", hist, float_format="%.6g")
        if report["finished"]:
            best = read_checkpoint(model_dir / "best.pt")
            trainer.model.load_state_dict(best["model"])
            for split in ("val", "test"):
                with trainer.threads():
                    mse = trainer.mse_report(split)
                for name, (model_v, mean_v) in mse.items():
                    report[f"{split}/{name}"] = round(model_v, 6)
                    report[f"{split}/{name}_mean_predictor"] = round(mean_v, 6)
                    report[f"{split}/{name}_margin"] = round(mean_v - model_v, 6)
            write_json(report_dir / "metrics.json", report)
            if track:
                _finish_run(trainer, report, model_dir, report_dir)
            if on_finish is not None:
                on_finish(trainer, report)
        if trainer.dist:
            ddp.barrier()
    return report


class StoppedByRank0(ImemError):
    """Raised on the other ranks when rank 0's ``on_epoch`` hook stopped training (a pruned trial)."""


def _epoch_hook(on_epoch, row: dict, main: bool, dist: bool) -> None:
    """Rank 0 runs the hook; with several ranks its outcome (go on / stop) is broadcast to all."""
    if not dist:
        if on_epoch is not None:
            on_epoch(row)
        return
    error = None
    if main and on_epoch is not None:
        try:
            on_epoch(row)
        except BaseException as exc:  # noqa: B036 -- re-raised below, after telling the other ranks
            error = exc
    if ddp.broadcast_flag(int(error is not None)):
        if error is not None:
            raise error
        raise StoppedByRank0(f"rank 0 stopped training after epoch {row['epoch']} (its on_epoch hook raised: a pruned trial)")


# Keys that may differ on --resume: they change where and how fast, not what is computed.
RESUME_FREE = ("cpu_threads",)


def check_resume_config(saved: dict, cfg: dict, path: Path) -> None:
    """``--resume`` continues the exact config that ``last.pt`` was started with (issue 16 item 5): a changed
    key (an lr, more epochs, another optimizer) would silently mix two configs, so it is one error naming
    the keys. Only :data:`RESUME_FREE` keys may change."""
    import json

    def norm(v):
        return json.dumps(v, sort_keys=True, default=str)

    changed = [k for k in sorted(set(saved) | set(cfg)) if k not in RESUME_FREE
               and norm(saved.get(k, "<absent>")) != norm(cfg.get(k, "<absent>"))]
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k, '<absent>')!r} -> {cfg.get(k, '<absent>')!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ImemError(f"--resume: params changed since {path} was written: {shown}{more}; a resume continues the "
                        "exact config: restore them, or train afresh without --resume")


def _tracking(cfg: dict, track: bool, resume_tags: dict | list[dict] | None = None):
    import contextlib

    if not track:
        return contextlib.nullcontext()
    from imem.tracking import mlflow_run

    ts = int(cfg.get("train_seed", cfg["seed"]))
    name = cfg["variant"] if ts == int(cfg["seed"]) else f"{cfg['variant']} (training seed {ts})"
    return mlflow_run("imem-train", name, {**cfg, "corpus": cfg.get("corpus", "")},
                      tags={"imem.variant": cfg["variant"], "imem.train_seed": str(ts)}, resume_tags=resume_tags)


def _log(metrics: dict, step: int, track: bool) -> None:
    if track:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def _finish_run(trainer: Trainer, report: dict, model_dir: Path, report_dir: Path) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and "/" in k})
    # the checkpoint's content hash lets the evaluate/visualize stages find this run again (imem.evaluation)
    mlflow.set_tag("imem.best_sha256", file_sha256(model_dir / "best.pt"))
    for f in ("best.pt", "last.pt"):
        mlflow.log_artifact(str(model_dir / f), artifact_path="checkpoints")
    mlflow.log_artifact(str(report_dir / "history.csv"))
    mlflow.log_artifact(str(report_dir / "metrics.json"))
    log_pyfunc(model_dir / "best.pt", trainer.store._image_size())


def log_pyfunc(checkpoint: Path, image_size: int) -> None:
    """The active run's ``model/``: the pyfunc of imem/mlflow_model.py (models from code, nothing pickled)
    with ``checkpoint`` as its artifact; ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` use it. Its
    signature comes from the model's type hints (a list of file paths in, a list of row dicts out)."""
    import mlflow

    import imem

    mlflow.pyfunc.log_model(name="model", python_model=str(Path(imem.__file__).parent / "mlflow_model.py"),
                            artifacts={"checkpoint": str(checkpoint)}, model_config={"image_size": int(image_size)},
                            pip_requirements=[f"imem=={imem.__version__}"])
