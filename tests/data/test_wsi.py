"""Whole-slide pipeline on real histology: pyramidal TIFFs written at test time from scikit-image's IHC image.

Readers (OpenSlide and tiffslide), tissue detection, tiling at a target mpp, resumable HDF5 extraction,
bags, heatmaps, bad input, and an ACMIL trained on slide mosaics that learns which slides hold DAB-positive
(stained gland) tiles.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from wsi_fixtures import write_pyramidal_tiff

pytest.importorskip("tifffile")
pytest.importorskip("h5py")
pytest.importorskip("scipy")
skdata = pytest.importorskip("skimage.data")

import zoo.heads.mil  # noqa: E402,F401  (registers the MIL heads until zoo.heads imports them)
from zoo.data import wsi  # noqa: E402  (explicit until zoo.data imports it)
from zoo.train import wsi_cli, wsi_extract  # noqa: E402

READERS = [r for r in ("openslide", "tiffslide") if __import__("importlib").util.find_spec(r) is not None]
pytestmark = pytest.mark.skipif(not READERS, reason="needs openslide-python+openslide-bin or tiffslide (wsi extra)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on shared cores: one thread is several times faster
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ihc_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """data.md recipe: IHC 512^2 upsampled 4x onto a 4096x3072 glass canvas, 4 levels, zlib; + Aperio copy."""
    from PIL import Image

    ihc = skdata.immunohistochemistry()
    canvas = np.full((3072, 4096, 3), 245, np.uint8)
    canvas[512:2560, 1024:3072] = np.asarray(Image.fromarray(ihc).resize((2048, 2048), Image.BICUBIC))
    folder = tmp_path_factory.mktemp("slides")
    generic = write_pyramidal_tiff(canvas, folder / "ihc.tif", mpp=0.5)
    aperio = write_pyramidal_tiff(canvas, folder / "ihc_aperio.svs", mpp=0.5, aperio_magnification=20)
    return generic, aperio, canvas


@pytest.mark.parametrize("reader", READERS)
def test_readers_agree_on_levels_mpp_and_pixels(ihc_slide, reader: str) -> None:
    generic, aperio, canvas = ihc_slide
    for path, vendor in ((generic, "generic-tiff"), (aperio, "aperio")):
        with wsi.open_slide(path, reader) as slide:
            assert slide.reader == reader and slide.level_count == 4
            assert slide.dimensions == (4096, 3072) and slide.mpp == pytest.approx(0.5)
            assert slide.level_downsamples == pytest.approx((1, 2, 4, 8))
            if vendor == "aperio" or reader == "openslide":
                assert slide.vendor == vendor
            if vendor == "aperio":
                assert slide.objective_power == 20
            tile = slide.read_region((1100, 600), 0, (64, 48))
            assert tile.shape == (48, 64, 3) and tile.dtype == np.uint8  # RGB for both readers
            np.testing.assert_array_equal(tile, canvas[600:648, 1100:1164])  # zlib: bit-exact
            assert slide.read_region((1100, 600), 2, (32, 32)).shape == (32, 32, 3)


def test_auto_reader_tissue_and_tiling(ihc_slide) -> None:
    generic, _, _ = ihc_slide
    with wsi.open_slide(generic) as slide:
        assert slide.reader == READERS[0]
        thumb = slide.get_thumbnail(512)
        assert thumb.shape == (384, 512, 3)
        mask = wsi.detect_tissue(thumb)
        # tissue only inside the pasted IHC square (thumb coords 64:320 x 128:384), and most of it found
        assert not mask[:60].any() and not mask[:, :120].any() and not mask[:, 390:].any()
        assert mask[64:320, 128:384].mean() > 0.5
        grid = wsi.tile_grid(slide, tile_size=256, mpp=1.0, tissue_mask=mask, min_tissue=0.5)
        assert (grid.level, grid.read_size, grid.size_level0) == (1, 256, 512)
        assert ((grid.coords >= [1024 - 512, 512 - 512]) & (grid.coords + 512 <= [3072 + 512, 2560 + 512])).all()
        overlapped = wsi.tile_grid(slide, tile_size=256, mpp=1.0, overlap=128, tissue_mask=mask, min_tissue=0.5)
        assert len(overlapped) > 2 * len(grid)
        mag = wsi.tile_grid(slide, tile_size=256, magnification=10, tissue_mask=mask, min_tissue=0.5)
        np.testing.assert_array_equal(mag.coords, grid.coords)  # 10x of a 20x/0.5 mpp scan = 1.0 mpp
        tiles = wsi.read_tiles(slide, grid, slice(0, 3))
        assert tiles.shape == (3, 256, 256, 3)


def _fade(image: np.ndarray, keep: float) -> np.ndarray:
    """Fade toward white, keeping ``keep`` of the stain: a pale, weakly stained or over-exposed section."""
    return (255 - keep * (255 - image.astype(np.float32))).round().astype(np.uint8)


def test_pale_tissue_is_found_next_to_dark_tissue(tmp_path: Path) -> None:
    """IHC at full stain (left) and faded to 20 % (right) on noisy glass: Otsu on saturation alone (with its
    floor of 15, the earlier detector) found none of the pale section; the luminance test finds it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    section = np.asarray(Image.fromarray(skdata.immunohistochemistry()).resize((768, 768), Image.BICUBIC))
    canvas = np.full((1536, 2048, 3), 245, np.uint8)
    canvas[384:1152, 128:896] = section
    canvas[384:1152, 1152:1920] = _fade(section, 0.2)
    canvas = np.clip(canvas + rng.normal(0, 1.5, canvas.shape), 0, 255).astype(np.uint8)
    path = write_pyramidal_tiff(canvas, tmp_path / "pale.tif", mpp=0.5)
    with wsi.open_slide(path) as slide:
        thumb = slide.get_thumbnail(512)  # 4x smaller: sections at rows 96:288, columns 32:224 and 288:480
        mask = wsi.detect_tissue(thumb)
        dark, pale = mask[96:288, 32:224].mean(), mask[96:288, 288:480].mean()
        assert dark > 0.9 and pale > 0.4, (dark, pale)  # the pale section's lumens are whiter than the glass
        outside = mask.copy()
        outside[90:294, 26:230] = outside[90:294, 282:486] = False
        assert not outside.any()
        grid = wsi.tile_grid(slide, tile_size=128, mpp=0.5, tissue_mask=mask, min_tissue=0.5)
        assert (grid.coords[:, 0] >= 1152).sum() > 10  # tiles of the pale section are kept
    # the same thumbnail with saturation only (no luminance test, the earlier floor): pale tissue is lost
    saturation_only = wsi.detect_tissue(thumb, min_saturation=15, min_darkening=255)
    assert saturation_only[96:288, 288:480].mean() < 0.05


