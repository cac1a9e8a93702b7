"""``zoo finetune --task cxr`` on a tiny chest-X-ray-style data set built at test time from real images.

Images: crops of scikit-image's ``camera`` (8-bit PNG) and ``moon`` (JPEG / 16-bit PNG) photographs and of
pydicom-data's real PA chest radiograph ``RG1_UNCI.dcm`` (written back as MONOCHROME1 DICOM crops; the
original file is in the list too), or of scikit-image's ``retina`` as MONOCHROME2 DICOM crops when
pydicom-data is absent. The rule to learn is which source a crop comes from (3 classes, chance 1/3);
patients are groups of 3 crops, and splits keep a patient's crops together.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
skdata = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from zoo.data import cxr  # noqa: E402
from zoo.train import finetune  # noqa: E402
from zoo.train.data import DataError  # noqa: E402

SIZE = 48  # training resolution
# MEDUSA small enough for CI on a busy 2-core machine: timm's test_resnet backbone (0.4 M parameters) and a
# 24-px, 2-level attention body; the full medusa_resnet18 takes seconds per step there
TINY_MEDUSA = dict(backbone="test_resnet", attn_size=SIZE // 2, body_widths=(8, 16, 16), body_attn_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on shared cores: one thread is several times faster
    yield
    torch.set_num_threads(threads)


def _rg1() -> str | None:
    from pydicom.data import get_testdata_file

    return get_testdata_file("RG1_UNCI.dcm", download=False)  # None when pydicom-data is absent; no network


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 16) -> Path:
    """A minimal single-frame uint16 (or 3-sample uint8 for RGB) DICOM file, explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _crop(image: np.ndarray, rng: np.random.Generator, out: int = 96) -> np.ndarray:
    """A random square crop of 40-60 % of the short side, resized to ``out`` (float, the image's own range)."""
    h, w = image.shape
    side = int(min(h, w) * rng.uniform(0.4, 0.6))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    patch = image[y : y + side, x : x + side].astype(np.float32)
    return np.asarray(Image.fromarray(patch).resize((out, out), Image.BILINEAR))


