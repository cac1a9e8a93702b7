"""The feature levels of a ``features_only`` backbone: what a detector or segmentor takes from it, and what to freeze.

Framework-free (torch, zoo only). Shared by ``zoo.detection.torchvision`` (torchvision detectors) and
:class:`zoo.mm.backbone.ZooBackbone` (mmdet / mmseg), so both pick levels, strides and frozen stages the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

__all__ = ["feature_levels", "frozen_children"]

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".ckpt", ".npz")


def _create_features_model(
    backbone: str, out_indices: Sequence[int] | None, pretrained: Any, **kwargs: Any
) -> nn.Module:
    """``zoo.create_model(backbone, features_only=True, ...)`` with pretrained = False | True | tag | file."""
    import zoo

    arch = backbone.split(".")[0]
    if zoo.is_zoo_model(arch) and zoo.model_kind(arch) != "backbone":
        raise ValueError(
            f"{backbone!r} is a zoo {zoo.model_kind(arch)!r} model, not a backbone: it has no features_only support; "
            f"use a backbone such as {', '.join(zoo.list_models(kind='backbone')[:4]) or 'biformer_tiny'}"
        )
    name, overlay, load = backbone, None, False
    if pretrained is True:
        load = True
    elif isinstance(pretrained, (str, Path)) and str(pretrained):
        text = str(pretrained)
        load = True
        if Path(text).is_file() or text.endswith(_CHECKPOINT_SUFFIXES) or "/" in text or "\\" in text:
            overlay = dict(file=text)
        else:  # a pretrained tag of the architecture
            name = f"{arch}.{text}"
    elif pretrained not in (False, None):
        raise TypeError(f"pretrained_backbone must be False, True, a tag or a file path, not {pretrained!r}")
    try:
        return zoo.create_model(
            name,
            pretrained=load,
            pretrained_cfg_overlay=overlay,
            features_only=True,
            out_indices=tuple(out_indices) if out_indices is not None else None,
            **kwargs,
        )
    except (RuntimeError, AssertionError, NotImplementedError, TypeError) as e:
        msg = str(e)
        if "features_only" in msg or "feature" in msg.lower() and "support" in msg.lower():
            raise ValueError(
                f"backbone {backbone!r} has no features_only support ({msg}); torchvision detectors need a "
                "hierarchical backbone that timm/zoo can build with features_only=True (e.g. 'biformer_tiny', "
                "'davit_tiny', 'halonet26t', 'resnet18')"
            ) from e
        raise


def feature_levels(
    backbone: str, out_indices: Sequence[int] | None, pretrained: Any, min_stride: int = 4, **kwargs: Any
) -> tuple[nn.Module, list[dict], list[int], list[int]]:
    """The ``features_only`` model of ``backbone`` with the levels a detector or segmentor asks for.

    ``out_indices`` (negative allowed, increasing) or by default the levels of stride ``min_stride``..32 (the last
    level for a single-scale backbone such as a plain ViT). Returns ``(body, info, wanted, select)``: the model,
    the ``feature_info`` of all its levels, the wanted level indices, and where each sits in the body's outputs.
    """
    body = _create_features_model(backbone, None, pretrained, **kwargs)
    info = list(body.feature_info.info)
    reductions = [int(lvl["reduction"]) for lvl in info]
    if out_indices is None:
        wanted = [i for i, r in enumerate(reductions) if min_stride <= r <= 32] or [len(info) - 1]
    else:
        wanted = [int(i) for i in out_indices]
        bad = [i for i in wanted if not -len(info) <= i < len(info)]
        if bad or not wanted:
            raise ValueError(
                f"out_indices {tuple(out_indices)} not available in {backbone!r}: it has {len(info)} feature levels "
                f"(indices 0..{len(info) - 1}, strides {reductions}, channels {[lvl['num_chs'] for lvl in info]}); "
                "pick out_indices among them"
            )
        wanted = [i % len(info) for i in wanted]
        if sorted(set(wanted)) != wanted:
            raise ValueError(f"out_indices must be increasing and unique, got {tuple(out_indices)}")
    have = list(body.feature_info.out_indices)
    if not set(wanted) <= set(have):  # the default build stopped early: rebuild with the levels asked for
        body = _create_features_model(backbone, wanted, pretrained, **kwargs)
        have = list(body.feature_info.out_indices)
    return body, info, wanted, [have.index(i) for i in wanted]


def frozen_children(body: nn.Module, info: Sequence[dict], n_units: int) -> list[str]:
    """Children of a ``features_only`` model to freeze: the stem, then whole stages, ``n_units`` units in all.

    Units are [stem, stage 1, ..., stage S], a stage being a feature level of stride >= 4 (for backbones whose
    levels all have stride < 4, every level); the stem is everything the body runs before stage 1.
    """
    if n_units <= 0:
        return []
    children = [n for n, _ in body.named_children()]
    stages = [lvl for lvl in info if lvl["reduction"] >= 4] or list(info)
    if n_units > len(stages) + 1:
        raise ValueError(f"cannot freeze {n_units - 1} stages: the backbone has {len(stages)} stages")

    def position(level: dict) -> int:
        module = str(level["module"]).replace(".", "_")
        for i, child in enumerate(children):
            if child == module or module.startswith(child + "_"):
                return i
        raise ValueError(
            f"cannot map stage module {level['module']!r} onto the backbone's children {children}; "
            "frozen_stages / trainable_layers are not supported for this backbone"
        )

    end = position(stages[0]) if n_units == 1 else position(stages[n_units - 2]) + 1
    return children[:end]