@pytest.mark.parametrize(
    "name",
    ["white", "glass", "noisy_glass", "uneven_glass", "black"],
)
def test_blank_slides_have_no_tissue(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(1)
    shape = (768, 1024, 3)
    canvas = {
        "white": lambda: np.full(shape, 255.0),
        "glass": lambda: np.full(shape, 238.0),
        "noisy_glass": lambda: 244 + rng.normal(0, 3, shape),
        "uneven_glass": lambda: np.linspace(239, 249, shape[1])[None, :, None] + rng.normal(0, 1.5, shape),
        "black": lambda: np.zeros(shape),  # scanner padding / failed scan: not tissue either
    }[name]()
    path = write_pyramidal_tiff(np.clip(canvas, 0, 255).astype(np.uint8), tmp_path / f"{name}.tif", mpp=0.5)
    with wsi.open_slide(path) as slide:
        assert not wsi.detect_tissue(slide.get_thumbnail(512)).any()
    with pytest.raises(wsi.NoTissueError, match=f"{name}.tif: no tissue"):
        wsi_extract.extract_features([path], tmp_path / "feats", "test_resnet", random_weights=True, on_error="raise")


def test_bad_slides_are_named(tmp_path: Path, ihc_slide) -> None:
    generic, _, canvas = ihc_slide
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(generic.read_bytes()[: generic.stat().st_size // 3])
    with pytest.raises(wsi.SlideReadError, match="truncated.tif"):
        wsi.open_slide(truncated)
    (tmp_path / "text.svs").write_text("not a slide")
    with pytest.raises(wsi.SlideReadError, match="text.svs"):
        wsi.open_slide(tmp_path / "text.svs")
    no_mpp = write_pyramidal_tiff(canvas[::4, ::4].copy(), tmp_path / "no_mpp.tif", mpp=None)
    with wsi.open_slide(no_mpp) as slide:
        assert slide.mpp is None
        with pytest.raises(wsi.MissingMPPError, match="no_mpp.tif.*--fallback-mpp"):
            wsi.tile_grid(slide, 128, mpp=1.0)
        assert len(wsi.tile_grid(slide, 128, mpp=1.0, fallback_mpp=0.5)) > 0
    blank = write_pyramidal_tiff(np.full((512, 512, 3), 240, np.uint8), tmp_path / "blank.tif")
    with wsi.open_slide(blank) as slide:
        assert not wsi.detect_tissue(slide.get_thumbnail()).any()
    report = wsi_extract.extract_features(
        [blank, truncated], tmp_path / "feats", "test_resnet", random_weights=True, tile_size=64
    )
    assert report.written == [] and set(report.failed) == {"blank", "truncated"}
    assert "no tissue" in report.failed["blank"] and "truncated.tif" in report.failed["truncated"]
    assert list((tmp_path / "feats").glob("*")) == []
    with pytest.raises(wsi.NoTissueError, match="blank.tif"):
        wsi_extract.extract_features([blank], tmp_path / "feats", "test_resnet", random_weights=True, on_error="raise")


# ------------------------------------------------------------------------------------------------
# mosaic slides: the MIL task


def _ihc_tiles() -> tuple[np.ndarray, np.ndarray]:
    """data.md recipe: 32-px IHC tiles, DAB+ (>30 % of pixels with DAB > 0.08) vs stroma (< 5 %), x8 dihedral."""
    from skimage.color import rgb2hed

    ihc = skdata.immunohistochemistry()
    dab = rgb2hed(ihc)[..., 2] > 0.08
    pos, neg = [], []
    for y in range(0, 512, 32):
        for x in range(0, 512, 32):
            frac = dab[y : y + 32, x : x + 32].mean()
            tile = ihc[y : y + 32, x : x + 32]
            target = pos if frac > 0.3 else neg if frac < 0.05 else None
            if target is not None:
                target += [np.rot90(t, k) for t in (tile, tile[:, ::-1]) for k in range(4)]
    return np.stack(pos), np.stack(neg)


MOSAIC_EXTRACTION = dict(random_weights=True, tile_size=32, mpp=0.5, min_tissue=0.0)


@pytest.fixture(scope="module")
def mosaic_features(tmp_path_factory: pytest.TempPathFactory):
    """32 mosaic slides (8x8 cells of 64 px, mpp 0.25, 3 levels); positives hold 2-5 DAB+ cells."""
    pos, neg = _ihc_tiles()
    assert len(pos) == 1024 and len(neg) == 696  # data.md counts
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("mosaics")
    paths, rows = [], []
    for i in range(32):
        label = i % 2
        cells = neg[rng.choice(len(neg), 64)]
        if label:
            k = rng.integers(2, 6)
            cells[rng.choice(64, k, replace=False)] = pos[rng.choice(len(pos), k)]
        # each 32-px cell doubled to 64 px: level 0 at 0.25 mpp, the tiles are read at 0.5 mpp (level 1)
        mosaic = cells.reshape(8, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)
        mosaic = mosaic.repeat(2, 0).repeat(2, 1)
        paths.append(write_pyramidal_tiff(mosaic, folder / f"slide_{i:02d}.tif", mpp=0.25, tile=128, min_size=128))
        split = "test" if i >= 24 else "val" if i >= 20 else "train"
        rows.append(dict(slide_id=f"slide_{i:02d}", label=["normal", "stained"][label], split=split))
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    feats = folder / "features"
    report = wsi_extract.extract_features(
        paths,
        feats,
        "test_convnext",
        random_weights=True,
        tile_size=32,
        mpp=0.5,
        min_tissue=0.0,
        batch_size=64,
        thumbnail_size=256,
    )
    assert not report.failed, report.summary()
    print(report.summary())
    return paths, feats, labels, report


def test_extraction_layout_and_resume(mosaic_features, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    paths, feats, _, report = mosaic_features
    assert len(report.written) == 32 and report.tiles == 32 * 64
    with h5py.File(feats / "slide_00.h5", "r") as f:
        assert f["features"].shape == (64, 64) and f["features"].dtype == np.float16
        assert f["coords"].shape == (64, 2) and f["coords"][()].max() == 512 - 64
        assert f.attrs["backbone"] == "test_convnext" and f.attrs["read_level"] == 1 and f.attrs["complete"]
        assert f.attrs["mpp"] == 0.25 and f.attrs["target_mpp"] == 0.5 and f.attrs["tile_size_level0"] == 64
    # resume: a rerun redoes nothing
    again = wsi_extract.extract_features(paths, feats, "test_convnext", **MOSAIC_EXTRACTION)
    assert len(again.skipped) == 32 and not again.written
    # an interrupted run leaves no file (not even a partial one) for the slide it was writing
    out = tmp_path / "interrupted"
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = wsi_extract._embed_slide
    monkeypatch.setattr(wsi_extract, "_embed_slide", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        wsi_extract.extract_features(paths[:3], out, "test_convnext", **MOSAIC_EXTRACTION)
    assert sorted(p.name for p in out.iterdir()) == ["slide_00.h5"]
    monkeypatch.setattr(wsi_extract, "_embed_slide", real)
    resumed = wsi_extract.extract_features(paths[:3], out, "test_convnext", **MOSAIC_EXTRACTION)
    assert resumed.skipped == ["slide_00"] and resumed.written == ["slide_01", "slide_02"]


def test_bag_dataset_missing_slides_and_dim_mismatch(mosaic_features, tmp_path: Path) -> None:
    import h5py

    _, feats, labels, _ = mosaic_features
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(labels.read_text() + "slide_gone,stained,train\n")
    with pytest.warns(UserWarning, match="1 slide.*slide_gone"):
        ds = wsi.BagDataset(feats, csv_path)
    assert len(ds) == 32 and ds.missing == ["slide_gone"] and ds.classes == ["normal", "stained"]
    bag = ds[1]
    assert bag["features"].shape == (64, 64) and bag["label"] == 1 and bag["slide_id"] == "slide_01"
    with pytest.raises(wsi.FeatureMismatchError, match="slide_00.*64-d features.*128-d"):
        wsi.BagDataset(feats, labels, in_dim=128)
    other = tmp_path / "other"
    other.mkdir()
    with h5py.File(other / "slide_00.h5", "w") as f:
        f["features"] = np.zeros((3, 512), np.float16)
        f.attrs.update(backbone="resnet18", complete=True)
    (other / "slide_01.h5").write_bytes((feats / "slide_01.h5").read_bytes())
    with pytest.raises(wsi.FeatureMismatchError, match="slide_01"):
        wsi.BagDataset(other, labels)


def test_metrics_are_macro_f1_and_auc() -> None:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from zoo.train.mil import classification_metrics

    rng = np.random.default_rng(0)
    target = np.array([0] * 30 + [1] * 5 + [2] * 5)
    probs = rng.dirichlet(np.ones(3), size=40)
    probs[:25, 0] += 1.0
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(probs, target, 3)
    assert m["f1"] == pytest.approx(f1_score(target, probs.argmax(1), average="macro"))
    assert m["f1"] != pytest.approx(f1_score(target, probs.argmax(1), average="micro"))  # the ACMIL gotcha
    assert m["acc"] == pytest.approx(accuracy_score(target, probs.argmax(1)))
    assert m["auc"] == pytest.approx(roc_auc_score(target, probs, multi_class="ovr", average="macro"))
    binary = rng.random((20, 2))
    binary[:, 1] = np.round(binary[:, 1], 1)  # ties
    t2 = rng.integers(0, 2, 20)
    assert classification_metrics(binary, t2, 2)["auc"] == pytest.approx(roc_auc_score(t2, binary[:, 1]))


def test_acmil_learns_stained_slides(mosaic_features, tmp_path: Path) -> None:
    from zoo.train.mil import MILConfig, train_mil

    _, feats, labels, _ = mosaic_features
    cfg = MILConfig(
        features=str(feats), labels=str(labels), out=str(tmp_path / "run"), epochs=12, lr=1e-3, heatmaps=2,
        progress=False,
    )  # fmt: skip
    result = train_mil(cfg)
    assert result["classes"] == ["normal", "stained"] and len(result["splits"]["test"]) == 8
    print("ACMIL on IHC mosaics:", result)
    assert result["test"]["auc"] > 0.75  # chance is 0.5
    run = tmp_path / "run"
    assert (run / "metrics.csv").is_file() and (run / "checkpoints" / "ckpt_best.pt").is_file()
    pngs = sorted((run / "heatmaps").glob("*.png"))
    assert len(pngs) == 2
    from PIL import Image

    assert Image.open(pngs[0]).size == (256, 256 + 46)  # over the stored thumbnail, a colour bar below
    # resume after the last epoch: nothing to train, same result
    assert train_mil(MILConfig(**{**cfg.__dict__, "resume": "auto"}))["best_epoch"] == result["best_epoch"]


def test_cli_parsers() -> None:
    from zoo.train import mil as train_mil_module

    parser = argparse.ArgumentParser(prog="zoo")
    sub = parser.add_subparsers(dest="command")
    wsi_cli.add_cli(sub)
    train_mil_module.add_cli(sub)
    args = parser.parse_args(["wsi", "extract", "a.svs", "--out", "f", "--mpp", "0.5", "--backbone", "resnet18"])
    assert args.func is wsi_cli._cmd_extract and args.mpp == 0.5
    args = parser.parse_args(["mil", "train", "--features", "f", "--labels", "l.csv"])
    assert args.model == "acmil" and args.epochs == 50 and args.lr == 1e-4
