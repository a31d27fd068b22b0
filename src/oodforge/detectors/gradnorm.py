"""GradNorm: the norm of the last layer's gradient of a KL divergence to the uniform distribution
(Huang, Geng & Li, NeurIPS 2021), computed in closed form from the cached features.

Derivation. With penultimate vector ``h`` (``D``), head ``z = W h + b`` (``C`` classes),
``p = softmax(z / T)`` and ``u = 1/C``, the loss of the paper (Sec. 3) is
``KL(u || p) = -1/C sum_c log p_c - log C``. Its gradient in the logits is
``dKL/dz_c = (p_c - 1/C) / T`` (because ``d log p_j / dz_c = (delta_jc - p_c) / T``), and
``z = W h + b`` gives ``dKL/dW = outer((p - 1/C) / T, h)``. The L1 norm of an outer product
factorises: ``sum_{c,j} |a_c h_j| = ||a||_1 ||h||_1``. Hence

    S(x) = ||dKL/dW||_1 = (1/T) * ||softmax(z/T) - 1/C||_1 * ||h||_1        (paper Sec. 3, L1 norm)

which needs no backward pass, no images and no model: one vectorised pass over the cached
logits and penultimate vectors. (The paper's code backpropagates per image and reads the
gradient of the last layer's *weight* only, which is exactly this.)
"""

from __future__ import annotations

import torch

from ..models.featureset import FeatureSet
from .base import Detector, register

__all__ = ["GradNorm", "gradnorm_score"]


def gradnorm_score(logits: torch.Tensor, penultimate: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(1/T) ||softmax(z/T) - 1/C||_1 * ||h||_1`` per row (float64); see the module docstring."""
    z = logits.double()
    p = torch.softmax(z / temperature, dim=1)
    return (p - 1.0 / z.shape[1]).abs().sum(dim=1) * penultimate.double().abs().sum(dim=1) / temperature


@register
class GradNorm(Detector):
    """GradNorm score: large gradient norms = confident, ID-like inputs (Huang et al. 2021, Sec. 3).

    ``temperature = 1`` as in the paper. ID inputs have peaked softmax outputs (far from uniform)
    and, for ReLU networks, larger penultimate activations, so both factors grow on ID data.
    """

    name = "gradnorm"
    paper = ("Huang, Geng, Li, On the Importance of Gradients for Detecting Distributional Shifts in the Wild, "
             "NeurIPS 2021")
    param_ranges = {"temperature": "(0, inf)"}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _fit(self, ctx) -> None:  # closed form on the cached logits and features: nothing to fit
        pass

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return gradnorm_score(feats.logits, feats.penultimate, float(self.temperature))
