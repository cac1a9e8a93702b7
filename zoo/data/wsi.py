"""Whole-slide images: reading, tissue detection, tiling, feature extraction to HDF5, bags, heatmaps.

Pipeline (``zoo wsi ...`` wraps each step)::

    open_slide(path)                      OpenSlide, falling back to tiffslide; one adapter (RGB arrays, mpp)
    detect_tissue(thumbnail)              Otsu on HSV saturation + a luminance test against the glass (pale
                                          tissue), closing, small components removed
    tile_grid(slide, tile_size, mpp=...)  level-0 coordinates at a target mpp or magnification
    extract_features(slides, out_dir, backbone=...)
                                          batched, one HDF5 per slide, written atomically; finished slides
                                          are skipped on a rerun (resume)
    BagDataset(feature_dir, labels_csv)   bags (N, D) + labels for ``zoo mil train``
    attention_heatmap(h5, attention, png) attention over the slide thumbnail

HDF5 layout of ``<slide_id>.h5`` (one file per slide, CLAM-like, with the ACMIL per-slide fields):

* ``features`` ``(N, D)`` float16 (or float32), ``coords`` ``(N, 2)`` int64 level-0 (x, y) of each tile's
  top-left corner, ``tissue_fraction`` ``(N,)`` float32; tiles that could not be read are absent from all
  three (their count is ``skipped_tiles``);
* ``thumbnail`` ``(h, w, 3)`` uint8 and ``tissue_mask`` ``(h, w)`` bool, for heatmaps without the slide;
* attributes of the slide: ``slide_id``, ``slide_path``, ``tile_size_level0``, ``target_mpp`` (this slide's,
  NaN when unknown), ``mpp``, ``read_level``, ``downsample``, ``vendor``, ``reader``, ``dimensions``,
  ``skipped_tiles`` (unreadable tiles left out), ``zoo_version``, ``complete`` (True: written to the end);
* provenance, what made the features: ``backbone`` (architecture or module class), ``backbone_kwargs``
  (JSON), ``weights`` (``pretrained:<arch>.<tag>`` with ``@sha256:<hex>`` when the weight file is local,
  ``file:sha256:<hex>`` for a ``checkpoint``, ``random:seed=<n>``, ``module:sha256:<hex>`` of a module's
  state dict), ``input_size`` (pixels the backbone saw), ``tile_size``, ``feature_dim``, ``feature_dtype``,
  and ``provenance``: JSON of the fields a rerun must match (backbone, backbone_kwargs, weights,
  input_size, tile_size, target_mpp, target_magnification, feature_dtype). A rerun skips a finished slide
  only when they match; otherwise, and for older files without ``provenance``, it stops with
  ``FeatureMismatchError`` (pass ``overwrite=True`` / ``--overwrite`` or another ``--out``).

Optional dependencies (the ``wsi`` extra) are imported where used: ``openslide`` (openslide-python +
openslide-bin) or ``tiffslide``, ``h5py``, ``scipy`` (tissue morphology), ``tifffile`` (test slides).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo._io import atomic_write, clean_temporaries, plain_name

__all__ = [
    "WSIError",
    "SlideReadError",
    "NoTissueError",
    "MissingMPPError",
    "FeatureMismatchError",
    "FeatureFileError",
    "Slide",
    "open_slide",
    "detect_tissue",
    "TileGrid",
    "tile_grid",
    "read_tiles",
    "extract_features",
    "ExtractionReport",
    "read_feature_file",
    "BagDataset",
    "attention_heatmap",
    "load_attention",
    "write_pyramidal_tiff",
    "add_cli",
]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")


class WSIError(RuntimeError):
    """Base error of the whole-slide pipeline; the message names the slide or file."""


class SlideReadError(WSIError):
    """The slide cannot be opened or read (unsupported, unreadable, truncated)."""


class NoTissueError(WSIError):
    """Tissue detection found nothing on the slide."""


class MissingMPPError(WSIError):
    """A target mpp/magnification was asked for but the slide has no such metadata."""


class FeatureMismatchError(WSIError):
    """A feature file does not match what the consumer expects (feature dim, backbone, weights, settings)."""


class FeatureFileError(FeatureMismatchError):
    """A feature file is damaged, truncated, incomplete, empty or lacks a dataset; the message names it."""


def _one_line(err: BaseException, limit: int = 300) -> str:
    """``err`` as one short line: libraries' messages may span lines or quote whole headers."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# --------------------------------------------------------------------------------------------------
# reading


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
                    reason = f"{type(err).__name__}: {_one_line(err)}"
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
                reasons.append(f"{name}: {_one_line(err)}")
            except Exception as err:  # noqa: BLE001 - each library raises its own types
                reasons.append(f"{name}: {type(err).__name__}: {_one_line(err)}")
            opened = slide if slide is not None else handle  # the slide's handle may have been reopened
            if opened is not None:
                try:
                    opened.close()
                except Exception:  # noqa: BLE001 - closing what failed to read; nothing more to report
                    pass
    raise SlideReadError(f"cannot read slide {path}: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------------------
# tissue detection and tiling


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of uint8-range values (pixels ``> threshold`` form the upper class)."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256)[:256].astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    bins = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * bins)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))


def _glass_stats(values: np.ndarray) -> tuple[float, float]:
    """Median and spread (1.4826 * MAD, floored at 1) of the glass pixels' values."""
    median = float(np.median(values))
    return median, max(1.4826 * float(np.median(np.abs(values - median))), 1.0)


def detect_tissue(
    thumbnail: np.ndarray,
    min_saturation: float = 5.0,
    min_darkening: float = 8.0,
    noise_sigmas: float = 4.0,
    min_area_frac: float = 0.0005,
    close_iter: int = 2,
    median_size: int = 5,
    black_level: int = 20,
) -> np.ndarray:
    """Tissue mask ``(h, w)`` bool of an RGB thumbnail ``(h, w, 3)``.

    A pixel is tissue when it is more saturated **or** darker than the glass (CLAM-style HSV-saturation
    Otsu, plus a luminance test so that pale, faded or weakly stained tissue is not lost):

    1. saturation ``S`` and luminance ``L`` (BT.601) in 0..255, median-filtered (JPEG and sensor noise);
    2. glass = pixels in the bright Otsu class of ``L`` and the low Otsu class of ``S``; its median and
       spread (MAD) give the background level and noise of this slide (defaults if it has no glass);
    3. ``S > max(Otsu(S), glass_S + max(min_saturation, noise_sigmas * spread_S))`` or
       ``L < glass_L - max(min_darkening, noise_sigmas * spread_L)``: Otsu finds well-stained tissue, the
       floors keep a blank slide blank instead of Otsu splitting its noise, and the luminance test finds pale
       tissue that Otsu on saturation puts with the glass when the slide also holds dark tissue;
    4. pixels darker than ``black_level`` are never tissue (scanner padding, black ink, label shadows);
    5. a morphological closing and hole filling join fragments; components smaller than
       ``min_area_frac`` of the thumbnail (dust, debris) are dropped.

    Args:
        thumbnail: ``(h, w, 3)`` uint8 RGB (OpenSlide's transparent outside-scan areas arrive as white).
        min_saturation: least saturation above the glass counted as tissue (0..255 scale).
        min_darkening: least luminance below the glass counted as tissue (0..255 scale).
        noise_sigmas: the floors grow to this many glass-noise spreads on noisy slides.
        min_area_frac: smallest kept component, as a fraction of the thumbnail's pixels.
        close_iter: iterations of the 3x3 closing (0: no closing and no hole filling).
        median_size: median filter side (1: none).
        black_level: luminance below which a pixel is not tissue.
    """
    from scipy import ndimage

    if thumbnail.ndim != 3 or thumbnail.shape[-1] < 3:
        raise ValueError(f"thumbnail of shape {thumbnail.shape}; expected (h, w, 3) RGB")
    rgb = thumbnail[..., :3].astype(np.float32)
    value = rgb.max(-1)
    saturation = (value - rgb.min(-1)) * 255.0 / np.maximum(value, 1.0)
    luminance = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    saturation = saturation.round().astype(np.uint8)
    luminance = luminance.round().astype(np.uint8)
    if median_size > 1:
        saturation = ndimage.median_filter(saturation, size=median_size)
        luminance = ndimage.median_filter(luminance, size=median_size)
    sat_otsu, lum_otsu = _otsu(saturation), _otsu(luminance)
    glass = (luminance > max(lum_otsu, black_level)) & (saturation <= sat_otsu)
    if glass.sum() >= 0.01 * glass.size:
        glass_s, spread_s = _glass_stats(saturation[glass].astype(np.float32))
        glass_l, spread_l = _glass_stats(luminance[glass].astype(np.float32))
    else:  # no glass on the thumbnail (tissue everywhere): measure against ideal glass
        glass_s, spread_s, glass_l, spread_l = 0.0, 1.0, 255.0, 1.0
    sat_threshold = max(sat_otsu, glass_s + max(min_saturation, noise_sigmas * spread_s))
    lum_threshold = glass_l - max(min_darkening, noise_sigmas * spread_l)
    mask = ((saturation > sat_threshold) | (luminance < lum_threshold)) & (luminance >= black_level)
    if close_iter:
        mask = ndimage.binary_closing(mask, iterations=close_iter, border_value=0)
        mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        areas = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = areas >= min_area_frac * mask.size
        mask = keep[labels]
    return mask


@dataclass
class TileGrid:
    """Tile coordinates of one slide at a target resolution.

    ``coords`` ``(N, 2)`` int64 level-0 (x, y) top-left corners; each tile covers ``size_level0`` level-0
    pixels, is read at ``level`` as ``read_size`` pixels and resized to ``tile_size``.
    """

    coords: np.ndarray
    tile_size: int
    size_level0: int
    level: int
    read_size: int
    downsample: float  # target pixel size / level-0 pixel size
    target_mpp: float | None
    tissue_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.coords)


