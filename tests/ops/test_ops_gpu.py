"""GPU checks of the compiled Triton kernels (fp16/bf16/fp32) and the Flex peer. Run with ``pytest -m gpu``."""

from __future__ import annotations

import pytest
import torch
from _helpers import routed_inputs

import zoo.ops as ops
from zoo.ops.reference import halo_attention_reference, routed_attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# BiFormer-T stages 1-3 at 224 (n_win 7, head dim 32), batch 2, plus a large det/seg-like region (16x16)
ROUTED_SHAPES = [
    (2, 2, 56, 56, 32, (8, 8), 1, None),
    (2, 4, 28, 28, 32, (4, 4), 4, None),
    (2, 8, 14, 14, 32, (2, 2), 16, None),
    (1, 2, 64, 48, 64, (16, 16), 3, (60, 45)),
]


def _fwd_bwd(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach().float(), [t.grad.float() for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ROUTED_SHAPES, ids=lambda s: f"{s[2]}x{s[3]}_r{s[5][0]}_k{s[6]}")
def test_routed_triton_gpu(shape, dtype):
    B, nh, H, W, d, region, topk, padding = shape
    q, k, v, idx = (t.cuda() for t in routed_inputs(B, nh, H, W, d, region, topk))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    grad_out = torch.randn(B, nh, H, W, d, device="cuda", dtype=dtype)
    scale = (nh * d) ** -0.5
    ref_out, ref_grads = _fwd_bwd(
        lambda q, k, v: routed_attention_reference(q.float(), k.float(), v.float(), idx, region, scale, padding),
        q, k, v, grad_out.float(),
    )  # fmt: skip
    out, grads = _fwd_bwd(
        lambda q, k, v: ops.routed_attention(q, k, v, idx, region, scale, padding, backend="triton"), q, k, v, grad_out
    )
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=tol * 4, rtol=tol * 4)
    again = _fwd_bwd(
        lambda q, k, v: ops.routed_attention(q, k, v, idx, region, scale, padding, backend="triton"), q, k, v, grad_out
    )
    assert all(torch.equal(a, b) for a, b in zip(grads, again[1])), "backward must be bitwise deterministic"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_flex_gpu(dtype):
    q, k, v, idx = (t.cuda() for t in routed_inputs(2, 4, 28, 28, 32, (4, 4), 4))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = ops.routed_attention(q, k, v, idx, 4, 0.1, backend="flex")
    expected = routed_attention_reference(q.float(), k.float(), v.float(), idx, (4, 4), 0.1)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_dense_sdpa_gpu(dtype):
    """BiFormer-T stage 3 at 224 (14x14 map, 2x2 regions, top-16): auto picks dense SDPA; forward and backward
    match the reference, and a repeated routing entry weighs twice there too."""
    q, k, v, idx = (t.cuda() for t in routed_inputs(2, 8, 14, 14, 32, (2, 2), 16))
    idx[:, :, 1] = idx[:, :, 0]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    assert ops.select_routed_backend(q, k, v, idx, 2, 0.1) == "sdpa_dense"
    grad_out = torch.randn(2, 8, 14, 14, 32, device="cuda", dtype=dtype)
    ref_out, ref_grads = _fwd_bwd(
        lambda q, k, v: routed_attention_reference(q.float(), k.float(), v.float(), idx, (2, 2), 0.1),
        q, k, v, grad_out.float(),
    )  # fmt: skip
    out, grads = _fwd_bwd(lambda q, k, v: ops.routed_attention(q, k, v, idx, 2, 0.1), q, k, v, grad_out)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=tol * 4, rtol=tol * 4)


def test_routed_auto_is_triton_and_compiles():
    q, k, v, idx = (t.cuda() for t in routed_inputs(2, 4, 28, 28, 32, (4, 4), 4))
    assert ops.select_routed_backend(q, k, v, idx, 4, 0.1) == "triton"
    compiled = torch.compile(lambda q, k, v: ops.routed_attention(q * 1.5, k, v, idx, 4, 0.1), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), routed_attention_reference(q * 1.5, k, v, idx, (4, 4), 0.1))


@pytest.mark.parametrize("backend", ["triton", "triton_key_blocks"])  # the two dk/dv strategies of the backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "block,halo,stride,size,pad_mask", [(8, 3, 1, 32, False), (8, 2, 2, 30, True), (7, 2, 1, 21, False)]
)
def test_halo_triton_gpu(dtype, block, halo, stride, size, pad_mask, backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, nh, d = 2, 4, 32
    Hq = -(-size // stride)
    win = block + 2 * halo
    q = torch.randn(B, nh, Hq, Hq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, nh, size, size, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, nh, size, size, d, device="cuda", generator=g).to(dtype)
    tables = [torch.randn(2 * win - 1, d, device="cuda", generator=g) * 0.2 for _ in range(2)]
    grad_out = torch.randn(B, nh, Hq, Hq, d, device="cuda", generator=g).to(dtype)

    def run(fn, inputs):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(grad_out.to(out.dtype))
        return out.float(), [t.grad.float() for t in leaves]

    ref_out, ref_grads = run(
        lambda q, k, v, th, tw: halo_attention_reference(
            q, k, v, block, halo, (th, tw), d**-0.5, False, stride, pad_mask
        ),
        [q.float(), k.float(), v.float(), *tables],
    )
    out, grads = run(
        lambda q, k, v, th, tw: ops.halo_attention(
            q, k, v, block, halo, (th, tw), None, False, stride, pad_mask, backend=backend
        ),
        [q, k, v, *tables],
    )
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for g_, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g_, g_ref, atol=tol * 8, rtol=tol * 8)
