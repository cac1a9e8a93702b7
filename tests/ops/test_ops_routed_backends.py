"""Every routed-attention backend against the reference: outputs and gradients, masking, determinism, dispatch.

The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU (tests/ops/conftest.py), which executes programs one by
one in Python: shapes here are tiny on purpose.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import routed_inputs

import zoo.ops as ops
from zoo.ops.reference import routed_attention_reference

CPU_BACKENDS = ["torch_lean", "triton"]

# (B, nh, H, W, d, region, topk, per_head, key_padding): topk 1/4/16, region sizes 1..8, masking, heads, batch
CASES = {
    "topk1_r4_pad": (1, 2, 8, 8, 8, (4, 4), 1, False, (6, 5)),
    "topk4_r2x3_b2": (2, 2, 4, 6, 8, (2, 3), 4, False, None),
    "topk16_r1": (1, 1, 4, 4, 16, (1, 1), 16, False, None),
    "topk2_r8_perhead": (1, 2, 16, 8, 8, (8, 8), 2, True, (13, 8)),
    "topk3_r3_perhead_pad": (2, 1, 6, 9, 4, (3, 3), 3, True, (5, 7)),
    "topk2_r2_chunked": (1, 1, 8, 8, 8, (2, 2), 2, False, (7, 7)),  # R = 16 > 4 * topk: lean's chunked path
}


def _grad_out(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run(backend, q, k, v, idx, region, scale, padding, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if backend == "reference":
        out = routed_attention_reference(*leaves, idx, region, scale, padding)
    else:
        out = ops.routed_attention(*leaves, idx, region, scale, key_padding=padding, backend=backend)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference(backend, case):
    B, nh, H, W, d, region, topk, per_head, padding = CASES[case]
    q, k, v, idx = routed_inputs(B, nh, H, W, d, region, topk, per_head=per_head, dv=d + 4)
    grad_out = _grad_out((B, nh, H, W, d + 4))
    out_ref, grads_ref = _run("reference", q, k, v, idx, region, d**-0.5, padding, grad_out)
    out, grads = _run(backend, q, k, v, idx, region, d**-0.5, padding, grad_out)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("case", [c for c, args in CASES.items() if args[-1] is None])
def test_sdpa_dense_matches_reference(case):
    """The dense backend (forced: auto picks it on CUDA only) on the cases without key padding."""
    B, nh, H, W, d, region, topk, per_head, padding = CASES[case]
    q, k, v, idx = routed_inputs(B, nh, H, W, d, region, topk, per_head=per_head, dv=d + 4)
    grad_out = _grad_out((B, nh, H, W, d + 4))
    out_ref, grads_ref = _run("reference", q, k, v, idx, region, d**-0.5, None, grad_out)
    out, grads = _run("sdpa_dense", q, k, v, idx, region, d**-0.5, None, grad_out)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["sdpa_dense", *CPU_BACKENDS])
def test_repeated_routing_entries_count_twice(backend):
    """A region listed twice in a routing row weighs twice, as in the gather formulation."""
    q, k, v, idx = routed_inputs(1, 2, 4, 4, 8, (2, 2), 3)
    idx[:, :, 1] = idx[:, :, 0]
    grad_out = _grad_out((1, 2, 4, 4, 8))
    out_ref, grads_ref = _run("reference", q, k, v, idx, (2, 2), 0.4, None, grad_out)
    out, grads = _run(backend, q, k, v, idx, (2, 2), 0.4, None, grad_out)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_sdpa_dense_refuses_key_padding():
    q, k, v, idx = routed_inputs(1, 1, 4, 4, 8, (2, 2), 2)
    with pytest.raises(ops.BackendUnavailableError, match="key_padding"):
        ops.routed_attention(q, k, v, idx, 2, 0.3, key_padding=(3, 3), backend="sdpa_dense")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_is_deterministic(backend):
    q, k, v, idx = routed_inputs(1, 2, 4, 8, 8, (2, 2), 3)
    idx[:, :, 0] = 0  # every query region routes to region 0: many contributions to the same dk, dv rows
    grad_out = _grad_out((1, 2, 4, 8, 8))
    first = _run(backend, q, k, v, idx, (2, 2), 0.3, None, grad_out)
    second = _run(backend, q, k, v, idx, (2, 2), 0.3, None, grad_out)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("side", [4, 8])  # 4: R = 4 (lean's dense path); 8: R = 16 > 4 * topk (chunked path)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_queries_output_zero(backend, side):
    q, k, v, _ = routed_inputs(1, 1, side, side, 4, (2, 2), 1)
    R = (side // 2) ** 2
    idx = torch.full((1, R, 1), R - 1)  # every region routes to the bottom-right region: all padding below...
    idx[0, 2, 0] = 0  # ...except region 2, which routes to region 0
    padding = (side - 2, side - 2)
    grad_out = torch.ones(1, 1, side, side, 4)
    out, grads = _run(backend, q, k, v, idx, (2, 2), 0.5, padding, grad_out)
    out_ref, grads_ref = _run("reference", q, k, v, idx, (2, 2), 0.5, padding, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out[0, 0, :2, 2:4], torch.zeros(2, 2, 4))  # region 1 saw no valid key
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    """Permuted views (as from a (B, H, W, nh, d) projection) are read in place and give the same result."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 4, 4, 3, 2, 8, generator=g)  # (B, H, W, 3, nh, d)
    q, k, v = (qkv[..., i, :, :].permute(0, 3, 1, 2, 4) for i in range(3))
    idx = torch.tensor([[[1, 0], [2, 3], [3, 1], [0, 2]]])
    expected = routed_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), idx, (2, 2), 0.4)
    out = ops.routed_attention(q, k, v, idx, 2, 0.4, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lean_float64_gradcheck():
    q, k, v, idx = routed_inputs(1, 1, 4, 4, 3, (2, 2), 2, dtype=torch.float64)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    fn = lambda q, k, v: ops.routed_attention(q, k, v, idx, 2, 0.6, key_padding=(3, 4), backend="torch_lean")
    assert torch.autograd.gradcheck(fn, args)


def test_flop_count_is_backend_independent():
    from torch.utils.flop_counter import FlopCounterMode

    B, nh, H, W, d, topk = 1, 2, 4, 4, 8, 2
    q, k, v, idx = routed_inputs(B, nh, H, W, d, (2, 2), topk)
    expected = 2 * B * nh * H * W * topk * 4 * (d + d)
    for backend in ["torch", *CPU_BACKENDS]:
        with FlopCounterMode(display=False) as counter:
            ops.routed_attention(q, k, v, idx, 2, 0.3, backend=backend)
        assert counter.get_total_flops() == expected, backend


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "sdpa_dense"])
def test_torch_compile_has_no_graph_break(backend):
    q, k, v, idx = routed_inputs(1, 1, 4, 4, 8, (2, 2), 2)

    def layer(q, k, v):
        return ops.routed_attention(q * 2, k, v, idx, 2, 0.3, backend=backend).sum()

    explanation = torch._dynamo.explain(layer)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", ["topk4_r2x3_b2", "topk3_r3_perhead_pad"])
