"""SSOD's training objective (Pei, ICLR 2024, Eq. 14) as a loss of oodforge's one training loop.

Each step (Fig. 3): one forward pass gives the pooled logits (Eq. 11), the per-position
classification logits and the per-position OOD logits (Eq. 13); the sampler (Eq. 12) labels
positions ID / OOD / ignored from the *detached* target-class confidence; the loss is Eq. 14 with
a balance scheme of Table 5. The backbone, ``f_cls`` and ``f_ood`` are optimised together by
:func:`oodforge.models.train.run_training`, the same loop (optimizer, schedule, augmentation,
seeding) that trains the plain classifier: an SSOD-vs-plain comparison changes only the loss.

**The sampler needs a classifier that already classifies.** Eq. 12 labels a position by the
classifier's own confidence in the target class; from a random initialisation those labels are
noise for the first epochs (scenes: 26 % accuracy after one epoch). The paper trains to a
converged classifier; on a CPU we do what its setting amounts to, in two ways:

* ``--init-from PLAIN_CHECKPOINT`` (the zoo's recipe): start from the trained plain classifier
  and fine-tune with the joint loss;
* ``warmup_epochs``: train with the classification loss alone for the first epochs, then add
  the OOD term (``alpha`` is 0 before).

Settings:

* :data:`PAPER_SETTING` (App. A.4): AdamW, lr 1e-4 halved every 30 epochs, batch 256, inputs
  resized to 224 px, alpha 1, gamma 0.95, loss-wise balance;
* :data:`CPU_FINETUNE` (the zoo): the paper's optimiser and lr (AdamW 1e-4) with a cosine decay
  over a few epochs, from the plain checkpoint, inputs at their own size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.base import ArrayDataset
from ..models.train import Objective, StepLoss, TrainConfig, run_training
from .loss import check_balance, ssod_loss
from .model import SSODModel
from .sampler import check_gamma, sample_positions

#: The training setting of App. A.4 (epochs are not stated in the paper; pass them yourself).
PAPER_SETTING = {"optimizer": "adamw", "lr": 1e-4, "schedule": "step", "step_epochs": 30, "batch_size": 256,
                 "input_size": 224, "alpha": 1.0, "gamma": 0.95, "balance": "loss", "weight_decay": 1e-2}

#: Fine-tuning a trained plain classifier with the joint loss on a CPU (the zoo's SSOD models).
CPU_FINETUNE = {"optimizer": "adamw", "lr": 1e-4, "schedule": "cosine", "batch_size": 128, "input_size": None,
                "alpha": 1.0, "gamma": 0.95, "balance": "loss", "weight_decay": 1e-2}

#: Training from scratch on a CPU (the previous default; kept for the ablation benchmark).
CPU_DEFAULT = {"optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "batch_size": 128, "input_size": None,
               "alpha": 1.0, "gamma": 0.95, "balance": "loss", "weight_decay": 1e-2}


class SSODObjective(Objective):
    """Eq. 14: ``CE(y_hat, y) + alpha * CE(y_hat_ood, y_ood)`` with the sampler of Eq. 12.

    Args:
        alpha: weight of the OOD loss (paper: 1.0). ``alpha = 0`` is the control run: the same
            loop, optimiser and data with the OOD term switched off.
        gamma: sampler confidence threshold (paper: 0.95).
        balance: ``"loss"`` (paper), ``"weight"`` or ``"resample"`` (Table 5).
        ood_weight: the loss-weighting factor (``balance="weight"`` only).
        input_size: resize inputs to this size inside the model (App. A.3 uses 224); stored in
            the model, so inference uses it too. ``None`` keeps the model's setting.
        warmup_epochs: epochs of classification loss alone before the OOD term starts.
        seed: seeds the data-resampling draws of ``balance="resample"``.
    """

    name = "ssod"

    def __init__(self, alpha: float = 1.0, gamma: float = 0.95, balance: str = "loss", ood_weight: float = 0.25,
                 input_size: int | Sequence[int] | None = None, warmup_epochs: int = 0, seed: int = 0):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.alpha, self.gamma = alpha, check_gamma(gamma)
        self.balance, self.ood_weight = check_balance(balance), ood_weight
        self.input_size, self.warmup_epochs, self.seed = input_size, warmup_epochs, seed
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.current_alpha = alpha
        self.feature_map_size: tuple[int, int] | None = None

    def bind(self, model, dataset: ArrayDataset, config) -> None:
        if not isinstance(model, SSODModel):
            raise TypeError(f"SSOD trains an SSODModel (build_model('ssod:<arch>', ...)), got {type(model).__name__}")
        if self.input_size is not None:
            model.set_input_size(self.input_size)
        model.set_image_size(dataset.image_shape[1:])

    def start_epoch(self, epoch: int) -> None:
        self.current_alpha = 0.0 if epoch < self.warmup_epochs else self.alpha

    def loss(self, model, x, y, augment) -> StepLoss:
        out = model.forward_ssod(x)
        ood_labels = sample_positions(out.cls_map, y, self.gamma)  # Eq. 12, no gradient
        parts = ssod_loss(out.logits, y, out.ood_map, ood_labels, alpha=self.current_alpha, balance=self.balance,
                          ood_weight=self.ood_weight, generator=self.generator)
        self.feature_map_size = tuple(out.feature_map.shape[-2:])
        return StepLoss(parts.total, out.logits, {"cls_loss": parts.cls.item(), "ood_loss": parts.ood.item()},
                        {"n_id": parts.n_id, "n_ood": parts.n_ood, "positions": ood_labels.numel()})

    def describe(self) -> dict:
        return {"objective": self.name, "alpha": self.alpha, "gamma": self.gamma, "balance": self.balance,
                "ood_weight": self.ood_weight, "input_size": self.input_size, "warmup_epochs": self.warmup_epochs}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


def train_ssod(
    model: SSODModel,
    dataset: ArrayDataset,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    alpha: float = 1.0,
    gamma: float = 0.95,
    balance: str = "loss",
    input_size: int | Sequence[int] | None = None,
    progress: bool = True,
    schedule: str = "cosine",
    step_epochs: int = 30,
    weight_decay: float = 1e-2,
    ood_weight: float = 0.25,
    augment: bool = True,
    max_steps: int | None = None,
    optimizer: str = "adamw",
    warmup_epochs: int = 0,
) -> dict:
    """Train an :class:`SSODModel` with the SSOD objective (Eqs. 11-14) in the shared loop.

    A convenience over ``run_training(model, dataset, SSODObjective(...), TrainConfig(...))``;
    the arguments are those of :class:`SSODObjective` and :class:`~oodforge.models.train.TrainConfig`.

    Returns:
        The loop's history with, per epoch, ``cls_loss``, ``ood_loss``, ``n_id``/``n_ood``
        (positions sampled as ID/OOD by Eq. 12) and ``positions`` (all positions seen); plus
        ``feature_map_size`` (H, W of the map the sampler worked on).
    """
    if not isinstance(model, SSODModel):
        raise TypeError(f"train_ssod trains an SSODModel (build_model('ssod:<arch>', ...)), got {type(model).__name__}")
    objective = SSODObjective(alpha=alpha, gamma=gamma, balance=balance, ood_weight=ood_weight, input_size=input_size,
                              warmup_epochs=warmup_epochs, seed=seed)
    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, schedule=schedule,
                         weight_decay=weight_decay, step_epochs=step_epochs, augment=augment, seed=seed,
                         max_steps=max_steps)
    history = run_training(model, dataset, objective, config, device=device, progress=progress)
    history["feature_map_size"] = objective.feature_map_size
    return history
