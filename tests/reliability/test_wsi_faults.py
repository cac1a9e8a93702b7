"""Whole-slide pipeline on bad input: provenance, weight sources, heatmap honesty, corrupt tiles, unsafe bags,
unreadable slides, temporary files and file modes.

Every slide is the 512x512 IHC image of scikit-image written as a small pyramidal TIFF (16 tiles of 128 px);
the backbones are a one-layer module or timm's 0.4 M-parameter ``test_resnet``.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from wsi_fixtures import write_pyramidal_tiff

pytest.importorskip("tifffile")
h5py = pytest.importorskip("h5py")
pytest.importorskip("scipy")
skdata = pytest.importorskip("skimage.data")

from zoo._io import UnsafeFileError, UnsafePathError  # noqa: E402
from zoo.data import wsi  # noqa: E402
from zoo.data.wsi.heatmaps import _colormap  # noqa: E402
from zoo.train.wsi_extract import extract_features  # noqa: E402

READERS = [r for r in ("openslide", "tiffslide") if __import__("importlib").util.find_spec(r) is not None]
pytestmark = pytest.mark.skipif(not READERS, reason="needs openslide-python+openslide-bin or tiffslide (wsi extra)")

TILES = 16  # 512 / 128 squared
# one TIFF tile per extraction tile: level 0 at 0.5 mpp, 128-px tiles, no tissue threshold
SMALL = dict(tile_size=128, mpp=0.5, min_tissue=0.0, thumbnail_size=256, progress=False)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TinyNet(torch.nn.Module):
    """8-d pooled features of an 8x8 strided convolution: a backbone that costs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(-2, -1))