def build_dataset(folder: Path, per_class: int = 24, seed: int = 0) -> tuple[Path, list[str]]:
    """Write the images and ``labels.csv`` (path, label, patient_id); returns the CSV and the class list."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rg1 = _rg1()
    if rg1 is not None:  # stored values, MONOCHROME1 (bright = air): crops keep the file's own encoding
        xray_name, xray, xray_photometric = "xray", pydicom.dcmread(rg1).pixel_array, "MONOCHROME1"
    else:
        xray_name, xray_photometric = "retina", "MONOCHROME2"
        xray = (skdata.retina().astype(np.float32) @ [0.299, 0.587, 0.114] * 16).astype(np.uint16)
    sources = {"camera": skdata.camera(), "moon": skdata.moon(), xray_name: xray}
    rows = []
    for label, image in sources.items():
        for i in range(per_class):
            patch = _crop(image, rng)
            name = folder / f"{label}_{i:02d}"
            if label == "camera":
                path = name.with_suffix(".png")
                Image.fromarray(patch.clip(0, 255).astype(np.uint8)).save(path)
            elif label == "moon" and i % 2:
                path = name.with_suffix(".jpg")
                Image.fromarray(patch.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            elif label == "moon":
                path = name.with_suffix(".png")  # 16-bit PNG
                Image.fromarray((patch.clip(0, 255) * 257).astype(np.uint16)).save(path)
            else:
                path = write_dicom(name.with_suffix(".dcm"), patch.clip(0, 32767), xray_photometric, bits_stored=15)
            rows.append(dict(path=path.name, label=label, patient_id=f"{label}-{i // 3}"))
    if rg1 is not None:  # the real radiograph itself (1955x1841, 15-bit MONOCHROME1), linked into the folder
        (folder / "rg1_unci.dcm").symlink_to(rg1)  # CSV paths stay inside their folder: no absolute paths
        rows.append(dict(path="rg1_unci.dcm", label="xray", patient_id="xray-real"))
    csv_path = folder / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, sorted(sources)


def tiny_config(csv_path: Path, out: Path, **overrides) -> finetune.FinetuneConfig:
    base = dict(
        data=str(csv_path), out=str(out), model="medusa_resnet18", model_kwargs=dict(TINY_MEDUSA), img_size=SIZE,
        epochs=4, batch_size=8, lr=1e-3, val_frac=0.25, test_frac=0.25, workers=0, cache_images=True,
        progress=False, seed=0,
    )  # fmt: skip
    base.update(overrides)
    return finetune.FinetuneConfig(**base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return build_dataset(tmp_path_factory.mktemp("cxr"))


# ---- metrics ------------------------------------------------------------------------------------------------
def test_per_class_metrics_on_a_hand_made_confusion_matrix() -> None:
    # rows = true class, columns = predicted; 25 images
    confusion = np.array([[5, 2, 1], [1, 6, 0], [0, 3, 7]])
    m = finetune.per_class_metrics(confusion)
    np.testing.assert_array_equal(m["tp"], [5, 6, 7])
    np.testing.assert_array_equal(m["fn"], [3, 1, 3])
    np.testing.assert_array_equal(m["fp"], [1, 5, 1])
    np.testing.assert_array_equal(m["tn"], [16, 13, 14])
    np.testing.assert_array_equal(m["support"], [8, 7, 10])
    np.testing.assert_allclose(m["sensitivity"], [5 / 8, 6 / 7, 7 / 10])
    np.testing.assert_allclose(m["ppv"], [5 / 6, 6 / 11, 7 / 8])
    np.testing.assert_allclose(m["specificity"], [16 / 17, 13 / 18, 14 / 15])
    np.testing.assert_allclose(m["accuracy"], [21 / 25, 19 / 25, 21 / 25])
    np.testing.assert_allclose(m["f1"], [10 / 14, 12 / 18, 14 / 18])
    # the same through the report, against scikit-learn on the expanded labels
    from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

    target = np.repeat(np.repeat(np.arange(3), 3), confusion.ravel())
    pred = np.repeat(np.tile(np.arange(3), 3), confusion.ravel())
    rng = np.random.default_rng(0)
    probs = np.eye(3)[pred] * 2 + rng.random((len(pred), 3))
    probs /= probs.sum(1, keepdims=True)
    report = finetune.evaluate_predictions(probs, target, ["a", "b", "c"], multi_label=False)
    assert report["confusion"] == confusion.tolist() and report["n"] == 25
    precision, recall, f1, support = precision_recall_fscore_support(target, pred)
    for i, c in enumerate("abc"):
        pc = report["per_class"][c]
        assert (pc["ppv"], pc["sensitivity"], pc["f1"], pc["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i])
        )
        assert pc["auc"] == pytest.approx(roc_auc_score(target == i, probs[:, i]))
    assert report["accuracy"] == pytest.approx(18 / 25)
    assert report["f1"] == pytest.approx(f1_score(target, pred, average="macro"))
    assert report["auc"] == pytest.approx(roc_auc_score(target, probs, multi_class="ovr", average="macro"))


def test_undefined_metrics_are_nan_and_multilabel_counts() -> None:
    # class 2 never predicted (PPV undefined) and absent (sensitivity, AUC undefined)
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    report = finetune.evaluate_predictions(probs, np.array([0, 1, 1]), ["a", "b", "c"], multi_label=False)
    c = report["per_class"]["c"]
    assert np.isnan(c["ppv"]) and np.isnan(c["sensitivity"]) and np.isnan(c["auc"])
    assert c["specificity"] == 1.0 and c["f1"] == 0.0  # scikit-learn's zero_division=0
    assert report["macro"]["ppv"] == pytest.approx((1 / 2 + 1) / 2)  # NaN classes left out of the mean
    # multi-label: per label 2x2 counts, mean label accuracy and exact match
    target = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    probs = np.array([[0.7, 0.2], [0.4, 0.9], [0.1, 0.6], [0.2, 0.8]])
    report = finetune.evaluate_predictions(probs, target, ["x", "y"], multi_label=True, threshold=0.5)
    x, y = report["per_class"]["x"], report["per_class"]["y"]
    assert (x["tp"], x["fp"], x["fn"], x["tn"]) == (1, 0, 1, 2)
    assert (y["tp"], y["fp"], y["fn"], y["tn"]) == (2, 1, 0, 1)
    assert x["sensitivity"] == 0.5 and x["ppv"] == 1.0 and y["ppv"] == pytest.approx(2 / 3)
    assert report["accuracy"] == pytest.approx((3 / 4 + 3 / 4) / 2) and report["exact_match"] == 0.5
    assert "confusion" not in report


# ---- training -----------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_finetune_learns_the_source_and_reports_per_class(dataset, tmp_path: Path) -> None:
    csv_path, classes = dataset
    start = time.perf_counter()
    cfg = tiny_config(csv_path, tmp_path / "run", epochs=8, keep_last=0)
    result = finetune.finetune_cxr(cfg)
    print(f"fine-tuning took {time.perf_counter() - start:.1f} s; test:", json.dumps(result["test"]["macro"]))
    assert result["classes"] == classes and result["multi_label"] is False and result["bad_inputs"] == 0
    # splits by patient: no patient's crops in two splits
    patient = {str(csv_path.parent / r["path"]) if not Path(r["path"]).is_absolute() else r["path"]: r["patient_id"]
               for r in _rows(csv_path)}  # fmt: skip
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    owners = [{patient[p] for p in splits[s]} for s in ("train", "val", "test")]
    assert not (owners[0] & owners[1]) and not (owners[0] & owners[2]) and not (owners[1] & owners[2])
    test = result["test"]
    assert test["accuracy"] >= 0.6 and test["auc"] >= 0.8  # chance: 1/3 and 0.5

    # the per-class report matches the predictions file, recomputed here
    run = tmp_path / "run"
    preds = _rows(run / "test_predictions.csv")
    assert len(preds) == sum(len(splits["test"]) for _ in [0])
    target = np.array([classes.index(r["label"]) for r in preds])
    pred = np.array([classes.index(r["pred"]) for r in preds])
    confusion = finetune.confusion_matrix(target, pred, len(classes))
    expected = finetune.per_class_metrics(confusion)
    written = {r["class"]: r for r in _rows(run / "test_metrics.csv")}
    for i, c in enumerate(classes):
        for key in ("sensitivity", "ppv", "specificity", "accuracy"):
            value = written[c][key]
            assert (np.isnan(expected[key][i]) and value == "") or float(value) == pytest.approx(expected[key][i])
        assert int(written[c]["support"]) == (target == i).sum()
    assert float(written["overall_accuracy"]["accuracy"]) == pytest.approx((target == pred).mean())
    assert json.loads((run / "test_metrics.json").read_text())["confusion"] == confusion.tolist()
    assert (run / "test_confusion.csv").is_file() and (run / "val_metrics.csv").is_file()
    assert len(_rows(run / "metrics.csv")) == 8 and (run / "checkpoints" / "ckpt_best.pt").is_file()

    # resume: 2 epochs, then continue to 3 -> the same weights as the uninterrupted run's epoch 2
    short = tmp_path / "short"
    finetune.finetune_cxr(tiny_config(csv_path, short, epochs=2))
    finetune.finetune_cxr(tiny_config(csv_path, short, epochs=3, resume="auto"))
    assert [r["epoch"] for r in _rows(short / "metrics.csv")] == ["0", "1", "2"]
    resumed = torch.load(short / "checkpoints" / "ckpt_00000002.pt", weights_only=False)["model"]
    straight = torch.load(run / "checkpoints" / "ckpt_00000002.pt", weights_only=False)["model"]
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, msg=f"resumed run differs at {key}")


def _mosaic_dataset(folder: Path, n: int = 40, seed: int = 1) -> Path:
    """Multi-label: left half a camera crop or flat, right half a moon crop or flat; 'No Finding' when both flat."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        has_camera, has_moon = bool(i & 1), bool(i & 2)
        left = _crop(skdata.camera(), rng, 48) if has_camera else np.full((48, 48), rng.uniform(60, 200))
        right = _crop(skdata.moon(), rng, 48) if has_moon else np.full((48, 48), rng.uniform(60, 200))
        image = np.concatenate([left, right], 1)
        image = np.concatenate([image, image[::-1]], 0)  # 96 x 96
        path = folder / f"mosaic_{i:02d}.png"
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path)
        labels = [name for name, present in (("camera", has_camera), ("moon", has_moon)) if present]
        split = ["train", "train", "val", "test", "train"][(i // 4) % 5]  # every block of 4 holds each label set
        rows.append(dict(path=path.name, label="|".join(labels) or "No Finding", split=split))
    csv_path = folder / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def test_multilabel_sigmoid_with_a_negative_label(tmp_path: Path) -> None:
    csv_path = _mosaic_dataset(tmp_path / "mosaic")
    cfg = tiny_config(csv_path, tmp_path / "run", epochs=6, negative_label="No Finding", augment=False)
    result = finetune.finetune_cxr(cfg)
    print("multi-label:", json.dumps({k: result["test"][k] for k in ("accuracy", "exact_match", "f1", "auc")}))
    assert result["multi_label"] is True and result["classes"] == ["camera", "moon"]
    assert result["n"] == {"train": 24, "val": 8, "test": 8}
    assert result["test"]["auc"] > 0.6  # chance 0.5
    written = {r["class"]: r for r in _rows(tmp_path / "run" / "test_metrics.csv")}
    assert set(written) == {"camera", "moon", "macro", "overall_exact_match"}
    assert not (tmp_path / "run" / "test_confusion.csv").exists()
    # without --negative-label, 'No Finding' is an unknown label when the class list is given
    with pytest.raises(DataError, match=r"'No Finding' on line\(s\) \[2, 6"):
        finetune.read_label_csv(tiny_config(csv_path, tmp_path / "x", classes=("camera", "moon")))


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_counted_or_named(dataset, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv_path, classes = dataset
    rows = [r for r in _rows(csv_path) if r["path"] != "rg1_unci.dcm"][::4]  # 18 small images
    (tmp_path / "images").mkdir()
    for r in rows:  # CSV paths stay inside the CSV's folder: link the images in
        (tmp_path / "images" / r["path"]).symlink_to(csv_path.parent / r["path"])
        r["path"] = f"images/{r['path']}"
    for i, r in enumerate(rows):
        r["split"] = ["train", "train", "val", "test"][i % 4]
    good_dicom = next(tmp_path / r["path"] for r in rows if r["path"].endswith(".dcm"))
    truncated = tmp_path / "truncated.dcm"  # header intact, pixel data cut: found only when decoding
    truncated.write_bytes(good_dicom.read_bytes()[:-2000])
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    bad = [
        dict(path="gone.png", label=classes[0], patient_id="x", split="train"),
        dict(path=junk.name, label=classes[1], patient_id="y", split="train"),
        dict(path=truncated.name, label=classes[2], patient_id="z", split="train"),
    ]
    bad_csv = tmp_path / "bad.csv"
    with open(bad_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows + bad)

    # through the command line: skipped rows are counted and listed, and the report is printed
    parser = argparse.ArgumentParser(prog="zoo")
    finetune.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "finetune", "--task", "cxr", "--data", str(bad_csv), "--out", str(tmp_path / "run"), "--model",
        "medusa_resnet18", "--model-kwargs", json.dumps(TINY_MEDUSA), "--img-size", str(SIZE), "--epochs", "1",
        "--workers", "0", "--batch-size", "8",
    ])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "2 of 21 row(s) skipped" in out and "3 bad input(s)" in out and "PPV" in out and "sens" in out
    listed = {Path(r["path"]).name: r for r in _rows(tmp_path / "run" / "bad_inputs.csv")}
    assert set(listed) == {"gone.png", "junk.png", "truncated.dcm"}
    assert "no such file" in listed["gone.png"]["reason"] and listed["gone.png"]["line"] == "20"
    assert "not a readable image" in listed["junk.png"]["reason"]
    assert listed["truncated.dcm"]["line"] == "22"

    # --strict: the first bad row stops the run, naming it
    with pytest.raises(DataError, match=r"line 20: .*gone\.png: no such file"):
        finetune.finetune_cxr(tiny_config(bad_csv, tmp_path / "strict", strict=True, epochs=1))
    # a colour DICOM is a data set problem: always an error naming the file and the photometric interpretation
    rgb = write_dicom(tmp_path / "rgb.dcm", np.zeros((8, 8, 3), np.uint8), "RGB")
    with open(bad_csv, "a", newline="") as f:
        csv.writer(f).writerow([rgb.name, classes[0], "w", "train"])
    with pytest.raises(cxr.UnsupportedPhotometricError, match=r"rgb\.dcm.*'RGB'.*MONOCHROME1, MONOCHROME2"):
        finetune.finetune_cxr(tiny_config(bad_csv, tmp_path / "rgb", epochs=1))
    # labels outside the class list, and missing columns
    with pytest.raises(DataError, match=r"not in the class list \['camera', 'moon'\]: '\w+' on line"):
        finetune.read_label_csv(tiny_config(csv_path, tmp_path / "x", classes=("camera", "moon")))
    (tmp_path / "cols.csv").write_text("file,diagnosis\na.png,x\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['path', 'label'\].*--path-col"):
        finetune.read_label_csv(tiny_config(tmp_path / "cols.csv", tmp_path / "x"))


def test_cli_defaults() -> None:
    parser = argparse.ArgumentParser(prog="zoo")
    finetune.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--task", "cxr", "--data", "labels.csv"])
    assert args.func is finetune._cmd_finetune
    assert (args.model, args.img_size, args.in_chans, args.normalize) == ("medusa_resnet50", 480, 3, "standardize")
    assert (args.batch_size, args.lr, args.opt, args.multi_label) == (8, 2e-4, "adam", None)
    assert parser.parse_args(["finetune", "--task", "cxr", "--data", "l.csv", "--multi-label"]).multi_label is True
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--task", "ct", "--data", "labels.csv"])
