"""ODIN: temperature scaling plus a small input perturbation (Liang, Li & Srikant, ICLR 2018), and i-ODIN.

ODIN needs the pixels and one backward pass per image, so it sets ``needs_inputs = True`` and
reads ``FeatureSet.images`` (an :class:`~oodforge.data.base.ArrayDataset` of ``[0, 1]`` images)
plus the classifier from :class:`~oodforge.detectors.base.FitContext`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..models.featureset import FeatureSet
from ..progress import progress_bar
from .base import Detector, FitContext, register

__all__ = ["ODIN", "IODIN", "iter_image_batches", "prepare_model"]


def prepare_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """Move the classifier to ``device`` and put it in eval mode (BatchNorm uses running stats,
    so each image's gradient only depends on that image)."""
    return model.to(device).eval()


def iter_image_batches(images, batch_size: int, device: str, progress: bool, desc: str
                       ) -> Iterator[torch.Tensor]:
    """Yield float ``[0, 1]`` image batches of an ArrayDataset on ``device``, with a progress bar."""
    if not hasattr(images, "float_images"):
        raise TypeError(f"{desc}: FeatureSet.images must be an oodforge ArrayDataset, got {type(images).__name__}")
    if int(batch_size) < 1:
        raise ValueError(f"{desc}: batch_size must be >= 1, got {batch_size}")
    n = len(images)
    for i in progress_bar(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        yield images.float_images(i, i + batch_size).to(device)


@register
class ODIN(Detector):
    """ODIN score ``max_c softmax(f(x~) / T)_c`` with ``x~ = x - eps * sign(-grad_x log S_yhat(x; T))``.

    Sec. 3 of the paper: ``S_i(x; T) = softmax(f(x) / T)_i`` (temperature scaling) and the input
    pre-processing step, which
    moves the input in the direction that *increases* the temperature-scaled softmax score of
    the predicted class ``yhat``. ID inputs react more strongly than OOD inputs, which widens the
    gap. Defaults ``T = 1000`` and ``eps = 0.0014`` are the paper's CIFAR values.

    Units of ``epsilon``: oodforge feeds ``[0, 1]`` pixels and each classifier normalises
    internally, so ``epsilon`` is in ``[0, 1]`` pixel units. The original code perturbed the
    *normalised* input by ``eps / std`` per channel (it divided the sign of the gradient by the
    normalisation std), which is exactly a pixel-space step of ``eps``; the same ``0.0014``
    therefore reproduces it. As in the original, the perturbed image is not clipped to ``[0, 1]``.

    With ``epsilon = 0`` there is no perturbation and the score is temperature scaling alone,
    ``max_c softmax(f(x) / T)_c``, computed from the cached logits (``FeatureSet.logits``, the same
    forward pass) instead of running the images through the classifier again; no images are needed then.
    """

    name = "odin"
    paper = ("Liang, Li, Srikant, Enhancing The Reliability of Out-of-distribution Image Detection in Neural "
             "Networks, ICLR 2018")
    param_ranges = {"temperature": "(0, inf)", "epsilon": "[0, inf)", "batch_size": "[1, inf)"}

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014, batch_size: int = 128,
                 progress: bool = True):
        self.temperature = temperature
        self.epsilon = epsilon
        self.batch_size = batch_size
        self.progress = progress

    @property
    def needs_inputs(self) -> bool:  # type: ignore[override]
        """Only the input pre-processing (``epsilon > 0``) needs pixels and gradients; ``epsilon = 0`` is
        temperature scaling of the cached logits."""
        return float(self.epsilon) > 0

    def _fit(self, ctx: FitContext) -> None:
        self.model_ = ctx.model
        self.device_ = ctx.device

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """Input pre-processing (Sec. 3): one signed-gradient step on ``-log S_yhat(x; T)`` (``x`` in ``[0, 1]`` pixels)."""
        t = float(self.temperature)
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model_(x)
            log_p = torch.log_softmax(logits / t, dim=1)
            yhat = logits.argmax(dim=1, keepdim=True)
            loss = -log_p.gather(1, yhat).sum()  # per-image losses are independent in eval mode
            (grad,) = torch.autograd.grad(loss, x)
        return (x - self.epsilon * torch.sign(grad)).detach()

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        t = float(self.temperature)
        if not self.epsilon > 0:  # x~ = x: the logits of the cached pass
            return torch.softmax(feats.logits.double() / t, dim=1).max(dim=1).values
        model = prepare_model(self.model_, self.device_)
        out = []
        for x in iter_image_batches(feats.images, self.batch_size, self.device_, self.progress, "odin"):
            x_tilde = self.perturb(x)
            with torch.inference_mode():
                out.append(torch.softmax(model(x_tilde).double() / t, dim=1).max(dim=1).values.cpu())
        return torch.cat(out)


@register
class IODIN(ODIN):
    """i-ODIN: ODIN whose input perturbation moves only the single most sensitive input value.

    As ODIN (temperature-scaled softmax, one signed-gradient step on ``-log S_yhat(x; T)``), but the
    step is masked to the one element of the ``C x H x W`` input with the largest absolute gradient
    (Regmi et al.'s i-ODIN, the ``get_mask`` of their OpenOOD implementation; gradients measured in the
    classifier's normalised input space, as there, so the mask is the argmax of ``|grad_x| * std``).
    Defaults ``T = 1000``, ``eps = 0.0014`` (pixel units, as for ODIN), the authors' settings.
    """

    name = "iodin"
    paper = ("Regmi et al., i-ODIN, from ASCOOD (arXiv 2025, github.com/sudarshanregmi/ASCOOD; OpenOOD v1.5's "
             "iodin)")

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        t = float(self.temperature)
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model_(x)
            loss = torch.nn.functional.cross_entropy(logits / t, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        std = getattr(self.model_, "std", None)
        sensitivity = (grad * std if isinstance(std, torch.Tensor) else grad).abs().flatten(1)
        mask = torch.zeros_like(sensitivity).scatter_(1, sensitivity.argmax(dim=1, keepdim=True), 1.0)
        return (x - self.epsilon * torch.sign(grad) * mask.view_as(grad)).detach()
