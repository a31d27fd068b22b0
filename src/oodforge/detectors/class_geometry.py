"""Detectors built on the geometry of the last layer: SHE, fDBD, NCI, CARef and CADRef.

Each compares the penultimate vector ``h`` of an image with a few training statistics (class
patterns, the training mean) and the classifier head ``W, b``, relative to the *predicted*
class ``yhat = argmax f(x)``. One vectorised pass over the cached features; no image access.
"""

from __future__ import annotations

import torch

from ..models.featureset import FeatureSet
from .activation_shaping import _check_head
from .base import Detector, FitContext, register
from .logit_based import energy_score
from .moments import class_means, distinct_values

__all__ = ["SHE", "FDBD", "NCI", "CARef", "CADRef", "LOGIT_SCORES"]


def _predicted(feats: FeatureSet) -> torch.Tensor:
    return feats.logits.argmax(dim=1)


def _train_mean(ctx: FitContext) -> torch.Tensor:
    return ctx.train.penultimate.double().mean(dim=0)


@register
class SHE(Detector):
    """SHE (simplified Hopfield energy): ``<h, s_yhat>``, the inner product with the predicted class's stored pattern.

    The stored pattern ``s_c`` of class ``c`` is the mean penultimate vector of the ID training
    images of class ``c`` that the classifier gets right (the paper's memorised ID patterns; its
    simplified Hopfield energy reduces to this inner product). ID images match
    their class pattern strongly; OOD images, even when predicted confidently, match it less.
    No hyperparameters. A class with no correctly classified training image (a weak classifier) takes
    the mean of all its training images instead (oodforge's fallback, listed in ``fallback_classes_``).
    """

    name = "she"
    paper = ("Zhang, Fu, Lu, Li, Wang, Zhang, Out-of-distribution Detection based on In-distribution Data "
             "Patterns Memorization with Modern Hopfield Energy, ICLR 2023")

    def _fit(self, ctx: FitContext) -> None:
        train = ctx.train
        if (train.labels < 0).any():
            raise ValueError("she: the ID training FeatureSet has unlabelled images (label -1); the class "
                             "patterns need the labels")
        h, y, pred = train.penultimate.double(), train.labels, _predicted(train)
        patterns, self.fallback_classes_ = [], []
        for c in range(train.logits.shape[1]):
            hit = (y == c) & (pred == c)
            if not hit.any():  # a class the classifier never gets right: its pattern from all its images
                hit = y == c
                self.fallback_classes_.append(c)
            if not hit.any():
                raise ValueError(f"she: the training set has no image of class {c}, so class {c} has no stored "
                                 "pattern")
            patterns.append(h[hit].mean(dim=0))
        self.patterns_ = torch.stack(patterns)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return (feats.penultimate.double() * self.patterns_[_predicted(feats)]).sum(dim=1)


@register
class FDBD(Detector):
    """fDBD: mean feature distance to the decision boundaries of the predicted class, over ``||h - mu||``.

    For the predicted class ``yhat`` and each other class ``c``, the distance of ``h`` to the
    hyperplane where ``f_yhat = f_c`` is ``|f_yhat(x) - f_c(x)| / ||w_yhat - w_c||`` (closed form
    for a linear head; the paper's closed-form distance). The score averages it over the ``C - 1`` other classes and
    divides by ``||h - mu||``, the distance to the mean ``mu`` of the ID training features
    (the paper's regularisation: ID and OOD are compared at equal deviation from the mean).
    ID features sit far from the boundaries, hence higher = ID. Hyperparameter-free.
    """

    name = "fdbd"
    paper = "Liu, Qin, Fast Decision Boundary based Out-of-Distribution Detector, ICML 2024"

    def _fit(self, ctx: FitContext) -> None:
        w, _ = _check_head(ctx, ctx.train.penultimate.shape[1], self.name)
        if w.shape[0] < 2:
            raise ValueError("fdbd: decision boundaries need at least 2 classes")
        dist = torch.cdist(w, w)  # ||w_p - w_c|| for every pair
        dist.fill_diagonal_(1.0)  # the (yhat, yhat) term has a zero numerator; avoid 0 / 0
        self.inv_weight_dist_ = 1.0 / dist
        self.train_mean_ = _train_mean(ctx)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        z = feats.logits.double()
        pred = z.argmax(dim=1)
        gaps = (z.gather(1, pred[:, None]) - z).abs()  # |f_yhat - f_c|, 0 for c = yhat
        boundary = (gaps * self.inv_weight_dist_[pred]).sum(dim=1) / (z.shape[1] - 1)
        return boundary / (feats.penultimate.double() - self.train_mean_).norm(dim=1).clamp_min(1e-12)


