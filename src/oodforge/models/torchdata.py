"""A PyTorch user's own data in: a ``torch.utils.data.Dataset`` yielding ``(image, label)`` or a ``DataLoader``.

:func:`as_image_data` turns either into a :class:`TorchImages`, which has the interface of
:class:`~oodforge.data.base.ArrayDataset` that feature extraction, the detectors and the guard read
(``len``, ``identity``, ``labels``, ``class_names``, ``image_shape``, ``batches``, ``float_images``,
``subset``). The user's transforms run as they are, once per read; oodforge converts only what they yield:

* **What an item is.** ``(image, label, ...)`` (a tuple or list; extra fields ignored) or a bare image
  (label ``-1``). An image is a torch tensor ``[C, H, W]`` (or ``[H, W]``), or a NumPy array / PIL image
  ``[H, W, C]`` (or ``[H, W]``), the layouts torchvision's ``ToTensor`` assumes. A DataLoader's batches go
  through its own ``collate_fn``: ``(images [N, C, H, W], labels [N])``.
* **The one preprocessing rule.** oodforge's classifiers take images in ``[0, 1]`` and normalise them
  inside (``model.mean`` / ``model.std``), so that input-space methods (ODIN's epsilon, GradNorm, CAM masks)
  and a deployed guard reading image files all work on the same pixels. uint8 images are raw pixels and are
  divided by 255. **Float images are taken as ``[0, 1]`` pixels, unless the model was wrapped with
  ``preprocessed=True``** (``wrap(net, ..., mean=..., std=..., preprocessed=True)``, or ``model.preprocessed =
  True`` on any oodforge classifier): then they are what the user's ``Normalize(mean, std)`` produced. Feature
  extraction hands them to the network as they are (the model's own normalisation is switched off for that
  pass: nothing is normalised twice, and the features equal those of the ``[0, 1]`` route bit for bit when the
  transform computes ``(x - mean) / std`` as the model does); where oodforge needs pixels (``float_images``:
  ODIN's perturbation, Mahalanobis' input noise) it maps them back once, ``x * std + mean``, so that epsilons
  keep their pixel units and a deployed guard reads image files with the same normalisation. The rule is checked on every batch: ``[0, 1]`` float images outside ``[-0.1, 1.1]``
  (normalised data given without ``preprocessed=True``) and ``preprocessed=True`` data that map back outside
  it (``mean``/``std`` that are not the transform's) are refused with a message saying which option to set.
* **Order.** A DataLoader is read in its order when its sampler is sequential; one that shuffles
  (``shuffle=True``) is read in its dataset's order (the same images; scores follow the dataset's order),
  with the same ``batch_size``, ``num_workers`` and ``collate_fn``. Other samplers (subsets, weights,
  replacement) and ``drop_last=True`` are refused: they decide *which* images are read.
* **Caching.** ``identity`` (the feature-cache key) is a sha256 of the converted images and labels as first
  read: computed by one read of the data when first asked for (only when a cache is used), and remembered
  for the same Dataset / DataLoader object for the rest of the process. Data that cannot be fingerprinted
  are not cached (:func:`as_image_data` says why, once): the first two items are read twice, and when they
  differ (random augmentation in the transforms) caching is off. A later read whose content differs from the
  fingerprint raises an error instead of filling the cache with features of other images.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, Subset

#: how far outside [0, 1] (after conversion) float pixels may lie: resampling overshoots a little, while
#: normalised data (ImageNet statistics: [-2.1, 2.6]; mean = std = 0.5: [-1, 1]) lie far outside
RANGE_TOLERANCE = 0.1
#: items read twice to detect random transforms
PROBE_ITEMS = 2

# content fingerprints per Dataset / DataLoader object and conversion: (identity, labels), "as first read"
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_torch_data(data) -> bool:
    """A user's torch Dataset or DataLoader (not one of oodforge's own datasets, which are Datasets too)."""
    return isinstance(data, (Dataset, DataLoader)) and not hasattr(data, "float_images")


def _base_dataset(ds):
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _image_tensor(img, where: str) -> torch.Tensor:
    """One item's image as a ``[C, H, W]`` tensor of its own dtype (see the module docstring for layouts)."""
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.ndim == 2:
            t = t.unsqueeze(0)
    else:
        if not isinstance(img, np.ndarray) and not hasattr(img, "__array_interface__") and type(img).__module__.split(
                ".")[0] != "PIL":
            raise TypeError(f"{where}: the image is a {type(img).__name__}; a Dataset item must be (image, label) "
                            "with the image a torch tensor [C, H, W], a NumPy array or a PIL image [H, W, C]")
        a = np.asarray(img)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ValueError(f"{where}: a NumPy / PIL image must be [H, W] or [H, W, C], got shape {a.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    if t.ndim != 3:
        raise ValueError(f"{where}: an image tensor must be [C, H, W] or [H, W], got shape {tuple(t.shape)}")
    return t


def _split_item(item, where: str):
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"{where}: the Dataset item is empty; it must be (image, label)")
        return item[0], (item[1] if len(item) > 1 else -1)
    if isinstance(item, dict):
        raise TypeError(f"{where}: the Dataset item is a dict ({', '.join(map(str, item))}); return (image, label)")
    return item, -1


