"""One run trained on several processes: `torchrun --nproc_per_node=N -m qspeech run ...` (data parallel).

torchrun starts N copies of the command and tells each its place in the environment (RANK, WORLD_SIZE,
LOCAL_RANK). Every rank runs the whole pipeline; in the training loop (qspeech.loop, LoopConfig.distributed)
each rank takes its shard of every global batch and the ranks take one optimizer step together: every rank's
loss is a mean over its shard, so its gradients are weighted by its item count and the sum over ranks is divided
by the global count, which gives the update one process computes on the whole batch. Rank 0 (`is_main`) alone
evaluates, checkpoints and writes the run's files; the state file holds every rank's RNG state. What is not
split: features and QAT students are built by one rank (the cache's file lock; main_first) and loaded by the
others.

Without torchrun (or with one process) nothing here initialises anything and every helper is the identity.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# How long a rank may wait in a collective for the others: rank 0 alone distils a QAT upstream (main_first)
# or evaluates dev while the others wait for the next step.
TIMEOUT = timedelta(hours=6)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0 (and a single process): the one that evaluates and writes the run's files."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return world_size() > 1


def active() -> bool:
    """The process group is up: the ranks train together."""
    return launched() and dist.is_available() and dist.is_initialized()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank trains on its own GPU, cuda:LOCAL_RANK (an index in train.device is
    ignored); otherwise `device` itself."""
    return torch.device("cuda", local_rank()) if launched() and device.type == "cuda" else device


@contextlib.contextmanager
def session(device: torch.device | None) -> Iterator[None]:
    """The ranks' process group for the block (gloo on CPU, nccl on CUDA), torn down after it. Nothing
    without torchrun, for device None, or inside another session (which keeps its group)."""
    if device is None or not launched() or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)  # env:// from torchrun
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (it builds a cache entry, they load it)."""
    if active() and not is_main():
        dist.barrier()
    yield
    if active() and is_main():
        dist.barrier()


def shard(items: Sequence[T], r: int | None = None, world: int | None = None) -> list[T]:
    """This rank's part of a global batch: every world-th item from the rank-th. A length-sorted batch
    gives every rank items of similar lengths and sizes that differ by at most one."""
    if r is None:
        if not active():
            return list(items)
        r, world = rank(), world_size()
    return list(items[r::world])


def pack(params: Sequence[torch.Tensor], loss: float, items: int) -> torch.Tensor:
    """One flat buffer to sum over ranks: every gradient times `items` (zeros where a parameter has none),
    then loss * items and items."""
    like = params[0]
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * items for p in params]
    return torch.cat(grads + [torch.tensor([loss * items, items], dtype=like.dtype, device=like.device)])


def unpack(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple[float, int]:
    """The summed buffer back as each parameter's gradient, divided by the global item count; returns the
    loss of the global batch and that count (0: no rank had a usable batch, the gradients are left alone)."""
    total = int(round(float(flat[-1])))
    if total == 0:
        return 0.0, 0
    flat = flat / total
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return float(flat[-2]), total


def all_reduce_gradients(params: Sequence[torch.Tensor], loss: float, items: int) -> tuple[float, int]:
    """The gradients (set on `params`) and the loss of the global batch from every rank's shard; returns
    (loss, global item count). A rank without a usable shard takes part with items=0."""
    flat = pack(params, loss, items)
    dist.all_reduce(flat)
    return unpack(flat, params)


def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0's values in every rank's tensors (in place)."""
    for t in tensors:
        dist.broadcast(t, src=0)


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (e.g. its RNG state), in rank order."""
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
