"""Slides for tests and benchmarks: pyramidal TIFFs that OpenSlide and tiffslide both read, built on the spot.

A helper module, not a test file: tests import ``from wsi_fixtures import write_pyramidal_tiff`` (pytest
puts ``tests/`` on ``sys.path`` for the root conftest); ``benchmarks/wsi_bench.py`` adds that folder itself.
``tifffile`` (the ``wsi`` extra) and PIL are imported where used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from zoo._io import atomic_write

__all__ = ["write_pyramidal_tiff"]


def write_pyramidal_tiff(
    image: np.ndarray,
    path: str | os.PathLike,
    mpp: float | None = 0.5,
    tile: int = 256,
    min_size: int = 256,
    compression: str | None = "zlib",
    aperio_magnification: float | None = None,
) -> Path:
    """Write ``image`` ``(H, W, 3)`` uint8 as a tiled pyramidal TIFF both OpenSlide and tiffslide read.

    Levels halve (PIL box filter) until the short side would drop below ``min_size``; each level is a
    top-level page (reduced ones with ``subfiletype=1``; OpenSlide ignores SubIFD pyramids). ``mpp`` goes
    into the resolution tags (generic TIFF) or, with ``aperio_magnification``, into an Aperio
    ImageDescription with the Aperio page layout (vendor ``aperio``); ``mpp=None`` writes no resolution
    (a slide without mpp). Written atomically.
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    aperio = aperio_magnification is not None  # Aperio marks reduced levels subfiletype 0 (tifffile relies on it)
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        prev = levels[-1]
        levels.append(np.asarray(Image.fromarray(prev).resize((prev.shape[1] // 2, prev.shape[0] // 2), Image.BOX)))
    with atomic_write(path, suffix=".tmp") as tmp, tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            kwargs: dict[str, Any] = dict(
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if i == 0 or aperio else 1,
            )
            if aperio_magnification is not None and i == 0:
                H, W = level.shape[:2]
                kwargs["description"] = (
                    f"Aperio Image Library v10.0.0\r\n{W}x{H} [0,0 {W}x{H}] ({tile}x{tile}) zlib"
                    f"|AppMag = {aperio_magnification:g}" + (f"|MPP = {mpp}" if mpp else "")
                )
            elif i == 0:
                kwargs["description"] = ""  # no tifffile JSON shape description: a plain generic TIFF
            if mpp and aperio_magnification is None:
                kwargs["resolution"] = (1e4 / (mpp * 2**i),) * 2
                kwargs["resolutionunit"] = "CENTIMETER"
            tif.write(level, metadata=None, **kwargs)
            if aperio_magnification is not None and i == 0:
                # Aperio layout: a stripped thumbnail page follows level 0 (readers skip it as a level)
                thumb = levels[-1]
                tif.write(thumb, photometric="rgb", compression=compression, metadata=None, description="")
    return path