def collate_items(items: list, where: str = "dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """Items of a plain Dataset -> ``(images [N, C, H, W], labels [N])``, each image converted on its own (so PIL
    images and NumPy arrays need no collate function)."""
    images, labels = [], []
    for k, item in enumerate(items):
        img, lab = _split_item(item, f"{where} item {k}")
        images.append(_image_tensor(img, f"{where} item {k}"))
        labels.append(int(lab.item() if isinstance(lab, (torch.Tensor, np.ndarray)) else lab))
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(f"{where}: the images have different shapes {sorted(shapes)[:3]}; resize them to one size "
                         "in the transforms")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _batch_parts(batch, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A DataLoader batch (after its collate_fn) -> ``(images [N, C, H, W], int64 labels [N])``."""
    if isinstance(batch, dict):
        raise TypeError(f"{where}: the DataLoader yields dicts ({', '.join(map(str, batch))}); it must yield "
                        "(images, labels)")
    if isinstance(batch, (tuple, list)):
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x, y = batch, None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: the DataLoader's images are a {type(x).__name__}, not a tensor [N, C, H, W]; "
                        "convert them in the transforms (or give the Dataset itself)")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"{where}: the DataLoader's images must be [N, C, H, W], got {tuple(x.shape)}")
    if y is None:
        y = torch.full((x.shape[0],), -1, dtype=torch.int64)
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.shape != (x.shape[0],):
        raise ValueError(f"{where}: labels must be class indices, one integer per image; got {y.dtype} "
                         f"{tuple(y.shape)} for {x.shape[0]} images")
    return x.detach().cpu(), y.to(torch.int64).cpu()


