"""Valence-arousal prediction and embeddings for user files (``imem predict``), from a trained model.

A model comes from a training output directory (``models/cnn``: its ``best.pt`` holds the weights and
the resolved variant config) or from MLflow (``runs:/<run id>/model``, ``models:/<name>/<version>`` or
``models:/<name>@<alias>``: the pickled module the train stage logs, its config read back from the
run's params).

Prediction-time inputs are built by the training code itself: decoded media are put into an in-memory
:class:`~imem.features.store.FeatureStore` (same dtypes as the features stage writes: uint8 images
resized by :func:`~imem.features.store.load_image`, float16 handcrafted matrices, int16 waveforms) and
read back through :class:`imem.training.Inputs`, so the normalisation, the 3-channel tiling, ViT's
resize and BEATs' fbank are the training ones, not copies of them.

Audio of any length is cut into windows of ``clip_seconds`` (2 s) every ``hop`` seconds from 0 (hop
2 s = the training clips' grid); a trailing part shorter than a window is left out, and a file shorter
than one window is zero-padded to one. Windows that are digitally silent have no defined handcrafted
features (the features stage refuses them too): they are skipped and counted. The file's aggregate VA
is the mean of its windows' VA; its aggregate embedding (for retrieval) is the mean of its windows'
embeddings (see docs/retrieval.md for why).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from imem.checkpoints import read_checkpoint, restore_backbones, state_sha256
from imem.errors import ImemError
from imem.features.store import FeatureStore, cut_clip, load_image, read_audio, resample, to_int16
from imem.models.matching import MatchingModel, build_model

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
DEFAULT_MODEL = "models/cnn"
BEATS_RATE = 16000


# --- files ---------------------------------------------------------------------------------------------

def media_kind(path: str | Path) -> str:
    """'image' or 'audio' from the file name; anything else is refused with one line."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    raise ImemError(f"unsupported file format {ext or '(no extension)'!r}: {path} "
                    f"(images: {' '.join(IMAGE_EXTS)}; audio: {' '.join(AUDIO_EXTS)})")


def list_media(directory: str | Path, kind: str) -> list[Path]:
    """The ``kind`` ('image'/'audio') files under ``directory`` (recursively, sorted); none is an error."""
    d = Path(directory)
    if not d.is_dir():
        raise ImemError(f"not a directory: {d}")
    exts = IMAGE_EXTS if kind == "image" else AUDIO_EXTS
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise ImemError(f"no {kind} files ({' '.join(exts)}) under {d}")
    return files


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ImemError(f"file not found: {path}")


# --- models --------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: dict  # the resolved variant config (kind, encoders, clip_seconds, ...)
    source: str  # what the user named
    key: str = field(default="")  # sha256 of the weights: the embedding cache's model key

    @property
    def kind(self) -> str:
        return self.cfg["kind"]

    @property
    def sides(self) -> tuple[str, ...]:
        return {"matching": ("image", "music"), "unimodal_image": ("image",),
                "unimodal_music": ("music",)}[self.kind]

    @property
    def name(self) -> str:
        return f"{self.source} ({self.cfg.get('variant', '?')}, {self.kind})"


