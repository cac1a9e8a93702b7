"""The OpenMMLab backbone wrapper shared by ``zoo.detection.mmdet`` and ``zoo.segmentation.mmseg``.

Framework-free (torch, timm, zoo only): the two adapter modules register :class:`ZooBackbone` in mmdet's and
mmseg's ``MODELS`` registries. It wraps ``zoo.create_model(model_name, features_only=True)`` and returns the
tuple of NCHW maps that mm necks (FPN) and heads (UPerHead, FPNHead) take.

Conventions follow mmdet's own backbones: ``frozen_stages=-1`` trains everything, ``0`` freezes the stem,
``n`` the stem and stages 1..n; ``norm_eval`` keeps BatchNorm layers in eval mode while training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from zoo.mm.features import feature_levels, frozen_children

__all__ = ["ZooBackbone", "layer_decay_custom_keys", "layer_decay_paramwise_cfg"]


class ZooBackbone(nn.Module):
    """A zoo / timm backbone as an mmdet / mmseg backbone: images (B, 3, H, W) -> tuple of (B, C_i, H/s_i, W/s_i).

    Args:
        model_name: zoo or timm architecture (``name`` or ``name.tag``) with ``features_only`` support.
        out_indices: levels of the backbone's full ``feature_info`` to return; default: every level of stride
            4..32 (``(0, 1, 2, 3)`` for BiFormer / DaViT, ``(1, 2, 3, 4)`` for HaloNet, whose level 0 is the
            stride-2 stem).
        frozen_stages: ``-1`` none; ``0`` the stem; ``n`` the stem and stages 1..n (stages = levels of stride >= 4).
        norm_eval: keep the backbone's BatchNorm layers in eval mode (frozen statistics) while training.
        drop_path_rate: stochastic depth of the backbone.
        out_norm: a LayerNorm2d on every returned map, as the official BiFormer det/seg wrapper (only the copy
            sent to the neck is normed, the trunk is unchanged).
        pretrained: ``None`` / ``False``, ``True`` (the default tag), a pretrained tag (``'in1k'``) or a checkpoint
            file (official or zoo layout; loaded through the family's ``checkpoint_filter_fn``).
        pad_input: zero-pad the input bottom/right to a multiple of ``size_divisor`` and crop the outputs back to
            ``ceil(H / stride)``; without it a non-multiple input is an error.
        size_divisor: input sides must be multiples of it (``None``: no check, for backbones that take any size).
        init_cfg: mm-style ``dict(type='Pretrained', checkpoint=FILE)`` is accepted as ``pretrained=FILE``.
        **model_kwargs: passed to ``zoo.create_model`` (BiFormer ``n_win``, ``pad_mode``; ``in_chans``, ...).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] | None = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        drop_path_rate: float | None = None,
        out_norm: bool = False,
        pretrained: bool | str | Path | None = None,
        pad_input: bool = False,
        size_divisor: int | None = None,
        init_cfg: dict | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if init_cfg is not None:
            if not (
                isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained" and pretrained in (None, False)
            ):
                raise ValueError(
                    f"ZooBackbone takes init_cfg=dict(type='Pretrained', checkpoint=FILE) only (got {init_cfg!r}); "
                    "pass pretrained=<tag or file> instead"
                )
            pretrained = init_cfg["checkpoint"]
        if drop_path_rate is not None:
            model_kwargs["drop_path_rate"] = drop_path_rate
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        pretrained = pretrained if pretrained is not None else False

        body, info, wanted, select = feature_levels(model_name, out_indices, pretrained, **model_kwargs)
        reductions = [int(lvl["reduction"]) for lvl in info]
        self.model = body
        self.out_indices = tuple(wanted)
        self.select = select
        self.out_channels = [int(info[i]["num_chs"]) for i in wanted]
        self.strides = [reductions[i] for i in wanted]
        self.output_fmt = str(getattr(body, "output_fmt", "NCHW")).split(".")[-1].upper()
        self.out_norms = nn.ModuleList(LayerNorm2d(c) for c in self.out_channels) if out_norm else None

        stages = [lvl for lvl in info if lvl["reduction"] >= 4] or info
        if not -1 <= frozen_stages <= len(stages):
            raise ValueError(f"frozen_stages must be in [-1, {len(stages)}] for {model_name!r}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.frozen_modules = frozen_children(body, info, frozen_stages + 1)
        children = dict(body.named_children())
        for name in self.frozen_modules:
            children[name].requires_grad_(False)
        self.norm_eval = norm_eval

        self.pad_input = pad_input
        self.size_divisor = size_divisor
        cfg = getattr(body, "pretrained_cfg", None) or {}
        self.fixed_input_size = tuple(cfg["input_size"][-2:]) if cfg.get("fixed_input_size") else None
        if pad_input and not size_divisor:
            raise ValueError("pad_input=True needs size_divisor (the multiple to pad the input sides to)")
        self.train(self.training)

    def init_weights(self) -> None:
        """mmengine calls this after building; weights were set in ``__init__`` (random or pretrained)."""

    def train(self, mode: bool = True) -> ZooBackbone:
        """Train/eval mode; frozen stages and (with ``norm_eval``) BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode:
            children = dict(self.model.named_children())
            for name in self.frozen_modules:
                children[name].eval()
            if self.norm_eval:
                for m in self.model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def _check_size(self, h: int, w: int) -> None:
        if self.fixed_input_size is not None and (h, w) != self.fixed_input_size:
            fh, fw = self.fixed_input_size
            raise ValueError(
                f"{self.model_name!r} takes only {fh}x{fw} inputs (fixed_input_size), got {h}x{w}; resize/crop the "
                f"images to {fh}x{fw} in the pipeline or pick a backbone that takes any size"
            )
        d = self.size_divisor
        if d and not self.pad_input and (h % d or w % d):
            raise ValueError(
                f"input {h}x{w} is not a multiple of size_divisor={d} for {self.model_name!r}; set the data "
                f"preprocessor's pad_size_divisor={d} (or size_divisor={d} in the pipeline), or pass pad_input=True"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images (B, C_in, H, W) -> tuple of (B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i]))."""
        h, w = x.shape[-2:]
        self._check_size(int(h), int(w))
        if self.pad_input and self.size_divisor:
            d = self.size_divisor
            x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        feats = self.model(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        feats = [feats[i] for i in self.select]
        if self.output_fmt == "NHWC":
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        if self.pad_input and self.size_divisor:  # back to the maps of the unpadded image
            feats = [f[..., : math.ceil(h / s), : math.ceil(w / s)] for f, s in zip(feats, self.strides)]
        if self.out_norms is not None:
            feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
        return tuple(f.contiguous() for f in feats)


def _layer_ids(backbone: ZooBackbone) -> tuple[dict[str, int], int]:
    """Layer id of every backbone parameter (features_only names) from the model's ``group_matcher``, and the count.

    ``features_only`` flattens module names (``stages.0`` -> ``stages_0``) but keeps their order, so the plain
    model is built on the meta device (no memory, no weights) and matched to the body parameter by parameter.
    """
    from timm.models import group_parameters

    import zoo

    plain = zoo.create_model(backbone.model_name, device="meta", **backbone.model_kwargs)
    if not hasattr(plain, "group_matcher"):
        raise ValueError(f"{backbone.model_name!r} has no group_matcher: layer-wise lr decay needs one")
    layer_of = group_parameters(plain, plain.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_of.values()) + 1
    plain_params = list(plain.named_parameters())
    ids: dict[str, int] = {}
    for (name, p), (plain_name, q) in zip(backbone.model.named_parameters(), plain_params):
        if p.shape != q.shape or name.split(".")[-1] != plain_name.split(".")[-1]:
            raise RuntimeError(
                f"cannot match features_only parameter {name!r} to {plain_name!r} of {backbone.model_name!r}"
            )
        ids[name] = layer_of[plain_name]
    return ids, num_layers


def layer_decay_custom_keys(
    backbone: ZooBackbone, layer_decay: float, prefix: str = "backbone.", no_decay_1d: bool = True
) -> dict[str, dict[str, float]]:
    """mmengine ``paramwise_cfg['custom_keys']`` for layer-wise lr decay of a :class:`ZooBackbone`.

    Layer ids come from the model's ``group_matcher`` (stem 0, then blocks in order, head last), as timm's
    ``param_groups_layer_decay``: a parameter of layer ``i`` gets ``lr_mult = layer_decay ** (num_layers - 1 - i)``;
    the neck and heads keep ``lr_mult=1``. Keys are full parameter names (``prefix + 'model.' + name``), which
    mmengine matches as substrings; 1-D parameters (norms, biases) get ``decay_mult=0`` when ``no_decay_1d``.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    ids, num_layers = _layer_ids(backbone)
    keys = {}
    for name, p in backbone.model.named_parameters():
        entry = dict(lr_mult=float(layer_decay ** (num_layers - 1 - ids[name])))
        entry["decay_mult"] = 0.0 if (no_decay_1d and p.ndim <= 1) else 1.0
        keys[f"{prefix}model.{name}"] = entry
    return keys


def layer_decay_paramwise_cfg(
    backbone: ZooBackbone, layer_decay: float, prefix: str = "backbone.", norm_decay_mult: float = 0.0
) -> dict[str, Any]:
    """A whole ``paramwise_cfg`` for ``optim_wrapper``: layer-decay custom keys + no weight decay on other norms."""
    return dict(
        custom_keys=layer_decay_custom_keys(backbone, layer_decay, prefix=prefix),
        norm_decay_mult=norm_decay_mult,
    )


def register_optim_constructor() -> type:
    """Register ``ZooLayerDecayOptimWrapperConstructor`` in mmengine's root registry (found from mmdet / mmseg).

    Config use::

        optim_wrapper = dict(
            constructor='ZooLayerDecayOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            paramwise_cfg=dict(layer_decay=0.9),  # + any of mmengine's usual paramwise options
        )
    """
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    name = "ZooLayerDecayOptimWrapperConstructor"
    if name in OPTIM_WRAPPER_CONSTRUCTORS.module_dict:
        return OPTIM_WRAPPER_CONSTRUCTORS.module_dict[name]

    class ZooLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
        """mmengine's default constructor plus ``paramwise_cfg['layer_decay']`` over a ``ZooBackbone``."""

        def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
            paramwise_cfg = dict(paramwise_cfg or {})
            self.layer_decay = float(paramwise_cfg.pop("layer_decay", 1.0))
            super().__init__(optim_wrapper_cfg, paramwise_cfg)

        def __call__(self, model: nn.Module) -> Any:
            inner = getattr(model, "module", model)  # DDP wrapper
            backbone = getattr(inner, "backbone", None)
            if self.layer_decay != 1.0:
                if not isinstance(backbone, ZooBackbone):
                    raise TypeError(
                        f"paramwise_cfg.layer_decay needs a model whose .backbone is a ZooBackbone, got "
                        f"{type(backbone).__name__}"
                    )
                keys = layer_decay_custom_keys(backbone, self.layer_decay)
                keys.update(self.paramwise_cfg.get("custom_keys", {}))  # the user's own keys win
                self.paramwise_cfg = dict(self.paramwise_cfg, custom_keys=keys)
            return super().__call__(model)

    OPTIM_WRAPPER_CONSTRUCTORS.register_module(name=name, module=ZooLayerDecayOptimWrapperConstructor)
    return ZooLayerDecayOptimWrapperConstructor
