"""Data-parallel training under ``torchrun`` (gloo on CPU, NCCL on CUDA).

How a step is split (see :meth:`imem.training.Trainer.run_epoch`): every rank draws the same global batch
(same seed), runs the model on its shard of it (``torch.tensor_split``: contiguous, sizes differ by at most
one), and gathers the shards' outputs with an autograd-aware all_gather. Every rank then evaluates the
SAME losses on the whole global batch -- the feature-ratio losses (CDCML eq. 3-6) compare every pair of
the batch, so a per-shard loss would be a different objective. all_gather's backward sums the gradients
of all ranks' (identical) losses into each shard, i.e. ``world * dL/d(shard)``; averaging the parameter
gradients over ranks (:func:`all_reduce_grads`) therefore gives exactly the single-process ``dL/dtheta``.

Why not ``DistributedDataParallel``: with ``fc_only`` the step calls ``model.heads(...)`` on cached
backbone outputs, not ``model.forward``, and DDP's gradient hooks are armed by ``forward``; the losses
also need the global batch. One flattened all_reduce of the gradients after ``backward`` is what DDP's
reducer does, without the bucketing.

What still differs from one process: BatchNorm in training mode normalises each shard with the shard's
own statistics (SyncBatchNorm is CUDA-only), and dropout masks are drawn per rank. The running statistics
are averaged over ranks after every step so all ranks keep identical models. Only rank 0 writes
checkpoints and reports, logs to MLflow and reports to Optuna.
"""

from __future__ import annotations

import contextlib
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
        dist.init_process_group(backend)
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


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients over ranks (one flattened all_reduce); a missing gradient counts as zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


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
