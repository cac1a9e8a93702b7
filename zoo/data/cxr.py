"""Chest X-ray readers and preprocessing (MEDUSA / COVID-Net CXR-3 input contract).

* :func:`read_dicom` -- pydicom: modality LUT (rescale slope / intercept or a Modality LUT Sequence), VOI LUT
  or window centre / width, MONOCHROME1 inversion (bone bright), display-normalised to ``[0, 1]``;
  anything but MONOCHROME1 / MONOCHROME2 single-frame images raises :class:`CxrReadError` naming the file.
* :func:`read_image` -- PNG / JPEG (8- or 16-bit, gray or colour -> luminance) to ``[0, 1]``.
* :func:`read_cxr` -- either, by content (DICOM preamble ``DICM``) or suffix.
* :func:`check_cxr` -- the same checks from the header only (no pixel decoding), to vet a data set up front.
* :func:`standardize` -- per-image z-score (subtract the image's own mean, divide by its own std), as
  CXR-3's MEDUSA input; :func:`resize` -- antialiased bilinear to a square side (480 by default).
* :func:`load_cxr` -- file -> ``(C, size, size)`` float tensor; :func:`cxr3_inputs` -- file -> the two
  CXR-3 inputs (main ``(3, 480, 480)`` in ``[0, 1]``, attention ``(1, 256, 256)`` z-scored).

Images are ``(H, W)`` float32 numpy arrays until converted to tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CxrReadError",
    "UnsupportedPhotometricError",
    "SUPPORTED_PHOTOMETRIC",
    "read_dicom",
    "read_image",
    "read_cxr",
    "check_cxr",
    "standardize",
    "resize",
    "load_cxr",
    "cxr3_inputs",
]

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


class CxrReadError(ValueError):
    """A chest X-ray file that cannot be read or is not a single-frame grayscale image; names the file."""


class UnsupportedPhotometricError(CxrReadError):
    """A readable DICOM whose PhotometricInterpretation is not MONOCHROME1 / MONOCHROME2 (e.g. RGB, PALETTE)."""


def _check_dicom_header(ds: object, path: Path) -> str:
    """Photometric interpretation of a grayscale single-frame dataset; raises for anything else."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedPhotometricError(
            f"{path}: unsupported PhotometricInterpretation {photometric or '(missing)'!r}; "
            f"chest X-ray reader handles {', '.join(SUPPORTED_PHOTOMETRIC)} (convert the file to grayscale "
            "or drop it from the list)"
        )
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise CxrReadError(f"{path}: {frames} frames; expected a single-frame radiograph")
    return photometric


def _unit_range(img: np.ndarray) -> np.ndarray:
    """Min-max to ``[0, 1]`` (a constant image becomes zeros). ``(H, W)`` -> ``(H, W)`` float32."""
    img = img.astype(np.float32, copy=False)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros_like(img)
    return (img - lo) / (hi - lo)