def _target_downsample(
    slide: Slide, mpp: float | None, magnification: float | None, fallback_mpp: float | None
) -> tuple[float, float | None]:
    """Downsample from level 0 to the target resolution, and the target mpp when known."""
    if mpp is not None and magnification is not None:
        raise ValueError("pass a target mpp or a target magnification, not both")
    base_mpp = slide.mpp or fallback_mpp
    if mpp is not None:
        if base_mpp is None:
            raise MissingMPPError(
                f"slide {slide.path} has no microns-per-pixel metadata (vendor {slide.vendor}); pass "
                f"--fallback-mpp (e.g. 0.25 for a 40x scan) or tile at level-0 pixels (no --mpp)"
            )
        return mpp / base_mpp, mpp
    if magnification is not None:
        objective = slide.objective_power or (10.0 / base_mpp if base_mpp else None)  # 10x ~ 1 um/px
        if objective is None:
            raise MissingMPPError(
                f"slide {slide.path} has neither objective power nor mpp metadata; pass --fallback-mpp"
            )
        ds = objective / magnification
        return ds, (base_mpp * ds if base_mpp else None)
    return 1.0, base_mpp


def tile_grid(
    slide: Slide,
    tile_size: int = 256,
    mpp: float | None = None,
    magnification: float | None = None,
    overlap: int = 0,
    tissue_mask: np.ndarray | None = None,
    min_tissue: float = 0.25,
    fallback_mpp: float | None = None,
) -> TileGrid:
    """Grid of ``tile_size`` tiles at a target ``mpp`` or ``magnification`` (level-0 pixels if neither).

    Args:
        overlap: pixels (at the target resolution) shared by neighbouring tiles; stride = tile_size - overlap.
        tissue_mask: ``(h, w)`` bool over the whole slide (any scale); tiles whose tissue fraction is below
            ``min_tissue`` are dropped. None keeps every tile.
        fallback_mpp: level-0 mpp to assume when the slide has none.

    Raises:
        MissingMPPError: a target resolution was asked for and the slide has no metadata and no fallback.
        NoTissueError: no tile passes ``min_tissue``.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap {overlap} must be in [0, tile_size={tile_size})")
    downsample, target_mpp = _target_downsample(slide, mpp, magnification, fallback_mpp)
    if downsample < 1.0 - 1e-6:
        warnings.warn(
            f"slide {slide.path}: target resolution is finer than level 0 (downsample {downsample:.3g}); "
            "tiles are upsampled",
            stacklevel=2,
        )
    size0 = max(1, round(tile_size * downsample))
    stride0 = max(1, round((tile_size - overlap) * downsample))
    level = slide.get_best_level_for_downsample(downsample)
    read_size = max(1, round(size0 / slide.level_downsamples[level]))
    W, H = slide.dimensions
    xs = np.arange(0, max(W - size0, 0) + 1, stride0)
    ys = np.arange(0, max(H - size0, 0) + 1, stride0)
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2).astype(np.int64)
    fraction = np.ones(len(grid))
    if tissue_mask is not None:
        mh, mw = tissue_mask.shape
        # tissue fraction of each tile: mean of the mask over the tile's footprint (integral image)
        integral = np.pad(tissue_mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        x0 = np.clip((grid[:, 0] * mw / W).astype(np.int64), 0, mw - 1)
        y0 = np.clip((grid[:, 1] * mh / H).astype(np.int64), 0, mh - 1)
        x1 = np.clip(np.ceil((grid[:, 0] + size0) * mw / W).astype(np.int64), x0 + 1, mw)
        y1 = np.clip(np.ceil((grid[:, 1] + size0) * mh / H).astype(np.int64), y0 + 1, mh)
        area = (x1 - x0) * (y1 - y0)
        fraction = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
        keep = fraction >= min_tissue
        grid, fraction = grid[keep], fraction[keep]
    if len(grid) == 0:
        raise NoTissueError(
            f"slide {slide.path}: no {tile_size}-px tile at downsample {downsample:.3g} has >= {min_tissue:.0%} "
            f"tissue (slide {W}x{H}); check the slide or lower --min-tissue"
        )
    return TileGrid(grid, tile_size, size0, level, read_size, downsample, target_mpp, fraction)


def read_tiles(slide: Slide, grid: TileGrid, indices: Sequence[int] | slice | None = None) -> np.ndarray:
    """Tiles ``(n, tile_size, tile_size, 3)`` uint8 for ``grid.coords[indices]``.

    Raises:
        SlideReadError: a tile cannot be read (``extract_features`` skips such tiles and counts them instead).
    """
    coords = grid.coords if indices is None else grid.coords[indices]
    out = np.empty((len(coords), grid.tile_size, grid.tile_size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(coords):
        out[i] = _read_tile(slide, grid, int(x), int(y))
    return out


def _read_tile(slide: Slide, grid: TileGrid, x: int, y: int) -> np.ndarray:
    """One tile ``(tile_size, tile_size, 3)`` uint8 at level-0 (x, y)."""
    from PIL import Image

    tile = slide.read_region((x, y), grid.level, (grid.read_size, grid.read_size))
    if grid.read_size != grid.tile_size:
        tile = np.asarray(Image.fromarray(tile).resize((grid.tile_size, grid.tile_size), Image.BILINEAR))
    return tile


def _read_tiles_skipping(slide: Slide, grid: TileGrid, indices: slice) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The readable tiles ``(m, s, s, 3)`` of ``grid.coords[indices]``, the mask ``(n,)`` of which they are, and
    the errors of the others: one corrupt tile costs that tile, not the slide."""
    coords = grid.coords[indices]
    tiles, ok, errors = [], np.zeros(len(coords), dtype=bool), []
    for i, (x, y) in enumerate(coords):
        try:
            tiles.append(_read_tile(slide, grid, int(x), int(y)))
            ok[i] = True
        except SlideReadError as err:
            errors.append(str(err))
    out = np.stack(tiles) if tiles else np.empty((0, grid.tile_size, grid.tile_size, 3), dtype=np.uint8)
    return out, ok, errors


