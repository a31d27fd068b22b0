"""In-memory image datasets and benchmark suites.

Every dataset in oodforge is an :class:`ArrayDataset`: uint8 images ``[N, C, H, W]`` plus int64
labels, with a stable ``identity`` string used as the feature-cache key. ``__getitem__`` returns
float images in ``[0, 1]``; normalisation lives inside the classifier, so input-space methods
(ODIN, CAM masks, inpainting) all work on the same ``[0, 1]`` pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

#: ITU-R BT.601 luma weights of (R, G, B): the one grey conversion in oodforge
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def row_fingerprints(images) -> np.ndarray:
    """One 64-bit content fingerprint per image: BLAKE2b (8-byte digest) of the image's uint8 pixels.

    Two images get the same fingerprint exactly when their pixels are equal (up to a 2^-64 chance), whatever
    dataset, identity, order or copy they sit in: the protocol's guard (:mod:`oodforge.protocol`) compares
    these, not names. About 0.25 s per 100,000 28x28 images on one core (docs/protocol.md)."""
    arr = np.ascontiguousarray(images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images))
    flat = arr.reshape(len(arr), -1)
    return np.fromiter((int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") for r in flat),
                       dtype=np.uint64, count=len(flat))


def luma(x, axis: int = 1):
    """ITU-R BT.601 luma of an RGB numpy array or torch tensor whose channels lie along ``axis``.

    Computed as ``0.299 R + 0.587 G + 0.114 B`` in that order, in the input's dtype (the channel axis is
    removed).
    """
    if isinstance(x, torch.Tensor):
        r, g, b = (x.select(axis, i) for i in range(3))
    else:
        r, g, b = (np.take(x, i, axis=axis) for i in range(3))
    return r * LUMA_WEIGHTS[0] + g * LUMA_WEIGHTS[1] + b * LUMA_WEIGHTS[2]


class ArrayDataset(Dataset):
    """Images held as a uint8 tensor ``[N, C, H, W]`` with int64 labels (``-1`` = no label).

    ``identity`` names the data for caching (e.g. ``"fashion-mnist/test"``); when omitted it is
    a hash of the pixels and labels, so two datasets with equal content share cache entries.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | None = None,
        class_names: list[str] | None = None,
        identity: str | None = None,
    ) -> None:
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8:
            raise TypeError(f"ArrayDataset expects uint8 images, got {images.dtype}; scale to 0..255 first")
        if images.ndim != 4:
            raise ValueError(f"ArrayDataset expects images shaped [N, C, H, W], got {tuple(images.shape)}")
        n = images.shape[0]
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        labels = torch.as_tensor(np.asarray(labels)).to(torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels
        self.class_names = list(class_names) if class_names is not None else None
        self._identity = identity

    @property
    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256()
            h.update(self.images.numpy().tobytes())
            h.update(self.labels.numpy().tobytes())
            self._identity = "sha256:" + h.hexdigest()[:24]
        return self._identity

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def fingerprints(self) -> np.ndarray:
        """:func:`row_fingerprints` of every image, computed once per dataset object (subsets inherit them)."""
        if getattr(self, "_fingerprints", None) is None:
            self._fingerprints = row_fingerprints(self.images)
        return self._fingerprints

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].float().div_(255.0), self.labels[i]

    def float_images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A slice of the images as float32 in ``[0, 1]``."""
        return self.images[start:stop].float().div_(255.0)

    def batches(self, batch_size: int):
        """Consecutive float batches in ``[0, 1]``, in order (what feature extraction iterates; a streamed
        :class:`~oodforge.data.streaming.FileDataset` decodes its batches in DataLoader workers instead)."""
        for i in range(0, len(self), batch_size):
            yield self.float_images(i, i + batch_size)

    def subset(self, indices: np.ndarray | list[int], identity_suffix: str | None = None) -> ArrayDataset:
        """The items at ``indices``; the identity records which ones, so caches stay correct."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if identity_suffix is None:
            identity_suffix = "idx:" + hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:12]
        sub = ArrayDataset(self.images[idx], self.labels[idx], self.class_names, f"{self.identity}[{identity_suffix}]")
        if getattr(self, "_fingerprints", None) is not None:
            sub._fingerprints = self._fingerprints[idx.numpy()]
        return sub

    def __repr__(self) -> str:
        return f"ArrayDataset({self.identity!r}, n={len(self)}, shape={self.image_shape})"


@dataclass
class Suite:
    """A benchmark: ID train/test data, named OOD test sets, and their near/far grouping."""

    name: str
    id_train: ArrayDataset
    id_test: ArrayDataset
    ood: dict[str, ArrayDataset]
    groups: dict[str, list[str]] = field(default_factory=lambda: {"near": [], "far": []})
    class_names: list[str] = field(default_factory=list)
    description: str = ""
    #: held-out ID images, disjoint from ``id_train`` and ``id_test``: every choice of hyperparameter,
    #: variant or threshold is made on these (plus outliers forged from them), never on the OOD sets
    #: (docs/protocol.md). ``None`` for hand-built suites that have no validation split.
    id_val: ArrayDataset | None = None
    #: the datasets as the suite was built (``id_train``, ``id_test``, ``ood``), kept when fields are later
    #: replaced (a validation split moved out, quick subsets, ``dataclasses.replace``): the protocol's guard
    #: (:func:`oodforge.protocol.check_not_test`) refuses fit inputs sharing rows with these test sets, and
    #: exempts only rows the suite's own training data also holds (duplicates inside the source data)
    as_built: dict | None = field(default=None, repr=False, compare=False)
    #: how the suite's image *files* were decoded (:class:`oodforge.data.images.ImagePipeline`: background colour,
    #: resize policy); ``predict`` and ``explain`` read files the same way (recorded in results.json and guard.json)
    #: (``None``: the default pipeline; read it with :func:`oodforge.data.images.pipeline_of`)
    pipeline: object | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.as_built is None:
            self.as_built = {"id_train": self.id_train, "id_test": self.id_test, "ood": dict(self.ood)}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.id_train.image_shape