def weights_key(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes, bytes): equal weights, equal key, whatever the
    file or MLflow run they came from."""
    return state_sha256(model.state_dict())


def _local_weights(cfg: dict) -> dict:
    """The checkpoint holds every weight, backbones included: build the encoders without their pretrained
    files unless those files are still there (a ViT/BEATs built from a pretrained file takes that file's
    architecture, which the checkpoint's weights then fit)."""
    cfg = copy.deepcopy(cfg)
    for side in ("image", "music"):
        spec = cfg.get(f"{side}_encoder")
        if isinstance(spec, dict) and spec.get("pretrained") and not Path(str(spec["pretrained"])).exists():
            spec["pretrained"] = None
    return cfg


def _from_checkpoint(path: Path, source: str) -> LoadedModel:
    ck = read_checkpoint(path)
    cfg = ck["config"]
    try:
        # a trained-part checkpoint's frozen backbones are rebuilt as training built them: from the pretrained
        # file, else drawn from the config's seed (imem.training.Trainer), without touching the caller's RNG
        with torch.random.fork_rng(devices=[]):
            if ck.get("backbones"):
                torch.manual_seed(int(cfg["seed"]))
            model = build_model(_local_weights(cfg))
    except KeyError as exc:
        raise ImemError(f"{path}: the checkpoint's config lacks {exc.args[0]!r}: not a complete imem checkpoint") from exc
    try:
        restore_backbones(ck, model, path)
    except RuntimeError as exc:
        raise ImemError(f"{path}: the weights do not fit variant {cfg.get('variant')!r}: "
                        f"{str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0].strip()}") from exc
    return LoadedModel(model.eval(), cfg, source)


def _from_mlflow(uri: str) -> LoadedModel:
    """The best checkpoint (``checkpoints/best.pt``, which the train stage logs to every run) of the run that
    ``uri`` names, read with ``weights_only`` like any checkpoint file. The pickled model the run also logs
    (for ``mlflow.pytorch.load_model`` users) is never unpickled here: unpickling runs code (issue 16 item 1)."""
    import tempfile

    import mlflow

    from imem.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.tracking.MlflowClient()
    try:
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/"):].split("/")[0]
        else:
            ref = uri[len("models:/"):]
            if "@" in ref:
                name, alias = ref.split("@", 1)
                run_id = client.get_model_version_by_alias(name, alias).run_id
            else:
                name, _, version = ref.partition("/")
                run_id = client.get_model_version(name, version).run_id
        client.get_run(run_id)
        names = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
        if "checkpoints/best.pt" not in names:
            raise ImemError(f"MLflow model {uri}: run {run_id} has no checkpoints/best.pt artifact (imem reads a run's "
                            "weights from its checkpoint only, never by unpickling a logged model)")
        with tempfile.TemporaryDirectory(prefix="imem-mlflow-") as tmp:
            path = Path(client.download_artifacts(run_id, "checkpoints/best.pt", tmp))
            loaded = _from_checkpoint(path, uri)
    except ImemError:
        raise
    except Exception as exc:  # MlflowException, missing runs or artifacts
        raise ImemError(f"cannot load MLflow model {uri} from {tracking_uri()}: {str(exc).splitlines()[0]}") from exc
    return LoadedModel(loaded.model, loaded.cfg, uri)


def load_model(spec: str | Path = DEFAULT_MODEL) -> LoadedModel:
    """A model directory (holding best.pt), a checkpoint file, or an MLflow model URI."""
    s = str(spec)
    if s.startswith(("runs:/", "models:/")):
        loaded = _from_mlflow(s)
    else:
        p = Path(s)
        path = p / "best.pt" if p.is_dir() else p
        if not path.is_file():
            raise ImemError(f"no model at {p}: expected a training output directory with best.pt, a checkpoint "
                            "file, or an MLflow URI (runs:/<id>/model, models:/<name>/<version>)")
        loaded = _from_checkpoint(path, s)
    loaded.key = weights_key(loaded.model)
    return loaded


# --- embedding -----------------------------------------------------------------------------------------

class _MemoryStore(FeatureStore):
    """A FeatureStore over in-memory arrays, so :class:`imem.training.Inputs` builds the model inputs."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.dir = Path("<memory>")
        self.manifest = {"arrays": {name: {} for name in arrays}}
        self._arrays = dict(arrays)


@dataclass
class AudioWindows:
    path: Path
    starts: np.ndarray  # (W,) window starts in s (silent windows removed)
    f: torch.Tensor  # (W, D) embeddings
    va: torch.Tensor  # (W, 2) predicted VA
    skipped: list[float]  # starts of silent windows
    seconds: float  # duration of the file



# User images (predict, retrieve's page): refused above this many pixels by the header's dimensions, before
# decoding (issue 16 item 4). 250 megapixels holds the largest camera sensors (150 MP medium format) with room
# and decodes to 750 MB of RGB; the bomb, a 25,000 x 25,000 PNG of 607 KB (625 MP, 4.2 GB decoded), is
# refused. The corpus' images keep PIL's own guard (imem.features.store.open_image).
MAX_IMAGE_PIXELS = 250_000_000


def load_user_image(path: Path, size: int) -> np.ndarray:
    """:func:`load_image` for user files of any size up to MAX_IMAGE_PIXELS, refused by the header's
    dimensions before anything is decoded; PIL's decompression-bomb guard is replaced by this one exact
    limit; every image is downscaled to size x size at once."""
    return load_image(path, size, max_pixels=MAX_IMAGE_PIXELS)


class Predictor:
    """Embeddings and VA for image and audio files with one loaded model (eval mode, no grad, CPU)."""

    def __init__(self, loaded: LoadedModel, image_size: int = 224, hop: float | None = None,
                 batch_size: int = 32, progress: bool = True):
        from imem.training import Inputs

        self.loaded, self.model, self.cfg = loaded, loaded.model, loaded.cfg
        self.image_size = int(image_size)
        self.clip_s = float(self.cfg.get("clip_seconds", 2.0))
        self.hop = float(hop) if hop is not None else self.clip_s
        if not math.isfinite(self.hop) or self.hop <= 0:
            raise ImemError(f"--hop must be a positive number of seconds, got {hop}")
        self.batch_size = int(batch_size)
        self.progress = progress
        self._inputs = Inputs
        self._extractor = None
        self.forward_batches = 0  # backbone calls: the cost the embedding cache saves
        self.items_embedded = 0

    def _parts(self, side: str):
        m = self.model
        if isinstance(m, MatchingModel):
            return (m.image_backbone, m.image_head, m.va_image) if side == "image" else \
                (m.music_backbone, m.music_head, m.va_music)
        return m.backbone, m.head, m.va

    def require(self, side: str, path: Path | str | None = None) -> None:
        if side not in self.loaded.sides:
            what = "images" if side == "image" else "audio"
            only = "images" if self.loaded.sides == ("image",) else "audio"
            raise ImemError(f"model {self.loaded.name} predicts VA for {only} only, not {what}"
                            + (f": {path}" if path else ""))

    @torch.no_grad()
    def _run(self, side: str, arrays: dict[str, np.ndarray], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        backbone, head, va = self._parts(side)
        fetch = self._inputs(_MemoryStore(arrays), self.cfg[f"{side}_encoder"], side)
        x = fetch(torch.arange(n))
        f = head(backbone(x)).float()
        self.forward_batches += 1
        self.items_embedded += n
        return f, va(f).float()

    # images
    def embed_images(self, paths: list[Path], desc: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) embeddings and (N, 2) VA of image files, in batches."""
        self.require("image", paths[0] if paths else None)
        fs, vas = [], []
        for start in tqdm(range(0, len(paths), self.batch_size), desc=desc, unit="batch",
                          disable=not self.progress or len(paths) <= self.batch_size):
            batch = paths[start:start + self.batch_size]
            for p in batch:
                _check_file(Path(p))
            arr = np.stack([load_user_image(p, self.image_size) for p in batch])
            f, va = self._run("image", {f"images_{self.image_size}": arr}, len(batch))
            fs.append(f)
            vas.append(va)
        return torch.cat(fs), torch.cat(vas)

    # audio
    def _music_type(self) -> str:
        """``resnet`` for encoders fed the handcrafted matrix (ResNet, ACP-Net's statistics), ``beats`` for
        encoders fed the 16-kHz waveform (BEATs, L3-Net's log-mel)."""
        t = self.cfg["music_encoder"]["type"]
        family = {"resnet": "resnet", "handcrafted_stats": "resnet", "beats": "beats", "l3": "beats"}
        if t not in family:
            raise ImemError(f"model {self.loaded.name}: music encoder type {t!r} takes no audio "
                            f"(one of: {', '.join(family)})")
        return family[t]

    def window_starts(self, seconds: float) -> np.ndarray:
        if seconds < self.clip_s:
            return np.zeros(1)
        n = int(math.floor((seconds - self.clip_s) / self.hop + 1e-9)) + 1
        return np.round(np.arange(n) * self.hop, 6)

    def embed_audio(self, path: Path | str, starts=None) -> AudioWindows:
        """Embeddings and VA of the windows of one audio file (``starts``: explicit window starts in s)."""
        return next(self.embed_audio_files([path], None if starts is None else [starts]))

    def _load(self, path: Path, starts, rate: int) -> tuple[np.ndarray, np.ndarray, float]:
        self.require("music", path)
        _check_file(path)
        with warnings.catch_warnings():  # librosa's fallback warns before read_audio raises its one-line error
            warnings.simplefilter("ignore")
            y, sr = read_audio(path)
        if y.size == 0:
            raise ImemError(f"audio file {path} holds no samples")
        if not np.isfinite(y).all():
            raise ImemError(f"audio file {path} holds NaN or inf samples")
        seconds = len(y) / sr
        starts = self.window_starts(seconds) if starts is None else np.asarray(starts, dtype=np.float64)
        return resample(y, sr, rate), starts, seconds

    def embed_audio_files(self, paths: list[Path | str], starts_list=None) -> Iterator[AudioWindows]:
        """:meth:`embed_audio` for many files, in order; windows of consecutive files share batches (many
        short files cost what one long file of the same total length costs)."""
        from imem.features.handcrafted import SAMPLE_RATE, HandcraftedExtractor

        kind = self._music_type()
        rate = SAMPLE_RATE if kind == "resnet" else BEATS_RATE
        if kind == "resnet" and self._extractor is None:
            self._extractor = HandcraftedExtractor(sr=SAMPLE_RATE, device="cpu", batch_size=16)
        group = max(self.batch_size, 16)
        pending: list[tuple[Path, np.ndarray, np.ndarray, float]] = []

        def flush() -> Iterator[AudioWindows]:
            tasks = [(i, float(s)) for i, (_, _, starts, _) in enumerate(pending) for s in starts]
            kept: list[list[float]] = [[] for _ in pending]
            skipped: list[list[float]] = [[] for _ in pending]
            fs: list[list[torch.Tensor]] = [[] for _ in pending]
            vas: list[list[torch.Tensor]] = [[] for _ in pending]
            for g in range(0, len(tasks), group):  # cut per group: a long file's windows never all in memory
                segs, owners = [], []
                for i, s in tasks[g:g + group]:
                    path, y = pending[i][0], pending[i][1]
                    seg = cut_clip(y, rate, s, self.clip_s, f"{path.name}@{s:g}s", str(path), "pad")
                    if float(np.abs(seg).max()) < 1.0 / 32768:  # below int16 resolution: digital silence
                        skipped[i].append(s)
                        continue
                    segs.append(seg)
                    owners.append(i)
                    kept[i].append(s)
                if not segs:
                    continue
                if kind == "resnet":
                    # float16 as the features stage stores it: the inputs equal the training inputs
                    arrays = {"handcrafted": self._extractor.extract(np.stack(segs)).astype(np.float16)}
                else:
                    arrays = {f"waveform_{BEATS_RATE}": np.stack([to_int16(x) for x in segs])}
                f, va = self._run("music", arrays, len(segs))
                owners_t = torch.tensor(owners)
                for i in sorted(set(owners)):
                    fs[i].append(f[owners_t == i])
                    vas[i].append(va[owners_t == i])
            for i, (path, _, _, seconds) in enumerate(pending):
                if not kept[i]:
                    raise ImemError(f"audio file {path} is silent in every {self.clip_s:g}-s window: "
                                    "nothing to predict")
                yield AudioWindows(path, np.array(kept[i]), torch.cat(fs[i]), torch.cat(vas[i]), skipped[i], seconds)

        queued = 0
        for n, path in enumerate(paths):
            y, starts, seconds = self._load(Path(path), None if starts_list is None else starts_list[n], rate)
            pending.append((Path(path), y, starts, seconds))
            queued += len(starts)
            if queued >= group:
                yield from flush()
                pending.clear()
                queued = 0
        if pending:
            yield from flush()


# --- imem predict --------------------------------------------------------------------------------------

def expand_inputs(items: list[str | Path]) -> list[tuple[Path, str]]:
    """Files as given (their kind from the extension) and directories expanded to their media files."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTS + AUDIO_EXTS)
            if not files:
                raise ImemError(f"no image or audio files under {p}")
            out += [(q, media_kind(q)) for q in files]
        else:
            kind = media_kind(p)
            _check_file(p)
            out.append((p, kind))
    return out


def predict(items: list[str | Path], predictor: Predictor) -> pd.DataFrame:
    """One row per image; per audio file one row per window and an aggregate row (window = 'mean')."""
    files = expand_inputs(items)
    for p, kind in files:  # refuse a model/input mismatch before any work
        predictor.require("image" if kind == "image" else "music", p)
    rows: list[dict] = []
    images = [p for p, k in files if k == "image"]
    if images:
        _, va = predictor.embed_images(images)
        for p, (v, a) in zip(images, va.tolist(), strict=True):
            rows.append({"file": str(p), "type": "image", "window": "", "start_s": np.nan, "end_s": np.nan,
                         "valence": v, "arousal": a})
    audio = [p for p, k in files if k == "audio"]
    # no audio, no music side needed: an image-only model predicts images (its config has no music encoder)
    for w in tqdm(predictor.embed_audio_files(audio) if audio else [], total=len(audio), desc="audio files", unit="file",
                  disable=not predictor.progress or len(audio) < 2):
        p = w.path
        for i, (s, (v, a)) in enumerate(zip(w.starts.tolist(), w.va.tolist(), strict=True)):
            rows.append({"file": str(p), "type": "audio", "window": str(i), "start_s": s,
                         "end_s": s + predictor.clip_s, "valence": v, "arousal": a})
        mean = w.va.mean(dim=0).tolist()
        rows.append({"file": str(p), "type": "audio", "window": "mean", "start_s": float(w.starts[0]),
                     "end_s": float(w.starts[-1]) + predictor.clip_s, "valence": mean[0], "arousal": mean[1],
                     "windows": len(w.starts), "silent_windows_skipped": len(w.skipped)})
    order = {str(p): i for i, (p, _) in enumerate(files)}
    df = pd.DataFrame(rows)
    df = df.iloc[np.argsort([order[f] for f in df["file"]], kind="stable")].reset_index(drop=True)
    for c in ("windows", "silent_windows_skipped"):
        if c in df:
            df[c] = df[c].astype("Int64")
    return df
