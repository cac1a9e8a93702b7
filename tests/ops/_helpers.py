"""Independent formulations and input builders used by the ops tests."""

from __future__ import annotations

import torch


def dense_routed_attention(q, k, v, routing_idx, region_size, scale, key_padding=None):
    """Routed attention as dense attention over all H*W keys with a boolean routing mask (independent of gathers).

    Only valid for routing without repeated regions. Shapes as ``zoo.ops.routed_attention``.
    """
    B, nh, H, W, _ = q.shape
    rh, rw = region_size
    n_w = W // rw
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    region_of = ((rows // rh) * n_w + cols // rw).flatten()  # (N,)
    idx = routing_idx if routing_idx.dim() == 4 else routing_idx[:, None]
    R = (H // rh) * n_w
    routed = torch.zeros(idx.shape[0], idx.shape[1], R, R, dtype=torch.bool)
    routed.scatter_(-1, idx.long().cpu(), True)  # routed[b, h, query region, key region]
    allowed = routed[:, :, region_of][:, :, :, region_of]  # (B, nh', N, N)
    if key_padding is not None:
        key_ok = ((rows < key_padding[0]) & (cols < key_padding[1])).flatten()
        allowed = allowed & key_ok
    allowed = allowed.to(q.device)
    logits = (q.flatten(2, 3) * scale) @ k.flatten(2, 3).transpose(-1, -2)
    logits = logits.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(logits, -1).nan_to_num(0.0)
    return (attn @ v.flatten(2, 3)).reshape(B, nh, H, W, v.shape[-1])


def routed_inputs(B, nh, H, W, d, region_size, topk, per_head=False, dv=None, dtype=torch.float32, seed=0):
    """Random q, k, v ``(B, nh, H, W, d)`` and a random routing without repeats."""
    g = torch.Generator().manual_seed(seed)
    rh, rw = region_size
    R = (H // rh) * (W // rw)
    q = torch.randn(B, nh, H, W, d, generator=g, dtype=dtype)
    k = torch.randn(B, nh, H, W, d, generator=g, dtype=dtype)
    v = torch.randn(B, nh, H, W, dv or d, generator=g, dtype=dtype)
    lead = (B, nh, R) if per_head else (B, R)
    idx = torch.rand(*lead, R, generator=g).argsort(-1)[..., :topk]
    return q, k, v, idx
