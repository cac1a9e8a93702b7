"""``zoo finetune --task cxr``: fine-tune a classifier on chest X-rays listed in a CSV; per-class report.

Data: a CSV with a path column (DICOM, PNG or JPEG; paths relative to ``--root``, by default the CSV's
folder; absolute paths and ``..`` are refused with the row, so a CSV handed in cannot reach other folders) and
a label column. One label per row trains a **multi-class** (softmax, cross-entropy) model; labels joined by
``|`` (ChestX-ray14 style ``Effusion|Mass``) or ``--multi-label`` train a **multi-label** (sigmoid, binary
cross-entropy) model, where ``--negative-label "No Finding"`` means "none of the classes". The class list is
``--classes`` (a label outside it is an error naming the rows) or the sorted labels of the CSV.

Images are read by ``zoo.data.cxr`` (DICOM with modality / VOI LUT and MONOCHROME1 inversion, 8/16-bit
PNG, JPEG; colour to luminance), resized to ``--img-size`` (480 by default: the COVID-Net / MEDUSA main
input), augmented in training with the COVID-Net CXR recipe (rotation +-10 deg, shift +-10 %, zoom
0.85-1.15, horizontal flip, brightness 0.9-1.1), standardised per image (the image's own mean and std;
``--normalize unit`` keeps CXR-3's [0, 1] instead) and repeated to ``--in-chans`` channels. The model is
``medusa_resnet50`` by default, any zoo or timm name by ``--model``; the optimiser is CXR-3's Adam
(lr 2e-4, batch 8) with optional class weighting and cosine decay.

Splits: a ``split`` column (``train``/``val``/``test``) when every row has one; otherwise a seeded split by
patient (``--patient-col``, ``patient_id`` by default, when the CSV has it: one patient's images never
straddle splits), stratified by label for multi-class data; without a patient column, by image.

Outputs under ``--out``: ``metrics.csv`` (per epoch), ``checkpoints/`` (atomic, keep-last + best by validation
macro-F1 + macro-AUC; ``--resume auto`` continues an interrupted run), ``splits.json``, and for the
validation and test splits at the best epoch ``<split>_metrics.csv`` / ``.json`` (per class: support, TP,
FP, FN, TN, sensitivity, PPV, specificity, accuracy, F1, AUC; then macro means and overall accuracy),
``<split>_confusion.csv`` (multi-class), ``<split>_predictions.csv``; ``bad_inputs.csv`` lists rows that
were skipped (missing or unreadable files) and ``result.json`` sums it up. ``--strict`` stops at the first
bad file instead; a DICOM with an unsupported photometric interpretation always stops the run up front.

Checkpointing, CSV logging and progress reuse ``zoo.train.checkpoint`` and ``zoo.train.metrics``; per-sample
seeding and the skip marker come from ``zoo.train.data``; the slide-level splitter and the AUC from
``zoo.train.mil``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._cli_errors import non_negative_int, parse_json_mapping, positive_int
from .._io import atomic_write_text, confined_path, load_state_dict_checked
from .checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint_file,
    prepare_run_folder,
    restore_rng_state,
)
from .data import Corrupt, DataError, SeededSample
from .metrics import MetricLogger, Progress, rewind_csv
from .mil import _binary_auc, split_slides

__all__ = [
    "FinetuneConfig",
    "CxrRecord",
    "CxrDataset",
    "read_label_csv",
    "confusion_matrix",
    "per_class_metrics",
    "multilabel_metrics",
    "evaluate_predictions",
    "write_metrics",
    "finetune_cxr",
    "add_cli",
]

TASKS = ("cxr",)
SPLITS = ("train", "val", "test")
METRIC_COLUMNS = ("sensitivity", "ppv", "specificity", "accuracy", "f1", "auc")


@dataclass
class FinetuneConfig:
    """Options of ``zoo finetune``; every field has a default and a one-line help in ``add_cli``."""

    task: str = "cxr"
    data: str = ""  # CSV of path, label[s] [, split] [, patient_id]
    root: str = ""  # folder relative paths are resolved against ('' = the CSV's folder)
    out: str = "runs/finetune"
    model: str = "medusa_resnet50"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    classes: tuple[str, ...] = ()
    multi_label: bool | None = None  # None: multi-label when a label holds the separator
    label_sep: str = "|"
    negative_label: str = ""  # multi-label: this label means "none of the classes" (e.g. 'No Finding')
    path_col: str = "path"
    label_col: str = "label"
    split_col: str = "split"
    patient_col: str = "patient_id"
    val_frac: float = 0.1
    test_frac: float = 0.2
    img_size: int = 480
    in_chans: int = 3
    normalize: str = "standardize"
    augment: bool = True
    hflip: bool = True
    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    opt: str = "adam"
    sched: str = "none"
    class_weights: str = "none"
    threshold: float = 0.5
    workers: int = 2
    cache_images: bool = False
    seed: int = 0
    device: str = "cpu"
    resume: str = ""
    strict: bool = False
    keep_last: int = 2
    overwrite: bool = False  # start over in a folder that holds another run (its checkpoints and logs go)
    progress: bool = True


# what --overwrite removes besides the checkpoints
RUN_LOGS = ("metrics.csv", "splits.json", "result.json", "bad_inputs.csv") + tuple(
    f"{split}_{kind}" for split in ("val", "test") for kind in ("metrics.csv", "metrics.json", "confusion.csv",
                                                                "predictions.csv")
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class CxrRecord:
    """One CSV row: the image, its labels (class names), its patient and split, its 1-based CSV line."""

    path: Path
    labels: tuple[str, ...]
    patient: str
    split: str
    line: int


def _parse_labels(text: str, sep: str, multi_label: bool) -> tuple[str, ...]:
    text = text.strip()
    if not multi_label:
        return (text,) if text else ()
    return tuple(dict.fromkeys(t.strip() for t in text.split(sep) if t.strip()))


def read_label_csv(cfg: FinetuneConfig) -> tuple[list[CxrRecord], list[str], bool]:
    """Rows, class list and whether the task is multi-label, from ``cfg.data``.

    Raises:
        DataError: missing CSV or columns, empty labels, labels outside ``cfg.classes``.
    """
    csv_path = Path(cfg.data)
    if not csv_path.is_file():
        raise DataError(f"label CSV {csv_path} does not exist; pass --data FILE.csv with columns path,label")
    root = Path(cfg.root) if cfg.root else csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in (cfg.path_col, cfg.label_col) if c not in columns]
    if missing:
        raise DataError(f"{csv_path}: no column(s) {missing}; columns are {columns} (set --path-col / --label-col)")
    if not rows:
        raise DataError(f"{csv_path} has no rows")
    multi = cfg.multi_label
    if multi is None:
        multi = any(cfg.label_sep in (r[cfg.label_col] or "") for r in rows)
    has_patient = cfg.patient_col in columns
    records, empty = [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        labels = _parse_labels(row[cfg.label_col] or "", cfg.label_sep, multi)
        if not labels:
            empty.append(line)
            continue
        if multi and cfg.negative_label and cfg.negative_label in labels:
            if len(labels) > 1:
                raise DataError(
                    f"{csv_path} line {line}: {cfg.negative_label!r} together with {labels}; it means 'none'"
                )
            labels = ()
        # a CSV handed in may not reach outside its image folder (absolute paths and '..' are refused)
        path = confined_path(root, row[cfg.path_col], "image path", f"{csv_path} line {line}")
        records.append(
            CxrRecord(
                path=path,
                labels=labels,
                patient=(row.get(cfg.patient_col) or "").strip() if has_patient else "",
                split=(row.get(cfg.split_col) or "").strip().lower(),
                line=line,
            )
        )
    if empty:
        raise DataError(f"{csv_path}: empty label on line(s) {empty[:10]}; every row needs a label")
    found = sorted({c for r in records for c in r.labels})
    if cfg.classes:
        classes = list(cfg.classes)
        unknown: dict[str, list[int]] = {}
        for r in records:
            for c in r.labels:
                if c not in classes:
                    unknown.setdefault(c, []).append(r.line)
        if unknown:
            where = "; ".join(f"{c!r} on line(s) {lines[:5]}" for c, lines in unknown.items())
            raise DataError(
                f"{csv_path}: label(s) not in the class list {classes}: {where}; add them to --classes or drop "
                "the rows" + (" (or set --negative-label for a 'none' label)" if multi else "")
            )
    else:
        classes = found
    if not classes:
        raise DataError(f"{csv_path}: no class label at all (every row is {cfg.negative_label!r})")
    if len(classes) < 2 and not multi:
        raise DataError(f"{csv_path}: {len(classes)} class(es) {classes}; multi-class training needs at least 2")
    return records, classes, multi


def check_records(records: Sequence[CxrRecord], strict: bool) -> tuple[list[CxrRecord], list[dict[str, Any]]]:
    """Header-check every file; returns the usable records and the bad ones (line, path, reason).

    Raises:
        UnsupportedPhotometricError: always (a data set problem, not a damaged file); names the file.
        DataError: with ``strict``, at the first missing or unreadable file.
    """
    from zoo.data.cxr import CxrReadError, UnsupportedPhotometricError, check_cxr

    good, bad = [], []
    for r in records:
        try:
            check_cxr(r.path)
        except UnsupportedPhotometricError:
            raise
        except CxrReadError as err:
            if strict:
                raise DataError(f"CSV line {r.line}: {err} (drop --strict to skip and count such rows)") from err
            bad.append(dict(line=r.line, path=str(r.path), reason=str(err)))
            continue
        good.append(r)
    return good, bad


def split_records(records: Sequence[CxrRecord], cfg: FinetuneConfig, multi: bool) -> dict[str, list[int]]:
    """Indices of ``records`` per split: the split column, else a seeded split by patient (or image)."""
    if all(r.split for r in records):
        odd = sorted({r.split for r in records} - set(SPLITS))
        if odd:
            raise DataError(f"split column values {odd}; expected some of {SPLITS}")
        return {s: [i for i, r in enumerate(records) if r.split == s] for s in SPLITS}
    keys = [str(i) for i in range(len(records))]
    groups = [r.patient or f"image:{i}" for i, r in enumerate(records)]
    # multi-class: stratify by class; multi-label: label sets are too many to stratify, split by patient only
    strata = ["" if multi else r.labels[0] for r in records]
    order = {s: k for k, s in enumerate(sorted(set(strata)))}
    parts = split_slides(keys, [order[s] for s in strata], cfg.val_frac, cfg.test_frac, cfg.seed, groups)
    return {s: sorted(int(k) for k in parts[s]) for s in SPLITS}


def _affine_augment(img: torch.Tensor, hflip: bool) -> torch.Tensor:
    """COVID-Net CXR recipe on ``(1, H, W)``: rotation +-10 deg, shift +-10 %, zoom 0.85-1.15, flip, brightness."""
    angle = math.radians(random.uniform(-10.0, 10.0))
    zoom = random.uniform(0.85, 1.15)
    tx, ty = random.uniform(-0.1, 0.1) * 2, random.uniform(-0.1, 0.1) * 2  # grid units span 2
    flip = -1.0 if hflip and random.random() < 0.5 else 1.0
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos * flip, -sin, tx], [sin * flip, cos, ty]], dtype=img.dtype)
    grid = F.affine_grid(theta[None], [1, *img.shape], align_corners=False)
    # border padding: a zoomed-out radiograph is not framed by black bars the model could key on
    out = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    # brightness only matters with --normalize unit: a per-image z-score removes any scale
    return out * random.uniform(0.9, 1.1)


class CxrDataset(torch.utils.data.Dataset):
    """Chest X-rays of ``records`` as ``(in_chans, size, size)`` tensors and their targets.

    Target: class index (multi-class) or a ``(num_classes,)`` float 0/1 vector (multi-label). An image that
    fails to decode gives ``Corrupt(path, reason)`` (``strict=False``) or raises ``DataError``.
    """

    def __init__(
        self,
        records: Sequence[CxrRecord],
        classes: Sequence[str],
        multi_label: bool,
        img_size: int = 480,
        in_chans: int = 3,
        normalize: str = "standardize",
        train: bool = False,
        hflip: bool = True,
        cache: bool = False,
        strict: bool = False,
    ) -> None:
        if normalize not in ("standardize", "unit"):
            raise ValueError(f"normalize={normalize!r}; expected 'standardize' or 'unit'")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans={in_chans}; chest X-rays are fed as 1 or 3 (repeated) channels")
        self.records = list(records)
        self.index = {c: i for i, c in enumerate(classes)}
        self.num_classes = len(classes)
        self.multi_label, self.img_size, self.in_chans = multi_label, img_size, in_chans
        self.normalize, self.train, self.hflip, self.strict = normalize, train, hflip, strict
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def target(self, i: int) -> torch.Tensor:
        labels = self.records[i].labels
        if self.multi_label:
            t = torch.zeros(self.num_classes)
            t[[self.index[c] for c in labels]] = 1.0
            return t
        return torch.tensor(self.index[labels[0]])

    def _image(self, i: int) -> torch.Tensor:
        from zoo.data.cxr import read_cxr, resize

        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = resize(read_cxr(self.records[i].path), self.img_size)  # (1, size, size) in [0, 1]
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, int]:
        """``(image (in_chans, size, size) or Corrupt, target, i)``."""
        from zoo.data.cxr import CxrReadError, standardize

        try:
            img = self._image(i)
        except CxrReadError as err:
            if self.strict:
                raise DataError(f"CSV line {self.records[i].line}: {err}") from err
            return Corrupt(str(self.records[i].path), str(err)), self.target(i), i
        if self.train:
            img = _affine_augment(img, self.hflip)
        img = standardize(img) if self.normalize == "standardize" else img.clamp(0.0, 1.0)
        return img.expand(self.in_chans, -1, -1).contiguous(), self.target(i), i


Batch = tuple[torch.Tensor, torch.Tensor, list[int], dict[str, str]]


def _collate(batch: Sequence[tuple[Any, torch.Tensor, int]]) -> Batch:
    """Stack a batch, dropping ``Corrupt`` samples.

    Returns ``(images (B, C, H, W), targets (B,) or (B, K), dataset indices, {skipped path: reason})``.
    """
    good = [(x, y, i) for x, y, i in batch if not isinstance(x, Corrupt)]
    skipped = {x.path: x.error for x, _, _ in batch if isinstance(x, Corrupt)}
    if not good:
        return torch.empty(0), torch.empty(0), [], skipped
    return torch.stack([x for x, _, _ in good]), torch.stack([y for _, y, _ in good]), [i for *_, i in good], skipped


class _EpochSampler(torch.utils.data.Sampler):
    """``(epoch, index)`` keys for ``SeededSample``: a permutation seeded by (seed, epoch), or in order."""

    def __init__(self, indices: Sequence[int], seed: int, shuffle: bool) -> None:
        self.indices, self.seed, self.shuffle, self.epoch = list(indices), seed, shuffle, 0

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=g)]
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------------
# metrics


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts; row = true class, column = predicted class."""
    target, pred = np.asarray(target, np.int64), np.asarray(pred, np.int64)
    return np.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0 (undefined, e.g. PPV of a class never predicted)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class one-vs-rest metrics from ``(K,)`` counts.

    sensitivity (recall) = TP / (TP + FN); PPV (precision) = TP / (TP + FP); specificity = TN / (TN + FP);
    accuracy = (TP + TN) / N; F1 = 2 TP / (2 TP + FP + FN), 0 when the class is neither present nor
    predicted (scikit-learn's zero_division=0). Undefined ratios are NaN.
    """
    n = tp + fp + fn + tn
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return dict(
        support=tp + fn,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
        sensitivity=_ratio(tp, tp + fn),
        ppv=_ratio(tp, tp + fp),
        specificity=_ratio(tn, tn + fp),
        accuracy=_ratio(tp + tn, n),
        f1=np.nan_to_num(f1, nan=0.0),
    )


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest counts and metrics per class of a multi-class confusion matrix (rows true, columns predicted).

    Returns ``(K,)`` arrays ``support, tp, fp, fn, tn, sensitivity, ppv, specificity, accuracy, f1``.
    """
    confusion = np.asarray(confusion, np.int64)
    tp = np.diag(confusion)
    fn = confusion.sum(1) - tp
    fp = confusion.sum(0) - tp
    tn = confusion.sum() - tp - fn - fp
    return _from_counts(tp, fp, fn, tn)


def multilabel_metrics(target: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class metrics of multi-label 0/1 ``target`` and ``pred``, both ``(N, K)``; same keys as above."""
    target, pred = np.asarray(target).astype(bool), np.asarray(pred).astype(bool)
    tp = (target & pred).sum(0)
    fp = (~target & pred).sum(0)
    fn = (target & ~pred).sum(0)
    tn = (~target & ~pred).sum(0)
    return _from_counts(tp, fp, fn, tn)


def evaluate_predictions(
    probs: np.ndarray, target: np.ndarray, classes: Sequence[str], multi_label: bool, threshold: float = 0.5
) -> dict[str, Any]:
    """The report of one split.

    Args:
        probs: ``(N, K)`` softmax (multi-class) or sigmoid (multi-label) outputs.
        target: ``(N,)`` class indices or ``(N, K)`` 0/1.
        classes: the K class names.
        multi_label: decide by ``probs >= threshold`` per class instead of the arg-max.

    Returns:
        ``per_class`` (class -> metrics incl. one-vs-rest ``auc``, NaN with a single class present), ``macro``
        (the mean over classes of each metric, NaN entries ignored), ``accuracy`` (multi-class: the fraction
        correct; multi-label: the mean per-label accuracy), ``exact_match`` (multi-label: all labels right),
        ``f1`` (macro-F1), ``auc`` (macro-AUC), ``n``, and ``confusion`` (multi-class, rows true).
    """
    probs, target = np.asarray(probs, np.float64), np.asarray(target)
    k = len(classes)
    report: dict[str, Any] = {"n": int(len(probs)), "multi_label": multi_label, "classes": list(classes)}
    if multi_label:
        pred = probs >= threshold
        per = multilabel_metrics(target, pred)
        positive = target.astype(bool)
        report["exact_match"] = float((pred == positive).all(1).mean()) if len(probs) else float("nan")
    else:
        pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
        confusion = confusion_matrix(target, pred, k)
        per = per_class_metrics(confusion)
        positive = target[:, None] == np.arange(k)[None]
        report["confusion"] = confusion.tolist()
    auc = [
        _binary_auc(probs[:, c], positive[:, c]) if 0 < positive[:, c].sum() < len(probs) else float("nan")
        for c in range(k)
    ]
    per["auc"] = np.asarray(auc, np.float64)
    report["per_class"] = {
        c: {key: (int(v[i]) if key in ("support", "tp", "fp", "fn", "tn") else float(v[i])) for key, v in per.items()}
        for i, c in enumerate(classes)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN mean
        report["macro"] = {m: float(np.nanmean(per[m])) if k else float("nan") for m in METRIC_COLUMNS}
    n = len(probs)
    report["accuracy"] = (
        float(np.mean(per["accuracy"])) if multi_label else (float(np.trace(confusion) / n) if n else float("nan"))
    )
    report["f1"], report["auc"] = report["macro"]["f1"], report["macro"]["auc"]
    return report


def write_metrics(report: dict[str, Any], out_dir: str | Path, split: str) -> dict[str, Path]:
    """``<split>_metrics.json``, ``<split>_metrics.csv`` (a row per class, then 'macro'), ``<split>_confusion.csv``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{split}_metrics.json", "csv": out_dir / f"{split}_metrics.csv"}
    paths["json"].write_text(json.dumps(report, indent=1, default=_json_default))
    columns = ["class", "support", "tp", "fp", "fn", "tn", *METRIC_COLUMNS]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for c, m in report["per_class"].items():
            writer.writerow([c, *[_fmt(m[col]) for col in columns[1:]]])
        macro = report["macro"]
        writer.writerow(["macro", report["n"], "", "", "", "", *[_fmt(macro[m]) for m in METRIC_COLUMNS]])
        overall = "exact_match" if report["multi_label"] else "accuracy"
        writer.writerow([f"overall_{overall}", report["n"], "", "", "", "", "", "", "", _fmt(report[overall]), "", ""])
    if "confusion" in report:
        paths["confusion"] = out_dir / f"{split}_confusion.csv"
        with open(paths["confusion"], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *report["classes"]])
            for c, row in zip(report["classes"], report["confusion"]):
                writer.writerow([c, *row])
    return paths


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


# --------------------------------------------------------------------------------------------------
# training


def _loss_fn(
    cfg: FinetuneConfig, dataset: CxrDataset, train_idx: Sequence[int], multi: bool, device: torch.device
) -> nn.Module:
    """Cross-entropy (multi-class) or BCE-with-logits (multi-label); ``balanced`` weights by the train split."""
    if cfg.class_weights not in ("none", "balanced"):
        raise ValueError(f"class_weights={cfg.class_weights!r}; expected 'none' or 'balanced'")
    k = dataset.num_classes
    if multi:
        pos = torch.stack([dataset.target(i) for i in train_idx]).sum(0) if train_idx else torch.zeros(k)
        weight = (len(train_idx) - pos) / pos.clamp_min(1.0) if cfg.class_weights == "balanced" else None
        return nn.BCEWithLogitsLoss(pos_weight=None if weight is None else weight.to(device))
    weight = None
    if cfg.class_weights == "balanced":  # CXR-3 weights each sample by its class; n / (K * count)
        counts = torch.bincount(torch.stack([dataset.target(i) for i in train_idx]), minlength=k).float()
        weight = (len(train_idx) / (k * counts.clamp_min(1.0))).to(device)
    return nn.CrossEntropyLoss(weight=weight)


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.opt == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.opt == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"opt={cfg.opt!r}; expected 'adam' or 'adamw'")


