"""MEDUSA reconstruction: shapes, parameter counts, the single shared attention body, grayscale input.

timm's model contract is checked for both variants by ``tests/models/test_conformance.py``; this file covers
what is MEDUSA-specific. Small inputs and the small variant keep it fast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models import FeatureGraphNet, FeatureHookNet

import zoo
import zoo.models.medusa as medusa  # noqa: F401  (explicit until zoo.models imports it)
from zoo.models.medusa import Medusa, per_image_standardize

SMALL = dict(body_widths=(8, 16, 32), body_attn_heads=2, attn_size=64)  # a cheap body for structural tests


@pytest.fixture(scope="module")
def model18() -> Medusa:
    torch.manual_seed(0)
    return zoo.create_model("medusa_resnet18").eval()


def test_registered_as_backbones_with_cfgs() -> None:
    assert {"medusa_resnet18", "medusa_resnet50"} <= set(zoo.list_models("medusa*", kind="backbone"))
    cfg = zoo.get_pretrained_cfg("medusa_resnet50")
    assert cfg.input_size == (3, 480, 480) and cfg.pool_size == (15, 15) and cfg.num_classes == 2
    assert cfg.paper_ids == "arXiv:2110.06063" and cfg.first_conv == "backbone.conv1"
    assert "reconstruct" in medusa.FAMILY["implementation"] and "reconstruct" in medusa.__doc__.lower()


def test_shapes_and_attention_maps(model18: Medusa) -> None:
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        logits = model18(x)
        final, feats = model18.forward_intermediates(x)
        gates = model18.attention_maps(x)
    assert logits.shape == (2, 2)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 24, 20), (2, 128, 12, 10), (2, 256, 6, 5), (2, 512, 3, 3)]
    assert final.shape == (2, 512, 3, 3) == model18.forward_features(x).shape
    assert len(gates) == 4
    for g, f in zip(gates, feats):
        assert g.shape == (2, 1, *f.shape[-2:]) and (g > 0).all() and (g < 1).all()


def test_two_input_form_matches_single_input(model18: Medusa) -> None:
    x = torch.rand(2, 3, 64, 64)
    x_attn = model18.attention_input(x)
    assert x_attn.shape == (2, 1, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model18(x, x_attn), model18(x))
        other = model18(x, torch.randn(2, 1, 256, 256))  # the body input really drives the gates
    assert not torch.allclose(other, model18(x))


def test_parameter_counts() -> None:
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    m18, m50 = zoo.create_model("medusa_resnet18"), zoo.create_model("medusa_resnet50")
    # backbone + body + heads + 2-way classifier; pinned so an accidental architecture change shows
    assert count(m18) == 13_680_406 and count(m50) == 33_506_278
    assert count(m18.body) == 2_493_456 and count(m50.body) == 9_956_896
    r18 = zoo.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    assert count(m18) == count(r18) + count(m18.body) + count(m18.heads) + 512 * 2 + 2


def test_body_is_shared_by_every_stage() -> None:
    torch.manual_seed(0)
    model = Medusa(backbone="resnet18", **SMALL).eval()
    assert sum(isinstance(m, medusa.MedusaBody) for m in model.modules()) == 1
    assert not any(n.startswith("heads.") and "body" in n for n, _ in model.named_parameters())
    x = torch.randn(1, 3, 64, 64)
    body_params = list(model.body.parameters())
    gates = model.attention_maps(x)
    assert len(gates) == 4
    for i, g in enumerate(gates):  # every head's gate depends on the same body parameters
        grads = torch.autograd.grad(g.sum(), body_params, retain_graph=True, allow_unused=True)
        assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), f"head {i} does not use the whole body"
    with torch.no_grad():  # one change in the body moves all gates
        model.body.stem[0][0].weight.add_(0.5)
        changed = model.attention_maps(x)
    assert all(not torch.allclose(a, b) for a, b in zip(gates, changed))


def test_grayscale_input() -> None:
    torch.manual_seed(0)
    model = zoo.create_model("medusa_resnet18", in_chans=1, num_classes=3).eval()
    gray = torch.rand(2, 1, 72, 88)
    with torch.no_grad():
        assert model(gray).shape == (2, 3)
    assert model.backbone.conv1.weight.shape[1] == 1
    # the body sees the same z-scored gray image whether the main input is gray or gray repeated to RGB
    torch.testing.assert_close(model.attention_input(gray), model.attention_input(gray.repeat(1, 3, 1, 1)))
    z = per_image_standardize(torch.rand(3, 1, 16, 16) * 5 + 2)
    assert torch.allclose(z.mean((1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std((1, 2, 3), correction=0), torch.ones(3), atol=1e-4)


def test_options_fusion_gate_channels_and_backbone_choice() -> None:
    x = torch.randn(1, 3, 64, 64)
    model = Medusa(backbone="resnet18", backbone_indices=(2, 3, 4), gate_chs="stage", fusion="multiply", **SMALL)
    with torch.no_grad():
        gates = model.attention_maps(x)
        assert model(x).shape == (1, 2)
    assert [g.shape[1] for g in gates] == [128, 256, 512] and len(model.heads) == 3
    halo = Medusa(backbone="halonet26t", backbone_indices=(1, 2, 3), **SMALL)  # a zoo backbone by name
    assert "stages_0" in halo.backbone and halo(x).shape == (1, 2)  # halonet26t's flattened stage
    with pytest.raises(ValueError, match="fusion"):
        Medusa(backbone="resnet18", fusion="add", **SMALL)
    with pytest.raises(ValueError, match="module-sequence"):
        Medusa(backbone="efficientnet_b0", **SMALL)


def test_features_only_and_pruning() -> None:
    feats = zoo.create_model("medusa_resnet18", features_only=True, out_indices=(1, 2))
    assert feats.feature_info.channels() == [128, 256] and feats.feature_info.reduction() == [8, 16]
    outs = feats(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 8), (1, 256, 4, 4)]
    assert len(feats.model.heads) == 3 and not hasattr(feats.model.backbone, "layer4")  # pruned after level 2


def test_timm_conventional_kwargs_drop_path_rate_device_dtype() -> None:
    """``drop_path_rate`` reaches the backbone (stochastic depth in its blocks, none at 0); ``device="meta"``
    builds every parameter and buffer there; ``dtype`` casts them."""
    from timm.layers import DropPath

    with_drop = zoo.create_model("medusa_resnet18", drop_path_rate=0.2)
    assert sum(isinstance(m, DropPath) for m in with_drop.backbone.modules()) > 0
    assert not any(isinstance(m, DropPath) for m in zoo.create_model("medusa_resnet18").modules())
    meta = zoo.create_model("medusa_resnet18", device="meta")
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    double = zoo.create_model("medusa_resnet18", dtype=torch.float64)
    assert {p.dtype for p in double.parameters()} == {torch.float64}


@pytest.mark.parametrize("fusion", ["residual", "multiply"])
def test_fx_and_hook_feature_extraction_return_the_gated_maps(fusion: str) -> None:
    """timm's FX (``FeatureGraphNet``) and hook (``FeatureHookNet``) extractors return the gated stage maps of
    ``forward_intermediates`` (each ``feature_info`` level names the fusion module whose output it is), and the
    traced graph keeps the two-input form (``x_attn`` decided when it runs, not when it is traced). fp32, 1e-6."""
    torch.manual_seed(0)
    model = Medusa(backbone="resnet18", fusion=fusion, **SMALL).eval()
    assert [level["module"] for level in model.feature_info] == [f"fusions.{i}" for i in range(4)]
    x, x_attn = torch.randn(1, 3, 64, 48), torch.randn(1, 1, 64, 64)
    fx = FeatureGraphNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3)).eval()
    hooks = FeatureHookNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        expected_two_inputs = model.forward_intermediates(x, x_attn=x_attn, intermediates_only=True)
        outputs = {"fx": fx(x), "hook": hooks(x), "fx two inputs": list(fx.graph_module(x, x_attn).values())}
    for route, got in outputs.items():
        want = expected_two_inputs if route == "fx two inputs" else expected
        assert len(got) == 4, route
        for out, ref in zip(got, want):
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=lambda m, r=route: f"{r}: {m}")
