"""Classification training at any scale: ``train(cfg)``, ``validate(...)`` and reusable components.

Components other entry points import: ``zoo.train.checkpoint`` (atomic, keep-last-N + best, exact resume),
``zoo.train.metrics`` (progress, CSV / TensorBoard / wandb, curves PNG), ``zoo.train.distributed``
(torchrun setup, per-rank seeds). Heavy imports stay lazy so ``import zoo.train.checkpoint`` is cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Config", "train", "validate"]


def __getattr__(name: str) -> Any:
    if name == "Config":
        from .config import Config

        return Config
    if name == "train":
        from .loop import train

        return train
    if name == "validate":
        from .validate import validate

        return validate
    raise AttributeError(name)
