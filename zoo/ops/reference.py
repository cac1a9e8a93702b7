"""Plain PyTorch references: the definition of every op in ``zoo.ops``.

Each function here is short and readable on purpose; every other backend is tested against it, forward and
gradients. Inputs are assumed validated (the public functions in ``zoo.ops`` validate them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import from_regions, key_valid_regions, to_regions

__all__ = [
    "halo_attention_reference",
    "halo_logits",
    "region_routing_reference",
    "routed_attention_reference",
]


def region_routing_reference(q_region: torch.Tensor, k_region: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-``topk`` key regions per query region by ``q_region @ k_region^T`` (no gradient).

    Shapes: ``(B, R, C) x (B, R, C) -> (B, R, topk)`` or ``(B, nh, R, c) x (B, nh, R, c) -> (B, nh, R, topk)``.
    """
    logits = q_region.detach() @ k_region.detach().transpose(-1, -2)
    return torch.topk(logits, topk, dim=-1).indices


def _expand_routing(routing_idx: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, R, topk)`` or ``(B, nh, R, topk)`` -> int64 ``(B, nh, R, topk)`` (a view for shared routing)."""
    idx = routing_idx.long()
    if idx.dim() == 3:
        idx = idx.unsqueeze(1)
    return idx.expand(idx.shape[0], heads, idx.shape[2], idx.shape[3])


def routed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing_idx: torch.Tensor,
    region_size: tuple[int, int],
    scale: float,
    key_padding: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bi-level routing attention, the original BiFormer gather formulation (``ops/bra_legacy.py``).

    Args:
        q, k: ``(B, nh, H, W, d_qk)``; v: ``(B, nh, H, W, d_v)``.
        routing_idx: ``(B, R, topk)`` shared by the heads or ``(B, nh, R, topk)`` per head.
        region_size: ``(rh, rw)`` dividing ``(H, W)``; R = (H // rh) * (W // rw), regions row-major.
        scale: multiplies ``q`` before ``q @ k^T`` (as the original does).
        key_padding: ``None`` or ``(valid_h, valid_w)``: keys at row >= valid_h or col >= valid_w are masked.

    Returns:
        ``(B, nh, H, W, d_v)`` in ``q``'s dtype. Query rows whose routed keys are all masked output 0.
    """
    B, nh, H, W, _ = q.shape
    rh, rw = region_size
    q_r, k_r, v_r = (to_regions(t, rh, rw) for t in (q, k, v))  # (B, nh, R, T, d)
    R, T = q_r.shape[2], q_r.shape[3]
    idx = _expand_routing(routing_idx, nh)  # (B, nh, R, topk)
    topk = idx.shape[-1]

    def gather(x: torch.Tensor) -> torch.Tensor:
        # the original KVGather: expand (no copy) over query regions, then gather -> topk copies of K/V
        d = x.shape[-1]
        expanded = x.unsqueeze(2).expand(B, nh, R, R, T, d)
        selected = torch.gather(expanded, 3, idx[..., None, None].expand(B, nh, R, topk, T, d))
        return selected.reshape(B, nh, R, topk * T, d)

    k_sel, v_sel = gather(k_r), gather(v_r)
    logits = (q_r * scale) @ k_sel.transpose(-1, -2)  # (B, nh, R, T, topk*T)
    valid = key_valid_regions(H, W, rh, rw, key_padding, q.device)
    softmax_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 softmax for half inputs (as autocast)
    if valid is None:
        attn = torch.softmax(logits, dim=-1, dtype=softmax_dtype)
    else:
        valid_sel = valid[idx].reshape(B, nh, R, 1, topk * T)
        any_valid = valid_sel.any(dim=-1, keepdim=True)
        logits = logits.masked_fill(~valid_sel, float("-inf"))
        # rows with no valid key: softmax over zeros, then zeroed -> output 0, finite gradients
        logits = torch.where(any_valid, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        attn = torch.softmax(logits, dim=-1, dtype=softmax_dtype) * any_valid
    out = attn.to(q.dtype) @ v_sel  # (B, nh, R, T, d_v)
    return from_regions(out, H, W, rh, rw)


def halo_windows(x: torch.Tensor, block_size: int, halo_size: int) -> torch.Tensor:
    """``(B, nh, H, W, d)`` with ``H, W`` multiples of ``block_size`` -> ``(B, nh, num_blocks, win*win, d)``.

    Window of block ``(i, j)``: rows ``i*b - h .. i*b + b + h - 1`` (same for cols), zero outside the map, window
    tokens row-major (as timm's ``unfold``). This copies every key ``(win / b)^2`` times: the reference only.
    """
    B, nh, H, W, d = x.shape
    win = block_size + 2 * halo_size
    padded = F.pad(x, (0, 0, halo_size, halo_size, halo_size, halo_size))
    windows = padded.unfold(2, win, block_size).unfold(3, win, block_size)  # (B, nh, nbh, nbw, d, win, win)
    return windows.permute(0, 1, 2, 3, 5, 6, 4).reshape(B, nh, -1, win * win, d)


def rel_logits_reference(q_blocks: torch.Tensor, rel_table: torch.Tensor, axis: int) -> torch.Tensor:
    """Relative-position logits along one axis, as timm's ``PosEmbedRel``.

    Args:
        q_blocks: ``(..., bq, bq, d)`` queries of a block, (row, col) order.
        rel_table: ``(2*win - 1, d)``: entry ``key - query + win - 1`` along the axis.
        axis: 0 for rows (``height_rel``), 1 for columns (``width_rel``).

    Returns:
        ``(..., bq, bq, win, win)``: logit of query (qy, qx) for window key (ky, kx).
    """
    bq = q_blocks.shape[-2]
    win = (rel_table.shape[0] + 1) // 2
    logits = q_blocks @ rel_table.transpose(-1, -2)  # (..., bq, bq, 2*win - 1)
    pos = torch.arange(bq, device=q_blocks.device)
    rel_index = torch.arange(win, device=q_blocks.device)[None, :] - pos[:, None] + win - 1  # (query, key)
    if axis == 0:  # depends on (qy, ky): broadcast over qx, kx
        picked = logits.gather(-1, rel_index[:, None, :].expand(bq, bq, win).expand(*logits.shape[:-1], win))
        return picked[..., :, None].expand(*picked.shape, win)
    picked = logits.gather(-1, rel_index[None, :, :].expand(bq, bq, win).expand(*logits.shape[:-1], win))
    return picked[..., None, :].expand(*picked.shape[:-1], win, win)


def pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, nh, H, W, d)`` completed with zeros at the bottom and right to multiples of ``block``."""
    return F.pad(x, (0, 0, 0, -x.shape[3] % block, 0, -x.shape[2] % block))


def halo_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float = 1.0,
    scale_pos_embed: bool = False,
    query_stride: int = 1,
    pad_mask: bool = False,
) -> torch.Tensor:
    """Logits of halo attention ``(B, nh, nb, bq*bq, win*win)``: each query block (``nb`` row-major blocks of
    ``bq = block_size // query_stride`` queries per side) against its key window; keys outside the map at -inf
    when ``pad_mask``. Arguments as :func:`halo_attention_reference`."""
    B, nh, Hq, Wq, d_qk = q.shape
    H, W = k.shape[2], k.shape[3]
    b, h, s = block_size, halo_size, query_stride
    bq, win = b // s, b + 2 * h
    nbh, nbw = -(-H // b), -(-W // b)
    # queries padded to whole query blocks, keys with zeros to whole blocks (as timm's halo padding)
    q_blocks = pad_to_blocks(q, bq).reshape(B, nh, nbh, bq, nbw, bq, d_qk).permute(0, 1, 2, 4, 3, 5, 6)
    k_win = halo_windows(pad_to_blocks(k, b), b, h)  # (B, nh, nb, win*win, d_qk)
    logits = q_blocks.reshape(B, nh, nbh * nbw, bq * bq, d_qk) @ k_win.transpose(-1, -2)  # (B, nh, nb, bq*bq, win*win)
    if rel_pos is not None:
        height_rel, width_rel = rel_pos
        rel = rel_logits_reference(q_blocks, height_rel, 0) + rel_logits_reference(q_blocks, width_rel, 1)
        rel = rel.reshape(B, nh, nbh * nbw, bq * bq, win * win)
        logits = (logits + rel) * scale if scale_pos_embed else logits * scale + rel
    else:
        logits = logits * scale
    if pad_mask:
        # out of place: this also runs as the export decomposition of the Triton op, which must be functional
        rows, cols = torch.arange(nbh * b, device=q.device) < H, torch.arange(nbw * b, device=q.device) < W
        inside = (rows[:, None] & cols[None, :]).float()[None, None, :, :, None]
        key_ok = halo_windows(inside, b, h)[0, 0, :, None, :, 0] > 0  # (nb, 1, win*win): key inside the map
        logits = logits.masked_fill(~key_ok, float("-inf"))
    return logits


def query_blocks_to_map(x: torch.Tensor, height: int, width: int, bq: int) -> torch.Tensor:
    """``(B, nh, nb, bq*bq, d)`` per query block -> ``(B, nh, height, width, d)``, the padding queries dropped."""
    B, nh = x.shape[:2]
    nbh, nbw = -(-height // bq), -(-width // bq)
    x = x.reshape(B, nh, nbh, nbw, bq, bq, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, nh, nbh * bq, nbw * bq, -1)
    return x[:, :, :height, :width]


def halo_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float = 1.0,
    scale_pos_embed: bool = False,
    query_stride: int = 1,
    pad_mask: bool = False,
) -> torch.Tensor:
    """Halo attention (timm's ``HaloAttn`` core) on any map size; see :func:`zoo.ops.halo_attention`.

    Shapes: q ``(B, nh, Hq, Wq, d_qk)`` with ``Hq = ceil(H / query_stride)``; k ``(B, nh, H, W, d_qk)``;
    v ``(B, nh, H, W, d_v)``; returns ``(B, nh, Hq, Wq, d_v)``.
    """
    logits = halo_logits(q, k, block_size, halo_size, rel_pos, scale, scale_pos_embed, query_stride, pad_mask)
    attn = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    out = attn @ halo_windows(pad_to_blocks(v, block_size), block_size, halo_size)  # (B, nh, nb, bq*bq, d_v)
    return query_blocks_to_map(out, q.shape[2], q.shape[3], block_size // query_stride)
