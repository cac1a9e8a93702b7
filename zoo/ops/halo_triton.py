"""Triton backend of halo attention (``backend="triton"`` and ``"triton_key_blocks"``): forward and backward.

The Triton path never builds the overlapping key/value windows that timm's ``HaloAttn`` materialises with
``unfold`` ((b + 2h)^2 / b^2 = 2.25-3x the K/V memory kept for backward): the forward reads each window row in
place with bounds masks (zero padding for free), with an online softmax; the backward is a query-centric kernel
(dq, the relative-logit gradients and each window's dk, dv contributions) plus a fold kernel summing the
overlapping windows per key block, or a key-centric kernel instead (``window_grads``, below): every gradient
element is written by one program in a fixed order, no atomics.
The relative-position logit tables ``q @ height_rel^T`` and ``q @ width_rel^T`` are small fp32 matmuls done in
torch inside the custom ops and rebuilt in the backward rather than kept (they hold more values than q); the
kernels read one table entry per query and window row or column and broadcast it over the keys that share it.
The forward custom op decomposes into the reference's aten ops for ``torch.onnx.export(..., dynamo=True)``.

How the backward gets dk and dv (``window_grads``, an argument of the custom ops, so each backend fixes it):

* ``True`` (backend ``triton``, the default): the dq kernel also writes each query block's window gradients (a
  scratch of (b + 2h)^2 / b^2 times k and v, freed after the call) and a fold kernel sums the overlapping
  windows: each (query, key) pair is computed once.
* ``False`` (backend ``triton_key_blocks``): a key-centric kernel recomputes the probabilities over whole tiles
  of the neighbouring query blocks (no scratch; ~2.9x the pair work at block 8, halo 3, because most of a
  neighbour's tile is outside its window).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._common import register_export_decomposition
from ._triton import launcher, next_pow2, precision
from .reference import halo_logits, halo_windows, pad_to_blocks, query_blocks_to_map

__all__ = ["KERNELS_MODULE", "halo_attention_triton", "halo_flops", "rel_table_flops"]

KERNELS_MODULE = f"{__package__}._halo_kernels"  # whose definition mode the dispatch checks
_NUM_WARPS = 4  # when autotuning is off


def _kernels():
    """The kernel module, imported at first use so that ``TRITON_INTERPRET`` set before that point applies."""
    from . import _halo_kernels

    return _halo_kernels


def _geometry(q, k, block_size, halo_size, query_stride):
    H, W = k.shape[2], k.shape[3]
    bq = block_size // query_stride
    return {
        "H": H,
        "W": W,
        "n_bh": -(-H // block_size),
        "n_bw": -(-W // block_size),
        "bq": bq,
        "win": block_size + 2 * halo_size,
        "blocks": {
            "B_SIZE": block_size,
            "HALO": halo_size,
            "BQ": bq,
            "WIN": block_size + 2 * halo_size,
            "BLOCK_M": max(16, next_pow2(bq * bq)),
            "BLOCK_DQK": max(16, next_pow2(q.shape[-1])),
        },
    }


def _options(q, rel_h, pad_mask) -> dict[str, object]:
    return {"HAS_REL": rel_h is not None, "MASK_PAD": pad_mask, "PRECISION": precision(q.dtype)}


def _halo_forward(q, k, v, rel_h, rel_w, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask):
    K = _kernels()
    B, nh, Hq, Wq, d_qk = q.shape
    d_v = v.shape[-1]
    geo = _geometry(q, k, block_size, halo_size, query_stride)
    out = torch.empty(B, nh, Hq, Wq, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, nh, Hq, Wq, dtype=torch.float32, device=q.device)
    rel_h_arg = rel_h if rel_h is not None else lse  # unused pointer when HAS_REL is False
    rel_w_arg = rel_w if rel_w is not None else lse
    rel_strides = rel_h.stride() if rel_h is not None else (0,) * 5
    log2e = math.log2(math.e)
    rel_coef = scale if scale_pos_embed else 1.0
    fwd, tuning = launcher(K.halo_fwd, K.TUNE_KEY, _NUM_WARPS)
    fwd[(geo["n_bh"] * geo["n_bw"], B * nh)](
        q, k, v, rel_h_arg, rel_w_arg, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *rel_strides, *out.stride(), *lse.stride(),
        nh, geo["n_bw"], geo["H"], geo["W"], Hq, Wq, d_qk, d_v, scale * log2e, rel_coef * log2e,
        **geo["blocks"], BLOCK_KX=max(16, next_pow2(geo["win"])), BLOCK_DV=max(16, next_pow2(d_v)),
        **_options(q, rel_h, pad_mask), **tuning,
    )  # fmt: skip
    return out, lse


def _halo_backward(
    grad_out, q, k, v, rel_h, rel_w, out, lse, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask,
    window_grads,
):  # fmt: skip
    K = _kernels()
    B, nh, Hq, Wq, d_qk = q.shape
    d_v = v.shape[-1]
    geo = _geometry(q, k, block_size, halo_size, query_stride)
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    has_rel = rel_h is not None
    drel_h = torch.zeros(rel_h.shape if has_rel else 0, dtype=torch.float32, device=q.device)
    drel_w = torch.zeros(rel_w.shape if has_rel else 0, dtype=torch.float32, device=q.device)
    rel_args = (rel_h, rel_w) if has_rel else (lse, lse)
    drel_args = (drel_h, drel_w) if has_rel else (lse, lse)
    # DRH/DRW are written with RH's strides: both contiguous (the tables are built by _rel_logits_tables)
    rel_strides = rel_h.stride() if has_rel else (0,) * 5
    log2e = math.log2(math.e)
    rel_scale = scale if scale_pos_embed else 1.0
    coefs = (scale * log2e, rel_scale * log2e)
    options = _options(q, rel_h, pad_mask)
    block_dv = max(16, next_pow2(d_v))
    reach = -(-halo_size // block_size)  # key blocks a window reaches beyond its own, each way
    block_b = max(4, next_pow2(block_size))
    n_blocks = geo["n_bh"] * geo["n_bw"]
    if window_grads:
        # in k's dtype, as timm's unfold backward keeps its window gradients; the fold sums them in fp32
        scratch = torch.empty(B, nh, n_blocks, geo["win"], geo["win"], d_qk + d_v, dtype=k.dtype, device=k.device)
        scratch_strides = scratch.stride()
    else:
        scratch, scratch_strides = lse, (0,) * 6  # unused pointer
    bwd_dq, tuning = launcher(K.halo_bwd_dq, K.TUNE_KEY, _NUM_WARPS)
    bwd_dq[(n_blocks, B * nh)](
        q, k, v, *rel_args, grad_out, lse, delta, dq, *drel_args, scratch,
        *q.stride(), *k.stride(), *v.stride(), *rel_strides, *grad_out.stride(), *dq.stride(), *lse.stride(),
        *scratch_strides,
        nh, geo["n_bw"], geo["H"], geo["W"], Hq, Wq, d_qk, d_v, *coefs, scale, rel_scale,
        **geo["blocks"], BLOCK_KX=max(16, next_pow2(geo["win"])), BLOCK_DV=block_dv, **options, **tuning,
        WINDOW_GRADS=window_grads,
    )  # fmt: skip
    if window_grads:
        fold, tuning = launcher(K.halo_fold, K.FOLD_TUNE_KEY, _NUM_WARPS)
        fold[(n_blocks, B * nh)](
            scratch, dk, dv, *scratch_strides, *dk.stride(), *dv.stride(),
            nh, geo["n_bh"], geo["n_bw"], geo["H"], geo["W"], d_qk, d_v,
            B_SIZE=block_size, HALO=halo_size, WIN=geo["win"], REACH=reach, BLOCK_B=block_b,
            BLOCK_DQK=geo["blocks"]["BLOCK_DQK"], BLOCK_DV=block_dv, **tuning,
        )  # fmt: skip
    else:
        bwd_dkdv, tuning = launcher(K.halo_bwd_dkdv, K.TUNE_KEY, _NUM_WARPS)
        bwd_dkdv[(n_blocks, B * nh)](
            q, k, v, *rel_args, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *rel_strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *lse.stride(),
            nh, geo["n_bh"], geo["n_bw"], geo["H"], geo["W"], Hq, Wq, d_qk, d_v, *coefs, scale,
            **geo["blocks"], REACH=reach, BLOCK_B=block_b, BLOCK_DV=block_dv, **options, **tuning,
        )  # fmt: skip
    return dq, dk, dv, drel_h, drel_w


def _rel_logits_tables(q, rel_pos, block_size, query_stride):
    """``q @ height_rel^T`` and ``q @ width_rel^T`` in fp32 over whole query blocks: ``(B, nh, Hq', Wq', 2*win-1)``,
    and the fp32, block-padded q they came from."""
    bq = block_size // query_stride
    Hq, Wq = q.shape[2], q.shape[3]
    q_p = F.pad(q.float(), (0, 0, 0, -Wq % bq, 0, -Hq % bq))  # whole blocks, so FLOPs match the reference
    return tuple(q_p @ table.float().transpose(0, 1) for table in rel_pos), q_p


@torch.library.custom_op("zoo::halo_attn_triton_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def halo_attn_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    height_rel: torch.Tensor | None,
    width_rel: torch.Tensor | None,
    block_size: int,
    halo_size: int,
    query_stride: int,
    scale: float,
    scale_pos_embed: bool,
    pad_mask: bool,
    window_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, nh, Hq, Wq, d_v), lse (B, nh, Hq, Wq) fp32 base 2)``; height_rel/width_rel: ``(2*win-1, d_qk)``.

    The relative-logit tables (``q @ table^T``, fp32, 27 entries per query at win 14: larger than q) are built
    here and rebuilt in the backward, never kept: the backward saves q, k, v, the position tables, out, lse.
    ``window_grads`` only chooses how the backward gets dk and dv (module docstring); the forward ignores it."""
    rel_h = rel_w = None
    if height_rel is not None:
        (rel_h, rel_w), _ = _rel_logits_tables(q, (height_rel, width_rel), block_size, query_stride)
    return _halo_forward(q, k, v, rel_h, rel_w, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask)


