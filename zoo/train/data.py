"""Datasets, samplers and loaders of the training loop, on timm's transforms and samplers.

Sources: an embedded set (``zoo.data.embedded``), an ImageNet-style folder (``ROOT/train/<class>/*``,
``ROOT/val/<class>/*``), or WebDataset shards (optional ``webdataset`` package).

Exact resume: the sampler yields ``(epoch, index)`` and ``SeededSample`` seeds ``random``, NumPy and torch
from ``(seed, epoch, index)`` before each transform, so a sample's augmentation does not depend on the
worker, the number of workers, the world size or whether the run was resumed. ``ResumableSampler`` starts
an epoch at a given batch, which is the "sampler position" stored in checkpoints.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder

from ..data.embedded import EmbeddedDataset, canonical_name, load_embedded
from .config import Config

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data source problem found before training starts (missing folder, class mismatch, ...)."""


@dataclass
class Corrupt:
    """Stands in for a sample whose image could not be read (filtered out by ``collate_skip``)."""

    path: str
    error: str


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_image_folder(root: str | Path, train_split: str = "train", val_split: str = "val") -> list[str]:
    """Validate an ImageNet-style folder before any work; returns the class names.

    Errors (``DataError``) name the folder and the fix: missing root or split, no class folders, a class
    folder without images, train and val class folders that differ.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass --data ROOT with ROOT/{train_split}/<class>/*.jpg")
    classes: dict[str, list[str]] = {}
    for split in (train_split, val_split):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} does not exist; expected {root}/{split}/<class>/<images>")
        names = _class_dirs(split_dir)
        if not names:
            raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<images>")
        empty = [n for n in names if not any(p.suffix.lower() in IMG_EXTENSIONS for p in (split_dir / n).rglob("*"))]
        if empty:
            raise DataError(f"{split_dir}: class folder(s) without images: {empty[:10]} (extensions {IMG_EXTENSIONS})")
        classes[split] = names
    train, val = set(classes[train_split]), set(classes[val_split])
    if train != val:
        raise DataError(
            f"class folders differ between {root / train_split} and {root / val_split}: only in {train_split}: "
            f"{sorted(train - val)[:10]}, only in {val_split}: {sorted(val - train)[:10]}; the label of a class is "
            "its index in the sorted list, so both splits need the same folders"
        )
    return classes[train_split]


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` whose unreadable images become ``Corrupt(path)`` (skip) or an error naming the path."""

    def __init__(self, root: str | Path, transform: Callable | None = None, on_error: str = "skip", mode: str = "RGB"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}; expected 'skip' or 'raise'")
        super().__init__(str(root), transform=transform, loader=self._load)
        self.on_error = on_error
        self.mode = mode

    def _load(self, path: str) -> Image.Image:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now: a truncated file fails here, not later in a transform
            return image.convert(self.mode)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as err:  # noqa: BLE001 - PIL raises several types for bad files
            if self.on_error == "raise":
                raise RuntimeError(f"cannot read image {path}: {err} (use --data.corrupt skip to skip it)") from err
            return Corrupt(path, f"{type(err).__name__}: {err}"), target
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class SeededSample(Dataset):
    """Wraps a dataset indexed by ``(epoch, index)``; seeds every RNG from (seed, epoch, index) first."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch) * 100_000_007 + index
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:  # keep the training RNG streams untouched when loading in the main process
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        torch.manual_seed(sample_seed)
        try:
            return self.dataset[index]
        finally:
            if in_main:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class ResumableSampler(Sampler):
    """Yields ``(epoch, index)`` from a per-epoch base sampler, starting ``start_batch`` batches in."""

    def __init__(self, base: Sampler, batch_size: int):
        self.base, self.batch_size = base, batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.base)[self.start_batch * self.batch_size :]
        return iter([(self.epoch, int(i)) for i in indices])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.start_batch * self.batch_size)  # type: ignore[arg-type]


class ShardSampler(Sampler):
    """Evaluation: rank r takes indices r, r + world, ... (no padding, so metrics count each sample once)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(0, i) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


