"""SHIFT (Kwon, Kim et al., BMVC 2023): forge K outliers per ID training image, resumably.

For each training image ``x`` with class ``y`` (Sec. 4.1):

1. the masker marks the ID object: ``M = A(x, y) >= λ`` (Eq. 3 with CLIPSeg; Eq. 2 with a CAM);
2. the inpainter refills it K times: ``x~_k = LDM_inpaint(x, M, Q_LDM; seed_k)`` (Eq. 4).

The outliers go to an :class:`~oodforge.outliers.store.OutlierStore`; a killed run re-run with the same
arguments skips what is committed and produces every ``(source_index, k)`` exactly once. The seed of
outlier ``(i, k)`` is :func:`outlier_seed` ``(seed, i, k)``, independent of batching, ``--limit`` and
``--shard``, so sharded runs merge into exactly the unsharded result.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.base import ArrayDataset
from ..outliers.store import OutlierStore, outlier_seed, parse_shard_spec, shard_indices
from ..progress import note_resume, progress_bar
from .inpaint import Inpainter, make_inpainter
from .masks import Masker, make_masker, mask_coverage


def shift_config(dataset: ArrayDataset, masker: Masker, inpainter: Inpainter, seed: int, shard: str | None,
                 class_names: list[str] | None) -> dict:
    """The store config of a SHIFT run: everything that determines an outlier (not ``k``/``limit``: they only
    say how many are made, so a run can be extended with a larger ``k`` or ``limit``)."""
    return {"method": "shift", "paper": "Kwon, Kim et al., BMVC 2023 (SHIFT)", "dataset": dataset.identity,
            "num_sources": len(dataset), "image_shape": list(dataset.image_shape), "class_names": class_names,
            "masker": masker.config(), "inpainter": inpainter.config(), "seed": int(seed), "shard": shard}


def forge_shift(dataset: ArrayDataset, out_dir: str | Path, masker: Masker, inpainter: Inpainter, k: int = 1,
                seed: int = 0, limit: int | None = None, shard: str | None = None, device: str = "cpu",
                batch_size: int = 32, class_names: list[str] | None = None, progress: bool = True,
                shard_size: int = 512, flush_seconds: float = 60.0) -> OutlierStore:
    """Make the SHIFT outliers of ``dataset`` into the store at ``out_dir`` and return it.

    ``k`` outliers per source image (Sec. 4.1; the paper uses K = 1 and 8); ``limit`` takes the first
    ``limit`` images; ``shard="i/m"`` does only work shard ``i`` of ``m`` (merge with
    :func:`~oodforge.outliers.store.merge_stores`). ``batch_size`` source images are masked and inpainted
    together; results are committed every ``shard_size`` outliers or ``flush_seconds`` seconds.
    Sources whose mask covers less than ``masker.min_coverage`` of the image, or nothing at all, are
    recorded as skipped (an empty mask would make the "outlier" a copy of an ID image).

    The steps: check the arguments, open (or resume) the store, find the missing ``(source, k)``
    keys, forge them batch by batch (:func:`_forge_missing`).
    """
    _check_forge_args(dataset, k, batch_size, shard_size, limit, shard)
    names = list(class_names) if class_names is not None else dataset.class_names
    masker.to(device)
    inpainter.to(device)
    config = shift_config(dataset, masker, inpainter, seed, shard, names)
    n_src = len(dataset) if limit is None else min(limit, len(dataset))
    sources = shard_indices(n_src, shard).tolist()
    if (Path(out_dir) / "store.json").is_file():  # resuming: nothing to load if nothing is missing
        store = OutlierStore(out_dir, config)
        if not _missing_work(sources, k, store.done_keys()):
            return store
    # load the models before creating the store, so a missing model leaves nothing behind
    masker.load()
    inpainter.load()
    store = OutlierStore(out_dir, config)
    note_resume(f"every committed shard of the outlier store {out_dir}")
    with store.writer():
        todo = _missing_work(sources, k, store.done_keys())
        if todo:
            _forge_missing(dataset, store, todo, masker, inpainter, names, seed, batch_size, progress,
                           _ShardBuffer(store, dataset.image_shape, shard_size, flush_seconds))
    return store


def _check_forge_args(dataset: ArrayDataset, k: int, batch_size: int, shard_size: int, limit: int | None,
                      shard: str | None) -> None:
    """Refuse bad arguments before any model is loaded or any store folder is created."""
    if k < 1:
        raise ValueError(f"k (outliers per image) must be >= 1, got {k}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if shard is not None:
        parse_shard_spec(shard)
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.identity} is empty")


def _missing_work(sources: list[int], k: int, done: set) -> dict[int, list[int]]:
    """Per source image, the outlier indices ``k`` not committed yet (``done`` holds the store's keys):
    what a resumed run still has to make, in source order."""
    todo: dict[int, list[int]] = {}
    for i in sources:
        missing = [kk for kk in range(k) if (i, kk) not in done]
        if missing:
            todo[i] = missing
    return todo


class _ShardBuffer:
    """Forged outliers and skipped keys waiting to be committed together as one store shard.

    Committing in shards of ``shard_size`` entries (or after ``flush_seconds``) bounds what a killed run
    loses without writing one file per outlier.
    """

    def __init__(self, store: OutlierStore, image_shape: tuple[int, ...], shard_size: int, flush_seconds: float):
        self.store, self.image_shape = store, image_shape
        self.shard_size, self.flush_seconds = shard_size, flush_seconds
        self.images: list[np.ndarray] = []
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self.last_flush = time.monotonic()

    def due(self) -> bool:
        """Whether enough entries (or time) have gathered to commit a shard."""
        return (len(self.records) + len(self.skipped) >= self.shard_size
                or time.monotonic() - self.last_flush > self.flush_seconds)

    def flush(self) -> None:
        """Commit what is buffered (if anything) as one shard and start a new one."""
        if self.records or self.skipped:
            imgs = np.concatenate(self.images) if self.images else np.zeros((0, *self.image_shape), np.uint8)
            self.store.add_shard(imgs, self.records, self.skipped)
        self.images, self.records, self.skipped = [], [], []
        self.last_flush = time.monotonic()


def _forge_missing(dataset: ArrayDataset, store: OutlierStore, todo: dict[int, list[int]], masker: Masker,
                   inpainter: Inpainter, names: list[str] | None, seed: int, batch_size: int, progress: bool,
                   buffer: _ShardBuffer) -> None:
    """Forge the ``todo`` outliers ``batch_size`` sources at a time, committing a shard whenever one is due;
    the progress bar shows the mean mask coverage and how many outliers were skipped so far."""
    src_list = list(todo)
    bar = progress_bar(total=sum(len(v) for v in todo.values()), desc="shift", unit="img", disable=not progress,
                       dynamic_ncols=True)
    covs: list[float] = []
    n_skipped = 0
    try:
        for b0 in range(0, len(src_list), batch_size):
            n_skipped += _forge_batch(dataset, src_list[b0:b0 + batch_size], todo, masker, inpainter, names, seed,
                                      buffer, bar, covs)
            bar.set_postfix(cov=f"{np.mean(covs):.2f}", skipped=n_skipped, refresh=False)
            if buffer.due():
                buffer.flush()
        buffer.flush()
    finally:
        bar.close()


def _forge_batch(dataset: ArrayDataset, idx: list[int], todo: dict[int, list[int]], masker: Masker,
                 inpainter: Inpainter, names: list[str] | None, seed: int, buffer: _ShardBuffer, bar,
                 covs: list[float]) -> int:
    """Mask the source images ``idx`` (Eq. 2/3), record the sources whose mask covers too little as skipped,
    inpaint the missing outliers of the others (Eq. 4, outlier ``(i, k)`` seeded by :func:`outlier_seed`)
    into ``buffer``. Appends each source's coverage to ``covs``; returns the number of outliers skipped."""
    x = dataset.images[torch.as_tensor(idx)].float().div_(255.0)
    y = dataset.labels[torch.as_tensor(idx)]
    masks = masker(x, y, names)
    cov = mask_coverage(masks)
    rep, seeds, ks, meta = [], [], [], []
    n_skipped = 0
    for j, i in enumerate(idx):
        c = float(cov[j])
        covs.append(c)
        if c <= 0.0 or c < masker.min_coverage:
            buffer.skipped.extend({"source_index": i, "k": kk, "reason": "mask coverage below minimum",
                                   "coverage": c} for kk in todo[i])
            n_skipped += len(todo[i])
            bar.update(len(todo[i]))
            continue
        for kk in todo[i]:
            rep.append(j)
            seeds.append(outlier_seed(seed, i, kk))
            ks.append(kk)
            meta.append((i, kk, c))
    if rep:
        sel = torch.as_tensor(rep)
        buffer.images.append(inpainter(x[sel], masks[sel], seeds, ks, names))
        buffer.records.extend(_record(dataset, names, i, kk, s, c) for (i, kk, c), s in zip(meta, seeds))
        bar.update(len(rep))
    return n_skipped


def _record(dataset: ArrayDataset, names: list[str] | None, i: int, kk: int, seed: int, coverage: float) -> dict:
    """The store record of outlier ``(i, kk)``: its key, seed, the source's label and class, the mask coverage."""
    lab = int(dataset.labels[i])
    return {"source_index": i, "k": kk, "seed": seed, "label": lab,
            "class": names[lab] if names and 0 <= lab < len(names) else None, "coverage": coverage}


__all__ = ["forge_shift", "shift_config", "make_masker", "make_inpainter"]
