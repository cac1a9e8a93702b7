"""Backend selection, the ZOO_OPS_BACKEND override, introspection and bad-input errors."""

from __future__ import annotations

import pytest
import torch
from _helpers import routed_inputs

import zoo.ops as ops
from zoo.ops import BackendUnavailableError
from zoo.ops.routed import RoutedProblem


@pytest.fixture
def inputs():
    return routed_inputs(1, 2, 4, 4, 8, (2, 2), 2)


def test_available_backends_lists_every_op():
    backends = ops.available_backends()
    assert backends["routed_attention"] == ["sdpa_dense", "triton", "torch_lean", "torch", "flex"]
    assert backends["halo_attention"] == ["triton", "triton_key_blocks", "torch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_on_cpu_picks_lean_and_explains_triton(inputs):
    assert ops.select_routed_backend(*inputs, 2, 0.3) == "torch_lean"
    reasons = ops.backend_support("routed_attention", *inputs, 2, 0.3)
    assert reasons["torch"] is None and reasons["torch_lean"] is None


def _problem(side: int, region: int, topk: int, device: str = "cuda", key_padding=None) -> RoutedProblem:
    """A BiFormer-like problem as the dispatch sees it (no tensors: the device may be absent here)."""
    R = (side // region) ** 2
    return RoutedProblem(
        device=torch.device(device), dtype=torch.bfloat16, batch=128, heads=8, height=side, width=side, d_qk=32,
        d_v=32, region_size=(region, region), num_regions=R, topk=topk, per_head_routing=False,
        key_padding=key_padding, requires_grad=True,
    )  # fmt: skip


def test_auto_picks_dense_sdpa_where_it_was_measured_faster():
    """CUDA, regions under 16 tokens, R <= 4 * topk, no key padding (BiFormer-T stage 3 at 224): dense SDPA;
    stage 2 (4x4 regions), a large map, key padding, or a CPU tensor: not."""
    dense = ops._dispatch._REGISTRY["routed_attention"][0]
    assert dense.name == "sdpa_dense"
    stage3 = _problem(14, 2, 16)
    assert dense.check(stage3) is None and dense.auto_check(stage3) is None
    assert "fill the kernel" in dense.auto_check(_problem(28, 4, 4))
    assert "cost too much" in dense.auto_check(_problem(56, 2, 16))  # R = 784 > 64
    assert "key_padding" in dense.check(_problem(14, 2, 16, key_padding=(13, 13)))
    assert "CUDA only" in dense.auto_check(_problem(14, 2, 16, device="cpu"))


def test_env_override(inputs, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", "torch")
    assert ops.select_routed_backend(*inputs, 2, 0.3) == "torch"
    monkeypatch.setenv("ZOO_OPS_BACKEND", "halo_attention=torch,routed_attention=torch_lean")
    assert ops.select_routed_backend(*inputs, 2, 0.3) == "torch_lean"
    assert ops.select_routed_backend(*inputs, 2, 0.3, backend="torch") == "torch"  # the argument wins
    monkeypatch.setenv("ZOO_OPS_BACKEND", "routed_attention=nope")
    with pytest.raises(BackendUnavailableError, match="nope"):
        ops.select_routed_backend(*inputs, 2, 0.3)


@pytest.mark.parametrize(
    "value, match",
    [
        ("tritn", r"unknown backend 'tritn'; known backends: .*'torch_lean'"),  # a typo is not a silent auto
        ("routed_attention=torch,halo=torch", r"op 'halo', which has no backends; ops: \['halo_attention'"),
        ("halo_attention=torch_lean", r"halo_attention has backends"),  # checked whichever op asks
    ],
)
def test_env_names_are_checked(inputs, monkeypatch, value, match):
    monkeypatch.setenv("ZOO_OPS_BACKEND", value)
    with pytest.raises(BackendUnavailableError, match=match):
        ops.select_routed_backend(*inputs, 2, 0.3)


def test_env_plain_name_applies_where_it_exists(inputs, monkeypatch):
    from zoo.ops._dispatch import _env_choice

    monkeypatch.setenv("ZOO_OPS_BACKEND", "torch_lean")  # routed only: halo keeps auto
    assert ops.select_routed_backend(*inputs, 2, 0.3) == "torch_lean" and _env_choice("halo_attention") is None
    monkeypatch.setenv("ZOO_OPS_BACKEND", "auto,torch")
    assert ops.select_routed_backend(*inputs, 2, 0.3) == "torch" and _env_choice("halo_attention") == "torch"


def test_forcing_an_unsupported_backend_lists_every_reason(inputs):
    q, k, v, idx = inputs
    q, k, v = q.double(), k.double(), v.double()
    with pytest.raises(BackendUnavailableError) as err:
        ops.routed_attention(q, k, v, idx, 2, 0.3, backend="triton")
    message = str(err.value)
    assert "float64" in message
    for name in ops.available_backends("routed_attention"):
        assert f"- {name}:" in message
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        ops.routed_attention(*inputs, 2, 0.3, backend="cuda_magic")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must have shape"),
        (lambda a: {**a, "k": a["k"][:, :1]}, ValueError, "k must have the shape of q"),
        (lambda a: {**a, "v": a["v"][:, :, :2]}, ValueError, "v must have shape"),
        (lambda a: {**a, "v": a["v"].double()}, TypeError, "dtype"),
        (lambda a: {**a, "q": a["q"].to(torch.int32)}, TypeError, "float16/bfloat16/float32/float64"),
        (lambda a: {**a, "region_size": 3}, ValueError, "not a multiple of region_size 3x3"),
        (lambda a: {**a, "region_size": (2, 0)}, ValueError, "region_size entries must be >= 1"),
        (lambda a: {**a, "routing_idx": a["routing_idx"][0]}, ValueError, "routing_idx must have shape"),
        (lambda a: {**a, "routing_idx": a["routing_idx"][:, :3]}, ValueError, r"R = 4"),
        (lambda a: {**a, "routing_idx": a["routing_idx"].float()}, TypeError, "int64 or int32"),
        (lambda a: {**a, "routing_idx": torch.zeros(1, 4, 5, dtype=torch.long)}, ValueError, "topk = 5"),
        (lambda a: {**a, "routing_idx": a["routing_idx"] + 3}, ValueError, r"\[0, 4\)"),
        (lambda a: {**a, "routing_idx": torch.zeros(1, 3, 4, 1, dtype=torch.long)}, ValueError, "nh, R, topk"),
        (lambda a: {**a, "key_padding": (5, 4)}, ValueError, "valid_h"),
        (lambda a: {**a, "key_padding": 3}, TypeError, "key_padding"),
        (lambda a: {**a, "scale": "x"}, TypeError, "scale"),
    ],
)
def test_bad_routed_inputs(inputs, mutate, error, match):
    q, k, v, idx = inputs
    args = mutate({"q": q, "k": k, "v": v, "routing_idx": idx, "region_size": 2, "scale": 0.3, "key_padding": None})
    with pytest.raises(error, match=match):
        ops.routed_attention(**args)


def test_bad_routing_inputs():
    with pytest.raises(ValueError, match="q_region"):
        ops.region_routing(torch.zeros(4, 3), torch.zeros(4, 3), 1)
    with pytest.raises(ValueError, match="one shape"):
        ops.region_routing(torch.zeros(1, 4, 3), torch.zeros(1, 5, 3), 1)
    with pytest.raises(ValueError, match="topk"):
        ops.region_routing(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), 0)