def read_dicom(path: str | Path, apply_voi: bool = True) -> np.ndarray:
    """Read a grayscale radiograph from DICOM as display values in ``[0, 1]``, bone bright.

    Order (DICOM PS3.3 C.11 pipeline): stored values -> modality LUT (Rescale Slope / Intercept, or a
    Modality LUT Sequence) -> VOI LUT Sequence, else Window Center / Width (``apply_voi``) -> min-max to
    ``[0, 1]`` -> ``1 - x`` for MONOCHROME1 (where the minimum is white).

    Args:
        path: DICOM file.
        apply_voi: apply the file's VOI LUT / window; ``False`` keeps the full modality range.
    Returns:
        ``(H, W)`` float32 in ``[0, 1]``.
    Raises:
        CxrReadError: unreadable file, no pixel data, unsupported photometric interpretation, multi-frame.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types (InvalidDicomError, OSError, struct errors)
        raise CxrReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    photometric = _check_dicom_header(ds, path)
    if "PixelData" not in ds:
        raise CxrReadError(f"{path}: no PixelData")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # missing decoder for a compressed transfer syntax, truncated data...
        raise CxrReadError(f"{path}: cannot decode pixel data ({exc})") from exc
    if pixels.ndim != 2:
        raise CxrReadError(f"{path}: pixel array of shape {pixels.shape}; expected (rows, columns)")
    img = apply_modality_lut(pixels, ds)
    if apply_voi:
        img = apply_voi_lut(img, ds, index=0, prefer_lut=True)
    img = _unit_range(np.asarray(img, dtype=np.float32))
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG / JPEG (8- or 16-bit; colour converted to luminance) as ``(H, W)`` float32 in ``[0, 1]``.

    Values are scaled by the bit depth (255 or 65535), not per image, so exported windows are kept.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
                scale = 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise CxrReadError(f"{path}: not a readable image ({exc})") from exc
    return np.clip(arr / scale, 0.0, 1.0)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_cxr(path: str | Path, apply_voi: bool = True) -> np.ndarray:
    """DICOM (by suffix or ``DICM`` preamble) or PNG / JPEG -> ``(H, W)`` float32 in ``[0, 1]``, bone bright."""
    path = Path(path)
    if not path.is_file():
        raise CxrReadError(f"{path}: no such file")
    return read_dicom(path, apply_voi=apply_voi) if _is_dicom(path) else read_image(path)


def check_cxr(path: str | Path) -> str:
    """Header-only version of :func:`read_cxr`'s checks; returns ``'dicom'`` or ``'image'``.

    Raises:
        CxrReadError: missing file, not a DICOM / PNG / JPEG, multi-frame DICOM (truncated pixel data is only
            found by :func:`read_cxr`).
        UnsupportedPhotometricError: a DICOM that is not MONOCHROME1 / MONOCHROME2.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrReadError(f"{path}: no such file")
    if _is_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types (InvalidDicomError, OSError, struct errors)
            raise CxrReadError(f"{path}: not a readable DICOM file ({exc})") from exc
        _check_dicom_header(ds, path)
        return "dicom"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as exc:
        raise CxrReadError(f"{path}: not a readable image ({exc})") from exc
    return "image"


def standardize(img: np.ndarray | torch.Tensor, eps: float = 1e-6) -> np.ndarray | torch.Tensor:
    """Per-image z-score: ``(x - mean(x)) / std(x)`` over the whole image (population std, floored at eps)."""
    if isinstance(img, torch.Tensor):
        return (img - img.mean()) / img.std(correction=0).clamp_min(eps)
    img = np.asarray(img, dtype=np.float32)
    return (img - img.mean()) / max(float(img.std()), eps)


def resize(img: np.ndarray | torch.Tensor, size: int | tuple[int, int] = 480) -> torch.Tensor:
    """Antialiased bilinear resize. ``(H, W)`` or ``(C, H, W)`` -> ``(C, *size)`` float32 tensor (C=1 for 2-D)."""
    t = torch.as_tensor(np.ascontiguousarray(img) if isinstance(img, np.ndarray) else img, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def load_cxr(
    path: str | Path, size: int | tuple[int, int] = 480, channels: int = 1, normalize: str = "standardize"
) -> torch.Tensor:
    """File -> model input ``(channels, *size)``.

    Args:
        path: DICOM, PNG or JPEG.
        size: output side (480: COVID-Net / MEDUSA main input).
        channels: 1 (grayscale) or 3 (the gray image repeated, for RGB backbones).
        normalize: ``'standardize'`` (per-image z-score, after resizing) or ``'unit'`` (keep ``[0, 1]``).
    """
    if normalize not in ("standardize", "unit"):
        raise ValueError(f"normalize must be 'standardize' or 'unit', got {normalize!r}")
    x = resize(read_cxr(path), size)
    if normalize == "standardize":
        x = standardize(x)
    return x.expand(channels, -1, -1).contiguous() if channels != 1 else x


def cxr3_inputs(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The two inputs of COVID-Net CXR-3 / :class:`zoo.models.medusa.Medusa` ``forward(x, x_attn)``.

    Returns:
        ``x_main`` ``(3, 480, 480)`` in ``[0, 1]`` (no top crop, no central crop, as CXR-3) and ``x_attn``
        ``(1, 256, 256)`` grayscale z-scored per image.
    """
    img = read_cxr(path)
    x_main = resize(img, 480).expand(3, -1, -1).contiguous()
    x_attn = standardize(resize(img, 256))
    return x_main, x_attn
