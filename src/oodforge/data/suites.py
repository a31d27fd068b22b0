"""Benchmark suites: ID train/test data plus named OOD test sets grouped into near / far.

=========  =====================================================  ==========================  =====================
suite      ID (train / test; quick)                               near OOD                    far OOD
=========  =====================================================  ==========================  =====================
fashion    Fashion-MNIST, 10 classes (60,000 / 10,000;            -                           digits, textures,
           quick 3,000 / 600), 1x28x28                                                        photos, noise
fashion6   Fashion-MNIST T-shirt/top, Trouser, Pullover, Dress,   held-out-classes: test      digits, textures,
           Sneaker, Bag -> labels 0..5 (36,000 / 6,000;           images of Coat, Sandal,     photos, noise
           quick 3,000 / 600), 1x28x28                            Shirt, Ankle boot (4,000;
                                                                  quick 300)
scenes     Fashion-MNIST objects on real-photo crops, 3x32x32     backgrounds,                textures, noise
           (20,000 / 4,000; quick 2,000 / 500)                    digits-on-scenes
clipart    Debian openclipart-png colour drawings, 7 categories   the 13 held-out             textures, noise
           with >= 250 images, 3x64x64 (docs/datasets.md)         categories
=========  =====================================================  ==========================  =====================

A user's own suite is a suite file (``*.toml``) or a :class:`~oodforge.data.user_suite.SuiteSpec`
(:mod:`oodforge.data.user_suite`); it gets the same validation split and quick subsets.

Every suite also holds out an **ID validation split** ``id_val`` from its training images: a
stratified 10 % (at most 5,000; quick: 300), drawn with the data seed and removed from
``id_train``. Classifiers are trained on the rest; hyperparameters, variants and thresholds are
chosen on ``id_val`` (docs/protocol.md). Sizes after the split: fashion 55,000 / 5,000,
fashion6 32,400 / 3,600, scenes 18,000 / 2,000 (train / val).

OOD set sizes: digits 1,797, the others 2,000 (quick: 300 each). Quick ID subsets are stratified
and deterministic for the seed. Identities are stable strings (``"fashion6/train"``,
``"ood/digits/28x28x1/seed0/n1797"``...) so the feature cache is reused across runs.
"""

from __future__ import annotations

import os

import numpy as np

from oodforge.data.base import ArrayDataset, Suite
from oodforge.data.fashion import FASHION_MNIST_CLASSES, load_fashion_mnist
from oodforge.data.loaders import stratified_indices
from oodforge.data.ood_sets import FAR_OOD_SETS, far_ood_sets
from oodforge.data.user_suite import SuiteSpec, build_suite, is_suite_file, read_suite_file

__all__ = ["SUITES", "FASHION6_CLASSES", "FASHION6_HELD_OUT", "QUICK_ID_SIZES", "QUICK_NEAR_SIZE", "is_suite", "load_source_data", "load_suite"]

SUITES: dict[str, str] = {
    "fashion": "Fashion-MNIST (10 classes, 1x28x28) vs far OOD: real handwritten digits, textures, photo crops, noise",
    "fashion6": "Fashion-MNIST with 6 ID classes; near OOD = the 4 held-out classes (Coat, Sandal, Shirt, Ankle boot); "
    "far OOD as in 'fashion'",
    "scenes": "Fashion-MNIST objects on real-photo backgrounds (3x32x32); near OOD = object-free backgrounds and "
    "digits on backgrounds (Ming et al. 2022 / SHIFT sec. 5.7); far OOD = textures, noise",
    "clipart": "openclipart colour drawings (Debian openclipart-png; 3x64x64): ID = the 7 categories with >= 250 "
    "images; near OOD = the held-out categories; far OOD = textures, noise (oodforge.data.clipart)",
}
FASHION6_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Sneaker", "Bag"]
FASHION6_HELD_OUT = ["Coat", "Sandal", "Shirt", "Ankle boot"]
QUICK_ID_SIZES = {"train": 3000, "test": 600}
QUICK_NEAR_SIZE = 300
VAL_FRACTION, VAL_MAX, QUICK_VAL = 0.10, 5000, 300


