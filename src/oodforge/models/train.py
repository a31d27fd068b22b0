"""The one training loop of oodforge: plain cross-entropy, SSOD and outlier exposure all run here.

A training run is ``run_training(model, dataset, objective, config)``:

* :class:`TrainConfig` holds everything that is not the loss: optimizer (SGD with Nesterov
  momentum, or AdamW), learning-rate schedule (one-cycle, cosine, step, constant), batch size,
  augmentation (random crop with zero padding, horizontal flip where it is label-safe), seed,
  ``channels_last`` memory format (about 1.3x faster on a CPU, same numbers up to rounding).
* an :class:`Objective` is the loss hook: given a batch it returns the loss to minimise, the
  logits (for the running accuracy) and numbers to log. :class:`CrossEntropy` is the plain
  classifier; ``oodforge.ssod.objective.SSODObjective`` (Eq. 14 of Pei 2024) and
  ``oodforge.oe.objective.OutlierExposure`` (Hendrycks et al. 2019; Liu et al. 2020) and the
  no-outlier recipes of ``oodforge.recipes`` (LogitNorm, T2FNorm, RotPred, MixOE) are the
  others. A comparison "SSOD vs plain" or "OE vs plain" therefore changes only the loss.
* a :class:`BatchTransform` is the augmentation hook (PixMix); :class:`Augmented` composes one
  with any objective, so "LogitNorm + PixMix" is ``Augmented(LogitNorm(), PixMix(...))``.

Every random draw (shuffling, augmentation, an objective's own sampling) comes from generators
seeded by ``config.seed``; with ``state_dir`` the loop writes an atomic per-epoch state
(``train_state.pt``: weights, optimizer, generators, history), so a killed run resumes at its last
finished epoch and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.base import ArrayDataset
from ..progress import note_resume, progress_bar
from .base import Classifier

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
STATE_FILE = "train_state.pt"


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's and numpy's global generators; return a fresh generator seeded with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip (when ``flip``) + random crop with zero padding (the CIFAR augmentation)."""
    n, _, h, w = x.shape
    if flip:
        do_flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(do_flip.view(-1, 1, 1, 1), x.flip(3), x)
    if pad <= 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy.view(-1, 1) + torch.arange(h).view(1, -1))  # [n, h]
    cols = (dx.view(-1, 1) + torch.arange(w).view(1, -1))  # [n, w]
    idx_n = torch.arange(n).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def iterate_batches(dataset: ArrayDataset, batch_size: int, g: torch.Generator | None = None):
    """Yield ``(float images in [0,1], labels)``; shuffled when a generator is given."""
    n = len(dataset)
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield dataset.images[idx].float().div_(255.0), dataset.labels[idx]


