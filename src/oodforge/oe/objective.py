"""Outlier exposure (OE) losses as an objective of oodforge's one training loop.

The classifier is fine-tuned on ID images plus a stream of *forged* outliers (any outlier store:
SHIFT's CPU or GPU forger, SynOOD, energy-refined), with one of two outlier terms:

* ``"oe"`` -- Hendrycks, Mazeika & Dietterich, ICLR 2019 (Sec. 3, Eq. 1 with the cross entropy to
  the uniform distribution of Sec. 4.2.1)::

      L = CE(f(x), y) + lambda * E_x_out[ -1/M * sum_c log softmax(f(x_out))_c ],   lambda = 0.5

* ``"energy"`` -- Liu, Wang, Owens & Li, NeurIPS 2020 (Eq. 9, the energy-bounded hinge)::

      L = CE(f(x), y) + lambda * ( E_x_in[max(0, E(x_in) - m_in)^2] + E_x_out[max(0, m_out - E(x_out))^2] ),
      E(x) = -logsumexp(f(x)),  lambda = 0.1

  The paper's margins (m_in = -25, m_out = -7) were chosen for a WRN-40-2 on CIFAR-10, whose
  energies live on another scale than a small ResNet's on 28 px images. The default ``m_in =
  m_out = None`` ("auto") sets them from the *initial* classifier before fine-tuning, from ID
  training images and training outliers only: ``m_in`` = the median ID energy (the hinge pulls
  the upper half of ID down), ``m_out`` = the median outlier energy, raised to at least ``m_in
  + 1`` (the hinge pushes the outliers up to there). Explicit values override.

ID and outlier images go through the network in one concatenated batch (as the OE reference code
does, so batch-norm statistics see both); outliers are drawn without replacement from the store
(reshuffled when exhausted) with the objective's own seeded generator and augmented like the ID
batch. ``outlier_batch_ratio`` = outliers per ID image in a step (the OE paper uses 2; the CPU
default 1 keeps a step 2x, not 3x, the cost of plain training).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data.base import ArrayDataset
from ..models.train import Objective, StepLoss

OE_LOSSES = ("oe", "energy")
DEFAULT_LAMBDA = {"oe": 0.5, "energy": 0.1}


def uniform_ce_loss(logits_out: torch.Tensor) -> torch.Tensor:
    """Cross entropy from the softmax of ``logits_out`` [N, M] to the uniform distribution (OE)."""
    return -(logits_out.log_softmax(dim=1).mean(dim=1)).mean()


def free_energy(logits: torch.Tensor) -> torch.Tensor:
    """``E(x) = -logsumexp(f(x))`` (Liu et al. 2020, Eq. 5 at T = 1); lower = more ID."""
    return -torch.logsumexp(logits, dim=1)


def energy_margin_loss(logits_in: torch.Tensor, logits_out: torch.Tensor, m_in: float, m_out: float) -> torch.Tensor:
    """The squared-hinge energy regulariser of Liu et al. 2020, Eq. 9."""
    e_in, e_out = free_energy(logits_in), free_energy(logits_out)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


class OutlierExposure(Objective):
    """ID cross entropy plus an outlier term on forged outliers (Hendrycks 2019 / Liu 2020).

    Args:
        outliers: the forged outliers (uint8 images shaped like the ID images; labels ignored).
        loss: ``"oe"`` (uniform cross entropy) or ``"energy"`` (energy-bounded hinge).
        lam: weight of the outlier term (default: 0.5 for ``oe``, 0.1 for ``energy``, the papers').
        m_in, m_out: energy margins (``energy`` only); ``None`` = set from the initial model (see
            the module docstring).
        outlier_batch_ratio: outliers per ID image in each step.
        seed: seeds the outlier sampling.
    """

    name = "oe"

    def __init__(self, outliers: ArrayDataset, loss: str = "oe", lam: float | None = None,
                 m_in: float | None = None, m_out: float | None = None, outlier_batch_ratio: float = 1.0,
                 seed: int = 0):
        if loss not in OE_LOSSES:
            raise ValueError(f"outlier loss must be one of {', '.join(OE_LOSSES)}, got {loss!r}")
        if len(outliers) == 0:
            raise ValueError(f"outlier set {outliers.identity} is empty: forge outliers first (oodforge synth shift)")
        if lam is not None and lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        if outlier_batch_ratio <= 0:
            raise ValueError(f"outlier_batch_ratio must be > 0, got {outlier_batch_ratio}")
        self.outliers, self.loss_kind = outliers, loss
        self.lam = DEFAULT_LAMBDA[loss] if lam is None else float(lam)
        self.m_in, self.m_out = m_in, m_out
        self.ratio, self.seed = outlier_batch_ratio, seed
        self.generator = torch.Generator().manual_seed(seed + 2)
        self._order = torch.empty(0, dtype=torch.int64)
        self._pos = 0
        self.name = f"oe-{loss}" if loss != "oe" else "oe"

    def bind(self, model, dataset: ArrayDataset, config) -> None:
        if self.outliers.image_shape != dataset.image_shape:
            raise ValueError(f"outliers {self.outliers.identity} are {self.outliers.image_shape} images but the ID "
                             f"training images are {dataset.image_shape}; forge them from this suite's images")
        if self.loss_kind == "energy" and (self.m_in is None or self.m_out is None):
            self._auto_margins(model, dataset)

    @torch.no_grad()
    def _auto_margins(self, model, dataset: ArrayDataset, n: int = 2000) -> None:
        g = torch.Generator().manual_seed(self.seed + 3)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        e = []
        for ds in (dataset, self.outliers):
            idx = torch.randperm(len(ds), generator=g)[:n]
            x = ds.images[idx].float().div_(255.0).to(device)
            e.append(free_energy(torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)])).median().item())
        model.train(was_training)
        if self.m_in is None:
            self.m_in = round(e[0], 3)
        if self.m_out is None:
            self.m_out = round(max(e[1], self.m_in + 1.0), 3)

    def _draw(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self._pos >= len(self._order):
                self._order, self._pos = torch.randperm(len(self.outliers), generator=self.generator), 0
            take = self._order[self._pos:self._pos + n]
            self._pos += len(take)
            n -= len(take)
            out.append(take)
        return torch.cat(out)

    def loss(self, model, x, y, augment) -> StepLoss:
        n_out = max(1, int(round(self.ratio * len(x))))
        x_out = augment(self.outliers.images[self._draw(n_out)].float().div_(255.0)).to(x.device)
        x_out = x_out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) else x_out
        logits = model(torch.cat([x, x_out]))
        logits_in, logits_out = logits[:len(x)], logits[len(x):]
        cls = F.cross_entropy(logits_in, y)
        if self.loss_kind == "oe":
            aux = uniform_ce_loss(logits_out)
        else:
            aux = energy_margin_loss(logits_in, logits_out, self.m_in, self.m_out)
        return StepLoss(cls + self.lam * aux, logits_in, {"cls_loss": cls.item(), "outlier_loss": aux.item()})

    def describe(self) -> dict:
        return {"objective": "oe", "loss": self.loss_kind, "lambda": self.lam, "m_in": self.m_in,
                "m_out": self.m_out, "outlier_batch_ratio": self.ratio, "outliers": self.outliers.identity,
                "n_outliers": len(self.outliers)}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order, "pos": self._pos,
                "m_in": self.m_in, "m_out": self.m_out}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
            self._order, self._pos = state["order"], int(state["pos"])
            self.m_in, self.m_out = state["m_in"], state["m_out"]
