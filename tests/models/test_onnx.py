"""ONNX export with the dynamo exporter, run with onnxruntime, for every zoo backbone and every custom op.

A user's route is ``torch.onnx.export(model, (x,), dynamo=True)`` on the default ops backend. zoo's custom ops
(``zoo::routed_attn_lean_fwd``, ``zoo::routed_attn_triton_fwd``, ``zoo::halo_attn_triton_fwd``) have no ONNX
function: the exporter decomposes them through their registered decompositions (``zoo.ops._common
.register_export_decomposition``). Parity: onnxruntime (CPU, fp32) against eager, ``rtol=1e-4`` and
``atol=1e-4`` times the output's largest magnitude (observed: ~1e-6 of it).

Time on a 2-core runner: exporting costs 5-40 s per model (per graph node, not per pixel), so the default run
exports one small variant per family (:data:`DEFAULT`); every other backbone is marked ``slow``
(``make test-slow``). The op-level tests export each backend of each op on tiny inputs (about 1 s each).
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
import zoo.ops as ops
from zoo.ops.reference import halo_attention_reference, routed_attention_reference

# the dynamo exporter needs onnx and onnxscript; onnxruntime runs the result
pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[dev]'): the dynamo exporter needs it")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e '.[dev]'): the exporter needs it")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[dev]')")

# One small variant per family, exported with the default CPU backends (routed: the torch_lean custom op; halo:
# the torch reference); the rest of the registry runs with -m slow. The Triton ops' decompositions are exported
# below, op by op (on CPU through the interpreter's availability check; export itself runs no kernel).
DEFAULT = ["biformer_tiny", "davit_tiny", "halonet26t", "medusa_resnet18"]
BACKBONES = zoo.list_models(kind="backbone")
PARAMS = [pytest.param(n, id=n, marks=() if n in DEFAULT else pytest.mark.slow) for n in BACKBONES]

# MEDUSA resizes its 128x128 attention heads to every stage by area pooling: at 96 the ratios are not integral
# and adaptive_avg_pool2d decomposes into thousands of ONNX nodes (90 s to export); at 128 they are integral.
INPUT_SIZE = {"medusa_*": 128}
SMALL = 96
BATCH = 2  # two samples: the routing and the gathers must keep samples apart
RTOL = 1e-4  # fp32; the observed error is ~1e-6 of the output's magnitude


def _input_size(name: str) -> tuple[int, int, int]:
    """A small input: the cfg's size shrunk to 96 (or the size above), or its fixed / minimum size."""
    cfg = zoo.get_pretrained_cfg(name)
    if cfg.fixed_input_size:
        return cfg.input_size
    side = next((s for pattern, s in INPUT_SIZE.items() if fnmatch.fnmatch(name, pattern)), SMALL)
    if cfg.min_input_size is not None and max(cfg.min_input_size[1:]) > side:
        return cfg.min_input_size
    return (cfg.input_size[0], min(cfg.input_size[1], side), min(cfg.input_size[2], side))


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Small random weights in the norm layers that are initialised to zero.

    timm zero-initialises the last norm of each residual branch (``zero_init_last``): untouched, HaloNet's
    attention would not reach the output and the comparison would not see it. Small weights (0.1-0.3) keep deep
    variants well conditioned (random weights near 1 and random running statistics make halonet_h2..h7 amplify
    fp32 rounding until eager fp32 and fp64 differ by 1e-3 of the output: no tolerance could tell a bug there).
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                if not module.weight.any():
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.2 + 0.1)
    return model


def _export(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], folder: Path, dynamic_shapes=None
) -> ort.InferenceSession:
    """``torch.onnx.export(module, inputs, dynamo=True)`` as a user calls it, saved and loaded in onnxruntime (CPU).

    Through a file: over 2 GB (davit_giant) the weights must go to external data, which only ``save`` writes.
    """
    program = torch.onnx.export(module, inputs, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes)
    program.save(folder / "model.onnx")
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # atol scales with the output (some backbones' logits are ~1e-6 at init): a fixed one would pass anything
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())


