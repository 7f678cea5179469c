"""Model inputs for every encoder, stored once as memory-mapped arrays plus index tables.

``artifacts/features/`` (one directory, written whole through a temporary directory):

=========================== ======================= =============================================
file                        dtype, shape            what
=========================== ======================= =============================================
``clips.csv``               index table             row, clip_id, song_id, k, split
``handcrafted.npy``         float16 (n, 193, 87)    CNN music input, see :mod:`.handcrafted`
``waveform_<rate>.npy``     int16 (n, 2 s * rate)   clip waveforms for transformer encoders
``images.csv``              index table             row, image_id, split
``images_<size>.npy``       uint8 (n, size, size, 3) decoded RGB, resized; NOT normalised
``manifest.json``           -                       shapes, dtypes, params, row groups
=========================== ======================= =============================================

Normalisation and the 3-channel tiling happen when batches are built (:class:`FeatureStore`), not in
the files, so one store serves every encoder and a change of normalisation needs no re-extraction.
Clips of a song are stored in k order, so a longer input (MMVA's up to 10-s clips made of consecutive
2-s clips) is a slice of consecutive rows (:meth:`FeatureStore.window`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from imem.data.clips import song_sort_key
from imem.errors import ImemError
from imem.io import atomic_dir, write_csv, write_json

# torchvision's ImageNet weights (ResNet) use these. Google's ViT checkpoints do NOT: their
# preprocessor_config.json (and transformers' ViTImageProcessor default) say mean = std = 0.5 per channel, so a
# ViT takes its normalisation from its checkpoint (imem.training.image_normalisation).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_DEFAULT_MEAN = (0.5, 0.5, 0.5)
VIT_DEFAULT_STD = (0.5, 0.5, 0.5)
# BEATs' fbank normalisation constants (microsoft/unilm BEATs.preprocess: (fbank - mean) / (2 * std)).
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582


# --- reading media -------------------------------------------------------------------------------------

def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 audio and its rate; soundfile for wav/flac/ogg/mp3, librosa (audioread) otherwise."""
    import soundfile as sf

    try:
        y, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return y.mean(axis=1), int(sr)
    except Exception as exc:  # soundfile raises several types for unreadable files
        try:
            import warnings

            import librosa

            with warnings.catch_warnings():  # its audioread fallback warns (Future/UserWarning) before failing
                warnings.simplefilter("ignore")
                y, sr = librosa.load(str(path), sr=None, mono=True)
            return y.astype(np.float32), int(sr)
        except Exception:
            raise ImemError(f"unreadable audio file {path}: {str(exc).splitlines()[0]}") from exc


def resample(y: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return y
    import librosa

    return librosa.resample(y, orig_sr=sr, target_sr=target, res_type="soxr_hq").astype(np.float32)


def cut_clip(y: np.ndarray, rate: int, start_s: float, seconds: float, clip_id: str, path: str,
             short_clip: str) -> np.ndarray:
    """Samples [start, start + seconds) of ``y``; a window past the end is padded with zeros or refused."""
    s0, n = int(round(start_s * rate)), int(round(seconds * rate))
    seg = y[s0:s0 + n]
    if len(seg) < n:
        if short_clip != "pad":
            raise ImemError(f"clip {clip_id}: audio {path} is {len(y) / rate:.2f} s, shorter than its window "
                            f"{start_s:g}-{start_s + seconds:g} s (set features.short_clip: pad to zero-pad)")
        seg = np.pad(seg, (0, n - len(seg)))
    return seg


def to_int16(y: np.ndarray) -> np.ndarray:
    return np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)


def load_image(path: str | Path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode, convert to RGB, resize to size x size (bicubic, antialiased) -> uint8 (size, size, 3).
    ``max_pixels``: refuse a larger image by the dimensions its header declares, before any decoding."""
    try:
        with open_image(path, max_pixels) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except IMAGE_ERRORS as exc:
        raise ImemError(f"unreadable image file {path}: {str(exc).splitlines()[0]}") from exc


# what PIL raises for an unreadable image; DecompressionBombError (its guard, over twice Image.MAX_IMAGE_PIXELS)
# is a bare Exception subclass
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int | None = None):
    """``PIL.Image.open`` for one image. ``max_pixels``: the image is refused by the dimensions its header
    declares, before any pixel is decoded, and PIL's own decompression-bomb guard (a warning over ~89
    megapixels, an error only over twice its limit) is off while the file opens, so this one exact limit
    decides (issue 16 item 4). Without ``max_pixels`` PIL's guard applies (corpus images)."""
    import warnings

    if max_pixels is None:
        with Image.open(path) as im:
            yield im
        return
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    with im:
        if im.width * im.height > max_pixels:
            raise ImemError(f"image file {path} is too large: {im.width} x {im.height} = "
                            f"{im.width * im.height:,} pixels, over the limit of {max_pixels:,}")
        yield im


