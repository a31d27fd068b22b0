"""Means and second moments of feature matrices, computed in float64 over row chunks.

Fitting a detector must not need several float64 copies of the ID training features: for 1.28 M
ImageNet features of 2,048 floats one copy is 21 GB. These helpers read ``features`` (often memory-mapped
from the feature cache, :mod:`oodforge.models.features`) one chunk of rows at a time, a chunk being
about ``CHUNK_BYTES`` of float64 whatever the feature width (8,192 rows of 64-d features, 256 of
2,048-d), and each chunk is released before the next is read; so the extra memory is a few chunks
whatever ``N`` is (``benchmarks/bench_streaming_memory.py`` measures it). The sums are exact up to
float64 rounding in another order than a one-shot ``x.T @ x``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CHUNK_BYTES", "chunk_rows", "row_chunks", "class_means", "second_moment", "chunked_map",
           "chunked_mean", "distinct_values", "principal_axes"]

CHUNK_BYTES = 4 * 2**20


def chunk_rows(x: torch.Tensor | np.ndarray) -> int:
    """Rows per chunk of ``x``: ``CHUNK_BYTES`` of float64 values, at least one row."""
    width = int(np.prod(x.shape[1:])) if len(x.shape) > 1 else 1
    return max(1, CHUNK_BYTES // (8 * width))


def row_chunks(x: torch.Tensor, chunk: int | None = None):
    """``(start, x[start:start + chunk])`` over the rows of ``x``: views, no copy (convert inside the loop and
    drop the converted chunk before the next step, so that only one float64 chunk is alive)."""
    step = chunk or chunk_rows(x)
    for s in range(0, x.shape[0], step):
        yield s, x[s:s + step]


def _f64(block: torch.Tensor) -> np.ndarray:
    """A float64 copy of ``block`` the caller may change in place (``.double()`` of a float64 CPU tensor would be
    the caller's own memory, and centring it would change their features)."""
    return block.to(device="cpu", dtype=torch.float64, copy=True).numpy()


def class_means(x: torch.Tensor, labels: np.ndarray, classes: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Mean feature of each class in ``classes`` (sorted), ``[C, D]`` float64; ``labels`` index the rows."""
    sums = torch.zeros(len(classes), x.shape[1], dtype=torch.float64)
    counts = np.zeros(len(classes))
    for s, block in row_chunks(x, chunk):
        rows = np.searchsorted(classes, labels[s:s + len(block)])
        sums.index_add_(0, torch.from_numpy(rows), block.double())  # np.add.at, 20x faster
        counts += np.bincount(rows, minlength=len(classes))
    return sums.numpy() / counts[:, None]


def second_moment(x: torch.Tensor, centres: np.ndarray, labels: np.ndarray | None = None,
                  classes: np.ndarray | None = None, chunk: int | None = None) -> np.ndarray:
    """``1/N sum_i (x_i - m_i)(x_i - m_i)^T``, ``[D, D]`` float64, with ``m_i`` the centre of row ``i``'s class
    (``centres[c]`` for ``labels[i] == classes[c]``) or, without ``labels``, ``m_i = centres`` for every row."""
    acc = np.zeros((x.shape[1], x.shape[1]))
    for s, block in row_chunks(x, chunk):
        xc = _f64(block)
        xc -= centres[np.searchsorted(classes, labels[s:s + len(xc)])] if labels is not None else centres
        acc += xc.T @ xc
        del xc
    return acc / x.shape[0]


def principal_axes(x: torch.Tensor, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of the second moment of ``x - centre`` (float64)."""
    vals, vecs = np.linalg.eigh(second_moment(x, centre))
    order = np.argsort(-vals, kind="stable")
    return vals[order], np.ascontiguousarray(vecs[:, order])


def chunked_map(fn, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``torch.cat([fn(x[s:s + chunk]) ...])``: a row-wise function over ``x`` without a full-size temporary."""
    return torch.cat([fn(block) for _, block in row_chunks(x, chunk)])


def chunked_mean(fn, x: torch.Tensor, chunk: int | None = None) -> float:
    """The mean over rows of a row-wise function ``fn`` (one value per row), one chunk in memory at a time."""
    return sum(float(fn(block).double().sum()) for _, block in row_chunks(x, chunk)) / x.shape[0]


def distinct_values(labels: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """``np.unique(labels)`` without sorting a full-size copy: the distinct values of each chunk, merged."""
    parts = [np.unique(labels[s:s + chunk]) for s in range(0, len(labels), chunk)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, labels.dtype)
