"""Atomic file output: write to a temporary file in the target directory, then rename.

A stage that fails part-way therefore never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask-based mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove what a killed writer of ``path`` left beside it: temporaries ``.<name>.<pid>.*.tmp`` whose
    process is gone (or that carry no pid: written before pids were recorded) and ``.<name>.old``
    (issue 16 item 8: a killed ``features`` stage left 16 MB that later successful runs kept)."""
    removed = []
    prefix = f".{path.name}."
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        # mkstemp's random part has no dots, so another target's temporaries (``.a.b.<pid>.x.tmp`` for a
        # sibling ``a.b`` when cleaning for ``a``) never match
        m = re.fullmatch(r"(?:(\d+)\.)?[a-z0-9_]+\.tmp", p.name[len(prefix):])
        if m is None or (m.group(1) is not None and process_alive(int(m.group(1)))):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and path.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
        removed.append(old)
    return removed


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory ``<tmp>/<prefix><pid>-<random>`` removed on exit, like
    ``tempfile.TemporaryDirectory``; those of earlier processes of the same prefix that are gone (kill -9 of
    a tune worker left its trial's checkpoints in /tmp) are removed first."""
    base = Path(tempfile.gettempdir())
    for p in base.glob(f"{glob.escape(prefix)}*"):
        m = re.fullmatch(r"(\d+)-[A-Za-z0-9_]+", p.name[len(prefix):])
        if m is not None and p.is_dir() and not p.is_symlink() and not process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", dir=base) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``. Temporaries of killed
    earlier writers are removed first (:func:`clean_stale`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish_mode(tmp_path, directory=False)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` whole. Temporaries of
    killed earlier writers are removed first (:func:`clean_stale`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        publish_mode(tmp, directory=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, df: pd.DataFrame, float_format: str = "%.6f") -> None:
    """CSV with a fixed float format, so that reruns produce identical bytes (DVC hashes)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format, lineterminator="\n")


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file (checkpoints are byte-deterministic, so equal models hash equal)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