def collate_skip(batch: Sequence[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack a batch, dropping ``Corrupt`` samples; returns ``(images (B, C, H, W), targets (B,), skipped paths)``."""
    good = [(x, y) for x, y in batch if not isinstance(x, Corrupt)]
    skipped = [x.path for x, _ in batch if isinstance(x, Corrupt)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([x for x, _ in good])
    targets = torch.tensor([y for _, y in good], dtype=torch.long)
    return images, targets, skipped


@dataclass
class DataBundle:
    """What the loop needs from the data side."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    classes: list[str]
    data_config: dict[str, Any]


def source_kind(source: str) -> str:
    """``'embedded'``, ``'wds'`` or ``'folder'`` for a ``--data`` value."""
    if canonical_name(source):
        return "embedded"
    if source == "wds":
        return "wds"
    return "folder"


def check_source(cfg: Config) -> list[str] | None:
    """Pre-flight check of ``--data`` (before the model is built); returns folder classes when a folder."""
    kind = source_kind(cfg.data.source)
    if kind == "folder":
        return check_image_folder(cfg.data.source, cfg.data.train_split, cfg.data.val_split)
    if kind == "wds":
        try:
            import webdataset  # noqa: F401
        except ImportError as err:
            raise DataError("--data wds needs the webdataset package: pip install webdataset") from err
        if not cfg.data.wds_train or not cfg.data.wds_train_samples or not cfg.data.wds_num_classes:
            raise DataError("--data wds needs --data.wds_train, --data.wds_train_samples and --data.wds_num_classes")
        return None
    load_embedded(cfg.data.source)  # raises a clear error when the set is not installed
    return None


def default_in_chans(cfg: Config) -> int:
    if cfg.data.in_chans:
        return cfg.data.in_chans
    return 1 if source_kind(cfg.data.source) == "embedded" else 3


def resolve_data_config(cfg: Config, pretrained_cfg: dict[str, Any], in_chans: int) -> dict[str, Any]:
    """Input size, interpolation, mean/std and crop from the model's pretrained_cfg, overridden by flags."""
    size = pretrained_cfg.get("input_size", (3, 224, 224))
    img_size = cfg.data.img_size or size[-1]
    mean = tuple(pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
    if in_chans != len(mean):  # e.g. gray input to an ImageNet model: one channel at the average statistics
        mean, std = (float(np.mean(mean)),) * in_chans, (float(np.mean(std)),) * in_chans
    return dict(
        input_size=(in_chans, img_size, img_size),
        interpolation=cfg.aug.interpolation or pretrained_cfg.get("interpolation", "bicubic"),
        mean=mean,
        std=std,
        crop_pct=cfg.aug.crop_pct or pretrained_cfg.get("crop_pct", 0.875),
    )


def build_transforms(cfg: Config, data_config: dict[str, Any]) -> tuple[Callable, Callable]:
    """timm's training transform (RandAugment, colour jitter, random erasing) and eval transform."""
    a = cfg.aug
    train_tf = create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        no_aug=a.no_aug,
        scale=tuple(a.scale),
        hflip=a.hflip,
        color_jitter=a.color_jitter,
        auto_augment=a.auto_augment or None,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=a.reprob,
        re_mode=a.remode,
    )
    eval_tf = create_transform(
        input_size=data_config["input_size"],
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
    )
    return train_tf, eval_tf


def build_datasets(cfg: Config, pretrained_cfg: dict[str, Any]) -> DataBundle:
    """Train and val datasets with timm transforms for ``cfg.data.source``."""
    in_chans = default_in_chans(cfg)
    data_config = resolve_data_config(cfg, pretrained_cfg, in_chans)
    train_tf, eval_tf = build_transforms(cfg, data_config)
    mode = "L" if in_chans == 1 else "RGB"
    kind = source_kind(cfg.data.source)
    if kind == "embedded":
        data = load_embedded(cfg.data.source)
        train = EmbeddedDataset(data, "train", train_tf, mode=mode, limit=cfg.data.limit_train)
        val = EmbeddedDataset(data, "val", eval_tf, mode=mode, limit=cfg.data.limit_val)
        classes = list(data.classes)
    elif kind == "folder":
        root = Path(cfg.data.source)
        train = SafeImageFolder(root / cfg.data.train_split, train_tf, on_error=cfg.data.corrupt, mode=mode)
        val = SafeImageFolder(root / cfg.data.val_split, eval_tf, on_error=cfg.data.corrupt, mode=mode)
        for ds, limit in ((train, cfg.data.limit_train), (val, cfg.data.limit_val)):
            if limit:
                ds.samples = ds.samples[:limit]
                ds.targets = ds.targets[:limit]
        classes = list(train.classes)
    else:
        return _build_wds(cfg, train_tf, eval_tf, data_config, in_chans)
    return DataBundle(train, val, len(classes), in_chans, classes, data_config)


def build_train_loader(
    cfg: Config, dataset: Dataset, rank: int, world_size: int, micro_batch: int
) -> tuple[DataLoader, ResumableSampler | None]:
    """Training loader: a shuffling (or repeated-augmentation) sampler per rank, drop_last, seeded samples."""
    if isinstance(dataset, torch.utils.data.IterableDataset):  # WebDataset: the stream shards itself
        loader = DataLoader(
            dataset, batch_size=micro_batch, num_workers=cfg.data.num_workers, collate_fn=collate_skip, drop_last=True
        )
        return loader, None
    if cfg.aug.repeated_aug:
        base: Sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=cfg.aug.repeated_aug)
    else:
        base = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.loop.seed, drop_last=True
        )
    sampler = ResumableSampler(base, micro_batch)
    loader = DataLoader(
        SeededSample(dataset, cfg.loop.seed),
        batch_sampler=BatchSampler(sampler, micro_batch, drop_last=True),
        num_workers=cfg.data.num_workers,
        collate_fn=collate_skip,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.data.num_workers > 0,
        # a private generator: creating an iterator must not draw from the global torch RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.loop.seed),
    )
    return loader, sampler


