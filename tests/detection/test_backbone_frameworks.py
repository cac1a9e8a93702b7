"""Zoo backbones in frameworks that take timm models with no glue: segmentation_models_pytorch and HF UperNet.

``biformer_tiny`` is a zoo-only name (timm has none), so these builds go through zoo's registration into timm.
Nothing is downloaded: ``encoder_weights=None`` for smp; an explicitly built ``TimmBackboneConfig`` for HF.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import zoo

BACKBONE = "biformer_tiny"


@pytest.mark.skipif(
    importlib.util.find_spec("segmentation_models_pytorch") is None,
    reason="segmentation_models_pytorch is not installed (pip install segmentation-models-pytorch)",
)
def test_smp_upernet_with_zoo_encoder() -> None:
    import segmentation_models_pytorch as smp

    assert zoo.is_zoo_model(BACKBONE)
    model = smp.UPerNet(encoder_name=f"tu-{BACKBONE}", encoder_weights=None, classes=3, decoder_channels=64)
    x = torch.rand(2, 3, 128, 128)
    y = torch.randint(0, 3, (2, 128, 128))
    model.train()
    logits = model(x)
    assert logits.shape == (2, 3, 128, 128)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert any(p.grad is not None for p in model.encoder.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 3, 128, 128)


def _transformers_upernet():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install transformers)")
    try:
        from transformers import TimmBackboneConfig, UperNetConfig, UperNetForSemanticSegmentation
    except ImportError as e:  # pragma: no cover - depends on the installed version
        pytest.skip(f"this transformers has no UperNet / TimmBackboneConfig: {e}")
    return TimmBackboneConfig, UperNetConfig, UperNetForSemanticSegmentation


def test_transformers_upernet_with_zoo_backbone() -> None:
    TimmBackboneConfig, UperNetConfig, UperNetForSemanticSegmentation = _transformers_upernet()
    channels = zoo.create_model(BACKBONE, features_only=True).feature_info.channels()
    # Built explicitly: UperNetConfig(backbone=name, use_timm_backbone=True) asks the Hub whether the name is a
    # repo and fails offline.
    backbone_config = TimmBackboneConfig(backbone=BACKBONE)
    backbone_config.out_indices = [0, 1, 2, 3]
    config = UperNetConfig(
        backbone_config=backbone_config, num_labels=3, hidden_size=64, auxiliary_in_channels=channels[2]
    )
    model = UperNetForSemanticSegmentation(config)
    x = torch.rand(2, 3, 128, 128)
    out = model(pixel_values=x, labels=torch.randint(0, 3, (2, 128, 128)))
    assert out.logits.shape == (2, 3, 128, 128)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
