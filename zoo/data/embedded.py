"""Classification data that ships with installed packages: nothing downloads.

* ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``), IDX
  files in ``/usr/share/datasets/fashion-mnist``: 60,000 train + 10,000 test, 28x28 gray, 10 classes (MIT).
* ``digits``: scikit-learn's ``load_digits``: 1,797 8x8 gray digits (UCI, CC BY 4.0), split 80/20 with a
  fixed seed (stratified), values 0..16 scaled to 0..255.

``load_embedded(name) -> EmbeddedData`` gives uint8 arrays; ``EmbeddedDataset(data, split, transform,
mode)`` wraps one split as a torch ``Dataset`` of ``(PIL image, label)`` so timm's transforms apply unchanged.
``available_embedded()`` lists the names usable on this machine.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["EMBEDDED", "EmbeddedData", "EmbeddedDataset", "available_embedded", "load_embedded"]

FASHION_MNIST_DIR = Path(os.environ.get("ZOO_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
EMBEDDED = ("fashion_mnist", "digits")
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "sklearn-digits": "digits"}


@dataclass(frozen=True)
class EmbeddedData:
    """Both splits of an embedded set: images ``(N, H, W)`` uint8, labels ``(N,)`` int64."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``'train'`` or ``'test'`` (``'val'`` is the test split: these sets have no separate validation)."""
        if split == "train":
            return self.train_images, self.train_labels
        if split in ("test", "val"):
            return self.test_images, self.test_labels
        raise ValueError(f"split={split!r}; expected 'train', 'val' or 'test'")


def canonical_name(name: str) -> str | None:
    """The embedded set a name refers to (``fashion-mnist`` -> ``fashion_mnist``), None if not one."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    return key if key in EMBEDDED else None


def _fashion_mnist_present() -> bool:
    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


def available_embedded() -> list[str]:
    """Embedded sets loadable here (``digits`` needs scikit-learn, ``fashion_mnist`` the Debian package)."""
    names = []
    if _fashion_mnist_present():
        names.append("fashion_mnist")
    try:
        import sklearn  # noqa: F401

        names.append("digits")
    except ImportError:
        pass
    return names


def _read_idx(path: Path) -> np.ndarray:
    # IDX: 2 zero bytes, dtype code, number of dims, big-endian uint32 sizes, then the data
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion_mnist() -> EmbeddedData:
    if not _fashion_mnist_present():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with "
            "`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, as root) or use --data digits"
        )
    d = FASHION_MNIST_DIR
    return EmbeddedData(
        name="fashion_mnist",
        train_images=_read_idx(d / "train-images-idx3-ubyte.gz"),
        train_labels=_read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64),
        test_images=_read_idx(d / "t10k-images-idx3-ubyte.gz"),
        test_labels=_read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
        classes=FASHION_MNIST_CLASSES,
    )


def _load_digits(test_fraction: float = 0.2, seed: int = 0) -> EmbeddedData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the 'digits' set needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    # stratified fixed split: the same test set on every machine and every run
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    return EmbeddedData(
        name="digits",
        train_images=images[~is_test],
        train_labels=labels[~is_test],
        test_images=images[is_test],
        test_labels=labels[is_test],
        classes=tuple(str(i) for i in range(10)),
    )


def load_embedded(name: str) -> EmbeddedData:
    """Load ``fashion_mnist`` or ``digits`` (aliases: ``fashion-mnist``); an unknown name lists the choices."""
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown embedded dataset {name!r}; choose one of {EMBEDDED} (here: {available_embedded()})")
    return _load_fashion_mnist() if key == "fashion_mnist" else _load_digits()


class EmbeddedDataset(Dataset):
    """One split of an ``EmbeddedData`` as ``(transform(PIL image), label)`` pairs."""

    def __init__(
        self,
        data: EmbeddedData,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        mode: str = "L",
        limit: int = 0,
    ):
        """
        Args:
            data: from ``load_embedded``.
            split: ``'train'`` or ``'val'``/``'test'``.
            transform: applied to the PIL image (e.g. ``timm.data.create_transform(...)``).
            mode: PIL mode of the images, ``'L'`` (1 channel) or ``'RGB'`` (gray replicated, for RGB models).
            limit: keep only the first ``limit`` samples (0 = all); for quick runs and tests.
        """
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode={mode!r}; expected 'L' or 'RGB'")
        self.images, self.labels = data.split(split)
        if limit:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.classes = list(data.classes)
        self.transform = transform
        self.mode = mode

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index], mode="L")
        if self.mode == "RGB":
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
