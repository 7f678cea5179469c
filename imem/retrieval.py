"""Music -> images and image -> music retrieval over cached collection embeddings (``imem retrieve``).

Cache. A collection file is embedded once per (model weights, modality, audio window hop) and stored by
the sha256 of its bytes, so a renamed or copied file is found again and an edited one is re-embedded.
Under ``<cache>/v1/<weights key>/<image | music-hop<h>>/``:

* ``shard-NNNNNN.npy`` float32 (n, D + 2 + H): per file the embedding f (D), its predicted VA (2) and
  its projection through its half of the similarity decoder's first layer (H, see below), one shard per
  embedding batch (at most 4,096 files), written atomically;
* ``index.sqlite``: ``items(sha, shard, row, windows)`` and a ``files(path, size, mtime_ns, sha)`` table
  so an unchanged file (same size and modification time) is not even re-read to be hashed.

Search streams the collection in chunks of ``chunk_size`` rows read from the memory-mapped shards (each
shard unmapped once read) and keeps a running top-k, so memory is bounded by the chunk, not the
collection.

Scores. The similarity decoder takes [f_I, f_M] (CDCML eq. 5); its first layer is linear, so
W [f_I; f_M] + b = W_I f_I + (W_M f_M + b): the collection side's projections are computed when a file is
embedded and cached with it, the query's once, and they are added by broadcasting before the rest of the
decoder (BatchNorm in eval mode is a per-feature affine map, ReLU and the later layers act per pair,
so nothing else needs the pair). The result equals
``model.heads`` up to float rounding (tested); ``rank_by="sim"`` ranks by it. The default,
``rank_by="distance"``, ranks by the squared embedding distance ||f_I - f_M||^2 (the space the CFM/CFR
losses shape), a plain matrix product: on the embedded corpus its top-5 has the higher true S
(docs/retrieval.md). Results report both.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from imem.errors import ImemError
from imem.inference import LoadedModel, Predictor, list_media, media_kind
from imem.io import atomic_path, file_sha256
from imem.models.matching import MatchingModel

DEFAULT_CHUNK = 16384
SHARD_ROWS = 4096  # at most this many files embedded per shard (one shard per flush)


def default_cache_dir() -> Path:
    """``$IMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/imem``, else ``~/.cache/imem``."""
    if os.environ.get("IMEM_CACHE_DIR"):
        return Path(os.environ["IMEM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imem"


# --- the similarity decoder, split -----------------------------------------------------------------------

class SplitSim:
    """The matching model's similarity decoder with its first Linear split into image and music parts."""

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, MatchingModel):
            raise ImemError("retrieval needs a matching model (image and music encoders and a similarity decoder)")
        first = model.sim[0]
        d = first.in_features // 2
        self.w_image, self.w_music = first.weight[:, :d].detach(), first.weight[:, d:].detach()
        self.bias = first.bias.detach()
        self.rest = torch.nn.Sequential(*list(model.sim)[1:]).eval()

    def project(self, f: torch.Tensor, side: str) -> torch.Tensor:
        """W_side f (no bias): (n, D) -> (n, H)."""
        return f @ (self.w_image if side == "image" else self.w_music).T

    @torch.no_grad()
    def scores(self, query_proj: torch.Tensor, items_proj: torch.Tensor) -> torch.Tensor:
        """(Q, H) query projections, (C, H) item projections -> (Q, C) predicted similarity."""
        q, c, h = query_proj.shape[0], items_proj.shape[0], items_proj.shape[1]
        pre = (query_proj + self.bias)[:, None, :] + items_proj[None, :, :]
        return self.rest(pre.reshape(q * c, h)).reshape(q, c)


