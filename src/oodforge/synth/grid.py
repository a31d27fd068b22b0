"""A PNG grid of ID images next to the outliers forged from them (to eyeball a synthesis run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.base import ArrayDataset


def _as_uint8(x) -> np.ndarray:
    if isinstance(x, ArrayDataset):
        return x.images.numpy()
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return a


def _rows(id_images, outlier_images, n: int) -> list[list[np.ndarray]]:
    """Pair each shown ID image with its outliers: by ``source_index`` when the outliers carry it (a loaded
    store), by position otherwise (``outliers[i]`` or ``outliers[i, k]`` belongs to ``id_images[i]``)."""
    ids = _as_uint8(id_images)
    src = getattr(outlier_images, "source_index", None)
    outs = _as_uint8(outlier_images)
    rows = []
    if src is not None:
        src = np.asarray(src)
        kk = np.asarray(getattr(outlier_images, "k", np.zeros(len(src), dtype=np.int64)))
        for s in list(dict.fromkeys(src.tolist()))[:n]:
            sel = np.flatnonzero(src == s)
            sel = sel[np.argsort(kk[sel], kind="stable")]
            rows.append([ids[s]] + [outs[j] for j in sel])
        return rows
    if outs.ndim == 4:
        outs = outs[:, None]
    if outs.ndim != 5:
        raise ValueError(f"outlier_images must be [N, C, H, W], [N, K, C, H, W] or a loaded store, got {outs.shape}")
    if outs.shape[0] > ids.shape[0]:
        raise ValueError(f"{outs.shape[0]} outlier rows but only {ids.shape[0]} ID images to pair them with")
    for i in range(min(n, outs.shape[0])):
        rows.append([ids[i]] + list(outs[i]))
    return rows


def save_outlier_grid(id_images, outlier_images, path: str | Path, n: int = 8, scale: int | None = None,
                      pad: int = 2) -> Path:
    """Write a PNG: one row per ID image (left column) followed by its forged outliers.

    ``id_images``: an :class:`ArrayDataset` or uint8/float ``[N, C, H, W]``; ``outlier_images``: a loaded
    outlier store (``OutlierStore.load()``, paired by ``source_index``), or arrays ``[N, C, H, W]`` /
    ``[N, K, C, H, W]`` aligned with ``id_images``. At most ``n`` rows; tiny images are enlarged by an
    integer ``scale`` (default: to about 64 px). Grey images stay grey. Returns the path.
    """
    from PIL import Image

    rows = _rows(id_images, outlier_images, n)
    if not rows:
        raise ValueError("no outliers to show: the outlier set is empty")
    c, h, w = rows[0][0].shape
    scale = scale or max(1, int(np.ceil(64 / max(h, w))))
    cols = max(len(r) for r in rows)
    gap = 3 * pad  # a wider gap separates the ID column from its outliers
    H = len(rows) * (h * scale + pad) + pad
    W = cols * (w * scale + pad) + pad + gap
    canvas = np.full((H, W, c), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = np.repeat(np.repeat(img.transpose(1, 2, 0), scale, 0), scale, 1)
            y0 = pad + r * (h * scale + pad)
            x0 = pad + j * (w * scale + pad) + (gap if j > 0 else 0)
            canvas[y0:y0 + h * scale, x0:x0 + w * scale] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)
    return path


__all__ = ["save_outlier_grid"]
