"""ViM: Virtual-logit Matching (Wang, Li, Feng & Zhang, CVPR 2022).

Combines a feature-space signal (the norm of the feature's residual outside the principal
subspace of ID features) with the logit-space energy, matched in scale on ID training data.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.featureset import FeatureSet
from .base import Detector, FitContext, register
from .moments import chunked_map, chunked_mean, second_moment

__all__ = ["ViM", "Residual", "default_principal_dim"]


def default_principal_dim(feature_dim: int) -> int:
    """The principal-subspace dimension ``D`` of the authors' code: 1000 for ``dim >= 2048``,
    512 for ``dim >= 768``, otherwise ``dim // 2`` (e.g. 256 for a 512-d ResNet-18)."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


@register
class ViM(Detector):
    """Score ``logsumexp(f(x)) - alpha * ||(h - o)^P_perp||`` (higher = ID).

    Sec. 3 of the paper: the origin ``o = -W^+ b`` makes the logits a linear map of ``h - o``;
    ``P`` spans the top-``D`` eigenvectors of the uncentred covariance of ``h - o`` over the ID
    training features and ``(h - o)^P_perp`` is the residual outside that principal subspace.
    The virtual logit is ``v = alpha * ||residual||`` with ``alpha = mean_i max_c f(x_i)_c /
    mean_i ||residual_i||`` over the training set (matching the scales of the two signals). The
    paper's ViM score is the softmax probability of the virtual class,
    ``exp(v) / (exp(v) + sum_c exp(f_c)) = 1 / (1 + exp(energy - v))``; we return
    ``energy - v`` as the authors' code does, a strictly monotone transform of it with the sign
    that makes higher = ID (same AUROC/FPR, no saturation in float64).

    ``principal_dim=None`` picks :func:`default_principal_dim` (the paper's 1000 / 512, and
    ``feature_dim // 2`` for small backbones, as in the authors' code).
    """

    name = "vim"
    paper = "Wang, Li, Feng, Zhang, ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022"
    param_ranges = {"principal_dim": "[1, inf)"}

    def __init__(self, principal_dim: int | None = None):
        self.principal_dim = principal_dim

    def _fit(self, ctx: FitContext) -> None:
        h = ctx.train.penultimate
        dim = h.shape[1]
        d = default_principal_dim(dim) if self.principal_dim is None else int(self.principal_dim)
        if not 0 < d < dim:
            raise ValueError(f"vim: principal_dim must be in [1, {dim - 1}] for {dim}-d features, got {d}")
        w, b = ctx.head_weight.double().numpy(), ctx.head_bias.double().numpy()
        if w.shape[1] != dim:
            raise ValueError(f"vim: the classifier head takes {w.shape[1]} inputs but the features have {dim} dims")
        origin = -np.linalg.pinv(w) @ b
        cov = second_moment(h, origin)  # EmpiricalCovariance(assume_centered=True) of h - origin, in row chunks
        eig_vals, eig_vecs = np.linalg.eigh(cov)
        order = np.argsort(-eig_vals, kind="stable")
        self.principal_dim_ = d
        self.origin_ = torch.from_numpy(origin)
        self.null_space_ = torch.from_numpy(np.ascontiguousarray(eig_vecs[:, order[d:]]))
        max_logit = chunked_mean(lambda z: z.double().max(dim=1).values, ctx.train.logits)
        self.alpha_ = float(max_logit / chunked_mean(self._residual_norm, ctx.train.penultimate))

    def _residual_norm(self, h: torch.Tensor) -> torch.Tensor:
        """``||(h - o)^P_perp||`` of each row of one chunk ``h`` (callers chunk: no full-size float64 temporary)."""
        return ((h.double() - self.origin_) @ self.null_space_).norm(dim=1)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        energy = torch.logsumexp(feats.logits.double(), dim=1)
        return energy - self.alpha_ * chunked_map(self._residual_norm, feats.penultimate)


@register
class Residual(ViM):
    """Residual: ``-||(h - o)^P_perp||``, ViM's feature-space term alone (higher = ID).

    The paper's "Residual" score (Sec. 3.1, the norm of the feature's component outside the principal
    subspace, evaluated on its own in Sec. 4): same origin ``o = -W^+ b``, principal subspace and
    ``principal_dim`` rule as :class:`ViM`, without the energy and the matching constant ``alpha``.
    """

    name = "residual"
    paper = "Wang, Li, Feng, Zhang, ViM: Out-Of-Distribution with Virtual-logit Matching, CVPR 2022 (Residual score)"

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return -chunked_map(self._residual_norm, feats.penultimate)
