"""Memory-lean PyTorch backend of routed attention (``backend="torch_lean"``).

The reference (the original BiFormer formulation) gathers K and V for all query regions at once, copying
them ``topk`` times (16x at BiFormer stage 3), keeps those copies for the backward, and its ``gather``
backward allocates a zero tensor of ``R`` times K's size. This path instead:

* processes the query regions in chunks of ``ceil(R / topk)`` regions, so one chunk's gathered K/V is about
  the size of K/V itself, and frees it before the next chunk;
* saves only ``q, k, v, out`` and the per-query log-sum-exp for the backward, which recomputes each chunk's
  probabilities (FlashAttention-style) and accumulates dK/dV with ``index_add_`` in a fixed order
  (deterministic on CPU; on CUDA ``index_add_`` uses atomics -- use the Triton backend there).

Both passes are registered as torch custom ops (``zoo::routed_attn_lean_fwd/bwd``) with FLOP formulas, so
``torch.compile`` treats them as single nodes and ``FlopCounterMode`` counts the same FLOPs as the reference.
The forward also has a decomposition into plain aten ops (:func:`routed_attention_gathered`, one gather of the
routed K/V rows, no loop and no data-dependent branch) so ``torch.onnx.export(..., dynamo=True)`` translates it.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from ._common import from_regions, key_valid_regions, register_export_decomposition, to_regions

__all__ = ["routed_attention_gathered", "routed_attention_lean", "routed_flops"]


def routed_flops(batch: int, heads: int, tokens: int, keys_per_query: int, d_qk: int, d_v: int) -> int:
    """Forward FLOPs of routed attention: ``q @ k^T`` and ``p @ v`` over ``keys_per_query`` keys per query."""
    return 2 * batch * heads * tokens * keys_per_query * (d_qk + d_v)


CHUNK_BYTES = 32 * 2**20  # gathered K/V allowed per chunk, beyond one copy of K/V


def _chunk_regions(num_regions: int, topk: int, bytes_per_region: int) -> int:
    """Query regions per chunk: at least ``R / topk`` (one chunk's gathered K/V ~ one K/V), more up to CHUNK_BYTES.

    Memory stays O(K/V + CHUNK_BYTES) whatever ``topk`` is; small problems run in one chunk (fewer ops).
    """
    return max(1, math.ceil(num_regions / topk), CHUNK_BYTES // max(1, bytes_per_region))


def _softmax_lse(
    logits: torch.Tensor, any_valid: torch.Tensor | None, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax over the last dim and its log-sum-exp (``+inf`` for rows without a valid key, whose probs are 0).

    ``lse = max(logits) - log(max(probs))``: two reductions instead of logsumexp's six ops.
    """
    if any_valid is not None:
        logits = logits.masked_fill_(~any_valid, 0.0)  # all-masked rows: finite softmax, zeroed below
    probs = torch.softmax(logits, dim=-1)
    if any_valid is not None:
        probs.mul_(any_valid)
    if not need_lse:
        return probs, None
    lse = logits.amax(dim=-1).sub_(probs.amax(dim=-1).log_())
    return probs, lse


def _gather_regions(x_r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x_r (B, nh, R, T, d)``, ``idx (B, nh|1, c, topk)`` -> ``(B, nh, c, topk*T, d)`` (one copy, no expand)."""
    B, nh, _, T, d = x_r.shape
    c, topk = idx.shape[2], idx.shape[3]
    index = idx.reshape(B, idx.shape[1], c * topk, 1).expand(B, nh, c * topk, T * d)
    return torch.gather(x_r.reshape(B, nh, -1, T * d), 2, index).reshape(B, nh, c, topk * T, d)


def _chunk_logits(
    q_c: torch.Tensor,
    k_sel: torch.Tensor,
    idx_c: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled logits ``(B, nh, c, T, topk*T)`` in fp32 (fp64 for fp64 inputs), padded keys at -inf, and
    ``any_valid (B, nh|1, c, 1, 1)`` (None without padding)."""
    acc = torch.promote_types(q_c.dtype, torch.float32)
    logits = ((q_c * scale) @ k_sel.transpose(-1, -2)).to(acc)
    if valid is None:
        return logits, None
    B, nh, c, T, _ = q_c.shape
    valid_sel = valid[idx_c].reshape(B, idx_c.shape[1], c, 1, -1)
    logits.masked_fill_(~valid_sel, float("-inf"))
    return logits, valid_sel.any(dim=-1, keepdim=True)


def _use_dense(num_regions: int, idx: torch.Tensor) -> bool:
    """Dense-masked scores when they cost at most 4x the routed ones and every routed region is distinct."""
    if num_regions > 4 * idx.shape[-1]:
        return False
    ordered = idx.sort(dim=-1).values
    return not bool((ordered[..., 1:] == ordered[..., :-1]).any())


def _dense_logits(
    q_r: torch.Tensor, k_r: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Scores of every query against every key ``(B, nh, R, T, R, T)``, non-routed regions and padding at -inf."""
    B, nh, R, T, _ = q_r.shape
    acc = torch.promote_types(q_r.dtype, torch.float32)
    logits = ((q_r.reshape(B, nh, R * T, -1) * scale) @ k_r.reshape(B, nh, R * T, -1).transpose(-1, -2)).to(acc)
    logits = logits.view(B, nh, R, T, R, T)
    blocked = torch.ones(B, idx.shape[1], R, R, dtype=torch.bool, device=q_r.device).scatter_(-1, idx, False)
    logits.masked_fill_(blocked[:, :, :, None, :, None], float("-inf"))
    if valid is not None:
        logits.masked_fill_(~valid, float("-inf"))  # (R, T) broadcasts over the key dims
    return logits


def _lean_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    rh: int,
    rw: int,
    scale: float,
    valid_h: int,
    valid_w: int,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, nh, H, W, _ = q.shape
    q_r, k_r, v_r = (to_regions(t, rh, rw) for t in (q, k, v))
    R, T = q_r.shape[2], q_r.shape[3]
    acc = torch.promote_types(q.dtype, torch.float32)
    valid = key_valid_regions(H, W, rh, rw, None if valid_h < 0 else (valid_h, valid_w), q.device)
    lse = torch.empty(B, nh, R, T if need_lse else 0, dtype=acc, device=q.device)
    if _use_dense(R, idx):
        # few regions (BiFormer stage 3): one GEMM over all keys with a routing mask beats gathering K/V
        logits = _dense_logits(q_r, k_r, idx, valid, scale).view(B, nh, R, T, R * T)
        any_valid = (logits != float("-inf")).any(dim=-1, keepdim=True) if valid is not None else None
        probs, lse_d = _softmax_lse(logits, any_valid, need_lse)
        out_r = probs.to(v.dtype).view(B, nh, R * T, R * T) @ v_r.reshape(B, nh, R * T, -1)
        return from_regions(out_r.view(B, nh, R, T, -1), H, W, rh, rw), lse_d if need_lse else lse
    out_r = torch.empty(B, nh, R, T, v.shape[-1], dtype=q.dtype, device=q.device)
    topk = idx.shape[-1]
    chunk = _chunk_regions(R, topk, B * nh * topk * T * (q.shape[-1] + v.shape[-1]) * q.element_size())
    for r0 in range(0, R, chunk):
        idx_c = idx[:, :, r0 : r0 + chunk]
        logits, any_valid = _chunk_logits(q_r[:, :, r0 : r0 + chunk], _gather_regions(k_r, idx_c), idx_c, valid, scale)
        probs, lse_c = _softmax_lse(logits, any_valid, need_lse)
        out_r[:, :, r0 : r0 + chunk] = probs.to(v.dtype) @ _gather_regions(v_r, idx_c)
        if need_lse:
            lse[:, :, r0 : r0 + chunk] = lse_c
    return from_regions(out_r, H, W, rh, rw), lse


def _lean_backward(
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
    B, nh, H, W, d_qk = q.shape
    d_v = v.shape[-1]
    q_r, k_r, v_r, do_r = (to_regions(t, rh, rw) for t in (q, k, v, grad_out))
    R, T = q_r.shape[2], q_r.shape[3]
    acc = lse.dtype
    valid = key_valid_regions(H, W, rh, rw, None if valid_h < 0 else (valid_h, valid_w), q.device)
    delta = to_regions((grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True), rh, rw)  # (B, nh, R, T, 1)
    if _use_dense(R, idx):
        N = R * T
        probs = _dense_logits(q_r, k_r, idx, valid, scale).view(B, nh, R, T, N).sub_(lse[..., None]).exp_()
        probs = probs.view(B, nh, N, N)
        do_n, q_n = do_r.reshape(B, nh, N, d_v).to(acc), q_r.reshape(B, nh, N, d_qk).to(acc)
        k_n, v_n = k_r.reshape(B, nh, N, d_qk).to(acc), v_r.reshape(B, nh, N, d_v).to(acc)
        dv_n = probs.transpose(-1, -2) @ do_n
        dlogits = probs.mul_((do_n @ v_n.transpose(-1, -2)).sub_(delta.reshape(B, nh, N, 1))).mul_(scale)
        grads = (dlogits @ k_n, dlogits.transpose(-1, -2) @ q_n, dv_n)
        return tuple(  # type: ignore[return-value]
            from_regions(g.view(B, nh, R, T, -1).to(t.dtype), H, W, rh, rw) for g, t in zip(grads, (q, k, v))
        )
    dq_r = torch.empty(B, nh, R, T, d_qk, dtype=q.dtype, device=q.device)
    dk_flat = torch.zeros(B * nh * R, T * d_qk, dtype=acc, device=q.device)
    dv_flat = torch.zeros(B * nh * R, T * d_v, dtype=acc, device=q.device)
    topk = idx.shape[-1]
    chunk = _chunk_regions(R, topk, B * nh * topk * T * (d_qk + d_v) * acc.itemsize * 3)  # k, v, their grads
    base = (torch.arange(B, device=q.device)[:, None] * nh + torch.arange(nh, device=q.device)) * R  # (B, nh)
    for r0 in range(0, R, chunk):
        idx_c = idx[:, :, r0 : r0 + chunk]
        c = idx_c.shape[2]
        q_c, do_c = q_r[:, :, r0 : r0 + chunk], do_r[:, :, r0 : r0 + chunk]
        k_sel, v_sel = _gather_regions(k_r, idx_c), _gather_regions(v_r, idx_c)
        probs = _chunk_logits(q_c, k_sel, idx_c, valid, scale)[0].sub_(lse[:, :, r0 : r0 + chunk, :, None]).exp_()
        dv_sel = probs.transpose(-1, -2) @ do_c.to(acc)  # (B, nh, c, topk*T, d_v)
        dprobs = do_c.to(acc) @ v_sel.to(acc).transpose(-1, -2)
        dlogits = probs.mul_(dprobs.sub_(delta[:, :, r0 : r0 + chunk])).mul_(scale)  # (B, nh, c, T, topk*T)
        dq_r[:, :, r0 : r0 + chunk] = dlogits @ k_sel.to(acc)
        dk_sel = dlogits.transpose(-1, -2) @ q_c.to(acc)  # (B, nh, c, topk*T, d_qk)
        # rows of dk_flat are (b, h, key region); CPU scatter_add_ adds in a fixed order (deterministic)
        rows = (base[:, :, None, None] + idx_c).expand(B, nh, c, topk).reshape(-1, 1)
        dk_flat.scatter_add_(0, rows.expand(-1, T * d_qk), dk_sel.reshape(B * nh * c * topk, T * d_qk))
        dv_flat.scatter_add_(0, rows.expand(-1, T * d_v), dv_sel.reshape(B * nh * c * topk, T * d_v))
    dk_r = dk_flat.view(B, nh, R, T, d_qk).to(k.dtype)
    dv_r = dv_flat.view(B, nh, R, T, d_v).to(v.dtype)
    return tuple(from_regions(g, H, W, rh, rw) for g in (dq_r, dk_r, dv_r))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("zoo::routed_attn_lean_fwd", mutates_args=())
def routed_attn_lean_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    rh: int,
    rw: int,
    scale: float,
    valid_h: int,
    valid_w: int,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out (B, nh, H, W, d_v), lse (B, nh, R, rh*rw))``; ``idx`` int64 ``(B, nh|1, R, topk)``.

    ``need_lse=False`` (no gradient needed) skips the log-sum-exp and returns it with 0 columns.
    """
    return _lean_forward(q, k, v, idx, rh, rw, scale, valid_h, valid_w, need_lse)


@routed_attn_lean_fwd.register_fake
def _(q, k, v, idx, rh, rw, scale, valid_h, valid_w, need_lse):
    B, nh, H, W, _ = q.shape
    lse_shape = (B, nh, (H // rh) * (W // rw), rh * rw if need_lse else 0)
    lse = q.new_empty(lse_shape, dtype=torch.promote_types(q.dtype, torch.float32))
    return q.new_empty(B, nh, H, W, v.shape[-1]), lse


@torch.library.custom_op("zoo::routed_attn_lean_bwd", mutates_args=())
def routed_attn_lean_bwd(
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
    """Backward: ``(dq, dk, dv)`` shaped like ``q, k, v`` (contiguous)."""
    return _lean_backward(grad_out, q, k, v, out, lse, idx, rh, rw, scale, valid_h, valid_w)


@routed_attn_lean_bwd.register_fake
def _(grad_out, q, k, v, out, lse, idx, rh, rw, scale, valid_h, valid_w):
    # contiguous like the real op (empty_like would copy q's permuted strides and break compiled backward)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, rh, rw, scale, valid_h, valid_w, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, idx)
    ctx.args = (rh, rw, scale, valid_h, valid_w)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, idx = ctx.saved_tensors
    dq, dk, dv = routed_attn_lean_bwd(grad_out.contiguous(), q, k, v, out, lse, idx, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


routed_attn_lean_fwd.register_autograd(_backward, setup_context=_setup_context)


def _select_regions(x_r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x_r (B, nh, R, T, d)``, ``idx (B, nh|1, R', topk)`` -> ``(B, nh, R', topk*T, d)`` by whole-region rows.

    One ``index_select`` of ``(T*d)``-wide rows: ONNX ``Gather`` with a ``B*nh*R'*topk`` index, where ``torch.gather``
    with an expanded index would export as ``GatherElements`` with an index as large as the gathered K/V.
    """
    B, nh, R, T, d = x_r.shape
    heads = torch.arange(B, device=idx.device)[:, None] * nh + torch.arange(nh, device=idx.device)  # (B, nh)
    rows = (heads[:, :, None, None] * R + idx).reshape(-1)  # idx broadcasts over the heads when shared
    return x_r.reshape(B * nh * R, T * d).index_select(0, rows).reshape(B, nh, idx.shape[2], -1, d)


def routed_attention_gathered(
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
    """Routed attention as one graph of aten ops: ``(out (B, nh, H, W, d_v), lse (B, nh, R, rh*rw))``.

    The export formulation of the custom ops (their decomposition): every query region's routed K/V gathered at
    once (``topk`` copies, as the reference), logits and softmax in fp32 (fp64 for fp64), the log-sum-exp in the
    natural base, ``+inf`` for queries without a valid key (whose output is 0). ``idx`` int ``(B, nh|1, R, topk)``;
    ``valid_h < 0`` means no key padding.
    """
    B, nh, H, W, _ = q.shape
    q_r, k_r, v_r = (to_regions(t, rh, rw) for t in (q, k, v))
    R = q_r.shape[2]
    idx = idx.to(torch.int64)
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = ((q_r * scale) @ _select_regions(k_r, idx).transpose(-1, -2)).to(acc)  # (B, nh, R, T, topk*T)
    valid = key_valid_regions(H, W, rh, rw, None if valid_h < 0 else (valid_h, valid_w), q.device)
    if valid is None:
        probs = torch.softmax(logits, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
    else:
        valid_sel = valid[idx].reshape(B, idx.shape[1], R, 1, -1)
        any_valid = valid_sel.any(dim=-1, keepdim=True)
        # rows without a valid key: softmax over zeros, zeroed after (output 0, never NaN), lse +inf
        logits = torch.where(any_valid, logits.masked_fill(~valid_sel, float("-inf")), 0.0)
        probs = torch.softmax(logits, dim=-1) * any_valid
        lse = torch.where(any_valid[..., 0], torch.logsumexp(logits, dim=-1), float("inf"))
    out_r = probs.to(v.dtype) @ _select_regions(v_r, idx)
    return from_regions(out_r, H, W, rh, rw), lse


@register_export_decomposition(torch.ops.zoo.routed_attn_lean_fwd.default)
def _lean_fwd_decomposition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    rh: int,
    rw: int,
    scale: float,
    valid_h: int,
    valid_w: int,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = routed_attention_gathered(q, k, v, idx, rh, rw, scale, valid_h, valid_w)
    return out, lse if need_lse else lse.new_empty(*lse.shape[:3], 0)


def _keys_per_query(idx_shape, rh: int, rw: int) -> int:
    return idx_shape[-1] * rh * rw


@register_flop_formula(torch.ops.zoo.routed_attn_lean_fwd)
def _lean_fwd_flop(q_shape, k_shape, v_shape, idx_shape, rh, rw, *args, out_shape=None, **kwargs) -> int:
    B, nh, H, W, d_qk = q_shape
    return routed_flops(B, nh, H * W, _keys_per_query(idx_shape, rh, rw), d_qk, v_shape[-1])


@register_flop_formula(torch.ops.zoo.routed_attn_lean_bwd)
def _lean_bwd_flop(grad_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, idx_shape, rh, rw, *args, **kw) -> int:
    # the reference's autograd backward does two matmuls per forward matmul: count 2x forward (recompute excluded)
    B, nh, H, W, d_qk = q_shape
    return 2 * routed_flops(B, nh, H * W, _keys_per_query(idx_shape, rh, rw), d_qk, v_shape[-1])


def normalize_routing(routing_idx: torch.Tensor) -> torch.Tensor:
    """int64 contiguous ``(B, nh|1, R, topk)`` (a per-batch routing shared by heads keeps a head dim of 1)."""
    idx = routing_idx if routing_idx.dim() == 4 else routing_idx.unsqueeze(1)
    return idx.to(torch.int64).contiguous()


def routed_attention_lean(
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
    need_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    idx = normalize_routing(routing_idx)
    out, _ = routed_attn_lean_fwd(q, k, v, idx, *region_size, scale, valid_h, valid_w, need_lse)
    return out