# --- building the store ----------------------------------------------------------------------------------

def _tables(prepare_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    clips, images = [], []
    for split in ("train", "val", "test"):
        d = prepare_dir / split
        if not (d / "clips.csv").is_file():
            continue
        clips.append(pd.read_csv(d / "clips.csv", dtype={"clip_id": str, "song_id": str}).assign(split=split))
        images.append(pd.read_csv(d / "images.csv", dtype={"image_id": str}).assign(split=split))
    if not clips:
        raise ImemError(f"no prepared tables under {prepare_dir} (run the prepare stage first)")
    c = pd.concat(clips, ignore_index=True)
    i = pd.concat(images, ignore_index=True)
    # the same clip/image may sit in two splits only with imported (leaky) pair lists: store it once
    c = c.drop_duplicates("clip_id").reset_index(drop=True)
    i = i.drop_duplicates("image_id").reset_index(drop=True)
    return c, i


def _open_array(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy memmap whose whole size is reserved on disk first: writing into a sparse memmap on a full
    disk kills the process with SIGBUS (no Python error), so a full disk fails here with the file and size."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = os.path.getsize(path)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: sparse as before
            return arr
        del arr
        free = shutil.disk_usage(path.parent).free
        raise ImemError(f"features: cannot reserve {size / 2**20:,.0f} MiB for {path.name} under {path.parent} "
                        f"({free / 2**20:,.0f} MiB free): {exc.strerror}") from exc
    return arr


def build_store(prepare_dir: str | Path, out_dir: str | Path, params: dict, progress: bool = True) -> dict:
    """Extract every clip's and image's inputs into ``out_dir`` (atomically). Returns the manifest."""
    from imem.features.handcrafted import (
        N_FEATURES,
        ROW_GROUPS,
        SAMPLE_RATE,
        HandcraftedExtractor,
        HandcraftedFeatureError,
        n_frames,
    )

    short = params["short_clip"]
    if short not in ("error", "pad"):
        raise ImemError(f"params: features.short_clip = {short!r} is not one of: error, pad")
    rates = [int(r) for r in params["waveform_rates"]]
    if any(r <= 0 for r in rates):
        raise ImemError(f"params: features.waveform_rates must be positive, got {rates}")
    size = int(params["image_size"])
    clip_s = float(params["clip_seconds"])
    clips, images = _tables(Path(prepare_dir))
    clips = clips.sort_values(["song_id", "k"], key=lambda c: c.map(song_sort_key) if c.name == "song_id" else c,
                              kind="stable").reset_index(drop=True)
    n = len(clips)
    manifest: dict = {"clips": n, "images": len(images), "clip_seconds": clip_s, "arrays": {}}

    with atomic_dir(out_dir) as tmp:
        arrays = {}
        extractor = None
        if params["handcrafted"]:
            if abs(clip_s - 2.0) > 1e-9:
                raise ImemError(f"params: features.clip_seconds = {clip_s}: the handcrafted 193 x 87 layout is "
                                "defined for 2-s clips")
            extractor = HandcraftedExtractor(sr=SAMPLE_RATE, device=_device(params["device"]),
                                             batch_size=int(params["batch_size"]))
            frames = n_frames(int(round(clip_s * SAMPLE_RATE)))
            arrays["handcrafted"] = _open_array(tmp / "handcrafted.npy", np.float16, (n, N_FEATURES, frames))
            manifest["arrays"]["handcrafted"] = {"dtype": "float16", "shape": [n, N_FEATURES, frames],
                                                 "sample_rate": SAMPLE_RATE,
                                                 "row_groups": {k: [v.start, v.stop] for k, v in ROW_GROUPS.items()}}
        for r in rates:
            arrays[r] = _open_array(tmp / f"waveform_{r}.npy", np.int16, (n, int(round(clip_s * r))))
            manifest["arrays"][f"waveform_{r}"] = {"dtype": "int16", "shape": [n, int(round(clip_s * r))],
                                                   "sample_rate": r, "scale": "x / 32768"}

        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            rows = [r for r, _ in pending]
            try:
                feats = extractor.extract(np.stack([w for _, w in pending]))
            except HandcraftedFeatureError as exc:
                bad = clips.iloc[rows[_index_in(str(exc))]] if _index_in(str(exc)) is not None else None
                who = f"clip {bad['clip_id']} ({bad['audio_path']})" if bad is not None else "a clip"
                raise ImemError(f"features: {who}: {exc}") from exc
            arrays["handcrafted"][rows] = feats.astype(np.float16)
            pending.clear()

        bar = tqdm(total=n, desc="features: clips", unit="clip", disable=not progress)
        for song_id, group in clips.groupby("song_id", sort=False):
            path = group["audio_path"].iloc[0]
            if not isinstance(path, str) or not path or not Path(path).is_file():
                raise ImemError(f"features: song {song_id}: audio file not found: {path}")
            y, sr = read_audio(path)
            if not np.isfinite(y).all():
                raise ImemError(f"features: song {song_id}: audio {path} holds NaN or inf samples")
            resampled = {r: resample(y, sr, r) for r in set(rates) | ({SAMPLE_RATE} if extractor else set())}
            for row, clip in zip(group.index, group.itertuples(), strict=True):
                for r in rates:
                    arrays[r][row] = to_int16(cut_clip(resampled[r], r, clip.start_s, clip_s, clip.clip_id, path, short))
                if extractor is not None:
                    seg = cut_clip(resampled[SAMPLE_RATE], SAMPLE_RATE, clip.start_s, clip_s, clip.clip_id, path, short)
                    if float(np.abs(seg).max()) < 1.0 / 32768:  # below int16 resolution: digital silence
                        raise ImemError(f"features: clip {clip.clip_id}: audio {path} is silent in "
                                        f"{clip.start_s:g}-{clip.start_s + clip_s:g} s (no defined features)")
                    pending.append((row, seg))
                    if len(pending) >= extractor.batch_size:
                        flush()
            bar.update(len(group))
        if extractor is not None:
            flush()
        bar.close()

        img = _open_array(tmp / f"images_{size}.npy", np.uint8, (len(images), size, size, 3))
        manifest["arrays"][f"images_{size}"] = {"dtype": "uint8", "shape": [len(images), size, size, 3],
                                                "layout": "HWC RGB", "normalise_with": {"mean": IMAGENET_MEAN,
                                                                                        "std": IMAGENET_STD}}
        paths = images["path"].tolist()
        with ThreadPoolExecutor(max(1, int(params["image_workers"]))) as pool:
            for row, arr in enumerate(tqdm(pool.map(lambda p: load_image(p, size), paths), total=len(paths),
                                           desc="features: images", unit="img", disable=not progress)):
                img[row] = arr
        for a in list(arrays.values()) + [img]:
            a.flush()
        arrays.clear()  # drop the memmaps before the directory is renamed
        del img
        write_csv(tmp / "clips.csv", clips[["clip_id", "song_id", "k", "split", "start_s", "end_s"]]
                  .rename_axis("row").reset_index())
        write_csv(tmp / "images.csv", images[["image_id", "split"]].rename_axis("row").reset_index())
        manifest["params"] = params
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _index_in(message: str) -> int | None:
    import re

    m = re.search(r"clip (\d+)", message)
    return int(m.group(1)) if m else None


def _device(name: str) -> str | None:
    if name == "auto":
        return None
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ImemError(f"params: features.device = {name!r} is not one of: cpu, cuda, cuda:N, auto")
    return name


# --- reading the store -----------------------------------------------------------------------------------

class FeatureStore:
    """Memory-mapped access to a features directory; batches are built (tiled, normalised) on read."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise ImemError(f"no feature store at {self.dir} (manifest.json missing; run the features stage)")
        self.manifest = json.loads(mf.read_text())
        self.clips = pd.read_csv(self.dir / "clips.csv", dtype={"clip_id": str, "song_id": str})
        self.images = pd.read_csv(self.dir / "images.csv", dtype={"image_id": str})
        self._clip_row = dict(zip(self.clips["clip_id"], self.clips["row"], strict=True))
        self._image_row = dict(zip(self.images["image_id"], self.images["row"], strict=True))
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self.manifest["arrays"]:
            raise ImemError(f"{self.dir}: no array {name!r} (have: {', '.join(self.manifest['arrays'])})")
        if name not in self._arrays:
            self._arrays[name] = np.load(self.dir / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def release(self) -> None:
        """Drop this process's mapped pages of the arrays read so far (``madvise(MADV_DONTNEED)``). The data stays
        in the page cache, so reading it again costs a minor fault, but the pages stop counting in the process's
        resident set: one pass over a multi-GB array otherwise keeps every page it touched resident (6.15 GB of
        train transformer_v2's 12.19 GB peak RSS at IMEMNet scale, docs/benchmarks.md). Read-only shared maps only;
        a no-op where the platform lacks ``MADV_DONTNEED``."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        for arr in self._arrays.values():
            m = getattr(arr, "_mmap", None)
            if advice is not None and m is not None:
                m.madvise(advice)

    def clip_rows(self, clip_ids) -> np.ndarray:
        try:
            return np.array([self._clip_row[c] for c in clip_ids], dtype=np.int64)
        except KeyError as exc:
            raise ImemError(f"{self.dir}: clip id {exc.args[0]!r} is not in the feature store") from exc

    def image_rows(self, image_ids) -> np.ndarray:
        try:
            return np.array([self._image_row[i] for i in image_ids], dtype=np.int64)
        except KeyError as exc:
            raise ImemError(f"{self.dir}: image id {exc.args[0]!r} is not in the feature store") from exc

    def handcrafted(self, rows, tile: bool = True) -> torch.Tensor:
        """(n, 3, 193, 87) float32: the thesis' (193, 87, 3) input in torch's channel-first layout,
        the one stored matrix repeated over the 3 channels (``tile=False``: (n, 193, 87))."""
        x = torch.from_numpy(self.array("handcrafted")[np.asarray(rows)].astype(np.float32))
        return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous() if tile else x

    def waveform(self, rows, rate: int) -> torch.Tensor:
        """(n, samples) float32 in [-1, 1)."""
        a = self.array(f"waveform_{rate}")
        return torch.from_numpy(a[rows].astype(np.float32) / 32768.0)

    def window(self, clip_id: str, seconds: float, rate: int) -> torch.Tensor:
        """A longer input made of consecutive clips of one song starting at ``clip_id`` (e.g. MMVA's 10 s)."""
        per = float(self.manifest["clip_seconds"])
        n = int(round(seconds / per))
        if n < 1 or abs(n * per - seconds) > 1e-9:
            raise ImemError(f"window of {seconds} s is not a whole number of {per:g}-s clips")
        row = int(self.clip_rows([clip_id])[0])
        song, k = self.clips.loc[row, "song_id"], int(self.clips.loc[row, "k"])
        block = self.clips.iloc[row:row + n]
        if len(block) < n or (block["song_id"] != song).any() or (block["k"].to_numpy() != np.arange(k, k + n)).any():
            raise ImemError(f"clip {clip_id}: song {song} has no {n} consecutive clips from k={k} "
                            f"for a {seconds:g}-s window")
        return self.waveform(np.arange(row, row + n), rate).reshape(-1)

    def image_batch(self, rows, size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
        """(n, 3, H, W) float32, scaled to [0, 1] then normalised per channel with ``mean``/``std``."""
        size = size or self._image_size()
        x = torch.from_numpy(np.ascontiguousarray(self.array(f"images_{size}")[rows])).permute(0, 3, 1, 2).float()
        x = x / 255.0
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        return (x - m) / s

    def _image_size(self) -> int:
        sizes = [int(k.split("_")[1]) for k in self.manifest["arrays"] if k.startswith("images_")]
        return sizes[0]


def beats_fbank(waves_16k: torch.Tensor) -> torch.Tensor:
    """BEATs' input: 128-bin Kaldi fbank (25 ms / 10 ms) of 16-kHz audio scaled to int16 range, normalised
    as BEATs.preprocess does. (n, samples) -> (n, frames, 128); a 2-s clip gives 198 frames, i.e. 12 x 8 =
    96 patches of 16 x 16 (the thesis' (96, 768) for BEATs-base)."""
    import torchaudio

    out = []
    for w in waves_16k:
        fb = torchaudio.compliance.kaldi.fbank((w * 32768.0).unsqueeze(0), num_mel_bins=128,
                                               sample_frequency=16000, frame_length=25, frame_shift=10)
        out.append(fb)
    return (torch.stack(out) - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
