"""Halo attention: the reference and the Triton kernels (interpreter on CPU) against timm's HaloAttn."""

from __future__ import annotations

import pytest
import torch
from timm.layers.halo_attn import HaloAttn

import zoo.ops as ops
from zoo.ops.reference import halo_attention_reference

# the two dk/dv strategies of the Triton backward, each a backend: window gradients + fold, and key-centric
TRITON_BACKENDS = ["triton", "triton_key_blocks"]


def _zoo_halo_forward(attn: HaloAttn, x: torch.Tensor, backend: str, pad_mask: bool = False) -> torch.Tensor:
    """timm's HaloAttn.forward with its parameters, the attention core replaced by zoo.ops.halo_attention."""
    B, _, H, W = x.shape
    nh, dqk, dv = attn.num_heads, attn.dim_head_qk, attn.dim_head_v
    q = attn.q(x)
    q = q.view(B, nh, dqk, *q.shape[-2:]).permute(0, 1, 3, 4, 2)
    kv = attn.kv(x).view(B, nh, dqk + dv, H, W)
    k, v = kv[:, :, :dqk].permute(0, 1, 3, 4, 2), kv[:, :, dqk:].permute(0, 1, 3, 4, 2)
    rel = (attn.pos_embed.height_rel, attn.pos_embed.width_rel)
    out = ops.halo_attention(
        q, k, v, attn.block_size, attn.halo_size, rel, attn.scale, attn.scale_pos_embed, attn.block_stride,
        pad_mask=pad_mask, backend=backend,
    )  # fmt: skip
    return attn.pool(out.permute(0, 1, 4, 2, 3).reshape(B, nh * dv, *out.shape[2:4]))


# (stride, block, halo, scale_pos_embed, avg_down, map): timm's configurations at toy sizes
TIMM_CASES = {
    "b4h1": (1, 4, 1, False, False, 8),
    "b4h2_stride2_spe": (2, 4, 2, True, False, 8),
    "b8h3_avgdown": (2, 8, 3, False, True, 8),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_matches_timm_halo_attn(backend, case):
    stride, block, halo, spe, avg_down, size = TIMM_CASES[case]
    torch.manual_seed(0)
    attn = HaloAttn(8, 16, stride=stride, num_heads=2, block_size=block, halo_size=halo, scale_pos_embed=spe,
                    avg_down=avg_down)  # fmt: skip
    x = torch.randn(1, 8, size, size)
    expected = attn(x)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, list(attn.parameters()), grad_out)
    out = _zoo_halo_forward(attn, x, backend)
    grads = torch.autograd.grad(out, list(attn.parameters()), grad_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    names = [name for name, _ in attn.named_parameters()]
    for name, g, g_ref in zip(names, grads, expected_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


# (B, nh, H, W, d, d_v, block, halo, stride, rel, scale_pos_embed, pad_mask): any size, masking, no rel_pos
CASES = {
    "odd_map_masked_spe": (1, 1, 10, 7, 8, 8, 4, 2, 1, True, True, True),
    "stride2_odd_unmasked": (2, 1, 7, 9, 4, 4, 4, 1, 2, True, False, False),
    "no_rel_masked": (1, 2, 6, 6, 4, 8, 4, 1, 1, False, False, True),
    "halo_wider_than_block": (1, 1, 4, 5, 4, 4, 2, 3, 1, True, False, False),
    # block sides that are not powers of 2 (haloregnetz_b uses 7): the key grid of the dk/dv kernel is padded
    "block3_odd_map": (1, 1, 7, 8, 4, 4, 3, 1, 1, True, False, False),
    "block7_halo2_spe_masked": (1, 1, 9, 10, 4, 4, 7, 2, 1, True, True, True),
}


def _halo_inputs(B, nh, H, W, d, dv, block, halo, stride, rel, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hq, Wq = -(-H // stride), -(-W // stride)
    q = torch.randn(B, nh, Hq, Wq, d, generator=g)
    k = torch.randn(B, nh, H, W, d, generator=g)
    v = torch.randn(B, nh, H, W, dv, generator=g)
    win = block + 2 * halo
    tables = tuple(torch.randn(2 * win - 1, d, generator=g) * 0.5 for _ in range(2)) if rel else None
    return q, k, v, tables, torch.randn(B, nh, Hq, Wq, dv, generator=g)


def _run(backend, q, k, v, tables, grad_out, block, halo, stride, spe, pad_mask):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *(tables or ()))]
    rel = tuple(leaves[3:]) if tables else None
    out = ops.halo_attention(*leaves[:3], block, halo, rel, 0.4, spe, stride, pad_mask, backend=backend)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, backend):
    B, nh, H, W, d, dv, block, halo, stride, rel, spe, pad_mask = CASES[case]
    q, k, v, tables, grad_out = _halo_inputs(B, nh, H, W, d, dv, block, halo, stride, rel)
    out_ref, grads_ref = _run("torch", q, k, v, tables, grad_out, block, halo, stride, spe, pad_mask)
    out, grads = _run(backend, q, k, v, tables, grad_out, block, halo, stride, spe, pad_mask)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    for name, g, g_ref in zip(["q", "k", "v", "height_rel", "width_rel"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


def test_reference_padding_semantics():
    """pad_mask=False on a padded map equals the reference on the zero-padded map, cropped; masking changes it."""
    q, k, v, tables, _ = _halo_inputs(1, 1, 6, 5, 4, 4, 4, 1, 1, True)
    out = halo_attention_reference(q, k, v, 4, 1, tables, 0.5)
    padded = [torch.nn.functional.pad(t, (0, 0, 0, 3, 0, 2)) for t in (q, k, v)]
    torch.testing.assert_close(out, halo_attention_reference(*padded, 4, 1, tables, 0.5)[:, :, :6, :5])
    masked = halo_attention_reference(q, k, v, 4, 1, tables, 0.5, pad_mask=True)
    assert torch.isfinite(masked).all() and not torch.allclose(masked, out)


def test_reference_gradcheck_float64():
    q, k, v, tables, _ = _halo_inputs(1, 1, 5, 3, 3, 2, 2, 1, 1, True)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v, *tables)]
    fn = lambda q, k, v, th, tw: halo_attention_reference(q, k, v, 2, 1, (th, tw), 0.6, False, 1, True)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_backward_is_deterministic(backend):
    q, k, v, tables, grad_out = _halo_inputs(1, 1, 8, 8, 4, 4, 4, 2, 1, True)
    first = _run(backend, q, k, v, tables, grad_out, 4, 2, 1, False, False)
    second = _run(backend, q, k, v, tables, grad_out, 4, 2, 1, False, False)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_flops_match_between_backends():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, tables, _ = _halo_inputs(1, 2, 8, 8, 4, 4, 4, 1, 1, True)
    counts = {}
    for backend in ["torch", "triton"]:
        with FlopCounterMode(display=False) as counter:
            ops.halo_attention(q, k, v, 4, 1, tables, backend=backend)
        counts[backend] = counter.get_total_flops()
    assert counts["torch"] == counts["triton"] > 0


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_torch_compile_has_no_graph_break(backend):
    q, k, v, tables, _ = _halo_inputs(1, 1, 4, 4, 4, 4, 4, 1, 1, True)

    def layer(q, k, v):
        return ops.halo_attention(q * 2, k, v, 4, 1, tables, backend=backend).sum()

    explanation = torch._dynamo.explain(layer)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"block_size": 3}, ValueError, "multiple of query_stride"),
        ({"query_stride": 1}, ValueError, "expected 8x8"),
        ({"rel_pos": (torch.zeros(5, 4), torch.zeros(5, 4))}, ValueError, r"\(11, 4\)"),
        ({"halo_size": -1}, ValueError, "halo_size"),
        ({"k": torch.zeros(1, 2, 8, 8, 4)}, ValueError, "k must have shape"),
        ({"v": torch.zeros(1, 1, 8, 8, 4, dtype=torch.float64)}, TypeError, "dtype"),
    ],
)
def test_bad_halo_inputs(kwargs, error, match):
    args = {
        "q": torch.zeros(1, 1, 4, 4, 4),
        "k": torch.zeros(1, 1, 8, 8, 4),
        "v": torch.zeros(1, 1, 8, 8, 4),
        "block_size": 4,
        "halo_size": 1,
        "rel_pos": (torch.zeros(11, 4), torch.zeros(11, 4)),
        "query_stride": 2,
    }
    with pytest.raises(error, match=match):
        ops.halo_attention(**{**args, **kwargs})