# --------------------------------------------------------------------------------------------------
# feature extraction


@contextmanager
def _atomic_h5(path: Path) -> Iterator[Any]:
    """Yield an h5py.File written to a temporary ``.partial`` name next to ``path``; renamed only on success."""
    import h5py

    # h5py closes (inner) before atomic_write syncs, sets the mode and renames (outer)
    with atomic_write(path, suffix=".partial") as tmp, h5py.File(tmp, "w") as f:
        yield f


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_state_dict(module: Any) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and bytes of every tensor, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _pretrained_identity(model: Any, name: str) -> str:
    """``pretrained:<arch>.<tag>`` from the built model's pretrained_cfg, ``@sha256:<hex>`` when its file is local."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    arch = cfg.get("architecture") or name.split(".")[0]
    tag = cfg.get("tag")
    identity = f"pretrained:{arch}.{tag}" if tag else f"pretrained:{arch}"
    file = cfg.get("file")
    if file and Path(file).is_file():
        identity += f"@sha256:{_sha256_file(file)}"
    return identity


def _create_from_checkpoint(name: str, checkpoint: str | os.PathLike, build: dict[str, Any]) -> Any:
    """``name`` built with ``build`` kwargs and ``checkpoint`` loaded strictly; failures become one clear error."""
    import zoo
    from zoo._io import CorruptFileError, UnsafeFileError, safe_load

    try:
        return zoo.create_model(name, checkpoint_path=str(checkpoint), **build)
    except (UnsafeFileError, CorruptFileError):
        raise
    except Exception as err:  # noqa: BLE001 - timm / torch raise many types; diagnosed below
        reason = _one_line(err)
    safe_load(checkpoint, what="checkpoint")  # a file that needs pickle or is damaged: that error, naming it
    raise ValueError(
        f"checkpoint {checkpoint} does not load into {name} ({json.dumps(build, default=str)}): {reason}. Pass the "
        "backbone's state dict without its classifier, saved from the same architecture and backbone kwargs "
        "(model.reset_classifier(0); torch.save(model.state_dict(), path))"
    )


class _Embedder:
    """A zoo/timm backbone as a tile embedder: uint8 tiles ``(n, s, s, 3)`` -> features ``(n, D)``.

    ``weights`` says where the weights come from (``pretrained:...``, ``file:sha256:...``, ``random:seed=...``,
    ``module:sha256:...``; see the module docstring).
    """

    def __init__(
        self,
        backbone: str | Any,
        *,
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
        seed: int = 0,
        input_size: int | None = None,
        device: str = "cpu",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import torch

        import zoo

        self.kwargs = dict(backbone_kwargs or {})
        if isinstance(backbone, str):
            self.name = backbone
            self.features_only = bool(self.kwargs.get("features_only"))
            build = dict(self.kwargs) if self.features_only else dict(self.kwargs, num_classes=0)
            if checkpoint is not None:
                self.weights = f"file:sha256:{_sha256_file(checkpoint)}"
                model = _create_from_checkpoint(backbone, checkpoint, build)
            elif pretrained:
                model = zoo.create_model(backbone, pretrained=True, **build)
                self.weights = _pretrained_identity(model, backbone)
            else:  # random weights (asked for explicitly): seeded, so a rerun rebuilds the same network
                with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG as it was
                    torch.manual_seed(seed)
                    model = zoo.create_model(backbone, **build)
                self.weights = f"random:seed={seed}"
        else:  # a module: pooled features from forward, or a list of maps (features_only)
            model, self.name = backbone, type(backbone).__name__
            self.features_only = hasattr(model, "feature_info") and hasattr(model, "return_layers")
            self.weights = f"module:sha256:{_sha256_state_dict(model)}"
        self.random = self.weights.startswith("random:")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, 3, 1, 1)
        self.input_size = input_size
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.from_numpy(tiles).to(self.device).permute(0, 3, 1, 2).float().div_(255)
            if self.input_size and x.shape[-1] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
            x = (x - self.mean) / self.std
            out = self.model(x)
            if self.features_only or isinstance(out, (list, tuple)):
                out = out[-1] if isinstance(out, (list, tuple)) else out
                out = out.mean(dim=(-2, -1)) if out.ndim == 4 else out
            return out.float().cpu().numpy()


def _provenance(
    embedder: _Embedder,
    tile_size: int,
    mpp: float | None,
    magnification: float | None,
    input_size: int | None,
    float16: bool,
) -> dict[str, Any]:
    """What makes the features what they are; a rerun must match it to reuse a file. As stored (JSON types)."""
    record = dict(
        backbone=embedder.name,
        backbone_kwargs=embedder.kwargs,
        weights=embedder.weights,
        input_size=int(input_size or tile_size),  # what the backbone saw
        tile_size=int(tile_size),
        target_mpp=mpp,
        target_magnification=magnification,
        feature_dtype="float16" if float16 else "float32",
    )
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def _parse_provenance(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        value = json.loads(text)
    except ValueError:
        return {"provenance": text}  # unparseable: compares unequal to any real record
    return value if isinstance(value, dict) else {"provenance": value}


def _describe_diff(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> str:
    """``"key: <a_name> <a value>, <b_name> <b value>"`` for each key whose values differ, joined by '; '."""
    return "; ".join(
        f"{key}: {a_name} {json.dumps(a.get(key))}, {b_name} {json.dumps(b.get(key))}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    )


@dataclass
class ExtractionReport:
    """What ``extract_features`` did: written, skipped (already done) and failed slides, unreadable tiles,
    the weights' identity and timings."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_tiles: dict[str, int] = field(default_factory=dict)  # slide id -> unreadable tiles left out
    tile_errors: dict[str, str] = field(default_factory=dict)  # slide id -> the first tile's read error
    weights: str = ""
    tiles: int = 0
    read_s: float = 0.0
    embed_s: float = 0.0
    wall_s: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        unreadable = sum(self.skipped_tiles.values())
        lines = [
            f"{len(self.written)} slide(s) written, {len(self.skipped)} already done (skipped), "
            f"{len(self.failed)} failed; {self.tiles} tiles in {self.wall_s:.1f} s ({self.tiles_per_s:.1f} tiles/s; "
            f"reading {self.read_s:.1f} s, embedding {self.embed_s:.1f} s)"
            + (f"; {unreadable} unreadable tile(s) skipped in {len(self.skipped_tiles)} slide(s)" if unreadable else "")
        ]
        if self.weights.startswith("random:"):
            lines.append(f"  weights {self.weights}: RANDOM, untrained; the features describe no tissue")
        lines += [
            f"  slide {sid}: {n} unreadable tile(s) skipped (first: {self.tile_errors.get(sid, '')})"
            for sid, n in self.skipped_tiles.items()
        ]
        lines += [f"  failed {name}: {reason}" for name, reason in self.failed.items()]
        return "\n".join(lines)


