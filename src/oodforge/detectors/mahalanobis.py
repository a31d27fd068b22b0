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

import dataclasses

import numpy as np
import torch

from ..models.featureset import FeatureSet
from .base import Detector, FitContext, register
from .moments import class_means, distinct_values, principal_axes, second_moment
from .odin import iter_image_batches, prepare_model

__all__ = ["Mahalanobis", "GEM", "MahalanobisPP", "GMM", "SSD", "class_means_tied_precision"]


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


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)


@register
class GEM(Detector):
    """GEM (Gaussian mixture energy): ``log sum_c exp(-1/2 (h - mu_c)^T Sigma^-1 (h - mu_c))``.

    The class-conditional Gaussians of :class:`Mahalanobis` (class means, one shared covariance, fitted on
    the ID training features) read as an energy-based model (the paper's GEM score): the
    log-sum-exp over classes of the negative half squared Mahalanobis distances, instead of the distance
    to the closest class alone. No hyperparameters.
    """

    name = "gem"
    paper = ("Morteza, Li, Provable Guarantees for Understanding Out-of-distribution Detection, AAAI 2022 "
             "(GEM score)")

    def _fit(self, ctx: FitContext) -> None:
        self.gaussians_ = Mahalanobis().fit(ctx)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        h = feats.penultimate
        return torch.cat([torch.logsumexp(-0.5 * self.gaussians_.distances(h[i:i + 4096]), dim=1)
                          for i in range(0, h.shape[0], 4096)])


@register
class MahalanobisPP(Detector):
    """Mahalanobis++: the Mahalanobis score of the L2-normalised penultimate vector ``h / ||h||``.

    The paper shows that feature norms vary strongly within a class and violate the shared-
    covariance Gaussian assumption; normalising every feature (training and test) to unit norm before
    fitting the class means and the tied covariance fixes it. The score is then exactly
    :class:`Mahalanobis`'s ``max_c -(z - mu_c)^T Sigma^-1 (z - mu_c)`` on ``z = h / ||h||``. No
    hyperparameters (no input pre-processing).
    """

    name = "mahalanobispp"
    paper = "Mueller, Hein, Mahalanobis++: Improving OOD Detection via Feature Normalization, ICML 2025"

    def _fit(self, ctx: FitContext) -> None:
        t = ctx.train
        unit = FeatureSet(t.logits, _unit_rows(t.penultimate).float(), t.labels)
        self.gaussians_ = Mahalanobis().fit(dataclasses.replace(ctx, train=unit))

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return self.gaussians_._score_features(_unit_rows(feats.penultimate))


def _log_gaussians(x: torch.Tensor, means: torch.Tensor, chol: torch.Tensor, log_weights: torch.Tensor
                   ) -> torch.Tensor:
    """``log w_k + log N(x | mu_k, L_k L_k^T)`` for every row of ``x`` ``[N, D]`` and component ``k``: ``[N, K]``.

    ``chol`` is ``[K, D, D]`` (one covariance per component, ``"full"``) or ``[D, D]`` (one shared by all,
    ``"tied"``). ``||L^-1 (x - mu)||^2`` as ``||x A - mu A||^2`` with ``A = L^-T`` (one triangular inverse per
    covariance, then a matrix product: faster than a triangular solve with N right-hand sides); tied, ``x A``
    is computed once and the squared distances to all whitened means come from one more product
    (``||a||^2 - 2 a.b + ||b||^2``, float64)."""
    d = x.shape[1]
    eye = torch.eye(d, dtype=x.dtype)
    const = d * np.log(2 * np.pi)
    if chol.dim() == 2:  # tied
        a = torch.linalg.solve_triangular(chol, eye, upper=False).T
        logdet = 2 * torch.log(torch.diagonal(chol)).sum()
        xa, ma = x @ a, means @ a
        sq = (xa.pow(2).sum(dim=1, keepdim=True) - 2 * xa @ ma.T + ma.pow(2).sum(dim=1)).clamp_min_(0)
        return log_weights - 0.5 * (const + logdet + sq)
    out = torch.empty(x.shape[0], means.shape[0], dtype=x.dtype)
    for k in range(means.shape[0]):
        a = torch.linalg.solve_triangular(chol[k], eye, upper=False).T  # L^-T
        logdet = 2 * torch.log(torch.diagonal(chol[k])).sum()
        out[:, k] = log_weights[k] - 0.5 * (const + logdet + (x @ a - means[k] @ a).pow(2).sum(dim=1))
    return out


