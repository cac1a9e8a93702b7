"""Whole-slide images, the data side: reading, tissue detection, tiling, the feature store, bags, heatmaps.

Pipeline (``zoo wsi ...`` wraps each step; extraction runs a backbone, so it is a task in the task layer)::

    open_slide(path)                      OpenSlide, falling back to tiffslide; one adapter (RGB arrays, mpp)
    detect_tissue(thumbnail)              Otsu on HSV saturation + a luminance test against the glass (pale
                                          tissue), closing, small components removed
    tile_grid(slide, tile_size, mpp=...)  level-0 coordinates at a target mpp or magnification
    (feature extraction)                  batched, one HDF5 per slide, written atomically and resumable; the
                                          layout is in ``zoo.data.wsi.features``
    BagDataset(feature_dir, labels_csv)   bags (N, D) + labels for ``zoo mil train``
    attention_heatmap(h5, attention, png) attention over the slide thumbnail

Modules: ``readers`` (slides), ``tissue``, ``tiling``, ``features`` (HDF5 layout, checks, provenance),
``bags``, ``heatmaps``, ``errors``. Nothing here builds a model. Optional dependencies (the ``wsi`` extra)
are imported where used: ``openslide`` (openslide-python + openslide-bin) or ``tiffslide``, ``h5py``,
``scipy`` (tissue morphology).
"""

from __future__ import annotations

from .bags import BagDataset
from .errors import (
    FeatureFileError,
    FeatureMismatchError,
    MissingMPPError,
    NoTissueError,
    SlideReadError,
    WSIError,
)
from .features import read_feature_file, slide_id_of
from .heatmaps import HEATMAP_SCALES, UNIFORM_SPREAD, attention_heatmap, load_attention
from .readers import SLIDE_SUFFIXES, Slide, open_slide
from .tiling import TileGrid, read_tiles, tile_grid
from .tissue import detect_tissue

__all__ = [
    "WSIError",
    "SlideReadError",
    "NoTissueError",
    "MissingMPPError",
    "FeatureMismatchError",
    "FeatureFileError",
    "SLIDE_SUFFIXES",
    "Slide",
    "open_slide",
    "detect_tissue",
    "TileGrid",
    "tile_grid",
    "read_tiles",
    "slide_id_of",
    "read_feature_file",
    "BagDataset",
    "HEATMAP_SCALES",
    "UNIFORM_SPREAD",
    "attention_heatmap",
    "load_attention",
]
