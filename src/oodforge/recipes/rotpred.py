"""RotPred: a 4-way rotation head trained beside the classifier (Hendrycks, Mazeika, Kadavath & Song,
"Using Self-Supervised Learning Can Improve Model Robustness and Uncertainty", NeurIPS 2019, Sec. 4).

Training (Sec. 4.1 "multi-class OOD detection"; the authors' ``multiclass_ood/train_auxiliary.py`` and
OpenOOD's ``RotPredTrainer``): every ID image ``x`` is rotated by ``r in {0, 90, 180, 270}`` degrees;
one pass over the four copies gives the class logits of the unrotated copy and the rotation logits of
all four, and::

    L = CE(f(x), y) + lambda * (1/4) sum_r CE(g(rot_r(x)), r),   lambda = 1

``g`` is a linear head on the penultimate feature (``rot_head = Linear(C, 4)``). ``lambda = 1`` is
OpenOOD's weight and the authors' released snapshot's (``--rot-loss-weight 3`` divided by the three
auxiliary tasks, of which the two translation heads have weight 0 for multi-class OOD).

The score (Sec. 4.1; the authors' ``test_auxiliary_ood.py``, OpenOOD's ``RotPredPostprocessor``) is
in :mod:`oodforge.recipes.detector`. The model is :class:`RotPredModel`, architecture
``"rotpred:<backbone>"``: a Classifier whose class head is the backbone's, so every post-hoc detector
runs on it too, and which ``models.build_model`` rebuilds through the ``oodforge.model_wrappers``
entry point.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..models.base import Classifier, ExtraHeadModel
from ..models.train import Objective, StepLoss

PAPER = ("Hendrycks, Mazeika, Kadavath, Song, Using Self-Supervised Learning Can Improve Model Robustness and "
         "Uncertainty, NeurIPS 2019")
ROT_LAMBDA = 1.0
N_ROTATIONS = 4


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, H, W]`` -> the four copies rotated by 0, 90, 180, 270 degrees ``[4B, ...]`` and their labels."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation prediction needs square images, got {tuple(x.shape[-2:])}")
    x_rot = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(N_ROTATIONS)])
    y_rot = torch.arange(N_ROTATIONS, device=x.device).repeat_interleave(len(x))
    return x_rot, y_rot


class RotPredModel(ExtraHeadModel):
    """A backbone :class:`Classifier` plus the rotation head ``g`` of RotPred (``Linear(C, 4)``).

    The Classifier stages delegate to the backbone (its normalisation, feature map and class head),
    so the logits are the backbone's; :meth:`rotation_logits` reads the extra head.
    """

    def __init__(self, backbone: Classifier) -> None:
        self._wrap(backbone, "rotpred")
        self.rot_head = nn.Linear(backbone.feature_dim, N_ROTATIONS)

    def rotation_logits(self, penultimate: torch.Tensor) -> torch.Tensor:
        """``g(h)``: rotation logits ``[N, 4]`` from penultimate features."""
        return self.rot_head(penultimate)


class RotPred(Objective):
    """Cross entropy plus ``lambda`` times the rotation-prediction cross entropy (Hendrycks et al. 2019)."""

    name = "rotpred"

    def __init__(self, rot_lambda: float = ROT_LAMBDA):
        if rot_lambda < 0:
            raise ValueError(f"rot_lambda must be >= 0, got {rot_lambda}")
        self.rot_lambda = float(rot_lambda)

    def bind(self, model, dataset, config) -> None:
        if not isinstance(model, RotPredModel):
            raise TypeError(f"rotpred trains a RotPredModel (architecture 'rotpred:<backbone>'), got "
                            f"{type(model).__name__}")
        h, w = dataset.image_shape[1:]
        if h != w:
            raise ValueError(f"rotpred rotates images by 90 degrees; {dataset.identity} has {h}x{w} images "
                             "(use square images, e.g. --image-size)")

    def loss(self, model, x, y, augment) -> StepLoss:
        x_rot, y_rot = rotations(x)
        if x.is_contiguous(memory_format=torch.channels_last):
            x_rot = x_rot.contiguous(memory_format=torch.channels_last)
        out = model.forward_all(x_rot)
        logits = out.logits[:len(x)]
        cls = F.cross_entropy(logits, y)
        rot = F.cross_entropy(model.rotation_logits(out.penultimate), y_rot)
        return StepLoss(cls + self.rot_lambda * rot, logits, {"cls_loss": cls.item(), "rot_loss": rot.item()})

    def describe(self) -> dict:
        return {"objective": self.name, "rot_lambda": self.rot_lambda, "paper": PAPER}
