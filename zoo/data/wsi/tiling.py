"""Tiling a slide at a target resolution and reading its tiles.

``tile_grid`` places ``tile_size`` tiles at a target mpp or magnification (level-0 pixels if neither), keeps
those with enough tissue and says which pyramid level to read them from; ``read_tiles`` reads them as RGB
arrays. ``read_tiles_skipping`` is the extraction's reader: a tile that cannot be decoded costs that tile,
not the slide.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import MissingMPPError, NoTissueError, SlideReadError
from .readers import Slide

__all__ = ["TileGrid", "tile_grid", "read_tiles", "read_tiles_skipping"]


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


def read_tiles_skipping(slide: Slide, grid: TileGrid, indices: slice) -> tuple[np.ndarray, np.ndarray, list[str]]:
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
