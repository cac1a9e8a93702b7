"""Visual-search displays and object-level scanpaths: reader, validator, tensors, synthetic coins task.

File format (JSON; ``scanpaths`` may instead come from a CSV file):

```json
{"displays": [{"id": "d0", "image": "shelf0.png", "grid": [4, 6], "target": 5,
               "objects": [{"id": 0, "box": [x0, y0, x1, y1], "row": 0, "col": 0}, ...]}],
 "scanpaths": [{"display": "d0", "subject": "s1", "fixations": [3, 4, 5], "durations": [0.21, 0.18, 0.3]}]}
```

* ``image`` is relative to the JSON file (or absolute); ``box`` is in pixels, ``row`` / ``col`` place the
  object on the display's ``grid`` [rows, cols]; ``target`` is an object id of that display.
* A scanpath lists the fixated object ids in order (human data: each fixation already assigned to an
  object); ``durations`` (seconds) are optional. CSV scanpaths: columns ``display,subject,fixations`` and
  optionally ``durations``, lists separated by spaces.
* Objects are indexed in raster order (``row * cols + col``) inside a display; ``Scanpath.fixations``
  holds these indices. Every problem (an object id a display lacks, a display without a target, an empty
  scanpath, a box outside the image, two objects on one grid cell) is a ``ScanpathDataError`` naming the
  display or scanpath record and the fix.

``ScanpathDataset`` turns records into tensors (crops resized to ``crop_size``, grid positions, object
mask, target index, fixation indices); ``collate_scanpaths`` pads a batch. ``synthetic_coins_search``
builds the seeded test task from scikit-image's ``coins()`` (the rule is in its docstring). This module
knows no model: vocabulary (EOS / PAD / BOS) belongs to the scanpath head.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._io import confined_path, plain_name

__all__ = [
    "Display",
    "DisplayObject",
    "Scanpath",
    "ScanpathData",
    "ScanpathDataError",
    "ScanpathDataset",
    "coins_objects",
    "collate_scanpaths",
    "display_crops",
    "read_scanpaths",
    "scanpaths_from_dict",
    "synthetic_coins_search",
    "validate_display",
    "write_scanpaths",
]


class ScanpathDataError(ValueError):
    """A display or scanpath record is invalid; the message names the record."""


@dataclass
class DisplayObject:
    id: Any
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    row: int
    col: int


@dataclass
class Display:
    id: str
    image: str | np.ndarray  # path, or an (H, W) / (H, W, 3) array held in memory
    grid: tuple[int, int]
    target: Any  # object id
    objects: list[DisplayObject]  # raster order after validation

    @property
    def target_index(self) -> int:
        return next(i for i, o in enumerate(self.objects) if o.id == self.target)

    def index_of(self, object_id: Any) -> int | None:
        for i, o in enumerate(self.objects):
            if o.id == object_id:
                return i
        return None


@dataclass
class Scanpath:
    display: str
    subject: str
    fixations: list[int]  # object indices of the display (raster order)
    durations: list[float] | None = None


@dataclass
class ScanpathData:
    displays: dict[str, Display]
    scanpaths: list[Scanpath] = field(default_factory=list)

    @property
    def max_objects(self) -> int:
        return max(len(d.objects) for d in self.displays.values())

    @property
    def grid(self) -> tuple[int, int]:
        """The largest grid of the displays (rows, cols)."""
        return tuple(max(d.grid[i] for d in self.displays.values()) for i in (0, 1))  # type: ignore[return-value]


def _display_from_dict(rec: dict[str, Any], index: int, root: Path) -> Display:
    name = f"display #{index} (id {rec.get('id', '?')!r})"
    for key in ("id", "grid", "objects"):
        if key not in rec:
            raise ScanpathDataError(f"{name} has no {key!r} field")
    if rec.get("target") is None:
        raise ScanpathDataError(f"{name} has no target: set 'target' to the id of one of its objects")
    image = rec.get("image")
    if isinstance(image, str):  # relative to the JSON's folder and confined to it (a file handed in)
        image = str(confined_path(root, image, "image", name))
    elif image is not None:
        raise ScanpathDataError(f"{name}: 'image' must be a path relative to the displays file, got {image!r}")
    objects = [
        DisplayObject(
            o.get("id"), tuple(float(v) for v in o.get("box", ())), int(o.get("row", -1)), int(o.get("col", -1))
        )
        for o in rec["objects"]
    ]
    return Display(str(rec["id"]), image, (int(rec["grid"][0]), int(rec["grid"][1])), rec["target"], objects)


def validate_display(display: Display) -> Display:
    """Check one display and sort its objects into raster order; raises ``ScanpathDataError``."""
    name = f"display {display.id!r}"
    rows, cols = display.grid
    if rows < 1 or cols < 1:
        raise ScanpathDataError(f"{name}: grid {display.grid} must be [rows >= 1, cols >= 1]")
    if not display.objects:
        raise ScanpathDataError(f"{name} has no objects")
    ids, cells = set(), {}
    for o in display.objects:
        if o.id in ids:
            raise ScanpathDataError(f"{name}: object id {o.id!r} appears twice")
        ids.add(o.id)
        if not (0 <= o.row < rows and 0 <= o.col < cols):
            raise ScanpathDataError(
                f"{name}: object {o.id!r} at row {o.row}, col {o.col} is outside the {rows}x{cols} grid"
            )
        if (o.row, o.col) in cells:
            raise ScanpathDataError(
                f"{name}: objects {cells[(o.row, o.col)]!r} and {o.id!r} share grid cell ({o.row}, {o.col})"
            )
        cells[(o.row, o.col)] = o.id
        if len(o.box) != 4 or not (o.box[2] > o.box[0] and o.box[3] > o.box[1]):
            raise ScanpathDataError(
                f"{name}: object {o.id!r} has box {list(o.box)}; expected [x0, y0, x1, y1] with x1 > x0, y1 > y0"
            )
    if display.target not in ids:
        raise ScanpathDataError(f"{name}: target {display.target!r} is not one of its object ids")
    if isinstance(display.image, str) and not os.path.isfile(display.image):
        raise ScanpathDataError(f"{name}: image file {display.image} does not exist")
    display.objects.sort(key=lambda o: o.row * cols + o.col)
    return display


def _scanpath_from_record(rec: dict[str, Any], index: int, displays: dict[str, Display]) -> Scanpath:
    name = f"scanpath #{index} (display {rec.get('display')!r}, subject {rec.get('subject')!r})"
    display = displays.get(str(rec.get("display")))
    if display is None:
        raise ScanpathDataError(f"{name} refers to a display that does not exist")
    fixations = rec.get("fixations") or []
    if not len(fixations):
        raise ScanpathDataError(f"{name} is empty: a scanpath needs at least one fixated object")
    indices = []
    for object_id in fixations:
        idx = display.index_of(object_id)
        if idx is None:  # CSV gives strings: try the integer id
            idx = display.index_of(int(object_id)) if str(object_id).lstrip("-").isdigit() else None
        if idx is None:
            raise ScanpathDataError(f"{name} fixates object {object_id!r}, which display {display.id!r} does not have")
        indices.append(idx)
    durations = rec.get("durations")
    if durations is not None and len(durations) and len(durations) != len(indices):
        raise ScanpathDataError(f"{name} has {len(indices)} fixations but {len(durations)} durations")
    return Scanpath(
        display.id, str(rec.get("subject", "")), indices, [float(d) for d in durations] if durations else None
    )


def _read_csv_scanpaths(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        rec = dict(display=row.get("display"), subject=row.get("subject", ""))
        rec["fixations"] = (row.get("fixations") or "").split()
        if row.get("durations"):
            rec["durations"] = [float(v) for v in row["durations"].split()]
        out.append(rec)
    return out


def read_scanpaths(path: str | os.PathLike, scanpaths: str | os.PathLike | None = None) -> ScanpathData:
    """Read and validate displays (+ scanpaths) from a JSON file, scanpaths optionally from a CSV file."""
    path = Path(path)
    if not path.is_file():
        raise ScanpathDataError(f"displays file {path} does not exist (pass a JSON file or 'synthetic-coins')")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScanpathDataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ScanpathDataError(f"{path} must hold a JSON object with a 'displays' list, not {type(doc).__name__}")
    if scanpaths is not None and not Path(scanpaths).is_file():
        raise ScanpathDataError(f"scanpaths file {scanpaths} does not exist")
    return scanpaths_from_dict(doc, path.parent, scanpaths)


def scanpaths_from_dict(
    doc: dict[str, Any], root: str | os.PathLike = ".", scanpaths: str | os.PathLike | None = None
) -> ScanpathData:
    """Validate a parsed document (``{'displays': [...], 'scanpaths': [...]}``)."""
    root = Path(root)
    displays: dict[str, Display] = {}
    for i, rec in enumerate(doc.get("displays", [])):
        display = validate_display(_display_from_dict(rec, i, root))
        if display.id in displays:
            raise ScanpathDataError(f"display #{i}: id {display.id!r} is used by two displays")
        displays[display.id] = display
    if not displays:
        raise ScanpathDataError("no displays: the file needs a non-empty 'displays' list")
    records = _read_csv_scanpaths(Path(scanpaths)) if scanpaths is not None else doc.get("scanpaths", [])
    return ScanpathData(displays, [_scanpath_from_record(r, i, displays) for i, r in enumerate(records)])


def write_scanpaths(data: ScanpathData, path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> Path:
    """Write ``data`` in the JSON format above; in-memory images are saved as PNGs in ``image_dir``."""
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent
    displays = []
    for d in data.displays.values():
        image = d.image
        if isinstance(image, np.ndarray):
            from PIL import Image

            image_dir.mkdir(parents=True, exist_ok=True)
            out = image_dir / f"{plain_name(d.id, 'display id')}.png"  # an id never writes outside image_dir
            Image.fromarray(image.astype(np.uint8)).save(out)
            image = str(out)
        if isinstance(image, str):
            image = os.path.relpath(image, path.parent)
            if image.split(os.sep)[0] == "..":  # the reader confines images to the JSON's folder
                raise ScanpathDataError(f"display {d.id!r}: image {d.image} must be inside the folder of {path}")
        objects = [dict(id=o.id, box=list(o.box), row=o.row, col=o.col) for o in d.objects]
        displays.append(dict(id=d.id, image=image, grid=list(d.grid), target=d.target, objects=objects))
    scanpaths = []
    for sp in data.scanpaths:
        ids = [data.displays[sp.display].objects[i].id for i in sp.fixations]
        rec = dict(display=sp.display, subject=sp.subject, fixations=ids)
        scanpaths.append(dict(rec, durations=sp.durations) if sp.durations else rec)
    path.write_text(json.dumps(dict(displays=displays, scanpaths=scanpaths), indent=1))
    return path


# ---------------------------------------------------------------------------------------------- tensors


def _load_image(image: str | np.ndarray) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    if isinstance(image, str):
        from PIL import Image

        array = np.array(Image.open(image).convert("RGB"))  # a writable copy
    else:
        array = np.asarray(image)
    tensor = torch.as_tensor(array, dtype=torch.float32)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(-1).expand(-1, -1, 3)
    # one scale for every source (the original mixed 0-255 and 0-1 crops between data sets)
    return tensor.permute(2, 0, 1) / (255.0 if tensor.max() > 1.0 else 1.0)


def display_crops(display: Display, crop_size: tuple[int, int]) -> torch.Tensor:
    """Object crops (P, 3, H, W) of a display, resized (bilinear) to ``crop_size`` (H, W)."""
    image = _load_image(display.image)
    _, H, W = image.shape
    crops = []
    for o in display.objects:
        x0, y0, x1, y1 = (int(round(v)) for v in o.box)
        if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
            raise ScanpathDataError(
                f"display {display.id!r}: box {list(o.box)} of object {o.id!r} is outside the {W}x{H} image"
            )
        crop = image[:, y0:y1, x0:x1].unsqueeze(0)
        crops.append(F.interpolate(crop, size=crop_size, mode="bilinear", align_corners=False)[0])
    return torch.stack(crops)


class ScanpathDataset(torch.utils.data.Dataset):
    """One item per scanpath: a dict of tensors.

    Item keys: ``crops`` (P, 3, H, W), ``positions`` (P, 2) long (row, col), ``target`` () long (object
    index), ``fixations`` (T,) long (object indices), ``display`` (str), ``subject`` (str). Crops are
    computed once per display.
    """

    def __init__(
        self, data: ScanpathData, crop_size: tuple[int, int] = (150, 93), scanpaths: list[Scanpath] | None = None
    ):
        self.data = data
        self.crop_size = tuple(crop_size)
        self.scanpaths = data.scanpaths if scanpaths is None else scanpaths
        self._crops: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.scanpaths)

    def display_item(self, display_id: str) -> dict[str, Any]:
        """The display part of an item (no fixations)."""
        display = self.data.displays[display_id]
        if display_id not in self._crops:
            self._crops[display_id] = display_crops(display, self.crop_size)
        return dict(
            crops=self._crops[display_id],
            positions=torch.tensor([[o.row, o.col] for o in display.objects], dtype=torch.long),
            target=torch.tensor(display.target_index),
            display=display_id,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        sp = self.scanpaths[index]
        return dict(
            self.display_item(sp.display), fixations=torch.tensor(sp.fixations, dtype=torch.long), subject=sp.subject
        )


def collate_scanpaths(items: list[dict[str, Any]], max_objects: int | None = None) -> dict[str, Any]:
    """Pad a list of items: ``crops`` (B, P, 3, H, W), ``positions`` (B, P, 2), ``object_mask`` (B, P) (True
    = real object), ``target`` (B,), ``fixations`` (B, T) padded with -1, ``lengths`` (B,)."""
    P = max_objects or max(len(it["crops"]) for it in items)
    B = len(items)
    crop_shape = items[0]["crops"].shape[1:]
    crops = torch.zeros(B, P, *crop_shape)
    positions = torch.zeros(B, P, 2, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.bool)
    for b, it in enumerate(items):
        n = len(it["crops"])
        if n > P:
            raise ScanpathDataError(f"display {it['display']!r} has {n} objects, more than the model's {P}")
        crops[b, :n], positions[b, :n], mask[b, :n] = it["crops"], it["positions"], True
    out: dict[str, Any] = dict(
        crops=crops, positions=positions, object_mask=mask, target=torch.stack([it["target"] for it in items]),
        display=[it["display"] for it in items],
    )  # fmt: skip
    if "fixations" in items[0]:
        lengths = torch.tensor([len(it["fixations"]) for it in items])
        fixations = torch.full((B, int(lengths.max())), -1, dtype=torch.long)
        for b, it in enumerate(items):
            fixations[b, : len(it["fixations"])] = it["fixations"]
        out.update(fixations=fixations, lengths=lengths, subject=[it["subject"] for it in items])
    return out


# ---------------------------------------------------------------------------------------------- synthetic


def coins_objects(min_area: int = 300) -> tuple[np.ndarray, list[DisplayObject]]:
    """scikit-image's ``coins()`` segmented (Sobel, watershed with markers < 30 / > 150, hole filling, area
    > ``min_area``): the image (303, 384) and 24 coins on a 4 x 6 grid (rows by centroid y, columns by x)."""
    from scipy import ndimage
    from skimage import data, filters, measure, segmentation

    image = data.coins()
    markers = np.zeros_like(image, dtype=np.int32)
    markers[image < 30], markers[image > 150] = 1, 2
    mask = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(image), markers) == 2)
    regions = [r for r in measure.regionprops(measure.label(mask)) if r.area > min_area]
    regions.sort(key=lambda r: r.centroid[0])
    rows = 4 if len(regions) == 24 else int(round(np.sqrt(len(regions) * 303 / 384)))
    per_row = int(np.ceil(len(regions) / rows))
    objects = []
    for row in range(rows):
        in_row = sorted(regions[row * per_row : (row + 1) * per_row], key=lambda r: r.centroid[1])
        for col, r in enumerate(in_row):
            y0, x0, y1, x1 = r.bbox
            objects.append(DisplayObject(len(objects), (float(x0), float(y0), float(x1), float(y1)), row, col))
    return image, objects


def synthetic_coins_search(
    num_displays: int = 200,
    subjects_per_display: int = 1,
    seed: int = 0,
    p_second_nearest: float = 0.15,
    p_refixate: float = 0.1,
    gamma_shape: float = 4.0,
    gamma_scale: float = 0.06,
) -> ScanpathData:
    """A seeded, clearly synthetic visual-search task on real objects (no human gaze, no realism claimed).

    Every display is ``coins()`` with its 24 coins on a 4 x 6 grid; display ``i`` has a target drawn
    uniformly. Rule for each scanpath: start at the coin nearest to the image centre; then repeatedly (a)
    with probability ``p_refixate`` fixate the same coin again, else (b) move to the nearest coin not yet
    visited (inhibition of return; the second nearest with probability ``p_second_nearest``); stop right
    after the target is fixated. Durations are Gamma(``gamma_shape``, ``gamma_scale``) seconds.
    """
    rng = np.random.default_rng(seed)
    image, objects = coins_objects()
    centres = np.array([((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2) for o in objects])
    H, W = image.shape
    displays, scanpaths = {}, []
    start = int(np.argmin(np.linalg.norm(centres - np.array([W / 2, H / 2]), axis=1)))
    for i in range(num_displays):
        target = int(rng.integers(len(objects)))
        did = f"coins_{i:04d}"
        displays[did] = Display(did, image, (4, 6), target, [DisplayObject(o.id, o.box, o.row, o.col) for o in objects])
        for s in range(subjects_per_display):
            path, visited = [start], {start}
            while path[-1] != target:
                if rng.random() < p_refixate:
                    path.append(path[-1])
                    continue
                dist = np.linalg.norm(centres - centres[path[-1]], axis=1)
                order = [j for j in np.argsort(dist) if j not in visited]
                nxt = order[1] if len(order) > 1 and rng.random() < p_second_nearest else order[0]
                path.append(int(nxt))
                visited.add(int(nxt))
            durations = rng.gamma(gamma_shape, gamma_scale, size=len(path)).round(3).tolist()
            scanpaths.append(Scanpath(did, f"synthetic{s}", path, durations))
    return ScanpathData(displays, scanpaths)