def squared_distances(q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """||q_i - x_j||^2 for all pairs as |q|^2 - 2 q.x + |x|^2 (one matrix product), clamped at 0."""
    sq_items = torch.linalg.vector_norm(items, dim=1).square()  # no (C, D) temporary
    return (q.square().sum(1, keepdim=True) - 2.0 * (items @ q.T).T + sq_items[None, :]).clamp_min(0.0)


# --- the embedding cache ---------------------------------------------------------------------------------

class EmbeddingCache:
    """Content-keyed embeddings of one modality under one model (see the module docstring)."""

    VERSION = "v1"  # of the layout below; a new layout gets a new folder instead of misreading old shards

    def __init__(self, root: str | Path, model_key: str, space: str, dim: int, proj_dim: int):
        self.dir = Path(root) / self.VERSION / model_key[:24] / space
        self.dim, self.proj_dim = dim, proj_dim
        self.width = dim + 2 + proj_dim
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.dir / "index.sqlite")
            self.db.execute("CREATE TABLE IF NOT EXISTS items (sha TEXT PRIMARY KEY, shard INTEGER, row INTEGER, "
                            "windows INTEGER)")
            self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                            "mtime_ns INTEGER, sha TEXT)")
            self.db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise ImemError(f"embedding cache {self.dir}: {str(exc).splitlines()[0]} (set --cache-dir)") from exc
        self._maps: dict[int, np.ndarray] = {}

    def close(self) -> None:
        self.db.close()
        self._maps.clear()

    def hashes(self, paths: list[Path], progress: bool) -> list[str]:
        """sha256 of each file's bytes; reused from the files table while size and mtime are unchanged."""
        out, fresh = [], []
        for p in tqdm(paths, desc="hashing", unit="file", disable=not progress or len(paths) < 1000):
            try:
                st = p.stat()
            except OSError as exc:
                raise ImemError(f"unreadable file {p}: {exc.strerror}") from exc
            key = str(p.resolve())
            row = self.db.execute("SELECT size, mtime_ns, sha FROM files WHERE path = ?", (key,)).fetchone()
            if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                out.append(row[2])
                continue
            try:
                sha = file_sha256(p)
            except OSError as exc:
                raise ImemError(f"unreadable file {p}: {exc.strerror}") from exc
            out.append(sha)
            fresh.append((key, st.st_size, st.st_mtime_ns, sha))
        if fresh:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", fresh)
            self.db.commit()
        return out

    def lookup(self, shas: list[str]) -> dict[str, tuple[int, int, int]]:
        found = {}
        uniq = list(dict.fromkeys(shas))
        for i in range(0, len(uniq), 500):
            part = uniq[i:i + 500]
            q = f"SELECT sha, shard, row, windows FROM items WHERE sha IN ({','.join('?' * len(part))})"
            for sha, shard, row, windows in self.db.execute(q, part):
                found[sha] = (shard, row, windows)
        return found

    def add(self, shas: list[str], f: torch.Tensor, va: torch.Tensor, proj: torch.Tensor, windows: list[int]) -> None:
        """One new shard holding these rows; the index points at it only once the shard file is complete."""
        import fcntl

        data = torch.cat([f.float(), va.float(), proj.float()], dim=1).numpy().astype(np.float32)
        # concurrent `imem retrieve` runs on one cache: the shard number is chosen, written and indexed
        # under an exclusive lock, so two writers never claim the same shard
        with open(self.dir / "write.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (n,) = self.db.execute("SELECT COALESCE(MAX(shard), -1) + 1 FROM items").fetchone()
            with atomic_path(self._shard_path(n)) as tmp, open(tmp, "wb") as fh:
                np.save(fh, data)
            self.db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?)",
                                [(s, n, i, w) for i, (s, w) in enumerate(zip(shas, windows, strict=True))])
            self.db.commit()

    def _shard_path(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:06d}.npy"

    def shard(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            path = self._shard_path(shard)
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ImemError(f"embedding cache shard {path} is missing or unreadable: delete {self.dir} "
                                "to rebuild it") from exc
            if arr.ndim != 2 or arr.shape[1] != self.width:
                raise ImemError(f"embedding cache shard {path} has shape {arr.shape}, expected (n, {self.width})")
            self._maps[shard] = arr
        return self._maps[shard]

    def read_run(self, shard: int, start: int, out: np.ndarray) -> None:
        """Rows ``start .. start + len(out)`` of a shard read straight into ``out`` (no memory map: the
        pages stay in the OS page cache, not in this process)."""
        path = self._shard_path(shard)
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = header(fh)
                if len(shape) != 2 or shape[1] != self.width or dtype != np.float32 or start + len(out) > shape[0]:
                    raise ImemError(f"embedding cache shard {path} has shape {shape}, expected (n, {self.width})")
                fh.seek(fh.tell() + start * self.width * 4)
                if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
                    raise ImemError(f"embedding cache shard {path} is truncated: delete {self.dir} to rebuild it")
        except OSError as exc:
            raise ImemError(f"embedding cache shard {path} is missing or unreadable: delete {self.dir} "
                            "to rebuild it") from exc

    def release(self, shard: int) -> None:
        """Unmap a shard (its pages leave this process's memory)."""
        self._maps.pop(shard, None)


@dataclass
class Collection:
    """The files of a collection and where their cached embeddings are."""

    paths: list[Path]
    shard: np.ndarray  # (N,) int64
    row: np.ndarray  # (N,) int64
    windows: np.ndarray  # (N,) audio windows per file (1 for images)
    cache: EmbeddingCache
    embedded: int  # files embedded in this call (forward passes)
    cached: int  # files found in the cache

    def __len__(self) -> int:
        return len(self.paths)

    def chunks(self, chunk_size: int):
        """(item indices, (C, width) float32 rows) in chunks, shard by shard (sequential memmap reads);
        a shard is unmapped as soon as the chunks have passed it."""
        order = np.lexsort((self.row, self.shard))
        for start in range(0, len(order), chunk_size):
            idx = order[start:start + chunk_size]
            out = np.empty((len(idx), self.cache.width), dtype=np.float32)
            shard_ids, bounds = np.unique(self.shard[idx], return_index=True)  # idx is sorted by shard
            bounds = list(bounds) + [len(idx)]
            for j, s in enumerate(shard_ids):
                rows = self.row[idx[bounds[j]:bounds[j + 1]]]
                if len(rows) == 1 or np.all(np.diff(rows) == 1):  # a contiguous run (the usual case): one read
                    self.cache.read_run(int(s), int(rows[0]), out[bounds[j]:bounds[j + 1]])
                else:
                    out[bounds[j]:bounds[j + 1]] = self.cache.shard(int(s))[rows]
            for s in shard_ids[:-1]:
                self.cache.release(int(s))
            yield idx, torch.from_numpy(out)
            del out
        self.cache._maps.clear()

    def vectors(self, items: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.cache.shard(int(self.shard[i]))[self.row[i]] for i in items]))


