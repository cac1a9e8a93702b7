"""``zoo export``: a model folder (``model.safetensors`` + ``config.json``) in timm's Hub layout.

Where the architecture is timm's (HaloNet, DaViT: zoo's class loads timm's weights unchanged), the folder
is written with timm's architecture name and only keywords timm's entrypoint takes, and checked to load
in timm's own class: ``timm.create_model('local-dir:DIR', pretrained=True)`` works without zoo. For
zoo-only architectures (BiFormer, MEDUSA, the heads) timm needs ``import zoo`` first (it registers them);
``zoo.create_model('local-dir:DIR', pretrained=True)`` reads every kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf

from .. import _registry
from .._io import file_in_folder_path

__all__ = ["ExportResult", "export_model"]


@dataclass
class ExportResult:
    """What ``export_model`` wrote and how to read it back."""

    path: Path
    architecture: str
    needs_zoo: bool  # True: timm.create_model('local-dir:...') works only after `import zoo`

    def how_to_load(self) -> str:
        call = f"timm.create_model('local-dir:{self.path}', pretrained=True)"
        if self.needs_zoo:
            return f"{self.architecture} is a zoo architecture: `import zoo` first, then {call} (or zoo.create_model)"
        return f"timm alone reads it (no zoo needed): {call}"


def _timm_only_args(arch: str, model: torch.nn.Module, model_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` checked against timm's own class: the export must build and load there strictly."""
    entrypoint = _registry.timm_entrypoint_of(arch)
    try:
        timm_model = entrypoint(pretrained=False, **model_args)
        timm_model.load_state_dict(model.state_dict(), strict=True)
    except (TypeError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{arch} built with {model_args} has no equivalent in timm's own {arch} ({str(err).splitlines()[0]}); "
            "export it without zoo-only keywords, or read it back with `import zoo` / zoo.create_model"
        ) from None
    return model_args


def export_model(model: torch.nn.Module, out_dir: Path | str, model_args: dict[str, Any] | None = None) -> ExportResult:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` for ``model`` (built by create_model).

    Args:
        model: a model with ``pretrained_cfg`` (any registry model).
        out_dir: folder to create; existing files are replaced.
        model_args: constructor kwargs to record in ``config.json`` besides those ``create_model`` saw.

    Raises:
        ValueError: a timm architecture built with keywords timm's class does not take (it would not load
            in timm alone).
    """
    out_dir = Path(out_dir)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    args = {**getattr(model, "_model_args", {}), **(model_args or {})}
    timm_fn = _registry.timm_entrypoint_of(arch)
    # timm's registry holds zoo-only names only because zoo put them there (entrypoints defined in zoo)
    needs_zoo = timm_fn is None or timm_fn.__module__.split(".")[0] == "zoo"
    if not needs_zoo and _registry.is_zoo_model(arch):  # a zoo class under a timm name: timm's class must take it
        args = _timm_only_args(arch, model, args)
    blocker = file_in_folder_path(out_dir)
    if blocker is not None:
        raise ValueError(f"{out_dir}: {blocker} is a file; the export is a folder (model.safetensors, config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # timm records the factory kwargs on the model (model._model_args); save_for_hf writes them as model_args
    save_for_hf(model, str(out_dir), model_args=args, safe_serialization=True)
    return ExportResult(out_dir, arch, needs_zoo)
