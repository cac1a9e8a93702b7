"""Halo attention (HaloNet): public function, validation, and the Triton backend (forward + backward).

The Triton path never builds the overlapping key/value windows that timm's ``HaloAttn`` materialises with
``unfold`` ((b + 2h)^2 / b^2 = 2.25-3x the K/V memory kept for backward): the forward reads each window row in
place with bounds masks (zero padding for free), with an online softmax; the backward is a query-centric kernel
(dq, the relative-logit gradients and each window's dk, dv contributions) plus a fold kernel summing the
overlapping windows per key block (``DKDV_STRATEGY``): every gradient element is written by one program in a
fixed order, no atomics.
The relative-position logit tables ``q @ height_rel^T`` and ``q @ width_rel^T`` are small fp32 matmuls done in
torch inside the custom ops and rebuilt in the backward rather than kept (they hold more values than q); the
kernels read one table entry per query and window row or column and broadcast it over the keys that share it.
The forward custom op decomposes into the reference's aten ops for ``torch.onnx.export(..., dynamo=True)``.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._common import HaloProblem, check_same_device_dtype, interpreter_enabled, register_export_decomposition
from ._dispatch import Backend, register_backend, select_backend
from .reference import halo_attention_reference, halo_logits, halo_windows, pad_to_blocks, query_blocks_to_map
from .routed_attn import MAX_HEAD_DIM, triton_next_pow2

__all__ = ["halo_attention", "halo_problem"]


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


# ------------------------------------------------------------------------------------------ triton


# How the backward gets dk and dv; both are deterministic (fixed summation order, no atomics).
# "window": the dq kernel also writes each query block's window gradients (a scratch of (b + 2h)^2 / b^2 times
#   k and v, freed after the call) and a fold kernel sums the overlapping windows: each (query, key) pair is
#   computed once.
# "key_blocks": a key-centric kernel recomputes the probabilities over whole tiles of the neighbouring query
#   blocks (no scratch; ~2.9x the pair work at block 8, halo 3, because most of a neighbour's tile is outside
#   its window).
# A module attribute so that benchmarks can compare them.
DKDV_STRATEGY: str = "window"
DKDV_STRATEGIES = ("window", "key_blocks")


def _kernels():
    from . import _halo_kernels

    return _halo_kernels


def _check_triton(problem: HaloProblem) -> str | None:
    if problem.device.type == "cpu":
        if not interpreter_enabled():
            return "tensors are on CPU; Triton needs CUDA (or TRITON_INTERPRET=1 to interpret the kernels, for tests)"
    elif problem.device.type != "cuda":
        return f"Triton kernels run on CUDA only, got device {problem.device}"
    module = sys.modules.get(f"{__package__}._halo_kernels")
    if module is not None:
        interpreted = module.INTERPRETED
        if interpreted != (problem.device.type == "cpu"):
            return "the Triton kernels were first defined for the other mode (TRITON_INTERPRET changed since)"
    if problem.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
    if max(problem.d_qk, problem.d_v) > MAX_HEAD_DIM:
        return f"head dims d_qk={problem.d_qk}, d_v={problem.d_v} exceed {MAX_HEAD_DIM}"
    if problem.block_size > 16 or problem.block_size + 2 * problem.halo_size > 64:
        return f"block_size {problem.block_size} > 16 or window {problem.block_size + 2 * problem.halo_size} > 64"
    return None


def _auto_check_triton(problem: HaloProblem) -> str | None:
    if problem.device.type != "cuda":
        return "the Triton interpreter on CPU is for tests (slow); force backend='triton' to use it"
    return None


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
            "BLOCK_M": max(16, triton_next_pow2(bq * bq)),
            "BLOCK_DQK": max(16, triton_next_pow2(q.shape[-1])),
        },
    }


def _options(q, rel_h, scale_pos_embed, pad_mask):
    options: dict[str, object] = {
        "HAS_REL": rel_h is not None,
        "MASK_PAD": pad_mask,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    if not _kernels().AUTOTUNE:
        options["num_warps"] = 4
    return options


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
    K.halo_fwd[(geo["n_bh"] * geo["n_bw"], B * nh)](
        q, k, v, rel_h_arg, rel_w_arg, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *rel_strides, *out.stride(), *lse.stride(),
        nh, geo["n_bw"], geo["H"], geo["W"], Hq, Wq, d_qk, d_v, scale * log2e, rel_coef * log2e,
        **geo["blocks"], BLOCK_KX=max(16, triton_next_pow2(geo["win"])), BLOCK_DV=max(16, triton_next_pow2(d_v)),
        **_options(q, rel_h, scale_pos_embed, pad_mask),
    )  # fmt: skip
    return out, lse


def _halo_backward(
    grad_out, q, k, v, rel_h, rel_w, out, lse, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask
):
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
    options = _options(q, rel_h, scale_pos_embed, pad_mask)
    block_dv = max(16, triton_next_pow2(d_v))
    reach = -(-halo_size // block_size)  # key blocks a window reaches beyond its own, each way
    block_b = max(4, triton_next_pow2(block_size))
    n_blocks = geo["n_bh"] * geo["n_bw"]
    if DKDV_STRATEGY not in DKDV_STRATEGIES:
        raise ValueError(f"zoo.ops.halo_attn.DKDV_STRATEGY must be one of {DKDV_STRATEGIES}, got {DKDV_STRATEGY!r}")
    window_grads = DKDV_STRATEGY == "window"
    if window_grads:
        # in k's dtype, as timm's unfold backward keeps its window gradients; the fold sums them in fp32
        scratch = torch.empty(B, nh, n_blocks, geo["win"], geo["win"], d_qk + d_v, dtype=k.dtype, device=k.device)
        scratch_strides = scratch.stride()
    else:
        scratch, scratch_strides = lse, (0,) * 6  # unused pointer
    K.halo_bwd_dq[(n_blocks, B * nh)](
        q, k, v, *rel_args, grad_out, lse, delta, dq, *drel_args, scratch,
        *q.stride(), *k.stride(), *v.stride(), *rel_strides, *grad_out.stride(), *dq.stride(), *lse.stride(),
        *scratch_strides,
        nh, geo["n_bw"], geo["H"], geo["W"], Hq, Wq, d_qk, d_v, *coefs, scale, rel_scale,
        **geo["blocks"], BLOCK_KX=max(16, triton_next_pow2(geo["win"])), BLOCK_DV=block_dv, **options,
        WINDOW_GRADS=window_grads,
    )  # fmt: skip
    if window_grads:
        K.halo_fold[(n_blocks, B * nh)](
            scratch, dk, dv, *scratch_strides, *dk.stride(), *dv.stride(),
            nh, geo["n_bh"], geo["n_bw"], geo["H"], geo["W"], d_qk, d_v,
            B_SIZE=block_size, HALO=halo_size, WIN=geo["win"], REACH=reach, BLOCK_B=block_b,
            BLOCK_DQK=geo["blocks"]["BLOCK_DQK"], BLOCK_DV=block_dv,
            **({} if K.AUTOTUNE else {"num_warps": 4}),
        )  # fmt: skip
    else:
        K.halo_bwd_dkdv[(n_blocks, B * nh)](
            q, k, v, *rel_args, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *rel_strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *lse.stride(),
            nh, geo["n_bh"], geo["n_bw"], geo["H"], geo["W"], Hq, Wq, d_qk, d_v, *coefs, scale,
            **geo["blocks"], REACH=reach, BLOCK_B=block_b, BLOCK_DV=block_dv, **options,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, nh, Hq, Wq, d_v), lse (B, nh, Hq, Wq) fp32 base 2)``; height_rel/width_rel: ``(2*win-1, d_qk)``.

    The relative-logit tables (``q @ table^T``, fp32, 27 entries per query at win 14: larger than q) are built
    here and rebuilt in the backward, never kept: the backward saves q, k, v, the position tables, out, lse."""
    rel_h = rel_w = None
    if height_rel is not None:
        (rel_h, rel_w), _ = _rel_logits_tables(q, (height_rel, width_rel), block_size, query_stride)
    return _halo_forward(q, k, v, rel_h, rel_w, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask)


@halo_attn_triton_fwd.register_fake
def _(q, k, v, height_rel, width_rel, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask):
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
        grad_out, q, k, v, rel_h, rel_w, out, lse, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask
    )
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
def _(grad_out, q, k, v, height_rel, width_rel, out, lse, block_size, halo_size, query_stride, scale, spe, pad_mask):
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
    return dq, dk, dv, d_height, d_width, None, None, None, None, None, None


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


def _halo_triton(q, k, v, block_size, halo_size, rel_pos, scale, scale_pos_embed, query_stride, pad_mask):
    height_rel, width_rel = rel_pos if rel_pos is not None else (None, None)
    out, _ = halo_attn_triton_fwd(
        q, k, v, height_rel, width_rel, block_size, halo_size, query_stride, scale, scale_pos_embed, pad_mask
    )
    return out


register_backend(
    "halo_attention",
    Backend(
        name="triton",
        fn=_halo_triton,
        check=_check_triton,
        auto_check=_auto_check_triton,
        description="fused Triton kernels, no unfold copy, deterministic backward",
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
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"torch"`` (reference) or ``"triton"``;
            ``ZOO_OPS_BACKEND`` overrides ``"auto"``.

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