def test_flex_forward_matches_reference(case):
    """Eager Flex on CPU (dense scores + routing mask_mod): checks the mask construction; compiled runs in the bench
    (and through the dispatch, which always compiles)."""
    import zoo.ops.flex as flex_backend

    B, nh, H, W, d, region, topk, per_head, padding = CASES[case]
    q, k, v, idx = routed_inputs(B, nh, H, W, d, region, topk, per_head=per_head)
    assert ops.backend_support("routed_attention", q, k, v, idx, region, 0.3, padding)["flex"] is None
    with torch.no_grad():
        out = flex_backend.routed_attention_flex(
            q, k, v, idx, region, 0.3, padding, compile_on_cpu=torch.cuda.is_available()
        )
    torch.testing.assert_close(
        out, routed_attention_reference(q, k, v, idx, region, 0.3, padding), atol=1e-5, rtol=1e-5
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only limitation")
def test_flex_refuses_cpu_backward():
    q, k, v, idx = routed_inputs(1, 1, 4, 4, 4, (2, 2), 1)
    q.requires_grad_(True)
    reasons = ops.backend_support("routed_attention", q, k, v, idx, 2, 0.3)
    assert "no CPU backward" in reasons["flex"]


@pytest.mark.parametrize("case", ["topk2_r2_chunked", (2, 2, 8, 12, 4, (2, 2), 3, True, (7, 11))])
def test_lean_multi_chunk(case, monkeypatch):
    """Small problems fit one chunk; a zero chunk budget forces ceil(R / topk)-region chunks."""
    import zoo.ops.lean as lean

    monkeypatch.setattr(lean, "CHUNK_BYTES", 0)
    B, nh, H, W, d, region, topk, per_head, padding = CASES[case] if isinstance(case, str) else case
    q, k, v, idx = routed_inputs(B, nh, H, W, d, region, topk, per_head=per_head)
    grad_out = _grad_out((B, nh, H, W, d))
    out_ref, grads_ref = _run("reference", q, k, v, idx, region, 0.3, padding, grad_out)
    out, grads = _run("torch_lean", q, k, v, idx, region, 0.3, padding, grad_out)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