@halo_attn_triton_fwd.register_fake
def _(q, k, v, height_rel, width_rel, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask, *_):
    B, nh, Hq, Wq, _ = q.shape
    return q.new_empty(B, nh, Hq, Wq, v.shape[-1]), q.new_empty(B, nh, Hq, Wq, dtype=torch.float32)


@register_export_decomposition(torch.ops.zoo.halo_attn_triton_fwd.default)
def _halo_fwd_decomposition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    height_rel: torch.Tensor | None,
    width_rel: torch.Tensor | None,
    block_size: int,
    halo_size: int,
    query_stride: int,
    scale: float,
    scale_pos_embed: bool,
    pad_mask: bool,
    window_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    # the reference's formulation with logits in fp32 (as the kernel), plus the kernel's base-2 log-sum-exp
    acc = torch.promote_types(q.dtype, torch.float32)
    rel_pos = None if height_rel is None else (height_rel.to(acc), width_rel.to(acc))
    logits = halo_logits(
        q.to(acc), k.to(acc), block_size, halo_size, rel_pos, scale, scale_pos_embed, query_stride, pad_mask
    )  # (B, nh, nb, bq*bq, win*win)
    out = torch.softmax(logits, dim=-1).to(v.dtype) @ halo_windows(pad_to_blocks(v, block_size), block_size, halo_size)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True).float() * math.log2(math.e)
    Hq, Wq, bq = q.shape[2], q.shape[3], block_size // query_stride
    return query_blocks_to_map(out, Hq, Wq, bq).contiguous(), query_blocks_to_map(lse, Hq, Wq, bq)[..., 0].contiguous()


