"""torchvision detectors (Faster R-CNN, Mask R-CNN, RetinaNet) on any zoo or timm backbone.

``build_detector('maskrcnn', backbone='biformer_tiny', num_classes=81)`` builds the backbone through
``zoo.create_model(name, features_only=True)``, puts a ``torchvision.ops.FeaturePyramidNetwork`` on the chosen
feature levels and hands the result to torchvision's detector class with anchors sized to the levels.

Example::

    model = build_detector("fasterrcnn", backbone="davit_tiny", num_classes=3, min_size=320, max_size=320)
    losses = model([image_chw], [dict(boxes=boxes_n4, labels=labels_n)])  # train mode: dict of scalar losses
    model.eval()
    [pred] = model([image_chw])  # dict(boxes (N, 4), labels (N,), scores (N,)[, masks (N, 1, H, W)])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from zoo.mm.features import feature_levels, frozen_children

__all__ = ["DETECTORS", "ZooBackboneFPN", "build_backbone_fpn", "build_detector"]

DETECTORS = ("fasterrcnn", "maskrcnn", "retinanet")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


class ZooBackboneFPN(nn.Module):
    """A ``features_only`` backbone followed by an FPN, in torchvision's detection-backbone interface.

    Args:
        body: a module mapping images (B, 3, H, W) to a list of feature maps (NCHW, or NHWC when
            ``output_fmt='NHWC'``), e.g. a zoo / timm ``features_only`` model.
        in_channels: channels of the maps that are used, in order.
        out_channels: channels of every FPN level.
        select: positions in the body's output list that feed the FPN (``None``: all of them).
        extra_block: torchvision extra FPN block (``LastLevelMaxPool`` / ``LastLevelP6P7``) or ``None``.
        output_fmt: ``'NCHW'`` or ``'NHWC'`` (the body's output layout).
        frozen_modules: names of the body's children whose parameters are frozen (kept in eval mode too).
        norm_eval: keep every normalization layer of the body in eval mode while training.

    Forward: images (B, 3, H, W) -> ``OrderedDict`` ``'0'..'n-1'`` (+ ``'pool'`` / ``'p6'``, ``'p7'``) of
    (B, out_channels, H / stride, W / stride) maps; ``self.out_channels`` is what torchvision reads.
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels: Sequence[int],
        out_channels: int = 256,
        select: Sequence[int] | None = None,
        extra_block: ExtraFPNBlock | None = None,
        output_fmt: str = "NCHW",
        frozen_modules: Sequence[str] = (),
        norm_eval: bool = False,
    ) -> None:
        super().__init__()
        self.body = body
        self.select = list(select) if select is not None else None
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.output_fmt = str(output_fmt).split(".")[-1].upper()
        self.frozen_modules = list(frozen_modules)
        self.norm_eval = norm_eval
        children = dict(body.named_children())
        for name in self.frozen_modules:
            for p in children[name].parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ZooBackboneFPN:
        """Set train/eval mode; frozen stages and (with ``norm_eval``) norm layers stay in eval mode."""
        super().train(mode)
        if mode:
            children = dict(self.body.named_children())
            for name in self.frozen_modules:
                children[name].eval()
            if self.norm_eval:
                for m in self.body.modules():
                    if isinstance(m, _NORMS):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        if self.select is not None:
            feats = [feats[i] for i in self.select]
        if self.output_fmt == "NHWC":
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_backbone_fpn(
    backbone: str,
    detector: str = "fasterrcnn",
    out_indices: Sequence[int] | None = None,
    out_channels: int = 256,
    frozen_stages: int = 0,
    norm_eval: bool = False,
    pretrained_backbone: bool | str | Path = False,
    trainable_layers: int | None = None,
    **backbone_kwargs: Any,
) -> tuple[ZooBackboneFPN, list[int]]:
    """The FPN backbone of ``build_detector`` and the strides of its output levels.

    Args:
        backbone: a zoo or timm model name (optionally ``name.tag``) with ``features_only`` support.
        detector: one of ``DETECTORS`` (picks the default levels and the extra FPN block).
        out_indices: feature levels of the backbone (indices into its full ``feature_info``); default:
            strides 4..32 for R-CNNs, 8..32 for RetinaNet.
        out_channels: FPN channels.
        frozen_stages: ``0`` trains everything; ``n > 0`` freezes the stem and the first ``n`` stages
            (stages = feature levels of stride >= 4, in order); ``-1`` freezes the whole backbone.
        norm_eval: keep the backbone's norm layers in eval mode while training (frozen BatchNorm statistics).
        pretrained_backbone: ``False``, ``True`` (default weights), a pretrained tag or a checkpoint file.
        trainable_layers: torchvision-style alternative to ``frozen_stages``: how many units of [stem,
            stage 1, ..., stage S] stay trainable, counted from the last stage (``S + 1``: all).
        **backbone_kwargs: passed to ``zoo.create_model`` (e.g. ``drop_path_rate``, BiFormer's ``n_win``).

    Returns:
        (module, strides): the ``ZooBackboneFPN`` and the stride of each of its output levels.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {DETECTORS}")
    if trainable_layers is not None and frozen_stages not in (0, None):
        raise ValueError("pass either frozen_stages or trainable_layers, not both")
    low = 8 if detector == "retinanet" else 4  # RetinaNet uses C3-C5, the R-CNNs C2-C5
    body, info, wanted, select = feature_levels(backbone, out_indices, pretrained_backbone, low, **backbone_kwargs)
    reductions = [int(lvl["reduction"]) for lvl in info]

    stages = [lvl for lvl in info if lvl["reduction"] >= 4] or info
    if trainable_layers is not None:
        if not 0 <= trainable_layers <= len(stages) + 1:
            raise ValueError(f"trainable_layers must be in [0, {len(stages) + 1}], got {trainable_layers}")
        n_units = len(stages) + 1 - trainable_layers
    elif frozen_stages == -1:
        n_units = len(stages) + 1
    elif frozen_stages is None or frozen_stages == 0:
        n_units = 0
    elif 0 < frozen_stages <= len(stages):
        n_units = frozen_stages + 1
    else:
        raise ValueError(f"frozen_stages must be -1 or in [0, {len(stages)}] for {backbone!r}, got {frozen_stages}")
    frozen = frozen_children(body, info, n_units)
    if frozen_stages == -1 or trainable_layers == 0:  # also anything after the last stage
        frozen = [n for n, _ in body.named_children()]

    strides = [reductions[i] for i in wanted]
    if detector == "retinanet":
        extra: ExtraFPNBlock = LastLevelP6P7(out_channels, out_channels)
        strides += [strides[-1] * 2, strides[-1] * 4]
    else:
        extra = LastLevelMaxPool()
        strides += [strides[-1] * 2]
    module = ZooBackboneFPN(
        body,
        [int(info[i]["num_chs"]) for i in wanted],
        out_channels,
        select=None if select == list(range(len(body.feature_info.out_indices))) else select,
        extra_block=extra,
        output_fmt=str(getattr(body, "output_fmt", "NCHW")),
        frozen_modules=frozen,
        norm_eval=norm_eval,
    )
    return module, strides


def build_detector(
    detector: str,
    backbone: str,
    num_classes: int,
    out_indices: Sequence[int] | None = None,
    frozen_stages: int = 0,
    norm_eval: bool = False,
    pretrained_backbone: bool | str | Path = False,
    trainable_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] | None = None,
    detector_kwargs: dict[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> nn.Module:
    """A torchvision ``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` on a zoo or timm backbone with an FPN.

    Args:
        detector: ``'fasterrcnn'``, ``'maskrcnn'`` or ``'retinanet'``.
        backbone: zoo or timm model name (``name`` or ``name.tag``) that supports ``features_only=True``.
        num_classes: as torchvision counts them: R-CNNs include the background class (objects + 1),
            RetinaNet does not.
        out_indices: backbone feature levels used (default: strides 4..32 for R-CNNs, 8..32 for RetinaNet).
        frozen_stages, norm_eval, pretrained_backbone, trainable_layers: see ``build_backbone_fpn``.
        min_size, max_size: torchvision's resize of the input images (shorter / longer side).
        fpn_channels: channels of the FPN levels.
        anchor_sizes: one anchor size per output level (default ``8 * stride`` for R-CNNs, ``4 * stride``
            for RetinaNet: torchvision's 32..512); every size comes with aspect ratios 0.5, 1, 2.
        detector_kwargs: more keyword arguments for the torchvision detector class (``box_detections_per_img``,
            ``rpn_post_nms_top_n_test``, ``image_mean``, custom ``box_head`` / ``box_predictor`` / ``mask_head`` /
            ``mask_predictor``, ...).
        **backbone_kwargs: passed to ``zoo.create_model`` (``drop_path_rate``, ``n_win``, ...).

    Returns:
        The torchvision detector. Train mode: ``model(images, targets)`` -> dict of scalar losses, images a list
        of (3, H, W) float tensors in [0, 1], targets dicts with ``boxes`` (N, 4) xyxy, ``labels`` (N,) int64
        (and ``masks`` (N, H, W) uint8 for Mask R-CNN). Eval mode: ``model(images)`` -> one dict per image
        with ``boxes`` (K, 4), ``labels`` (K,), ``scores`` (K,) (and ``masks`` (K, 1, H, W) for Mask R-CNN).
    """
    detector = detector.lower().replace("_", "").replace("-", "")
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {DETECTORS}")
    fpn, strides = build_backbone_fpn(
        backbone,
        detector,
        out_indices=out_indices,
        out_channels=fpn_channels,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        pretrained_backbone=pretrained_backbone,
        trainable_layers=trainable_layers,
        **backbone_kwargs,
    )
    if anchor_sizes is None:
        anchor_sizes = [s * (4 if detector == "retinanet" else 8) for s in strides]
    elif len(anchor_sizes) != len(strides):
        raise ValueError(f"anchor_sizes needs one size per output level ({len(strides)}: strides {strides})")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(strides))
    kwargs = dict(min_size=min_size, max_size=max_size, **(detector_kwargs or {}))
    if detector == "retinanet":
        return RetinaNet(fpn, num_classes=num_classes, anchor_generator=anchors, **kwargs)
    if any(kwargs.get(k) is not None for k in ("box_predictor", "mask_predictor")):
        num_classes = None  # torchvision takes the classes from the given predictors
    names = [str(i) for i in range(len(strides) - 1)]  # the backbone levels, not the max-pooled extra one
    box_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    if detector == "fasterrcnn":
        return FasterRCNN(fpn, num_classes=num_classes, rpn_anchor_generator=anchors, box_roi_pool=box_pool, **kwargs)
    mask_pool = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
    return MaskRCNN(
        fpn,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        box_roi_pool=box_pool,
        mask_roi_pool=mask_pool,
        **kwargs,
    )
