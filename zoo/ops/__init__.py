"""Attention ops with interchangeable backends: PyTorch references, a lean PyTorch path, Triton kernels, Flex.

Public functions (models call only these):

* :func:`region_routing` -- top-k region routing of bi-level routing attention (BiFormer).
* :func:`routed_attention` -- every query of a region attends to all tokens of its routed regions.
* :func:`halo_attention` -- blocked local attention with halos and factorised relative positions (HaloNet).

Backend selection (``backend=`` argument, ``ZOO_OPS_BACKEND`` environment variable, ``"auto"``) is described in
:mod:`zoo.ops._dispatch`; :func:`available_backends` lists the backends per op and :func:`backend_support`
says which of them accept given inputs and why the others do not.
"""

from __future__ import annotations

import torch

from . import dense as _dense
from . import flex as _flex
from . import halo_attn as _halo
from . import lean as _lean
from . import routed_attn as _routed
from ._common import validate_routed
from ._dispatch import (
    ENV_VAR,
    Backend,
    BackendUnavailableError,
    available_backends,
    backend_reasons,
    register_backend,
    select_backend,
)
from .reference import region_routing_reference, routed_attention_reference

__all__ = [
    "ENV_VAR",
    "BackendUnavailableError",
    "available_backends",
    "backend_support",
    "halo_attention",
    "region_routing",
    "routed_attention",
    "select_routed_backend",
]

# ---------------------------------------------------------------------------------------------- routing


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


# ------------------------------------------------------------------------------------- routed attention


def _routed_torch(q, k, v, routing_idx, region_size, scale, key_padding):
    return routed_attention_reference(q, k, v, routing_idx, region_size, scale, key_padding)


register_backend(
    "routed_attention",
    Backend(
        name="sdpa_dense",
        fn=_dense.routed_attention_dense,
        check=_dense.check_dense,
        auto_check=_dense.auto_check_dense,
        description="dense SDPA with a routing bias: auto on CUDA for small regions (faster there, measured)",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="triton",
        fn=_routed.routed_attention_triton,
        check=_routed.check_triton,
        auto_check=_routed.auto_check_triton,
        description="fused Triton kernels: online-softmax forward, deterministic KV-centric backward",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="torch_lean",
        fn=_lean.routed_attention_lean,
        check=_lean.check_lean,
        auto_check=_lean.auto_check_lean,
        description="PyTorch, chunked over query regions, recomputing backward: no top-k copy of K/V kept",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="torch",
        fn=_routed_torch,
        check=lambda problem: None,
        description="PyTorch reference, the original BiFormer gather formulation (copies K/V top-k times)",
    ),
)
register_backend(
    "routed_attention",
    Backend(
        name="flex",
        fn=_flex.routed_attention_flex,
        check=_flex.check_flex_routed,
        auto_check=lambda problem: "flex is a benchmark peer; never picked automatically",
        description="torch FlexAttention with a routing block mask (benchmark peer)",
    ),
)


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


# --------------------------------------------------------------------------------------- halo attention

halo_attention = _halo.halo_attention


# -------------------------------------------------------------------------------------- introspection


def backend_support(op: str, *args, **kwargs) -> dict[str, str | None]:
    """For ``op`` called with ``args``/``kwargs``: each backend -> ``None`` if it supports them, else why not.

    Example: ``zoo.ops.backend_support("routed_attention", q, k, v, idx, 2, 0.125)``.
    """
    kwargs.pop("backend", None)
    if op == "routed_attention":
        problem = validate_routed(*args, **kwargs)
    elif op == "halo_attention":
        problem = _halo.halo_problem(*args, **kwargs)
    else:
        raise KeyError(f"unknown op {op!r}; known ops: {sorted(available_backends())}")
    return backend_reasons(op, problem)
