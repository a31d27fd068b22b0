"""The energy-score loss that steers SynOOD's generation (Eq. 7) and the boundary refinement.

Energy score (Liu et al., NeurIPS 2020): ``S(x) = tau * logsumexp(g(x) / tau)`` -- the negative free
energy, higher = more in-distribution (our score convention). SynOOD Eq. 7 defines the OOD loss

    L^O = m_out - tau * log sum_i exp(g_i(x_syn) / tau) = m_out - S(x),

where ``m_out`` is the OOD threshold of the score. Minimising it raises the score of an image that
lies on the OOD side (``S < m_out``) towards the threshold, i.e. moves it to the ID/OOD boundary.
Three forms are offered (``form``):

* ``"hinge"`` (default): ``max(0, m_out - S)`` -- Eq. 7 on the OOD side and zero once the boundary is
  reached, so an outlier approaches the boundary from the OOD side and never crosses into ID;
* ``"linear"``: Eq. 7 exactly as printed (unbounded: keeps pushing towards ID);
* ``"squared"``: ``(m_out - S)^2`` -- pulls to the boundary from either side (the authors' code uses a
  squared energy target).

Classifiers see the images at their own resolution and channel count: :func:`logit_fn` wraps an
oodforge :class:`~oodforge.models.base.Classifier` (or any callable ``images -> logits``) so that RGB
``[0, 1]`` images of any size are resized (bilinear, antialiased) and converted to gray when needed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import luma
from ..detectors.logit_based import energy_score as shared_energy_score

LOSS_FORMS = ("hinge", "linear", "squared")


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``S(x) = T * logsumexp(logits / T)`` per sample in the logits' dtype, differentiable (higher = more ID)."""
    return shared_energy_score(logits, temperature, dtype=None)


def energy_loss(logits: torch.Tensor, m_out: float, temperature: float = 1.0, form: str = "hinge",
                reduction: str = "mean") -> torch.Tensor:
    """SynOOD Eq. 7, ``L^O = m_out - S(x)``, in the chosen ``form`` (see module doc)."""
    gap = m_out - energy_score(logits, temperature)
    if form == "hinge":
        loss = F.relu(gap)
    elif form == "linear":
        loss = gap
    elif form == "squared":
        loss = gap.pow(2)
    else:
        raise ValueError(f"energy loss form must be one of {LOSS_FORMS}, got {form!r}")
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def adapt_images(x: torch.Tensor, in_channels: int | None, size: tuple[int, int] | None) -> torch.Tensor:
    """Differentiably convert ``[N, C, H, W]`` images in [0, 1] to ``in_channels`` channels and ``size``."""
    if in_channels is not None and x.shape[1] != in_channels:
        if in_channels == 1:
            x = luma(x[:, :3], axis=1).unsqueeze(1) if x.shape[1] >= 3 else x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.repeat(1, in_channels, 1, 1)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to {in_channels} channels")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size[-1])
    return x


def logit_fn(classifier: Callable[[torch.Tensor], torch.Tensor], in_channels: int | None = None,
             image_size: tuple[int, int] | int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images [N, C, H, W] in [0, 1] -> logits`` for an oodforge Classifier or any callable.

    For a Classifier the channel count is read from ``classifier.in_channels``; ``image_size`` is the
    resolution it was trained at (e.g. 28 for Fashion-MNIST). When neither is given, images are passed
    through unchanged.
    """
    if in_channels is None:
        in_channels = getattr(classifier, "in_channels", None)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return classifier(adapt_images(x, in_channels, image_size))

    fn.classifier = classifier  # type: ignore[attr-defined]
    return fn


@torch.no_grad()
def energy_scores(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, temperature: float = 1.0,
                  batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """Energy scores of float images ``[N, C, H, W]`` in [0, 1] (or an ArrayDataset)."""
    from ..data.base import ArrayDataset

    out = []
    n = len(images)
    for i in range(0, n, batch_size):
        x = images.float_images(i, i + batch_size) if isinstance(images, ArrayDataset) else images[i:i + batch_size]
        out.append(energy_score(fn(x.to(device)).float(), temperature).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def default_m_out(fn: Callable[[torch.Tensor], torch.Tensor], id_images, percentile: float = 5.0,
                  temperature: float = 1.0, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """The OOD threshold ``m_out`` of Eq. 7 from ID data: the ``percentile``-th percentile of ID energy scores.

    With the default 5 this is the threshold that accepts 95 % of ID images (the FPR95 operating point),
    so an outlier pushed to ``m_out`` sits exactly on the detector's ID/OOD boundary.
    """
    s = energy_scores(fn, id_images, temperature, batch_size, device)
    if s.size == 0:
        raise ValueError("default_m_out: no ID images given")
    return float(np.percentile(s, percentile))


__all__ = ["energy_score", "energy_loss", "adapt_images", "logit_fn", "energy_scores", "default_m_out",
           "LOSS_FORMS"]
