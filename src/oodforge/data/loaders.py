"""Loaders for users' own image data, and the on-disk cache of built datasets.

Every loader returns an :class:`~oodforge.data.base.ArrayDataset` (uint8 ``[N, C, H, W]``, int64
labels, ``-1`` = unlabelled) and fails with one error that names the file, the format it expected
and what to do:

* :func:`load_image_folder` - ``root/<class>/<image>`` (class names sorted), or a flat folder of
  images (unlabelled, e.g. an OOD set);
* :func:`load_cifar` - CIFAR-10/100 "python version" pickle batches (a folder, the ``.tar.gz``
  archive, or one batch file);
* :func:`load_svhn_mat` - SVHN ``train_32x32.mat`` / ``test_32x32.mat``;
* :func:`load_npz` - ``.npz`` with an image array (NHWC or NCHW, uint8 or float in [0, 1]);
* :func:`read_idx` - the IDX format of MNIST / Fashion-MNIST;
* :func:`load_dataset` - dispatches on what a path is, and can resize / convert channels
  (:func:`conform`) so any data fits a given model.

Dataset identities (the feature-cache key) contain a hash of the pixels and labels, so editing a
file on disk never serves stale cached features.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oodforge.data.base import ArrayDataset, luma
from oodforge.data.idx import DatasetFormatError, DatasetNotFoundError, read_idx  # noqa: F401  (re-exported)
from oodforge.data.images import DEFAULT_PIPELINE, ImagePipeline, decode
from oodforge.data.sampling import stratified_indices  # noqa: F401  (re-exported: one sampler, data/sampling.py)

__all__ = [
    "DatasetNotFoundError",
    "DatasetFormatError",
    "IMAGE_EXTENSIONS",
    "read_idx",
    "load_image_folder",
    "list_image_folder",
    "image_path",
    "image_files",
    "load_image_file",
    "is_plain_image_folder",
    "decode_image",
    "load_cifar",
    "load_svhn_mat",
    "load_npz",
    "load_dataset",
    "conform",
    "to_uint8_nchw",
    "data_cache_dir",
    "cached_arrays",
    "stratified_indices",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------------
# small helpers


def _content_identity(prefix: str, images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return f"{prefix}:{h.hexdigest()[:16]}"


def to_uint8_nchw(images: np.ndarray, source: str = "images") -> np.ndarray:
    """Convert an image array to uint8 ``[N, C, H, W]``.

    Accepts ``[N, H, W]`` (grayscale), ``[N, H, W, C]`` or ``[N, C, H, W]`` with C in {1, 3, 4}
    (alpha is dropped), as uint8 / integers in 0..255 or floats in [0, 1]. When both layouts fit
    (e.g. ``[N, 3, 3, 3]``) the array is read as NHWC if its 2nd and 3rd axes are equal, else NCHW.
    ``source`` names the file in error messages.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DatasetFormatError(
            f"{source}: expected images shaped [N, H, W], [N, H, W, C] or [N, C, H, W], got {x.shape}"
        )
    c_first, c_last = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
    if c_last and (not c_first or x.shape[1] == x.shape[2]):
        x = x.transpose(0, 3, 1, 2)
    elif not c_first:
        raise DatasetFormatError(
            f"{source}: cannot find the channel axis in shape {x.shape}; expected NHWC or NCHW with 1, 3 or 4 channels"
        )
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (not np.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6):
            lo, hi = (float(np.nanmin(x)), float(np.nanmax(x))) if x.size else (0.0, 0.0)
            raise DatasetFormatError(
                f"{source}: float images must be finite and in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                "divide 0..255 data by 255 or store uint8"
            )
        return np.ascontiguousarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        if x.dtype == bool:
            return np.ascontiguousarray(x.astype(np.uint8) * 255)
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetFormatError(
                f"{source}: integer images must be in 0..255, got range [{x.min()}, {x.max()}]"
            )
        return np.ascontiguousarray(x.astype(np.uint8))
    raise DatasetFormatError(f"{source}: unsupported image dtype {x.dtype}; use uint8 or float in [0, 1]")