@torch.library.custom_op("zoo::halo_attn_triton_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def halo_attn_triton_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    height_rel: torch.Tensor | None,
    width_rel: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_size: int,
    halo_size: int,
    query_stride: int,
    scale: float,
    scale_pos_embed: bool,
    pad_mask: bool,
    window_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, d height_rel, d width_rel)``; the last two are empty tensors without relative positions.

    The kernels give the gradients of the logit tables; this chains them through ``q @ table^T`` in fp32 (what
    autograd would do, without keeping the tables): ``dq += dRH @ height_rel + dRW @ width_rel`` and
    ``d height_rel = dRH^T @ q`` summed over queries."""
    has_rel = height_rel is not None
    rel_h = rel_w = q_p = None
    if has_rel:
        (rel_h, rel_w), q_p = _rel_logits_tables(q, (height_rel, width_rel), block_size, query_stride)
    dq, dk, dv, drel_h, drel_w = _halo_backward(
        grad_out, q, k, v, rel_h, rel_w, out, lse, block_size, halo_size, query_stride, scale, scale_pos_embed,
        pad_mask, window_grads,
    )  # fmt: skip
    if not has_rel:
        return dq, dk, dv, drel_h, drel_w
    Hq, Wq = q.shape[2], q.shape[3]
    tables = (height_rel.float(), width_rel.float())
    dq_rel = (drel_h @ tables[0] + drel_w @ tables[1])[:, :, :Hq, :Wq]  # the padded queries are not q's
    dq = (dq.float() + dq_rel).to(q.dtype)
    q_flat = q_p.reshape(-1, q_p.shape[-1])
    d_tables = [g.reshape(-1, g.shape[-1]).transpose(0, 1) @ q_flat for g in (drel_h, drel_w)]  # (2*win-1, d_qk)
    return dq, dk, dv, d_tables[0].to(height_rel.dtype), d_tables[1].to(width_rel.dtype)


@halo_attn_triton_bwd.register_fake
def _(grad_out, q, k, v, height_rel, width_rel, out, lse, *args):
    if height_rel is None:
        rel = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    else:
        rel = (height_rel.new_empty(height_rel.shape), width_rel.new_empty(width_rel.shape))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *rel)


def _setup_context(ctx, inputs, output):
    q, k, v, height_rel, width_rel, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, height_rel, width_rel, out, lse)
    ctx.args = args


def _backward(ctx, grad_out, grad_lse):
    q, k, v, height_rel, width_rel, out, lse = ctx.saved_tensors
    dq, dk, dv, d_height, d_width = halo_attn_triton_bwd(grad_out, q, k, v, height_rel, width_rel, out, lse, *ctx.args)
    if height_rel is None:
        d_height = d_width = None
    return dq, dk, dv, d_height, d_width, *(None,) * len(ctx.args)


halo_attn_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def halo_flops(q_shape, v_shape, block_size: int, halo_size: int, query_stride: int, k_hw: tuple[int, int]) -> int:
    """Forward FLOPs of ``q @ k^T`` and ``p @ v`` over whole (padded) blocks, as timm's HaloAttn does them."""
    B, nh, _, _, d_qk = q_shape
    bq, win = block_size // query_stride, block_size + 2 * halo_size
    blocks = -(-k_hw[0] // block_size) * -(-k_hw[1] // block_size)
    return 2 * B * nh * blocks * bq * bq * win * win * (d_qk + v_shape[-1])


def rel_table_flops(q_shape, table_shape, block_size: int, query_stride: int) -> int:
    """FLOPs of one ``q @ table^T`` over whole query blocks (as the reference's relative logits)."""
    B, nh, Hq, Wq, d_qk = q_shape
    bq = block_size // query_stride
    return 2 * B * nh * (-(-Hq // bq) * bq) * (-(-Wq // bq) * bq) * d_qk * table_shape[0]


@register_flop_formula(torch.ops.zoo.halo_attn_triton_fwd)
def _halo_fwd_flop(q_shape, k_shape, v_shape, th, tw, block_size, halo_size, query_stride, *a, out_shape=None, **kw):
    flops = halo_flops(q_shape, v_shape, block_size, halo_size, query_stride, k_shape[2:4])
    if th is not None:  # the two logit tables
        flops += 2 * rel_table_flops(q_shape, th, block_size, query_stride)
    return flops


@register_flop_formula(torch.ops.zoo.halo_attn_triton_bwd)
def _halo_bwd_flop(g_shape, q_shape, k_shape, v_shape, th, tw, o, lse, block_size, halo_size, query_stride, *a, **kw):
    flops = 2 * halo_flops(q_shape, v_shape, block_size, halo_size, query_stride, k_shape[2:4])
    if th is not None:  # per table: rebuilt (1 matmul), then its q and table gradients (2)
        flops += 2 * 3 * rel_table_flops(q_shape, th, block_size, query_stride)
    return flops


def halo_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    scale_pos_embed: bool,
    query_stride: int,
    pad_mask: bool,
    window_grads: bool = True,
) -> torch.Tensor:
    """Backend entry point; arguments as :func:`zoo.ops.halo_attention` (already validated), plus ``window_grads``
    (how the backward gets dk and dv, see the module docstring)."""
    height_rel, width_rel = rel_pos if rel_pos is not None else (None, None)
    out, _ = halo_attn_triton_fwd(
        q, k, v, height_rel, width_rel, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask,
        window_grads,
    )  # fmt: skip
    return out
