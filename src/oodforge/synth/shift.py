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
    """
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
    names = list(class_names) if class_names is not None else dataset.class_names
    masker.to(device)
    inpainter.to(device)
    config = shift_config(dataset, masker, inpainter, seed, shard, names)
    n_src = len(dataset) if limit is None else min(limit, len(dataset))
    sources = shard_indices(n_src, shard).tolist()

    def missing_work(done: set) -> dict[int, list[int]]:
        todo: dict[int, list[int]] = {}
        for i in sources:
            missing = [kk for kk in range(k) if (i, kk) not in done]
            if missing:
                todo[i] = missing
        return todo

    if (Path(out_dir) / "store.json").is_file():  # resuming: nothing to load if nothing is missing
        store = OutlierStore(out_dir, config)
        if not missing_work(store.done_keys()):
            return store
    # load the models before creating the store, so a missing model leaves nothing behind
    masker.load()
    inpainter.load()
    store = OutlierStore(out_dir, config)
    note_resume(f"every committed shard of the outlier store {out_dir}")
    with store.writer():
        todo = missing_work(store.done_keys())
        total = sum(len(v) for v in todo.values())
        if not todo:
            return store
        src_list = list(todo)
        bar = progress_bar(total=total, desc="shift", unit="img", disable=not progress, dynamic_ncols=True)
        buf_imgs: list[np.ndarray] = []
        buf_recs: list[dict] = []
        buf_skip: list[dict] = []
        last_flush = time.monotonic()
        n_skipped = 0
        covs: list[float] = []

        def flush() -> None:
            nonlocal buf_imgs, buf_recs, buf_skip, last_flush
            if buf_recs or buf_skip:
                imgs = np.concatenate(buf_imgs) if buf_imgs else np.zeros((0, *dataset.image_shape), np.uint8)
                store.add_shard(imgs, buf_recs, buf_skip)
            buf_imgs, buf_recs, buf_skip = [], [], []
            last_flush = time.monotonic()

        try:
            for b0 in range(0, len(src_list), batch_size):
                idx = src_list[b0:b0 + batch_size]
                x = dataset.images[torch.as_tensor(idx)].float().div_(255.0)
                y = dataset.labels[torch.as_tensor(idx)]
                masks = masker(x, y, names)
                cov = mask_coverage(masks)
                rep, rep_masks, seeds, ks, meta = [], [], [], [], []
                for j, i in enumerate(idx):
                    c = float(cov[j])
                    covs.append(c)
                    if c <= 0.0 or c < masker.min_coverage:
                        for kk in todo[i]:
                            buf_skip.append({"source_index": i, "k": kk, "reason": "mask coverage below minimum",
                                             "coverage": c})
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
                    rep_masks = masks[sel]
                    out = inpainter(x[sel], rep_masks, seeds, ks, names)
                    buf_imgs.append(out)
                    for (i, kk, c), s in zip(meta, seeds):
                        lab = int(dataset.labels[i])
                        buf_recs.append({"source_index": i, "k": kk, "seed": s, "label": lab,
                                         "class": names[lab] if names and 0 <= lab < len(names) else None,
                                         "coverage": c})
                    bar.update(len(rep))
                bar.set_postfix(cov=f"{np.mean(covs):.2f}", skipped=n_skipped, refresh=False)
                if len(buf_recs) + len(buf_skip) >= shard_size or time.monotonic() - last_flush > flush_seconds:
                    flush()
            flush()
        finally:
            bar.close()
    return store


__all__ = ["forge_shift", "shift_config", "make_masker", "make_inpainter"]