def _m_step(x: torch.Tensor, resp: torch.Tensor, reg_covar: float, tied: bool = False,
            xtx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, means and covariances (``+ reg_covar`` on the diagonal) from responsibilities ``[N, K]``; a
    one-hot ``resp`` gives the class-conditional Gaussians of those assignments. ``tied``: one covariance,
    ``(X^T X - sum_k N_k mu_k mu_k^T) / N`` (the within-component scatter pooled over components), ``[D, D]``
    (``xtx``: ``X^T X`` when the caller has it, it does not change between EM steps); otherwise one per
    component, ``[K, D, D]``."""
    nk = resp.sum(dim=0) + 10 * torch.finfo(x.dtype).eps
    means = resp.T @ x / nk[:, None]
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    if tied:
        xtx = x.T @ x if xtx is None else xtx
        covariance = (xtx - (nk[:, None] * means).T @ means) / nk.sum() + reg_covar * eye
        return nk / nk.sum(), means, covariance
    covariances = torch.stack([((x - means[k]) * resp[:, k:k + 1]).T @ (x - means[k]) / nk[k] + reg_covar * eye
                               for k in range(len(nk))])
    return nk / nk.sum(), means, covariances


def _log_mixture(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log sum_k exp(logp_k), responsibilities)`` of ``[N, K]`` joint log-likelihoods, from one ``exp``
    (``logp`` is overwritten).

    Terms more than 700 nats below a row's largest are raised to ``-700`` first: their ``exp`` (under
    ``1e-304`` against the largest term's 1) changes nothing a float64 sum can see, and it spares the CPU's
    slow path for results that underflow (~30x slower ``exp``; far-away components and OOD points are
    thousands of nats down)."""
    top = logp.amax(dim=1, keepdim=True)
    resp = logp.sub_(top).clamp_min_(-700.0).exp_()
    total = resp.sum(dim=1, keepdim=True)
    return (top + torch.log(total))[:, 0], resp.div_(total)


def fit_gaussian_mixture(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor,
                         reg_covar: float = 1e-6, max_iter: int = 100, tol: float = 1e-3
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """EM for a Gaussian mixture (Dempster, Laird & Rubin 1977), in float64 torch.

    ``covariances`` ``[K, D, D]`` fits one covariance per component (scikit-learn's ``"full"``), ``[D, D]`` one
    shared by all (``"tied"``). The iteration is scikit-learn's ``GaussianMixture.fit`` (the reference the
    tests compare with): per step an E-step (responsibilities, mean log-likelihood ``L``), an M-step
    (``N_k = sum_i r_ik + 10 eps``, means, covariance(s) plus ``reg_covar`` on the diagonal, weights
    ``N_k / N``), stopping when ``L`` changed by less than ``tol``. Returns ``(weights, means, covariances,
    iterations, converged)``. Written in torch rather than calling scikit-learn because scikit-learn also runs
    k-means for its initial responsibilities even when every parameter is given, and its E-step is several
    times slower on 2 cores (for tied covariances it whitens ``x`` once per component, here once).
    """
    tied = covariances.dim() == 2
    xtx = x.T @ x if tied else None
    lower, converged, it = -np.inf, False, 0
    for it in range(1, int(max_iter) + 1):  # noqa: B007 (returned: the steps taken)
        norm, resp = _log_mixture(_log_gaussians(x, means, torch.linalg.cholesky(covariances), torch.log(weights)))
        weights, means, covariances = _m_step(x, resp, reg_covar, tied, xtx)
        prev, lower = lower, float(norm.mean())
        if abs(lower - prev) < tol:
            converged = True
            break
    return weights, means, covariances, it, converged


@register
class GMM(Detector):
    """Gaussian mixture density of the penultimate features: ``log p(P^T h)`` under a ``K``-component GMM.

    OpenOOD v1.5's ``gmm`` baseline (``gmm_postprocessor.py``, ``configs/postprocessors/gmm.yml``): the
    training features are projected on their 50 leading principal axes (``pca_dim=50``, ``reduce_dim:
    pca_50``; features of 50 dims or fewer are kept as they are), a 50-component mixture with one covariance
    shared by all components (``n_components=50``, ``covariance="tied"``, scikit-learn's
    ``covariance_type='tied'``) is fitted by EM (:func:`fit_gaussian_mixture`) started from k-means clusters
    (scikit-learn ``KMeans``, one init, seeded by ``FitContext.seed``, as ``GaussianMixture``'s
    ``init_params='kmeans'``), and a test feature scores its log-density. OpenOOD computes the layer's score as
    ``log(sum_k w_k exp(-d_k / 2) + 1e-45)`` in float32, which is this log-density minus a constant where it
    does not underflow; oodforge keeps the log-sum-exp, so far-away features still rank instead of tying at
    ``log 1e-45``. OpenOOD's config lists three layers, but their fusion weights (``alpha_list: [0, 0, 1]``)
    keep only the third; oodforge fits the mixture on the penultimate vector, the one layer its cached
    forward pass keeps for every detector. OpenOOD's PCA is scikit-learn's, which picks a randomised SVD on
    large inputs; here the axes are exact.

    ``covariance="full"`` with ``n_components=None`` and ``pca_dim=None`` is oodforge's earlier variant (the
    default before session 14): one component per class, each with its own covariance, EM started from the
    class-conditional Gaussians (each class's mean, covariance and frequency from the labels; eight steps to
    ``tol`` on quick fashion6's 2,700 training features), no projection. ``n_components=None`` always starts
    from the labels (one component per class); a number starts from k-means. (pytorch-ood's ``GMM`` stops at
    the labelled Gaussians, no EM, and scores the closest class's Mahalanobis distance: another detector.)
    ``max_train=10000`` caps the images the projection and EM use (random, seeded; a full step costs
    ``O(N K D^2)``, a tied one ``O(N D^2 + N K D)``); ``reg_covar`` is added to the covariances' diagonal
    (scikit-learn's default 1e-6); ``tol`` is the change of the mean log-likelihood that stops EM
    (scikit-learn's 1e-3, at most ``max_iter=100`` steps as scikit-learn).
    """

    name = "gmm"
    paper = ("Gaussian mixture model of the features, fitted by EM (Dempster, Laird, Rubin, J. R. Stat. Soc. B "
             "1977), as OpenOOD v1.5's gmm baseline (Zhang et al., OpenOOD v1.5, arXiv:2306.09301)")
    param_ranges = {"n_components": "[1, inf)", "pca_dim": "[1, inf)", "max_train": "[1, inf)",
                    "reg_covar": "(0, inf)", "max_iter": "[1, inf)", "tol": "(0, inf)"}
    param_choices = {"covariance": ("tied", "full")}

    def __init__(self, n_components: int | None = 50, covariance: str = "tied", pca_dim: int | None = 50,
                 max_train: int = 10000, reg_covar: float = 1e-6, max_iter: int = 100, tol: float = 1e-3):
        self.n_components = n_components
        self.covariance = covariance
        self.pca_dim = pca_dim
        self.max_train = max_train
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.tol = tol

    def _fit(self, ctx: FitContext) -> None:
        h = ctx.train.penultimate
        idx = np.arange(h.shape[0])
        if h.shape[0] > self.max_train:
            idx = np.sort(np.random.default_rng(ctx.seed).choice(h.shape[0], int(self.max_train), replace=False))
        x = h[torch.from_numpy(idx)].double()
        labels = ctx.train.labels[torch.from_numpy(idx)].numpy()
        k = int(self.n_components) if self.n_components is not None else int(ctx.train.logits.shape[1])
        if k > len(x):
            raise ValueError(f"gmm: n_components={k} exceeds the {len(x)} training features (set a smaller "
                             "n_components, or n_components=None for one component per class)")
        self.projection_ = None  # features of pca_dim dims or fewer are kept as they are
        if self.pca_dim is not None and int(self.pca_dim) < x.shape[1]:
            _, axes = principal_axes(x, x.mean(dim=0).numpy())
            self.projection_ = torch.from_numpy(axes[:, :int(self.pca_dim)].copy())
        if self.projection_ is not None:
            x = x @ self.projection_
        if self.n_components is None and labels.min() >= 0 and len(np.unique(labels)) == k:
            assign = np.searchsorted(np.unique(labels), labels)
        else:
            from sklearn.cluster import KMeans

            assign = KMeans(k, n_init=1, random_state=int(ctx.seed)).fit_predict(x.numpy())
        tied = self.covariance == "tied"
        start = _m_step(x, torch.from_numpy(np.eye(k)[assign]), float(self.reg_covar), tied)
        self.weights_, self.means_, self.covariances_, self.n_iter_, self.converged_ = fit_gaussian_mixture(
            x, *start, float(self.reg_covar), int(self.max_iter), float(self.tol))
        self.chol_ = torch.linalg.cholesky(self.covariances_)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        h = feats.penultimate
        out = []
        for i in range(0, h.shape[0], 4096):
            x = h[i:i + 4096].double()
            if self.projection_ is not None:
                x = x @ self.projection_
            out.append(_log_mixture(_log_gaussians(x, self.means_, self.chol_, torch.log(self.weights_)))[0])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@register
class SSD(Detector):
    """SSD: ``-min_m (z - mu_m)^T Sigma_m^-1 (z - mu_m)`` over k-means clusters of the normalised ID features.

    The paper's label-free detector: the L2-normalised penultimate vectors ``z = h / ||h||``
    of the ID training set are clustered by k-means (``clusters``, default 1, the paper's choice; scikit-
    learn ``KMeans``, seeded by ``FitContext.seed``), each cluster gets its own mean and covariance, and a
    test feature scores by its Mahalanobis distance to the closest cluster. It needs no labels; with one
    cluster it models all ID data as one Gaussian. (The paper's self-supervised encoder is replaced by
    the classifier under test; its label-aware SSD+ is :class:`Mahalanobis`.) Covariances are
    pseudo-inverted as for ``mahalanobis``.
    """

    name = "ssd"
    paper = "Sehwag, Chiang, Mittal, SSD: A Unified Framework for Self-Supervised Outlier Detection, ICLR 2021"
    param_ranges = {"clusters": "[1, inf)"}

    def __init__(self, clusters: int = 1):
        self.clusters = clusters

    def _fit(self, ctx: FitContext) -> None:
        z = _unit_rows(ctx.train.penultimate)
        if int(self.clusters) == 1:
            assign = np.zeros(len(z), dtype=np.int64)
        else:
            from sklearn.cluster import KMeans

            if int(self.clusters) > len(z):
                raise ValueError(f"ssd: clusters={self.clusters} exceeds the {len(z)} training features")
            assign = KMeans(int(self.clusters), n_init=10, random_state=int(ctx.seed)).fit_predict(z.numpy())
        self.clusters_ = []
        for m in np.unique(assign):
            members = torch.from_numpy(np.flatnonzero(assign == m))
            one = FeatureSet(ctx.train.logits[members], z[members].float(), torch.zeros(len(members), dtype=torch.long))
            self.clusters_.append(Mahalanobis().fit(dataclasses.replace(ctx, train=one)))

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        z = _unit_rows(feats.penultimate)
        d = torch.stack([g.distances(z)[:, 0] for g in self.clusters_], dim=1)
        return -d.min(dim=1).values
