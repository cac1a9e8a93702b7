"""Input validation, problem descriptions, layout helpers and the registration of export decompositions, shared
by every backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch._decomp

__all__ = [
    "HaloProblem",
    "RoutedProblem",
    "from_regions",
    "interpreter_enabled",
    "key_valid_regions",
    "normalize_pair",
    "register_export_decomposition",
    "to_regions",
    "validate_routed",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


@dataclass(frozen=True)
class RoutedProblem:
    """What a routed-attention backend needs to know to say whether it supports the call."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    height: int
    width: int
    d_qk: int
    d_v: int
    region_size: tuple[int, int]
    num_regions: int
    topk: int
    per_head_routing: bool
    key_padding: tuple[int, int] | None
    requires_grad: bool

    @property
    def region_tokens(self) -> int:
        return self.region_size[0] * self.region_size[1]


@dataclass(frozen=True)
class HaloProblem:
    """What a halo-attention backend needs to know to say whether it supports the call."""

    device: torch.device
    dtype: torch.dtype
    d_qk: int
    d_v: int
    block_size: int
    halo_size: int
    query_stride: int
    has_rel_pos: bool
    requires_grad: bool


def _check_tensor(t: object, name: str, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(t.shape)}")
    return t


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


def validate_routed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing_idx: torch.Tensor,
    region_size: int | tuple[int, int],
    scale: float,
    key_padding: tuple[int, int] | None = None,
) -> RoutedProblem:
    """Check every argument of ``routed_attention``; return the problem description."""
    layout = "(B, nh, H, W, d)"
    _check_tensor(q, "q", 5, "(B, nh, H, W, d_qk)")
    _check_tensor(k, "k", 5, "(B, nh, H, W, d_qk)")
    _check_tensor(v, "v", 5, "(B, nh, H, W, d_v)")
    check_same_device_dtype({"q": q, "k": k, "v": v})
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} {layout}, got {tuple(k.shape)}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(f"v must have shape (B, nh, H, W) = {tuple(q.shape[:4])} plus d_v, got {tuple(v.shape)}")
    B, nh, H, W, d_qk = q.shape
    if min(B, nh, H, W, d_qk, v.shape[-1]) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, v {tuple(v.shape)}")
    rh, rw = normalize_pair(region_size, "region_size")
    if H % rh or W % rw:
        raise ValueError(
            f"map {H}x{W} is not a multiple of region_size {rh}x{rw}; pad q, k, v to "
            f"{-(-H // rh) * rh}x{-(-W // rw) * rw} (and pass key_padding=({H}, {W}) to mask the padding)"
        )
    R = (H // rh) * (W // rw)
    if not isinstance(routing_idx, torch.Tensor) or routing_idx.dim() not in (3, 4):
        shape = tuple(routing_idx.shape) if isinstance(routing_idx, torch.Tensor) else type(routing_idx).__name__
        raise ValueError(f"routing_idx must have shape (B, R, topk) or (B, nh, R, topk), got {shape}")
    if routing_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"routing_idx must be int64 or int32 (as from region_routing), got {routing_idx.dtype}")
    if routing_idx.device != q.device:
        raise ValueError(f"routing_idx is on {routing_idx.device} but q is on {q.device}")
    per_head = routing_idx.dim() == 4
    expected = (B, nh, R) if per_head else (B, R)
    if tuple(routing_idx.shape[:-1]) != expected:
        raise ValueError(
            f"routing_idx must have shape {'(B, nh, R, topk)' if per_head else '(B, R, topk)'} = "
            f"{expected + ('topk',)} for a {H}x{W} map with region_size {rh}x{rw} (R = {R}), "
            f"got {tuple(routing_idx.shape)}"
        )
    topk = routing_idx.shape[-1]
    if not 1 <= topk <= R:
        raise ValueError(f"routing_idx has topk = {topk}; it must be in [1, R = {R}]")
    # out-of-range indices would make the kernels read out of bounds: check them. On CPU with a readable error;
    # on CUDA with an asynchronous device assert (a host-side check would sync the stream at every layer)
    if routing_idx.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(routing_idx.min()), int(routing_idx.max())
        if lo < 0 or hi >= R:
            raise ValueError(f"routing_idx values must be region numbers in [0, {R}), got min {lo} max {hi}")
    elif routing_idx.device.type != "meta" and not torch.compiler.is_compiling():  # meta: shapes only (FLOPs)
        in_range = ((routing_idx >= 0) & (routing_idx < R)).all()
        torch._assert_async(in_range, f"routed_attention: routing_idx values must be region numbers in [0, {R})")
    if not isinstance(scale, (float, int)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if key_padding is not None:
        if (
            not isinstance(key_padding, (tuple, list))
            or len(key_padding) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in key_padding)
        ):
            raise TypeError(f"key_padding must be None or a pair of ints (valid_h, valid_w), got {key_padding!r}")
        key_padding = (int(key_padding[0]), int(key_padding[1]))
        if not (0 <= key_padding[0] <= H and 0 <= key_padding[1] <= W):
            raise ValueError(f"key_padding {key_padding} must satisfy 0 <= valid_h <= H = {H}, 0 <= valid_w <= W = {W}")
    return RoutedProblem(
        device=q.device,
        dtype=q.dtype,
        batch=B,
        heads=nh,
        height=H,
        width=W,
        d_qk=d_qk,
        d_v=v.shape[-1],
        region_size=(rh, rw),
        num_regions=R,
        topk=topk,
        per_head_routing=per_head,
        key_padding=key_padding,
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
    )