@dataclass
class TrainConfig:
    """Everything about a training run except the loss.

    ``lr`` is the peak learning rate. Schedules, per optimiser step ``t`` of ``T``:
    ``onecycle`` rises linearly from ``lr/25`` to ``lr`` over the first ``pct_start`` of the steps,
    then follows a cosine to ``lr/25e4`` (Smith & Topin 2019, torch's OneCycleLR shape);
    ``cosine`` decays from ``lr`` to 0; ``step`` halves every ``step_epochs`` epochs (SSOD App.
    A.4); ``constant`` keeps ``lr``. ``max_steps`` stops early (smoke tests).
    """

    epochs: int = 4
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    weight_decay: float = 5e-4
    pct_start: float = 0.15
    step_epochs: int = 30
    augment: bool = True
    flip: bool = True
    pad: int = 2
    seed: int = 0
    channels_last: bool = True
    max_steps: int | None = None

    def validate(self) -> TrainConfig:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got batch_size={self.batch_size}, lr={self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {self.pct_start}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        return self


def lr_factor(config: TrainConfig, step: int, total_steps: int, epoch: int) -> float:
    """The multiplier of ``config.lr`` at optimiser step ``step`` (0-based) of ``total_steps``."""
    s = config.schedule
    if s == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    if s == "step":
        return 0.5 ** (epoch // config.step_epochs)
    if s == "onecycle":
        warm = max(1, int(config.pct_start * total_steps))
        start, end = 1 / 25, 1 / 25e4
        if step < warm:
            return start + (1 - start) * step / warm
        t = (step - warm) / max(total_steps - warm, 1)
        return end + (1 - end) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return 1.0


@dataclass
class StepLoss:
    """What an objective returns for one batch."""

    total: torch.Tensor  # the scalar to minimise
    logits: torch.Tensor  # [B, M] class logits of the ID images (running accuracy)
    logs: dict[str, float] = field(default_factory=dict)  # per-batch means, averaged over the epoch
    counts: dict[str, int] = field(default_factory=dict)  # per-batch counts, summed over the epoch


class Objective:
    """The loss hook of :func:`run_training`.

    Subclasses implement :meth:`loss`; :meth:`bind` validates the model and data before the first
    step and may prepare the model; :meth:`start_epoch` lets a loss change with the epoch (SSOD's
    warm-up); :meth:`state_dict` / :meth:`load_state_dict` carry an objective's own random state
    across a resumed run; :meth:`describe` goes into the checkpoint's metadata.
    """

    name = "objective"

    def bind(self, model: nn.Module, dataset: ArrayDataset, config: TrainConfig) -> None:  # noqa: B027
        """Check the model and data fit this loss (raise ``ValueError``/``TypeError``)."""

    def start_epoch(self, epoch: int) -> None:  # noqa: B027
        """Called before each epoch (0-based)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, augment) -> StepLoss:
        """The loss of one batch of ID images ``x`` (already augmented) with labels ``y``.

        ``augment`` is the loop's augmentation function (``images -> images``, seeded), for
        objectives that draw extra images (outliers) that should be augmented the same way.
        """
        raise NotImplementedError

    def describe(self) -> dict:
        return {"objective": self.name}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027
        pass


class BatchTransform:
    """A seeded data augmentation applied to a whole batch inside the loop (after crop / flip).

    The hook for augmentations that mix images (PixMix); they compose with any loss through
    :class:`Augmented`. :meth:`__call__` maps ``(images in [0, 1], labels) -> images``; the random
    state travels across a resumed run through :meth:`state_dict` / :meth:`load_state_dict`, and
    :meth:`describe` goes into the checkpoint's metadata.
    """

    name = "transform"

    def bind(self, dataset: ArrayDataset) -> None:  # noqa: B027
        """Check the data fit this transform (raise ``ValueError``)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"transform": self.name}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027
        pass


class Augmented(Objective):
    """``objective`` on batches first passed through ``transform``: an augmentation composed with a loss.

    The loop's crop / flip runs first (as in the PixMix reference code, whose base transform precedes
    the mixing), then ``transform``, then the loss (so RotPred rotates mixed images, as OpenOOD's
    RotPred + PixMix does). ``augment`` (the loop's crop / flip) is passed on unchanged.
    """

    def __init__(self, objective: Objective, transform: BatchTransform):
        self.inner, self.transform = objective, transform
        self.name = f"{objective.name}+{transform.name}"

    def bind(self, model, dataset, config) -> None:
        self.transform.bind(dataset)
        self.inner.bind(model, dataset, config)

    def start_epoch(self, epoch: int) -> None:
        self.inner.start_epoch(epoch)

    def loss(self, model, x, y, augment) -> StepLoss:
        mixed = self.transform(x, y)
        if x.is_contiguous(memory_format=torch.channels_last):
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        return self.inner.loss(model, mixed, y, augment)

    def describe(self) -> dict:
        return {**self.inner.describe(), "augmentation": self.transform.describe()}

    def state_dict(self) -> dict:
        return {"objective": self.inner.state_dict(), "transform": self.transform.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.inner.load_state_dict(state.get("objective", {}))
            self.transform.load_state_dict(state.get("transform", {}))


class CrossEntropy(Objective):
    """The plain classifier: ``CE(f(x), y)``."""

    name = "ce"

    def loss(self, model, x, y, augment) -> StepLoss:
        logits = model(x)
        total = F.cross_entropy(logits, y)
        return StepLoss(total, logits, {"cls_loss": total.item()})


def check_training_data(model: nn.Module, dataset: ArrayDataset) -> None:
    """Refuse data a classifier cannot be trained on, naming the dataset and what to do."""
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.identity} is empty; training needs labelled images")
    if (dataset.labels < 0).any():
        raise ValueError(f"dataset {dataset.identity} has unlabelled images; training needs labels")
    in_channels = getattr(model, "in_channels", None)
    if in_channels is not None and dataset.image_shape[0] != in_channels:
        raise ValueError(f"dataset {dataset.identity} has {dataset.image_shape[0]} channels, the model expects "
                         f"{in_channels}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and int(dataset.labels.max()) >= num_classes:
        raise ValueError(f"dataset {dataset.identity} has label {int(dataset.labels.max())} but the model has "
                         f"{num_classes} classes")


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                           weight_decay=config.weight_decay)


def _save_state(state_dir: Path, payload: dict) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (STATE_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, state_dir / STATE_FILE)


def _load_state(state_dir: Path, fingerprint: dict) -> dict | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, do not guess
        raise ValueError(f"cannot resume from {path} ({type(e).__name__}: {e}); delete it to train from "
                         "scratch") from None
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} belongs to another training run (different settings or data); delete it or "
                         "choose another output folder")
    return state


