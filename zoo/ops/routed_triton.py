"""Triton backend of routed attention (``backend="triton"``): fused forward and deterministic backward.

* Forward (``_routed_fwd_kernel``): one program per (query tile of a region, batch x head); it loops over the
  ``topk`` routed regions, loading their K/V tiles in place by index (no gathered copy), with an online
  softmax in fp32; it stores the output and the per-query log-sum-exp.
* Backward: ``delta = rowsum(dO * O)`` in torch, then ``_routed_bwd_dq_kernel`` (query-centric, like the
  forward) and ``_routed_bwd_dkdv_kernel`` (key-centric): each key tile sums over the query regions that routed
  to its region, read from inverted routing lists built with a stable sort. Every gradient element is
  written by one program in a fixed order: no atomics, bitwise reproducible.

Both passes are torch custom ops (``zoo::routed_attn_triton_fwd/bwd``) with FLOP formulas. The kernels run on
CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). The forward decomposes into aten ops
(:func:`zoo.ops.lean.routed_attention_gathered`) for ``torch.onnx.export(..., dynamo=True)`` of a CUDA model.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from ._common import from_regions, register_export_decomposition
from ._triton import launcher, next_pow2, precision
from .lean import routed_attention_gathered, routed_flops

__all__ = ["KERNELS_MODULE", "inverted_routing", "routed_attention_triton"]

KERNELS_MODULE = f"{__package__}._routed_kernels"  # whose definition mode the dispatch checks


def _kernels():
    """The kernel module, imported at first use so that ``TRITON_INTERPRET`` set before that point applies."""
    from . import _routed_kernels

    return _routed_kernels


# ------------------------------------------------------------------------------------------- launching


def _block_sizes(rh: int, rw: int, d_qk: int, d_v: int) -> dict[str, int]:
    tokens = rh * rw
    block = min(64, max(16, next_pow2(tokens)))  # tl.dot needs >= 16; 64 keeps registers in check
    return {
        "BLOCK_M": block,
        "BLOCK_N": block,
        "BLOCK_DQK": max(16, next_pow2(d_qk)),
        "BLOCK_DV": max(16, next_pow2(d_v)),
        "N_MT": math.ceil(tokens / block),
        "N_NT": math.ceil(tokens / block),
        "RH": rh,
        "RW": rw,
    }


def _launch(kernel, blocks: dict[str, int]) -> tuple[object, dict[str, object]]:
    """``kernel`` autotuned or not (:func:`zoo.ops._triton.launcher`), and its options beyond the block sizes."""
    # warps when autotuning is off: 4 for tiles of 64 x 64 and more, else 2
    num_warps = 4 if blocks["BLOCK_M"] * max(blocks["BLOCK_DQK"], blocks["BLOCK_DV"]) >= 64 * 64 else 2
    return launcher(kernel, _kernels().TUNE_KEY, num_warps)


def inverted_routing(idx: torch.Tensor, num_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query regions per key region, for the key-centric backward.

    Args:
        idx: int ``(G, R, topk)`` routing per group ``g`` (batch, or batch x head).

    Returns:
        ``qlist`` int32 ``(G, R*topk)`` and ``offsets`` int32 ``(G, R+1)``: the query regions routed to key region
        ``s`` are ``qlist[g, offsets[g, s]:offsets[g, s+1]]``, ascending (stable sort: deterministic).
    """
    G, R, topk = idx.shape
    keys, order = idx.reshape(G, R * topk).sort(dim=-1, stable=True)
    qlist = torch.div(order, topk, rounding_mode="floor").to(torch.int32).contiguous()
    bounds = torch.arange(num_regions + 1, device=idx.device, dtype=keys.dtype).expand(G, -1).contiguous()
    offsets = torch.searchsorted(keys.contiguous(), bounds).to(torch.int32).contiguous()
    return qlist, offsets


