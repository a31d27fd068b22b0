"""RankFeat: remove the rank-1 part of each image's feature map, then the energy score.

Reads the cached last conv feature map (``needs_feature_map = True``) and the classifier head;
the per-image SVDs run in blocks of images on ``FitContext.device``.
"""

from __future__ import annotations

import torch

from ..models.featureset import FeatureSet
from .base import FitContext, register
from .shaping import _FeatureMapEnergy

__all__ = ["RankFeat", "remove_rank1"]


def remove_rank1(fmap: torch.Tensor) -> torch.Tensor:
    """``X - s_1 u_1 v_1^T`` for each image's map reshaped to ``X`` ``[C, H*W]``; same shape as ``fmap``.

    Exact SVD (``torch.linalg.svd``); the product ``s_1 u_1 v_1^T`` does not depend on the sign
    ambiguity of the singular vectors.
    """
    n, c, h, w = fmap.shape
    x = fmap.reshape(n, c, h * w)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (x - s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])).reshape(n, c, h, w)


@register
class RankFeat(_FeatureMapEnergy):
    """RankFeat score ``T * logsumexp((W pool(X - s_1 u_1 v_1^T) + b) / T)``, ``T = 1``.

    Each image's last feature map is reshaped to ``X`` ``[C, HW]``; its dominant singular
    component (largest singular value ``s_1``) is subtracted, the rest is pooled and fed to the
    head, and the energy of those logits is the score (the paper's RankFeat, on the last block). The paper observes that the
    top singular value of OOD feature maps is abnormally large, so removing that component lowers
    OOD confidence much more than ID confidence.

    Only the last feature map exists in a :class:`FeatureSet`, so this is the paper's "Block 4"
    RankFeat; its optional Block 3 + Block 4 logit fusion needs an intermediate layer and a
    second partial pass through the network and is not implemented. A feature map with a single
    spatial position (``H*W = 1``) is exactly rank 1 and would lose everything: that is an error.
    """

    name = "rankfeat"
    paper = ("Song, Sebe, Wang, RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection, "
             "NeurIPS 2022")
    param_ranges = {"temperature": "(0, inf)"}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _fit(self, ctx: FitContext) -> None:
        self._fit_head(ctx)
        self.device_ = ctx.device
        if ctx.train.feature_map is not None:
            self._check_spatial(ctx.train.feature_map)

    def _check_spatial(self, fmap: torch.Tensor) -> None:
        if fmap.ndim == 4 and fmap.shape[2] * fmap.shape[3] < 2:
            raise ValueError(f"rankfeat: the feature map has a single spatial position ({tuple(fmap.shape[1:])}); "
                             "its [C, H*W] matrix is rank 1 and removing the rank-1 part leaves nothing. "
                             "RankFeat needs a spatial feature map (H*W >= 2)")

    def pooled(self, fmap: torch.Tensor) -> torch.Tensor:
        return remove_rank1(fmap.to(self.device_)).mean(dim=(2, 3)).cpu()

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        if feats.feature_map is not None:
            self._check_spatial(feats.feature_map)
        return super()._score(feats)

