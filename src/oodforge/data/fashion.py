"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) from Debian's ``dataset-fashion-mnist`` package.

70,000 grayscale 28x28 images of 10 clothing classes (60,000 train / 10,000 test), MIT licence.
The package installs the four original IDX files (gzip-compressed) in
``/usr/share/datasets/fashion-mnist/``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

Uncompressed copies, and ``test-`` instead of ``t10k-`` names, are accepted too.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from oodforge.data.base import ArrayDataset
from oodforge.data.idx import DatasetFormatError, DatasetNotFoundError, read_idx

__all__ = ["FASHION_MNIST_CLASSES", "DEFAULT_FASHION_ROOT", "FASHION_APT_PACKAGE", "load_fashion_mnist", "fashion_files"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEFAULT_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_APT_PACKAGE = "dataset-fashion-mnist"
_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


def fashion_files(split: str, data_root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split``; :class:`DatasetNotFoundError` if absent."""
    if split not in _PREFIXES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_root).expanduser() if data_root is not None else DEFAULT_FASHION_ROOT
    found = []
    for kind, nd in (("images", 3), ("labels", 1)):
        candidates = [root / f"{p}-{kind}-idx{nd}-ubyte{ext}" for p in _PREFIXES[split] for ext in (".gz", "")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DatasetNotFoundError(
                f"Fashion-MNIST {split} {kind} not found: looked for {candidates[0].name} (or uncompressed) in {root}. "
                f"Install it with `sudo apt-get install {FASHION_APT_PACKAGE}` (files go to {DEFAULT_FASHION_ROOT}), "
                "or pass --data-root / data_root=<folder with the IDX files>."
            )
        found.append(hit)
    return found[0], found[1]


@functools.lru_cache(maxsize=4)
def _read(images_path: str, labels_path: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DatasetFormatError(f"{images_path}: Fashion-MNIST IDX files must hold unsigned bytes (type 0x08)")
    if images.shape[1:] != (28, 28):
        raise DatasetFormatError(f"{images_path}: expected 28x28 images, got {images.shape[1:]}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetFormatError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}")
    if labels.size and labels.max() > 9:
        raise DatasetFormatError(f"{labels_path}: labels must be 0..9, found {labels.max()}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str = "train", data_root: str | os.PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST ``split`` ("train": 60,000 / "test": 10,000) as uint8 ``[N, 1, 28, 28]``.

    ``data_root`` defaults to ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``).
    The IDX magic numbers and sizes are validated; a corrupt file raises :class:`DatasetFormatError`
    naming it, a missing one :class:`DatasetNotFoundError` naming the apt package and ``--data-root``.
    Identity: ``"fashion-mnist/<split>"``.
    """
    ip, lp = fashion_files(split, data_root)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (ip, lp))
    images, labels = _read(str(ip), str(lp), stamp)
    return ArrayDataset(images[:, None].copy(), labels.astype(np.int64), FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")
