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
  top-left corner;
* ``thumbnail`` ``(h, w, 3)`` uint8 and ``tissue_mask`` ``(h, w)`` bool, for heatmaps without the slide;
* attributes: ``slide_id``, ``slide_path``, ``backbone``, ``feature_dim``, ``tile_size`` (pixels at the
  target resolution), ``tile_size_level0``, ``target_mpp``, ``mpp``, ``read_level``, ``vendor``,
  ``reader``, ``dimensions``, ``zoo_version``.

Optional dependencies (the ``wsi`` extra) are imported where used: ``openslide`` (openslide-python +
openslide-bin) or ``tiffslide``, ``h5py``, ``scipy`` (tissue morphology), ``tifffile`` (test slides).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "WSIError",
    "SlideReadError",
    "NoTissueError",
    "MissingMPPError",
    "FeatureMismatchError",
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
    """A feature file does not match what the consumer expects (feature dim, backbone)."""


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
        """RGB ``(h, w, 3)`` uint8 of ``size`` (w, h) pixels of ``level`` at level-0 ``location`` (x, y)."""
        try:
            region = self._handle.read_region(tuple(int(v) for v in location), int(level), tuple(map(int, size)))
        except Exception as err:  # noqa: BLE001 - reader-specific exception types
            raise SlideReadError(
                f"slide {self.path}: reading {size} at {location}, level {level} failed ({type(err).__name__}: "
                f"{err}); the file may be truncated or corrupt"
            ) from err
        return _to_rgb(np.asarray(region))

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
    for name in readers:
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
        except Exception as err:  # noqa: BLE001 - each library raises its own types
            reasons.append(f"{name}: {type(err).__name__}: {err}")
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
    """Tiles ``(n, tile_size, tile_size, 3)`` uint8 for ``grid.coords[indices]``."""
    from PIL import Image

    coords = grid.coords if indices is None else grid.coords[indices]
    out = np.empty((len(coords), grid.tile_size, grid.tile_size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(coords):
        tile = slide.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size))
        if grid.read_size != grid.tile_size:
            tile = np.asarray(Image.fromarray(tile).resize((grid.tile_size, grid.tile_size), Image.BILINEAR))
        out[i] = tile
    return out


# --------------------------------------------------------------------------------------------------
# feature extraction


@contextmanager
def _atomic_h5(path: Path) -> Iterator[Any]:
    """Yield an h5py.File written to a temporary name next to ``path``; renamed only on success."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Embedder:
    """A zoo/timm backbone as a tile embedder: uint8 tiles ``(n, s, s, 3)`` -> features ``(n, D)``."""

    def __init__(
        self,
        backbone: str | Any,
        pretrained: bool = False,
        input_size: int | None = None,
        device: str = "cpu",
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import torch

        import zoo

        if isinstance(backbone, str):
            self.name = backbone
            kwargs = dict(backbone_kwargs or {})
            if kwargs.get("features_only"):
                model = zoo.create_model(backbone, pretrained=pretrained, **kwargs)
                self.features_only = True
            else:
                model = zoo.create_model(backbone, pretrained=pretrained, num_classes=0, **kwargs)
                self.features_only = False
        else:  # a module: pooled features from forward, or a list of maps (features_only)
            model, self.name = backbone, type(backbone).__name__
            self.features_only = hasattr(model, "feature_info") and hasattr(model, "return_layers")
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


@dataclass
class ExtractionReport:
    """What ``extract_features`` did: written, skipped (already done) and failed slides, timings."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tiles: int = 0
    read_s: float = 0.0
    embed_s: float = 0.0
    wall_s: float = 0.0

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        lines = [
            f"{len(self.written)} slide(s) written, {len(self.skipped)} already done (skipped), "
            f"{len(self.failed)} failed; {self.tiles} tiles in {self.wall_s:.1f} s ({self.tiles_per_s:.1f} tiles/s; "
            f"reading {self.read_s:.1f} s, embedding {self.embed_s:.1f} s)"
        ]
        lines += [f"  failed {name}: {reason}" for name, reason in self.failed.items()]
        return "\n".join(lines)


def slide_id_of(path: str | os.PathLike) -> str:
    """Slide id = file name without its suffix (``TCGA-XX.svs`` -> ``TCGA-XX``)."""
    return Path(path).stem


