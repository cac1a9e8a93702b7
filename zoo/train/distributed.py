"""torch.distributed setup from the torchrun environment: one process per device, or a single process.

Public API (stable; the other training entry points import it):

* ``init_distributed(backend=None, timeout_s=1800) -> DistInfo``: reads ``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE`` (set by ``torchrun``); when ``WORLD_SIZE > 1`` initialises the default process group with
  nccl on CUDA or gloo on CPU (or ``backend``) and binds the local CUDA device. Without torchrun it returns a
  single-process ``DistInfo`` and initialises nothing.
* ``DistInfo``: ``rank``, ``local_rank``, ``world_size``, ``device``, ``is_main`` (rank 0), ``distributed``.
* ``seed_everything(seed, rank=0) -> int``: seeds ``random``, NumPy and torch with ``seed + rank`` (each rank
  draws different augmentations) and returns it.
* ``rank0_print(*args)``: prints on rank 0 only. ``barrier()``, ``all_reduce_mean(tensor)``,
  ``cleanup()``: no-ops in a single process.
* ``broadcast_buffers(module)``: every rank takes rank 0's buffers (BatchNorm running statistics), so an
  evaluation on all ranks measures the weights rank 0 saves.
* ``StopSignals()``: a context manager that turns SIGTERM / SIGUSR1 (preemption, SLURM's warning signal)
  into a flag the loop polls; the loop then checkpoints and leaves cleanly.

Launch (single node): ``torchrun --nproc-per-node 8 -m zoo.train --model biformer_tiny ...``. Multi-node
(run the same line on every node): ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d
--rdzv-endpoint HOST:29500 --rdzv-id RUN -m zoo.train ...``.
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "StopSignals",
    "broadcast_buffers",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "init_distributed",
    "rank0_print",
    "seed_everything",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None, device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group from torchrun's environment (no-op for a single process).

    Args:
        backend: ``'nccl'``, ``'gloo'``; default nccl when the device is CUDA, gloo otherwise.
        device: ``'cuda'`` or ``'cpu'``; default CUDA when available.
        timeout_s: collective timeout.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python, NumPy and torch with ``seed + rank``; returns the seed used."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


def rank0_print(*args: object, **kwargs: object) -> None:
    """``print`` on rank 0 only (flushes, so torchrun's interleaved output stays ordered)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a copy; the input is unchanged). Identity in one process."""
    if not dist.is_initialized():
        return tensor.clone()
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a copy). Identity in one process."""
    if not dist.is_initialized():
        return tensor.clone()
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, ...) to every rank. No-op in one process.

    Each DDP / FSDP rank updates its own running statistics in training; evaluating with them would measure a
    different model per rank than the one rank 0 saves (and ``zoo validate`` then reads).
    """
    if not dist.is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


class StopSignals:
    """Within the block, SIGTERM and SIGUSR1 set ``received`` (the signal's name) instead of killing the process.

    Schedulers send SIGTERM before preempting a job (SLURM sends SIGUSR1 ahead of time with ``--signal``);
    the loop polls ``received`` after each optimizer step, checkpoints and returns. Outside the main thread
    (where handlers cannot be installed) it does nothing.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
