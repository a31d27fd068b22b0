"""Deep nearest-neighbour detector (Sun, Ming, Zhu & Li, ICML 2022).

Non-parametric: no Gaussian or class assumption, only the distance from the L2-normalised
penultimate vector to its k-th nearest neighbour among the normalised ID training vectors.
Two interchangeable backends compute the exact same neighbours: faiss ``IndexFlatL2`` (exact
brute force, fast on CPU) when it can be imported, otherwise chunked torch matrix products.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..models.featureset import FeatureSet
from ..progress import progress_bar
from .base import Detector, FitContext, register
from .moments import row_chunks

__all__ = ["KNN", "faiss_available"]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _normalise(h: torch.Tensor) -> torch.Tensor:
    h = h.float()
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-10)


def _flat_index(faiss, h: torch.Tensor):
    """A faiss ``IndexFlatL2`` of the L2-normalised rows of ``h``, filled in place chunk by chunk.

    ``index.add`` appends to a growing vector, which briefly holds two copies of the bank when it
    reallocates (on 600 k x 64 features the peak was twice the index); sizing the index's storage once
    and writing the normalised rows into it keeps one copy. Falls back to ``add`` on a faiss whose flat
    index does not expose its storage this way; the tests check both give the same neighbours."""
    n, d = h.shape
    index = faiss.IndexFlatL2(d)
    codes = getattr(index, "codes", None)
    if codes is None or not all(hasattr(codes, a) for a in ("resize", "data")) or not hasattr(faiss, "rev_swig_ptr"):
        index.add(np.ascontiguousarray(_normalise(h).numpy(), dtype=np.float32))
        return index
    codes.resize(n * d * 4)
    bank = faiss.rev_swig_ptr(codes.data(), n * d * 4).view(np.float32).reshape(n, d)
    for s, block in row_chunks(h):
        bank[s:s + len(block)] = _normalise(block).numpy()
    index.ntotal = n
    return index


def _warn_if_k_exceeds_classes(k: int, labels: torch.Tensor, fraction: float) -> None:
    """Warn when the k-th neighbour must come from another class: with fewer than ``k`` training vectors per
    class an ID image's k-th neighbour is as far as an outlier's, and the score can rank OOD above ID
    (measured: AUROC 0.04 with k = 50 and 36 images per class)."""
    known = labels[labels >= 0]
    if len(known) == 0:
        return
    smallest = int(int(torch.bincount(known).min()) * fraction)
    if k > smallest:
        warnings.warn(f"knn: k={k} exceeds the {smallest} ID training vectors of the smallest class; the score "
                      f"can rank OOD above ID. Use knn:k=<at most {max(1, smallest // 2)}> on data this small",
                      stacklevel=3)


@register
class KNN(Detector):
    """Score ``-||z - z_(k)||_2`` with ``z = h / ||h||`` and ``z_(k)`` its k-th nearest normalised ID-train vector.

    Sec. 3 / Algorithm 1 of the paper; ``k = 50`` is its CIFAR-10 default (1000 with ImageNet and
    1 % of the training set, settable with ``train_fraction``). The authors threshold the
    *squared* faiss distance; the square root returned here ranks identically.

    ``backend``: ``"auto"`` (faiss if importable, else torch), ``"faiss"`` or ``"torch"``; both
    backends compute exact distances in float32 and return the same scores up to rounding.
    ``train_fraction < 1`` keeps a random subset of the training vectors (seeded by ``FitContext.seed``).
    """

    name = "knn"
    paper = "Sun, Ming, Zhu, Li, Out-of-Distribution Detection with Deep Nearest Neighbors, ICML 2022"
    param_ranges = {"k": "[1, inf)", "train_fraction": "(0, 1]", "batch_size": "[1, inf)"}

    def __init__(self, k: int = 50, backend: str = "auto", train_fraction: float = 1.0, batch_size: int = 4096,
                 progress: bool = True):
        self.k = k
        self.backend = backend
        self.train_fraction = train_fraction
        self.batch_size = batch_size
        self.progress = progress

    def _fit(self, ctx: FitContext) -> None:
        if self.backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"knn: backend must be 'auto', 'faiss' or 'torch', got {self.backend!r}")
        if self.backend == "faiss" and not faiss_available():
            raise ImportError("knn: backend='faiss' but faiss is not installed; `pip install faiss-cpu` or use "
                              "backend='torch'")
        h = ctx.train.penultimate
        if self.train_fraction < 1:
            rng = np.random.default_rng(ctx.seed)
            n_keep = max(1, int(round(self.train_fraction * h.shape[0])))
            h = h[torch.from_numpy(np.sort(rng.choice(h.shape[0], n_keep, replace=False)))]
        if not 1 <= int(self.k) <= h.shape[0]:
            raise ValueError(f"knn: k={self.k} but only {h.shape[0]} ID training vectors are used; "
                             "lower k or raise train_fraction")
        _warn_if_k_exceeds_classes(int(self.k), ctx.train.labels, h.shape[0] / len(ctx.train))
        self.backend_ = ("faiss" if faiss_available() else "torch") if self.backend == "auto" else self.backend
        self.device_ = ctx.device
        # the normalised training vectors: in the faiss index, or here (torch backend); train_ is set first so
        # that a saved guard restores it before index_ (whose faiss-less fallback fills train_)
        self.train_ = None
        self.index_ = None
        if self.backend_ == "faiss":
            import faiss

            # normalised and added chunk by chunk: the index holds the only full-size copy (the features
            # themselves are often memory-mapped from the feature cache)
            self.index_ = _flat_index(faiss, h)
        else:
            self.train_ = _normalise(h).contiguous()

    @property
    def bank_size(self) -> int:
        """Number of ID training vectors the neighbours are searched among."""
        return int(self.index_.ntotal) if self.index_ is not None else int(self.train_.shape[0])

    def kth_distance(self, h: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of each normalised row of ``h`` to its k-th nearest ID-train vector."""
        z = _normalise(h)
        k = int(self.k)
        out = []
        step = int(self.batch_size)
        train = None
        if self.backend_ == "torch":  # keep the [step, n_train] distance block under ~64 MB
            step = max(1, min(step, 2**24 // self.train_.shape[0]))
            train = self.train_.to(self.device_)
            train_sq = (train * train).sum(1)[None, :]
        for i in progress_bar(range(0, z.shape[0], step), desc="knn", disable=not self.progress, leave=False):
            q = z[i:i + step]
            if self.backend_ == "faiss":
                d2, _ = self.index_.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
                out.append(torch.from_numpy(d2[:, k - 1].astype(np.float64)))
            else:
                q = q.to(self.device_)
                # ||q - t||^2 = ||q||^2 + ||t||^2 - 2 q.t, the same expansion faiss uses
                d2 = (q * q).sum(1, keepdim=True) + train_sq - 2.0 * q @ train.T
                out.append(torch.topk(d2, k, dim=1, largest=False).values[:, k - 1].double().cpu())
        return torch.cat(out).clamp_min(0.0).sqrt()

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return -self.kth_distance(feats.penultimate)