def _is_complete(h5_path: Path, backbone: str) -> bool:
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            return bool(f.attrs.get("complete", False)) and f.attrs.get("backbone") == backbone
    except OSError:
        return False  # unreadable (e.g. left by a crash of an old writer): redo it


def extract_features(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    backbone: str | Any = "resnet18",
    *,
    pretrained: bool = False,
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
    half-written file, and a rerun skips slides whose file is complete for the same backbone (resume).
    Tiles are read in a background thread while the previous batch is embedded.

    Args:
        slides: slide paths (the slide id is the file stem; ids must be unique).
        backbone: zoo/timm architecture name (pooled features, ``num_classes=0``; or
            ``backbone_kwargs={'features_only': True}``: the last map, average-pooled), or a module.
        tile_size, mpp, magnification, overlap, min_tissue, fallback_mpp: see ``tile_grid``.
        input_size: resize tiles to this before the backbone (ACMIL: 256-px tiles -> 224).
        on_error: ``'skip'`` counts and reports failing slides (unreadable, no tissue, no mpp) and goes on;
            ``'raise'`` stops at the first.

    Returns:
        ExtractionReport with written / skipped / failed slides and the read vs embed time split.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
    out_dir = Path(out_dir)
    ids = [slide_id_of(p) for p in slides]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"slide ids must be unique (file stems); duplicated: {sorted(dup)}")
    backbone_name = backbone if isinstance(backbone, str) else type(backbone).__name__
    report = ExtractionReport()
    start = time.perf_counter()
    embedder = None
    for path, sid in zip(slides, ids):
        target = out_dir / f"{sid}.h5"
        if not overwrite and target.exists() and _is_complete(target, backbone_name):
            report.skipped.append(sid)
            continue
        try:
            with open_slide(path, reader) as slide:
                thumb = slide.get_thumbnail(thumbnail_size)
                mask = detect_tissue(thumb)
                if not mask.any():
                    raise NoTissueError(f"slide {slide.path}: no tissue found on the thumbnail")
                grid = tile_grid(slide, tile_size, mpp, magnification, overlap, mask, min_tissue, fallback_mpp)
                if embedder is None:
                    embedder = _Embedder(backbone, pretrained, input_size, device, backbone_kwargs)
                feats = _embed_slide(slide, grid, embedder, batch_size, report, progress and len(grid) > batch_size)
                with _atomic_h5(target) as f:
                    f.create_dataset("features", data=feats.astype(np.float16 if float16 else np.float32))
                    f.create_dataset("coords", data=grid.coords)
                    f.create_dataset("thumbnail", data=thumb, compression="gzip")
                    f.create_dataset("tissue_mask", data=mask, compression="gzip")
                    f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
                    import zoo

                    f.attrs.update(
                        slide_id=sid,
                        slide_path=str(Path(path).resolve()),
                        backbone=backbone_name,
                        feature_dim=int(feats.shape[1]),
                        tile_size=grid.tile_size,
                        tile_size_level0=grid.size_level0,
                        target_mpp=grid.target_mpp if grid.target_mpp is not None else np.nan,
                        mpp=slide.mpp if slide.mpp is not None else np.nan,
                        read_level=grid.level,
                        downsample=grid.downsample,
                        vendor=slide.vendor,
                        reader=slide.reader,
                        dimensions=np.asarray(slide.dimensions),
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
) -> np.ndarray:
    """Features ``(N, D)`` of every tile of ``grid``; reading overlaps embedding (one reader thread)."""
    batches = [slice(i, min(i + batch_size, len(grid))) for i in range(0, len(grid), batch_size)]
    bar = None
    if progress:
        try:
            from zoo.train.metrics import Progress

            bar = Progress(len(batches), desc=f"embed {slide.name}")
        except ImportError:
            bar = None

    def read(batch: slice) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        tiles = read_tiles(slide, grid, batch)
        return tiles, time.perf_counter() - t0

    outputs = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0])
        for i in range(len(batches)):
            tiles, read_s = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            t0 = time.perf_counter()
            outputs.append(embedder(tiles))
            report.embed_s += time.perf_counter() - t0
            report.read_s += read_s
            report.tiles += len(tiles)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return np.concatenate(outputs)


