"""What a registered model is: parameters, GMACs, feature levels, pretrained tags and their sources."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import _registry
from .._factory import create_model

__all__ = ["ModelInfo", "model_info", "count_gmacs", "weight_sources", "family_of"]


@dataclass
class ModelInfo:
    name: str
    kind: str
    family: str
    params: int
    gmacs: float | None
    input_size: tuple[int, int, int] | None
    feature_info: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, dict[str, Any]] = field(default_factory=dict)  # arch.tag -> {source, file, license}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_gmacs(model: torch.nn.Module, input_size: tuple[int, ...], device: str = "cpu") -> float:
    """Multiply-accumulates (G) of one forward at ``(1, *input_size)``, counted by ``FlopCounterMode`` / 2.

    Matches fvcore's "FLOPs" (= MACs) used by the papers' tables for matmuls and convolutions.
    """
    x = torch.randn(1, *input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def weight_sources(name: str) -> dict[str, dict[str, Any]]:
    """For each ``arch.tag`` with a cfg: where its weights come from (Hub repo / URL / none) and licence."""
    sources = {}
    for tag_name, cfg in _registry.get_arch_pretrained_cfgs(name).items():
        if cfg.hf_hub_id:
            source = f"hf-hub:{cfg.hf_hub_id}"
        elif cfg.url:
            source = cfg.url
        elif cfg.file:
            source = f"file:{cfg.file}"
        else:
            source = "none (architecture only)"
        sources[tag_name] = dict(source=source, url=cfg.url or None, license=cfg.license, has_weights=cfg.has_weights)
    return sources


def family_of(name: str) -> dict[str, Any]:
    """The family facts (``FAMILY`` dict) of the module that registers ``name``; empty for timm archs."""
    if not _registry.is_zoo_model(name):
        return {}
    module = sys.modules[_registry.get_entry(name).module]
    return dict(getattr(module, "FAMILY", {}))


def _build_cheaply(name: str) -> tuple[torch.nn.Module, str]:
    """On the meta device when the family threads ``device=`` (no memory, no init time), else on CPU."""
    try:
        return create_model(name, device="meta").eval(), "meta"
    except TypeError:
        return create_model(name).eval(), "cpu"


def model_info(name: str, gmacs: bool = True) -> ModelInfo:
    """Build ``name`` (random weights, CPU) and describe it; GMACs at the cfg input size."""
    cfg = _registry.get_pretrained_cfg(name)
    kind = _registry.model_kind(name)
    input_size = tuple(cfg.input_size) if cfg is not None and kind == "backbone" else None
    model, device = _build_cheaply(name)
    params = sum(p.numel() for p in model.parameters())
    macs = None
    if gmacs and input_size is not None:
        try:
            macs = count_gmacs(model, input_size, device)
        except Exception:  # an op without a meta kernel: count on real tensors
            model, device = create_model(name).eval(), "cpu"
            macs = count_gmacs(model, input_size, device)
    features = [dict(f) for f in getattr(model, "feature_info", [])] if kind == "backbone" else []
    return ModelInfo(
        name=name,
        kind=kind,
        family=family_of(name).get("name", ""),
        params=params,
        gmacs=macs,
        input_size=input_size,
        feature_info=features,
        tags=weight_sources(name),
    )
