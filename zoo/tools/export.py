"""``zoo export``: a model folder (``model.safetensors`` + ``config.json``) in timm's Hub layout.

The folder reads back with ``timm.create_model('local-dir:DIR')`` (after ``import zoo`` for zoo-only
architectures) and ``zoo.create_model('local-dir:DIR')``, weights included (``pretrained=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf

__all__ = ["export_model"]


def export_model(model: torch.nn.Module, out_dir: Path | str, model_args: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` for ``model`` (built by create_model).

    Args:
        model: a model with ``pretrained_cfg`` (any registry model).
        out_dir: folder to create; existing files are replaced.
        model_args: constructor kwargs to record in ``config.json`` besides those ``create_model`` saw.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # timm records the factory kwargs on the model (model._model_args); model_args adds or replaces some
    save_for_hf(model, str(out_dir), model_args=model_args, safe_serialization=True)
    return out_dir
