"""Norm-constrained cross entropies: LogitNorm (Wei et al., ICML 2022) and T2FNorm (Regmi et al., 2023).

Both keep the plain classifier's architecture: the checkpoint is an ordinary :class:`Classifier`,
so every post-hoc detector (MSP, energy, KNN, ...) scores it unchanged; only the training loss differs.

* **LogitNorm** (Wei, Xie, Cheng, Feng, An & Li, "Mitigating Neural Network Overconfidence with Logit
  Normalization", ICML 2022, Sec. 3.2): the cross entropy of the logits projected onto a sphere of
  radius ``1 / tau``::

      L_LN(f(x), y) = -log( exp(f_y / (tau ||f||)) / sum_k exp(f_k / (tau ||f||)) )

  with ``||f||`` the L2 norm of the logit vector (+ 1e-7 against a zero vector, as the authors' and
  OpenOOD's code). ``tau`` = 0.04, the paper's (and OpenOOD's ``train_logitnorm.yml``) value for
  CIFAR-10. At test time the logits are used as they are.

* **T2FNorm** (Regmi, Panthi, Dotel, Gyawali, Stoyanov & Bhattarai, "T2FNorm: Train-time Feature
  Normalization for OOD Detection in Image Classification", 2023, Sec. 3): the *penultimate feature*
  is mapped to the hypersphere during training only::

      phi(h) = h / (tau ||h||),   logits = W phi(h) + b,   L = CE(logits, y)

  ``tau`` = 0.1 (the paper's and OpenOOD's ``train_t2fnorm.yml``). At test time the network is the
  plain one, ``W h + b`` on the raw feature ("plain at test", the paper's inference). OpenOOD's
  ``T2FNormNet.forward_ood_inference`` additionally divides the raw feature by ``tau`` for models
  trained from scratch (a temperature on the MSP score); oodforge ships the plain network, so any
  post-hoc score reads the same feature a deployed classifier computes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..models.train import Objective, StepLoss

PAPER_LOGITNORM = "Wei et al., Mitigating Neural Network Overconfidence with Logit Normalization, ICML 2022"
PAPER_T2FNORM = "Regmi et al., T2FNorm: Train-time Feature Normalization for OOD Detection, 2023"
LOGITNORM_TAU = 0.04
T2FNORM_TAU = 0.1


def logitnorm_loss(logits: torch.Tensor, y: torch.Tensor, tau: float = LOGITNORM_TAU) -> torch.Tensor:
    """The LogitNorm loss (Wei et al. 2022, Sec. 3.2): cross entropy of ``f / (tau * ||f||)``."""
    norms = logits.norm(p=2, dim=1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / (norms * tau), y)


def t2fnorm_logits(model, x: torch.Tensor, tau: float = T2FNORM_TAU) -> torch.Tensor:
    """Training-time logits of T2FNorm: the head applied to ``h / (tau ||h||)`` (Regmi et al. 2023, Sec. 3)."""
    h = model.pool(model.feature_map(x))
    return model.head(F.normalize(h, dim=1) / tau)


def _check_tau(tau: float) -> float:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return float(tau)


class LogitNorm(Objective):
    """Cross entropy on L2-normalised logits with temperature ``tau`` (Wei et al. 2022)."""

    name = "logitnorm"

    def __init__(self, tau: float = LOGITNORM_TAU):
        self.tau = _check_tau(tau)

    def loss(self, model, x, y, augment) -> StepLoss:
        logits = model(x)
        total = logitnorm_loss(logits, y, self.tau)
        return StepLoss(total, logits, {"cls_loss": total.item(),
                                        "logit_norm": logits.detach().norm(dim=1).mean().item()})

    def describe(self) -> dict:
        return {"objective": self.name, "tau": self.tau, "paper": PAPER_LOGITNORM}


class T2FNorm(Objective):
    """Cross entropy of the head on hyperspherical features ``h / (tau ||h||)`` (Regmi et al. 2023).

    Needs the :class:`~oodforge.models.base.Classifier` stages (``feature_map``, ``pool``, ``head``).
    """

    name = "t2fnorm"

    def __init__(self, tau: float = T2FNORM_TAU):
        self.tau = _check_tau(tau)

    def bind(self, model, dataset, config) -> None:
        if not all(hasattr(model, a) for a in ("feature_map", "pool", "head")):
            raise TypeError(f"T2FNorm normalises the penultimate feature; {type(model).__name__} is not an "
                            "oodforge Classifier (feature_map / pool / head)")

    def loss(self, model, x, y, augment) -> StepLoss:
        logits = t2fnorm_logits(model, x, self.tau)
        total = F.cross_entropy(logits, y)
        return StepLoss(total, logits, {"cls_loss": total.item()})

    def describe(self) -> dict:
        return {"objective": self.name, "tau": self.tau, "paper": PAPER_T2FNORM}
