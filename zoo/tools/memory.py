"""Peak tensor memory of a region of code, on CPU as on CUDA.

CUDA has allocator statistics (``torch.cuda.max_memory_allocated``); the CPU allocator has none, so on
CPU a dispatch mode records the storage of every tensor an op returns and releases it when the storage
dies. Both report the peak of bytes allocated inside the region above what was live on entry, so ratios
between two implementations measured the same way are comparable (absolute CPU numbers exclude
allocator slack and anything allocated outside PyTorch's dispatcher).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory", "track_peak_memory"]


@dataclass
class PeakMemory:
    """Result of :func:`track_peak_memory`: bytes above the level at entry."""

    peak_bytes: int = 0

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def _is_real(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta"


class _StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # results that alias an input (in-place ops, views of tensors made before the region) are not new memory
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if _is_real(a)}
        for t in tree_flatten(out)[0]:
            if not _is_real(t):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._seen or key in inputs:
                continue  # views and in-place results share a storage already counted (or seen at entry)
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


@contextmanager
def track_peak_memory(device: torch.device | str = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak tensor memory allocated inside the ``with`` block (see module docstring)."""
    result = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - base
        return
    tracker = _StorageTracker()
    with tracker:
        yield result
    result.peak_bytes = tracker.peak