def space_name(side: str, predictor: Predictor) -> str:
    # inputs differ by image size (images) and by window hop (audio): each gets its own cache space
    return f"image-{predictor.image_size}" if side == "image" else f"music-hop{predictor.hop:g}"


def index_collection(predictor: Predictor, paths: list[Path], side: str, cache_dir: str | Path,
                     progress: bool = True) -> Collection:
    """Embed the files of a collection that the cache lacks (only those), and locate every file's row."""
    predictor.require(side, paths[0] if paths else None)
    split = SplitSim(predictor.model)
    dim = int(predictor.cfg["embed_dim"])
    cache = EmbeddingCache(cache_dir, predictor.loaded.key, space_name(side, predictor), dim, split.bias.shape[0])
    shas = cache.hashes(paths, progress)
    found = cache.lookup(shas)
    cached = sum(1 for s in shas if s in found)
    missing: dict[str, Path] = {}
    for p, s in zip(paths, shas, strict=True):
        if s not in found and s not in missing:
            missing[s] = p
    todo = list(missing.items())
    bar = tqdm(total=len(todo), desc=f"embedding {side} collection", unit="file", disable=not progress or not todo)
    if side == "image":
        for start in range(0, len(todo), SHARD_ROWS):
            part = todo[start:start + SHARD_ROWS]
            f, va = predictor.embed_images([p for _, p in part], desc="embedding images")
            cache.add([s for s, _ in part], f, va, split.project(f, side), [1] * len(part))
            bar.update(len(part))
    else:
        buf: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
        for i, (s, w) in enumerate(zip([s for s, _ in todo], predictor.embed_audio_files([p for _, p in todo]),
                                       strict=True)):
            # a file's embedding for retrieval: the mean of its windows' embeddings (docs/retrieval.md)
            buf.append((s, w.f.mean(dim=0, keepdim=True), w.va.mean(dim=0, keepdim=True), len(w.starts)))
            bar.update(1)
            if len(buf) >= SHARD_ROWS or i == len(todo) - 1:
                f = torch.cat([b[1] for b in buf])
                cache.add([b[0] for b in buf], f, torch.cat([b[2] for b in buf]), split.project(f, side),
                          [b[3] for b in buf])
                buf.clear()
    bar.close()
    found = cache.lookup(shas)
    loc = np.array([found[s] for s in shas], dtype=np.int64).reshape(-1, 3)
    return Collection(list(paths), loc[:, 0], loc[:, 1], loc[:, 2], cache, embedded=len(todo), cached=cached)


