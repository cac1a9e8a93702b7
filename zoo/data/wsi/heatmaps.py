"""Attention heatmaps: per-tile attention drawn over the slide thumbnail stored in its feature file.

The PNG needs only the feature file (thumbnail and tile coordinates), not the slide. Attention files are
``.npy`` arrays loaded without pickle. PIL and ``h5py`` are imported where used.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zoo._io import atomic_write

from .errors import FeatureFileError, one_line
from .features import _damaged_file_error

__all__ = ["HEATMAP_SCALES", "UNIFORM_SPREAD", "attention_heatmap", "load_attention"]

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
        raise ValueError(f"attention file {path} is truncated or not a .npy array ({one_line(err)})") from None
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