def run_training(model: nn.Module, dataset: ArrayDataset, objective: Objective | None = None,
                 config: TrainConfig | None = None, device: str = "cpu", progress: bool = True,
                 state_dir: str | Path | None = None, log=None) -> dict:
    """Train ``model`` in place on ``dataset`` with ``objective`` (default: cross-entropy).

    Returns the history: per-epoch lists ``loss``, ``accuracy`` (running, on augmented training
    batches), ``lr`` (at epoch end), ``seconds``, plus every key the objective logs; ``config``
    and ``objective`` describe the run. With ``state_dir``, resumes from (and writes) the
    per-epoch state there; the state file is removed when training completes.
    """
    objective = objective or CrossEntropy()
    config = (config or TrainConfig()).validate()
    check_training_data(model, dataset)
    objective.bind(model, dataset, config)
    g = seed_everything(config.seed)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(model, config)
    n_batches = (len(dataset) + config.batch_size - 1) // config.batch_size
    total_steps = config.epochs * n_batches if config.max_steps is None else min(config.max_steps,
                                                                                  config.epochs * n_batches)
    history: dict = {"loss": [], "accuracy": [], "lr": [], "seconds": []}
    step, start_epoch = 0, 0
    fingerprint = {"config": asdict(config), "objective": objective.describe(), "data": dataset.identity,
                   "n": len(dataset)}
    state_dir = Path(state_dir) if state_dir is not None else None
    if state_dir is not None:
        note_resume(f"the training state after each finished epoch ({state_dir / STATE_FILE})")
    if state_dir is not None and (state := _load_state(state_dir, fingerprint)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        objective.load_state_dict(state["objective"])
        history, step, start_epoch = state["history"], state["step"], state["epoch"]
        if log:
            log(f"resuming from {state_dir / STATE_FILE} after epoch {start_epoch}/{config.epochs}")

    def augment(images: torch.Tensor) -> torch.Tensor:
        return augment_batch(images, g, config.pad, config.flip) if config.augment else images

    for epoch in range(start_epoch, config.epochs):
        if step >= total_steps:
            break
        model.train()
        objective.start_epoch(epoch)
        t0, seen, correct, loss_sum = time.time(), 0, 0, 0.0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bar = progress_bar(iterate_batches(dataset, config.batch_size, g), total=n_batches,
                   desc=f"{objective.name} {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            if step >= total_steps:
                break
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(config, step, total_steps, epoch)
            x = augment(x)
            x, y = x.to(device), y.to(device)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            parts = objective.loss(model, x, y, augment)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            step += 1
            b = len(y)
            seen += b
            loss_sum += parts.total.item() * b
            correct += int((parts.logits.argmax(1) == y).sum())
            for k, v in parts.logs.items():
                sums[k] = sums.get(k, 0.0) + v * b
            for k, v in parts.counts.items():
                counts[k] = counts.get(k, 0) + int(v)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        history["loss"].append(loss_sum / max(seen, 1))
        history["accuracy"].append(correct / max(seen, 1))
        history["lr"].append(opt.param_groups[0]["lr"])
        history["seconds"].append(round(time.time() - t0, 2))
        for k, v in sums.items():
            history.setdefault(k, []).append(v / max(seen, 1))
        for k, v in counts.items():
            history.setdefault(k, []).append(v)
        if log:
            log(f"  epoch {epoch + 1}/{config.epochs}: loss {history['loss'][-1]:.4f}, "
                f"train acc {100 * history['accuracy'][-1]:.2f} %, {history['seconds'][-1]:.0f} s")
        if state_dir is not None and epoch + 1 < config.epochs:
            _save_state(state_dir, {"fingerprint": fingerprint, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "generator": g.get_state(),
                                    "objective": objective.state_dict(), "history": history, "step": step,
                                    "epoch": epoch + 1})
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    if state_dir is not None and (state_dir / STATE_FILE).is_file():
        (state_dir / STATE_FILE).unlink()
    history["config"] = asdict(config)
    history["objective"] = objective.describe()
    return history


def train_classifier(model: Classifier, dataset: ArrayDataset, epochs: int = 5, lr: float = 0.05,
                     batch_size: int = 128, seed: int = 0, device: str = "cpu", augment: bool = True,
                     weight_decay: float = 5e-4, progress: bool = True) -> dict:
    """Plain cross-entropy training with the default SGD + one-cycle recipe (see :class:`TrainConfig`)."""
    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment=augment,
                         weight_decay=weight_decay)
    return run_training(model, dataset, CrossEntropy(), config, device=device, progress=progress)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ArrayDataset, device: str = "cpu", batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (no autograd graph is built: inference mode)."""
    model.to(device).eval()
    correct = 0
    with torch.inference_mode():
        for x, y in iterate_batches(dataset, batch_size):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(dataset)
