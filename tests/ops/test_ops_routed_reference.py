"""The routed-attention reference (the definition) against an independent dense-mask formulation."""

from __future__ import annotations

import pytest
import torch
from _helpers import dense_routed_attention, routed_inputs

import zoo.ops as ops
from zoo.ops.reference import routed_attention_reference


@pytest.mark.parametrize(
    "B,nh,H,W,d,region,topk,per_head,padding",
    [
        (1, 1, 4, 4, 4, (2, 2), 1, False, None),
        (2, 2, 8, 6, 4, (2, 3), 3, False, None),
        (2, 3, 6, 6, 8, (1, 2), 5, True, None),
        (1, 2, 8, 8, 4, (4, 4), 2, False, (7, 5)),
        (2, 1, 6, 9, 4, (3, 3), 6, True, (4, 8)),
    ],
)
def test_reference_matches_dense_mask(B, nh, H, W, d, region, topk, per_head, padding):
    q, k, v, idx = routed_inputs(B, nh, H, W, d, region, topk, per_head=per_head, dv=d + 2)
    out = routed_attention_reference(q, k, v, idx, region, 0.3, padding)
    torch.testing.assert_close(out, dense_routed_attention(q, k, v, idx, region, 0.3, padding), atol=1e-5, rtol=1e-5)


def test_reference_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v, idx = routed_inputs(1, 2, 4, 4, 4, (2, 2), 1)
    idx = torch.full_like(idx, 3)  # every query region routes to the bottom-right region
    for t in (q, k, v):
        t.requires_grad_(True)
    out = routed_attention_reference(q, k, v, idx, (2, 2), 0.5, key_padding=(2, 2))  # region 3 is all padding
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_reference_gradcheck_float64():
    q, k, v, idx = routed_inputs(1, 1, 4, 6, 3, (2, 3), 2, dtype=torch.float64, dv=2)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: routed_attention_reference(q, k, v, idx, (2, 3), 0.7), args)
    assert torch.autograd.gradcheck(lambda q, k, v: routed_attention_reference(q, k, v, idx, (2, 3), 0.7, (3, 5)), args)


def test_region_routing_is_topk_and_detached():
    g = torch.Generator().manual_seed(0)
    qr = torch.randn(2, 3, 9, 5, generator=g, requires_grad=True)
    kr = torch.randn(2, 3, 9, 5, generator=g, requires_grad=True)
    idx = ops.region_routing(qr, kr, 4)
    assert idx.shape == (2, 3, 9, 4) and idx.dtype == torch.int64 and not idx.requires_grad
    assert torch.equal(idx, torch.topk(qr @ kr.transpose(-1, -2), 4, dim=-1).indices)
    with pytest.raises(ValueError, match="topk"):
        ops.region_routing(qr, kr, 10)
