"""``zoo validate NAME --checkpoint F --data D``: top-1 / top-5, loss and img/s of a checkpoint.

Rows go to a CSV in timm's ``results-imagenet.csv`` schema (``model, top1, top1_err, top5, top5_err,
param_count, img_size, crop_pct, interpolation``). Preprocessing: the model's ``pretrained_cfg`` mean / std /
crop / interpolation, replaced by the values a ``zoo train`` checkpoint recorded, replaced by flags.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from timm.models import clean_state_dict

import zoo

from .._io import load_state_dict_checked
from ..data.embedded import EmbeddedDataset, canonical_name, load_embedded
from .checkpoint import load_checkpoint_file, load_sharded
from .data import SafeImageFolder, build_eval_loader, check_image_folder
from .loop import check_model_name

RESULTS_COLUMNS = (
    "model",
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "param_count",
    "img_size",
    "crop_pct",
    "interpolation",
)


@dataclass
class ValidateResult:
    model: str
    top1: float
    top5: float
    loss: float
    img_per_s: float
    count: int
    param_count: float
    img_size: int
    crop_pct: float
    interpolation: str

    def results_row(self) -> dict[str, Any]:
        """One row in timm's results-imagenet.csv schema."""
        return dict(
            model=self.model,
            top1=round(self.top1, 3),
            top1_err=round(100 - self.top1, 3),
            top5=round(self.top5, 3),
            top5_err=round(100 - self.top5, 3),
            param_count=round(self.param_count, 2),
            img_size=self.img_size,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )


