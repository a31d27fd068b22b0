"""Activation shaping before the last layer, then the energy score: ASH, SCALE, VRA and OptFS.

ASH and SCALE shape, *per image*, the activations that enter the classifier head. As published
(the ASH authors' ``resnet_imagenet.py`` / ``densenet.py`` call ``apply_ash`` on the output of the
average pool; SCALE's and OpenOOD's ``scale`` reshape the pooled feature to ``[N, D, 1, 1]``), the
shaping acts on the **pooled penultimate vector** ``h`` (``D = C`` values per image): that is the
default, ``where="pooled"``, and it reads only the cached penultimate vectors. ``where="map"`` is
oodforge's variant: the same shaping on the whole last conv feature map ``A`` (``[N, C, H, W]``,
``D = C*H*W`` values) *before* pooling, read from ``FeatureSet.feature_map`` of the same cached
forward pass (``needs_feature_map`` follows ``where``). Both apply the classifier head ``W, b``
themselves and score with the energy ``logsumexp``. VRA rectifies the pooled penultimate vector with
thresholds taken from the ID training activations. None of them needs a second pass over the images.

ASH and SCALE share one per-image quantity: with the shaped values flattened to ``D`` numbers, keep the
``k = D - round(D * p / 100)`` largest ones (the authors' ``topk``); ``s1`` is the sum of all
values and ``s2`` the sum of the kept ones.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.featureset import FeatureSet
from .activation_shaping import _check_head
from .base import Detector, FitContext, register
from .logit_based import energy_score

__all__ = ["ASH", "Scale", "VRA", "OptFS", "require_feature_map", "top_k_prune", "ASH_VARIANTS", "ASH_PERCENTILES", "WHERE"]

ASH_VARIANTS = ("p", "b", "s")
#: the authors' CIFAR settings per variant (paper Table 2 and their ``cifar10_config.yml`` /
#: ``cifar100_config.yml``: ``ash_s@95``); on ImageNet ResNet-50 they use P@60, B@65, S@90
ASH_PERCENTILES = {"p": 90.0, "b": 90.0, "s": 95.0}
#: where the shaping acts: the pooled penultimate vector (the papers) or the whole feature map (oodforge's variant)
WHERE = ("pooled", "map")
_CHUNK = 256  # images per block when working on feature maps (float64 copies of [256, C, H, W])


def require_feature_map(feats: FeatureSet, who: str) -> torch.Tensor:
    """``feats.feature_map`` as a 4-D tensor, or a clear error when it was not extracted."""
    fmap = feats.feature_map
    if fmap is None:
        raise ValueError(f"{who} reads the last conv feature map: the FeatureSet has none (extract it with "
                         "feature_map=True; oodforge.bench does so when detector.needs_feature_map is True)")
    if fmap.ndim != 4 or fmap.shape[0] != len(feats):
        raise ValueError(f"{who}: feature_map must be [N, C, H, W] with N = {len(feats)}, got {tuple(fmap.shape)}")
    return fmap


def top_k_prune(flat: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``flat`` ``[N, D]``: the ``k = D - round(D p / 100)`` largest values and their indices.

    Returns ``(values [N, k], indices [N, k], s1 [N, 1], s2 [N, 1])`` with ``s1`` the row sum and
    ``s2`` the sum of the kept values (float64). ``round`` is numpy's half-to-even, as in the ASH code.
    """
    d = flat.shape[1]
    k = max(1, d - int(np.round(d * percentile / 100.0)))
    vals, idx = torch.topk(flat, k, dim=1)
    return vals, idx, flat.sum(dim=1, keepdim=True), vals.sum(dim=1, keepdim=True)


