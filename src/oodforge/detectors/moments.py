"""Means and second moments of feature matrices, computed in float64 over row chunks.

Fitting a detector must not need several float64 copies of the ID training features: for 1.28 M
ImageNet features of 2,048 floats one copy is 21 GB. These helpers read ``features`` (often memory-mapped
from the feature cache, :mod:`oodforge.models.features`) ``CHUNK`` rows at a time, so the extra memory
is one chunk whatever ``N`` is (``benchmarks/bench_streaming_memory.py`` measures it). The sums are
exact up to float64 rounding in another order than a one-shot ``x.T @ x``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CHUNK", "row_chunks", "class_means", "second_moment", "chunked_map", "chunked_mean"]

CHUNK = 65536


def row_chunks(x: torch.Tensor, chunk: int = CHUNK):
    """``(start, x[start:start + chunk] as float64 numpy)`` over the rows of ``x``."""
    for s in range(0, x.shape[0], chunk):
        yield s, x[s:s + chunk].double().cpu().numpy()


def class_means(x: torch.Tensor, labels: np.ndarray, classes: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Mean feature of each class in ``classes`` (sorted), ``[C, D]`` float64; ``labels`` index the rows."""
    sums = np.zeros((len(classes), x.shape[1]))
    counts = np.zeros(len(classes))
    for s, xc in row_chunks(x, chunk):
        rows = np.searchsorted(classes, labels[s:s + len(xc)])
        np.add.at(sums, rows, xc)
        counts += np.bincount(rows, minlength=len(classes))
    return sums / counts[:, None]


def second_moment(x: torch.Tensor, centres: np.ndarray, labels: np.ndarray | None = None,
                  classes: np.ndarray | None = None, chunk: int = CHUNK) -> np.ndarray:
    """``1/N sum_i (x_i - m_i)(x_i - m_i)^T``, ``[D, D]`` float64, with ``m_i`` the centre of row ``i``'s class
    (``centres[c]`` for ``labels[i] == classes[c]``) or, without ``labels``, ``m_i = centres`` for every row."""
    acc = np.zeros((x.shape[1], x.shape[1]))
    for s, xc in row_chunks(x, chunk):
        xc -= centres[np.searchsorted(classes, labels[s:s + len(xc)])] if labels is not None else centres
        acc += xc.T @ xc
    return acc / x.shape[0]


def chunked_map(fn, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``torch.cat([fn(x[s:s + chunk]) ...])``: a row-wise function over ``x`` without a full-size temporary."""
    return torch.cat([fn(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])


def chunked_mean(fn, x: torch.Tensor, chunk: int = CHUNK) -> float:
    """The mean over rows of a row-wise function ``fn`` (one value per row), one chunk in memory at a time."""
    return sum(float(fn(x[s:s + chunk]).double().sum()) for s in range(0, x.shape[0], chunk)) / x.shape[0]