class TorchImages:
    """A user's Dataset or DataLoader seen as an oodforge dataset of ``[0, 1]`` images (module docstring)."""

    def __init__(self, data, preprocessed: bool = False, mean=None, std=None, name: str | None = None,
                 model: torch.nn.Module | None = None) -> None:
        if isinstance(data, IterableDataset) or isinstance(getattr(data, "dataset", None), IterableDataset):
            raise TypeError("an IterableDataset has no length or item access; give a map-style Dataset "
                            "(__getitem__ and __len__) or a DataLoader over one")
        self.data = data
        self.loader = data if isinstance(data, DataLoader) else None
        self.dataset = data.dataset if self.loader is not None else data
        if not hasattr(self.dataset, "__len__") or not hasattr(self.dataset, "__getitem__"):
            raise TypeError(f"{type(self.dataset).__name__} is not a map-style Dataset (__getitem__ and __len__)")
        self.preprocessed = bool(preprocessed)
        self.model = model
        if self.preprocessed and (mean is None or std is None):
            raise ValueError("preprocessed=True needs the mean and std of the data's normalisation")
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.name = name or f"torch:{type(_base_dataset(self.dataset)).__name__}:n={len(self.dataset)}"
        self.in_dataset_order = False
        if self.loader is not None:
            self._check_loader(self.loader)
        self._labels: torch.Tensor | None = None
        self._shape: tuple[int, int, int] | None = None
        self._warned_unnormalised = False

    # --- the loader's rules -------------------------------------------------------------------
    def _check_loader(self, loader: DataLoader) -> None:
        if loader.batch_size is None or loader.drop_last:
            what = "drop_last=True drops images" if loader.drop_last else "batch_size=None (a custom batch_sampler)"
            raise ValueError(f"DataLoader with {what}: give a DataLoader with a batch_size and drop_last=False, or "
                             "the Dataset itself")
        sampler = loader.sampler
        if isinstance(sampler, SequentialSampler):
            return
        if isinstance(sampler, RandomSampler) and not sampler.replacement and \
                sampler.num_samples == len(loader.dataset):
            self.in_dataset_order = True  # shuffle=True: the same images, read in the dataset's order
            return
        raise ValueError(f"the DataLoader's sampler is a {type(sampler).__name__}, which decides which images are "
                         "read; give a DataLoader with shuffle=False (a Subset of the Dataset for part of it)")

    def _reader(self) -> DataLoader:
        """What one read iterates: the user's loader, a sequential twin of a shuffling one, or a plain loader."""
        if self.loader is not None and not self.in_dataset_order:
            return self.loader
        if self.loader is not None:
            src = self.loader
            return DataLoader(src.dataset, batch_size=src.batch_size, shuffle=False, num_workers=src.num_workers,
                              collate_fn=src.collate_fn, worker_init_fn=src.worker_init_fn,
                              prefetch_factor=src.prefetch_factor if src.num_workers else None)
        return DataLoader(self.dataset, batch_size=64, shuffle=False, num_workers=0,
                          collate_fn=lambda items: collate_items(items, self.name))

    # --- conversion ------------------------------------------------------------------------------
    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32, after checking the preprocessing rule (in pixel units, see the module docstring)."""
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: images of dtype {x.dtype}; give uint8 pixels or float images")
        x = x.float()
        lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))  # per channel
        if self.preprocessed:
            if self.mean.shape[1] not in (1, x.shape[1]):
                raise ValueError(f"{self.name}: {x.shape[1]}-channel images but the model's mean/std have "
                                 f"{self.mean.shape[1]} values")
            if not self._warned_unnormalised and float(lo.min()) >= 0:
                self._warned_unnormalised = True
                warnings.warn(f"{self.name}: the model was wrapped with preprocessed=True but a batch has no negative "
                              "value, as normalised data would; if the transforms end with ToTensor (no Normalize), "
                              "wrap it with preprocessed=False", stacklevel=4)
            m, sd = self.mean.flatten(), self.std.flatten()
            lo, hi = lo * sd + m, hi * sd + m  # std > 0: the per-channel extremes map to the pixel extremes
        lo, hi = float(lo.min()), float(hi.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            if self.preprocessed:
                raise ValueError(f"{self.name}: mapped back with the model's mean/std ({self.mean.flatten().tolist()} "
                                 f"/ {self.std.flatten().tolist()}) the images lie in [{lo:.3g}, {hi:.3g}], not [0, 1]: "
                                 "give wrap() the mean and std of the transforms' Normalize")
            raise ValueError(f"{self.name}: float images in [{lo:.3g}, {hi:.3g}], not [0, 1]. If the transforms "
                             "normalise, wrap the model with preprocessed=True and the same mean/std (oodforge then "
                             "does not normalise again); otherwise scale the images to [0, 1] (ToTensor does)")
        return x

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` pixels (normalised float images mapped back with the model's mean/std)."""
        pre = self.preprocessed and x.is_floating_point()
        x = self._checked(x)
        return x * self.std + self.mean if pre else x

    def _read(self):
        """One read: ``(model input [n, C, H, W], labels [n])`` per batch, in order. The model input is the user's
        normalised tensor itself when the model takes it directly (:attr:`direct`), else ``[0, 1]`` pixels."""
        for b, batch in enumerate(self._reader()):
            x, y = batch if self.loader is None else _batch_parts(batch, f"{self.name} batch {b}")
            x = self._checked(x) if self.direct and x.is_floating_point() else self._pixels(x)
            if self._shape is None:
                self._shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != self._shape:
                raise ValueError(f"{self.name} batch {b}: images of shape {tuple(x.shape[1:])}, earlier ones "
                                 f"{self._shape}; resize them to one size in the transforms")
            yield x, y

    @property
    def direct(self) -> bool:
        """Whether :meth:`batches` hands the model the user's normalised tensors as they are (``preprocessed``
        with a known model): it then runs them with the model's normalisation switched off, so nothing is
        normalised twice and the network sees exactly the user's tensor."""
        return self.preprocessed and self.model is not None

    # --- the ArrayDataset interface ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def class_names(self) -> list[str] | None:
        names = getattr(_base_dataset(self.dataset), "classes", None)
        return [str(c) for c in names] if names is not None else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            self._shape = tuple(self.float_images(0, 1).shape[1:])
        return self._shape

    def _key(self) -> tuple:
        stats = (None, None) if self.mean is None else (tuple(self.mean.flatten().tolist()),
                                                        tuple(self.std.flatten().tolist()))
        return (self.preprocessed, self.direct, *stats)

    def _memo(self) -> dict:
        try:
            return _FINGERPRINTS.setdefault(self.data, {})
        except TypeError:  # an object that cannot be weakly referenced: remembered on this adapter only
            return self.__dict__.setdefault("_own_memo", {})

    @property
    def identity(self) -> str:
        """sha256 of the converted images and labels as first read (one read of the data the first time)."""
        hit = self._memo().get(self._key())
        if hit is None:
            h, labels = hashlib.sha256(), []
            for x, y in self._read():
                h.update(repr(tuple(x.shape)).encode())
                h.update(x.contiguous().numpy().tobytes())
                h.update(y.numpy().tobytes())
                labels.append(y)
            hit = ("torch:sha256:" + h.hexdigest()[:24], torch.cat(labels) if labels else torch.zeros(0, torch.int64))
            self._memo()[self._key()] = hit
            self._labels = hit[1]
        return hit[0]

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:
            hit = self._memo().get(self._key())
            if hit is None:
                self.identity  # noqa: B018 (one read gives the labels and the fingerprint)
                hit = self._memo()[self._key()]
            self._labels = hit[1]
        return self._labels

    def batches(self, batch_size: int = 256):
        """The model's input batches in order (the loader's own batch size; see :attr:`direct`); the labels are
        kept as they are read, and the content is checked against the fingerprint when one was taken."""
        known = self._memo().get(self._key())
        h, labels = hashlib.sha256(), []
        with _without_normalisation(self.model) if self.direct else contextlib.nullcontext():
            for x, y in self._read():
                if known is not None:
                    h.update(repr(tuple(x.shape)).encode())
                    h.update(x.contiguous().numpy().tobytes())
                    h.update(y.numpy().tobytes())
                labels.append(y)
                yield x
        got = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        if known is not None and "torch:sha256:" + h.hexdigest()[:24] != known[0]:
            raise RuntimeError(f"{self.name}: the data changed between two reads (random transforms, or the dataset "
                               "was modified), so these features are not those of its fingerprint (the identity the "
                               "cache and the benchmark key them by); use deterministic evaluation transforms, or "
                               "pass the data to extract_features without cache_dir")
        self._labels = got

    def float_images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images ``start:stop`` as ``[0, 1]`` floats, read now through the transforms (and the loader's collate)."""
        stop = len(self) if stop is None else min(stop, len(self))
        items = [self.dataset[i] for i in range(start, stop)]
        if self.loader is None:
            x, _ = collate_items(items, self.name)
        else:
            x, _ = _batch_parts(self.loader.collate_fn(items), self.name)
        return self._pixels(x)

    def subset(self, indices, identity_suffix: str | None = None) -> TorchImages:
        del identity_suffix  # the subset's identity is its own content fingerprint
        ds = Subset(self.dataset, [int(i) for i in np.asarray(indices).reshape(-1)])
        data = ds if self.loader is None else DataLoader(ds, batch_size=self.loader.batch_size, shuffle=False,
                                                         num_workers=self.loader.num_workers,
                                                         collate_fn=self.loader.collate_fn)
        return TorchImages(data, self.preprocessed, self.mean, self.std, f"{self.name}[subset n={len(ds)}]", self.model)

    def cache_refusal(self) -> str | None:
        """Why these data cannot be fingerprinted (``None`` when they can): the first items read twice differ."""
        n = min(PROBE_ITEMS, len(self))
        if n and not torch.equal(self.float_images(0, n), self.float_images(0, n)):
            return (f"{self.name}: reading the first {n} items twice gave different images (random augmentation in "
                    "the transforms?), so its features are not cached; use deterministic evaluation transforms to "
                    "cache them")
        return None

    def __repr__(self) -> str:
        mode = "preprocessed" if self.preprocessed else "[0, 1] pixels"
        return f"TorchImages({self.name!r}, n={len(self)}, {mode})"


def torch_images(data, model) -> TorchImages:
    """``data`` (a Dataset or DataLoader) as :class:`TorchImages` under ``model``'s preprocessing rule: float images
    are normalised already when ``model.preprocessed`` is true (then mapped back with ``model.mean``/``model.std``)."""
    if isinstance(data, TorchImages):
        return data
    pre = bool(getattr(model, "preprocessed", False))
    mean = getattr(model, "mean", None)
    std = getattr(model, "std", None)
    if pre and (mean is None or std is None):
        raise ValueError(f"{type(model).__name__}.preprocessed is set but the model has no mean/std buffers")
    return TorchImages(data, pre, None if mean is None else mean.detach().cpu(),
                       None if std is None else std.detach().cpu(), model=model if pre else None)


@contextlib.contextmanager
def _without_normalisation(model: torch.nn.Module):
    """``model.normalize`` is the identity inside the block (an instance attribute shadowing the method, removed
    afterwards): every oodforge classifier normalises through it, so normalised inputs pass as they are."""
    model.__dict__["normalize"] = lambda x: x
    try:
        yield
    finally:
        model.__dict__.pop("normalize", None)


def as_image_data(model, data, cache_dir: str | Path | None = None):
    """``(dataset, cache_dir)`` for :func:`~oodforge.models.features.extract_features`: oodforge datasets pass
    through; a torch Dataset / DataLoader becomes :class:`TorchImages`, and ``cache_dir`` becomes ``None`` (with
    a warning saying why) when its content cannot be fingerprinted."""
    if isinstance(data, TorchImages) or is_torch_data(data):
        data = torch_images(data, model)
        if cache_dir is not None:
            reason = data.cache_refusal()
            if reason is not None:
                warnings.warn(reason, stacklevel=3)
                cache_dir = None
        return data, cache_dir
    if not hasattr(data, "float_images") and not hasattr(data, "batches"):
        raise TypeError(f"cannot read images from a {type(data).__name__}: give an oodforge ArrayDataset / "
                        "FileDataset, a torch.utils.data.Dataset yielding (image, label) or a DataLoader")
    return data, cache_dir


__all__ = ["TorchImages", "as_image_data", "collate_items", "is_torch_data", "torch_images"]
