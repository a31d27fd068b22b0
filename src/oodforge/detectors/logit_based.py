"""Detectors that read only the logits: MSP, MaxLogit and the energy score.

All three need no fitting (``_fit`` only records the model and device) and are computed in
float64 from the cached :class:`~oodforge.models.featureset.FeatureSet` logits, so scoring a
dataset costs one vectorised pass. Higher = more in-distribution, as in the papers.
"""

from __future__ import annotations

import torch

from ..models.featureset import FeatureSet
from .base import Detector, register

__all__ = ["MSP", "MaxLogit", "Energy", "energy_score"]


def energy_score(logits: torch.Tensor, temperature: float = 1.0,
                 dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Negative free energy ``-E(x; T) = T * logsumexp(f(x) / T)`` (Liu et al. 2020, Sec. 2).

    The one energy function of oodforge: computed with the stable ``logsumexp``, in float64 by default
    (detectors: Energy, ReAct, DICE, ViM score with the energy of (modified) logits), or in the logits' own
    dtype with ``dtype=None`` (SynOOD's differentiable energy guidance). Higher = more ID.
    """
    z = logits if dtype is None else logits.to(dtype)
    return temperature * torch.logsumexp(z / temperature, dim=1)


@register
class MSP(Detector):
    """Maximum softmax probability ``max_c softmax(f(x) / T)_c`` (Hendrycks & Gimpel 2017, Sec. 2).

    ``temperature=1`` is the paper's baseline; other values give temperature-scaled MSP (ODIN
    without the input perturbation).
    """

    name = "msp"
    paper = ("Hendrycks & Gimpel, A Baseline for Detecting Misclassified and Out-of-Distribution Examples "
             "in Neural Networks, ICLR 2017")
    param_ranges = {"temperature": "(0, inf)"}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return torch.softmax(feats.logits.double() / float(self.temperature), dim=1).max(dim=1).values


@register
class MaxLogit(Detector):
    """Maximum logit ``max_c f(x)_c`` (Hendrycks et al., Scaling OOD Detection, ICML 2022, Sec. 4).

    Unlike MSP it is not squashed by the softmax normalisation, which helps with many classes.
    """

    name = "maxlogit"
    paper = ("Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song, Scaling Out-of-Distribution "
             "Detection for Real-World Settings, ICML 2022")

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return feats.logits.double().max(dim=1).values


@register
class Energy(Detector):
    """Energy score ``T * logsumexp(f(x) / T)`` = negative free energy (Liu et al. 2020, Sec. 2), ``T = 1``.

    The energy is proportional to the log of the density the classifier implicitly models
    (Sec. 2.2), so unlike MSP it does not saturate for confident inputs.
    """

    name = "energy"
    paper = "Liu, Wang, Owens, Li, Energy-based Out-of-distribution Detection, NeurIPS 2020"
    param_ranges = {"temperature": "(0, inf)"}

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return energy_score(feats.logits, float(self.temperature))