def slide_id_of(path: str | os.PathLike) -> str:
    """Slide id = file name without its suffix (``TCGA-XX.svs`` -> ``TCGA-XX``)."""
    return Path(path).stem


def _stored_provenance(h5_path: Path) -> tuple[bool, dict[str, Any] | None]:
    """(complete, provenance) of an existing feature file; an unreadable one is (False, None): redone."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            return bool(f.attrs.get("complete", False)), _parse_provenance(f.attrs.get("provenance"))
    except OSError:
        return False, None  # unreadable (e.g. left by a crash of an old writer): redo it


def _is_finished(target: Path, slide_id: str, wanted: Callable[[], dict[str, Any]]) -> bool:
    """Whether ``target`` is finished and made as ``wanted()`` (the requested provenance) says: skip it.

    An absent, unfinished or unreadable file is False (extract it).

    Raises:
        FeatureMismatchError: the file is finished but made otherwise (names each differing value), or it has
            no provenance (an older zoo).
    """
    if not target.exists():
        return False
    complete, stored = _stored_provenance(target)
    if not complete:
        return False
    requested = wanted()
    fix = "pass --overwrite (overwrite=True) to re-extract, or another --out folder"
    if stored is None:
        raise FeatureMismatchError(
            f"feature file {target} (slide {slide_id}) has no provenance: it was written by an older zoo that did "
            f"not record the weights and settings, so it cannot be checked against this run "
            f"({requested['backbone']}, weights {requested['weights']}); {fix}"
        )
    diff = _describe_diff(stored, requested, "stored", "requested")
    if diff:
        raise FeatureMismatchError(
            f"feature file {target} (slide {slide_id}) was extracted differently: {diff}. Features made two ways "
            f"must not share a folder; {fix}"
        )
    return True


def _check_weight_source(
    backbone: str | Any, pretrained: bool, checkpoint: str | os.PathLike | None, random_weights: bool
) -> None:
    """Exactly one source of weights for a registry name; none for a module (it has its own)."""
    if not isinstance(backbone, str):
        if pretrained or checkpoint is not None:
            raise ValueError(
                f"backbone is a module ({type(backbone).__name__}) with its own weights; pretrained= and "
                "checkpoint= apply to registry names only: load the weights into the module before passing it"
            )
        return
    sources = {"pretrained": pretrained, "checkpoint": checkpoint is not None, "random_weights": random_weights}
    chosen = [name for name, given in sources.items() if given]
    if len(chosen) != 1:
        problem = "no source of weights was given" if not chosen else f"{' and '.join(chosen)} were given together"
        raise ValueError(
            f"backbone {backbone!r}: {problem}; pass exactly one of pretrained=True (--pretrained: the "
            "registry's weights), checkpoint=PATH (--checkpoint: a state dict file of this backbone) or "
            "random_weights=True (--random-weights: untrained, for pipeline tests only; features of random "
            "weights describe no tissue)"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; pass the path of a state dict file")


def extract_features(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    backbone: str | Any = "resnet18",
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    backbone_kwargs: dict[str, Any] | None = None,
    tile_size: int = 256,
    mpp: float | None = 0.5,
    magnification: float | None = None,
    overlap: int = 0,
    min_tissue: float = 0.25,
    fallback_mpp: float | None = None,
    input_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    reader: str = "auto",
    float16: bool = True,
    thumbnail_size: int = 1024,
    overwrite: bool = False,
    on_error: str = "skip",
    progress: bool = True,
) -> ExtractionReport:
    """Tile every slide and embed its tiles with a zoo/timm backbone into ``out_dir/<slide_id>.h5``.

    Each file is written under a temporary name and renamed when complete, so an interrupted run leaves no
    half-written file (and the next run removes the temporary ones a killed run left). A rerun skips slides
    whose file is complete and was made the same way (backbone, kwargs, weights, input size, tile size,
    target resolution, dtype: the file's ``provenance``); a file made otherwise, or an older file without
    provenance, stops the run with ``FeatureMismatchError`` before anything is written. Tiles that cannot
    be read are left out and counted (``skipped_tiles``); a slide with no readable tile fails. Tiles are read
    in a background thread while the previous batch is embedded.

    Args:
        slides: slide paths (the slide id is the file stem; ids must be unique).
        backbone: zoo/timm architecture name (pooled features, ``num_classes=0``; or
            ``backbone_kwargs={'features_only': True}``: the last map, average-pooled), or a module (its
            weights are identified by the sha256 of its state dict).
        pretrained, checkpoint, random_weights: where a named backbone's weights come from; exactly one:
            the registry's pretrained weights, a state dict file (loaded strictly, without pickle), or
            untrained weights built under ``seed`` (a loud warning: for pipeline tests only).
        tile_size, mpp, magnification, overlap, min_tissue, fallback_mpp: see ``tile_grid``.
        input_size: resize tiles to this before the backbone (ACMIL: 256-px tiles -> 224).
        on_error: ``'skip'`` counts and reports failing slides (unreadable, no tissue, no mpp) and goes on;
            ``'raise'`` stops at the first.

    Returns:
        ExtractionReport with written / skipped / failed slides, unreadable tiles and the read vs embed time.

    Raises:
        ValueError: no (or more than one) source of weights for a named backbone, duplicate slide ids.
        FeatureMismatchError: a finished file in ``out_dir`` was made differently (names both values).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    _check_weight_source(backbone, pretrained, checkpoint, random_weights)
    out_dir = Path(out_dir)
    ids = [slide_id_of(p) for p in slides]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"slide ids must be unique (file stems); duplicated: {sorted(dup)}")
    clean_temporaries(out_dir)  # half-written files of a run that was killed
    report = ExtractionReport()
    start = time.perf_counter()
    built: dict[str, Any] = {}

    def prepared() -> tuple[_Embedder, dict[str, Any]]:
        """The embedder and the provenance it gives, built on first need (a run of failing slides builds none)."""
        if not built:
            embedder = _Embedder(
                backbone, pretrained=pretrained, checkpoint=checkpoint, seed=seed, input_size=input_size,
                device=device, backbone_kwargs=backbone_kwargs,
            )  # fmt: skip
            provenance = _provenance(embedder, tile_size, mpp, magnification, input_size, float16)
            built.update(embedder=embedder, provenance=provenance)
            report.weights = embedder.weights
        return built["embedder"], built["provenance"]

    def announce(embedder: _Embedder) -> None:
        """Say it loudly, once, before the first features of random weights are written."""
        if embedder.random and not built.get("announced"):
            built["announced"] = True
            print(
                f"WARNING: {embedder.name} has RANDOM weights ({embedder.weights}): these features describe no "
                "tissue. Use them to test the pipeline only, never to train or report a model; pass "
                "--pretrained or --checkpoint for real features.",
                file=sys.stderr,
                flush=True,
            )

    # finished files first: a folder never ends up holding features made two ways
    requested = lambda: prepared()[1]  # the backbone is built only when some file is finished
    done = set() if overwrite else {sid for sid in ids if _is_finished(out_dir / f"{sid}.h5", sid, requested)}

    for path, sid in zip(slides, ids):
        if sid in done:
            report.skipped.append(sid)
            continue
        target = out_dir / f"{sid}.h5"
        try:
            with open_slide(path, reader) as slide:
                thumb = slide.get_thumbnail(thumbnail_size)
                mask = detect_tissue(thumb)
                if not mask.any():
                    raise NoTissueError(f"slide {slide.path}: no tissue found on the thumbnail")
                grid = tile_grid(slide, tile_size, mpp, magnification, overlap, mask, min_tissue, fallback_mpp)
                embedder, wanted = prepared()
                announce(embedder)
                feats, kept, errors = _embed_slide(
                    slide, grid, embedder, batch_size, report, progress and len(grid) > batch_size
                )
                if not kept.any():
                    raise SlideReadError(
                        f"slide {slide.path}: none of its {len(grid)} tiles could be read (first error: "
                        f"{errors[0]}); the file is damaged: export or scan it again"
                    )
                skipped = int(len(grid) - kept.sum())
                if skipped:
                    report.skipped_tiles[sid], report.tile_errors[sid] = skipped, errors[0]
                with _atomic_h5(target) as f:
                    f.create_dataset("features", data=feats.astype(np.float16 if float16 else np.float32))
                    f.create_dataset("coords", data=grid.coords[kept])
                    f.create_dataset("thumbnail", data=thumb, compression="gzip")
                    f.create_dataset("tissue_mask", data=mask, compression="gzip")
                    f.create_dataset("tissue_fraction", data=grid.tissue_fraction[kept].astype(np.float32))
                    import zoo

                    f.attrs.update(
                        slide_id=sid,
                        slide_path=str(Path(path).resolve()),
                        backbone=embedder.name,
                        backbone_kwargs=json.dumps(wanted["backbone_kwargs"], sort_keys=True),
                        weights=embedder.weights,
                        input_size=wanted["input_size"],
                        feature_dim=int(feats.shape[1]),
                        feature_dtype=wanted["feature_dtype"],
                        provenance=json.dumps(wanted, sort_keys=True),
                        tile_size=grid.tile_size,
                        tile_size_level0=grid.size_level0,
                        target_mpp=grid.target_mpp if grid.target_mpp is not None else np.nan,
                        mpp=slide.mpp if slide.mpp is not None else np.nan,
                        read_level=grid.level,
                        downsample=grid.downsample,
                        vendor=slide.vendor,
                        reader=slide.reader,
                        dimensions=np.asarray(slide.dimensions),
                        skipped_tiles=skipped,
                        zoo_version=zoo.__version__,
                        complete=True,
                    )
            report.written.append(sid)
        except WSIError as err:
            if on_error == "raise":
                raise
            report.failed[sid] = str(err)
    report.wall_s = time.perf_counter() - start
    return report


