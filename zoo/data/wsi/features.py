"""The feature store: one HDF5 file of tile features per slide, its layout, checks and provenance.

``zoo wsi extract`` writes these files (each under a temporary name, renamed when complete: ``atomic_h5``);
bags, heatmaps and reruns of the extraction read them here. Every reader checks the layout first, so a
damaged, unfinished or foreign file is one ``FeatureFileError`` naming the slide and the file, never an
h5py traceback. ``h5py`` (the ``wsi`` extra) is imported where used.

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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from zoo._io import atomic_write

from .errors import FeatureFileError, one_line

__all__ = [
    "atomic_h5",
    "slide_id_of",
    "stored_provenance",
    "describe_diff",
    "read_feature_file",
]


@contextmanager
def atomic_h5(path: Path) -> Iterator[Any]:
    """Yield an h5py.File written to a temporary ``.partial`` name next to ``path``; renamed only on success."""
    import h5py

    # h5py closes (inner) before atomic_write syncs, sets the mode and renames (outer)
    with atomic_write(path, suffix=".partial") as tmp, h5py.File(tmp, "w") as f:
        yield f


def _parse_provenance(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        value = json.loads(text)
    except ValueError:
        return {"provenance": text}  # unparseable: compares unequal to any real record
    return value if isinstance(value, dict) else {"provenance": value}


def describe_diff(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> str:
    """``"key: <a_name> <a value>, <b_name> <b value>"`` for each key whose values differ, joined by '; '."""
    return "; ".join(
        f"{key}: {a_name} {json.dumps(a.get(key))}, {b_name} {json.dumps(b.get(key))}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    )


def slide_id_of(path: str | os.PathLike) -> str:
    """Slide id = file name without its suffix (``TCGA-XX.svs`` -> ``TCGA-XX``)."""
    return Path(path).stem


def stored_provenance(h5_path: Path) -> tuple[bool, dict[str, Any] | None]:
    """(complete, provenance) of an existing feature file; an unreadable one is (False, None): redone."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            return bool(f.attrs.get("complete", False)), _parse_provenance(f.attrs.get("provenance"))
    except OSError:
        return False, None  # unreadable (e.g. left by a crash of an old writer): redo it


def _damaged_file_error(path: Path, name: str, err: BaseException) -> FeatureFileError:
    size = f"{path.stat().st_size} bytes; " if path.is_file() else ""
    return FeatureFileError(
        f"{name} is damaged or not an HDF5 feature file ({size}{type(err).__name__}: {one_line(err)}); extract "
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
