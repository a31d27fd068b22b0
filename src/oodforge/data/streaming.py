"""Image folders read from disk on demand, for data that does not fit in memory.

:class:`FileDataset` has the interface of :class:`~oodforge.data.base.ArrayDataset` that the rest of
oodforge uses (``labels``, ``class_names``, ``identity``, ``image_shape``, ``float_images``,
``subset``, ``batches`` and an indexable ``images``), but holds only the list of files: each access
decodes, resizes and converts the images it needs. Feature extraction reads it through
:meth:`FileDataset.batches`, a ``DataLoader`` whose workers decode whole batches in parallel, and
writes the features into memory-mapped arrays (:mod:`oodforge.models.features`), so neither the
images nor a second copy of the features are ever held in memory at once.

The identity (the feature-cache key) hashes every file's relative path, size and modification time
plus the labels and the decoding settings: editing, adding or removing a file gives a new identity,
without reading any pixel.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oodforge.data.base import row_fingerprints
from oodforge.data.images import DEFAULT_PIPELINE, ImagePipeline
from oodforge.data.loaders import DatasetFormatError, decode_image, image_path, list_image_folder

__all__ = ["FileDataset", "LazyImages", "stream_image_folder", "default_workers"]

#: images inspected to decide the channel count when ``channels`` is not given
CHANNEL_PEEK = 32


def default_workers() -> int:
    """Decoding workers for :meth:`FileDataset.batches`: ``$OODFORGE_WORKERS``, else up to 4 (one per core)."""
    env = os.environ.get("OODFORGE_WORKERS")
    if env is not None:
        return max(0, int(env))
    return min(4, os.cpu_count() or 1)


class LazyImages:
    """uint8 images ``[N, C, H, W]`` decoded from files when indexed, like an ``ArrayDataset``'s tensor.

    ``images[i]`` gives ``[C, H, W]``; a slice, index array or tensor gives ``[n, C, H, W]``. Every
    image is decoded to the same ``size`` x ``size`` (or its native size, which must then be the same
    for all files: a file of another size raises an error naming it).
    """

    dtype = torch.uint8

    def __init__(self, root: Path, files: np.ndarray, shape: tuple[int, int, int], size: int | None,
                 pipeline: ImagePipeline = DEFAULT_PIPELINE) -> None:
        self.root = Path(root)
        self.files = files  # paths relative to root, a numpy bytes array (compact; shared by forked workers)
        self._shape = shape
        self._size = size
        self.pipeline = pipeline

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), *self._shape))

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        """The file of image ``i``."""
        return image_path(self.root, self.files[i])

    def decode(self, i: int) -> np.ndarray:
        img = decode_image(self.path(i), self._size, self._shape[0], self.pipeline)
        if img.shape != self._shape:
            raise DatasetFormatError(f"{self.path(i)}: image is {img.shape[1]}x{img.shape[2]} but the dataset's "
                                     f"images are {self._shape[1]}x{self._shape[2]}; give a size to resize them all")
        return img

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            return torch.from_numpy(self.decode(int(key)))
        if isinstance(key, slice):
            idx = range(*key.indices(len(self.files)))
        else:
            idx = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self._shape), np.uint8)
        for j, i in enumerate(idx):
            out[j] = self.decode(int(i))
        return torch.from_numpy(out)


class _Batches(Dataset):
    """Item ``b`` is batch ``b`` of a FileDataset as float ``[n, C, H, W]``: a worker decodes a whole batch."""

    def __init__(self, images: LazyImages, batch_size: int) -> None:
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, b: int) -> torch.Tensor:
        s = b * self.batch_size
        return self.images[s:s + self.batch_size].float().div_(255.0)


class FileDataset(Dataset):
    """Images listed by file and read on demand; the drop-in for ``ArrayDataset`` on data too large for memory."""

    def __init__(self, root: Path, files: np.ndarray, labels: np.ndarray, class_names: list[str] | None,
                 shape: tuple[int, int, int], size: int | None, identity: str,
                 num_workers: int | None = None, pipeline: ImagePipeline = DEFAULT_PIPELINE) -> None:
        self.images = LazyImages(root, np.asarray(files, dtype=bytes), shape, size, pipeline)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if self.labels.shape != (len(files),):
            raise ValueError(f"labels must have shape ({len(files)},), got {tuple(self.labels.shape)}")
        self.class_names = list(class_names) if class_names is not None else None
        self.identity = identity
        self.num_workers = default_workers() if num_workers is None else num_workers

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].float().div_(255.0), self.labels[i]

    def float_images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A slice of the images as float32 in ``[0, 1]`` (decoded now)."""
        return self.images[start:stop].float().div_(255.0)

    def batches(self, batch_size: int):
        """Consecutive float batches in order, decoded by ``num_workers`` DataLoader workers."""
        workers = self.num_workers if len(self) > batch_size else 0
        return DataLoader(_Batches(self.images, batch_size), batch_size=None, num_workers=workers,
                          prefetch_factor=2 if workers else None, persistent_workers=False)

    def fingerprints(self) -> np.ndarray:
        """Content fingerprints of the decoded images (:func:`~oodforge.data.base.row_fingerprints`, the same
        as an ``ArrayDataset`` of the same pixels), decoded once in batches by the DataLoader workers."""
        if getattr(self, "_fingerprints", None) is None:
            parts = [row_fingerprints((b * 255.0).round_().to(torch.uint8)) for b in self.batches(256)]
            self._fingerprints = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        return self._fingerprints

    def subset(self, indices, identity_suffix: str | None = None) -> FileDataset:
        idx = np.asarray(indices, dtype=np.int64)
        if identity_suffix is None:
            identity_suffix = "idx:" + hashlib.sha256(idx.tobytes()).hexdigest()[:12]
        sub = FileDataset(self.images.root, self.images.files[idx], self.labels.numpy()[idx], self.class_names,
                          self.image_shape, self.images._size, f"{self.identity}[{identity_suffix}]",
                          self.num_workers, self.images.pipeline)
        if getattr(self, "_fingerprints", None) is not None:
            sub._fingerprints = self._fingerprints[idx]
        return sub

    def __repr__(self) -> str:
        return f"FileDataset({self.identity!r}, n={len(self)}, shape={self.image_shape}, streamed)"