def _embed_slide(
    slide: Slide, grid: TileGrid, embedder: _Embedder, batch_size: int, report: ExtractionReport, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features ``(M, D)`` of the readable tiles of ``grid``, the mask ``(N,)`` of which tiles they are, and the
    read errors of the others; reading overlaps embedding (one reader thread)."""
    batches = [slice(i, min(i + batch_size, len(grid))) for i in range(0, len(grid), batch_size)]
    bar = None
    if progress:
        try:
            from zoo.train.metrics import Progress

            bar = Progress(len(batches), desc=f"embed {slide.name}")
        except ImportError:
            bar = None

    def read(batch: slice) -> tuple[np.ndarray, np.ndarray, list[str], float]:
        t0 = time.perf_counter()
        tiles, ok, errors = _read_tiles_skipping(slide, grid, batch)
        return tiles, ok, errors, time.perf_counter() - t0

    outputs, kept, errors = [], [], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0])
        for i in range(len(batches)):
            tiles, ok, batch_errors, read_s = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            kept.append(ok)
            errors += batch_errors
            if len(tiles):
                t0 = time.perf_counter()
                outputs.append(embedder(tiles))
                report.embed_s += time.perf_counter() - t0
            report.read_s += read_s
            report.tiles += len(tiles)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    feats = np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
    return feats, np.concatenate(kept), errors


def _damaged_file_error(path: Path, name: str, err: BaseException) -> FeatureFileError:
    size = f"{path.stat().st_size} bytes; " if path.is_file() else ""
    return FeatureFileError(
        f"{name} is damaged or not an HDF5 feature file ({size}{type(err).__name__}: {_one_line(err)}); extract "
        "the slide again (zoo wsi extract ... --overwrite) or remove the file"
    )


def _check_feature_layout(f: Any, name: str, need_coords: bool = True) -> tuple[int, int]:
    """(N, D) of an open feature file; FeatureFileError naming it if unfinished or missing a dataset.

    ``coords`` may be absent when ``need_coords`` is False (a bag's header check); if present, it must be
    ``(N, 2)``.
    """
    import h5py

    if not f.attrs.get("complete", False):
        raise FeatureFileError(f"{name} is incomplete (its writer did not finish); rerun `zoo wsi extract`")
    needed = ("features", "coords") if need_coords else ("features",)
    missing = [k for k in needed if not isinstance(f.get(k), h5py.Dataset)]
    if missing:
        raise FeatureFileError(
            f"{name} has no {' or '.join(repr(k) for k in missing)} dataset (it holds {sorted(f.keys())}); it was "
            "not written by `zoo wsi extract`: extract the slide again"
        )
    shape = f["features"].shape
    coords_shape = f["coords"].shape if isinstance(f.get("coords"), h5py.Dataset) else None
    if len(shape) != 2 or coords_shape not in (None, (shape[0], 2)):
        raise FeatureFileError(
            f"{name} holds features of shape {shape} and coords of shape {coords_shape}; expected (N, D) and "
            "(N, 2): extract the slide again"
        )
    return int(shape[0]), int(shape[1])


def read_feature_file(path: str | os.PathLike, slide_id: str | None = None) -> dict[str, Any]:
    """``features`` (N, D) float32, ``coords`` (N, 2), and the attributes of one slide's HDF5 file.

    Raises:
        FeatureFileError: the file is truncated or not HDF5, unfinished, or lacks ``features`` / ``coords``;
            the message names the slide (``slide_id``, else the file's stem) and the file.
    """
    import h5py

    path = Path(path)
    name = f"slide {slide_id or path.stem}: feature file {path}"
    try:
        with h5py.File(path, "r") as f:
            _check_feature_layout(f, name)
            out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            out["features"] = f["features"][()].astype(np.float32)
            out["coords"] = f["coords"][()]
            return out
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:  # h5py's, on bad bytes
        raise _damaged_file_error(path, name, err) from None


def _feature_header(path: Path, slide_id: str) -> dict[str, Any]:
    """``n``, ``dim``, ``backbone``, ``provenance`` of a feature file, without reading the features."""
    import h5py

    name = f"slide {slide_id}: feature file {path}"
    try:
        with h5py.File(path, "r") as f:
            n, dim = _check_feature_layout(f, name, need_coords=False)
            return dict(
                n=n,
                dim=dim,
                backbone=str(f.attrs.get("backbone", "")),
                provenance=_parse_provenance(f.attrs.get("provenance")),
            )
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:  # h5py's, on bad bytes
        raise _damaged_file_error(path, name, err) from None


# --------------------------------------------------------------------------------------------------
# bags


class BagDataset:
    """Bags of slide features with labels from a CSV (``slide_id``, ``label`` columns; extra columns kept).

    ``ds[i] -> dict(features=(N, D) float32 tensor, label=int, slide_id=str, coords=(N, 2) ndarray)``.
    Rows whose feature file is missing are skipped, counted in ``missing`` and reported in one warning.
    Labels may be names (mapped to indices in sorted order, or in the order of ``classes``) or integers.
    Slide ids name files inside ``feature_dir`` only (absolute paths, ``..`` and separators are refused).
    Every file is checked when the dataset is built: readable, finished, ``features`` ``(N, D)`` with N > 0,
    one feature dim, and one provenance (the same backbone, weights and settings) across the files that
    record it; ``provenance`` holds it (None for files of an older zoo).

    Raises:
        UnsafePathError: a slide id is not a plain file name (names the CSV and line).
        FeatureFileError: a file is damaged, unfinished, lacks ``features`` or holds 0 tiles (names the slide).
        FeatureMismatchError: a file's feature dim differs from ``in_dim`` (or from the first file's), it was
            made by another ``backbone`` than asked, or two files were extracted differently; names the slides.
    """

    def __init__(
        self,
        feature_dir: str | os.PathLike,
        labels_csv: str | os.PathLike,
        *,
        slide_col: str = "slide_id",
        label_col: str = "label",
        classes: Sequence[str] | None = None,
        in_dim: int | None = None,
        backbone: str | None = None,
        slide_ids: Sequence[str] | None = None,
    ) -> None:
        self.feature_dir = Path(feature_dir)
        rows: list[tuple[str, str, str, dict[str, Any]]] = []  # (where, slide id, label, row)
        if not Path(labels_csv).is_file():
            raise FileNotFoundError(f"label CSV {labels_csv} does not exist (slide_id,label[,split] rows)")
        if not self.feature_dir.is_dir():
            raise FileNotFoundError(f"feature folder {feature_dir} does not exist (zoo wsi extract writes it)")
        with open(labels_csv, newline="") as f:
            reader = csv.DictReader(f)
            missing_cols = {slide_col, label_col} - set(reader.fieldnames or [])
            if missing_cols:
                raise ValueError(f"label CSV {labels_csv} lacks column(s) {sorted(missing_cols)}")
            for row in reader:
                where = f"{labels_csv} line {reader.line_num}"
                # an id names a file in feature_dir: '../x', '/x' or 'a/b' would read a file elsewhere
                sid = plain_name(row.get(slide_col), what="slide id", where=where)
                label = (row.get(label_col) or "").strip()
                if not label:
                    raise ValueError(f"{where}: slide {sid} has no {label_col!r}; fill it in or remove the row")
                rows.append((where, sid, label, row))
        if slide_ids is not None:
            wanted = set(slide_ids)
            rows = [r for r in rows if r[1] in wanted]
        raw_labels = [label for _, _, label, _ in rows]
        if classes is None:
            if all(v.lstrip("-").isdigit() for v in raw_labels):
                classes = [str(c) for c in sorted({int(v) for v in raw_labels})]
            else:
                classes = sorted(set(raw_labels))
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.records: list[dict[str, Any]] = []
        self.missing: list[str] = []
        self.provenance: dict[str, Any] | None = None
        first: tuple[str, Path] | None = None  # the slide whose provenance the others must match
        unrecorded: list[str] = []
        for where, sid, label, row in rows:
            path = self.feature_dir / f"{sid}.h5"
            if not path.is_file():
                self.missing.append(sid)
                continue
            key = str(int(label)) if label.lstrip("-").isdigit() else label
            if key not in index:
                raise ValueError(f"label CSV {labels_csv}: slide {sid} has label {label!r}, not in {self.classes}")
            header = _feature_header(path, sid)
            dim, file_backbone = header["dim"], header["backbone"]
            if header["n"] == 0:
                raise FeatureFileError(
                    f"slide {sid}: feature file {path} holds 0 tiles (an empty bag; {where}): a MIL head cannot "
                    "classify a slide without instances; extract it again (lower --min-tissue?) or remove the row"
                )
            in_dim = in_dim or dim
            if dim != in_dim:
                raise FeatureMismatchError(
                    f"slide {sid}: {path} has {dim}-d features ({file_backbone}) but {in_dim}-d are expected; "
                    "the files come from different backbones: re-extract or rebuild the head with in_dim="
                )
            if backbone is not None and file_backbone != backbone:
                raise FeatureMismatchError(
                    f"slide {sid}: {path} was extracted with {file_backbone!r}, not {backbone!r}"
                )
            provenance = header["provenance"]
            if provenance is None:
                unrecorded.append(sid)
            elif first is None:
                first, self.provenance = (sid, path), provenance
            else:
                diff = _describe_diff(self.provenance, provenance, f"slide {first[0]}", f"slide {sid}")
                if diff:
                    raise FeatureMismatchError(
                        f"slide {sid}: {path} and slide {first[0]}: {first[1]} were extracted differently ({diff}); "
                        "bags made two ways cannot be mixed: extract all slides again into one folder"
                    )
            self.records.append({**row, "slide_id": sid, "label": index[key], "path": path})
        self.in_dim = in_dim
        if self.missing:
            warnings.warn(
                f"{len(self.missing)} slide(s) of {labels_csv} have no feature file in {self.feature_dir} and "
                f"are skipped: {', '.join(self.missing[:10])}{' ...' if len(self.missing) > 10 else ''}",
                stacklevel=2,
            )
        if unrecorded and self.provenance is not None:
            warnings.warn(
                f"{len(unrecorded)} feature file(s) in {self.feature_dir} record no provenance (older zoo) and "
                f"cannot be checked against the others' weights {self.provenance.get('weights')!r}: "
                f"{', '.join(unrecorded[:10])}{' ...' if len(unrecorded) > 10 else ''}",
                stacklevel=2,
            )
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r["label"] for r in self.records]

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if i not in self._cache:  # bags are small (N x D fp16): keep them in RAM, as ACMIL does
            rec = self.records[i]
            data = read_feature_file(rec["path"], rec["slide_id"])
            features = data["features"]
            bad = ~np.isfinite(features).all(axis=1)
            if bad.any():  # a NaN feature turns the slide's prediction into NaN without a word
                raise FeatureFileError(
                    f"slide {rec['slide_id']}: feature file {rec['path']} has NaN or infinite features in "
                    f"{int(bad.sum())} of {len(features)} tiles; extract it again (float16=False if float16 "
                    "overflowed)"
                )
            self._cache[i] = dict(
                features=torch.from_numpy(features),
                label=rec["label"],
                slide_id=rec["slide_id"],
                coords=data["coords"],
            )
        return self._cache[i]


# --------------------------------------------------------------------------------------------------
# heatmaps

HEATMAP_SCALES = ("rank", "minmax", "absolute")
# near uniform: the finite values' range is at most this fraction of their largest magnitude
UNIFORM_SPREAD = 0.01
_LEGEND_HEIGHT = 46
_LEGEND_MIN_WIDTH = 220


def _colormap(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue -> yellow -> red map for ``values`` in [0, 1]: ``(..., 3)`` uint8."""
    stops = np.array([[49, 54, 149], [116, 173, 209], [255, 255, 191], [244, 109, 67], [165, 0, 38]], np.float64)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    t = (pos - lo)[..., None]
    return (stops[lo] * (1 - t) + stops[lo + 1] * t).round().astype(np.uint8)


def _mean_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks ``(N,)`` of ``values``, ties sharing their mean rank (equal attention, equal colour)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts) + (counts - 1) / 2.0)[inverse.ravel()]