class Payload:
    """Any class: torch.load would need pickle to rebuild it."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ihc_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    return write_pyramidal_tiff(skdata.immunohistochemistry(), folder / "ihc.tif", mpp=0.5, tile=128, min_size=128)


@pytest.fixture(scope="module")
def features_h5(ihc_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    report = extract_features([ihc_slide], out, TinyNet(), **SMALL)
    assert report.written == ["ihc"], report.summary()
    return out / "ihc.h5"


def _features(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features"][()]


# ------------------------------------------------------------------------------------------------
# 1. provenance


def test_provenance_is_recorded_and_a_rerun_must_match_it(ihc_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    run = dict(SMALL, random_weights=True, input_size=64)
    extract_features([ihc_slide], out, "test_resnet", **run)
    h5 = out / "ihc.h5"
    with h5py.File(h5, "r") as f:
        attrs = dict(f.attrs)
    assert attrs["backbone"] == "test_resnet" and json.loads(attrs["backbone_kwargs"]) == {}
    assert attrs["weights"] == "random:seed=0" and attrs["input_size"] == 64 and attrs["tile_size"] == 128
    assert attrs["target_mpp"] == 0.5 and attrs["feature_dtype"] == "float16" and attrs["skipped_tiles"] == 0
    assert json.loads(attrs["provenance"]) == dict(
        backbone="test_resnet", backbone_kwargs={}, weights="random:seed=0", input_size=64, tile_size=128,
        target_mpp=0.5, target_magnification=None, feature_dtype="float16",
    )  # fmt: skip
    before = h5.read_bytes()
    assert extract_features([ihc_slide], out, "test_resnet", **run).skipped == ["ihc"]
    # the same folder asked for other weights / input size / dtype: refused, naming both values and the fix
    with pytest.raises(wsi.FeatureMismatchError, match=r'weights: stored "random:seed=0", requested "random:seed=1".*'
                       r"--overwrite.*another --out"):  # fmt: skip
        extract_features([ihc_slide], out, "test_resnet", **dict(run, seed=1))
    with pytest.raises(wsi.FeatureMismatchError, match="input_size: stored 64, requested 32"):
        extract_features([ihc_slide], out, "test_resnet", **dict(run, input_size=32))
    with pytest.raises(wsi.FeatureMismatchError, match='feature_dtype: stored "float16", requested "float32"'):
        extract_features([ihc_slide], out, "test_resnet", **run, float16=False)
    assert h5.read_bytes() == before  # nothing was touched
    report = extract_features([ihc_slide], out, "test_resnet", **dict(run, seed=1), overwrite=True)
    assert report.written == ["ihc"]
    with h5py.File(h5, "a") as f:
        assert f.attrs["weights"] == "random:seed=1"
        del f.attrs["provenance"]  # as an older zoo wrote it
    with pytest.raises(wsi.FeatureMismatchError, match="ihc.h5.*no provenance.*older zoo.*--overwrite"):
        extract_features([ihc_slide], out, "test_resnet", **dict(run, seed=1))


def test_weights_are_identified_by_tag_file_hash_or_state_dict(ihc_slide: Path, tmp_path: Path) -> None:
    import zoo

    torch.manual_seed(1)
    headless = zoo.create_model("test_resnet", num_classes=0)
    ckpt = tmp_path / "backbone.pth"
    torch.save(headless.state_dict(), ckpt)
    run = dict(SMALL, input_size=64)
    extract_features([ihc_slide], tmp_path / "ckpt", "test_resnet", checkpoint=ckpt, **run)
    with h5py.File(tmp_path / "ckpt" / "ihc.h5", "r") as f:
        assert f.attrs["weights"] == f"file:sha256:{_sha256(ckpt)}"
    # the same weights as a module: the same features (the checkpoint was loaded), identified by its state dict
    extract_features([ihc_slide], tmp_path / "module", headless, **run)
    with h5py.File(tmp_path / "module" / "ihc.h5", "r") as f:
        assert f.attrs["weights"].startswith("module:sha256:") and f.attrs["backbone"] == "ResNet"
    np.testing.assert_array_equal(_features(tmp_path / "ckpt" / "ihc.h5"), _features(tmp_path / "module" / "ihc.h5"))
    with torch.no_grad():
        headless.fc_norm = torch.nn.Identity()  # a changed module is another module
        next(headless.parameters()).add_(1.0)
    with pytest.raises(wsi.FeatureMismatchError, match="weights: stored .*module:sha256:"):
        extract_features([ihc_slide], tmp_path / "module", headless, **run)
    # pretrained weights from a local file: the cfg's tag and the file's hash
    full = tmp_path / "full.pth"
    torch.save(zoo.create_model("test_resnet").state_dict(), full)
    overlay = {"pretrained_cfg_overlay": {"file": str(full)}}
    extract_features([ihc_slide], tmp_path / "pre", "test_resnet", pretrained=True, backbone_kwargs=overlay, **run)
    with h5py.File(tmp_path / "pre" / "ihc.h5", "r") as f:
        weights = f.attrs["weights"]
    tag = zoo.get_pretrained_cfg("test_resnet").tag
    assert weights == f"pretrained:test_resnet.{tag}@sha256:{_sha256(full)}", weights
    # a checkpoint that needs pickle is refused; one of another shape is named with the fix
    payload = tmp_path / "payload.pth"
    torch.save({"state_dict": headless.state_dict(), "extra": Payload()}, payload)
    with pytest.raises(UnsafeFileError, match="payload.pth"):
        extract_features([ihc_slide], tmp_path / "bad", "test_resnet", checkpoint=payload, **run)
    with pytest.raises(ValueError, match="full.pth does not load into test_resnet.*fc.weight.*reset_classifier"):
        extract_features([ihc_slide], tmp_path / "bad", "test_resnet", checkpoint=full, **run)
    assert not list((tmp_path / "bad").glob("*.h5"))


# ------------------------------------------------------------------------------------------------
# 2. random weights only when asked for


def test_random_weights_need_the_flag_are_seeded_and_announced(
    ihc_slide: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    with pytest.raises(ValueError, match="test_resnet.*pretrained=True.*checkpoint=PATH.*random_weights=True"):
        extract_features([ihc_slide], tmp_path / "a", "test_resnet", **SMALL)
    with pytest.raises(ValueError, match="pretrained and random_weights were given together"):
        extract_features([ihc_slide], tmp_path / "a", "test_resnet", pretrained=True, random_weights=True)
    assert not (tmp_path / "a").exists()
    capfd.readouterr()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    report = extract_features([ihc_slide], tmp_path / "a", "test_resnet", random_weights=True, **SMALL)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the seeded build leaves the caller's RNG alone
    assert "RANDOM weights (random:seed=0)" in capfd.readouterr().err
    assert "RANDOM" in report.summary() and report.weights == "random:seed=0"
    torch.manual_seed(7)  # another global state: the same seed still gives the same network
    extract_features([ihc_slide], tmp_path / "b", "test_resnet", random_weights=True, **SMALL)
    extract_features([ihc_slide], tmp_path / "c", "test_resnet", random_weights=True, seed=1, **SMALL)
    a, b, c = (_features(tmp_path / d / "ihc.h5") for d in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------------------------------------
# 3. heatmaps


def _thumbnail(h5: Path) -> np.ndarray:
    with h5py.File(h5, "r") as f:
        return f["thumbnail"][()]


def test_heatmap_has_a_colour_bar_and_three_scales(features_h5: Path, tmp_path: Path) -> None:
    from PIL import Image

    thumb = _thumbnail(features_h5)
    h, w = thumb.shape[:2]
    png = wsi.attention_heatmap(features_h5, np.arange(TILES, dtype=float), tmp_path / "rank.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (h + 46, max(w, 220), 3)
    legend = image[h:].astype(int)
    bar_row = legend[17 + 6]
    assert np.abs(bar_row[8] - [49, 54, 149]).max() <= 3 and np.abs(bar_row[-9] - [165, 0, 38]).max() <= 3
    assert (legend[:15].sum(-1) < 200).any() and (legend[33:].sum(-1) < 200).any()  # title and scale labels

    # tile 0 (top-left) at 1.0, the others at 0.2..0.3: 'absolute' paints it red and the rest blue-ish,
    # 'minmax' paints it red too but the lowest tile deep blue, 'rank' does the same by order
    attention = np.linspace(0.2, 0.3, TILES)
    attention[0] = 1.0
    centre = (slice(16, 48), slice(16, 48))  # inside tile 0's 64x64 footprint on the thumbnail

    def tile_colour(scale: str, **kw) -> np.ndarray:
        out = wsi.attention_heatmap(features_h5, attention, tmp_path / f"{scale}.png", scale=scale, **kw)
        return np.asarray(Image.open(out).convert("RGB"))[:h, :w]

    def expected(value: float) -> np.ndarray:
        return 0.5 * thumb[centre] + 0.5 * _colormap(np.array(value)).astype(float)

    for scale in ("absolute", "minmax", "rank"):
        drawn = tile_colour(scale).astype(float)
        assert np.abs(drawn[centre] - expected(1.0)).max() <= 1, scale
    low = (slice(16, 48), slice(80, 112))  # tile 1 (second lowest value, 0.2 + 0.1/15)
    absolute = tile_colour("absolute").astype(float)
    assert np.abs(absolute[low] - (0.5 * thumb[low] + 0.5 * _colormap(np.array(0.2 + 0.1 / 15)))).max() <= 1
    halved = tile_colour("absolute", vmin=0.0, vmax=2.0).astype(float)
    assert np.abs(halved[centre] - expected(0.5)).max() <= 1
    with pytest.warns(UserWarning, match="1 of 16 attention values lie outside \\[0, 0.5\\]"):
        tile_colour("absolute", vmax=0.5)
    with pytest.raises(ValueError, match="scale='log'"):
        wsi.attention_heatmap(features_h5, attention, tmp_path / "x.png", scale="log")


def test_heatmap_warns_on_uniform_and_nan_attention_and_refuses_object_arrays(
    features_h5: Path, tmp_path: Path
) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    uniform = np.full(TILES, 1 / TILES) * (1 + 1e-4 * rng.standard_normal(TILES))
    with pytest.warns(UserWarning, match="ihc.h5: the attention is near uniform"):
        wsi.attention_heatmap(features_h5, uniform, tmp_path / "u.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wsi.attention_heatmap(features_h5, np.r_[2.0, np.ones(TILES - 1)], tmp_path / "peak.png")
    assert not [w for w in caught if "uniform" in str(w.message)]  # one tile at twice the rest is contrast

    thumb = _thumbnail(features_h5)
    attention = rng.random(TILES)
    attention[[0, 5]] = np.nan
    with pytest.warns(UserWarning, match="2 of 16 tiles have NaN or infinite attention and are not drawn"):
        png = wsi.attention_heatmap(features_h5, attention, tmp_path / "nan.png")
    drawn = np.asarray(Image.open(png).convert("RGB"))
    np.testing.assert_array_equal(drawn[2:62, 2:62], thumb[2:62, 2:62])  # tile 0 keeps the thumbnail
    assert not np.array_equal(drawn[2:62, 130:190], thumb[2:62, 130:190])  # tile 2 is drawn
    with pytest.raises(ValueError, match="ihc.h5.*NaN or infinite for all 16 tiles"):
        wsi.attention_heatmap(features_h5, np.full(TILES, np.nan), tmp_path / "all_nan.png")
    assert not (tmp_path / "all_nan.png").exists()

    pickled = tmp_path / "attention.npy"
    np.save(pickled, np.array([{"tile": i} for i in range(TILES)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="attention.npy holds pickled Python objects"):
        wsi.attention_heatmap(features_h5, pickled, tmp_path / "obj.png")
    (tmp_path / "text.npy").write_text("0.1 0.2")
    with pytest.raises(ValueError, match="text.npy is not a .npy array"):
        wsi.load_attention(tmp_path / "text.npy")


# ------------------------------------------------------------------------------------------------
# 4. one corrupt tile


def _corrupt_tile(slide: Path, out: Path, index: int) -> Path:
    """A copy of ``slide`` whose level-0 TIFF tile ``index`` holds random bytes (bad zlib data)."""
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        offset, count = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    data = bytearray(slide.read_bytes())
    data[offset + 8 : offset + count - 8] = np.random.default_rng(index).bytes(count - 16)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("reader", READERS)
def test_one_corrupt_tile_is_skipped_and_counted(
    ihc_slide: Path, tmp_path: Path, reader: str, capfd: pytest.CaptureFixture
) -> None:
    slide = _corrupt_tile(ihc_slide, tmp_path / "damaged.tif", index=5)  # x = 128, y = 128 on the 4x4 grid
    report = extract_features([slide], tmp_path / "feats", TinyNet(), reader=reader, **SMALL)
    assert report.written == ["damaged"] and not report.failed, report.summary()
    assert report.skipped_tiles == {"damaged": 1} and report.tiles == TILES - 1
    assert "1 unreadable tile(s) skipped in 1 slide(s)" in report.summary().splitlines()[0]
    assert "(128, 128)" in report.tile_errors["damaged"]
    with h5py.File(tmp_path / "feats" / "damaged.h5", "r") as f:
        assert f.attrs["skipped_tiles"] == 1 and f["features"].shape[0] == TILES - 1
        coords = f["coords"][()]
        assert len(coords) == len(f["tissue_fraction"]) == TILES - 1
    assert [128, 128] not in coords.tolist() and [256, 128] in coords.tolist()  # OpenSlide reads on after it
    gc.collect()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "never retrieved" not in err  # the readers' own noise is silenced


def test_a_slide_whose_every_tile_fails_is_a_failed_slide(
    ihc_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = wsi.Slide.read_region

    def tiles_fail(self, location, level, size):
        if level == 0:  # the tiles; the thumbnail comes from a reduced level
            raise wsi.SlideReadError(f"slide {self.path}: reading {size} at {location}, level 0 failed (test)")
        return real(self, location, level, size)

    monkeypatch.setattr(wsi.Slide, "read_region", tiles_fail)
    report = extract_features([ihc_slide], tmp_path / "feats", TinyNet(), **SMALL)
    assert report.written == [] and "none of its 16 tiles could be read" in report.failed["ihc"]
    assert not list((tmp_path / "feats").glob("*"))


# ------------------------------------------------------------------------------------------------
# 5. bags


def _labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label"])
        writer.writerows(rows)
    return path


def test_bag_dataset_confines_ids_and_names_empty_and_damaged_files(features_h5: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bags"
    folder.mkdir()
    good = features_h5.read_bytes()
    for sid in ("a", "b"):
        (folder / f"{sid}.h5").write_bytes(good)
    (tmp_path / "secret.h5").write_bytes(good)  # outside the feature folder
    assert len(wsi.BagDataset(folder, _labels(tmp_path / "ok.csv", [("a", "0"), ("b", "1")]))) == 2

    for bad_id in ("../secret", str(tmp_path / "secret"), "sub/a"):
        csv_path = _labels(tmp_path / "labels.csv", [("a", "0"), (bad_id, "1")])
        with pytest.raises(UnsafePathError, match="slide id .*labels.csv line 3"):
            wsi.BagDataset(folder, csv_path)

    with h5py.File(folder / "empty.h5", "w") as f:
        f["features"], f["coords"] = np.zeros((0, 8), np.float16), np.zeros((0, 2), np.int64)
        f.attrs["complete"] = True
    (folder / "truncated.h5").write_bytes(good[:2048])
    (folder / "noise.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    with h5py.File(folder / "nofeatures.h5", "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)
        f.attrs["complete"] = True
    cases = {
        "empty": "slide empty: feature file .*empty.h5 holds 0 tiles",
        "truncated": "slide truncated: feature file .*truncated.h5 is damaged",
        "noise": "slide noise: feature file .*noise.h5 is damaged",
        "nofeatures": "slide nofeatures: feature file .*nofeatures.h5 has no 'features' dataset",
    }
    for sid, message in cases.items():
        with pytest.raises(wsi.FeatureFileError, match=message):
            wsi.BagDataset(folder, _labels(tmp_path / f"{sid}.csv", [("a", "0"), (sid, "1")]))

    # two files made with other weights (same backbone name, same dim): not one bag set
    with h5py.File(folder / "b.h5", "a") as f:
        record = json.loads(f.attrs["provenance"])
        f.attrs["provenance"] = json.dumps(dict(record, weights="random:seed=3"))
    with pytest.raises(wsi.FeatureMismatchError, match="slide b: .* and slide a: .*extracted differently.*weights"):
        wsi.BagDataset(folder, tmp_path / "ok.csv")


# ------------------------------------------------------------------------------------------------
# 6. zoo wsi info


def test_wsi_info_exits_1_with_one_line_per_unreadable_slide(
    ihc_slide: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from zoo.cli import main

    data = ihc_slide.read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 3])
    (tmp_path / "noise.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    capfd.readouterr()
    rc = main(["wsi", "info", str(ihc_slide), str(tmp_path / "truncated.tif"), str(tmp_path / "noise.svs")])
    gc.collect()  # failed reader tasks would log their tracebacks now
    out, err = capfd.readouterr()
    assert rc == 1
    assert [json.loads(line)["slide"] for line in out.splitlines()] == [str(ihc_slide)]
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert "truncated.tif" in lines[0] and "noise.svs" in lines[1]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# 7. temporary files and modes


def test_leftover_temporaries_are_removed_and_files_get_normal_modes(
    ihc_slide: Path, features_h5: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats"
    out.mkdir()
    leftover = out / ".ihc.h5.999999.k2j4x8ab.partial"  # a run killed mid-write (pid 999999 is gone)
    leftover.write_bytes(b"half an HDF5 file")
    extract_features([ihc_slide], out, TinyNet(), **SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["ihc.h5"]
    png = wsi.attention_heatmap(out / "ihc.h5", np.arange(TILES, dtype=float), tmp_path / "heat.png")
    tiff = write_pyramidal_tiff(np.full((256, 256, 3), 200, np.uint8), tmp_path / "small.tif", min_size=256)
    for path in (out / "ihc.h5", png, tiff):
        assert path.stat().st_mode & 0o777 == _file_mode(), path
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