def build_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Evaluation loader: each rank a disjoint shard, in order, no padding."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip)
    return DataLoader(
        SeededSample(dataset, 0),
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate_skip,
        generator=torch.Generator().manual_seed(0),  # never draw from the training RNG (exact resume)
    )


def _build_wds(cfg: Config, train_tf: Callable, eval_tf: Callable, data_config: dict, in_chans: int) -> DataBundle:
    import webdataset as wds

    def pipeline(urls: str, transform: Callable, train: bool) -> Dataset:
        ds = wds.WebDataset(
            urls, shardshuffle=100 if train else False, nodesplitter=wds.split_by_node, empty_check=False
        )
        if train:
            ds = ds.shuffle(1000)
        ds = ds.decode("pil").to_tuple("jpg;jpeg;png;webp", "cls").map_tuple(transform, int)
        return ds

    train = pipeline(cfg.data.wds_train, train_tf, True)
    # a fixed epoch per rank (and per loader worker, which each run the pipeline): the loop counts batches
    per_rank = cfg.data.wds_train_samples // int(os.environ.get("WORLD_SIZE", 1))
    train = train.with_epoch(per_rank // max(1, cfg.data.num_workers))
    with warnings.catch_warnings():  # with_length warns that it only sets __len__, which is all the loop needs
        warnings.simplefilter("ignore")
        train = train.with_length(per_rank)
    val = pipeline(cfg.data.wds_val or cfg.data.wds_train, eval_tf, False)
    n = cfg.data.wds_num_classes
    warnings.warn("WebDataset resume restarts the interrupted epoch's stream (not bitwise)", stacklevel=2)
    return DataBundle(train, val, n, in_chans, [str(i) for i in range(n)], data_config)