@register
class NCI(Detector):
    """NCI: ``<w_yhat, (h - mu) / ||h - mu||> + alpha * ||h||_1`` (higher = ID).

    Neural collapse says ID features, centred at the training mean ``mu``, align with the
    classifier weight ``w_yhat`` of their class. The first term (the paper's pScore) projects the
    unit direction of ``h - mu`` on ``w_yhat``; the L1 norm of ``h`` (ID features are larger) is
    added with weight ``alpha`` as a filter (the paper's NCI score). ``alpha = 1e-4`` is the default of
    the authors' OpenOOD implementation (they select it from {1e-4, 1e-3, 1e-2, 1e-1} on ID
    validation data).
    """

    name = "nci"
    paper = "Liu, Qin, Detecting Out-of-Distribution through the Lens of Neural Collapse, CVPR 2025 (arXiv:2311.01479)"
    param_ranges = {"alpha": "[0, inf)"}

    def __init__(self, alpha: float = 1e-4):
        self.alpha = alpha

    def _fit(self, ctx: FitContext) -> None:
        self.weight_, _ = _check_head(ctx, ctx.train.penultimate.shape[1], self.name)
        self.train_mean_ = _train_mean(ctx)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        h = feats.penultimate.double()
        centred = h - self.train_mean_
        proj = (self.weight_[_predicted(feats)] * centred).sum(dim=1) / centred.norm(dim=1).clamp_min(1e-12)
        return proj + float(self.alpha) * h.abs().sum(dim=1)


def _class_means(ctx: FitContext, who: str) -> torch.Tensor:
    """Mean ID training feature of every class (by the training labels), ``[C, D]`` float64."""
    y = ctx.train.labels.numpy()
    if len(y) and y.min() < 0:
        raise ValueError(f"{who}: the ID training FeatureSet has unlabelled images (label -1); the class means "
                         "need the labels")
    classes = distinct_values(y)
    if len(classes) != ctx.train.logits.shape[1]:
        raise ValueError(f"{who}: the training set has {len(classes)} of the classifier's "
                         f"{ctx.train.logits.shape[1]} classes; every class needs a mean")
    return torch.from_numpy(class_means(ctx.train.penultimate, y, classes))


@register
class CARef(Detector):
    """CARef: ``-||h - mu_yhat||_1 / ||h||_1``, the relative error to the predicted class's mean feature.

    The paper's class-aware relative feature error: ``mu_c`` is the mean penultimate vector
    of the ID training images of class ``c``; an ID image lies close to the mean of the class it is
    predicted as, relative to its own size. No hyperparameters.
    """

    name = "caref"
    paper = ("Ling et al., CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative "
             "Feature Leveraging, CVPR 2025 (arXiv:2503.00325), CARef")

    def _fit(self, ctx: FitContext) -> None:
        self.means_ = _class_means(ctx, self.name)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        h = feats.penultimate.double()
        err = (h - self.means_[_predicted(feats)]).abs().sum(dim=1)
        return -err / h.abs().sum(dim=1).clamp_min(1e-12)


def _gen_inverse(logits: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """CADRef's GEN logit score ``1 / sum_{top M} p^g (1-p)^g``, ``M = max(10, C // 10)`` (the authors' code)."""
    p = torch.softmax(logits.double(), dim=1)
    m = min(p.shape[1], max(10, p.shape[1] // 10))
    top = torch.topk(p, m, dim=1).values
    return 1.0 / (top.pow(gamma) * (1.0 - top).clamp_min(0.0).pow(gamma)).sum(dim=1)


#: the logit-based scores CADRef can divide by (its ``logit_method``)
LOGIT_SCORES = {
    "energy": lambda z: energy_score(z),
    "maxlogit": lambda z: z.double().max(dim=1).values,
    "msp": lambda z: torch.softmax(z.double(), dim=1).max(dim=1).values,
    "gen": _gen_inverse,
}


@register
class CADRef(Detector):
    """CADRef: CARef's error split by the sign of the class weights, weighted by a logit score.

    With ``d = h - mu_yhat`` and ``s = sign(w_yhat)``, the error is decoupled into the part
    along the class's positive evidence ``E+ = ||max(d * s, 0)||_1 / ||h||_1`` and the opposite part
    ``E- = ||max(-d * s, 0)||_1 / ||h||_1``; the score (Eq. 10) is
    ``-(E+ / S(x) + E- / mean_train S)`` with ``S`` a logit-based score of the image (``logit_score``:
    ``"energy"`` default, as in the paper's main results; ``"maxlogit"``, ``"msp"``, ``"gen"``) and its
    mean over the ID training set. ``mu_c`` is the class-``c`` mean of the ID training features.
    """

    name = "cadref"
    paper = ("Ling et al., CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative "
             "Feature Leveraging, CVPR 2025 (arXiv:2503.00325)")
    param_choices = {"logit_score": tuple(LOGIT_SCORES)}

    def __init__(self, logit_score: str = "energy"):
        self.logit_score = logit_score

    def _fit(self, ctx: FitContext) -> None:
        self.weight_, _ = _check_head(ctx, ctx.train.penultimate.shape[1], self.name)
        self.means_ = _class_means(ctx, self.name)
        self.train_logit_score_ = float(LOGIT_SCORES[self.logit_score](ctx.train.logits).mean())

    def decoupled_errors(self, feats: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E+, E-)`` per image (float64)."""
        h = feats.penultimate.double()
        pred = _predicted(feats)
        d = (h - self.means_[pred]) * self.weight_[pred].sign()
        size = h.abs().sum(dim=1).clamp_min(1e-12)
        return d.clamp_min(0.0).sum(dim=1) / size, (-d).clamp_min(0.0).sum(dim=1) / size

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        e_pos, e_neg = self.decoupled_errors(feats)
        s = LOGIT_SCORES[self.logit_score](feats.logits)
        return -(e_pos / s + e_neg / self.train_logit_score_)