def _triton_forward(q, k, v, idx, rh, rw, scale, valid_h, valid_w):
    K = _kernels()
    B, nh, H, W, d_qk = q.shape
    d_v = v.shape[-1]
    R = (H // rh) * (W // rw)
    out = torch.empty(B, nh, H, W, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, nh, H, W, dtype=torch.float32, device=q.device)
    idx32 = idx.to(torch.int32)
    sib, sih, sir, sit = idx32.stride()
    sih = sih if idx32.shape[1] > 1 else 0  # shared routing: every head reads the batch's table
    blocks = _block_sizes(rh, rw, d_qk, d_v)
    grid = (R * blocks["N_MT"], B * nh)
    vh, vw = (H, W) if valid_h < 0 else (valid_h, valid_w)
    fwd, options = _launch(K.routed_fwd, blocks)
    fwd[grid](
        q, k, v, idx32, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        sib, sih, sir, sit, *lse.stride(),
        nh, W // rw, idx32.shape[-1], d_qk, d_v, vh, vw, scale * math.log2(math.e),
        **blocks, PRECISION=precision(q.dtype), **options,
    )  # fmt: skip
    return out, lse


def _triton_backward(grad_out, q, k, v, out, lse, idx, rh, rw, scale, valid_h, valid_w):
    K = _kernels()
    B, nh, H, W, d_qk = q.shape
    d_v = v.shape[-1]
    R = (H // rh) * (W // rw)
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, nh, H, W)
    dq = torch.empty(B, nh, H, W, d_qk, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, nh, H, W, d_qk, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, nh, H, W, d_v, dtype=v.dtype, device=q.device)
    idx32 = idx.to(torch.int32)
    sib, sih, sir, sit = idx32.stride()
    idx_heads = idx32.shape[1]
    sih = sih if idx_heads > 1 else 0
    blocks = _block_sizes(rh, rw, d_qk, d_v)
    vh, vw = (H, W) if valid_h < 0 else (valid_h, valid_w)
    qk_scale = scale * math.log2(math.e)
    bwd_dq, options = _launch(K.routed_bwd_dq, blocks)
    bwd_dq[(R * blocks["N_MT"], B * nh)](
        q, k, v, grad_out, lse, delta, idx32, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        sib, sih, sir, sit, *lse.stride(),
        nh, W // rw, idx32.shape[-1], d_qk, d_v, vh, vw, qk_scale, scale,
        **blocks, PRECISION=precision(q.dtype), **options,
    )  # fmt: skip
    qlist, offsets = inverted_routing(idx.reshape(B * idx_heads, R, -1), R)
    bwd_dkdv, options = _launch(K.routed_bwd_dkdv, blocks)
    bwd_dkdv[(R * blocks["N_NT"], B * nh)](
        q, k, v, grad_out, lse, delta, qlist, offsets, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
        nh, idx_heads, R, qlist.shape[-1], W // rw, d_qk, d_v, vh, vw, qk_scale, scale,
        **blocks, PRECISION=precision(q.dtype), **options,
    )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("zoo::routed_attn_triton_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def routed_attn_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    rh: int,
    rw: int,
    scale: float,
    valid_h: int,
    valid_w: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, nh, H, W, d_v), lse (B, nh, H, W) fp32 base-2)``; ``idx`` int32 ``(B, nh|1, R, topk)``."""
    return _triton_forward(q, k, v, idx, rh, rw, scale, valid_h, valid_w)


@routed_attn_triton_fwd.register_fake
def _(q, k, v, idx, rh, rw, scale, valid_h, valid_w):
    B, nh, H, W, _ = q.shape
    return q.new_empty(B, nh, H, W, v.shape[-1]), q.new_empty(B, nh, H, W, dtype=torch.float32)


@torch.library.custom_op("zoo::routed_attn_triton_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def routed_attn_triton_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    idx: torch.Tensor,
    rh: int,
    rw: int,
    scale: float,
    valid_h: int,
    valid_w: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped like ``q, k, v``."""
    return _triton_backward(grad_out, q, k, v, out, lse, idx, rh, rw, scale, valid_h, valid_w)


@routed_attn_triton_bwd.register_fake
def _(grad_out, q, k, v, out, lse, idx, rh, rw, scale, valid_h, valid_w):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, idx, rh, rw, scale, valid_h, valid_w = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, idx)
    ctx.args = (rh, rw, scale, valid_h, valid_w)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, idx = ctx.saved_tensors
    dq, dk, dv = routed_attn_triton_bwd(grad_out, q, k, v, out, lse, idx, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


routed_attn_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_export_decomposition(torch.ops.zoo.routed_attn_triton_fwd.default)
def _triton_fwd_decomposition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    rh: int,
    rw: int,
    scale: float,
    valid_h: int,
    valid_w: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = routed_attention_gathered(q, k, v, idx, rh, rw, scale, valid_h, valid_w)
    # the kernel's lse: fp32, base 2, laid out like the queries (B, nh, H, W)
    lse = from_regions(lse[..., None], q.shape[2], q.shape[3], rh, rw)[..., 0]
    return out, (lse.float() * math.log2(math.e)).contiguous()


@register_flop_formula(torch.ops.zoo.routed_attn_triton_fwd)
def _triton_fwd_flop(q_shape, k_shape, v_shape, idx_shape, rh, rw, *args, out_shape=None, **kwargs) -> int:
    B, nh, H, W, d_qk = q_shape
    return routed_flops(B, nh, H * W, idx_shape[-1] * rh * rw, d_qk, v_shape[-1])


@register_flop_formula(torch.ops.zoo.routed_attn_triton_bwd)
def _triton_bwd_flop(grad_shape, q_shape, k_shape, v_shape, o_shape, lse_shape, idx_shape, rh, rw, *a, **kw) -> int:
    B, nh, H, W, d_qk = q_shape  # 2x forward, as the reference's autograd backward (recompute excluded)
    return 2 * routed_flops(B, nh, H * W, idx_shape[-1] * rh * rw, d_qk, v_shape[-1])


def routed_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing_idx: torch.Tensor,
    region_size: tuple[int, int],
    scale: float,
    key_padding: tuple[int, int] | None,
) -> torch.Tensor:
    """Backend entry point; arguments as :func:`zoo.ops.routed_attention` (already validated)."""
    valid_h, valid_w = key_padding if key_padding is not None else (-1, -1)
    idx = (routing_idx if routing_idx.dim() == 4 else routing_idx.unsqueeze(1)).to(torch.int32).contiguous()
    out, _ = routed_attn_triton_fwd(q, k, v, idx, *region_size, scale, valid_h, valid_w)
    return out
