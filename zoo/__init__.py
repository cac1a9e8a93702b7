"""zoo: a timm-style zoo of attention vision backbones and heads on fused Triton kernels.

``zoo.create_model(name, ...)`` has exactly timm's semantics; zoo's registry resolves first, then timm's.
Importing zoo registers its architectures (into timm's registry too, for names timm does not use).
"""

import os as _os

from ._factory import PretrainedWeightsUnavailableError, create_model, parse_model_name, resolve_pretrained_cfg
from ._registry import (
    KINDS,
    get_arch_pretrained_cfgs,
    get_pretrained_cfg,
    get_pretrained_cfg_value,
    is_model,
    is_model_pretrained,
    is_zoo_model,
    list_kinds,
    list_models,
    list_pretrained,
    model_entrypoint,
    model_kind,
    register_model,
    restore_timm,
    use_zoo_in_timm,
)
from .version import __version__

from . import heads, models  # noqa: E402,F401  (registers the families)  isort: skip

if _os.environ.get("ZOO_IN_TIMM"):  # opt-in, e.g. ZOO_IN_TIMM=halonet*: zoo's classes under timm's names
    use_zoo_in_timm(_os.environ["ZOO_IN_TIMM"].split(","))

__all__ = [
    "KINDS",
    "PretrainedWeightsUnavailableError",
    "__version__",
    "create_model",
    "get_arch_pretrained_cfgs",
    "get_pretrained_cfg",
    "get_pretrained_cfg_value",
    "is_model",
    "is_model_pretrained",
    "is_zoo_model",
    "list_kinds",
    "list_models",
    "list_pretrained",
    "model_entrypoint",
    "model_kind",
    "parse_model_name",
    "register_model",
    "resolve_pretrained_cfg",
    "restore_timm",
    "use_zoo_in_timm",
]
