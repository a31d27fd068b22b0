"""OpenMax: extreme-value recalibration of the logits with an explicit "unknown" class.

Bendale & Boult, Towards Open Set Deep Networks, CVPR 2016. Fitted on the logits ("activation vectors")
of the correctly classified ID training images: one mean activation vector per class and a Weibull
model of the largest distances to it. Reads only the cached logits.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import weibull_min

from ..models.featureset import FeatureSet
from .base import Detector, FitContext, register

__all__ = ["OpenMax", "DISTANCES"]

DISTANCES = ("euclidean", "eucos")


def _distances(z: np.ndarray, mavs: np.ndarray, kind: str) -> np.ndarray:
    """Distance of each row of ``z`` ``[N, C]`` to each mean activation vector ``[K, C]``: ``[N, K]``."""
    eu = np.sqrt(np.maximum(((z[:, None, :] - mavs[None]) ** 2).sum(axis=2), 0.0))
    if kind == "euclidean":
        return eu
    cos = 1.0 - (z @ mavs.T) / (np.linalg.norm(z, axis=1)[:, None] * np.linalg.norm(mavs, axis=1)[None] + 1e-12)
    return eu / 200.0 + cos  # the paper's code: eucos = euclidean / 200 + cosine distance


@register
class OpenMax(Detector):
    """OpenMax score ``-P(unknown | x)`` (higher = ID), the paper's Alg. 1 (fit) and Alg. 2 (score).

    Fit: for each class ``c`` the mean activation vector ``mu_c`` (mean logits of the training images of
    class ``c`` that are classified correctly) and a Weibull distribution fitted to the ``tail_size``
    largest distances of those images to ``mu_c`` (EVT, ``libMR``'s ``FitHigh``; here scipy's maximum-
    likelihood ``weibull_min`` with location 0). Score: the ``alpha`` top-ranked classes of an image get
    weights ``w_i = (alpha + 1 - i) / alpha`` (``i = 1..alpha``); each of their logits is reduced to
    ``v_c (1 - w_i CDF_c(dist(v, mu_c)))``, the removed mass summed into an unknown logit
    ``v_0``, and ``P(unknown) = exp(v_0) / (exp(v_0) + sum_c exp(v_c'))``.

    A class with fewer than 2 correctly classified training images (a weak classifier) takes its mean and
    tail from all its training images instead (oodforge's fallback; listed in ``fallback_classes_``), so the
    detector still runs where the paper's construction is undefined.

    ``alpha = 3``, ``tail_size = 20`` and the Euclidean distance are OpenOOD's settings for 10-class
    problems; the paper uses ``alpha = 10`` of ImageNet's 1000 classes and ``distance="eucos"``.
    """

    name = "openmax"
    paper = "Bendale, Boult, Towards Open Set Deep Networks, CVPR 2016"
    param_ranges = {"alpha": "[1, inf)", "tail_size": "[2, inf)"}
    param_choices = {"distance": DISTANCES}

    def __init__(self, alpha: int = 3, tail_size: int = 20, distance: str = "euclidean"):
        self.alpha = alpha
        self.tail_size = tail_size
        self.distance = distance

    def _fit(self, ctx: FitContext) -> None:
        z = ctx.train.logits.double().numpy()
        y = ctx.train.labels.numpy()
        k = z.shape[1]
        if not int(self.alpha) <= k:
            raise ValueError(f"openmax: alpha must be at most the {k} classes, got {self.alpha}")
        hit = z.argmax(axis=1) == y
        mavs, shapes, scales = [], [], []
        self.fallback_classes_ = []
        for c in range(k):
            zc = z[hit & (y == c)]
            if len(zc) < 2:  # too few correct images for a Weibull tail: all of the class's training images
                zc = z[y == c]
                self.fallback_classes_.append(c)
            if len(zc) < 2:
                raise ValueError(f"openmax: class {c} has {len(zc)} training images; its Weibull model needs at "
                                 "least 2")
            mav = zc.mean(axis=0)
            d = np.sort(_distances(zc, mav[None], self.distance)[:, 0])[-int(self.tail_size):]
            shape, _, scale = weibull_min.fit(d, floc=0.0)
            mavs.append(mav)
            shapes.append(shape)
            scales.append(scale)
        self.mavs_, self.shapes_, self.scales_ = np.stack(mavs), np.array(shapes), np.array(scales)

    def unknown_probability(self, logits: torch.Tensor) -> np.ndarray:
        """``P(unknown | x)`` per image (the paper's Alg. 2)."""
        z = logits.double().numpy()
        n, k = z.shape
        a = int(self.alpha)
        cdf = weibull_min.cdf(_distances(z, self.mavs_, self.distance), self.shapes_[None], scale=self.scales_[None])
        ranked = np.argsort(-z, axis=1, kind="stable")[:, :a]
        weights = np.zeros((n, k))
        np.put_along_axis(weights, ranked, ((a + 1 - np.arange(1, a + 1)) / a)[None].repeat(n, 0), axis=1)
        revised = z * (1.0 - weights * cdf)
        unknown = (z - revised).sum(axis=1, keepdims=True)
        all_logits = np.concatenate([revised, unknown], axis=1)
        m = all_logits.max(axis=1, keepdims=True)
        e = np.exp(all_logits - m)
        return e[:, -1] / e.sum(axis=1)

    def _score(self, feats: FeatureSet) -> np.ndarray:
        return -self.unknown_probability(feats.logits)
