"""Detectors that read only the softmax of the logits: entropy, GEN, temperature-scaled MSP, KL matching and DOCTOR.

Everything is computed in float64 from the cached logits (``log_softmax`` for stability); no
forward pass. ``tempscale`` and ``klm`` fit a few numbers on ID data (a temperature, class
templates); the other two need no fitting.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..models.featureset import FeatureSet
from .base import Detector, FitContext, register

__all__ = ["Entropy", "GEN", "TempScale", "KLMatching", "Doctor", "fit_temperature", "id_fit_set"]


def id_fit_set(ctx: FitContext) -> FeatureSet:
    """The held-out ID validation features when there are any, else the ID training features."""
    return ctx.val if ctx.val is not None and len(ctx.val) > 0 else ctx.train


@register
class Entropy(Detector):
    """Negative predictive entropy ``sum_c p_c log p_c`` with ``p = softmax(f(x))`` (higher = ID).

    The Shannon entropy of the predicted class distribution (Shannon 1948, Sec. 6: ``H = -sum p log p``)
    used directly as an uncertainty score, the classic baseline next to MSP; unlike MSP it uses the
    whole distribution, not only its maximum. No hyperparameters.
    """

    name = "entropy"
    paper = ("Shannon, A Mathematical Theory of Communication, Bell System Technical Journal 1948 "
             "(predictive entropy as an OOD baseline)")

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        log_p = torch.log_softmax(feats.logits.double(), dim=1)
        return (log_p.exp() * log_p).sum(dim=1)


@register
class GEN(Detector):
    """Generalized entropy score ``-sum_{j<=M} p_(j)^gamma (1 - p_(j))^gamma`` (the paper's GEN score ``-G_gamma``).

    ``p_(1) >= p_(2) >= ...`` are the sorted softmax probabilities; only the ``M`` largest enter
    (the tail of many tiny probabilities is noise with 1000 classes). ``gamma = 0.1`` and
    ``M = 100`` are the paper's ImageNet defaults; with ``M >= C`` (every CIFAR-10-size problem,
    and all oodforge suites) all classes are used. The sum is largest for a uniform ``p``, so its
    negative is higher for confident, ID-like inputs.
    """

    name = "gen"
    paper = "Liu, Lochman, Zach, GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection, CVPR 2023"
    param_ranges = {"gamma": "(0, 1)", "top_m": "[1, inf)"}

    def __init__(self, gamma: float = 0.1, top_m: int = 100):
        self.gamma = gamma
        self.top_m = top_m

    def _fit(self, ctx: FitContext) -> None:
        if int(self.top_m) != self.top_m or int(self.top_m) < 1:
            raise ValueError(f"gen: top_m must be an integer >= 1, got {self.top_m}")

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        p = torch.softmax(feats.logits.double(), dim=1)
        m = min(int(self.top_m), p.shape[1])
        top = torch.topk(p, m, dim=1).values
        g = float(self.gamma)
        return -(top.pow(g) * (1.0 - top).clamp_min(0.0).pow(g)).sum(dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """The temperature ``T`` minimising the mean NLL of ``softmax(logits / T)`` (Guo et al. 2017, Sec. 4.2).

    The NLL is convex in ``1/T``, so a bounded scalar search over ``log T`` finds the global
    minimum (deterministic; the original code uses L-BFGS on ``T``).
    """
    z = logits.double()
    y = labels.long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / np.exp(log_t), y))

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


@register
class TempScale(Detector):
    """MSP after temperature scaling: ``max_c softmax(f(x) / T)_c`` with ``T`` fitted by NLL.

    ``T`` minimises the negative log-likelihood of the true labels on the **held-out ID
    validation set** (``FitContext.val``), as in the paper (Sec. 4.2: a single scalar parameter
    fitted on the validation set). When no validation set is given it falls back to the ID
    training set, where an over-fitted network's NLL is optimistic and ``T`` comes out closer to
    (or below) 1. No OOD data is involved.
    """

    name = "tempscale"
    paper = "Guo, Pleiss, Sun, Weinberger, On Calibration of Modern Neural Networks, ICML 2017"

    def _fit(self, ctx: FitContext) -> None:
        fs = id_fit_set(ctx)
        if (fs.labels < 0).any():
            raise ValueError("tempscale: fitting the temperature needs the true labels of the ID validation "
                             "(or training) set, but some are -1")
        self.fitted_on_ = "val" if fs is ctx.val else "train"
        self.temperature_ = fit_temperature(fs.logits, fs.labels)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return torch.softmax(feats.logits.double() / self.temperature_, dim=1).max(dim=1).values


@register
class KLMatching(Detector):
    """KL matching: ``-min_k KL(p(x) || d_k)`` with ``d_k`` the mean softmax of ID images predicted as ``k``.

    The paper's KL matching: for each class ``k`` the template ``d_k = E[p(y | x')]`` averages the
    softmax outputs of held-out ID images ``x'`` whose argmax is ``k``; the anomaly score is
    ``min_k KL[p(y|x) || d_k]``, negated here so that higher = ID. It rewards inputs whose whole
    predicted distribution (not only its maximum) looks like a typical ID prediction.

    Templates come from ``FitContext.val`` (held-out ID validation data, as in the paper and
    OpenOOD) and from the ID training set when there is no validation set (as in the ViM
    authors' benchmark code). Classes that no image is predicted as get no template.
    """

    name = "klm"
    paper = ("Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song, Scaling Out-of-Distribution "
             "Detection for Real-World Settings, ICML 2022")

    def _fit(self, ctx: FitContext) -> None:
        fs = id_fit_set(ctx)
        self.fitted_on_ = "val" if fs is ctx.val else "train"
        p = torch.softmax(fs.logits.double(), dim=1)
        pred = p.argmax(dim=1)
        classes = torch.unique(pred)
        templates = torch.stack([p[pred == k].mean(dim=0) for k in classes])
        self.classes_ = classes
        self.log_templates_ = templates.clamp_min(1e-300).log()

    def kl_to_templates(self, logits: torch.Tensor) -> torch.Tensor:
        """``KL(p(x) || d_k)`` for every image and template, ``[N, K]`` (float64)."""
        log_p = torch.log_softmax(logits.double(), dim=1)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(dim=1, keepdim=True)
        return neg_entropy - p @ self.log_templates_.T

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return -self.kl_to_templates(feats.logits).min(dim=1).values


@register
class Doctor(Detector):
    """DOCTOR's ``D_alpha``: ``-(1 - g(x)) / g(x)`` with ``g(x) = sum_c softmax(f(x) / T)_c^2`` (higher = ID).

    The paper's Gini-based discriminator (``D_alpha``, the Gini-impurity form): ``1 - g`` is the
    probability that two draws from the predicted distribution disagree, so confident predictions have
    ``g`` near 1. The paper's other discriminator ``D_beta = P_err / (1 - P_err)`` ranks exactly like
    MSP and is not registered again. ``temperature = 1`` (no input perturbation, the paper's
    ``epsilon = 0`` setting).
    """

    name = "doctor"
    paper = ("Granese, Romanelli, Gorla, Palamidessi, Piantanida, DOCTOR: A Simple Method for Detecting "
             "Misclassification Errors, NeurIPS 2021 (D_alpha)")
    param_ranges = {"temperature": "(0, inf)"}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        g = torch.softmax(feats.logits.double() / float(self.temperature), dim=1).pow(2).sum(dim=1)
        return -(1.0 - g) / g