def _scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int) -> Any:
    if cfg.sched == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.sched == "cosine":  # half-cycle to 0, per step
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        )
    raise ValueError(f"sched={cfg.sched!r}; expected 'none' or 'cosine'")


def _loader(dataset: CxrDataset, indices: Sequence[int], cfg: FinetuneConfig, shuffle: bool) -> Any:
    sampler = _EpochSampler(indices, cfg.seed, shuffle)
    loader = torch.utils.data.DataLoader(
        SeededSample(dataset, cfg.seed),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=_collate,
        persistent_workers=cfg.workers > 0 and cfg.cache_images,  # keep the workers' image caches
    )
    return loader, sampler


def _predict(
    model: nn.Module, loader: Any, multi: bool, device: torch.device, skipped: dict[str, str]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Probabilities ``(N, K)``, targets and the dataset indices they belong to (corrupt samples dropped)."""
    model.eval()
    probs, targets, indices = [], [], []
    with torch.no_grad():
        for images, target, index, bad in loader:
            skipped.update(bad)
            if not len(images):
                continue
            logits = model(images.to(device)).float()
            probs.append((torch.sigmoid(logits) if multi else torch.softmax(logits, -1)).cpu())
            targets.append(target)
            indices += index
    if not probs:
        return np.zeros((0, model.num_classes)), np.zeros((0,)), []
    return torch.cat(probs).numpy(), torch.cat(targets).numpy(), indices


def finetune_cxr(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the CSV's chest X-rays; report val and test at the best validation epoch."""
    import zoo

    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r}; supported: {TASKS}")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    device = torch.device(cfg.device)
    ckpt = CheckpointManager(out_dir / "checkpoints", keep_last=cfg.keep_last, mode="max")
    prepare_run_folder(out_dir, ckpt, cfg.resume, cfg.overwrite, RUN_LOGS)
    state = ckpt.resolve_resume(cfg.resume)
    if state is not None and state["epoch"] + 1 >= cfg.epochs and (out_dir / "result.json").is_file():
        print(f"run in {out_dir} already finished (epoch {state['epoch']}): nothing to do")
        return json.loads((out_dir / "result.json").read_text())

    records, classes, multi = read_label_csv(cfg)
    good, bad_inputs = check_records(records, cfg.strict)
    if bad_inputs:
        print(f"{len(bad_inputs)} of {len(records)} row(s) skipped (missing or unreadable); see bad_inputs.csv")
    if not good:
        raise DataError(f"no readable image in {cfg.data} ({len(bad_inputs)} bad row(s), e.g. {bad_inputs[0]})")
    split_idx = split_records(good, cfg, multi)
    if not split_idx["train"] or not split_idx["val"]:
        raise DataError(
            f"empty train or val split ({ {k: len(v) for k, v in split_idx.items()} }); add images or patients"
        )
    # one dataset per mode, sharing the rows: augmentation only in training
    common = dict(
        classes=classes, multi_label=multi, img_size=cfg.img_size, in_chans=cfg.in_chans, normalize=cfg.normalize,
        hflip=cfg.hflip, cache=cfg.cache_images, strict=cfg.strict,
    )  # fmt: skip
    train_set = CxrDataset(good, train=cfg.augment, **common)
    eval_set = CxrDataset(good, train=False, **common)
    eval_set._cache = train_set._cache  # the cache holds un-augmented pixels: read each file once

    model = zoo.create_model(
        cfg.model, pretrained=cfg.pretrained, num_classes=len(classes), in_chans=cfg.in_chans, **cfg.model_kwargs
    ).to(device)
    loss_fn = _loss_fn(cfg, train_set, split_idx["train"], multi, device)
    optimizer = _optimizer(model, cfg)
    train_loader, train_sampler = _loader(train_set, split_idx["train"], cfg, shuffle=True)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = _scheduler(optimizer, cfg, total_steps)

    start_epoch = 0
    skipped: dict[str, str] = {}  # images that failed to decode: path -> reason
    if state is not None:
        if state.get("classes") != classes:
            raise DataError(f"checkpoint {state.get('path')} has classes {state.get('classes')}, the CSV {classes}")
        load_state_dict_checked(model, state["model"], f"checkpoint {state['path']}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        skipped = dict(state.get("skipped", {}))
        start_epoch = state["epoch"] + 1
    if cfg.resume:  # rows logged after the resumed checkpoint are logged again
        rewind_csv(out_dir / "metrics.csv", start_epoch * len(train_loader))
    splits_json = {s: [str(good[i].path) for i in idx] for s, idx in split_idx.items()}
    atomic_write_text(out_dir / "splits.json", json.dumps(splits_json, indent=1))
    logger = MetricLogger(out_dir, config=asdict(cfg))
    val_loader, _ = _loader(eval_set, split_idx["val"], cfg, shuffle=False)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_sampler.epoch = epoch
        losses, seen = [], 0
        with Progress(len(train_loader), desc=f"epoch {epoch}", enabled=cfg.progress) as bar:
            for images, target, _, bad in train_loader:
                skipped.update(bad)
                if not len(images):
                    bar.update()
                    continue
                logits = model(images.to(device))
                loss = loss_fn(logits, target.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                seen += len(images)
                bar.update(loss=losses[-1])
        probs, target, _ = _predict(model, val_loader, multi, device, skipped)
        val = evaluate_predictions(probs, target, classes, multi, cfg.threshold)
        score = float(np.nan_to_num(val["f1"]) + np.nan_to_num(val["auc"]))  # best macro-F1 + macro-AUC
        row = dict(epoch=epoch, train_loss=float(np.mean(losses)) if losses else float("nan"), train_images=seen)
        row.update(val_acc=val["accuracy"], val_f1=val["f1"], val_auc=val["auc"], lr=scheduler.get_last_lr()[0])
        logger.log(row, step=(epoch + 1) * len(train_loader))
        state = dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng=capture_rng_state(), epoch=epoch, config=asdict(cfg), classes=classes, multi_label=multi,
            skipped=skipped,
        )  # fmt: skip
        ckpt.save(state, step=epoch, metric=score)
    logger.close()

    if not ckpt.best_path.exists():
        raise RuntimeError(f"no checkpoint in {ckpt.directory}: nothing was trained (epochs={cfg.epochs})")
    best = load_checkpoint_file(ckpt.best_path, map_location=device)
    load_state_dict_checked(model, best["model"], f"checkpoint {ckpt.best_path}")
    result: dict[str, Any] = dict(
        best_epoch=best["epoch"], classes=classes, multi_label=multi, n={s: len(v) for s, v in split_idx.items()}
    )
    for split in ("val", "test"):
        if not split_idx[split]:
            continue
        loader, _ = _loader(eval_set, split_idx[split], cfg, shuffle=False)
        probs, target, index = _predict(model, loader, multi, device, skipped)
        report = evaluate_predictions(probs, target, classes, multi, cfg.threshold)
        write_metrics(report, out_dir, split)
        _write_predictions(out_dir / f"{split}_predictions.csv", [good[i] for i in index], probs, classes, multi, cfg)
        result[split] = {k: report[k] for k in ("accuracy", "f1", "auc", "macro", "per_class")}
        if multi:
            result[split]["exact_match"] = report["exact_match"]
    line_of = {str(r.path): r.line for r in good}
    bad_inputs += [dict(line=line_of.get(p, ""), path=p, reason=why) for p, why in sorted(skipped.items())]
    result["bad_inputs"] = len(bad_inputs)
    if bad_inputs:
        with open(out_dir / "bad_inputs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["line", "path", "reason"])
            writer.writeheader()
            writer.writerows(bad_inputs)
    atomic_write_text(out_dir / "result.json", json.dumps(result, indent=1, default=_json_default))
    return result


def _write_predictions(
    path: Path, records: Sequence[CxrRecord], probs: np.ndarray, classes: Sequence[str], multi: bool, cfg: Any
) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "patient", "label", "pred", *[f"p_{c}" for c in classes]])
        for r, p in zip(records, probs):
            pred = [c for c, v in zip(classes, p) if v >= cfg.threshold] if multi else [classes[int(p.argmax())]]
            writer.writerow(
                [r.path, r.patient, cfg.label_sep.join(r.labels), cfg.label_sep.join(pred)] + [f"{v:.6f}" for v in p]
            )


