"""Halo attention (HaloNet): the public function, its checks, and its backends.

Backends, in ``auto`` preference order (:mod:`zoo.ops._dispatch`):

* ``triton`` -- fused Triton kernels (:mod:`zoo.ops.halo_triton`), no unfold copy, deterministic backward whose
  dk, dv sum each query block's window gradients (``window_grads=True``); auto on CUDA.
* ``triton_key_blocks`` -- the same kernels, dk and dv from a key-centric kernel instead (no window scratch,
  ~2.9x the pair work at block 8, halo 3); forced by name only (a benchmark peer and a memory option).
* ``torch`` -- the reference (timm's unfold formulation), :func:`zoo.ops.reference.halo_attention_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _triton
from ._common import check_same_device_dtype
from ._dispatch import Backend, register_backend, select_backend
from .halo_triton import KERNELS_MODULE, halo_attention_triton
from .reference import halo_attention_reference

__all__ = ["HaloProblem", "halo_attention", "halo_problem", "select_halo_backend"]

# ------------------------------------------------------------------------------------------- checks


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


def halo_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    scale_pos_embed: bool = False,
    query_stride: int = 1,
    pad_mask: bool = False,
) -> HaloProblem:
    """Validate the arguments of :func:`halo_attention`; return the problem description."""
    for name, t, layout in (
        ("q", q, "(B, nh, Hq, Wq, d_qk)"),
        ("k", k, "(B, nh, H, W, d_qk)"),
        ("v", v, "(B, nh, H, W, d_v)"),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape {layout} (5 dims), got {shape}")
    check_same_device_dtype({"q": q, "k": k, "v": v})
    for name, value, low in (
        ("block_size", block_size, 1),
        ("halo_size", halo_size, 0),
        ("query_stride", query_stride, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if block_size % query_stride:
        raise ValueError(
            f"block_size {block_size} must be a multiple of query_stride {query_stride} (timm pools the output "
            "instead in that case: run with query_stride=1 and avg-pool the result)"
        )
    if k.shape != (*q.shape[:2], *k.shape[2:4], q.shape[-1]):
        raise ValueError(
            f"k must have shape (B, nh, H, W, d_qk) with B, nh, d_qk of q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:4] != k.shape[:4]:
        raise ValueError(
            f"v must have shape (B, nh, H, W, d_v) with B, nh, H, W of k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    H, W = k.shape[2], k.shape[3]
    expected_q = (-(-H // query_stride), -(-W // query_stride))
    if tuple(q.shape[2:4]) != expected_q:
        raise ValueError(
            f"q has a {q.shape[2]}x{q.shape[3]} map but keys are {H}x{W} with query_stride {query_stride}: "
            f"expected {expected_q[0]}x{expected_q[1]} (ceil(H / stride), as a strided 1x1 conv gives)"
        )
    if min(q.numel(), v.shape[-1]) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, v {tuple(v.shape)}")
    win = block_size + 2 * halo_size
    if rel_pos is not None:
        if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
            raise TypeError("rel_pos must be None or a pair (height_rel, width_rel) of (2*win - 1, d_qk) tensors")
        for name, table in zip(("height_rel", "width_rel"), rel_pos):
            if not isinstance(table, torch.Tensor) or tuple(table.shape) != (2 * win - 1, q.shape[-1]):
                shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
                raise ValueError(
                    f"rel_pos {name} must have shape (2*win - 1, d_qk) = ({2 * win - 1}, {q.shape[-1]}) for "
                    f"block {block_size} + 2 x halo {halo_size}, got {shape}"
                )
            if table.device != q.device or not table.is_floating_point():
                raise TypeError(
                    f"rel_pos {name} must be a float tensor on {q.device}, got {table.dtype} on {table.device}"
                )
    if scale is not None and (not isinstance(scale, (float, int)) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    tensors = [q, k, v, *(rel_pos or ())]
    return HaloProblem(
        device=q.device,
        dtype=q.dtype,
        d_qk=q.shape[-1],
        d_v=v.shape[-1],
        block_size=block_size,
        halo_size=halo_size,
        query_stride=query_stride,
        has_rel_pos=rel_pos is not None,
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
    )


# ------------------------------------------------------------------------------------------- backends


def _check_triton(problem: HaloProblem) -> str | None:
    reason = _triton.check_triton(problem, KERNELS_MODULE)
    if reason:
        return reason
    if problem.block_size > 16 or problem.block_size + 2 * problem.halo_size > 64:
        return f"block_size {problem.block_size} > 16 or window {problem.block_size + 2 * problem.halo_size} > 64"
    return None


def _halo_triton_key_blocks(q, k, v, block_size, halo_size, rel_pos, scale, scale_pos_embed, query_stride, pad_mask):
    return halo_attention_triton(
        q, k, v, block_size, halo_size, rel_pos, scale, scale_pos_embed, query_stride, pad_mask, window_grads=False
    )


register_backend(
    "halo_attention",
    Backend(
        name="triton",
        fn=halo_attention_triton,
        check=_check_triton,
        auto_check=_triton.auto_check_cuda,
        description="fused Triton kernels, no unfold copy, deterministic backward (dk, dv from window gradients)",
    ),
)
register_backend(
    "halo_attention",
    Backend(
        name="triton_key_blocks",
        fn=_halo_triton_key_blocks,
        check=_check_triton,
        auto_check=lambda problem: "never picked automatically ('triton', the window backward, is the default)",
        description="the Triton kernels with a key-centric dk/dv backward: no window scratch, more recomputation",
    ),
)
register_backend(
    "halo_attention",
    Backend(
        name="torch",
        fn=halo_attention_reference,
        check=lambda problem: None,
        description="PyTorch reference (timm's unfold formulation, padding to whole blocks)",
    ),
)


# ------------------------------------------------------------------------------------- public function


def select_halo_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    scale_pos_embed: bool = False,
    query_stride: int = 1,
    pad_mask: bool = False,
    backend: str = "auto",
) -> str:
    """Name of the backend :func:`halo_attention` would use for these arguments (raises as it would)."""
    problem = halo_problem(q, k, v, block_size, halo_size, rel_pos, scale, scale_pos_embed, query_stride, pad_mask)
    return select_backend("halo_attention", backend, problem).name


def halo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    scale_pos_embed: bool = False,
    query_stride: int = 1,
    pad_mask: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Blocked local attention with halos (HaloNet), timm ``HaloAttn``'s core, on maps of any size.

    The key map ``H x W`` is cut into ``block_size`` (``b``) blocks, bottom/right blocks completed with zero
    keys/values; query block ``(i, j)`` (``b / query_stride`` queries per side) attends jointly to the
    ``win x win`` window (``win = b + 2 * halo_size``) of keys at rows ``i*b - h .. i*b + b + h - 1`` and the same
    cols. Logits, for a query at ``(qy, qx)`` inside its block and a key at ``(ky, kx)`` inside the window::

        rel = q . height_rel[ky - qy + win - 1] + q . width_rel[kx - qx + win - 1]    (0 without rel_pos)
        logit = (q . k) * scale + rel            (scale_pos_embed=False, timm's default)
        logit = (q . k + rel) * scale            (scale_pos_embed=True)

    Args:
        q: ``(B, nh, Hq, Wq, d_qk)`` with ``Hq = ceil(H / query_stride)``, ``Wq = ceil(W / query_stride)``.
        k: ``(B, nh, H, W, d_qk)``; v: ``(B, nh, H, W, d_v)``. Any strides (permuted views are read in place).
        block_size: ``b``, the key block side (timm's ``block_size``).
        halo_size: ``h`` (timm's ``halo_size``).
        rel_pos: ``None`` or ``(height_rel, width_rel)``, each ``(2 * win - 1, d_qk)``: timm's
            ``PosEmbedRel.height_rel`` / ``.width_rel`` (shared by the heads). Gradients flow to them. They may be in
            another float dtype than q (e.g. fp32 parameters under autocast): relative logits are computed in fp32.
        scale: multiplies ``q . k``; default ``d_qk ** -0.5`` (timm's ``HaloAttn.scale``).
        scale_pos_embed: timm's flag: apply ``scale`` to the relative logits too.
        query_stride: ``s`` dividing ``b``: queries come from a stride-``s`` projection (timm's ``block_stride``, a
            strided q conv) and blocks have ``b / s`` queries per side. When timm pools instead
            (``avg_down`` or ``b % stride``), use ``query_stride=1`` and pool the output.
        pad_mask: ``False`` (timm): keys outside the map (the halo beyond the border, and the padding that
            completes the last blocks) are zero vectors that still receive softmax weight through their
            relative logits. ``True``: they are masked out (-inf). Every real query keeps at least its own key.
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"triton"``, ``"triton_key_blocks"`` (the kernels with
            the other dk/dv backward: no window scratch, more recomputation) or ``"torch"`` (the reference); see
            :func:`zoo.ops.available_backends`. ``ZOO_OPS_BACKEND`` overrides ``"auto"``.

    Returns:
        ``(B, nh, Hq, Wq, d_v)`` in q's dtype. For maps that are multiples of ``b`` and ``pad_mask=False`` it equals
        timm's ``HaloAttn`` (fp32 parity 1e-5).

    Reusing timm's ``HaloAttn`` parameters (``attn``), input ``x (B, C, H, W)``::

        q = attn.q(x)                                                  # stride = attn.block_stride
        q = q.view(B, nh, attn.dim_head_qk, *q.shape[-2:]).permute(0, 1, 3, 4, 2)
        kv = attn.kv(x).view(B, nh, attn.dim_head_qk + attn.dim_head_v, H, W)   # per head: [k | v] channels
        k = kv[:, :, :attn.dim_head_qk].permute(0, 1, 3, 4, 2)
        v = kv[:, :, attn.dim_head_qk:].permute(0, 1, 3, 4, 2)
        out = halo_attention(q, k, v, attn.block_size, attn.halo_size,
                             (attn.pos_embed.height_rel, attn.pos_embed.width_rel), attn.scale,
                             attn.scale_pos_embed, attn.block_stride)
        out = attn.pool(out.permute(0, 1, 4, 2, 3).reshape(B, nh * attn.dim_head_v, *out.shape[2:4]))
    """
    problem = halo_problem(q, k, v, block_size, halo_size, rel_pos, scale, scale_pos_embed, query_stride, pad_mask)
    chosen = select_backend("halo_attention", backend, problem)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    rel = tuple(rel_pos) if rel_pos is not None else None
    return chosen.fn(q, k, v, block_size, halo_size, rel, scale, bool(scale_pos_embed), query_stride, bool(pad_mask))
