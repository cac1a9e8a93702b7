"""mmsegmentation 1.x adapter: zoo backbones as ``type='ZooBackbone'`` in mmseg's ``MODELS`` registry.

Importing this module registers the backbone (mmseg configs do it with ``custom_imports``)::

    custom_imports = dict(imports=["zoo.segmentation.mmseg"], allow_failed_imports=False)
    model = dict(
        type="EncoderDecoder",
        backbone=dict(type="ZooBackbone", model_name="biformer_small", out_norm=True, n_win=8, pretrained="in1k"),
        decode_head=dict(type="UPerHead", in_channels=[64, 128, 256, 512], ...),
        ...
    )

The backbone returns a tuple of NCHW maps ``(B, C_i, H / s_i, W / s_i)``. Arguments:
:class:`zoo.mm.backbone.ZooBackbone` (the same class mmdet's adapter registers). Ready configs
(ADE20K Semantic FPN 80k / UperNet 160k for BiFormer-S/B, DaViT-T/S, HaloNet-50ts) are in
``zoo/segmentation/configs/``; ``zoo seg train CONFIG`` runs them.

Needs ``pip install 'attention-zoo[mm-lite]'`` (or ``make mmcv`` and ``[mm]``). Without a compiled mmcv, set
``ZOO_MMCV_COMPAT=1`` (or call ``zoo.mm.compat.install()`` first) to run on ``mmcv-lite``.
"""

from __future__ import annotations

from pathlib import Path

from zoo.mm.compat import require_mm

require_mm("mmseg")

from mmseg.registry import MODELS  # noqa: E402

from zoo.mm.backbone import (  # noqa: E402
    ZooBackbone,
    layer_decay_custom_keys,
    layer_decay_paramwise_cfg,
    register_optim_constructor,
)

__all__ = ["CONFIG_DIR", "ZooBackbone", "layer_decay_custom_keys", "layer_decay_paramwise_cfg"]

CONFIG_DIR = Path(__file__).parent / "configs"

if "ZooBackbone" not in MODELS.module_dict:  # re-imports (e.g. custom_imports after a plain import) are no-ops
    MODELS.register_module(name="ZooBackbone", module=ZooBackbone)
register_optim_constructor()