# --------------------------------------------------------------------------------------------------
# command line


def _print_report(result: dict[str, Any]) -> None:
    for split in ("val", "test"):
        if split not in result:
            continue
        m = result[split]
        print(f"{split}: accuracy {m['accuracy']:.4f}  macro-F1 {m['f1']:.4f}  macro-AUC {m['auc']:.4f}")
        print(f"  {'class':24s} {'sens':>7s} {'PPV':>7s} {'spec':>7s} {'acc':>7s} {'AUC':>7s} {'n':>6s}")
        for c, pc in m["per_class"].items():
            vals = " ".join(f"{pc[k]:7.4f}" for k in ("sensitivity", "ppv", "specificity", "accuracy", "auc"))
            print(f"  {c[:24]:24s} {vals} {pc['support']:6d}")


def _cmd_finetune(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(
        task=args.task, data=args.data, root=args.root, out=args.out, model=args.model,
        model_kwargs=parse_json_mapping(args.model_kwargs, "--model-kwargs"), pretrained=args.pretrained,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes else (),
        multi_label=args.multi_label, label_sep=args.label_sep, negative_label=args.negative_label,
        path_col=args.path_col, label_col=args.label_col, split_col=args.split_col, patient_col=args.patient_col,
        val_frac=args.val_frac, test_frac=args.test_frac, img_size=args.img_size, in_chans=args.in_chans,
        normalize=args.normalize, augment=not args.no_augment, hflip=not args.no_hflip, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, opt=args.opt, sched=args.sched,
        class_weights=args.class_weights, threshold=args.threshold, workers=args.workers,
        cache_images=args.cache_images, seed=args.seed, device=args.device, resume=args.resume, strict=args.strict,
        overwrite=args.overwrite,
    )  # fmt: skip
    result = finetune_cxr(cfg)
    _print_report(result)
    print(f"best epoch {result['best_epoch']}; {result['bad_inputs']} bad input(s); run folder {cfg.out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``zoo finetune`` to the ``zoo`` command's sub-parsers."""
    d = FinetuneConfig()
    p = subparsers.add_parser("finetune", help="fine-tune a classifier on a task's data (cxr: chest X-rays)")
    p.add_argument("--task", required=True, choices=TASKS, help="cxr: chest X-ray CSV of DICOM / PNG / JPEG")
    p.add_argument("--data", required=True, help="CSV: path,label[,split][,patient_id]; labels 'A|B' = multi-label")
    p.add_argument("--root", default=d.root, help="folder relative paths start from (default: the CSV's folder)")
    p.add_argument("--out", default=d.out, help="run folder: checkpoints, metrics, per-class reports")
    p.add_argument("--model", default=d.model, help="any zoo or timm architecture")
    p.add_argument("--model-kwargs", default="{}", help="JSON kwargs, e.g. '{\"attn_size\": 128}'")
    p.add_argument("--pretrained", action="store_true", help="load the model's weights (head re-initialised)")
    p.add_argument("--classes", default="", help="comma-separated class list (default: the CSV's sorted labels)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--multi-label", dest="multi_label", action="store_true", default=None, help="sigmoid + BCE")
    group.add_argument("--multi-class", dest="multi_label", action="store_false", help="softmax + cross-entropy")
    p.add_argument("--label-sep", default=d.label_sep, help="separator of several labels in one cell")
    p.add_argument("--negative-label", default=d.negative_label, help="multi-label 'none' label, e.g. 'No Finding'")
    p.add_argument("--path-col", default=d.path_col, help="CSV column of the image paths")
    p.add_argument("--label-col", default=d.label_col, help="CSV column of the labels")
    p.add_argument("--split-col", default=d.split_col, help="CSV column train/val/test (used when every row has one)")
    p.add_argument("--patient-col", default=d.patient_col, help="CSV column keeping a patient's images in one split")
    p.add_argument("--val-frac", type=float, default=d.val_frac, help="validation fraction (no split column)")
    p.add_argument("--test-frac", type=float, default=d.test_frac, help="test fraction (no split column)")
    p.add_argument("--img-size", type=positive_int, default=d.img_size, help="input side (COVID-Net / MEDUSA: 480)")
    p.add_argument("--in-chans", type=int, default=d.in_chans, choices=[1, 3], help="gray repeated to 3 or kept 1")
    p.add_argument(
        "--normalize", default=d.normalize, choices=["standardize", "unit"], help="per-image z-score or [0,1]"
    )
    p.add_argument("--no-augment", action="store_true", help="no rotation / shift / zoom / flip / brightness")
    p.add_argument("--no-hflip", action="store_true", help="augment without horizontal flips")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="batch size (CXR-3: 8)")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (CXR-3: Adam 2e-4)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--opt", default=d.opt, choices=["adam", "adamw"], help="optimizer")
    p.add_argument("--sched", default=d.sched, choices=["none", "cosine"], help="constant lr or per-step cosine to 0")
    p.add_argument("--class-weights", default=d.class_weights, choices=["none", "balanced"], help="loss weighting")
    p.add_argument("--threshold", type=float, default=d.threshold, help="multi-label decision threshold")
    p.add_argument("--workers", type=non_negative_int, default=d.workers, help="data-loading processes")
    p.add_argument("--cache-images", action="store_true", help="keep resized images in memory (small data sets)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and of training")
    p.add_argument("--device", default=d.device, help="torch device")
    p.add_argument("--resume", default=d.resume, help="'' fresh, 'auto' latest checkpoint, or a path")
    p.add_argument("--strict", action="store_true", help="stop at the first missing / unreadable image")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder holding another run (deletes it)")
    p.set_defaults(func=_cmd_finetune)
    return p
