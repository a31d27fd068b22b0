"""One forward pass per (model, dataset), cached on disk in memory-mapped arrays.

Every feature-based detector reads the same :class:`FeatureSet`, so a benchmark with ten
detectors costs one pass over each dataset. The cache key is the hash of the model's weights
plus the dataset's ``identity``. An entry is a folder of ``.npy`` arrays (logits, penultimate,
labels, optionally feature_map) that the forward pass fills batch by batch and that is then opened
memory-mapped (copy-on-write): the features are never held twice in memory, and a dataset larger
than memory (a streamed :class:`~oodforge.data.streaming.FileDataset`) costs only the pages the
detectors touch. The folder is written under a temporary name and renamed when complete, so a
killed run never leaves a half-written entry behind.

The pass runs under ``torch.inference_mode`` (no autograd bookkeeping; nothing here needs a gradient). On
CUDA, each batch is copied from pinned memory with ``non_blocking=True`` (the copy overlaps the previous
batch's compute), and ``amp="bf16"`` / ``"fp16"`` runs the forward pass under ``torch.autocast`` (features
stored in float32; the cache key records the precision). None of this changes a CPU result: the CPU path
computes exactly what the plain ``no_grad`` loop computed (tests/test_forward_pass.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data.base import ArrayDataset
from ..progress import progress_bar
from .checkpoint import weights_hash
from .featureset import FeatureSet
from .torchdata import as_image_data

FIELDS = ("logits", "penultimate", "feature_map")
#: ``amp`` values: autocast dtypes of the forward pass (CUDA only)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("OODFORGE_CACHE", Path.home() / ".cache" / "oodforge")) / "features"


def _cache_entry(cache_dir: Path, model_hash: str, dataset: ArrayDataset, feature_map: bool,
                 amp: str | None = None) -> Path:
    """The entry of (weights, dataset, with or without maps, precision); ``model_hash`` is :func:`weights_hash`
    of the model. Full precision keeps the key it always had."""
    tag = f"|amp={amp}" if amp else ""
    key = hashlib.sha256(f"{model_hash}|{dataset.identity}|{int(feature_map)}{tag}".encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{key}.features"


def _batches(dataset, batch_size: int, rows: tuple[int, int] | None = None):
    """The dataset's float batches in order; ``batches`` when it has one (streamed data decodes in workers).
    ``rows = (start, stop)``, ``start`` a multiple of ``batch_size``: only the batches of those rows, cut
    exactly where the whole pass cuts them (a shard's numbers are those of the one-process pass)."""
    if rows is not None:
        start, stop = rows
        if hasattr(dataset, "float_images"):
            return (dataset.float_images(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size))
        return (b for j, b in enumerate(dataset.batches(batch_size)) if start <= j * batch_size < stop)
    if hasattr(dataset, "batches"):
        return dataset.batches(batch_size)
    return (dataset.float_images(i, i + batch_size) for i in range(0, len(dataset), batch_size))


class _Sink:
    """Where the forward pass writes: arrays allocated from the first batch's shapes, either in memory
    (``folder=None``) or as ``.npy`` files in ``folder`` (memory-mapped, filled in place)."""

    def __init__(self, n: int, folder: Path | None) -> None:
        self.n, self.folder, self.arrays = n, folder, {}

    def write(self, name: str, start: int, batch: torch.Tensor) -> None:
        if name not in self.arrays:
            shape = (self.n, *batch.shape[1:])
            if self.folder is None:
                self.arrays[name] = np.empty(shape, np.float32)
            else:
                self.arrays[name] = np.lib.format.open_memmap(self.folder / f"{name}.npy", "w+", np.float32, shape)
        self.arrays[name][start:start + batch.shape[0]] = batch.float().cpu().numpy()

    def finish(self, labels: torch.Tensor) -> FeatureSet | None:
        """The in-memory FeatureSet; with a ``folder``, save the labels next to the arrays and return None (the
        caller opens the completed cache entry, memory-mapped)."""
        if self.folder is None:
            t = {k: torch.from_numpy(v) for k, v in self.arrays.items()}
            return FeatureSet(t["logits"], t["penultimate"], labels.clone(), t.get("feature_map"))
        np.save(self.folder / "labels.npy", labels.numpy())
        for a in self.arrays.values():
            a.flush()
        return None


def readable_identity(identity: str) -> str:
    """A dataset identity as a progress label: ``imagefolder:train:79ec36c182beb10a[train-minus-val:n6:seed0]`` ->
    ``train [train-minus-val]`` (content hashes and loader prefixes dropped, the last subset tag kept)."""
    base, *tags = identity.replace("]", "").split("[")
    words = [w for w in base.split(":") if w and w not in ("imagefolder", "stream", "npz", "user")
             and not re.fullmatch(r"[0-9a-f]{12,}", w)]
    tag = tags[-1].split(":")[0] if tags else ""
    return ":".join(words) + (f" [{tag}]" if tag else "")


def _remove_stale_tmp(cache_dir: Path) -> None:
    """Half-written entries (``<entry>.tmp<PID>``) of processes that no longer run (killed runs), in the cache."""
    for d in cache_dir.glob("*.tmp*"):
        m = re.fullmatch(r".+\.tmp(\d+)", d.name)
        if not m or not d.is_dir() or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # alive, under another user
            pass


def check_amp(amp: str | None, device: str) -> None:
    """``amp`` is ``None``, ``"bf16"`` or ``"fp16"``, and mixed precision only on a CUDA device."""
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r}: choose bf16 or fp16 (or leave it out for float32)")
    if torch.device(device).type != "cuda":
        raise ValueError(f"amp={amp!r} runs the forward pass in mixed precision on CUDA only; device is {device!r} "
                         "(leave amp out on the CPU: float32 there)")


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; to CUDA from pinned memory without blocking the host (a CPU batch is as it is)."""
    if device.type != "cuda":
        return x.to(device)
    return (x if x.is_cuda else x.pin_memory()).to(device, non_blocking=True)


def _forward(model, dataset: ArrayDataset, device: str, batch_size: int, feature_map: bool, progress: bool,
             folder: Path | None = None, amp: str | None = None,
             rows: tuple[int, int] | None = None) -> FeatureSet | None:
    model.to(device).eval()
    dev = torch.device(device)
    autocast = torch.autocast("cuda", dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    lo, hi = rows if rows is not None else (0, len(dataset))
    n = hi - lo
    sink = _Sink(n, folder)
    start = 0
    label = getattr(dataset, "name", None) or readable_identity(dataset.identity)  # (a torch Dataset: costs a read)
    for x in progress_bar(_batches(dataset, batch_size, rows), total=-(-n // batch_size),
                          desc=f"features {label[:40]}", disable=not progress, leave=False):
        # only the model call in inference mode: the batches' and the FeatureSet's tensors stay normal tensors
        with torch.inference_mode(), autocast:
            out = model.forward_all(_to_device(x, dev))
            sink.write("logits", start, out.logits)
            sink.write("penultimate", start, out.penultimate)
            if feature_map:
                sink.write("feature_map", start, out.feature_map)
        start += x.shape[0]
    if start != n:
        raise RuntimeError(f"dataset {dataset.identity} gave {start} images for its length {n}")
    return sink.finish(dataset.labels[lo:hi])


def _open_entry(entry: Path, feature_map: bool) -> FeatureSet | None:
    """A cached entry, memory-mapped copy-on-write (writes stay private to this process); ``None`` when it
    is missing or unreadable (a corrupt entry is removed and recomputed, never trusted)."""
    if not entry.is_dir():
        return None
    try:
        t = {k: np.load(entry / f"{k}.npy", mmap_mode="c") for k in ("logits", "penultimate")}
        if feature_map:
            t["feature_map"] = np.load(entry / "feature_map.npy", mmap_mode="c")
        labels = torch.from_numpy(np.load(entry / "labels.npy", mmap_mode="c"))
        return FeatureSet(torch.from_numpy(t["logits"]), torch.from_numpy(t["penultimate"]), labels,
                          torch.from_numpy(t["feature_map"]) if feature_map else None)
    except (OSError, ValueError):
        shutil.rmtree(entry, ignore_errors=True)
        return None


def extract_features(model: torch.nn.Module, dataset: ArrayDataset, device: str = "cpu", batch_size: int = 256,
                     feature_map: bool = False, cache_dir: str | Path | None = None,
                     progress: bool = True, model_hash: str | None = None, amp: str | None = None) -> FeatureSet:
    """Logits, penultimate vectors (and optionally last feature maps) of ``model`` on ``dataset``.

    ``dataset`` is an ``ArrayDataset``, a streamed ``FileDataset``, or a user's torch ``Dataset`` yielding
    ``(image, label)`` / ``DataLoader``, read with its transforms as they are (:mod:`.torchdata`: its rule for
    normalised float images and its content fingerprint). With ``cache_dir`` set, results are read from /
    written to disk as memory-mapped arrays. A cached entry with feature maps also serves requests without them.

    The cache key hashes the weights once per call (:func:`~.checkpoint.weights_hash`, a full pass over the
    parameters); a caller that extracts many datasets with one unchanged model (``oodforge.bench``: once per
    job) passes that hash as ``model_hash``. It must be the hash of the weights as they are now: a stale one
    would read another model's features. ``amp`` (``"bf16"`` / ``"fp16"``, CUDA only): the forward pass under
    ``torch.autocast`` (see the module docstring).
    """
    check_amp(amp, device)
    dataset, cache_dir = as_image_data(model, dataset, cache_dir)
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.identity} is empty")
    if cache_dir is None:
        return _forward(model, dataset, device, batch_size, feature_map, progress, amp=amp)
    cache_dir = Path(cache_dir)
    model_hash = model_hash or weights_hash(model)
    for with_map in ((True,) if feature_map else (False, True)):
        cached = _open_entry(_cache_entry(cache_dir, model_hash, dataset, with_map, amp), feature_map)
        if cached is not None:
            return cached
    entry = _cache_entry(cache_dir, model_hash, dataset, feature_map, amp)
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    _remove_stale_tmp(tmp.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _forward(model, dataset, device, batch_size, feature_map, progress, folder=tmp, amp=amp)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first: use theirs
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open_entry(entry, feature_map)


# ------------------------------------------------------------------------------ across processes (torchrun)
def shard_rows(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``rank`` of ``world``: a contiguous run of whole batches, so every
    batch is the one the single-process pass computes (same rows, same shapes: bit-identical features)."""
    nb = -(-n // batch_size)
    return min(n, rank * nb // world * batch_size), min(n, (rank + 1) * nb // world * batch_size)


def _part(entry: Path, rank: int, world: int) -> Path:
    return entry.with_name(f"{entry.name}.part{rank}of{world}")


def extract_part(model: torch.nn.Module, dataset, rank: int, world: int, cache_dir: str | Path, device: str = "cpu",
                 batch_size: int = 256, feature_map: bool = False, model_hash: str | None = None,
                 amp: str | None = None, progress: bool = False) -> None:
    """Shard ``rank`` of ``world`` of ``dataset``'s features, written next to its cache entry as a part folder
    (temp name, then renamed: never half-written). Nothing is done when the whole entry or this part exists."""
    check_amp(amp, device)
    dataset, cache_dir = as_image_data(model, dataset, cache_dir)
    model_hash = model_hash or weights_hash(model)
    entry = _cache_entry(Path(cache_dir), model_hash, dataset, feature_map, amp)
    part = _part(entry, rank, world)
    if entry.is_dir() or part.is_dir():
        return
    rows = shard_rows(len(dataset), batch_size, rank, world)
    tmp = part.with_name(f"{part.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if rows[1] > rows[0]:
            _forward(model, dataset, device, batch_size, feature_map, progress, folder=tmp, amp=amp, rows=rows)
        os.replace(tmp, part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_parts(model: torch.nn.Module, dataset, world: int, cache_dir: str | Path, feature_map: bool = False,
                model_hash: str | None = None, amp: str | None = None) -> bool:
    """Concatenate the ``world`` part folders of ``dataset`` (:func:`extract_part`) into its cache entry, in
    row order, atomically; the parts are removed. Returns whether the entry exists now (False: a part is
    missing, and :func:`extract_features` will compute the entry itself)."""
    dataset, cache_dir = as_image_data(model, dataset, cache_dir)
    model_hash = model_hash or weights_hash(model)
    entry = _cache_entry(Path(cache_dir), model_hash, dataset, feature_map, amp)
    parts = [_part(entry, r, world) for r in range(world)]
    if entry.is_dir():
        return True
    if not all(p.is_dir() for p in parts):
        return False
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in ("logits", "penultimate", *(("feature_map",) if feature_map else ())):
            pieces = [np.load(p / f"{name}.npy", mmap_mode="r") for p in parts if (p / f"{name}.npy").is_file()]
            out = np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", np.float32,
                                            (len(dataset), *pieces[0].shape[1:]))
            start = 0
            for a in pieces:
                out[start:start + len(a)] = a
                start += len(a)
            if start != len(dataset):
                raise RuntimeError(f"the parts of {dataset.identity} hold {start} rows, not {len(dataset)}")
            out.flush()
            del out
        np.save(tmp / "labels.npy", dataset.labels.numpy())
        try:
            os.replace(tmp, entry)
        except OSError:  # finished by another process first
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
    return True