def test_key_blocks_is_forced_only_and_unknown_names_list_the_backends():
    """auto never picks the key-centric backward (window is the default); an unknown name lists the known ones."""
    q, k, v, tables, _ = _halo_inputs(1, 1, 4, 4, 4, 4, 4, 1, 1, True)
    reasons = ops.backend_support("halo_attention", q, k, v, 4, 1, tables)
    assert reasons["triton_key_blocks"] is None  # supported when forced (interpreter on CPU)
    assert ops.select_halo_backend(q, k, v, 4, 1, tables, backend="triton_key_blocks") == "triton_key_blocks"
    if not torch.cuda.is_available():
        assert ops.select_halo_backend(q, k, v, 4, 1, tables) == "torch"
    with pytest.raises(ops.BackendUnavailableError, match="triton_key_blocks"):
        ops.halo_attention(q, k, v, 4, 1, tables, backend="triton_atomics")


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_fp16_gradients_close_to_fp32_reference(backend):
    """Half inputs: the window strategy keeps its per-window gradients in k's dtype (as timm's unfold backward
    does) and sums them in fp32; both strategies stay within fp16 rounding of the fp32 reference. (fp16, not
    bf16: under the Triton interpreter the bf16 forward is already wrong; bf16 is checked on GPU.)"""
    q, k, v, tables, grad_out = _halo_inputs(1, 2, 16, 16, 16, 16, 8, 3, 1, True)
    _, grads_ref = _run("torch", q, k, v, tables, grad_out, 8, 3, 1, False, False)
    half = [t.half() for t in (q, k, v)]
    _, grads = _run(backend, *half, tables, grad_out.half(), 8, 3, 1, False, False)
    for name, g, g_ref in zip(["q", "k", "v", "height_rel", "width_rel"], grads, grads_ref):
        error = (g.float() - g_ref).abs().max() / g_ref.abs().max()
        assert error < 3e-3, f"d{name}: max error {error:.2e} of the largest gradient"


def test_triton_keeps_no_relative_logit_tables_for_backward(saved_bytes):
    """The Triton path saves q, k, v, the position tables, out and lse; the per-query logit tables (2 x (2*win-1)
    fp32 values per query, larger than q) and an fp32 copy of q are rebuilt in the backward instead."""
    q, k, v, tables, _ = _halo_inputs(1, 2, 16, 16, 8, 8, 8, 3, 1, True)
    leaves = [t.requires_grad_(True) for t in (q, k, v, *tables)]
    saved = saved_bytes(lambda: ops.halo_attention(*leaves[:3], 8, 3, tuple(leaves[3:]), backend="triton"))
    qkv_out = 4 * q.numel() * q.element_size()  # q, k, v and out (d_v = d_qk here)
    extra = saved - qkv_out
    assert extra <= q.numel() // 8 * 4 + sum(t.numel() * 4 for t in tables), f"{extra} bytes beyond q, k, v, out"
