"""Detectors that measure how much of the penultimate vector lies in a subspace: NECO, NuSA and kernel PCA.

Each fits a linear subspace on ID data only (the principal components of the training features, or
the row space of the classifier head) and scores the share of ``h`` that lies in it, or the error of
reconstructing ``h`` from it. One vectorised pass over the cached penultimate vectors (and, for NECO,
the logits); no image access.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.featureset import FeatureSet
from .activation_shaping import _check_head
from .base import Detector, FitContext, register
from .moments import chunked_map, principal_axes

__all__ = ["NECO", "NuSA", "KernelPCA", "principal_axes"]


def _unit(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)


@register
class NECO(Detector):
    """NECO: ``||P_d z|| / ||z||`` times the max logit, with ``z`` the standardised penultimate vector.

    Neural collapse puts the ID features near the span of the class means, so the share of the (per-unit
    standardised) feature that lies in the top-``d`` principal subspace of the ID training features is
    high for ID and lower for OOD (the paper's NECO score ``||P h|| / ||h||``). As in the paper
    (Sec. 4, for ResNets and ViTs) and the authors' code, the ratio is multiplied by the max logit
    (``maxlogit=False`` gives the bare ratio). ``principal_dim=None`` uses the number of classes ``C``
    (the dimension neural collapse predicts for the class means, ``C - 1``, plus one; the paper tunes
    ``d`` per model): oodforge's default.
    """

    name = "neco"
    paper = ("Ammar, Belkhir, Popescu, Manzanera, Franchi, NECO: NEural Collapse Based Out-of-distribution "
             "detection, ICLR 2024")
    param_ranges = {"principal_dim": "[1, inf)"}

    def __init__(self, principal_dim: int | None = None, maxlogit: bool = True):
        self.principal_dim = principal_dim
        self.maxlogit = maxlogit

    def _fit(self, ctx: FitContext) -> None:
        h = ctx.train.penultimate.double()
        dim = h.shape[1]
        d = ctx.train.logits.shape[1] if self.principal_dim is None else int(self.principal_dim)
        if not 0 < d < dim:
            raise ValueError(f"neco: principal_dim must be in [1, {dim - 1}] for {dim}-d features, got {d}")
        self.mean_ = h.mean(dim=0)
        self.std_ = h.std(dim=0, unbiased=False).clamp_min(1e-12)  # sklearn StandardScaler
        z = (h - self.mean_) / self.std_
        _, vecs = principal_axes(z, np.zeros(dim))  # standardised features have mean 0: PCA's centring is a no-op
        self.principal_dim_ = d
        self.axes_ = torch.from_numpy(vecs[:, :d])

    def ratio(self, h: torch.Tensor) -> torch.Tensor:
        """``||P_d z|| / ||z||`` per row (float64)."""
        z = (h.double() - self.mean_) / self.std_
        return (z @ self.axes_).norm(dim=1) / z.norm(dim=1).clamp_min(1e-12)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        r = chunked_map(self.ratio, feats.penultimate)
        return r * feats.logits.double().max(dim=1).values if self.maxlogit else r


@register
class NuSA(Detector):
    """NuSA: ``sqrt(||h||^2 - ||N h||^2) / ||h||``, the share of ``h`` outside the head's null space.

    The last layer ``W`` (``C x D``, ``C < D``) ignores every component of ``h`` in its null space ``N``;
    an OOD input puts more of its activation there, where it cannot be told apart by the classifier
    (the paper's null space analysis score). Equivalently ``||P_row(W) h|| / ||h||`` with the orthogonal
    projection on the row space of ``W``. No hyperparameters; needs ``D > rank(W)``.
    """

    name = "nusa"
    paper = ("Cook et al., Outlier Detection through Null Space Analysis of Neural Networks, "
             "ICML 2020 Workshop on Uncertainty and Robustness in Deep Learning")

    def _fit(self, ctx: FitContext) -> None:
        w, _ = _check_head(ctx, ctx.train.penultimate.shape[1], self.name)
        _, s, vt = np.linalg.svd(w.numpy(), full_matrices=False)
        rank = int((s > s.max() * max(w.shape) * np.finfo(np.float64).eps).sum())
        if rank >= w.shape[1]:
            raise ValueError(f"nusa: the head has full column rank ({rank} = feature dim): its null space is empty")
        self.row_space_ = torch.from_numpy(np.ascontiguousarray(vt[:rank].T))

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        def share(h):
            h = h.double()
            return (h @ self.row_space_).norm(dim=1) / h.norm(dim=1).clamp_min(1e-12)

        return chunked_map(share, feats.penultimate)


@register
class KernelPCA(Detector):
    """Kernel PCA reconstruction error ``-||(I - U_q U_q^T)(phi(h) - m)||`` (higher = ID).

    The paper's CoP: the cosine kernel's explicit feature map ``phi(h) = h / ||h||``, PCA of the ID
    training features mapped by ``phi`` (mean ``m``, top-``q`` axes ``U_q``), and the error of
    reconstructing a test feature from them (the paper's reconstruction-error score). ``kernel="corp"``
    is their CoRP: ``phi`` is followed by ``M = 2 D`` random Fourier features of a Gaussian kernel with
    bandwidth ``gamma`` (``sqrt(2/M) cos(Omega^T phi + u)``, seeded by ``FitContext.seed``).
    ``principal_dim=None`` takes ``D // 2`` of the mapped dimension (the ViM rule for small backbones; the
    paper tunes ``q`` per model): oodforge's default.
    """

    name = "kpca"
    paper = "Fang et al., Kernel PCA for Out-of-Distribution Detection, NeurIPS 2024"
    param_ranges = {"principal_dim": "[1, inf)", "gamma": "(0, inf)"}
    param_choices = {"kernel": ("cop", "corp")}

    def __init__(self, kernel: str = "cop", principal_dim: int | None = None, gamma: float = 1.0):
        self.kernel = kernel
        self.principal_dim = principal_dim
        self.gamma = gamma

    def mapped(self, h: torch.Tensor) -> torch.Tensor:
        """``phi(h)`` (float64)."""
        z = _unit(h)
        if self.kernel == "cop":
            return z
        return np.sqrt(2.0 / self.omega_.shape[1]) * torch.cos(z @ self.omega_ + self.phase_)

    def _fit(self, ctx: FitContext) -> None:
        h = ctx.train.penultimate
        dim = h.shape[1]
        if self.kernel == "corp":
            g = torch.Generator().manual_seed(int(ctx.seed))
            m = 2 * dim
            self.omega_ = torch.randn(dim, m, generator=g, dtype=torch.float64) * np.sqrt(2.0 * self.gamma)
            self.phase_ = torch.rand(m, generator=g, dtype=torch.float64) * 2 * np.pi
        mapped_dim = dim if self.kernel == "cop" else 2 * dim
        q = mapped_dim // 2 if self.principal_dim is None else int(self.principal_dim)
        if not 0 < q < mapped_dim:
            raise ValueError(f"kpca: principal_dim must be in [1, {mapped_dim - 1}] for the {mapped_dim}-d mapped "
                             f"features, got {q}")
        phi = chunked_map(self.mapped, h)
        self.centre_ = phi.mean(dim=0)
        _, vecs = principal_axes(phi, self.centre_.numpy())
        self.principal_dim_ = q
        self.residual_axes_ = torch.from_numpy(np.ascontiguousarray(vecs[:, q:]))

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return chunked_map(lambda h: -((self.mapped(h) - self.centre_) @ self.residual_axes_).norm(dim=1),
                           feats.penultimate)
