"""SSOD detectors: the trained OOD head's P(ID|x) (Eq. 15) and the combined posterior (Eq. 7).

Both read only ``FeatureSet.penultimate`` (= ``GAP(X)``) and ``FeatureSet.logits`` of an
:class:`~oodforge.ssod.model.SSODModel`, so they cost no extra forward pass:

* ``ssod``: ``P(x in S_ID | x) = softmax(f_ood(GAP(X)))[:, 1]``, Eq. 15 (the paper's score);
* ``ssod-combined``: ``max_i P(w_i | x)`` with ``P(w_i|x) = P(w_i | x in S_ID, x) * P(x in S_ID|x)``,
  Eq. 7 -- the max-softmax (ID factor) times the OOD factor. :func:`combined_posterior` gives the
  whole ``[N, M + 1]`` posterior (last column: ``P(w_{M+1}|x) = 1 - P(x in S_ID|x)``).

Scores are computed in float64; higher = more in-distribution.
"""

from __future__ import annotations

import torch

from ..detectors.base import Detector, FitContext, register
from ..models.featureset import FeatureSet
from .model import SSODModel

PAPER = "Pei, Image Background Serves as Good Proxy for Out-of-distribution Data, ICLR 2024"


def _require_ssod(model: torch.nn.Module, who: str) -> SSODModel:
    if not isinstance(model, SSODModel):
        raise ValueError(f"{who} needs a model trained with SSOD (it has an OOD head); got "
                         f"{type(model).__name__}. Pass --checkpoint of an SSOD-trained model "
                         "(its meta.json arch is 'ssod:<backbone>', trained by oodforge.ssod.train.train_ssod)")
    return model


@torch.no_grad()
def id_probability(model: SSODModel, feats: FeatureSet) -> torch.Tensor:
    """``P(x in S_ID | x)`` of Eq. 15 for every image of ``feats`` (float64, ``[N]``)."""
    return _require_ssod(model, "id_probability").id_probability(feats.penultimate.double())


@torch.no_grad()
def combined_posterior(model: SSODModel, feats: FeatureSet) -> torch.Tensor:
    """The posterior of Eq. 7 over the ``M`` ID classes plus "OOD" (``[N, M + 1]``, float64).

    ``P(w_i|x) = softmax(logits)_i * P(x in S_ID|x)`` for ``i <= M`` (ID factor times OOD factor)
    and ``P(w_{M+1}|x) = 1 - P(x in S_ID|x)``; each row sums to 1.
    """
    p_id = id_probability(model, feats)
    p_cls = feats.logits.double().softmax(dim=1)
    return torch.cat([p_cls * p_id[:, None], (1.0 - p_id)[:, None]], dim=1)


@register
class SSODDetector(Detector):
    """P(ID|x) from the OOD head of an SSOD-trained model (Eq. 15). Nothing to fit."""

    name = "ssod"
    paper = PAPER

    def _fit(self, ctx: FitContext) -> None:
        self.model_ = _require_ssod(ctx.model, "detector 'ssod'")

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return id_probability(self.model_, feats)


@register
class SSODCombinedDetector(Detector):
    """``max_i P(w_i|x)`` of Eq. 7: max-softmax times the SSOD OOD factor. Nothing to fit."""

    name = "ssod-combined"
    paper = PAPER

    def _fit(self, ctx: FitContext) -> None:
        self.model_ = _require_ssod(ctx.model, "detector 'ssod-combined'")

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        return combined_posterior(self.model_, feats)[:, :-1].max(dim=1).values