def with_validation_split(suite: Suite, seed: int, quick: bool) -> Suite:
    """Move a stratified, seeded share of ``suite.id_train`` into ``suite.id_val`` (disjoint).

    The split depends only on the training set and the data ``seed``, so classifiers trained with
    different training seeds see the same validation images.
    """
    train = suite.id_train
    n_val = min(VAL_MAX, int(round(VAL_FRACTION * len(train))))
    if quick and len(train) >= 3 * QUICK_VAL:  # the embedded suites' quick subsets: always 300
        n_val = QUICK_VAL
    n_val = max(1, n_val)  # tiny user suites: 10 %
    val_idx = stratified_indices(train.labels.numpy(), n_val, seed + 0x7A1)
    keep = np.setdiff1d(np.arange(len(train)), val_idx)
    suite.id_val = train.subset(val_idx, identity_suffix=f"val:n{n_val}:seed{seed}")
    suite.id_train = train.subset(keep, identity_suffix=f"train-minus-val:n{n_val}:seed{seed}")
    return suite


def _quick(ds: ArrayDataset, n: int, seed: int) -> ArrayDataset:
    idx = stratified_indices(ds.labels.numpy(), n, seed)
    return ds.subset(idx, identity_suffix=f"quick:n{n}:seed{seed}")


def _quick_suite(suite: Suite, seed: int) -> Suite:
    """A user suite's quick subsets (same sizes as the embedded suites'), for smoke runs."""
    def cap(ds, n, labelled=True):
        if len(ds) <= n:
            return ds
        idx = stratified_indices(ds.labels.numpy(), n, seed) if labelled else np.sort(
            np.random.default_rng(seed).choice(len(ds), n, replace=False))
        return ds.subset(idx, identity_suffix=f"quick:n{n}:seed{seed}")

    suite.id_train = cap(suite.id_train, QUICK_ID_SIZES["train"])
    suite.id_test = cap(suite.id_test, QUICK_ID_SIZES["test"])
    suite.ood = {k: cap(v, QUICK_NEAR_SIZE, labelled=False) for k, v in suite.ood.items()}
    return suite


def is_suite(name) -> bool:
    """An embedded suite's name or a user's suite file."""
    return isinstance(name, SuiteSpec) or str(name) in SUITES or is_suite_file(name)


def _fashion(data_root, seed: int, quick: bool) -> Suite:
    train, test = load_fashion_mnist("train", data_root), load_fashion_mnist("test", data_root)
    if quick:
        train, test = _quick(train, QUICK_ID_SIZES["train"], seed), _quick(test, QUICK_ID_SIZES["test"], seed)
    return Suite(
        name="fashion",
        id_train=train,
        id_test=test,
        ood=far_ood_sets(28, 1, seed=seed, quick=quick),
        groups={"near": [], "far": list(FAR_OOD_SETS)},
        class_names=list(FASHION_MNIST_CLASSES),
        description=SUITES["fashion"],
    )


def _remap(ds: ArrayDataset, keep: list[int], identity: str, class_names: list[str]) -> ArrayDataset:
    labels = ds.labels.numpy()
    idx = np.flatnonzero(np.isin(labels, keep))
    lut = np.full(10, -1, np.int64)
    lut[keep] = np.arange(len(keep))
    return ArrayDataset(ds.images.numpy()[idx], lut[labels[idx]], class_names, identity)


def _fashion6_near_index(test_labels: np.ndarray) -> np.ndarray:
    """Which Fashion-MNIST test images, in order, make fashion6's near set (the held-out classes)."""
    held = [FASHION_MNIST_CLASSES.index(c) for c in FASHION6_HELD_OUT]
    return np.flatnonzero(np.isin(test_labels, held))


def fashion6_near_classes(data_root=None) -> np.ndarray:
    """The Fashion-MNIST class name of every image of the full fashion6 suite's near set, in the suite's order (the
    OOD set itself carries no labels): for diagnostics that split near-OOD by class (benchmarks/near_by_class.py)."""
    labels = load_fashion_mnist("test", data_root).labels.numpy()
    return np.array(FASHION_MNIST_CLASSES, dtype=object)[labels[_fashion6_near_index(labels)]]


