"""Opening and reading slides: one adapter over OpenSlide and tiffslide, their log noise silenced.

``open_slide(path)`` tries OpenSlide, then tiffslide (``reader='auto'``), and returns a :class:`Slide`
whose regions are RGB arrays and whose mpp is a float or None whichever library opened it. A file neither
can read is one :class:`SlideReadError` naming the slide and each reader's reason; the libraries' own log
lines about it are dropped so they do not bury that line. ``openslide`` (openslide-python + openslide-bin)
and ``tiffslide`` are optional (the ``wsi`` extra) and imported where used.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SlideReadError, one_line

__all__ = ["SLIDE_SUFFIXES", "Slide", "open_slide"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")


class _QuietReaders(logging.Filter):
    """Drops the slide libraries' log records while zoo reads a slide: their failures become one SlideReadError.

    tifffile logs bad pages through ``logging``. tiffslide reads the chunks of a region as concurrent zarr
    tasks; when one fails, its siblings' failures are logged as "Task exception was never retrieved" with a
    traceback whenever those tasks are collected, possibly long after the read: those records are always
    dropped (the read already raised).
    """

    prefixes = ("tifffile", "tiffslide", "zarr", "numcodecs", "imagecodecs", "asyncio", "openslide")

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio" and "never retrieved" in str(record.msg):
            frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info and record.exc_info[2] else []
            where = str(record.msg) + " ".join(frame.filename for frame in frames)
            if any(f"{os.sep}{lib}{os.sep}" in where for lib in ("zarr", "tiffslide", "tifffile")):
                return False
        return self.depth == 0

    def install(self) -> None:
        # child loggers do not run their parents' filters: attach to every logger of these libraries
        names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in self.prefixes]
        for name in {*self.prefixes, *names}:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)


_QUIET = _QuietReaders()


@contextmanager
def _quiet_readers() -> Iterator[None]:
    """While inside, the slide libraries' log records are dropped (thread-safe, nestable)."""
    with _QUIET.lock:
        if _QUIET.depth == 0:
            _QUIET.install()
        _QUIET.depth += 1
    try:
        yield
    finally:
        with _QUIET.lock:
            _QUIET.depth -= 1


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


class Slide:
    """One slide behind OpenSlide or tiffslide, with their differences hidden.

    * ``read_region`` returns an RGB ``(H, W, 3)`` uint8 array (OpenSlide's RGBA is composited on white,
      so transparent areas outside the scanned region read as glass, not black);
    * ``mpp`` (microns per pixel at level 0) and ``objective_power`` are floats or None (OpenSlide's
      properties are strings, tiffslide's floats);
    * ``level_dimensions``, ``level_downsamples`` as both libraries give them.
    """

    def __init__(self, handle: Any, reader: str, path: Path) -> None:
        self._handle = handle
        self.reader = reader
        self.path = path
        props = handle.properties
        prefix = "openslide" if reader == "openslide" else "tiffslide"
        self.vendor: str = str(props.get(f"{prefix}.vendor") or "unknown")
        self.mpp: float | None = _float_or_none(props.get(f"{prefix}.mpp-x"))
        self.objective_power: float | None = _float_or_none(props.get(f"{prefix}.objective-power"))
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(map(int, d)) for d in handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]

    @property
    def name(self) -> str:
        return self.path.name

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed ``downsample`` (both libraries agree)."""
        level = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample + 1e-6:
                level = i
        return level

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB ``(h, w, 3)`` uint8 of ``size`` (w, h) pixels of ``level`` at level-0 ``location`` (x, y).

        Raises:
            SlideReadError: the region cannot be decoded (one line naming the slide, region and reason). The
                slide stays usable for other regions: OpenSlide's handle, which refuses every read after its
                first error, is reopened.
        """
        location = (int(location[0]), int(location[1]))
        size = (int(size[0]), int(size[1]))
        region, reason = None, ""
        with _quiet_readers():
            for _attempt in range(2 if self.reader == "openslide" else 1):  # one retry on a fresh handle
                try:
                    region = self._handle.read_region(location, int(level), size)
                    break
                except Exception as err:  # noqa: BLE001 - reader-specific exception types
                    reason = f"{type(err).__name__}: {one_line(err)}"
                if self.reader == "openslide":
                    self._reopen()
        if region is None:
            raise SlideReadError(
                f"slide {self.path}: reading {size} at {location}, level {level} failed ({reason}); the file may "
                "be truncated or corrupt"
            )
        return _to_rgb(np.asarray(region))

    def _reopen(self) -> None:
        """A fresh handle after a failed read (OpenSlide latches its first error: every later read fails)."""
        try:
            import openslide

            handle = openslide.OpenSlide(str(self.path))
        except Exception:  # noqa: BLE001 - the old handle stays; its next read reports the error
            return
        self._handle.close()
        self._handle = handle

    def get_thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is at most ``max_size``; read from the smallest fitting level."""
        w, h = self.dimensions
        scale = max(w, h) / max_size
        level = self.get_best_level_for_downsample(max(scale, 1.0))
        lw, lh = self.level_dimensions[level]
        region = self.read_region((0, 0), level, (lw, lh))
        size = (max(1, round(w / max(scale, 1.0))), max(1, round(h / max(scale, 1.0))))
        if (lw, lh) != size:
            from PIL import Image

            region = np.asarray(Image.fromarray(region).resize(size, Image.BOX))
        return region

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.path.name!r}, reader={self.reader}, vendor={self.vendor}, dims={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )


def _to_rgb(region: np.ndarray) -> np.ndarray:
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=-1)
    if region.shape[-1] == 4:
        # OpenSlide gives premultiplied-then-unpremultiplied RGBA with alpha 0 outside the scan: composite on white
        alpha = region[..., 3:4].astype(np.float32) / 255.0
        rgb = region[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return rgb.round().astype(np.uint8)
    return np.ascontiguousarray(region[..., :3])


def open_slide(path: str | os.PathLike, reader: str = "auto") -> Slide:
    """Open a slide with OpenSlide, falling back to tiffslide (``reader='auto'``), or with the one named.

    Raises:
        SlideReadError: no reader can open it; the message names the slide and each reader's reason.
    """
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"slide {path} does not exist")
    if reader not in ("auto", "openslide", "tiffslide"):
        raise ValueError(f"unknown slide reader {reader!r}; expected 'auto', 'openslide' or 'tiffslide'")
    readers = ("openslide", "tiffslide") if reader == "auto" else (reader,)
    reasons = []
    # the libraries' own log lines and warnings about a bad file would bury the one error we raise
    with _quiet_readers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in readers:
            handle = slide = None
            try:
                if name == "openslide":
                    import openslide

                    handle = openslide.OpenSlide(str(path))
                else:
                    import tiffslide

                    handle = tiffslide.TiffSlide(str(path))
                slide = Slide(handle, name, path)
                # a truncated file often opens (header intact) but fails on pixel data: touch the smallest level
                slide.get_thumbnail(64)
                return slide
            except ImportError as err:
                reasons.append(f"{name}: not installed ({err.name}); pip install 'attention-zoo[wsi]'")
            except SlideReadError as err:
                reasons.append(f"{name}: {one_line(err)}")
            except Exception as err:  # noqa: BLE001 - each library raises its own types
                reasons.append(f"{name}: {type(err).__name__}: {one_line(err)}")
            opened = slide if slide is not None else handle  # the slide's handle may have been reopened
            if opened is not None:
                try:
                    opened.close()
                except Exception:  # noqa: BLE001 - closing what failed to read; nothing more to report
                    pass
    raise SlideReadError(f"cannot read slide {path}: " + "; ".join(reasons))