def read_feature_file(path: str | os.PathLike) -> dict[str, Any]:
    """``features`` (N, D) float32, ``coords`` (N, 2), and the attributes of one slide's HDF5 file."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise FeatureMismatchError(f"feature file {path} is incomplete; rerun `zoo wsi extract`")
            out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            out["features"] = f["features"][()].astype(np.float32)
            out["coords"] = f["coords"][()]
            return out
    except OSError as err:
        raise FeatureMismatchError(f"feature file {path} cannot be read ({err})") from err


# --------------------------------------------------------------------------------------------------
# bags


class BagDataset:
    """Bags of slide features with labels from a CSV (``slide_id``, ``label`` columns; extra columns kept).

    ``ds[i] -> dict(features=(N, D) float32 tensor, label=int, slide_id=str, coords=(N, 2) ndarray)``.
    Rows whose feature file is missing are skipped, counted in ``missing`` and reported in one warning.
    Labels may be names (mapped to indices in sorted order, or in the order of ``classes``) or integers.

    Raises:
        FeatureMismatchError: a file's feature dim differs from ``in_dim`` (or from the first file's), or
            it was made by another ``backbone`` than asked; the message names the slide.
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
        import h5py

        self.feature_dir = Path(feature_dir)
        with open(labels_csv, newline="") as f:
            reader = csv.DictReader(f)
            missing_cols = {slide_col, label_col} - set(reader.fieldnames or [])
            if missing_cols:
                raise ValueError(f"label CSV {labels_csv} lacks column(s) {sorted(missing_cols)}")
            rows = list(reader)
        if slide_ids is not None:
            wanted = set(slide_ids)
            rows = [r for r in rows if r[slide_col] in wanted]
        raw_labels = [r[label_col] for r in rows]
        if classes is None:
            if all(v.lstrip("-").isdigit() for v in raw_labels):
                classes = [str(c) for c in sorted({int(v) for v in raw_labels})]
            else:
                classes = sorted(set(raw_labels))
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.records: list[dict[str, Any]] = []
        self.missing: list[str] = []
        for row in rows:
            sid, label = row[slide_col], row[label_col]
            path = self.feature_dir / f"{sid}.h5"
            if not path.is_file():
                self.missing.append(sid)
                continue
            key = str(int(label)) if label.lstrip("-").isdigit() else label
            if key not in index:
                raise ValueError(f"label CSV {labels_csv}: slide {sid} has label {label!r}, not in {self.classes}")
            with h5py.File(path, "r") as f:
                dim, file_backbone = int(f["features"].shape[1]), str(f.attrs.get("backbone", ""))
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
            self.records.append({**row, "slide_id": sid, "label": index[key], "path": path})
        self.in_dim = in_dim
        if self.missing:
            warnings.warn(
                f"{len(self.missing)} slide(s) of {labels_csv} have no feature file in {self.feature_dir} and "
                f"are skipped: {', '.join(self.missing[:10])}{' ...' if len(self.missing) > 10 else ''}",
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
            data = read_feature_file(rec["path"])
            self._cache[i] = dict(
                features=torch.from_numpy(data["features"]),
                label=rec["label"],
                slide_id=rec["slide_id"],
                coords=data["coords"],
            )
        return self._cache[i]


# --------------------------------------------------------------------------------------------------
# heatmaps


def _colormap(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue -> yellow -> red map for ``values`` in [0, 1]: ``(..., 3)`` uint8."""
    stops = np.array([[49, 54, 149], [116, 173, 209], [255, 255, 191], [244, 109, 67], [165, 0, 38]], np.float64)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    t = (pos - lo)[..., None]
    return (stops[lo] * (1 - t) + stops[lo + 1] * t).round().astype(np.uint8)


def attention_heatmap(
    feature_file: str | os.PathLike,
    attention: np.ndarray | Sequence[float],
    out_png: str | os.PathLike,
    alpha: float = 0.5,
    normalize: str = "rank",
) -> Path:
    """Draw per-tile ``attention`` ``(N,)`` over the slide thumbnail stored in ``feature_file``; write a PNG.

    ``normalize='rank'`` (percentiles, as CLAM's heatmaps) or ``'minmax'``. The PNG is written atomically.
    """
    import h5py
    from PIL import Image

    attention = np.asarray(attention, dtype=np.float64).ravel()
    with h5py.File(feature_file, "r") as f:
        thumb, coords = f["thumbnail"][()], f["coords"][()]
        size0 = int(f.attrs["tile_size_level0"])
        width0 = int(np.asarray(f.attrs["dimensions"])[0])
    if len(attention) != len(coords):
        raise ValueError(f"{feature_file}: {len(attention)} attention values for {len(coords)} tiles")
    if normalize == "rank":
        values = attention.argsort().argsort() / max(len(attention) - 1, 1)
    else:
        span = attention.max() - attention.min()
        values = (attention - attention.min()) / span if span > 0 else np.zeros_like(attention)
    h, w = thumb.shape[:2]
    scale = w / width0
    heat = np.zeros((h, w), np.float64)
    covered = np.zeros((h, w), np.float64)
    for (x, y), v in zip(coords, values):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = max(x0 + 1, int(math.ceil((x + size0) * scale))), max(y0 + 1, int(math.ceil((y + size0) * scale)))
        heat[y0:y1, x0:x1] += v
        covered[y0:y1, x0:x1] += 1
    has = covered > 0
    heat[has] /= covered[has]  # overlapping tiles: average
    colour = _colormap(heat).astype(np.float64)
    blend = thumb.astype(np.float64)
    blend[has] = (1 - alpha) * blend[has] + alpha * colour[has]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".png", dir=out_png.parent)
    os.close(fd)
    try:
        Image.fromarray(blend.round().astype(np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, out_png)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    (a slide without mpp).
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    aperio = aperio_magnification is not None  # Aperio marks reduced levels subfiletype 0 (tifffile relies on it)
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        prev = levels[-1]
        levels.append(np.asarray(Image.fromarray(prev).resize((prev.shape[1] // 2, prev.shape[0] // 2), Image.BOX)))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --------------------------------------------------------------------------------------------------
# cli


def _slides_from(args_slides: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in args_slides:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in SLIDE_SUFFIXES)
        else:
            paths.append(p)
    return paths


def _cmd_info(args: argparse.Namespace) -> int:
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
            print(f"error: {err}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    report = extract_features(
        _slides_from(args.slides), args.out, args.backbone, pretrained=args.pretrained,
        backbone_kwargs=json.loads(args.backbone_kwargs), tile_size=args.tile_size, mpp=args.mpp,
        magnification=args.magnification, overlap=args.overlap, min_tissue=args.min_tissue,
        fallback_mpp=args.fallback_mpp, input_size=args.input_size, batch_size=args.batch_size, device=args.device,
        reader=args.reader, overwrite=args.overwrite, on_error="raise" if args.strict else "skip",
    )  # fmt: skip
    print(report.summary())
    return 1 if report.failed else 0


def _cmd_heatmap(args: argparse.Namespace) -> int:
    attention = np.load(args.attention)
    print(attention_heatmap(args.features, attention, args.out, alpha=args.alpha))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``zoo wsi {info,extract,heatmap}`` to the ``zoo`` command's sub-parsers."""
    p = subparsers.add_parser("wsi", help="whole-slide images: info, tiling + feature extraction, heatmaps")
    sub = p.add_subparsers(dest="wsi_command", required=True)

    info = sub.add_parser("info", help="levels, mpp, vendor and reader of slides")
    info.add_argument("slides", nargs="+", help="slide files or folders")
    info.add_argument("--reader", default="auto", choices=["auto", "openslide", "tiffslide"], help="slide reader")
    info.set_defaults(func=_cmd_info)

    ex = sub.add_parser("extract", help="tile slides and write one HDF5 of backbone features per slide (resumable)")
    ex.add_argument("slides", nargs="+", help="slide files or folders")
    ex.add_argument("--out", required=True, help="folder of <slide_id>.h5 feature files")
    ex.add_argument("--backbone", default="resnet18", help="any zoo or timm architecture (pooled features)")
    ex.add_argument("--backbone-kwargs", default="{}", help="JSON kwargs, e.g. '{\"features_only\": true}'")
    ex.add_argument("--pretrained", action="store_true", help="load the backbone's weights")
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

    hm = sub.add_parser("heatmap", help="attention over the slide thumbnail as a PNG")
    hm.add_argument("features", help="the slide's .h5 feature file")
    hm.add_argument("attention", help=".npy of per-tile attention (N,)")
    hm.add_argument("--out", required=True, help="PNG path")
    hm.add_argument("--alpha", type=float, default=0.5, help="heat opacity")
    hm.set_defaults(func=_cmd_heatmap)
    return p
