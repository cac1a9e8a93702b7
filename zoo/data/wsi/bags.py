"""Bags for multiple-instance learning: each slide's tile features with its label from a CSV.

Every feature file is checked when the dataset is built (readable, finished, one feature dim, one
provenance), so a mixed or damaged folder fails before training starts, naming the slide, not in the
middle of an epoch.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zoo._io import plain_name

from .errors import FeatureFileError, FeatureMismatchError
from .features import _feature_header, describe_diff, read_feature_file

__all__ = ["BagDataset"]


class BagDataset:
    """Bags of slide features with labels from a CSV (``slide_id``, ``label`` columns; extra columns kept).

    ``ds[i] -> dict(features=(N, D) float32 tensor, label=int, slide_id=str, coords=(N, 2) ndarray)``.
    Rows whose feature file is missing are skipped, counted in ``missing`` and reported in one warning.
    Labels may be names (mapped to indices in sorted order, or in the order of ``classes``) or integers.
    Slide ids name files inside ``feature_dir`` only (absolute paths, ``..`` and separators are refused).
    Every file is checked when the dataset is built: readable, finished, ``features`` ``(N, D)`` with N > 0,
    one feature dim, and one provenance (the same backbone, weights and settings) across the files that
    record it; ``provenance`` holds it (None for files of an older zoo).

    Raises:
        UnsafePathError: a slide id is not a plain file name (names the CSV and line).
        FeatureFileError: a file is damaged, unfinished, lacks ``features`` or holds 0 tiles (names the slide).
        FeatureMismatchError: a file's feature dim differs from ``in_dim`` (or from the first file's), it was
            made by another ``backbone`` than asked, or two files were extracted differently; names the slides.
    """

    def __init__(
        self,
        feature_dir: str | os.PathLike,
        labels_csv: str | os.PathLike,
        *,
        slide_col: str = "slide_id",
        label_col: str = "label",
        classes: Sequence[str] | None = None,
        in_dim: int | None = None,
        backbone: str | None = None,
        slide_ids: Sequence[str] | None = None,
    ) -> None:
        self.feature_dir = Path(feature_dir)
        rows: list[tuple[str, str, str, dict[str, Any]]] = []  # (where, slide id, label, row)
        if not Path(labels_csv).is_file():
            raise FileNotFoundError(f"label CSV {labels_csv} does not exist (slide_id,label[,split] rows)")
        if not self.feature_dir.is_dir():
            raise FileNotFoundError(f"feature folder {feature_dir} does not exist (zoo wsi extract writes it)")
        with open(labels_csv, newline="") as f:
            reader = csv.DictReader(f)
            missing_cols = {slide_col, label_col} - set(reader.fieldnames or [])
            if missing_cols:
                raise ValueError(f"label CSV {labels_csv} lacks column(s) {sorted(missing_cols)}")
            for row in reader:
                where = f"{labels_csv} line {reader.line_num}"
                # an id names a file in feature_dir: '../x', '/x' or 'a/b' would read a file elsewhere
                sid = plain_name(row.get(slide_col), what="slide id", where=where)
                label = (row.get(label_col) or "").strip()
                if not label:
                    raise ValueError(f"{where}: slide {sid} has no {label_col!r}; fill it in or remove the row")
                rows.append((where, sid, label, row))
        if slide_ids is not None:
            wanted = set(slide_ids)
            rows = [r for r in rows if r[1] in wanted]
        raw_labels = [label for _, _, label, _ in rows]
        if classes is None:
            if all(v.lstrip("-").isdigit() for v in raw_labels):
                classes = [str(c) for c in sorted({int(v) for v in raw_labels})]
            else:
                classes = sorted(set(raw_labels))
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.records: list[dict[str, Any]] = []
        self.missing: list[str] = []
        self.provenance: dict[str, Any] | None = None
        first: tuple[str, Path] | None = None  # the slide whose provenance the others must match
        unrecorded: list[str] = []
        for where, sid, label, row in rows:
            path = self.feature_dir / f"{sid}.h5"
            if not path.is_file():
                self.missing.append(sid)
                continue
            key = str(int(label)) if label.lstrip("-").isdigit() else label
            if key not in index:
                raise ValueError(f"label CSV {labels_csv}: slide {sid} has label {label!r}, not in {self.classes}")
            header = _feature_header(path, sid)
            dim, file_backbone = header["dim"], header["backbone"]
            if header["n"] == 0:
                raise FeatureFileError(
                    f"slide {sid}: feature file {path} holds 0 tiles (an empty bag; {where}): a MIL head cannot "
                    "classify a slide without instances; extract it again (lower --min-tissue?) or remove the row"
                )
            in_dim = in_dim or dim
            if dim != in_dim:
                raise FeatureMismatchError(
                    f"slide {sid}: {path} has {dim}-d features ({file_backbone}) but {in_dim}-d are expected; "
                    "the files come from different backbones: re-extract or rebuild the head with in_dim="
                )
            if backbone is not None and file_backbone != backbone:
                raise FeatureMismatchError(
                    f"slide {sid}: {path} was extracted with {file_backbone!r}, not {backbone!r}"
                )
            provenance = header["provenance"]
            if provenance is None:
                unrecorded.append(sid)
            elif first is None:
                first, self.provenance = (sid, path), provenance
            else:
                diff = describe_diff(self.provenance, provenance, f"slide {first[0]}", f"slide {sid}")
                if diff:
                    raise FeatureMismatchError(
                        f"slide {sid}: {path} and slide {first[0]}: {first[1]} were extracted differently ({diff}); "
                        "bags made two ways cannot be mixed: extract all slides again into one folder"
                    )
            self.records.append({**row, "slide_id": sid, "label": index[key], "path": path})
        self.in_dim = in_dim
        if self.missing:
            warnings.warn(
                f"{len(self.missing)} slide(s) of {labels_csv} have no feature file in {self.feature_dir} and "
                f"are skipped: {', '.join(self.missing[:10])}{' ...' if len(self.missing) > 10 else ''}",
                stacklevel=2,
            )
        if unrecorded and self.provenance is not None:
            warnings.warn(
                f"{len(unrecorded)} feature file(s) in {self.feature_dir} record no provenance (older zoo) and "
                f"cannot be checked against the others' weights {self.provenance.get('weights')!r}: "
                f"{', '.join(unrecorded[:10])}{' ...' if len(unrecorded) > 10 else ''}",
                stacklevel=2,
            )
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r["label"] for r in self.records]

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if i not in self._cache:  # bags are small (N x D fp16): keep them in RAM, as ACMIL does
            rec = self.records[i]
            data = read_feature_file(rec["path"], rec["slide_id"])
            features = data["features"]
            bad = ~np.isfinite(features).all(axis=1)
            if bad.any():  # a NaN feature turns the slide's prediction into NaN without a word
                raise FeatureFileError(
                    f"slide {rec['slide_id']}: feature file {rec['path']} has NaN or infinite features in "
                    f"{int(bad.sum())} of {len(features)} tiles; extract it again (float16=False if float16 "
                    "overflowed)"
                )
            self._cache[i] = dict(
                features=torch.from_numpy(features),
                label=rec["label"],
                slide_id=rec["slide_id"],
                coords=data["coords"],
            )
        return self._cache[i]
