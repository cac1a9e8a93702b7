"""Dense backend of routed attention (``backend="sdpa_dense"``): every query against every key with torch's
``scaled_dot_product_attention`` and an additive routing bias; picked by ``auto`` on CUDA where it is faster
than the routed kernel.

The bias of query token ``i`` and key token ``j`` is ``log(c)``, with ``c`` the number of times ``j``'s region
appears in ``i``'s region's routing row: ``-inf`` for regions not routed, ``0`` for a region routed once, and
``log 2`` for one listed twice, so repeated entries weigh twice, exactly as the gather formulation.

When it wins: with small regions (``rh*rw < 16`` tokens, BiFormer's 2x2 regions at stage 3 at 224) a routed
tile of 16 query rows is mostly empty, while the dense scores of a small map cost at most a few times the
routed ones. Measured on an H200 (bf16, BiFormer-T stage 3: 14x14 map, 2x2 regions, top-16, batch 1 / 32 /
128): dense masked SDPA took 0.57x / 0.51x / 0.34x the Triton kernel's time forward and 0.47x / 0.48x / 0.37x
forward + backward (``benchmarks/results/ops_NVIDIA_H200.csv``); at stage 2 (4x4 regions) the kernel is 7x
faster. ``auto`` therefore picks this backend on CUDA only for regions under 16 tokens whose map has at most
4x the routed keys (``R <= 4 * topk``), and never with ``key_padding`` (a query whose routed keys are all
padding would get NaN from the softmax; the kernel returns 0 there).

FLOPs counted by ``FlopCounterMode`` are the dense ones this backend executes, not the routed count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MAX_DENSE_FACTOR", "MAX_REGION_TOKENS", "routed_attention_dense", "routing_bias"]

# auto's conditions (checked in zoo.ops.routed, measured as above)
MAX_REGION_TOKENS = 16  # the Triton kernels' smallest query tile: smaller regions leave its rows empty
MAX_DENSE_FACTOR = 4  # dense scores may cost at most this many times the routed ones (R <= factor * topk)


def routing_bias(
    routing_idx: torch.Tensor, height: int, width: int, region_size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Additive bias ``(B, nh | 1, N, N)`` (``N = H*W``, row-major tokens): ``log`` of how often each key's
    region is routed from each query's region (``-inf`` when not routed).

    Args:
        routing_idx: ``(B, R, topk)`` or ``(B, nh, R, topk)`` region numbers.
    """
    rh, rw = region_size
    idx = routing_idx if routing_idx.dim() == 4 else routing_idx.unsqueeze(1)
    B, G, R, _ = idx.shape
    counts = torch.zeros(B, G, R, R, dtype=torch.float32, device=idx.device)
    counts.scatter_add_(-1, idx.long(), torch.ones(idx.shape, dtype=torch.float32, device=idx.device))
    rows = torch.arange(height, device=idx.device) // rh
    cols = torch.arange(width, device=idx.device) // rw
    region_of_token = (rows[:, None] * (width // rw) + cols[None, :]).flatten()  # (N,)
    N = height * width
    # last dim padded to a multiple of 16 elements: the memory-efficient SDPA kernel wants an aligned bias stride
    padded = torch.empty(B, G, N, -(-N // 16) * 16, dtype=dtype, device=idx.device)
    bias = padded[..., :N]
    bias.copy_(counts.log()[:, :, region_of_token][:, :, :, region_of_token])
    return bias


def routed_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing_idx: torch.Tensor,
    region_size: tuple[int, int],
    scale: float,
    key_padding: tuple[int, int] | None,
) -> torch.Tensor:
    """Backend entry point; arguments as :func:`zoo.ops.routed_attention` (already validated). Returns
    ``(B, nh, H, W, d_v)``."""
    if key_padding is not None:  # the dispatch refuses it; a direct call must not silently ignore it
        raise ValueError("routed_attention_dense does not support key_padding")
    B, nh, H, W, d_qk = q.shape
    N = H * W
    bias = routing_bias(routing_idx, H, W, region_size, q.dtype)
    out = F.scaled_dot_product_attention(
        q.reshape(B, nh, N, d_qk), k.reshape(B, nh, N, d_qk), v.reshape(B, nh, N, v.shape[-1]),
        attn_mask=bias, scale=scale,
    )  # fmt: skip
    return out.view(B, nh, H, W, -1)
