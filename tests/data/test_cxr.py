"""Chest X-ray readers: the real pydicom-data radiograph, synthetic DICOMs written at test time, PNG / JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from zoo.data import cxr  # noqa: E402  (explicit until zoo.data imports it)


def _rg1() -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm", download=False)  # never touches the network
    if path is None:
        pytest.skip("pydicom-data's RG1_UNCI.dcm is not installed (test extra: pip install pydicom-data)")
    return path


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    **elements: object,
) -> Path:
    """A minimal single-frame uint16 DICOM file (explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(h: int = 32, w: int = 48, top: int = 4000) -> np.ndarray:
    """Stored values increasing left to right, 0 ... top."""
    return np.tile(np.linspace(0, top, w).round().astype(np.uint16), (h, 1))


# ---- real chest radiograph ----------------------------------------------------------------------------------
def test_rg1_chest_xray_reads_monochrome1_inverted() -> None:
    path = _rg1()
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Modality == "CR"
    img = cxr.read_cxr(path)
    assert img.shape == (1955, 1841) and img.dtype == np.float32
    assert img.min() == 0.0 and img.max() == 1.0
    h, w = img.shape
    lung = img[int(0.30 * h) : int(0.45 * h), int(0.22 * w) : int(0.35 * w)].mean()
    mediastinum = img[int(0.55 * h) : int(0.70 * h), int(0.45 * w) : int(0.55 * w)].mean()
    # after MONOCHROME1 inversion air-filled lungs are dark and the mediastinum / spine bright
    assert lung + 0.1 < mediastinum
    # raw stored values are the other way round (the inversion really happened)
    raw = ds.pixel_array.astype(np.float32)
    assert (
        raw[int(0.30 * h) : int(0.45 * h), int(0.22 * w) : int(0.35 * w)].mean()
        > raw[int(0.55 * h) : int(0.70 * h), int(0.45 * w) : int(0.55 * w)].mean()
    )


def test_rg1_cxr3_inputs_and_load() -> None:
    path = _rg1()
    x_main, x_attn = cxr.cxr3_inputs(path)
    assert x_main.shape == (3, 480, 480) and 0.0 <= x_main.min() and x_main.max() <= 1.0
    assert x_attn.shape == (1, 256, 256)
    assert abs(x_attn.mean().item()) < 1e-4 and abs(x_attn.std(correction=0).item() - 1) < 1e-3
    x = cxr.load_cxr(path)  # default: 480, grayscale, standardised
    assert x.shape == (1, 480, 480) and abs(x.mean().item()) < 1e-4
    assert cxr.load_cxr(path, size=64, channels=3, normalize="unit").shape == (3, 64, 64)


# ---- synthetic DICOMs ---------------------------------------------------------------------------------------
def test_monochrome2_keeps_and_monochrome1_inverts(tmp_path: Path) -> None:
    ramp = _ramp()
    mono2 = cxr.read_dicom(_write_dicom(tmp_path / "m2.dcm", ramp, "MONOCHROME2"))
    mono1 = cxr.read_dicom(_write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1"))
    assert mono2[0, 0] == 0.0 and mono2[0, -1] == 1.0  # low stored value = dark
    assert mono1[0, 0] == 1.0 and mono1[0, -1] == 0.0  # low stored value = white
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_rescale_and_window_are_applied(tmp_path: Path) -> None:
    ramp = _ramp(top=4000)
    # window 1000 +- 500 (in rescaled units 2 * stored - 1000): stored <= 750 black, >= 1250 white
    path = _write_dicom(
        tmp_path / "win.dcm", ramp, RescaleSlope="2", RescaleIntercept="-1000", WindowCenter="1000", WindowWidth="1000"
    )
    img = cxr.read_dicom(path)
    stored = ramp[0]
    assert np.all(img[0, stored <= 740] == 0.0) and np.all(img[0, stored >= 1260] == 1.0)
    inside = (stored > 760) & (stored < 1240)
    assert inside.any() and np.all((img[0, inside] > 0) & (img[0, inside] < 1))
    # without VOI the whole modality range is kept (a linear ramp again)
    full = cxr.read_dicom(path, apply_voi=False)
    np.testing.assert_allclose(full[0], stored / stored.max(), atol=1e-5)


def test_unsupported_photometric_interpretation_names_the_file(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "palette.dcm", _ramp(), "PALETTE COLOR")
    with pytest.raises(cxr.CxrReadError, match=r"palette\.dcm.*PALETTE COLOR"):
        cxr.read_cxr(path)


def test_not_a_dicom_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom at all")
    with pytest.raises(cxr.CxrReadError, match="broken.dcm"):
        cxr.read_cxr(bad)
    with pytest.raises(cxr.CxrReadError, match="nothere.png"):
        cxr.read_cxr(tmp_path / "nothere.png")


def test_dicom_detected_by_preamble_without_suffix(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "image", _ramp(), "MONOCHROME2")
    assert cxr.read_cxr(path)[0, -1] == 1.0


# ---- PNG / JPEG -----------------------------------------------------------------------------------------------
def test_png_8bit_16bit_rgb_and_jpeg(tmp_path: Path) -> None:
    from PIL import Image

    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # (16, 64)
    Image.fromarray(gray).save(tmp_path / "g8.png")
    np.testing.assert_allclose(cxr.read_cxr(tmp_path / "g8.png"), gray / 255.0, atol=1e-6)
    g16 = (gray.astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(cxr.read_cxr(tmp_path / "g16.png"), g16 / 65535.0, atol=1e-6)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(cxr.read_cxr(tmp_path / "rgb.png"), gray / 255.0, atol=1e-2)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    jpg = cxr.read_cxr(tmp_path / "g.jpg")
    assert jpg.shape == gray.shape and np.abs(jpg - gray / 255.0).mean() < 0.02
    (tmp_path / "junk.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(cxr.CxrReadError, match="junk.png"):
        cxr.read_cxr(tmp_path / "junk.png")


def test_standardize_and_resize() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((50, 70)).astype(np.float32) * 3 + 5
    z = cxr.standardize(img)
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    t = cxr.standardize(torch.from_numpy(img))
    np.testing.assert_allclose(t.numpy(), z, atol=1e-4)
    assert not np.isnan(cxr.standardize(np.ones((4, 4), np.float32))).any()  # constant image: no NaN
    r = cxr.resize(img)
    assert r.shape == (1, 480, 480)
    assert cxr.resize(torch.from_numpy(img)[None].repeat(3, 1, 1), (32, 40)).shape == (3, 32, 40)
