"""Detectors that reshape the last layer's computation, then score with the energy: ReAct and DICE.

Both read the penultimate vector ``h`` from the cached features and the classifier head
``W, b`` (``FitContext.head_weight`` / ``head_bias``) and recompute the logits themselves, so
no forward pass over the images is needed.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.featureset import FeatureSet
from .base import Detector, FitContext, register
from .logit_based import energy_score

__all__ = ["ReAct", "DICE"]


def _check_head(ctx: FitContext, feats_dim: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = ctx.head_weight.double(), ctx.head_bias.double()
    if w.ndim != 2 or w.shape[1] != feats_dim:
        raise ValueError(f"{who}: the classifier head takes {w.shape[-1]} inputs but the penultimate features have "
                         f"{feats_dim} dims; the FeatureSet must come from the same model as FitContext.model")
    return w, b


@register
class ReAct(Detector):
    """ReAct: rectify the penultimate activations at an upper bound ``c``, then the energy score.

    ``h_bar = min(h, c)`` (Sun, Guo & Li 2021, Sec. 3), ``f(x) = W h_bar + b`` and the score is
    ``logsumexp(f(x))`` (energy with ``T = 1``). ``c`` is the ``percentile``-th
    percentile (paper default: 90) of all penultimate activation values of the ID training set.
    OOD inputs tend to trigger a few abnormally large activations; clipping them removes most
    of their (over-confident) contribution while barely changing ID outputs.
    """

    name = "react"
    paper = "Sun, Guo, Li, ReAct: Out-of-distribution Detection With Rectified Activations, NeurIPS 2021"
    param_ranges = {"percentile": "(0, 100]", "temperature": "(0, inf)"}

    def __init__(self, percentile: float = 90.0, temperature: float = 1.0):
        self.percentile = percentile
        self.temperature = temperature

    def _fit(self, ctx: FitContext) -> None:
        h = ctx.train.penultimate
        self.weight_, self.bias_ = _check_head(ctx, h.shape[1], self.name)
        self.threshold_ = float(np.percentile(h.float().numpy().ravel(), self.percentile))

    def rectified_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``W min(h, c) + b`` (float64)."""
        return h.double().clamp(max=self.threshold_) @ self.weight_.T + self.bias_

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return energy_score(self.rectified_logits(feats.penultimate), float(self.temperature))


@register
class DICE(Detector):
    """DICE: keep only the strongest weight contributions of the last layer, then the energy score.

    Contribution matrix ``V = W * E[h]`` elementwise, with ``E[h]`` the mean penultimate
    activation over the ID training set (Sun & Li 2022, Sec. 3.1); the mask keeps the entries of
    ``V`` above its ``sparsity``-quantile (signed values, as in the authors' code), i.e. the top
    ``1 - sparsity`` fraction (paper: ``p = 0.9`` on CIFAR, 0.7 on ImageNet). Logits
    ``f(x) = (M * W) h + b`` (Sec. 3.1) are scored with the energy ``logsumexp(f(x))``.
    """

    name = "dice"
    paper = "Sun, Li, DICE: Leveraging Sparsification for Out-of-Distribution Detection, ECCV 2022"
    param_ranges = {"sparsity": "[0, 1)", "temperature": "(0, inf)"}

    def __init__(self, sparsity: float = 0.9, temperature: float = 1.0):
        self.sparsity = sparsity
        self.temperature = temperature

    def _fit(self, ctx: FitContext) -> None:
        h = ctx.train.penultimate
        w, self.bias_ = _check_head(ctx, h.shape[1], self.name)
        self.mean_activation_ = h.double().mean(dim=0)
        contrib = (w * self.mean_activation_[None, :]).numpy()
        thresh = np.percentile(contrib, 100.0 * self.sparsity)
        self.mask_ = torch.from_numpy(contrib > thresh)
        self.weight_ = w * self.mask_

    def sparse_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``(M * W) h + b`` (float64)."""
        return h.double() @ self.weight_.T + self.bias_

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return energy_score(self.sparse_logits(feats.penultimate), float(self.temperature))