def _ratio(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``s1 / s2``; an all-zero feature map (``s2 = 0``) gets ratio 0 (it has nothing to scale)."""
    return torch.where(s2 > 0, s1 / torch.where(s2 > 0, s2, torch.ones_like(s2)), torch.zeros_like(s1))


class _FeatureMapEnergy(Detector):
    """Shared plumbing: shape the head's input per block of images, head, energy.

    Subclasses implement :meth:`pooled` on ``[n, C, H, W]`` blocks; a detector whose ``where`` is
    ``"pooled"`` hands it the penultimate vectors as ``[n, C, 1, 1]`` (pooling a 1 x 1 map is the identity),
    so one shaping code serves both placements.
    """

    needs_train_feature_map = False  # nothing is fitted on the training maps: only scored sets need them
    where = "map"

    @property
    def needs_feature_map(self) -> bool:  # type: ignore[override]
        """Only the feature-map placement reads ``FeatureSet.feature_map``."""
        return self.where == "map"

    def _fit_head(self, ctx: FitContext) -> None:
        dim = ctx.train.penultimate.shape[1]
        self.weight_, self.bias_ = _check_head(ctx, dim, self.name)
        if self.where == "map" and ctx.train.feature_map is not None and ctx.train.feature_map.shape[1] != dim:
            raise ValueError(f"{self.name}: the feature map has {ctx.train.feature_map.shape[1]} channels but the "
                             f"head takes {dim} inputs")

    def pooled(self, fmap: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The shaped, pooled penultimate vectors ``[n, C]`` (float64) of a block of feature maps."""
        raise NotImplementedError

    def shaped_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """``W pool(shape(A)) + b`` for every image of ``fmap`` (float64, in blocks of images)."""
        out = [self.pooled(fmap[i:i + _CHUNK].double()) @ self.weight_.T + self.bias_
               for i in range(0, fmap.shape[0], _CHUNK)]
        return torch.cat(out) if out else torch.zeros(0, self.weight_.shape[0], dtype=torch.float64)

    def head_input(self, feats: FeatureSet) -> torch.Tensor:
        """What is shaped: the feature map (``where="map"``) or the penultimate vectors as ``[N, C, 1, 1]``."""
        if self.where == "pooled":
            return feats.penultimate[:, :, None, None]
        fmap = require_feature_map(feats, self.name)
        if fmap.shape[1] != self.weight_.shape[1]:
            raise ValueError(f"{self.name}: the feature map has {fmap.shape[1]} channels but the head takes "
                             f"{self.weight_.shape[1]} inputs")
        return fmap

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return energy_score(self.shaped_logits(self.head_input(feats)), float(self.temperature))


@register
class ASH(_FeatureMapEnergy):
    """ASH: prune each image's activations at a percentile of their own, reshape, head, energy.

    On the ``D`` activations of one image (the pooled penultimate vector by default, as in the
    authors' code; the flattened ``C*H*W`` feature map with ``where="map"``), the ``k`` largest are
    kept and the rest set to 0 (the paper's three variants, Sec. 3):

    * ``variant="p"`` (ASH-P): only prune;
    * ``variant="b"`` (ASH-B): the kept positions all get ``s1 / k`` (binarise, preserving the sum);
    * ``variant="s"`` (ASH-S, default): the kept values are multiplied by ``exp(s1 / s2)``.

    The shaped activations (pooled, for ``where="map"``) are fed to the head and scored with
    ``T * logsumexp(f / T)`` (energy, ``T = 1``). ``percentile=None`` takes the authors' CIFAR
    setting of the variant (``ASH_PERCENTILES``: P@90, B@90, S@95); their ImageNet ResNet-50 values
    are P@60, B@65, S@90. The scaling assumes non-negative (post-ReLU) activations, as in the paper.
    """

    name = "ash"
    paper = ("Djurisic, Bozanic, Ashok, Liu, Extremely Simple Activation Shaping for Out-of-Distribution "
             "Detection, ICLR 2023")
    param_ranges = {"percentile": "[0, 100)", "temperature": "(0, inf)"}
    param_choices = {"variant": ASH_VARIANTS, "where": WHERE}

    def __init__(self, percentile: float | None = None, variant: str = "s", temperature: float = 1.0,
                 where: str = "pooled"):
        self.percentile = percentile
        self.variant = variant
        self.temperature = temperature
        self.where = where

    def _fit(self, ctx: FitContext) -> None:
        self.percentile_ = ASH_PERCENTILES[self.variant] if self.percentile is None else float(self.percentile)
        self._fit_head(ctx)

    def shape(self, fmap: torch.Tensor) -> torch.Tensor:
        """The ASH-shaped activations (same shape as ``fmap`` ``[n, C, H, W]``, float64)."""
        n = fmap.shape[0]
        flat = fmap.double().reshape(n, -1)
        vals, idx, s1, s2 = top_k_prune(flat, self.percentile_)
        if self.variant == "b":
            vals = (s1 / vals.shape[1]).expand_as(vals)
        elif self.variant == "s":
            vals = vals * torch.exp(_ratio(s1, s2))
        return torch.zeros_like(flat).scatter_(1, idx, vals).reshape(fmap.shape)

    def pooled(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.shape(fmap).mean(dim=(2, 3))


@register
class Scale(_FeatureMapEnergy):
    """SCALE: multiply each image's penultimate vector by ``exp(s1 / s2)`` without pruning, then energy.

    ``s1`` sums the image's activations and ``s2`` only those above its own ``percentile`` (the
    paper's scaling factor ``exp(r)``, ``r = s1 / s2``, the one ASH-S uses); unlike ASH-S nothing
    is set to zero, so the class evidence is untouched and only the confidence is rescaled: the score
    is ``logsumexp(exp(r) W h + b)``. As published, ``r`` is computed on the pooled penultimate vector
    ``h``; ``where="map"`` (oodforge's variant) computes it on the whole ``C*H*W`` feature map (pooling
    is linear, so only ``r`` changes). ``percentile = 85`` is the paper's (ImageNet) default, used for
    CIFAR-size models too (as OpenOOD does).
    """

    name = "scale"
    paper = ("Xu, Lian, Yang, Scaling for Training Time and Post-hoc Out-of-distribution Detection "
             "Enhancement, ICLR 2024")
    param_ranges = {"percentile": "[0, 100)", "temperature": "(0, inf)"}
    param_choices = {"where": WHERE}

    def __init__(self, percentile: float = 85.0, temperature: float = 1.0, where: str = "pooled"):
        self.percentile = percentile
        self.temperature = temperature
        self.where = where

    def _fit(self, ctx: FitContext) -> None:
        self._fit_head(ctx)

    def scale_factor(self, fmap: torch.Tensor) -> torch.Tensor:
        """``exp(s1 / s2)`` per image ``[n, 1]`` (float64)."""
        _, _, s1, s2 = top_k_prune(fmap.double().reshape(fmap.shape[0], -1), float(self.percentile))
        return torch.exp(_ratio(s1, s2))

    def pooled(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.double().mean(dim=(2, 3)) * self.scale_factor(fmap)


@register
class VRA(Detector):
    """VRA: piecewise rectification of the penultimate activations, then the energy score.

    Per unit ``j`` of the penultimate vector, with ``alpha_j`` / ``beta_j`` the ``alpha`` / ``beta``
    quantiles of that unit over the ID training set,

        g(z) = 0          if z < alpha_j      (suppress abnormally low activations)
               z + gamma  if alpha_j <= z <= beta_j   (keep / amplify the intermediate ones)
               beta_j     if z > beta_j       (truncate abnormally high ones, like ReAct)

    (the piecewise "VRA" operator of the paper's method section, derived from its variational
    optimum), then ``logsumexp(W g(h) + b)``. Defaults are the authors' CIFAR-10 command
    (``q1 = 0.6, q2 = 0.9``, ``gamma = 0``; CIFAR-100 uses ``beta = 0.95``, "VRA+" ``gamma = 0.6``);
    on ImageNet they use fixed thresholds. Quantiles are per unit, as ``torch.quantile(feat, q,
    dim=0)`` in their code (OpenOOD's port clips at two global percentiles instead).
    """

    name = "vra"
    paper = "Xu, Lian, Liu, Tao, VRA: Variational Rectified Activation for Out-of-distribution Detection, NeurIPS 2023"
    param_ranges = {"alpha": "[0, 1)", "beta": "(0, 1]", "gamma": "(-inf, inf)", "temperature": "(0, inf)"}

    def __init__(self, alpha: float = 0.6, beta: float = 0.9, gamma: float = 0.0, temperature: float = 1.0):
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def _fit(self, ctx: FitContext) -> None:
        if not self.alpha < self.beta:
            raise ValueError(f"vra: beta (upper quantile) must be above alpha ({self.alpha}), got {self.beta}")
        h = ctx.train.penultimate
        self.weight_, self.bias_ = _check_head(ctx, h.shape[1], self.name)
        q = np.quantile(h.double().numpy(), [self.alpha, self.beta], axis=0)
        self.low_, self.high_ = torch.from_numpy(q[0]), torch.from_numpy(q[1])

    def rectify(self, h: torch.Tensor) -> torch.Tensor:
        """``g(h)`` unit by unit (float64)."""
        h = h.double()
        out = torch.where(h > self.high_, self.high_.expand_as(h), h + float(self.gamma))
        return torch.where(h < self.low_, torch.zeros_like(h), out)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        logits = self.rectify(feats.penultimate) @ self.weight_.T + self.bias_
        return energy_score(logits, float(self.temperature))


@register
class OptFS(Detector):
    """OptFS: piecewise-constant feature shaping fitted on ID data, then the energy score.

    The paper's optimal shaping function (its closed-form optimum under the paper's objective) is a step function ``theta`` of
    the activation value: the range between the ``1e-3`` and ``1 - 1e-3`` quantiles of all ID training
    activations is cut into ``bins = 100`` intervals of equal width, and ``theta_k`` is the mean over
    ID training images of ``sum_j 1[h_j in bin k] w_{yhat, j} h_j`` (the contribution of bin ``k``'s
    activations to the predicted class's logit), normalised to ``||theta|| = 1000`` as in the authors'
    code. A test feature is shaped unit by unit, ``h'_j = theta_{bin(h_j)} h_j`` (0 outside the range),
    and scored with ``logsumexp(W h' + b)``. No OOD data; no hyperparameter besides ``bins``.
    """

    name = "optfs"
    paper = ("Zhao, Xu, Gupta, Asthana, Zheng, Gould, Towards Optimal Feature-Shaping Methods for "
             "Out-of-Distribution Detection, ICLR 2024")
    param_ranges = {"bins": "[1, inf)"}

    def __init__(self, bins: int = 100):
        self.bins = bins

    def _fit(self, ctx: FitContext) -> None:
        h = ctx.train.penultimate
        self.weight_, self.bias_ = _check_head(ctx, h.shape[1], self.name)
        x = h.double().numpy()
        lo, hi = np.quantile(x, 1e-3), np.quantile(x, 1 - 1e-3)
        if not hi > lo:
            raise ValueError("optfs: the ID training activations are constant; there is nothing to shape")
        self.width_ = float((hi - lo) / int(self.bins))
        self.left_ = np.arange(lo, hi, self.width_)
        contrib = x * self.weight_.numpy()[ctx.train.logits.argmax(dim=1).numpy()]
        theta = np.array([(contrib * ((x >= b) & (x < b + self.width_))).sum(axis=1).mean() for b in self.left_])
        norm = np.linalg.norm(theta)
        if norm == 0:
            raise ValueError("optfs: every bin's contribution to the predicted logits is zero")
        self.theta_ = theta / norm * 1000.0

    def shape(self, h: torch.Tensor) -> torch.Tensor:
        """``theta_{bin(h_j)} h_j`` unit by unit (float64): each activation's bin found by a binary search over
        the bins' left edges (one pass, instead of one mask per bin), 0 below the first edge and at or beyond
        the last bin's right edge."""
        h = h.double()
        left = torch.as_tensor(self.left_, dtype=torch.float64)
        theta = torch.as_tensor(self.theta_, dtype=torch.float64)
        idx = torch.bucketize(h, left, right=True) - 1  # the last edge <= h (-1: below every edge)
        safe = idx.clamp_min(0)
        inside = (idx >= 0) & (h < left[safe] + self.width_)
        return torch.where(inside, theta[safe] * h, torch.zeros((), dtype=torch.float64))

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        h = feats.penultimate
        return torch.cat([energy_score(self.shape(h[i:i + 4096]) @ self.weight_.T + self.bias_)
                          for i in range(0, h.shape[0], 4096)]) if h.shape[0] else torch.zeros(0, dtype=torch.float64)
