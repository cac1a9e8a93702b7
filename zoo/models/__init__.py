"""Backbone families, one module each; importing a module registers its architectures."""

from . import davit  # noqa: F401
