"""oodforge.data: datasets, offline OOD test sets and benchmark suites.

* :mod:`~oodforge.data.base` - :class:`ArrayDataset` (uint8 images + labels + identity) and :class:`Suite`;
* :mod:`~oodforge.data.fashion` - Fashion-MNIST from Debian's ``dataset-fashion-mnist``;
* :mod:`~oodforge.data.loaders` - users' own data (image folders, CIFAR pickles, SVHN .mat, .npz);
* :mod:`~oodforge.data.photos` - the catalogue of real photographs available offline;
* :mod:`~oodforge.data.ood_sets` - digits / textures / photos / noise OOD sets at any size;
* :mod:`~oodforge.data.scenes` - Fashion-MNIST objects on real-photo backgrounds;
* :mod:`~oodforge.data.suites` - :func:`load_suite` for ``fashion``, ``fashion6``, ``scenes``.

See docs/datasets.md for sizes and provenance.
"""

from __future__ import annotations

from oodforge.data.base import ArrayDataset, Suite
from oodforge.data.fashion import FASHION_MNIST_CLASSES, load_fashion_mnist
from oodforge.data.loaders import (
    DatasetFormatError,
    DatasetNotFoundError,
    conform,
    data_cache_dir,
    load_cifar,
    load_dataset,
    load_image_folder,
    load_npz,
    load_svhn_mat,
    read_idx,
    stratified_indices,
)
from oodforge.data.ood_sets import OOD_SETS, far_ood_sets, make_ood_set
from oodforge.data.photos import PHOTOS, list_photos, photo_provenance
from oodforge.data.scenes import SCENES_TEST_PHOTOS, SCENES_TRAIN_PHOTOS, build_scenes
from oodforge.data.suites import FASHION6_CLASSES, FASHION6_HELD_OUT, SUITES, load_suite

__all__ = [
    "ArrayDataset",
    "Suite",
    "FASHION_MNIST_CLASSES",
    "FASHION6_CLASSES",
    "FASHION6_HELD_OUT",
    "load_fashion_mnist",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "conform",
    "data_cache_dir",
    "load_cifar",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "load_svhn_mat",
    "read_idx",
    "stratified_indices",
    "OOD_SETS",
    "far_ood_sets",
    "make_ood_set",
    "PHOTOS",
    "list_photos",
    "photo_provenance",
    "SCENES_TRAIN_PHOTOS",
    "SCENES_TEST_PHOTOS",
    "build_scenes",
    "SUITES",
    "load_suite",
]
