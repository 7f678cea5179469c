"""Reading ``params.yaml`` sections with defaults and strict key checking.

Every section has a schema of defaults; a key the schema does not know is an error naming it
(``prepare.pairs.topp``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from imem.errors import ImemError

SYNTH = {
    "seed": 20201012,
    "out": "data",
    "n_songs": 100,
    "n_long_songs": 3,
    "long_song_seconds": [60, 100],
    "sample_rate": 44100,
    "n_iaps": 240,
    "n_naps": 120,
    "n_emotic": 120,
    "image_width": 320,
    "image_height": 240,
    "label_noise": 0.08,
}

PREPARE = {
    "seed": 42,
    "corpus_root": "data",
    "music": {"format": "deam", "dir": "DEAM"},
    "images": [{"format": "iaps", "dir": "IAPS"}, {"format": "naps", "dir": "NAPS"},
               {"format": "emotic", "dir": "EMOTIC"}],
    "normalization": "data",
    "clip_seconds": 2.0,
    "check_media": True,
    "split": {"train": 0.8, "val": 0.05, "test": 0.15},
    "pairs": {
        "source": "sample",
        "top": 10,
        "bottom": 10,
        "random": 30,
        "keep_fraction": 0.1,
        "imemnet_dir": "IMEMNet",
        "chunk_size": 512,
    },
}

FEATURES = {
    "clip_seconds": 2.0,
    "handcrafted": True,
    "waveform_rates": [16000],
    "image_size": 224,
    "batch_size": 16,
    "short_clip": "error",
    "device": "cpu",
    "image_workers": 2,
}

TRAIN = {
    "common": {
        "seed": 1,
        "n_seeds": 1,
        "device": "cpu",
        "epochs": 20,
        "batch_size": 128,
        "fc_only": True,
        "cache_batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.001,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "scheduler": "step",
        "step_size": 10,
        "gamma": 0.1,
        "loss_mode": "sum",
        "loss_weights": {"cfr": 1.0, "cfm": 1.0, "sfr_image": 1.0, "sfr_music": 1.0, "sim": 1.0,
                         "va_image": 1.0, "va_music": 1.0},
        "margin": 0.5,
        "distance": "squared",
        "embed_dim": 512,
        "decoder_hidden": [256, 128],
        "dropout": 0.5,
        "head_norm": "batchnorm",
        "clip_seconds": 2.0,
        "cpu_threads": 0,
    },
    "encoders": {},
    "variants": {},
}

# `imem tune` (imem/tuning.py): an Optuna study over one variant; not part of `dvc repro` (tune/dvc.yaml)
TUNE = {
    "variant": "transformer_v2",
    "study_name": "",
    "storage": "",
    "n_trials": 10,
    "epochs": 4,
    "objective": "sim",
    "seed": 7,
    "sampler_startup_trials": 4,
    "pruner": "median",
    "pruner_startup_trials": 3,
    "pruner_warmup_epochs": 1,
    "heartbeat_interval": 10,
    "grace_period": 30,
    "max_retry": 2,
    "space": {
        "lr": {"low": 1e-4, "high": 3e-2, "log": True},
        "margin": {"low": 0.1, "high": 1.5, "log": False},
        "head": ["flatten", "cls", "mean"],
        "loss_mode": ["sum", "first_batch"],
        "batch_size": [64, 128],
    },
}

EVALUATE = {
    "split": "test",
    "device": "cpu",
    "relevance_threshold": 0.7,
    "ndcg_k": 10,
    "top_k": 10,
    "batch_size": 4096,
    "bootstrap": {"n": 1000, "seed": 2026, "level": 0.95},
}

VISUALIZE = {
    "pca_pairs": 30,
    "sheet_queries": 3,
    "sheet_top": 5,
    "sheet_ranked_by": ["sim", "emb"],
    "dpi": 100,
}

# The field's other methods (issue 7; stage method@<name>): ``common`` here, each method's own section is
# checked against the DEFAULTS of its module (imem/methods/<name>.py).
METHODS = {
    "common": {"seed": 1, "n_seeds": 1, "device": "cpu", "image_encoder": "resnet50", "music_encoder": "resnet18"},
    "mmva": {}, "emo_clim": {}, "cmer_cl": {}, "sp_net": {},
}

SCHEMAS: dict[str, dict[str, Any]] = {"synth": SYNTH, "prepare": PREPARE, "features": FEATURES, "train": TRAIN,
                                      "evaluate": EVALUATE, "visualize": VISUALIZE, "methods": METHODS}

# Keys whose value is a free-form mapping checked by its own module (a source's loader options).
OPEN_KEYS = {"prepare.music", "prepare.images", "train.encoders", "train.variants",
             "train.common.loss_weights", "methods.mmva", "methods.emo_clim", "methods.cmer_cl", "methods.sp_net"}
SCHEMAS["tune"] = TUNE


def params_path() -> Path:
    """``params.yaml`` in the working directory. DVC runs a stage in its own workspace -- for a temporary
    or queued experiment that is a copy under ``.dvc/tmp/exps/`` holding the ``-S`` overrides -- while it
    points ``$DVC_ROOT`` at the *parent* repository (dvc/repo/experiments/queue/base.py), whose
    params.yaml lacks the overrides. So params come from the cwd; only the MLflow store (imem.tracking)
    follows ``$DVC_ROOT``."""
    return Path("params.yaml")


def merge(defaults: Any, given: Any, where: str) -> Any:
    """``given`` merged over ``defaults``; an unknown key raises ImemError naming ``where.<key>``."""
    return _merge(defaults, given, where, open_keys=False)


def _merge(defaults: Any, given: Any, where: str, open_keys: bool = True) -> Any:
    if (open_keys and where in OPEN_KEYS) or not isinstance(defaults, dict):
        return copy.deepcopy(given)
    if not isinstance(given, dict):
        raise ImemError(f"params: '{where}' must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ImemError(
            f"params: unknown key '{where}.{unknown[0]}' (known: {', '.join(sorted(defaults))})"
        )
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        out[key] = _merge(defaults[key], value, f"{where}.{key}", open_keys)
    return out


def section(name: str, raw: dict[str, Any] | None = None, path: str | os.PathLike | None = None) -> dict:
    """The ``name`` section of params.yaml merged over its defaults; unknown keys raise ImemError."""
    if name not in SCHEMAS:
        raise ImemError(f"params: no such section '{name}' (known: {', '.join(SCHEMAS)})")
    if raw is None:
        path = Path(path) if path else params_path()
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ImemError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        else:
            raw = {}
    return _merge(SCHEMAS[name], raw.get(name) or {}, name)