def _fashion6(data_root, seed: int, quick: bool) -> Suite:
    keep = [FASHION_MNIST_CLASSES.index(c) for c in FASHION6_CLASSES]
    train_full, test_full = load_fashion_mnist("train", data_root), load_fashion_mnist("test", data_root)
    train = _remap(train_full, keep, "fashion6/train", FASHION6_CLASSES)
    test = _remap(test_full, keep, "fashion6/test", FASHION6_CLASSES)
    t_labels = test_full.labels.numpy()
    near_idx = _fashion6_near_index(t_labels)
    near = ArrayDataset(test_full.images.numpy()[near_idx], None, None, "fashion6/held-out-classes")
    if quick:
        train, test = _quick(train, QUICK_ID_SIZES["train"], seed), _quick(test, QUICK_ID_SIZES["test"], seed)
        sub = stratified_indices(t_labels[near_idx], QUICK_NEAR_SIZE, seed)
        near = near.subset(sub, identity_suffix=f"quick:n{QUICK_NEAR_SIZE}:seed{seed}")
    ood = {"held-out-classes": near, **far_ood_sets(28, 1, seed=seed, quick=quick)}
    return Suite(
        name="fashion6",
        id_train=train,
        id_test=test,
        ood=ood,
        groups={"near": ["held-out-classes"], "far": list(FAR_OOD_SETS)},
        class_names=list(FASHION6_CLASSES),
        description=SUITES["fashion6"],
    )


def load_suite(
    name: str | os.PathLike | SuiteSpec,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Suite:
    """Build benchmark suite ``name``: a key of :data:`SUITES`, a user's suite file (``*.toml``) or a
    :class:`~oodforge.data.user_suite.SuiteSpec` (see :mod:`oodforge.data.user_suite`).

    ``data_root`` is the folder with the Fashion-MNIST IDX files (default: Debian's
    ``/usr/share/datasets/fashion-mnist``; for ``clipart`` the folder of openclipart category folders, default
    ``/usr/share/openclipart/png``); ``seed`` drives every random choice (quick subsets, OOD
    crops, compositing); ``quick`` shrinks the suite for smoke tests (sizes in the module docstring);
    ``cache_dir`` is where ``scenes`` and ``clipart`` cache their built arrays (default ``$OODFORGE_CACHE/data`` or
    ``~/.cache/oodforge/data``).
    """
    if isinstance(name, SuiteSpec) or is_suite_file(name):
        spec = name if isinstance(name, SuiteSpec) else read_suite_file(name)
        suite = build_suite(spec)
        if quick:
            suite = _quick_suite(suite, seed)
    elif name == "fashion":
        suite = _fashion(data_root, seed, quick)
    elif name == "fashion6":
        suite = _fashion6(data_root, seed, quick)
    elif name == "scenes":
        from oodforge.data.scenes import build_scenes

        suite = build_scenes(data_root, seed=seed, quick=quick, cache_dir=cache_dir).suite
    elif name == "clipart":
        from oodforge.data.clipart import build_clipart

        suite = build_clipart(data_root, seed=seed, quick=quick, cache_dir=cache_dir)
    else:
        raise KeyError(f"unknown suite {name!r}; choose from {sorted(SUITES)} or give a suite file (*.toml)")
    return with_validation_split(suite, seed, quick)


def load_source_data(data: str, data_root=None, seed: int = 0, quick: bool = False, split: str = "train",
                     image_size: int | None = None):
    """The ID images a forger reads (``--data``): a suite name or suite file (its ID training set, or with ``split="val"``
    its ID validation set, for held-out forged outliers) or a path/name for
    :func:`oodforge.data.loaders.load_dataset` (resized to ``image_size`` when given)."""
    if split not in ("train", "val"):
        raise ValueError(f"--split must be train or val, got {split!r}")
    if is_suite(data):
        suite = load_suite(data, data_root=data_root, seed=seed, quick=quick)
        return suite.id_val if split == "val" else suite.id_train
    if split != "train":
        raise ValueError("--split val needs a suite name as --data (a path has no validation split)")
    from .loaders import load_dataset

    return load_dataset(data, split="train", size=image_size, data_root=data_root)