def _backbone(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_norms(zoo.create_model(name)).eval()


@pytest.mark.parametrize("name", PARAMS)
def test_backbone_onnx_matches_eager(name: str, tmp_path: Path) -> None:
    model = _backbone(name)
    x = torch.randn(BATCH, *_input_size(name))
    with torch.no_grad():
        expected = model(x)
    (actual,) = _run(_export(model, (x,), tmp_path), (x,))
    assert actual.shape == expected.shape
    _assert_close(actual, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFAULT)
def test_backbone_onnx_dynamic_batch(name: str, tmp_path: Path) -> None:
    model = _backbone(name)
    x = torch.randn(BATCH, *_input_size(name))
    session = _export(model, (x,), tmp_path, dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    for batch in (1, 3):
        x = torch.randn(batch, *_input_size(name))
        with torch.no_grad():
            _assert_close(_run(session, (x,))[0], model(x))


# ----------------------------------------------------------------------------------------------- ops


class _Routed(nn.Module):
    def __init__(self, backend: str, key_padding: tuple[int, int] | None) -> None:
        super().__init__()
        self.backend, self.key_padding = backend, key_padding

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return ops.routed_attention(q, k, v, idx, (2, 3), 0.3, self.key_padding, backend=self.backend)


class _Halo(nn.Module):
    def __init__(self, backend: str, query_stride: int, pad_mask: bool) -> None:
        super().__init__()
        self.backend, self.query_stride, self.pad_mask = backend, query_stride, pad_mask

    def forward(self, q, k, v, height_rel, width_rel) -> torch.Tensor:
        rel = (height_rel, width_rel)
        return ops.halo_attention(q, k, v, 4, 1, rel, 0.4, False, self.query_stride, self.pad_mask, self.backend)


def _skip_unsupported(op: str, backend: str, *args, **kwargs) -> None:
    reason = ops.backend_support(op, *args, **kwargs)[backend]
    if reason is not None:
        pytest.skip(f"{op} backend {backend!r} does not run here: {reason}")


def _routed_inputs(batch: int, per_head: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(B, 3, 8, 12, 8)`` in (2, 3) regions (R = 16) and a distinct top-3 routing per query region."""
    q, k, v = torch.randn(3, batch, 3, 8, 12, 8)
    groups = (batch, 3, 16) if per_head else (batch, 16)
    idx = torch.stack([torch.randperm(16)[:3] for _ in range(math.prod(groups))]).reshape(*groups, 3)
    return q, k, v, idx


def _halo_inputs(batch: int, query_stride: int, hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """q, k, v (2 heads, d = 8) on an ``hw`` key map and the two ``(2 * win - 1, 8)`` tables of block 4, halo 1."""
    k, v = torch.randn(2, batch, 2, *hw, 8)
    q = torch.randn(batch, 2, -(-hw[0] // query_stride), -(-hw[1] // query_stride), 8)
    return q, k, v, torch.randn(11, 8), torch.randn(11, 8)


@pytest.mark.parametrize(
    ("per_head", "key_padding"), [(False, None), (True, (5, 7))], ids=["shared_routing", "per_head_key_padding"]
)
@pytest.mark.parametrize("backend", ["torch_lean", "triton", "sdpa_dense", "torch"])
def test_routed_attention_onnx_per_backend(backend: str, per_head: bool, key_padding, tmp_path: Path) -> None:
    inputs = _routed_inputs(BATCH, per_head)
    _skip_unsupported("routed_attention", backend, *inputs, (2, 3), 0.3, key_padding)
    (actual,) = _run(_export(_Routed(backend, key_padding).eval(), inputs, tmp_path), inputs)
    _assert_close(actual, routed_attention_reference(*inputs, (2, 3), 0.3, key_padding))


@pytest.mark.parametrize(
    ("query_stride", "pad_mask", "hw"), [(1, False, (8, 8)), (1, True, (7, 10)), (2, True, (9, 6))]
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_halo_attention_onnx_per_backend(backend: str, query_stride: int, pad_mask: bool, hw, tmp_path: Path) -> None:
    q, k, v, *tables = inputs = _halo_inputs(BATCH, query_stride, hw)
    _skip_unsupported("halo_attention", backend, q, k, v, 4, 1, tables, 0.4, False, query_stride, pad_mask)
    (actual,) = _run(_export(_Halo(backend, query_stride, pad_mask).eval(), inputs, tmp_path), inputs)
    _assert_close(actual, halo_attention_reference(q, k, v, 4, 1, tables, 0.4, False, query_stride, pad_mask))


@pytest.mark.parametrize("backend", ["torch_lean", "triton"])
def test_routed_attention_onnx_dynamic_batch(backend: str, tmp_path: Path) -> None:
    """Exported once at batch 2, the graph runs other batches (the decompositions trace symbolic shapes)."""
    inputs = _routed_inputs(BATCH, per_head=False)
    _skip_unsupported("routed_attention", backend, *inputs, (2, 3), 0.3, (7, 11))
    batch = {0: torch.export.Dim.DYNAMIC}
    session = _export(_Routed(backend, (7, 11)).eval(), inputs, tmp_path, dynamic_shapes=(batch,) * 4)
    for b in (1, 3):
        inputs = _routed_inputs(b, per_head=False)
        _assert_close(_run(session, inputs)[0], routed_attention_reference(*inputs, (2, 3), 0.3, (7, 11)))


def test_halo_attention_onnx_dynamic_batch(tmp_path: Path) -> None:
    q, k, v, *tables = inputs = _halo_inputs(BATCH, 2, (9, 6))
    _skip_unsupported("halo_attention", "triton", q, k, v, 4, 1, tables, 0.4, False, 2, True)
    batch = {0: torch.export.Dim.DYNAMIC}
    session = _export(_Halo("triton", 2, True).eval(), inputs, tmp_path, dynamic_shapes=(batch,) * 3 + (None, None))
    for b in (1, 3):
        q, k, v, *tables = inputs = _halo_inputs(b, 2, (9, 6))
        _assert_close(_run(session, inputs)[0], halo_attention_reference(q, k, v, 4, 1, tables, 0.4, False, 2, True))
