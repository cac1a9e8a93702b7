"""Old path of the mmcv-lite bridge, kept for users' code: it lives in :mod:`zoo.mm.compat` now."""

from zoo.mm.compat import *  # noqa: F403