def _resize_uint8(images: np.ndarray, size: tuple[int, int], chunk: int = 2048) -> np.ndarray:
    """Resize uint8 ``[N, C, H, W]`` with bilinear interpolation and anti-aliasing (torch)."""
    if images.shape[2:] == tuple(size):
        return images
    out = np.empty((images.shape[0], images.shape[1], *size), np.uint8)
    for s in range(0, images.shape[0], chunk):
        x = torch.from_numpy(images[s : s + chunk]).float()
        y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[s : s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` to 1 (ITU-R 601 luma) or 3 (replicated gray) channels."""
    c = images.shape[1]
    if c == channels:
        return images
    if channels == 3 and c == 1:
        return np.ascontiguousarray(np.repeat(images, 3, axis=1))
    if channels == 1 and c == 3:
        grey = luma(images.astype(np.float32), axis=1)[:, None]
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels (use 1 or 3)")


def conform(
    dataset: ArrayDataset, size: int | tuple[int, int] | None = None, channels: int | None = None
) -> ArrayDataset:
    """Resize (bilinear, anti-aliased) and/or convert channels so ``dataset`` fits a model's input.

    Colour to gray uses the ITU-R 601 luma weights; gray to colour replicates the channel. The
    identity records the conversion, so cached features stay correct.
    """
    imgs = dataset.images.numpy()
    tag = []
    if channels is not None and imgs.shape[1] != channels:
        imgs = _to_channels(imgs, channels)
        tag.append(f"c{channels}")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if imgs.shape[2:] != hw:
            imgs = _resize_uint8(imgs, hw)
            tag.append(f"{hw[0]}x{hw[1]}")
    if not tag:
        return dataset
    return ArrayDataset(imgs, dataset.labels, dataset.class_names, f"{dataset.identity}[{','.join(tag)}]")


# --------------------------------------------------------------------------------------------------
# image folders


def load_image_file(path: str | os.PathLike, in_channels: int, size: tuple[int, int] | None = None,
                    pipeline: ImagePipeline = DEFAULT_PIPELINE, info: dict | None = None) -> torch.Tensor:
    """One PNG/JPEG/... file as float ``[C, H, W]`` in ``[0, 1]`` with ``in_channels`` channels (1: BT.601
    luma, 3: RGB, grey replicated), brought to ``size = (H, W)`` by the image pipeline
    (:mod:`oodforge.data.images`: the same decoding, alpha flattening and resize policy as every image-folder
    loader, so a file scores as it would in ``bench``). ``info`` receives the file's own channels and size.
    Used by ``predict`` and ``explain``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"image file {path} does not exist")
    if in_channels not in (1, 3):
        raise ValueError(f"the model expects {in_channels} channels; image files give 1 (grey) or 3 (RGB)")
    chw = decode(path, pipeline, size, info)  # info: the file's own channels and size (predict's warning)
    return torch.from_numpy(np.array(_to_channels(chw[None], in_channels)[0])).float().div_(255.0)  # (a copy: writable)


def _images_under(d: str, recursive: bool) -> np.ndarray:
    """Image files under folder ``d`` as paths relative to it, in ``Path`` order (by path components), as a
    numpy bytes array: 600 k paths cost about 10 MB this way, against about 235 MB as ``Path`` objects.
    Names are read as bytes (no ``str`` copies), so listing a class folder of 60 k images peaks at a few MB.

    Symbolic links to folders are followed, as they are for class folders (a folder reached twice, e.g. by a
    link to one of its parents, is read once)."""
    exts = tuple(e.encode() for e in IMAGE_EXTENSIONS)
    found: list[bytes] = []
    nested = False
    seen: set[bytes] = set()
    for top, dirs, names in os.walk(os.fsencode(d), followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link cycle or a second link to the same folder
            dirs[:] = []
            continue
        seen.add(real)
        rel = os.path.relpath(top, os.fsencode(d))
        nested |= rel != b"."
        found += [n if rel == b"." else os.path.join(rel, n) for n in names  # os.walk: names are not folders
                  if n.lower().endswith(exts)]
        del names
        if not recursive:
            break
    if nested:  # Path order compares components: "a/x" < "a-b/x", unlike plain byte order
        found.sort(key=lambda r: r.split(os.sep.encode()))
    else:
        found.sort()
    return np.array(found, dtype=bytes) if found else np.empty(0, "S1")


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Files as given, folders searched recursively (symbolic links followed) for every extension the
    image-folder loaders read (:data:`IMAGE_EXTENSIONS`), each folder's files in :func:`list_image_folder`'s
    order. Used by ``predict``, so it serves exactly the files ``bench`` would read."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(image_path(p, r) for r in _images_under(str(p), True))
        elif p.is_file():
            out.append(p)
        else:
            raise DatasetNotFoundError(f"{p} does not exist")
    return out


def list_image_folder(root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """The image files of an image folder, their labels and the class names, without reading any image.

    ``root/<class name>/**/<image>``: class names are the sorted sub-folder names, labels index them.
    A folder with images but no sub-folders is one unlabelled set (labels ``-1``, class names ``None``).
    Files are returned relative to ``root`` as a numpy bytes array (see :func:`image_path`), so listing a
    folder of millions of images stays small. Shared by :func:`load_image_folder` (reads everything) and
    :mod:`oodforge.data.streaming` (reads on demand).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: image folder not found (expected root/<class>/<image files>)")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    parts: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    class_names: list[str] | None = None
    if subdirs:
        class_names = subdirs
        for k, name in enumerate(subdirs):
            found = _images_under(str(root / name), True)
            if not len(found):
                raise DatasetFormatError(f"{root / name}: class folder with no images (extensions "
                                         f"{', '.join(IMAGE_EXTENSIONS)}); remove it or add its images, since "
                                         "every sub-folder of an image folder is a class")
            parts.append(np.char.add(os.fsencode(name) + b"/", found))
            labels.append(np.full(len(found), k, np.int64))
    else:
        found = _images_under(str(root), False)
        parts.append(found)
        labels.append(np.full(len(found), -1, np.int64))
    files = np.concatenate(parts)
    if not len(files):
        raise DatasetFormatError(
            f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)}); expected root/<class>/<image>"
        )
    return files, np.concatenate(labels), class_names


def image_path(root: Path, rel: bytes) -> Path:
    """The file of entry ``rel`` of :func:`list_image_folder`."""
    return root / os.fsdecode(rel)


def decode_image(path: Path, size: int | tuple[int, int] | None = None, channels: int | None = None,
                 pipeline: ImagePipeline = DEFAULT_PIPELINE) -> np.ndarray:
    """One image file as uint8 ``[C, H, W]`` through the image pipeline (:func:`oodforge.data.images.decode`:
    EXIF orientation, alpha flattened onto the background, resized to ``size`` by the pipeline's policy when
    given), converted to ``channels`` (1: BT.601 luma, 3: RGB; by default as stored, grey = 1)."""
    chw = decode(path, pipeline, size)
    return _to_channels(chw[None], channels)[0] if channels is not None else chw


def load_image_folder(
    root: str | os.PathLike,
    size: int | None = None,
    channels: int | None = None,
    progress: bool = True,
    pipeline: ImagePipeline = DEFAULT_PIPELINE,
) -> ArrayDataset:
    """Images in ``root/<class name>/**/<image>``, read into memory (see :func:`list_image_folder`) through the
    image pipeline (:mod:`oodforge.data.images`; ``pipeline`` sets its background colour and resize policy).

    ``size`` resizes each image by the pipeline's policy (default: shorter side to ``size``, then a centre
    crop); without it every image must have the same height and width. ``channels`` (1 or 3) converts; by default it is 1 if
    every image is grayscale, else 3. For folders too large for memory use
    :func:`oodforge.data.streaming.stream_image_folder`.
    """
    from ..progress import progress_bar

    root = Path(root)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    rel, labels, class_names = list_image_folder(root)
    files = [image_path(root, r) for r in rel]
    arrays = [decode_image(p, size, pipeline=pipeline) for p in progress_bar(files, desc=f"reading {root.name}",
                                                          disable=not progress or len(files) < 500, leave=False)]
    if size is None:
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            example = {a.shape[1:]: p for a, p in zip(arrays, files, strict=True)}
            detail = ", ".join(f"{p.name} is {h}x{w}" for (h, w), p in list(example.items())[:3])
            raise DatasetFormatError(f"{root}: images have different sizes ({detail}); resize them all (image_size = N in a "
                                     "suite file, --image-size N with --id-train, size=N in Python)")
    if channels is None:
        channels = 1 if all(a.shape[0] == 1 for a in arrays) else 3
    out = np.stack([_to_channels(a[None], channels)[0] for a in arrays])
    return ArrayDataset(out, labels, class_names, _content_identity(f"imagefolder:{root.name}", out, labels))


# --------------------------------------------------------------------------------------------------
# CIFAR pickles


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers (CIFAR batches need no more).

    Pickle can run arbitrary code; refusing every other global keeps a malicious "batch" inert.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def _unpickle(data: bytes, source: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure means "not a CIFAR batch"
        raise DatasetFormatError(f"{source}: not a CIFAR python pickle batch ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{source}: expected a pickled dict (CIFAR batch), got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


_CIFAR_TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "train")
_CIFAR_TEST_FILES = ("test_batch", "test")
_CIFAR_META_FILES = ("batches.meta", "meta")


def _cifar_batch(d: dict, source: str, label_mode: str) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in d:
        raise DatasetFormatError(f"{source}: CIFAR batch has no 'data' entry (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFormatError(f"{source}: CIFAR 'data' must be [N, 3072] uint8, got {data.shape}")
    key = {"fine": "fine_labels", "coarse": "coarse_labels"}[label_mode]
    if "labels" in d:
        labels = np.asarray(d["labels"], np.int64)
    elif key in d:
        labels = np.asarray(d[key], np.int64)
    else:
        raise DatasetFormatError(f"{source}: CIFAR batch has no 'labels' / '{key}' entry (keys: {sorted(d)})")
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(f"{source}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32).astype(np.uint8), labels


def _cifar_class_names(meta: dict | None, label_mode: str) -> list[str] | None:
    if meta is None:
        return None
    for key in ("label_names", f"{label_mode}_label_names"):
        if key in meta:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]
    return None


def load_cifar(path: str | os.PathLike, split: str = "train", label_mode: str = "fine") -> ArrayDataset:
    """CIFAR-10 / CIFAR-100 in the "python version" pickle format.

    ``path`` may be the extracted folder (``data_batch_1..5`` + ``test_batch`` + ``batches.meta``
    for CIFAR-10, ``train`` + ``test`` + ``meta`` for CIFAR-100, or a parent folder holding
    ``cifar-10-batches-py`` / ``cifar-100-python``), the downloaded ``.tar.gz``, or a single batch
    file (then ``split`` is ignored). ``label_mode`` picks CIFAR-100's ``fine`` (100) or ``coarse``
    (20) labels. Only numpy arrays are unpickled (see :class:`_NumpyOnlyUnpickler`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: CIFAR data not found (expected the extracted folder or the .tar.gz)")
    wanted = _CIFAR_TRAIN_FILES if split == "train" else _CIFAR_TEST_FILES

    files: dict[str, bytes] = {}
    single = False
    if path.is_dir():
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (path / sub).is_dir():
                path = path / sub
        for name in wanted + _CIFAR_META_FILES:
            if (path / name).is_file():
                files[name] = (path / name).read_bytes()
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted + _CIFAR_META_FILES:
                    files[base] = tf.extractfile(m).read()  # type: ignore[union-attr]
    else:
        single = True
        files[path.name] = path.read_bytes()
        for name in _CIFAR_META_FILES:
            if (path.parent / name).is_file():
                files[name] = (path.parent / name).read_bytes()

    batch_names = [path.name] if single else [n for n in wanted if n in files]
    if not batch_names:
        raise DatasetFormatError(
            f"{path}: no CIFAR {split} batches found; expected {' / '.join(wanted)} (CIFAR-10: data_batch_1..5, "
            "test_batch; CIFAR-100: train, test)"
        )
    meta = next((_unpickle(files[n], str(path / n)) for n in _CIFAR_META_FILES if n in files), None)
    imgs, labs = [], []
    for n in batch_names:
        src = str(path if single else path / n)
        x, y = _cifar_batch(_unpickle(files[n], src), src, label_mode)
        imgs.append(x)
        labs.append(y)
    images, labels = np.concatenate(imgs), np.concatenate(labs)
    names = _cifar_class_names(meta, label_mode)
    if names is not None and labels.size and labels.max() >= len(names):
        raise DatasetFormatError(f"{path}: label {labels.max()} but only {len(names)} class names in the meta file")
    kind = "cifar100" if "fine_label_names" in (meta or {}) or "train" in batch_names or "test" in batch_names else "cifar10"
    tag = path.name if single else split
    return ArrayDataset(images, labels, names, _content_identity(f"{kind}/{tag}", images, labels))


# --------------------------------------------------------------------------------------------------
# SVHN .mat


def load_svhn_mat(path: str | os.PathLike) -> ArrayDataset:
    """SVHN cropped digits (``train_32x32.mat`` / ``test_32x32.mat`` / ``extra_32x32.mat``).

    ``X`` is ``[32, 32, 3, N]`` uint8 and ``y`` is ``[N, 1]`` with digit 0 stored as label 10; it is
    mapped back to 0, so class ``k`` is digit ``k``.
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: SVHN .mat file not found (e.g. test_32x32.mat)")
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as e:
        raise DatasetFormatError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; save it as -v7 or npz") from e
    except Exception as e:  # noqa: BLE001 - scipy raises several kinds for a bad file
        raise DatasetFormatError(f"{path}: not a readable MATLAB .mat file ({e})") from e
    if "X" not in mat or "y" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetFormatError(f"{path}: expected variables 'X' [32,32,3,N] and 'y' [N,1], found {keys}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[2] != 3:
        raise DatasetFormatError(f"{path}: 'X' must be [H, W, 3, N], got {x.shape}")
    if x.shape[3] != y.shape[0]:
        raise DatasetFormatError(f"{path}: {x.shape[3]} images in 'X' but {y.shape[0]} labels in 'y'")
    images = to_uint8_nchw(x.transpose(3, 2, 0, 1), str(path))
    labels = np.where(y == 10, 0, y)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(f"{path}: SVHN labels must be 1..10, got range [{y.min()}, {y.max()}]")
    return ArrayDataset(images, labels, [str(i) for i in range(10)], _content_identity(f"svhn/{path.stem}", images, labels))


# --------------------------------------------------------------------------------------------------
# npz


def load_npz(
    path: str | os.PathLike,
    images_key: str = "images",
    labels_key: str | None = "labels",
    class_names_key: str = "class_names",
) -> ArrayDataset:
    """An ``.npz`` holding images (NHWC or NCHW, uint8 or float in [0, 1]) and optional labels.

    ``labels_key=None`` loads an unlabelled set (labels ``-1``). Class names are read from
    ``class_names_key`` when the archive has it. No pickles are loaded (``allow_pickle=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: .npz file not found")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DatasetFormatError(f"{path}: not a readable .npz archive ({e})") from e
    with z:
        keys = sorted(z.files)
        if images_key not in keys:
            raise DatasetFormatError(f"{path}: no array {images_key!r} (found {keys}); pass images_key=<name>")
        try:
            images = to_uint8_nchw(z[images_key], f"{path}[{images_key}]")
            if labels_key is None:
                labels = np.full(images.shape[0], -1, np.int64)
            elif labels_key not in keys:
                raise DatasetFormatError(
                    f"{path}: no array {labels_key!r} (found {keys}); pass labels_key=<name>, or labels_key=None "
                    "for an unlabelled set"
                )
            else:
                labels = np.asarray(z[labels_key]).reshape(-1)
                if not np.issubdtype(labels.dtype, np.integer):
                    raise DatasetFormatError(f"{path}[{labels_key}]: labels must be integers, got {labels.dtype}")
                labels = labels.astype(np.int64)
            names = [str(s) for s in z[class_names_key]] if class_names_key in keys else None
        except ValueError as e:
            if isinstance(e, DatasetFormatError):
                raise
            raise DatasetFormatError(f"{path}: {e}") from e
    if labels.shape[0] != images.shape[0]:
        raise DatasetFormatError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return ArrayDataset(images, labels, names, _content_identity(f"npz/{path.stem}", images, labels))


# --------------------------------------------------------------------------------------------------
# dispatch


def _looks_like_cifar(d: Path) -> bool:
    names = {p.name for p in d.iterdir()}
    return bool(
        names & {"data_batch_1", "test_batch", "batches.meta", "cifar-10-batches-py", "cifar-100-python"}
        or ({"train", "test", "meta"} <= names and (d / "train").is_file())
    )


def _looks_like_idx(d: Path) -> bool:
    return any(p.name.startswith(("train-images-idx3", "t10k-images-idx3")) for p in d.iterdir())


def is_plain_image_folder(path: Path) -> bool:
    """A folder that :func:`load_dataset` reads as an image folder (not CIFAR batches, not IDX files)."""
    return path.is_dir() and not _looks_like_cifar(path) and not _looks_like_idx(path)


def load_dataset(
    spec: str | os.PathLike,
    split: str = "test",
    size: int | None = None,
    channels: int | None = None,
    data_root: str | os.PathLike | None = None,
    pipeline: ImagePipeline = DEFAULT_PIPELINE,
    **kwargs,
) -> ArrayDataset:
    """Load a dataset from a name or a path, choosing the loader from what the path is.

    * ``"fashion-mnist"`` / ``"fashion-mnist:train"`` - the Debian Fashion-MNIST (``data_root`` overrides);
    * ``*.npz`` -> :func:`load_npz`; ``*.mat`` -> :func:`load_svhn_mat`;
    * ``*.tar.gz`` / ``*.tgz``, a CIFAR folder or a single batch file -> :func:`load_cifar` (``split``);
    * a folder of IDX files (``train-images-idx3-ubyte[.gz]``) -> Fashion-MNIST format;
    * any other folder -> :func:`load_image_folder`.

    ``size`` / ``channels`` then :func:`conform` the result (e.g. to evaluate a 28x28 gray model on
    your own photos; image folders are resized by shorter side and centre-cropped while they are read, so
    their images may have mixed sizes; ``pipeline`` is their :class:`~oodforge.data.images.ImagePipeline`).
    Extra ``kwargs`` go to the chosen loader.
    """
    from oodforge.data.fashion import load_fashion_mnist

    s = str(spec)
    if s.split(":", 1)[0] in ("fashion-mnist", "fashion_mnist", "fashionmnist") and not Path(s).exists():
        sp = s.split(":", 1)[1] if ":" in s else split
        ds = load_fashion_mnist(sp, data_root=data_root)
        return conform(ds, size, channels)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(
            f"{path}: no such file or folder; expected an image folder, CIFAR batches (.tar.gz/folder), an SVHN .mat, "
            "an .npz, or 'fashion-mnist[:train|test]'"
        )
    name = path.name.lower()
    if path.is_dir():
        if _looks_like_cifar(path):
            ds = load_cifar(path, split=split, **kwargs)
        elif _looks_like_idx(path):
            ds = load_fashion_mnist(split, data_root=path)
        else:  # shorter side resized to ``size`` and centre-cropped, so folders of mixed sizes load too
            ds = load_image_folder(path, size=size, channels=channels, pipeline=pipeline, **kwargs)
    elif name.endswith(".npz"):
        ds = load_npz(path, **kwargs)
    elif name.endswith(".mat"):
        ds = load_svhn_mat(path)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        ds = load_cifar(path, split=split, **kwargs)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        raise DatasetFormatError(f"{path}: a single image is not a dataset; put images in a folder and pass the folder")
    else:
        ds = load_cifar(path, split=split, **kwargs)
    return conform(ds, size, channels)


# --------------------------------------------------------------------------------------------------
# on-disk cache of built arrays


def data_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where built datasets are cached: ``cache_dir``, else ``$OODFORGE_CACHE/data``, else
    ``~/.cache/oodforge/data``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("OODFORGE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "oodforge") / "data"


def cached_arrays(
    kind: str,
    params: dict,
    build: Callable[[], dict[str, np.ndarray]],
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """Return ``build()``'s arrays, cached as ``<kind>-<hash(params)>.npz`` under :func:`data_cache_dir`.

    The file is written to a temporary name in the same folder, fsynced and renamed, so a killed
    run never leaves a half-written cache entry; an unreadable entry is rebuilt.
    """
    if not use_cache:
        return build()
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    d = data_cache_dir(cache_dir)
    path = d / f"{kind}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - corrupt cache entry: rebuild it
            pass
    arrays = build()
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{kind}-", suffix=".npz.tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return arrays
