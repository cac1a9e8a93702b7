"""FlexAttention backend of routed attention (``backend="flex"``): a benchmark peer, never picked by ``auto``.

Tokens are put in region-major order (each region a contiguous run of ``T = rh*rw`` tokens) so routed attention
is block-sparse attention with query block = one region and KV blocks = its routed regions. The ``BlockMask``
is built from the routing table (``from_kv_blocks``, rebuilt every call since routing is data-dependent) and
always carries a routing ``mask_mod`` as well: uncompiled Flex ignores the block lists and applies only
``mask_mod`` over dense scores (the CPU trap of specs/performance.md), so with the mask_mod both modes are right.

* CUDA: compiled ``flex_attention``, forward and backward. Block lists need ``T`` to be a multiple of 16
  (Triton tile minimum); other region sizes use a dense routing ``mask_mod`` with 128-token blocks.
* CPU: forward only (FlexAttention has no CPU backward); compiled (Inductor C++ template), or eager with
  ``compile_on_cpu=False``, which materialises the full ``N x N`` scores (tiny inputs only).

Routing entries must be distinct per query region (as ``topk`` gives): Flex visits a listed block once.
"""

from __future__ import annotations

import functools

import torch

from ._common import from_regions, key_valid_regions, to_regions

__all__ = ["flex_attention_module", "routed_attention_flex"]


def flex_attention_module():
    """``torch.nn.attention.flex_attention``, or None in a torch without it."""
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # pragma: no cover - torch < 2.5
        return None
    return flex_attention


@functools.cache
def _compiled_flex():
    # static shapes: with torch's default (symbolic after the first recompile) the backward of a second shape
    # fails to lower on CUDA (torch 2.11, H200: "NoValidChoicesError ... flex_attention_backward")
    return torch.compile(flex_attention_module().flex_attention, dynamic=False)


def _routing_table(idx: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Bool ``(B, nh|1, R, R)``: ``table[b, h, query region, key region]``."""
    table = torch.zeros(*idx.shape[:3], num_regions, dtype=torch.bool, device=idx.device)
    return table.scatter_(-1, idx, True)


def routed_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing_idx: torch.Tensor,
    region_size: tuple[int, int],
    scale: float,
    key_padding: tuple[int, int] | None,
    compile_on_cpu: bool = True,
) -> torch.Tensor:
    """Backend entry point; arguments as :func:`zoo.ops.routed_attention` (already validated).

    ``compile_on_cpu=False``: eager Flex for CPU tensors (dense scores and the routing ``mask_mod``, tiny inputs
    only). An argument of this function, not a module setting: the dispatch always compiles, and only a direct
    caller (the tests, checking the mask construction without Inductor) wants eager. CUDA always compiles.
    """
    flex = flex_attention_module()
    B, nh, H, W, _ = q.shape
    rh, rw = region_size
    T = rh * rw
    q_s, k_s, v_s = (to_regions(t, rh, rw).flatten(2, 3) for t in (q, k, v))  # (B, nh, N, d), region-major
    R = q_s.shape[2] // T
    idx = (routing_idx if routing_idx.dim() == 4 else routing_idx.unsqueeze(1)).long()
    table = _routing_table(idx, R)
    head_of = (lambda h: h) if idx.shape[1] > 1 else (lambda h: 0 * h)
    valid = key_valid_regions(H, W, rh, rw, key_padding, q.device)
    valid_flat = valid.flatten() if valid is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = table[b, head_of(h), q_idx // T, kv_idx // T]
        if valid_flat is not None:
            allowed = allowed & valid_flat[kv_idx]
        return allowed

    compiled = q.device.type == "cuda" or compile_on_cpu
    if q.device.type == "cuda" and T % 16:
        # tiles below 16 tokens do not exist on the GPU: dense routing mask over 128-token blocks
        block_mask = flex.create_block_mask(mask_mod, B, idx.shape[1], R * T, R * T, device=q.device, _compile=True)
        kernel_options = None
    else:
        # the routed blocks, padded to R entries per row (entries past kv_num_blocks are ignored)
        indices = torch.zeros(*idx.shape[:3], R, dtype=torch.int32, device=q.device)
        indices[..., : idx.shape[-1]] = idx.to(torch.int32)
        counts = torch.full(idx.shape[:3], idx.shape[-1], dtype=torch.int32, device=q.device)
        if valid is None and q.device.type == "cuda":
            # whole regions valid: full blocks, no per-token mask evaluated (the CPU template of torch 2.14 fails
            # to compile full-block-only masks: "kv_indices was not declared", so CPU keeps partial blocks)
            block_mask = flex.BlockMask.from_kv_blocks(
                torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=T, mask_mod=mask_mod
            )
        else:
            block_mask = flex.BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=T, mask_mod=mask_mod)
        # GPU tiles must divide the sparse block: pin them (defaults vary with head dim and dtype)
        tile = min(T & -T, 64)  # largest power of two dividing T (>= 16 here), at most 64
        kernel_options = (
            {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_M1": tile, "BLOCK_N1": tile, "BLOCK_M2": tile, "BLOCK_N2": tile}
            if q.device.type == "cuda"
            else None
        )
    attend = _compiled_flex() if compiled else flex.flex_attention
    out = attend(q_s, k_s, v_s, block_mask=block_mask, scale=scale, kernel_options=kernel_options)
    return from_regions(out.reshape(B, nh, R, T, -1), H, W, rh, rw)
