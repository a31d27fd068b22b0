"""Toy OOD problems for fast, meaningful detector tests (Gaussian blobs, in the spirit of OODEEL).

The "images" are ``[N, D, 1, 1]`` uint8 arrays, so they travel through the real
:class:`~oodforge.data.base.ArrayDataset` / :class:`~oodforge.models.base.Classifier` code paths
(``[0, 1]`` pixels, normalisation inside the model, ``feature_map`` -> ``pool`` -> ``head``),
and input-gradient detectors (ODIN, Mahalanobis with noise) work unchanged.

* ID: ``num_classes`` tight Gaussian blobs in pixel space (one per class);
* ``ood_near``: a blob at the centroid of the class centres, between the classes, where a
  good classifier is uncertain (logit-based detectors must separate it);
* ``ood_far``: uniform noise over the whole ``[0, 1]^D`` cube, far from every class, where a
  ReLU network extrapolates with high confidence (MSP / energy are weak there; feature-space
  detectors such as Mahalanobis, KNN and ViM must separate it).

Other test files may import :func:`make_toy_problem` and :class:`ToyClassifier`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from oodforge.data.base import ArrayDataset
from oodforge.detectors.base import FitContext
from oodforge.models.base import Classifier
from oodforge.models.featureset import FeatureSet


class ToyClassifier(Classifier):
    """A two-layer ReLU MLP written as 1x1 convolutions, so it honours the Classifier contract.

    Input ``[N, D, 1, 1]`` in ``[0, 1]``; ``feature_map`` is ``[N, hidden, 1, 1]`` (after ReLU, so
    penultimate activations are non-negative as in real CNNs); ``pool`` is then the identity.
    """

    arch = "toy_mlp"

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 32, seed: int = 0):
        super().__init__(num_classes, in_dim, mean=(0.5,) * in_dim, std=(0.1,) * in_dim)
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
                else:
                    p.zero_()


def features_of(model: Classifier, ds: ArrayDataset) -> FeatureSet:
    """One forward pass with the images attached (what ``oodforge.bench`` hands to detectors)."""
    with torch.no_grad():
        out = model.eval().forward_all(ds.float_images())
    return FeatureSet(out.logits.float(), out.penultimate.float(), ds.labels.clone(), images=ds)


@dataclass
class ToyProblem:
    model: ToyClassifier
    id_train: ArrayDataset
    id_test: ArrayDataset
    ood_near: ArrayDataset
    ood_far: ArrayDataset
    train: FeatureSet
    test: FeatureSet
    near: FeatureSet
    far: FeatureSet
    centers: np.ndarray  # class centres in [0, 1] pixel units
    #: held-out ID images (100 per class), drawn from the ID blobs independently of train and test: the toy
    #: problem's validation split (no test row may stand in for it: oodforge.protocol refuses that)
    id_val: ArrayDataset | None = None

    def ctx(self, seed: int = 0) -> FitContext:
        return FitContext(model=self.model, train=self.train, device="cpu", seed=seed)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)[:, :, None, None]


@lru_cache(maxsize=4)
def make_toy_problem(seed: int = 0, dim: int = 8, num_classes: int = 4, n_train: int = 200, n_test: int = 100,
                     n_ood: int = 400, std: float = 0.04, steps: int = 300) -> ToyProblem:
    """Build (and cache per arguments) a toy problem with a trained :class:`ToyClassifier`.

    ``n_train`` / ``n_test`` are per class. Training: full-batch Adam (lr 1e-2, ``steps`` steps)
    on the ID training set, seeded, about a second on one CPU core.
    """
    rng = np.random.default_rng(seed)
    while True:  # class centres well apart (>= 10 std per axis-distance unit)
        centers = rng.uniform(0.3, 0.7, size=(num_classes, dim))
        d = np.linalg.norm(centers[:, None] - centers[None], axis=-1) + np.eye(num_classes)
        if d.min() > 10 * std:
            break

    def blobs(n_per: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(num_classes), n_per)
        return centers[y] + rng.normal(0, std, size=(y.size, dim)), y

    xtr, ytr = blobs(n_train)
    xte, yte = blobs(n_test)
    near = centers.mean(axis=0) + rng.normal(0, std, size=(n_ood, dim))
    far = rng.uniform(0.0, 1.0, size=(n_ood, dim))
    names = [f"class{c}" for c in range(num_classes)]
    id_train = ArrayDataset(_to_uint8(xtr), ytr, names, f"toy{seed}/train")
    id_test = ArrayDataset(_to_uint8(xte), yte, names, f"toy{seed}/test")
    ood_near = ArrayDataset(_to_uint8(near), None, None, f"toy{seed}/near")
    ood_far = ArrayDataset(_to_uint8(far), None, None, f"toy{seed}/far")

    torch.manual_seed(seed)
    model = ToyClassifier(dim, num_classes, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = id_train.float_images(), id_train.labels
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    vrng = np.random.default_rng(seed + 7919)  # its own generator: the other sets stay as they were
    yval = np.repeat(np.arange(num_classes), 100)
    id_val = ArrayDataset(_to_uint8(centers[yval] + vrng.normal(0, std, size=(yval.size, dim))), yval, names,
                          f"toy{seed}/val")
    return ToyProblem(model, id_train, id_test, ood_near, ood_far, features_of(model, id_train),
                      features_of(model, id_test), features_of(model, ood_near), features_of(model, ood_far),
                      centers, id_val)
