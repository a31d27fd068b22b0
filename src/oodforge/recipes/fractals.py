"""Procedural fractal pictures for PixMix and MixOE: random iterated function systems, seeded and cached.

PixMix (Hendrycks et al., CVPR 2022, Sec. 3) mixes training images with "pictures" (fractals and
feature visualisations) that carry structure but no class; its reference set is a download. oodforge
draws the fractals itself, the way FractalDB does (Kataoka et al., "Pre-training without Natural
Images", ACCV 2020, Sec. 3.1):

* an IFS of ``N ~ U{2..8}`` affine maps ``w_j(p) = A_j p + t_j`` with all six parameters of each map
  drawn uniformly from ``[-1, 1]``, map ``j`` chosen with probability ``|det A_j| / sum_k |det A_k|``;
* the attractor rendered by the chaos game (``n_points`` iterations after a burn-in of 20), rescaled
  to the image by its bounding box;
* a system is kept when its *filling rate* (fraction of pixels hit) is at least ``min_fill`` = 0.2,
  FractalDB's threshold; systems whose points diverge are rejected as well.

Ours: each map gets a random colour (grey level for one-channel suites) and a pixel shows the mean
colour of the points that landed on it, on black, so the pictures have the colourful, high-contrast
look of PixMix's fractal set at the suite's own size (no resizing).

:func:`fractal_pictures` caches the uint8 set as ``fractals-<n>-<C>x<H>x<W>-seed<s>-v1.npy`` in the
given folder (atomic write); the same arguments always give the same pictures.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.base import ArrayDataset

MIN_FILL = 0.2
VERSION = 1


def _render_systems(rng: np.random.Generator, k: int, shape: tuple[int, int, int], n_points: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``k`` random IFS rendered by the chaos game -> images ``[k, C, H, W]`` float in [0, 1], fill rates."""
    c, h, w = shape
    n_maps = rng.integers(2, 9, size=k)
    params = rng.uniform(-1.0, 1.0, size=(k, 8, 6))
    active = np.arange(8)[None, :] < n_maps[:, None]
    det = np.abs(params[..., 0] * params[..., 3] - params[..., 1] * params[..., 2]) * active
    det[det.sum(1) == 0, 0] = 1.0
    cum = np.cumsum(det / det.sum(1, keepdims=True), axis=1)
    colours = rng.uniform(0.25, 1.0, size=(k, 8, c))
    p = np.zeros((k, 2))
    burn = 20
    pts = np.empty((n_points, k, 2), dtype=np.float32)
    which = np.empty((n_points, k), dtype=np.int8)
    rows = np.arange(k)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(burn + n_points):
            j = np.minimum((rng.random(k)[:, None] > cum).sum(1), 7)
            a = params[rows, j]
            p = np.stack([a[:, 0] * p[:, 0] + a[:, 1] * p[:, 1] + a[:, 4],
                          a[:, 2] * p[:, 0] + a[:, 3] * p[:, 1] + a[:, 5]], axis=1)
            p = np.clip(np.nan_to_num(p, nan=1e6), -1e6, 1e6)
            if t >= burn:
                pts[t - burn], which[t - burn] = p, j
    images = np.zeros((k, c, h, w))
    fill = np.zeros(k)
    for i in range(k):
        q = pts[:, i].astype(np.float64)
        lo, hi = q.min(0), q.max(0)
        span = hi - lo
        if not np.all(np.isfinite(span)) or np.any(span <= 1e-9) or np.abs(q).max() >= 1e5:
            continue  # diverged or collapsed to a line / point
        col = np.clip(((q[:, 0] - lo[0]) / span[0] * (w - 1)).round().astype(int), 0, w - 1)
        row = np.clip(((hi[1] - q[:, 1]) / span[1] * (h - 1)).round().astype(int), 0, h - 1)
        flat = row * w + col
        count = np.bincount(flat, minlength=h * w)
        hit = count > 0
        fill[i] = hit.mean()
        for ch in range(c):
            s = np.bincount(flat, weights=colours[i, which[:, i], ch], minlength=h * w)
            images[i, ch] = np.where(hit, s / np.maximum(count, 1), 0.0).reshape(h, w)
    return images, fill


def generate_fractals(n: int, image_shape: tuple[int, int, int], seed: int = 0, min_fill: float = MIN_FILL,
                      n_points: int | None = None) -> np.ndarray:
    """``n`` fractal pictures ``[n, C, H, W]`` uint8 (see the module docstring); deterministic in ``seed``."""
    if n < 1:
        raise ValueError(f"the number of fractal pictures must be >= 1, got {n}")
    c, h, w = image_shape
    if c not in (1, 3) or min(h, w) < 4:
        raise ValueError(f"fractal pictures need 1 or 3 channels and at least 4x4 pixels, got {image_shape}")
    n_points = n_points or 8 * h * w
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    got = 0
    while got < n:
        images, fill = _render_systems(rng, min(512, max(16, 2 * n)), (c, h, w), n_points)
        good = images[fill >= min_fill]
        kept.append(good[: n - got])
        got += len(kept[-1])
    return (np.concatenate(kept) * 255).round().astype(np.uint8)


def fractal_pictures(n: int, image_shape: tuple[int, int, int], seed: int = 0,
                     cache_dir: str | Path | None = None) -> ArrayDataset:
    """The ``n`` seeded fractal pictures of ``image_shape`` as an :class:`ArrayDataset`, cached in ``cache_dir``."""
    c, h, w = image_shape
    name = f"fractals-{n}-{c}x{h}x{w}-seed{seed}-v{VERSION}"
    path = Path(cache_dir) / f"{name}.npy" if cache_dir is not None else None
    images = None
    if path is not None and path.is_file():
        try:
            images = np.load(path)
        except (OSError, ValueError):
            images = None  # a truncated file oodforge wrote: regenerate it
        if images is not None and images.shape != (n, c, h, w):
            images = None
    if images is None:
        images = generate_fractals(n, image_shape, seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, images)
            os.replace(tmp, path)
    return ArrayDataset(images, identity=f"oodforge:{name}")
