"""Heads that are not backbones (MIL, probing, scanpath); importing a module registers its entries."""

from . import mil, probing, scanpath  # noqa: F401
