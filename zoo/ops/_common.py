"""What both ops and their backends share, Triton aside (see :mod:`zoo.ops._triton`): argument checks, the region
layout of routed attention (used by its reference and backends), and the registration of export decompositions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch._decomp

__all__ = [
    "FLOAT_DTYPES",
    "check_same_device_dtype",
    "from_regions",
    "key_valid_regions",
    "normalize_pair",
    "register_export_decomposition",
    "to_regions",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_Fn = TypeVar("_Fn", bound=Callable)


def register_export_decomposition(op: torch._ops.OpOverload) -> Callable[[_Fn], _Fn]:
    """Decorator: ``fn`` computes custom op ``op`` in plain aten ops, entered in torch's decomposition table.

    ``torch.onnx.export(..., dynamo=True)`` decomposes every op that has no ONNX function through that table
    (``torch._decomp.decomposition_table``), so a model whose graph holds one of zoo's custom ops exports
    without a custom translation table. ``torch.compile`` and ``torch.export`` keep the op (their tables are
    explicit lists); FakeTensor uses ``fn`` for shape propagation under symbolic sizes, so it must return the
    op's shapes, dtypes and (contiguous) strides.
    """

    def decorate(fn: _Fn) -> _Fn:
        torch._decomp.decomposition_table.pop(op, None)  # a re-imported module replaces its entry
        torch._decomp.register_decomposition(op)(fn)
        return fn

    return decorate


def normalize_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``8 -> (8, 8)``; checks both entries are positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (rh, rw), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} entries must be >= 1, got {pair}")
    return pair


def to_regions(x: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
    """``(B, nh, H, W, d) -> (B, nh, R, rh*rw, d)``, regions row-major, tokens row-major inside a region."""
    B, nh, H, W, d = x.shape
    x = x.reshape(B, nh, H // rh, rh, W // rw, rw, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, nh, (H // rh) * (W // rw), rh * rw, d)


def from_regions(x: torch.Tensor, H: int, W: int, rh: int, rw: int) -> torch.Tensor:
    """Inverse of :func:`to_regions`: ``(B, nh, R, rh*rw, d) -> (B, nh, H, W, d)``."""
    B, nh, _, _, d = x.shape
    x = x.reshape(B, nh, H // rh, W // rw, rh, rw, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, nh, H, W, d)


def key_valid_regions(
    H: int, W: int, rh: int, rw: int, key_padding: tuple[int, int] | None, device: torch.device
) -> torch.Tensor | None:
    """Bool ``(R, rh*rw)``: token ``t`` of region ``r`` is a valid key; ``None`` when nothing is masked."""
    if key_padding is None:
        return None
    valid_h, valid_w = key_padding
    valid = (torch.arange(H, device=device) < valid_h)[:, None] & (torch.arange(W, device=device) < valid_w)[None, :]
    return to_regions(valid[None, None, :, :, None], rh, rw)[0, 0, :, :, 0]


def check_same_device_dtype(named: dict[str, torch.Tensor]) -> None:
    """All tensors on one device with one floating dtype."""
    items = list(named.items())
    first_name, first = items[0]
    if first.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{first_name} must be float16/bfloat16/float32/float64, got {first.dtype}")
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; cast them to one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
