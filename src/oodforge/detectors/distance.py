"""Feature-space distance detectors: relative Mahalanobis (RMDS), nearest-neighbour guidance (NNGuide)
and the neural relation graph (Relation).

All read the cached penultimate vectors (and, for NNGuide and Relation, the logits) and are fitted on
the ID training features only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..models.featureset import FeatureSet
from .base import Detector, FitContext, register
from .logit_based import energy_score
from .mahalanobis import Mahalanobis

__all__ = ["RMDS", "NNGuide", "Relation", "mean_top_k_similarity"]

_BLOCK = 4096


@register
class RMDS(Detector):
    """Relative Mahalanobis distance: ``-min_k (MD_k(h) - MD_0(h))`` on the penultimate vector ``h``.

    ``MD_k`` is the squared Mahalanobis distance to class ``k``'s mean under the covariance shared
    by all classes (exactly :class:`~oodforge.detectors.mahalanobis.Mahalanobis`, Lee et al.
    2018), and ``MD_0`` the squared Mahalanobis distance to a single *background* Gaussian
    ``N(mu_0, Sigma_0)`` fitted to all ID training features regardless of class (paper Sec. 2:
    ``RMD_k(z) = MD_k(z) - MD_0(z)``, confidence ``-min_k RMD_k``). Subtracting ``MD_0`` removes
    the directions every ID image varies along that carry no class information, which helps on
    near-OOD data. No hyperparameters. Both covariances are inverted as pseudo-inverses, as in
    ``mahalanobis``.
    """

    name = "rmds"
    paper = ("Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan, A Simple Fix to Mahalanobis Distance for Improving "
             "Near-OOD Detection, ICML 2021 UDL workshop (arXiv:2106.09022)")

    def _fit(self, ctx: FitContext) -> None:
        train = ctx.train
        self.class_gaussians_ = Mahalanobis().fit(ctx)
        one_class = FeatureSet(train.logits, train.penultimate, torch.zeros_like(train.labels))
        self.background_ = Mahalanobis().fit(dataclasses.replace(ctx, train=one_class))

    def relative_distances(self, h: torch.Tensor) -> torch.Tensor:
        """``MD_k(h) - MD_0(h)`` for every row of ``h`` and class ``k``, ``[N, C]`` (float64)."""
        return self.class_gaussians_.distances(h) - self.background_.distances(h)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        h = feats.penultimate
        return torch.cat([-self.relative_distances(h[i:i + _BLOCK]).min(dim=1).values
                          for i in range(0, h.shape[0], _BLOCK)])


def _normalise(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mean_top_k_similarity(queries: torch.Tensor, bank: torch.Tensor, k: int, device: str = "cpu") -> torch.Tensor:
    """Mean of the ``k`` largest inner products ``<q, b_i>`` of each query row with the bank rows.

    Products in float32 (like faiss ``IndexFlatIP`` in the authors' code), in blocks that keep the
    ``[block, bank]`` similarity matrix under ~64 MB; the means are returned in float64.
    """
    bank = bank.float().to(device)
    step = max(1, min(_BLOCK, 2**24 // max(1, bank.shape[0])))
    out = [torch.topk(queries[i:i + step].float().to(device) @ bank.T, k, dim=1).values.double().mean(dim=1).cpu()
           for i in range(0, queries.shape[0], step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@register
class NNGuide(Detector):
    """NNGuide score ``S(x) = energy(x) * mean_{i in top-k} <z, g_i>`` (higher = ID).

    As in the paper's method: the guide bank holds the L2-normalised ID training features scaled by their own
    confidence, ``g_i = energy(x_i) * h_i / ||h_i||``; the query ``z = h / ||h||`` is compared to
    the bank by inner product (cosine similarity weighted by the bank's confidence) and the mean
    over the ``k`` most similar entries is the guidance. The classifier's confidence
    ``energy(x) = logsumexp(f(x))`` is multiplied by it, so a confident input far from all ID
    features (the ReLU over-confidence failure) is pulled down. ``k = 10`` is the default of the
    authors' code; ``train_fraction < 1`` uses a random subset of the bank (the paper's ImageNet
    bank is 1 % of the training set), seeded by ``FitContext.seed``.
    """

    name = "nnguide"
    paper = ("Park, Jung, Teoh, Nearest Neighbor Guidance for Out-of-Distribution Detection, ICCV 2023")
    param_ranges = {"k": "[1, inf)", "train_fraction": "(0, 1]"}

    def __init__(self, k: int = 10, train_fraction: float = 1.0):
        self.k = k
        self.train_fraction = train_fraction

    def _fit(self, ctx: FitContext) -> None:
        h, logits = ctx.train.penultimate, ctx.train.logits
        if self.train_fraction < 1:
            rng = np.random.default_rng(ctx.seed)
            keep = max(1, int(round(self.train_fraction * h.shape[0])))
            idx = torch.from_numpy(np.sort(rng.choice(h.shape[0], keep, replace=False)))
            h, logits = h[idx], logits[idx]
        if int(self.k) != self.k or not 1 <= int(self.k) <= h.shape[0]:
            raise ValueError(f"nnguide: k must be an integer in [1, {h.shape[0]}] (the guide bank size), got {self.k}")
        self.bank_ = (_normalise(h) * energy_score(logits)[:, None]).float()
        self.device_ = ctx.device

    def guidance(self, h: torch.Tensor) -> torch.Tensor:
        """Mean inner product of ``h / ||h||`` with its ``k`` most similar guide-bank entries."""
        return mean_top_k_similarity(_normalise(h), self.bank_, int(self.k), self.device_)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return energy_score(feats.logits) * self.guidance(feats.penultimate)


@register
class Relation(Detector):
    """Relation: the summed relation-graph edges of a test image to the ID training images.

    The paper's relation kernel between images ``i`` and ``j`` (and its OOD score, as in the authors'
    code) multiplies the feature similarity and the prediction similarity,
    ``r_ij = max(<z_i, z_j>, 0)^pow * <p_i, p_j>`` with ``z = h / ||h||`` and ``p = softmax(f(x))``
    (the authors' code applies ``pow`` to the thresholded product: ``sum_j sign(r_ij) |r_ij|^pow``);
    edges with ``|r_ij| <= 0.03`` are cut, and the score is the sum of the remaining edges over the
    whole ID training bank. ID images are related to many training images of their class, OOD images to
    few. ``pow = 1`` and ``threshold = 0.03`` are the authors' defaults (OpenOOD's sweep: pow 1...8).
    Cost: one ``[N_test, N_train]`` similarity matrix, in blocks on ``FitContext.device``.
    """

    name = "relation"
    paper = ("Kim, Yun, Song, Neural Relation Graph: A Unified Framework for Identifying Label Noise and Outlier "
             "Data, NeurIPS 2023")
    param_ranges = {"pow": "(0, inf)", "threshold": "[0, inf)"}

    def __init__(self, pow: float = 1.0, threshold: float = 0.03):
        self.pow = pow
        self.threshold = threshold

    def _fit(self, ctx: FitContext) -> None:
        t = ctx.train
        self.bank_z_ = _normalise(t.penultimate).float()
        self.bank_p_ = torch.softmax(t.logits.double(), dim=1).float()
        self.device_ = ctx.device

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        bz, bp = self.bank_z_.to(self.device_), self.bank_p_.to(self.device_)
        step = max(1, min(_BLOCK, 2**24 // max(1, bz.shape[0])))
        out = []
        for i in range(0, len(feats), step):
            z = _normalise(feats.penultimate[i:i + step]).float().to(self.device_)
            p = torch.softmax(feats.logits[i:i + step].double(), dim=1).float().to(self.device_)
            # r_ij = max(<z_i, z_j>, 0) <p_i, p_j> and <p_i, p_j> >= 0: a negative similarity gives a product
            # <= 0 <= threshold, which the cut removes anyway, so one in-place threshold does clamp and cut; the
            # kept r_ij are > 0, so sign(r) |r|^pow = r^pow: power and sum in place
            rel = torch.nn.functional.threshold_((z @ bz.T).mul_(p @ bp.T), float(self.threshold), 0.0)
            if float(self.pow) != 1.0:
                rel.pow_(float(self.pow))
            out.append(rel.sum(dim=1, dtype=torch.float64).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
