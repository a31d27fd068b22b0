"""Mahalanobis-distance detector on penultimate features (Lee, Lee, Lee & Shin, NeurIPS 2018).

The features of each ID class are modelled as a Gaussian with its own mean and one covariance
shared by all classes ("tied", linear discriminant analysis, Sec. 2); an input scores by its
Mahalanobis distance to the closest class mean (confidence score M(x), Sec. 2).

Implemented: the penultimate-layer score and, with ``noise > 0``, the paper's input
pre-processing (Sec. 2). Not implemented: the multi-layer feature ensemble, because its layer
weights are fitted by logistic regression on *OOD validation data* (Sec. 2.2), which oodforge's
no-real-outliers setting does not have.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.featureset import FeatureSet
from .base import Detector, FitContext, register
from .moments import class_means, distinct_values, second_moment
from .odin import iter_image_batches, prepare_model

__all__ = ["Mahalanobis", "class_means_tied_precision"]


def class_means_tied_precision(features: torch.Tensor, labels: torch.Tensor
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class means ``mu_c``, the shared covariance's pseudo-inverse, its square root and the class ids.

    ``Sigma = 1/N sum_c sum_{i: y_i = c} (h_i - mu_c)(h_i - mu_c)^T`` (Sec. 2). It is inverted as a
    pseudo-inverse like ``scipy.linalg.pinvh`` in the authors' code (via
    ``sklearn.covariance.EmpiricalCovariance``): eigenvalues below ``max(eig) * D * eps`` are
    dropped, so a rank-deficient covariance (dead ReLU units, fewer images than dimensions) does
    not fail. Returns ``(means [C, D], precision [D, D], whitening [D, r], classes)`` with
    ``precision = whitening @ whitening.T``; all float64.
    """
    y = labels.cpu().numpy()
    if len(y) and y.min() < 0:
        raise ValueError("mahalanobis: the ID training FeatureSet has unlabelled images (label -1); "
                         "class-conditional Gaussians need the class labels of the training set")
    classes = distinct_values(y)
    means = class_means(features, y, classes)  # in float64 row chunks: no full-size copy of the features
    cov = second_moment(features, means, y, classes)
    vals, vecs = np.linalg.eigh(cov)
    keep = vals > max(vals.max(), 0.0) * cov.shape[0] * np.finfo(np.float64).eps
    if not keep.any():
        raise ValueError("mahalanobis: the class-centred ID training features have zero covariance "
                         "(all features equal within each class); the classifier's features carry no signal")
    whitening = vecs[:, keep] / np.sqrt(vals[keep])
    return means, whitening @ whitening.T, whitening, classes


@register
class Mahalanobis(Detector):
    """Score ``M(x) = max_c -(h - mu_c)^T Sigma^-1 (h - mu_c)`` on the penultimate vector ``h``.

    The (squared) distance is used as in the paper's M(x) and code; the ranking equals that of
    the square-rooted distance. With ``noise = eps > 0`` the input is first moved to
    ``x~ = x + eps * sign(grad_x M(x))`` (the paper's input pre-processing; ``eps`` in ``[0, 1]`` pixel units, equal to the
    original normalised-space step divided by the std, as for ODIN) and ``M(x~)`` is returned;
    then the detector needs the images and the model (``needs_inputs`` becomes ``True``).
    """

    name = "mahalanobis"
    paper = ("Lee, Lee, Lee, Shin, A Simple Unified Framework for Detecting Out-of-Distribution Samples and "
             "Adversarial Attacks, NeurIPS 2018")
    param_ranges = {"noise": "[0, inf)", "batch_size": "[1, inf)"}

    def __init__(self, noise: float = 0.0, batch_size: int = 128, progress: bool = True):
        self.noise = noise
        self.batch_size = batch_size
        self.progress = progress

    @property
    def needs_inputs(self) -> bool:  # type: ignore[override]
        """Only the input pre-processing variant (``noise > 0``) needs pixels and gradients."""
        return float(self.noise) > 0

    def _fit(self, ctx: FitContext) -> None:
        means, precision, whitening, classes = class_means_tied_precision(ctx.train.penultimate, ctx.train.labels)
        self.means_ = torch.from_numpy(means)
        self.precision_ = torch.from_numpy(precision)
        self.classes_ = classes
        # Distances are computed in whitened, centred coordinates z = (h - centre) W with W W^T = Sigma^+:
        # ||z - m_c||^2 equals (h - mu_c)^T Sigma^+ (h - mu_c), and centring keeps the expansion
        # ||z||^2 - 2 z.m_c + ||m_c||^2 free of cancellation when features sit far from the origin.
        self.centre_ = self.means_.mean(dim=0)
        self.whitening_ = torch.from_numpy(whitening)
        self.white_means_ = (self.means_ - self.centre_) @ self.whitening_
        self.model_ = ctx.model
        self.device_ = ctx.device

    def distances(self, h: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of ``h`` to each class mean, ``[N, C]`` (float64)."""
        z = (h.double() - self.centre_.to(h.device)) @ self.whitening_.to(h.device)
        m = self.white_means_.to(h.device)
        d = (z * z).sum(dim=1, keepdim=True) - 2.0 * z @ m.T + (m * m).sum(dim=1)[None, :]
        return d.clamp_min(0.0)

    def _score_features(self, h: torch.Tensor) -> torch.Tensor:
        out = [-self.distances(h[i:i + 4096]).min(dim=1).values for i in range(0, h.shape[0], 4096)]
        return torch.cat(out)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        if not self.needs_inputs:
            return self._score_features(feats.penultimate)
        model = prepare_model(self.model_, self.device_)
        out = []
        for x in iter_image_batches(feats.images, self.batch_size, self.device_, self.progress, "mahalanobis"):
            x = x.requires_grad_(True)
            with torch.enable_grad():
                d = self.distances(model.forward_all(x).penultimate)
                loss = d.min(dim=1).values.sum()  # distance to the closest class, per image
                (grad,) = torch.autograd.grad(loss, x)
            x_tilde = (x - self.noise * torch.sign(grad)).detach()  # = x + eps * sign(grad M)
            with torch.no_grad():
                out.append(self._score_features(model.forward_all(x_tilde).penultimate).cpu())
        return torch.cat(out)
