"""MixOE: mixing ID images with outliers, trained towards soft targets (Zhang, Inkawhich, Linderman, Chen, Li
& Chen, "Mixture Outlier Exposure: Towards Out-of-Distribution Detection in Fine-grained Environments",
WACV 2023, Sec. 3.2).

Each step draws a mixing coefficient ``lam ~ Beta(alpha, alpha)`` (one per batch, as the authors'
``train_mixoe.py``) and mixes the ID batch ``x`` with a batch of outliers ``x_o``:

* ``mixup``:  ``x_mix = lam x + (1 - lam) x_o``;
* ``cutmix``: a box of area ``(1 - lam) H W`` (uniform centre, clipped to the image) of ``x_o`` is
  pasted into ``x``, and ``lam`` becomes the exact ID pixel fraction (pasting the outlier patch into the
  ID image, the authors' choice);

with the soft target ``t = lam * onehot(y) + (1 - lam) * U`` (``U`` uniform over the ``M`` classes)::

    L = CE(f(x), y) + beta * E[ -sum_c t_c log softmax(f(x_mix))_c ]

Defaults (the authors' ``scripts/train.sh``): mixup ``alpha = 1``, cutmix ``alpha = 2``, ``beta = 5``;
``op = "mixup"``. (OpenOOD's ``train_mixoe.yml`` uses cutmix with ``lam ~ Beta(0.1, 1)`` and weight
1.) The paper's outliers are a real auxiliary set (WebVision); oodforge has none, so the outliers
are, by default, the procedural fractal pictures of :mod:`oodforge.recipes.fractals` (the PixMix
pictures, no download) -- or any outlier store (``--outliers``: SHIFT, jigsaw, mixes, ...). The
variant ``source = "classes"`` (ours) takes as "outlier" of each image an ID image of another class
from the same batch, so the targets say: "a mix of two classes is no class". Outliers are augmented
by the loop's crop / flip like the ID batch; every draw (outliers, ``lam``, boxes, partners) comes from
the objective's own seeded ``numpy`` generator, saved with the loop's per-epoch state.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch.nn import functional as F

from ..data.base import ArrayDataset
from ..models.train import Objective, StepLoss

PAPER = ("Zhang et al., Mixture Outlier Exposure: Towards Out-of-Distribution Detection in Fine-grained "
         "Environments, WACV 2023")
MIX_OPS = ("mixup", "cutmix")
DEFAULT_ALPHA = {"mixup": 1.0, "cutmix": 2.0}
BETA = 5.0


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_n -sum_c t_nc log softmax(logits_n)_c``."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)``: a box of side ``sqrt(1 - lam)`` times the image's, uniform centre, clipped."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


def mix_batch(x: torch.Tensor, x_out: torch.Tensor, lam: float, op: str, rng: np.random.Generator
              ) -> tuple[torch.Tensor, float]:
    """The mixed images and the ID fraction ``lam`` (the exact pixel fraction for cutmix)."""
    if op == "mixup":
        return lam * x + (1 - lam) * x_out, lam
    h, w = x.shape[-2:]
    r0, r1, c0, c1 = cutmix_box(h, w, lam, rng)
    mixed = x.clone()
    mixed[:, :, r0:r1, c0:c1] = x_out[:, :, r0:r1, c0:c1]
    return mixed, 1.0 - (r1 - r0) * (c1 - c0) / (h * w)


def other_class_partners(y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """For each image of the batch, a random other image of a *different* class (itself if none)."""
    yy = y.cpu().numpy()
    scores = rng.random((len(yy), len(yy)))
    scores[yy[:, None] == yy[None, :]] = -1.0
    partner = scores.argmax(1)
    alone = scores.max(1) < 0
    partner[alone] = np.arange(len(yy))[alone]
    return torch.from_numpy(partner).to(y.device)


def soft_targets(y: torch.Tensor, num_classes: int, lam: float) -> torch.Tensor:
    """``lam * onehot(y) + (1 - lam) / M``."""
    return lam * F.one_hot(y, num_classes).float() + (1 - lam) / num_classes


class MixOE(Objective):
    """ID cross entropy plus ``beta`` times the soft cross entropy on ID/outlier mixes (Zhang et al. 2023).

    Args:
        outliers: the images mixed in (fractals or an outlier store), shaped like the ID images;
            ``None`` with ``source="classes"``.
        op: ``"mixup"`` or ``"cutmix"``.
        alpha: the Beta parameter (default per ``op``: 1 / 2).
        beta: weight of the mixed term.
        source: ``"outliers"`` (the paper's) or ``"classes"`` (ours, see the module docstring).
        seed: seeds the outlier draws and ``lam``.
    """

    name = "mixoe"

    def __init__(self, outliers: ArrayDataset | None = None, op: str = "mixup", alpha: float | None = None,
                 beta: float = BETA, source: str = "outliers", seed: int = 0):
        if op not in MIX_OPS:
            raise ValueError(f"mixoe op must be one of {', '.join(MIX_OPS)}, got {op!r}")
        if source not in ("outliers", "classes"):
            raise ValueError(f"mixoe source must be 'outliers' or 'classes', got {source!r}")
        if source == "outliers" and (outliers is None or len(outliers) == 0):
            raise ValueError("mixoe needs images to mix in: fractal pictures or an outlier store")
        alpha = DEFAULT_ALPHA[op] if alpha is None else float(alpha)
        if alpha <= 0 or beta < 0:
            raise ValueError(f"mixoe needs alpha > 0 and beta >= 0, got alpha={alpha}, beta={beta}")
        self.outliers = outliers if source == "outliers" else None
        self.op, self.alpha, self.beta, self.source, self.seed = op, alpha, float(beta), source, seed
        self.rng = np.random.default_rng([seed, 11])

    def bind(self, model, dataset: ArrayDataset, config) -> None:
        if self.outliers is not None and self.outliers.image_shape != dataset.image_shape:
            raise ValueError(f"mixoe outliers {self.outliers.identity} are {self.outliers.image_shape} images but the "
                             f"ID training images are {dataset.image_shape}")
        self.num_classes = int(getattr(model, "num_classes", 0) or int(dataset.labels.max()) + 1)

    def _outlier_batch(self, x: torch.Tensor, y: torch.Tensor, augment) -> torch.Tensor:
        if self.source == "classes":
            return x[other_class_partners(y, self.rng)]
        idx = torch.from_numpy(self.rng.integers(len(self.outliers), size=len(x)))
        return augment(self.outliers.images[idx].float().div_(255.0)).to(x.device)

    def loss(self, model, x, y, augment) -> StepLoss:
        x_out = self._outlier_batch(x, y, augment)
        mixed, lam = mix_batch(x, x_out, float(self.rng.beta(self.alpha, self.alpha)), self.op, self.rng)
        if x.is_contiguous(memory_format=torch.channels_last):
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        logits_in = model(x)  # two passes, as the authors' train_mixoe.py
        cls = F.cross_entropy(logits_in, y)
        mix = soft_cross_entropy(model(mixed), soft_targets(y, self.num_classes, lam))
        return StepLoss(cls + self.beta * mix, logits_in, {"cls_loss": cls.item(), "mix_loss": mix.item(),
                                                           "lam": lam})

    def describe(self) -> dict:
        return {"objective": self.name, "op": self.op, "alpha": self.alpha, "beta": self.beta, "source": self.source,
                "outliers": self.outliers.identity if self.outliers is not None else None, "paper": PAPER}

    def state_dict(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = json.loads(state["rng"])