def _colour_bar(width: int, ticks: Sequence[str], title: str) -> np.ndarray:
    """Legend strip ``(46, width, 3)`` uint8: ``title``, the colour map from 0 (left) to 1 (right), and the
    ``ticks`` labels at its start, middle and end."""
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (width, _LEGEND_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    margin, bar_top, bar_height = 8, 17, 12
    draw.text((margin, 2), title, fill=(0, 0, 0), font=font)
    bar_width = width - 2 * margin
    bar = _colormap(np.linspace(0.0, 1.0, bar_width))
    strip.paste(Image.fromarray(np.repeat(bar[None], bar_height, axis=0)), (margin, bar_top))
    for frac, text in zip(np.linspace(0.0, 1.0, len(ticks)), ticks):
        x = margin + round(frac * (bar_width - 1))
        draw.line([(x, bar_top + bar_height), (x, bar_top + bar_height + 3)], fill=(0, 0, 0))
        text_width = draw.textlength(text, font=font)
        left = min(max(x - text_width / 2, 0), width - text_width)  # the end labels stay inside the strip
        draw.text((left, bar_top + bar_height + 4), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def load_attention(path: str | os.PathLike) -> np.ndarray:
    """Per-tile attention ``(N,)`` float64 from a ``.npy`` file, loaded without pickle.

    Raises:
        ValueError: the file holds an object array (Python objects only pickle could rebuild), is no ``.npy``
            (an ``.npz`` archive, text, truncated) or holds no numbers; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attention file {path} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":  # a real .npy of Python objects (numpy's own text advises allow_pickle: not ours)
            raise ValueError(
                f"attention file {path} holds pickled Python objects (a NumPy object array); zoo does not unpickle "
                "files it is handed: save numbers, np.save(path, attention.astype(np.float32))"
            ) from None
        raise ValueError(f"attention file {path} is not a .npy array; save one with np.save(path, attention)") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"attention file {path} is truncated or not a .npy array ({_one_line(err)})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"attention file {path} is an .npz archive; pass one .npy array of per-tile attention (N,)")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"attention file {path} holds {array.dtype} values; expected numbers, one per tile (N,)")
    return array.astype(np.float64).ravel()


def _heatmap_inputs(feature_file: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Thumbnail ``(h, w, 3)``, coords ``(N, 2)``, tile side and slide width (level 0) of a feature file."""
    import h5py

    name = f"feature file {feature_file}"
    try:
        with h5py.File(feature_file, "r") as f:
            missing = [k for k in ("thumbnail", "coords") if k not in f]
            if missing:
                raise FeatureFileError(f"{name} has no {' or '.join(missing)} dataset; extract the slide again")
            return (
                f["thumbnail"][()],
                f["coords"][()],
                int(f.attrs["tile_size_level0"]),
                int(np.asarray(f.attrs["dimensions"])[0]),
            )
    except FeatureFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:  # h5py's, on bad bytes
        raise _damaged_file_error(Path(feature_file), name, err) from None


def attention_heatmap(
    feature_file: str | os.PathLike,
    attention: np.ndarray | Sequence[float] | str | os.PathLike,
    out_png: str | os.PathLike,
    alpha: float = 0.5,
    scale: str = "rank",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """Draw per-tile ``attention`` over the slide thumbnail stored in ``feature_file``; write a PNG.

    The PNG (written atomically) is the thumbnail ``(h, w)`` with the heat blended in, above a colour bar
    46 pixels high (its scale and labels); it is at least 220 pixels wide.

    Args:
        attention: ``(N,)`` values in the order of the file's ``coords``, or the path of a ``.npy`` holding
            them (loaded without pickle).
        alpha: heat opacity over the thumbnail.
        scale: ``'rank'``: percentile among this slide's tiles (as CLAM's heatmaps; ties share their mean
            rank); ``'minmax'``: this slide's lowest to highest value; ``'absolute'``: ``vmin`` to ``vmax``
            (e.g. 0 to 1 for attention probabilities; comparable across slides; values outside are clipped).

    Warns (UserWarning, naming the file):
        * tiles with NaN or infinite attention: not drawn (they keep the thumbnail's colours), counted;
        * near-uniform attention: the finite values' range is at most 1 % of their largest magnitude,
          ``max - min <= 0.01 * max(|max|, |min|)`` (for positive values ``max / min <= 1.0101``). 'rank' and
          'minmax' would stretch such differences over the whole colour range; the rule does not depend on
          the number of tiles, so softmax attention (uniform = ``1 / N`` each) and raw scores are judged alike;
        * ``'absolute'``: values outside ``[vmin, vmax]``, clipped.

    Raises:
        ValueError: every value is NaN or infinite, the count differs from the file's tiles, a bad ``scale``.
        FeatureFileError: the feature file is unreadable or lacks its thumbnail.
    """
    from PIL import Image

    if scale not in HEATMAP_SCALES:
        raise ValueError(f"scale={scale!r}; expected one of {', '.join(HEATMAP_SCALES)}")
    if scale == "absolute" and not vmax > vmin:
        raise ValueError(f"scale='absolute' needs vmin < vmax; got vmin={vmin}, vmax={vmax}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    source = ""
    if isinstance(attention, (str, os.PathLike)):
        source = f" (from {attention})"
        attention = load_attention(attention)
    attention = np.asarray(attention, dtype=np.float64).ravel()
    thumb, coords, size0, width0 = _heatmap_inputs(Path(feature_file))
    n = len(coords)
    if len(attention) != n:
        raise ValueError(f"{feature_file}: {len(attention)} attention values{source} for {n} tiles")
    finite = np.isfinite(attention)
    if not finite.any():
        raise ValueError(
            f"{feature_file}: the attention{source} is NaN or infinite for all {n} tiles; nothing to draw. The "
            "model's output is broken: check its run (a NaN loss?) before drawing"
        )
    where = f"{feature_file}{source}"
    unusable = int(n - finite.sum())
    if unusable:
        warnings.warn(
            f"{where}: {unusable} of {n} tiles have NaN or infinite attention and are not drawn", stacklevel=2
        )
    valid = attention[finite]
    low, high = float(valid.min()), float(valid.max())
    magnitude = max(abs(low), abs(high))
    spread = (high - low) / magnitude if magnitude > 0 else 0.0
    if spread <= UNIFORM_SPREAD:
        warnings.warn(
            f"{where}: the attention is near uniform (min {low:.6g}, max {high:.6g}: a range of {spread:.2%} of its "
            f"magnitude, at most {UNIFORM_SPREAD:.0%}); the model singles out no tile, and scale={scale!r} "
            + ("shows noise as contrast" if scale != "absolute" else "shows one colour"),
            stacklevel=2,
        )
    values = np.full(n, np.nan)
    if scale == "rank":
        values[finite] = _mean_ranks(valid) / (len(valid) - 1) if high > low else 0.5
        ticks, title = ["0 %", "50 %", "100 %"], "attention rank (percentile)"
    elif scale == "minmax":
        values[finite] = (valid - low) / (high - low) if high > low else 0.5
        ticks, title = [f"{low:.3g}", f"{(low + high) / 2:.3g}", f"{high:.3g}"], "attention (slide min to max)"
    else:
        outside = int(((valid < vmin) | (valid > vmax)).sum())
        if outside:
            warnings.warn(
                f"{where}: {outside} of {len(valid)} attention values lie outside [{vmin:g}, {vmax:g}] and are "
                "clipped to the ends of the colour bar",
                stacklevel=2,
            )
        values[finite] = np.clip((valid - vmin) / (vmax - vmin), 0.0, 1.0)
        ticks, title = [f"{vmin:.3g}", f"{(vmin + vmax) / 2:.3g}", f"{vmax:.3g}"], "attention (absolute)"
    if unusable:
        title += f"; {unusable} NaN tiles blank"
    h, w = thumb.shape[:2]
    ratio = w / width0
    heat = np.zeros((h, w), np.float64)
    covered = np.zeros((h, w), np.float64)
    for (x, y), v in zip(coords[finite], values[finite]):
        x0, y0 = int(x * ratio), int(y * ratio)
        x1, y1 = max(x0 + 1, int(math.ceil((x + size0) * ratio))), max(y0 + 1, int(math.ceil((y + size0) * ratio)))
        heat[y0:y1, x0:x1] += v
        covered[y0:y1, x0:x1] += 1
    has = covered > 0
    heat[has] /= covered[has]  # overlapping tiles: average
    colour = _colormap(heat).astype(np.float64)
    blend = thumb.astype(np.float64)
    blend[has] = (1 - alpha) * blend[has] + alpha * colour[has]
    width = max(w, _LEGEND_MIN_WIDTH)
    canvas = np.full((h + _LEGEND_HEIGHT, width, 3), 255, dtype=np.uint8)
    canvas[:h, :w] = blend.round().astype(np.uint8)
    canvas[h:] = _colour_bar(width, ticks, title)
    out_png = Path(out_png)
    with atomic_write(out_png, suffix=".tmp") as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return out_png


# --------------------------------------------------------------------------------------------------
# test / benchmark slides


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


# --------------------------------------------------------------------------------------------------
# cli


def _slides_from(args_slides: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in args_slides:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise ValueError(
                    f"folder {p} holds no slide files ({', '.join(SLIDE_SUFFIXES)}); pass slide files or their folder"
                )
            paths += found
        else:
            paths.append(p)
    return paths


def _cmd_info(args: argparse.Namespace) -> int:
    """One JSON line per readable slide on stdout, one error line per unreadable one on stderr; 1 if any failed."""
    failed = 0
    for path in _slides_from(args.slides):
        try:
            with open_slide(path, args.reader) as slide:
                print(
                    json.dumps(
                        dict(
                            slide=str(path), reader=slide.reader, vendor=slide.vendor, dimensions=slide.dimensions,
                            levels=slide.level_dimensions, downsamples=slide.level_downsamples, mpp=slide.mpp,
                            objective_power=slide.objective_power,
                        )
                    )
                )  # fmt: skip
        except WSIError as err:
            failed += 1
            print(f"error: {_one_line(err, limit=2000)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from zoo._cli_errors import parse_json_mapping

    kwargs = parse_json_mapping(args.backbone_kwargs, "--backbone-kwargs")
    report = extract_features(
        _slides_from(args.slides), args.out, args.backbone, pretrained=args.pretrained, checkpoint=args.checkpoint,
        random_weights=args.random_weights, seed=args.seed, backbone_kwargs=kwargs, tile_size=args.tile_size,
        mpp=args.mpp, magnification=args.magnification, overlap=args.overlap, min_tissue=args.min_tissue,
        fallback_mpp=args.fallback_mpp, input_size=args.input_size, batch_size=args.batch_size, device=args.device,
        reader=args.reader, overwrite=args.overwrite, on_error="raise" if args.strict else "skip",
    )  # fmt: skip
    print(report.summary())
    return 1 if report.failed else 0


def _cmd_heatmap(args: argparse.Namespace) -> int:
    out = attention_heatmap(
        args.features, args.attention, args.out, alpha=args.alpha, scale=args.scale, vmin=args.vmin, vmax=args.vmax
    )
    print(out)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``zoo wsi {info,extract,heatmap}`` to the ``zoo`` command's sub-parsers."""
    p = subparsers.add_parser("wsi", help="whole-slide images: info, tiling + feature extraction, heatmaps")
    sub = p.add_subparsers(dest="wsi_command", required=True)

    info = sub.add_parser("info", help="levels, mpp, vendor and reader of slides (exit 1 if one is unreadable)")
    info.add_argument("slides", nargs="+", help="slide files or folders")
    info.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"], help="slide reader")
    info.set_defaults(func=_cmd_info)

    ex = sub.add_parser("extract", help="tile slides and write one HDF5 of backbone features per slide (resumable)")
    ex.add_argument("slides", nargs="+", help="slide files or folders")
    ex.add_argument("--out", required=True, help="folder of <slide_id>.h5 feature files")
    ex.add_argument("--backbone", default="resnet18", help="any zoo or timm architecture (pooled features)")
    ex.add_argument("--backbone-kwargs", default="{}", help="JSON kwargs, e.g. '{\"features_only\": true}'")
    weights = ex.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="the registry's weights (tag in the name)")
    weights.add_argument("--checkpoint", default=None, help="a state dict file of the backbone without classifier")
    weights.add_argument(
        "--random-weights", action="store_true", help="untrained weights (seeded by --seed): pipeline tests only"
    )
    ex.add_argument("--seed", type=int, default=0, help="seed of the --random-weights build")
    ex.add_argument("--tile-size", type=int, default=256, help="tile side in pixels at the target resolution")
    ex.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel (0.5 ~ 20x)")
    ex.add_argument("--magnification", type=float, default=None, help="target magnification instead of --mpp")
    ex.add_argument("--overlap", type=int, default=0, help="overlap between tiles, pixels at the target resolution")
    ex.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept tile")
    ex.add_argument("--fallback-mpp", type=float, default=None, help="level-0 mpp for slides without metadata")
    ex.add_argument("--input-size", type=int, default=None, help="resize tiles to this before the backbone")
    ex.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    ex.add_argument("--device", default="cpu", help="torch device")
    ex.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"], help="slide reader")
    ex.add_argument("--overwrite", action="store_true", help="redo slides whose feature file is complete")
    ex.add_argument("--strict", action="store_true", help="stop at the first bad slide instead of skipping it")
    ex.set_defaults(func=_cmd_extract)

    hm = sub.add_parser("heatmap", help="attention over the slide thumbnail as a PNG with a colour bar")
    hm.add_argument("features", help="the slide's .h5 feature file")
    hm.add_argument("attention", help=".npy of per-tile attention (N,), numbers only")
    hm.add_argument("--out", required=True, help="PNG path")
    hm.add_argument("--alpha", type=float, default=0.5, help="heat opacity")
    hm.add_argument(
        "--scale", default="rank", choices=HEATMAP_SCALES, help="rank (percentile), minmax, absolute (--vmin..--vmax)"
    )
    hm.add_argument("--vmin", type=float, default=0.0, help="low end of --scale absolute")
    hm.add_argument("--vmax", type=float, default=1.0, help="high end of --scale absolute")
    hm.set_defaults(func=_cmd_heatmap)
    return p
