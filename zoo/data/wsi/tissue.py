"""Tissue detection on a slide thumbnail: Otsu on HSV saturation plus a luminance test against the glass.

The luminance test keeps pale, faded or weakly stained tissue that Otsu on saturation alone puts with the
glass; floors tied to the glass's own noise keep a blank slide blank. ``scipy`` (the ``wsi`` extra) does
the morphology and is imported where used.
"""

from __future__ import annotations

import numpy as np

__all__ = ["detect_tissue"]


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
