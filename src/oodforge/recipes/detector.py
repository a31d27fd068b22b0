"""The RotPred score as a registered detector (Hendrycks et al., NeurIPS 2019, Sec. 4.1).

For an image ``x`` with class posterior ``p = softmax(f(x))`` over ``M`` classes and rotation
posteriors ``q_r = softmax(g(rot_r(x)))`` (``r`` = 0, 90, 180, 270 degrees)::

    score(x) = KL(U || p) - (1/4) sum_r KL(e_r || q_r)
             = sum_i (1/M) log2((1/M) / p_i) + (1/4) sum_r log2 q_r[r]

``U`` is the uniform distribution over the classes and ``e_r`` the one-hot rotation label; logs are
base 2, as in the authors' ``test_auxiliary_ood.py`` (which returns the negative, an anomaly score)
and OpenOOD's ``RotPredPostprocessor`` (this sign: higher = more ID). A confident class posterior and
correctly predicted rotations mark ID images. The score needs the images (four forward passes of the
rotated copies) and a model trained with the ``rotpred`` recipe (:class:`RotPredModel`).
"""

from __future__ import annotations

import math

import torch

from ..detectors.base import Detector, FitContext, register
from ..detectors.odin import iter_image_batches, prepare_model
from ..models.featureset import FeatureSet
from .rotpred import N_ROTATIONS, PAPER, RotPredModel, rotations


def rotpred_score(logits: torch.Tensor, rot_logits: torch.Tensor) -> torch.Tensor:
    """The score above from the class logits of ``B`` unrotated images ``[B, M]`` and the rotation
    logits of their four rotations ``[4B, 4]`` (ordered as :func:`~oodforge.recipes.rotpred.rotations`)."""
    b, m = logits.shape
    log2_p = logits.double().log_softmax(dim=1) / math.log(2)
    kl_uniform = (-math.log2(m) - log2_p).mean(dim=1)  # sum_i (1/M) (log2(1/M) - log2 p_i)
    log2_q = rot_logits.double().log_softmax(dim=1) / math.log(2)
    y_rot = torch.arange(N_ROTATIONS, device=rot_logits.device).repeat_interleave(b)
    kl_rot = -log2_q.gather(1, y_rot[:, None]).squeeze(1).view(N_ROTATIONS, b).mean(dim=0)
    return kl_uniform - kl_rot


@register
class RotPredDetector(Detector):
    """``KL(U || p(y|x)) - mean_r KL(e_r || p(r|rot_r x))`` of a RotPred-trained model. Nothing to fit."""

    name = "rotpred"
    paper = PAPER
    param_ranges = {"batch_size": "[1, inf)"}
    needs_inputs = True

    def __init__(self, batch_size: int = 128, progress: bool = True):
        self.batch_size = batch_size
        self.progress = progress

    def _fit(self, ctx: FitContext) -> None:
        if not isinstance(ctx.model, RotPredModel):
            raise ValueError(f"detector 'rotpred' needs a model trained with the rotpred recipe (it has a rotation "
                             f"head); got {type(ctx.model).__name__}. Train one with `oodforge train --method rotpred` "
                             "(its meta.json arch is 'rotpred:<backbone>') and pass its --checkpoint")
        self.model_, self.device_ = ctx.model, ctx.device

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        model = prepare_model(self.model_, self.device_)
        out = []
        with torch.no_grad():
            for x in iter_image_batches(feats.images, self.batch_size, self.device_, self.progress, "rotpred"):
                x_rot, _ = rotations(x)
                o = model.forward_all(x_rot)
                out.append(rotpred_score(o.logits[:len(x)], model.rotation_logits(o.penultimate)).cpu())
        return torch.cat(out)