def _load_checkpoint(path: str | Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a ``zoo train`` checkpoint or a plain / timm-style state dict.

    Loaded with ``weights_only=True``: a file that needs pickle is refused, naming the file.
    """
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    if ckpt.get("sharded_dir"):  # an FSDP run's folder: weights are read after the model is built
        if use_ema:
            raise ValueError(f"--use-ema: sharded checkpoint {path} has no EMA weights (FSDP runs keep none)")
        return {}, ckpt
    if "model" in ckpt and isinstance(ckpt["model"], dict):  # zoo train
        if use_ema:
            if not ckpt.get("ema"):
                raise ValueError(f"--use-ema: checkpoint {path} has no EMA weights (trained without --loop.ema)")
            state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
        else:
            state = ckpt["model"]
        return state, ckpt
    for key in (("state_dict_ema", "model_ema") if use_ema else ()) + ("state_dict",):
        if key in ckpt and isinstance(ckpt[key], dict):
            return clean_state_dict(ckpt[key]), {}
    if use_ema:
        raise ValueError(f"--use-ema: checkpoint {path} has no EMA weights ('state_dict_ema' / 'model_ema')")
    return clean_state_dict(ckpt), {}


def _dataset(data: str, transform: Any, in_chans: int, split: str, limit: int) -> tuple[Any, list[str]]:
    mode = "L" if in_chans == 1 else "RGB"
    if canonical_name(data):
        ds = EmbeddedDataset(
            load_embedded(data), "test" if split == "val" else split, transform, mode=mode, limit=limit
        )
        return ds, ds.classes
    root = Path(data)
    folder = root / split if (root / split).is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if folder == root / split and (root / "train").is_dir():
        check_image_folder(root, "train", split)  # same class folders as training, else labels are wrong
    ds = SafeImageFolder(folder, transform, mode=mode)
    if limit:
        ds.samples = ds.samples[:limit]
    return ds, list(ds.classes)


@torch.no_grad()
def validate(
    name: str,
    checkpoint: str | Path | None,
    data: str,
    split: str = "val",
    batch_size: int = 64,
    num_workers: int = 2,
    img_size: int = 0,
    crop_pct: float = 0.0,
    interpolation: str = "",
    use_ema: bool = False,
    device: str = "",
    limit: int = 0,
    results_file: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
) -> ValidateResult:
    """Evaluate ``name`` with ``checkpoint``'s weights (or its ``pretrained`` ones) on ``data``; see module doc.

    Raises:
        ValueError: no weights given, an empty checkpoint, or one that does not match the model (another
            architecture, num_classes or in_chans) -- never a silent evaluation of random weights.
    """
    check_model_name(name)
    if not checkpoint and not pretrained:
        raise ValueError(
            f"no weights to validate for {name}: pass --checkpoint FILE or --pretrained (random weights would "
            "give a meaningless accuracy)"
        )
    if checkpoint and pretrained:
        raise ValueError("pass --checkpoint or --pretrained, not both")
    state, meta = _load_checkpoint(checkpoint, use_ema) if checkpoint else ({}, {})
    if checkpoint and not state and not meta.get("sharded_dir"):
        raise ValueError(f"checkpoint {checkpoint} holds no weights (its state dict is empty)")
    trained = meta.get("model_name")
    if trained and trained.split(".")[0] != name.split(".")[0]:
        raise ValueError(
            f"checkpoint {checkpoint} was trained as {trained}, not {name}; run `zoo validate {trained} ...`"
        )
    stored = meta.get("config", {})
    kwargs = dict(stored.get("model", {}).get("kwargs", {}))
    kwargs.update(model_kwargs or {})
    classifier = zoo.get_pretrained_cfg_value(name.split(".")[0], "classifier") or "head.fc"
    weight = state.get(f"{classifier}.weight")
    num_classes = meta.get("num_classes") or (weight.shape[0] if weight is not None else None)
    if num_classes is None:
        _, classes = _dataset(data, None, 3, split, limit)
        num_classes = len(classes)
    in_chans = meta.get("in_chans", 3)
    model = zoo.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if state:
        load_state_dict_checked(model, state, f"checkpoint {checkpoint}", model_name=name)
    elif meta.get("sharded_dir"):
        weights = model.state_dict()
        load_sharded({"model": weights}, meta["sharded_dir"])
        load_state_dict_checked(model, weights, f"checkpoint {checkpoint}", model_name=name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()

    cfg = resolve_data_config(model=model)  # the model's pretrained_cfg
    cfg.update({k: v for k, v in meta.get("data_config", {}).items() if k in cfg})  # what training used
    if img_size:
        cfg["input_size"] = (in_chans, img_size, img_size)
    cfg["crop_pct"] = crop_pct or cfg["crop_pct"]
    cfg["interpolation"] = interpolation or cfg["interpolation"]
    if len(cfg["mean"]) != in_chans:
        cfg["mean"] = (sum(cfg["mean"]) / len(cfg["mean"]),) * in_chans
        cfg["std"] = (sum(cfg["std"]) / len(cfg["std"]),) * in_chans
    transform = create_transform(**cfg, is_training=False)
    dataset, _ = _dataset(data, transform, in_chans, split, limit)
    loader = build_eval_loader(dataset, batch_size, num_workers)

    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss, top1, top5, count, compute_time = 0.0, 0, 0, 0, 0.0
    for images, targets, skipped in loader:
        for path in skipped:
            print(f"warning: skipped unreadable image {path}", flush=True)
        if len(images) == 0:
            continue
        images, targets = images.to(dev), targets.to(dev)
        t0 = time.perf_counter()
        logits = model(images)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        compute_time += time.perf_counter() - t0
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        loss += loss_fn(logits, targets).item()
        top1 += (top[:, 0] == targets).sum().item()
        top5 += (top == targets[:, None]).any(dim=1).sum().item()
        count += len(targets)
    if count == 0:
        raise ValueError(f"no images evaluated from {data}")
    result = ValidateResult(
        model=name,
        top1=100 * top1 / count,
        top5=100 * top5 / count,
        loss=loss / count,
        img_per_s=count / max(compute_time, 1e-9),
        count=count,
        param_count=sum(p.numel() for p in model.parameters()) / 1e6,
        img_size=cfg["input_size"][-1],
        crop_pct=cfg["crop_pct"],
        interpolation=cfg["interpolation"],
    )
    if results_file:
        write_results([result], results_file)
    return result


def write_results(results: list[ValidateResult], path: str | Path) -> Path:
    """Append rows (header when the file is new) in timm's results-imagenet.csv schema."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULTS_COLUMNS)
        if new:
            writer.writeheader()
        for r in results:
            writer.writerow(r.results_row())
    return path
