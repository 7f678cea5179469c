"""Data-parallel training under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on CUDA).

How a step is split (see :meth:`imem.training.Trainer.run_epoch`): every rank draws the same global batch
(same seed), runs the model -- wrapped in ``torch.nn.parallel.DistributedDataParallel`` (:func:`wrap`; the
wrapped module is the backbones, unless frozen and cached, plus ``model.heads``) -- on its shard of it
(``torch.tensor_split``: contiguous, sizes differ by at most one), and gathers the shards' outputs with an
autograd-aware all_gather. Every rank then evaluates the SAME losses on the whole global batch -- the
feature-ratio losses (CDCML eq. 3-6) compare every pair of the batch, so a per-shard loss would be a
different objective. all_gather's backward sums the gradients of all ranks' (identical) losses into each
shard, i.e. ``world * dL/d(shard)``; DDP's reducer averages the parameter gradients over ranks during
``backward``, which therefore gives exactly the single-process ``dL/dtheta``.

What still differs from one process: BatchNorm in training mode normalises each shard with the shard's
own statistics (SyncBatchNorm is CUDA-only), and dropout masks are drawn per rank. The running statistics
are averaged over ranks after every step (DDP's own buffer broadcast is off) so all ranks keep identical
models. Only rank 0 writes checkpoints and reports, logs to MLflow and reports to Optuna.

The process group's collective timeout is ``$IMEM_DIST_TIMEOUT_S`` seconds (default 86400, one day):
under ``torchrun ... imem tune`` the other ranks wait in a broadcast while rank 0 waits for other
workers' trials, which may take hours; torch's default (10 min for gloo) would kill them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def session(device: torch.device | None = None) -> Iterator[bool]:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1) and it is not joined yet;
    leave it afterwards. Yields whether training is distributed."""
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
        started = True
    try:
        yield active()
    finally:
        if started:
            dist.destroy_process_group()


def shard(idx: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """This rank's contiguous part of a global batch, and every rank's part size."""
    parts = torch.tensor_split(idx, world())
    return parts[rank()], [len(p) for p in parts]


def gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rows ``sizes[r]``) in rank order, with gradients flowing back to each
    rank's own rows (torch.distributed.nn.functional.all_gather). Shards are padded to equal size."""
    from torch.distributed.nn.functional import all_gather

    n = max(sizes)
    if x.shape[0] < n:
        x = torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))])
    parts = all_gather(x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel. Its buffers are not broadcast from rank 0 before every forward
    (:func:`average_buffers` keeps them equal); unused parameters are searched only when some parameter that
    requires a gradient is not reachable from the outputs (a loss weight of 0)."""
    from torch.nn.parallel import DistributedDataParallel

    find_unused = bool(getattr(module, "keys", None)) and _has_unused(module)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused)


def _has_unused(module: torch.nn.Module) -> bool:
    """Whether a trainable parameter of a matching model's heads feeds none of ``module.keys``."""
    m = getattr(module, "model", None)
    if m is None or not hasattr(m, "va_image"):
        return False
    feeds = {"f_image": ("image_head",), "f_music": ("music_head",), "sim": ("image_head", "music_head", "sim"),
             "va_image": ("image_head", "va_image"), "va_music": ("music_head", "va_music")}
    used = {name for k in module.keys for name in feeds[k]}
    return any(p.requires_grad for name in ("image_head", "music_head", "sim", "va_image", "va_music")
               if name not in used for p in getattr(m, name).parameters())


def timeout_s() -> float:
    return float(os.environ.get("IMEM_DIST_TIMEOUT_S", 86400))


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over ranks, so the ranks' models stay
    identical although each normalised its own shard."""
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def broadcast_flag(value: int) -> int:
    """Rank 0's ``value`` on every rank (e.g. "stop": a pruned trial or an error on rank 0)."""
    t = torch.tensor([value], dtype=torch.long)
    dist.broadcast(t, 0)
    return int(t.item())


def barrier() -> None:
    if active():
        dist.barrier()
