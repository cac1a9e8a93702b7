"""Backbone families, one module each; importing a module registers its architectures."""

from . import biformer, davit, halonet, medusa  # noqa: F401
