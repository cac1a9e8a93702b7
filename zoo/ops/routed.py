"""Routed attention (BiFormer's bi-level routing attention): the public functions, their checks, and the backends.

Backends, in ``auto`` preference order (:mod:`zoo.ops._dispatch`), each implemented in its own module:

* ``sdpa_dense`` -- dense SDPA with a routing bias (:mod:`zoo.ops.dense`); auto on CUDA for small regions, where
  it was measured faster than the kernel.
* ``triton`` -- fused Triton kernels (:mod:`zoo.ops.routed_triton`); auto on CUDA otherwise.
* ``torch_lean`` -- PyTorch, chunked, recomputing backward (:mod:`zoo.ops.lean`); auto elsewhere.
* ``torch`` -- the reference, the original gather formulation (:func:`zoo.ops.reference.routed_attention_reference`).
* ``flex`` -- torch FlexAttention with a routing block mask (:mod:`zoo.ops.flex`); a benchmark peer, never auto.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _triton, dense, flex, lean
from ._common import check_same_device_dtype, normalize_pair
from ._dispatch import Backend, register_backend, select_backend
from .reference import region_routing_reference, routed_attention_reference
from .routed_triton import KERNELS_MODULE, routed_attention_triton

__all__ = ["RoutedProblem", "region_routing", "routed_attention", "select_routed_backend", "validate_routed"]

# -------------------------------------------------------------------------------------------- routing


def region_routing(q_region: torch.Tensor, k_region: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-``topk`` key regions for every query region, by region affinity ``q_region @ k_region^T``.

    Args:
        q_region, k_region: ``(B, R, C)`` region-level queries/keys (e.g. region means), or ``(B, nh, R, c)`` for
            per-head routing. BiFormer scales the query before the affinity (``(q_r * scale) @ k_r^T``): pass
            ``q_region * scale`` to reproduce its rounding exactly (a positive scale does not change the order
            otherwise).
        topk: number of routed regions, ``1 <= topk <= R``.

    Returns:
        int64 ``(B, R, topk)`` (or ``(B, nh, R, topk)``): region indices, largest affinity first, ties broken as
        ``torch.topk``. Inputs are detached: routing receives no gradient (as in the original).
    """
    for name, t in (("q_region", q_region), ("k_region", k_region)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (B, R, C) or (B, nh, R, c), got {shape}")
    if q_region.shape != k_region.shape:
        raise ValueError(f"q_region {tuple(q_region.shape)} and k_region {tuple(k_region.shape)} must have one shape")
    if q_region.dtype != k_region.dtype or q_region.device != k_region.device:
        raise TypeError(
            f"q_region ({q_region.dtype}, {q_region.device}) and k_region ({k_region.dtype}, {k_region.device}) "
            "must share dtype and device"
        )
    R = q_region.shape[-2]
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= R:
        raise ValueError(f"topk must be an int in [1, R = {R}], got {topk!r}")
    return region_routing_reference(q_region, k_region, topk)


# ------------------------------------------------------------------------------------------- checks


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


def _check_tensor(t: object, name: str, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(t.shape)}")
    return t


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


# ------------------------------------------------------------------------------------------- backends


def _check_dense(problem: RoutedProblem) -> str | None:
    if problem.key_padding is not None:
        return "key_padding is not supported (fully masked queries would be NaN); use triton or torch_lean"
    if not problem.dtype.is_floating_point:
        return f"dtype {problem.dtype} is not a float dtype"
    return None


def _auto_check_dense(problem: RoutedProblem) -> str | None:
    if problem.device.type != "cuda":
        return "picked automatically on CUDA only (measured there); force backend='sdpa_dense' elsewhere"
    if problem.region_tokens >= dense.MAX_REGION_TOKENS:
        return f"regions of {problem.region_tokens} >= {dense.MAX_REGION_TOKENS} tokens fill the kernel's tiles"
    if problem.num_regions > dense.MAX_DENSE_FACTOR * problem.topk:
        return (
            f"R = {problem.num_regions} > {dense.MAX_DENSE_FACTOR} x topk = {problem.topk}: dense scores cost too much"
        )
    return None


def _check_triton(problem: RoutedProblem) -> str | None:
    return _triton.check_triton(problem, KERNELS_MODULE)


def _check_flex(problem: RoutedProblem) -> str | None:
    if flex.flex_attention_module() is None:
        return "torch.nn.attention.flex_attention is not available in this torch"
    if problem.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {problem.dtype} is not supported by FlexAttention here (float16, bfloat16, float32)"
    if problem.device.type == "cpu":
        if problem.requires_grad:
            return "FlexAttention has no CPU backward (torch raises NotImplementedError); call it under no_grad"
    elif problem.device.type != "cuda":
        return f"FlexAttention runs on CUDA or CPU, got {problem.device}"
    return None


register_backend(
    "routed_attention",
    Backend(
        name="sdpa_dense",
        fn=dense.routed_attention_dense,
        check=_check_dense,
        auto_check=_auto_check_dense,
        description="dense SDPA with a routing bias: auto on CUDA for small regions (faster there, measured)",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="triton",
        fn=routed_attention_triton,
        check=_check_triton,
        auto_check=_triton.auto_check_cuda,
        description="fused Triton kernels: online-softmax forward, deterministic KV-centric backward",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="torch_lean",
        fn=lean.routed_attention_lean,
        check=lambda problem: None,  # any float dtype, any device
        description="PyTorch, chunked over query regions, recomputing backward: no top-k copy of K/V kept",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="torch",
        fn=routed_attention_reference,
        check=lambda problem: None,
        description="PyTorch reference, the original BiFormer gather formulation (copies K/V top-k times)",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="flex",
        fn=flex.routed_attention_flex,
        check=_check_flex,
        auto_check=lambda problem: "flex is a benchmark peer; never picked automatically",
        description="torch FlexAttention with a routing block mask (benchmark peer)",
    ),
)


# ------------------------------------------------------------------------------------ public functions


def select_routed_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing_idx: torch.Tensor,
    region_size: int | tuple[int, int],
    scale: float,
    key_padding: tuple[int, int] | None = None,
    backend: str = "auto",
) -> str:
    """Name of the backend :func:`routed_attention` would use for these arguments (raises as it would)."""
    problem = validate_routed(q, k, v, routing_idx, region_size, scale, key_padding)
    return select_backend("routed_attention", backend, problem).name


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing_idx: torch.Tensor,
    region_size: int | tuple[int, int],
    scale: float,
    key_padding: tuple[int, int] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bi-level routing attention (BiFormer's BRA core): each query region attends to its ``topk`` routed regions.

    Args:
        q, k: ``(B, nh, H, W, d_qk)``; v: ``(B, nh, H, W, d_v)`` -- heads first, like SDPA's ``(B, nh, N, d)`` with
            ``N`` factored into ``H x W``. Any strides are accepted (no copy is made for permuted views).
        routing_idx: int64/int32 ``(B, R, topk)`` shared by every head (BiFormer) or ``(B, nh, R, topk)`` per head,
            e.g. from :func:`region_routing`. Values in ``[0, R)``; repeated entries count the region twice.
        region_size: ``rh`` or ``(rh, rw)`` with ``H % rh == 0`` and ``W % rw == 0`` (else ``ValueError``: the
            caller pads, BiFormer pads itself). ``R = (H // rh) * (W // rw)``; region ``r = i * (W // rw) + j``
            covers rows ``i*rh .. (i+1)*rh - 1`` and cols ``j*rw .. (j+1)*rw - 1``.
        scale: multiplies ``q . k`` before the softmax.
        key_padding: ``None`` (every key is valid, as the original BiFormer: padded tokens are attended) or
            ``(valid_h, valid_w)``: keys at row ``>= valid_h`` or col ``>= valid_w`` are masked out. A query whose
            routed keys are all masked (only possible when none of its routed regions holds a valid key) outputs
            exactly 0 and passes zero gradient, never NaN.
        backend: ``"auto"``, ``"sdpa_dense"``, ``"triton"``, ``"torch_lean"``, ``"torch"`` or ``"flex"`` (see
            :func:`available_backends`); ``ZOO_OPS_BACKEND`` overrides ``"auto"``.

    Returns:
        ``(B, nh, H, W, d_v)`` in ``q``'s dtype: every query of region ``r`` attends jointly (one softmax) to all
        ``rh*rw`` tokens of each of its ``topk`` routed regions, i.e. ``topk*rh*rw`` keys, exactly as the
        original gather formulation (:func:`zoo.ops.reference.routed_attention_reference`).

    Backends: ``sdpa_dense`` (dense SDPA with a routing bias; auto on CUDA for regions under 16 tokens with
    ``R <= 4 * topk`` and no ``key_padding``, where it beats the kernel: :mod:`zoo.ops.dense`), ``triton``
    (fp16/bf16/fp32, d <= 128; auto on CUDA otherwise), ``torch_lean`` (any float; auto elsewhere), ``torch``
    (the reference), ``flex`` (peer; CPU forward only). FLOPs counted by ``FlopCounterMode`` are
    ``2*B*nh*N*topk*rh*rw*(d_qk + d_v)`` forward for every backend but ``sdpa_dense``, which counts its dense work.
    """
    problem = validate_routed(q, k, v, routing_idx, region_size, scale, key_padding)
    chosen = select_backend("routed_attention", backend, problem)
    return chosen.fn(q, k, v, routing_idx, problem.region_size, float(scale), problem.key_padding)
