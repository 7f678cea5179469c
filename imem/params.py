"""Reading ``params.yaml`` sections: defaults, strict key checking, and a type and range for every value.

Each section is a pydantic model below: its fields are the keys a stage reads, with their defaults, types
and ranges. A key the schema does not know is an error naming it (``prepare.pairs.topp``), so a typo never
silently falls back to a default, and a value of the wrong type or out of range is one line naming the key
and what is allowed (``params: train.common.lr = -0.001: must be a number > 0``; issue 16 item 7). Keys whose
value is a free-form mapping checked by its own module (a source's loader options, the encoders and variants,
a method's section) are typed as mappings here (``OPEN_KEYS``).

pydantic does the checking (the well-kept library for it); what is written by hand is only the one-line
message, built from the field's own constraints.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from imem.errors import ImemError


def _no_bool(v):
    if isinstance(v, bool):
        raise ValueError("a boolean")
    return v


# Integers are strict (10, not "10", 10.0 or true); numbers take ints and numeric strings such as YAML's "1e-3"
# (PyYAML reads a float without a dot as a string), never a boolean, NaN or infinity.
Int = Annotated[int, Field(strict=True)]
Num = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]


def _f(default, **constraints):
    return Field(default=default, **constraints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Synth(_Section):
    seed: Int = _f(20201012, ge=0)
    out: Str = "data"
    n_songs: Int = _f(100, ge=1)
    n_long_songs: Int = _f(3, ge=0)
    long_song_seconds: Annotated[list[Annotated[Int, Field(ge=20, le=1800)]], Field(min_length=2, max_length=2)] = [60, 100]
    sample_rate: Int = _f(44100, ge=8000)
    n_iaps: Int = _f(240, ge=1)
    n_naps: Int = _f(120, ge=1)
    n_emotic: Int = _f(120, ge=1)
    image_width: Int = _f(320, ge=8)
    image_height: Int = _f(240, ge=8)
    label_noise: Num = _f(0.08, ge=0, le=1)


class Split(_Section):
    train: Num = _f(0.8, gt=0, lt=1)
    val: Num = _f(0.05, gt=0, lt=1)
    test: Num = _f(0.15, gt=0, lt=1)


class Pairs(_Section):
    source: Str = "sample"
    top: Int = _f(10, ge=0)
    bottom: Int = _f(10, ge=0)
    random: Int = _f(30, ge=0)
    keep_fraction: Num = _f(0.1, gt=0, le=1)
    imemnet_dir: Str = "IMEMNet"
    chunk_size: Int = _f(512, ge=1)


class Prepare(_Section):
    seed: Int = _f(42, ge=0)
    corpus_root: Str = "data"
    music: dict[str, Any] = {"format": "deam", "dir": "DEAM"}
    images: list[dict[str, Any]] = [{"format": "iaps", "dir": "IAPS"}, {"format": "naps", "dir": "NAPS"},
                                    {"format": "emotic", "dir": "EMOTIC"}]
    normalization: Str = "data"
    clip_seconds: Num = _f(2.0, gt=0)
    check_media: Bool = True
    short_audio: Str = "error"
    split: Split = Split()
    pairs: Pairs = Pairs()


class Features(_Section):
    clip_seconds: Num = _f(2.0, gt=0)
    handcrafted: Bool = True
    waveform_rates: list[Annotated[Int, Field(ge=1000)]] = [16000]
    image_size: Int = _f(224, ge=8)
    batch_size: Int = _f(16, ge=1)
    short_clip: Str = "error"
    device: Str = "cpu"
    image_workers: Int = _f(2, ge=1)


class Common(_Section):
    """``train.common``; also what a variant may override (``train.variants.<name>``)."""
    seed: Int = _f(1, ge=0)
    n_seeds: Int = _f(1, ge=1)
    device: Str = "cpu"
    epochs: Int = _f(20, ge=1)
    batch_size: Int = _f(128, ge=2)
    fc_only: Bool = True
    cache_batch_size: Int = _f(32, ge=1)
    optimizer: Str = "sgd"
    lr: Num = _f(0.001, gt=0)
    momentum: Num = _f(0.9, ge=0, lt=1)
    weight_decay: Num = _f(0.0, ge=0)
    scheduler: Str = "step"
    step_size: Int = _f(10, ge=1)
    gamma: Num = _f(0.1, gt=0, le=1)
    loss_mode: Str = "sum"
    loss_weights: dict[str, Annotated[Num, Field(ge=0)]] = {
        "cfr": 1.0, "cfm": 1.0, "sfr_image": 1.0, "sfr_music": 1.0, "sim": 1.0, "va_image": 1.0, "va_music": 1.0}
    margin: Num = _f(15.0, ge=0)
    cfr: Str = "pair"
    cfm: Str = "hinge"
    reduction: Str = "sum"
    va_decoder: Str = "joint"
    distance: Str = "squared"
    embed_dim: Int = _f(512, ge=1)
    decoder_hidden: list[Annotated[Int, Field(ge=1)]] = [256, 128]
    dropout: Num = _f(0.5, ge=0, lt=1)
    head_norm: Str = "batchnorm"
    clip_seconds: Num = _f(2.0, gt=0)
    cpu_threads: Int = _f(0, ge=0)


class Train(_Section):
    common: Common = Common()
    encoders: dict[str, dict[str, Any]] = {}
    variants: dict[str, dict[str, Any]] = {}


class _Range(_Section):
    """A search range: low <= high, and low > 0 on a log scale (Optuna's own check was a traceback)."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low = {self.low:g} is above high = {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"low = {self.low:g}: a log-scale range needs low > 0 (or log: false)")
        return self


class LrRange(_Range):
    low: Num = _f(1e-4, gt=0)
    high: Num = _f(3e-2, gt=0)
    log: Bool = True


class MarginRange(_Range):
    low: Num = _f(1.0, ge=0)
    high: Num = _f(30.0, gt=0)
    log: Bool = True


class Space(_Section):
    """``tune.space``: lr and the CFM margin as ranges; head, loss mode and batch size as choices ([]: the
    variant's own value; one value: fixed for every trial and promoted)."""
    lr: LrRange = LrRange()
    margin: MarginRange = MarginRange()
    head: list[Str] = ["flatten", "cls", "mean"]
    loss_mode: list[Str] = ["sum", "first_batch"]
    batch_size: list[Annotated[Int, Field(ge=2)]] = [64, 128]


class Tune(_Section):
    """``imem tune`` (imem/tuning.py): an Optuna study over one variant; not part of `dvc repro` (tune/dvc.yaml)."""
    variant: Str = "transformer_v2"
    study_name: Str = ""
    storage: Str = ""
    n_trials: Int = _f(10, ge=1)
    epochs: Int = _f(4, ge=1)
    objective: Str = "sim"
    seed: Int = _f(7, ge=0)
    sampler_startup_trials: Int = _f(4, ge=0)
    pruner: Str = "median"
    pruner_startup_trials: Int = _f(3, ge=0)
    pruner_warmup_epochs: Int = _f(1, ge=0)
    heartbeat_interval: Int = _f(10, ge=1)
    grace_period: Int = _f(30, ge=1)
    max_retry: Int = _f(2, ge=0)
    log_checkpoints: Str = "best"
    space: Space = Space()


class Bootstrap(_Section):
    n: Int = _f(1000, ge=0)
    seed: Int = _f(2026, ge=0)
    level: Num = _f(0.95, gt=0, lt=1)


class Evaluate(_Section):
    split: Str = "test"
    device: Str = "cpu"
    relevance_threshold: Num = _f(0.7, ge=0, le=1)
    ndcg_k: Int = _f(10, ge=1)
    top_k: Int = _f(10, ge=1)
    batch_size: Int = _f(4096, ge=1)
    bootstrap: Bootstrap = Bootstrap()


class Visualize(_Section):
    pca_pairs: Int = _f(30, ge=1)
    sheet_queries: Int = _f(3, ge=1)
    sheet_top: Int = _f(5, ge=1)
    sheet_ranked_by: list[Str] = ["sim", "emb"]
    dpi: Int = _f(100, ge=10)


class MethodsCommon(_Section):
    seed: Int = _f(1, ge=0)
    n_seeds: Int = _f(1, ge=1)
    device: Str = "cpu"
    image_encoder: Str = "resnet50"
    music_encoder: Str = "resnet18"


class Methods(_Section):
    """The field's other methods (issue 7; stage method@<name>): ``common`` here, each method's own section is
    checked against the DEFAULTS of its module (imem/methods/<name>.py)."""
    common: MethodsCommon = MethodsCommon()
    mmva: dict[str, Any] = {}
    emo_clim: dict[str, Any] = {}
    cmer_cl: dict[str, Any] = {}
    sp_net: dict[str, Any] = {}


MODELS: dict[str, type[_Section]] = {"synth": Synth, "prepare": Prepare, "features": Features, "train": Train,
                                     "evaluate": Evaluate, "visualize": Visualize, "methods": Methods, "tune": Tune}
# The defaults as plain dicts (what ``section`` returns when params.yaml sets nothing).
SCHEMAS: dict[str, dict[str, Any]] = {name: m().model_dump() for name, m in MODELS.items()}
METHODS = SCHEMAS["methods"]
TRAIN, TUNE = SCHEMAS["train"], SCHEMAS["tune"]

# Keys whose value is a free-form mapping checked by its own module (a source's loader options).
OPEN_KEYS = {"prepare.music", "prepare.images", "train.encoders", "train.variants",
             "train.common.loss_weights", "methods.mmva", "methods.emo_clim", "methods.cmer_cl", "methods.sp_net"}


def _constraints(extra) -> list:
    out = []
    for e in extra:
        out.extend(getattr(e, "metadata", None) or [e])  # a FieldInfo holds its constraints in .metadata
    return out


def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """What the field at ``loc`` takes, from its type and constraints: 'an integer >= 1', 'a number in (0, 1]'."""
    from typing import get_args, get_origin

    ann: Any = model
    metas: list = []
    for part in loc:
        if isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields:
            info = ann.model_fields[part]
            ann, metas = info.annotation, list(info.metadata)
        elif get_origin(ann) in (list, dict) and get_args(ann):  # an element of a list or a value of a mapping
            ann, metas = get_args(ann)[-1], []
        else:
            break
        if get_origin(ann) is Annotated:
            base, *extra = get_args(ann)
            ann, metas = base, metas + _constraints(extra)
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(ann)
    if kind is None:
        kind = {list: "a list", dict: "a mapping"}.get(get_origin(ann), "a mapping" if isinstance(ann, type) and
                                                   issubclass(ann, BaseModel) else "a value")
    lo = hi = None
    sizes = {type(m): getattr(m, "min_length", getattr(m, "max_length", None)) for m in metas
             if isinstance(m, (MinLen, MaxLen))}
    if sizes and len(set(sizes.values())) == 1 and len(sizes) == 2:
        kind += f" of {next(iter(sizes.values()))} values"
    for meta in metas:
        if isinstance(meta, Ge):
            lo = f"[{meta.ge:g}"
        elif isinstance(meta, Gt):
            lo = f"({meta.gt:g}"
        elif isinstance(meta, Le):
            hi = f"{meta.le:g}]"
        elif isinstance(meta, Lt):
            hi = f"{meta.lt:g})"
    if lo and hi:
        return f"{kind} in {lo}, {hi}"
    if lo:
        return f"{kind} {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f"{kind} {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return kind


def validate(model: type[BaseModel], data: dict, where: str, keys_from: dict | None = None) -> dict:
    """``data`` checked against ``model`` (defaults filled in) as a plain dict; the first problem is one
    ImemError line naming ``where.<key>``. ``keys_from``: for a key, the params path it came from instead
    of ``where`` (a variant's override of ``train.common``)."""
    try:
        return model.model_validate(data).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        base = (keys_from or {}).get(loc[0], where) if loc else where
        key = ".".join([base, *map(str, loc)])
        if err["type"] == "extra_forbidden":
            parent: Any = model
            for part in loc[:-1]:
                parent = parent.model_fields[part].annotation
            known = ", ".join(sorted(parent.model_fields))
            raise ImemError(f"params: unknown key '{key}' (known: {known})") from None
        if err["type"] in ("model_type", "model_attributes_type", "dict_type") and len(loc) and \
                not isinstance(err.get("input"), dict):
            raise ImemError(f"params: '{key}' must be a mapping, got {type(err['input']).__name__}") from None
        if err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a check across keys (_Range)
            raise ImemError(f"params: {key}: {err['ctx']['error']}") from None
        value = err.get("input")
        raise ImemError(f"params: {key} = {value!r}: must be {_allowed(model, loc)}") from None


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
    if name not in MODELS:
        raise ImemError(f"params: no such section '{name}' (known: {', '.join(MODELS)})")
    if raw is None:
        path = Path(path) if path else params_path()
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ImemError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        else:
            raw = {}
    given = raw.get(name) or {}
    if not isinstance(given, dict):
        raise ImemError(f"params: '{name}' must be a mapping, got {type(given).__name__}")
    return validate(MODELS[name], given, name)