@torch.no_grad()
def search(collection: Collection, query_f: torch.Tensor, query_side: str, split: SplitSim | None, k: int,
           chunk_size: int = DEFAULT_CHUNK, rank_by: str = "distance", pair_budget: int = 1 << 17,
           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k collection items for each of the Q queries: (Q, k) item indices and their ranking scores
    (predicted S, descending; or squared embedding distance, ascending)."""
    if rank_by not in ("sim", "distance"):
        raise ImemError(f"--rank-by must be sim or distance, got {rank_by!r}")
    if chunk_size < 1:
        raise ImemError(f"--chunk-size must be >= 1, got {chunk_size}")
    k = min(int(k), len(collection))
    if k < 1:
        raise ImemError(f"-k must be >= 1, got {k}")
    dim = collection.cache.dim
    qf = query_f.float()
    q_proj = split.project(qf, query_side) if rank_by == "sim" else None
    nq = qf.shape[0]
    best_v = torch.full((nq, 0), 0.0)
    best_i = torch.zeros((nq, 0), dtype=torch.long)
    n_chunks = -(-len(collection) // chunk_size)
    bar = tqdm(total=n_chunks, desc="searching", unit="chunk", disable=not progress or n_chunks < 2)
    for idx, rows in collection.chunks(chunk_size):  # (no tqdm wrapper: it would hold the previous chunk)
        if rank_by == "sim":
            step = max(1, pair_budget // max(1, len(idx)))  # queries per block: bounds the (q, C, H) tensor
            # rows[:, dim + 2:] = W_item f_item, cached with the embedding
            v = torch.cat([split.scores(q_proj[s:s + step], rows[:, dim + 2:]) for s in range(0, nq, step)])
        else:
            v = -squared_distances(qf, rows[:, :dim])
        allv = torch.cat([best_v, v], dim=1)
        alli = torch.cat([best_i, torch.from_numpy(idx).long().expand(nq, -1)], dim=1)
        top = torch.topk(allv, min(k, allv.shape[1]), dim=1)
        best_v, best_i = top.values, torch.gather(alli, 1, top.indices)
        del rows, v, allv, alli  # before the next chunk is read: one chunk in memory at a time
        bar.update(1)
    bar.close()
    vals = best_v.numpy() if rank_by == "sim" else -best_v.numpy()
    return best_i.numpy(), vals


# --- imem retrieve -----------------------------------------------------------------------------------------

@dataclass
class Query:
    path: Path
    side: str  # "image" or "music"
    f: torch.Tensor  # (1, D): the image's embedding, or the mean of the audio windows' embeddings
    va: np.ndarray  # (2,): predicted VA (for audio: the mean over windows)
    windows: int


def embed_query(predictor: Predictor, path: Path, side: str) -> Query:
    kind = media_kind(path)
    want = "image" if side == "image" else "audio"
    if kind != want:
        raise ImemError(f"--{'image' if side == 'image' else 'audio'} expects an {want} file, got {path}")
    if side == "image":
        f, va = predictor.embed_images([path])
        return Query(path, side, f, va[0].numpy(), 1)
    w = predictor.embed_audio(path)
    # an audio query of several windows: the mean of their embeddings (docs/retrieval.md)
    return Query(path, side, w.f.mean(dim=0, keepdim=True), w.va.mean(dim=0).numpy(), len(w.starts))


def retrieve(loaded: LoadedModel, query_path: str | Path, query_side: str, collection_dir: str | Path, k: int = 10,
             cache_dir: str | Path | None = None, chunk_size: int = DEFAULT_CHUNK, hop: float | None = None,
             rank_by: str = "distance", image_size: int = 224, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Rank the collection's files for one query file. Returns the results table and a summary."""
    if loaded.kind != "matching":
        raise ImemError(f"retrieve needs a matching model; {loaded.name} is unimodal "
                        "(it predicts VA only: use it with `imem predict`)")
    query_path = Path(query_path)
    if not query_path.is_file():
        raise ImemError(f"query file not found: {query_path}")
    # argument errors before the (possibly long) embedding of the collection
    if int(k) < 1:
        raise ImemError(f"-k must be >= 1, got {k}")
    if int(chunk_size) < 1:
        raise ImemError(f"--chunk-size must be >= 1, got {chunk_size}")
    if rank_by not in ("sim", "distance"):
        raise ImemError(f"--rank-by must be sim or distance, got {rank_by!r}")
    item_side = "music" if query_side == "image" else "image"
    paths = list_media(collection_dir, "image" if item_side == "image" else "audio")
    predictor = Predictor(loaded, image_size=image_size, hop=hop, progress=progress)
    split = SplitSim(loaded.model)
    query = embed_query(predictor, query_path, query_side)
    coll = index_collection(predictor, paths, item_side, cache_dir or default_cache_dir(), progress)
    try:
        items, _ = search(coll, query.f, query_side, split, k, chunk_size, rank_by, progress=progress)
        items = items[0]
        vec = coll.vectors(items)
        dim = coll.cache.dim
        f_items, va_items = vec[:, :dim], vec[:, dim:dim + 2].numpy()
        # the reported S of each result: the model's own decoder on [f_I, f_M] (what the split reproduces)
        with torch.no_grad():
            fq = query.f.expand(len(items), -1)
            cat = torch.cat([f_items, fq] if item_side == "image" else [fq, f_items], dim=1)
            sim = loaded.model.sim(cat).squeeze(1).numpy()
        dist = squared_distances(query.f, f_items)[0].numpy()
    finally:
        coll.cache.close()
    df = pd.DataFrame({
        "rank": np.arange(1, len(items) + 1),
        "path": [str(coll.paths[i]) for i in items],
        "predicted_s": sim,
        "valence": va_items[:, 0],
        "arousal": va_items[:, 1],
        "embedding_distance": dist,
    })
    if item_side == "music":
        df["windows"] = coll.windows[items]
    summary = {"query": str(query_path), "query_type": "audio" if query_side == "music" else "image",
               "query_valence": float(query.va[0]), "query_arousal": float(query.va[1]),
               "query_windows": query.windows, "collection": str(collection_dir), "collection_size": len(coll),
               "embedded": coll.embedded, "cached": coll.cached, "model": loaded.name, "rank_by": rank_by,
               "hop_s": predictor.hop, "clip_s": predictor.clip_s, "k": len(items),
               "cache_dir": str(coll.cache.dir)}
    return df, summary


def write_results(results: pd.DataFrame, summary: dict, out: str | Path) -> dict[str, Path]:
    """``out``/results.csv, ``out``/summary.json and ``out``/index.html (each written atomically)."""
    from imem.html import render_results
    from imem.io import write_csv, write_json, write_text

    out = Path(out)
    files = {"csv": out / "results.csv", "json": out / "summary.json", "html": out / "index.html"}
    try:
        write_csv(files["csv"], results)
        write_json(files["json"], summary)
        write_text(files["html"], render_results(results, summary, out))
    except OSError as exc:
        raise ImemError(f"--out {out}: cannot write the results ({exc.strerror or exc})") from exc
    return files