def _file_identity(root: Path, files: np.ndarray, labels: np.ndarray, size, channels: int,
                   pipeline: ImagePipeline = DEFAULT_PIPELINE) -> str:
    tag = "" if pipeline == DEFAULT_PIPELINE else f"|{pipeline.tag}"  # default: identities as before
    h = hashlib.sha256(f"{size}|{channels}{tag}".encode())
    top = str(root)
    for rel in files:
        st = os.stat(os.path.join(top, os.fsdecode(rel)))
        h.update(rel + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    return f"stream:{root.name}:{h.hexdigest()[:16]}"


def stream_image_folder(root: str | os.PathLike, size: int | None = None, channels: int | None = None,
                        num_workers: int | None = None, pipeline: ImagePipeline = DEFAULT_PIPELINE) -> FileDataset:
    """An image folder (``root/<class>/<image>`` or a flat folder of unlabelled images) read on demand.

    ``size``: brought to ``size`` x ``size`` by ``pipeline``'s resize policy (default: shorter side resized to it
    and centre-cropped; :mod:`oodforge.data.images`; without it every image must already have
    the first image's size). ``channels``: 1 or 3; by default 1 when the first ``CHANNEL_PEEK`` images
    are all grey, else 3 (give it explicitly for folders that mix both). Only the file list is read
    here; pixels are decoded when the images are used.
    """
    root = Path(root)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    files, labels, class_names = list_image_folder(root)
    peek = [decode_image(image_path(root, r), size, pipeline=pipeline) for r in files[:CHANNEL_PEEK]]
    if channels is None:
        channels = 1 if all(a.shape[0] == 1 for a in peek) else 3
    shape = (channels, *peek[0].shape[1:])
    return FileDataset(root, files, labels, class_names, shape, size,
                       _file_identity(root, files, labels, size, channels, pipeline), num_workers, pipeline)
