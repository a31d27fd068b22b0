"""Joint training of the classification head and the OOD head of SSOD (Pei, ICLR 2024).

Each step (Fig. 3): one forward pass gives the pooled logits (Eq. 11), the per-position
classification logits and the per-position OOD logits (Eq. 13); the sampler (Eq. 12) labels
positions ID / OOD / ignored from the *detached* target-class confidence; the loss is Eq. 14 with
a balance scheme of Table 5. The backbone, ``f_cls`` and ``f_ood`` are optimised together.

Schedules:

* the paper's (App. A.4): AdamW, lr 1e-4 halved every 30 epochs, batch 256, inputs resized to
  224 px -- ``train_ssod(..., **PAPER_SETTING)``;
* the CPU default: AdamW, lr 1e-3 with a per-step cosine decay over a few epochs, inputs at their
  own size (``input_size=None``). Measured with ``benchmarks/bench_ssod_ablation.py --quick
  --epochs 5`` (fashion6, 3,000 images, ``small_resnet``, 1 thread on a shared 2-core machine):
  28 px inputs (7x7 map) take 10-19 s/epoch, the same as plain training (18 s/epoch); resizing to
  56 px (14x14 map) costs 51.5 s/epoch and gave mixed results (far-OOD AUROC 71.5 vs 56.2, near
  48.5 vs 50.9, ID accuracy 87.2 vs 90.8 %), so the default keeps the native size.

Few classes: a position without evidence has target confidence about ``1/M``; Eq. 12 can only
label it OOD when ``1 - gamma > 1/M``. The paper's ``gamma = 0.95`` suits ImageNet (``M = 1000``);
with ``M = 4..10`` most background positions stay unlabelled unless the classifier confidently
calls them another class, so a lower ``gamma`` (or more classes) gives more OOD samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.base import ArrayDataset
from ..models.train import augment_batch, iterate_batches, seed_everything
from .loss import check_balance, ssod_loss
from .model import SSODModel
from .sampler import check_gamma, sample_positions

SCHEDULES = ("cosine", "step", "constant")

#: The training setting of App. A.4 (epochs are not stated in the paper; pass them yourself).
PAPER_SETTING = {"lr": 1e-4, "schedule": "step", "step_epochs": 30, "batch_size": 256, "input_size": 224,
                 "alpha": 1.0, "gamma": 0.95, "balance": "loss"}

#: The measured CPU default (small_resnet, Fashion-MNIST-sized inputs, 2 cores).
CPU_DEFAULT = {"lr": 1e-3, "schedule": "cosine", "batch_size": 128, "input_size": None,
               "alpha": 1.0, "gamma": 0.95, "balance": "loss"}


def _lr_factor(schedule: str, step: int, total_steps: int, epoch: int, step_epochs: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    if schedule == "step":  # App. A.4: halve every `step_epochs` epochs
        return 0.5 ** (epoch // step_epochs)
    return 1.0


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
) -> dict:
    """Train an :class:`SSODModel` end to end with the SSOD objective (Eqs. 11-14).

    Args:
        model: the SSOD model (backbone + ``ood_head``); trained in place, left in eval mode.
        dataset: labelled ID training images (uint8 ``[N, C, H, W]``).
        epochs, lr, batch_size, seed, device: the usual; every random draw (shuffling,
            augmentation, data resampling) comes from generators seeded by ``seed``.
        alpha: weight of the OOD loss in Eq. 14 (paper: 1.0).
        gamma: sampler confidence threshold of Eq. 12 (paper: 0.95).
        balance: ``"loss"`` (loss-wise balance, paper default), ``"weight"`` or ``"resample"``
            (Table 5), see :mod:`oodforge.ssod.loss`.
        input_size: resize inputs to this size inside the model (stored in the model, so
            inference uses it too; App. A.3 uses 224). ``None`` keeps the model's current setting.
        schedule: ``"cosine"`` (per-step cosine to 0, CPU default), ``"step"`` (halve every
            ``step_epochs`` epochs, App. A.4) or ``"constant"``.
        weight_decay: AdamW's decoupled weight decay.
        ood_weight: the loss-weighting factor (``balance="weight"`` only).
        augment: random flip + 2-px shift crop, as in ``oodforge.models.train``.
        max_steps: stop after this many optimiser steps (quick tests and benchmarks).

    Returns:
        A history dict: per-epoch lists ``loss``, ``cls_loss``, ``ood_loss``, ``accuracy``,
        ``n_id``/``n_ood`` (positions sampled as ID/OOD by Eq. 12), ``positions`` (all positions
        seen), ``lr`` (at epoch end) and ``seconds``; plus ``config`` (the settings used) and
        ``feature_map_size`` (H, W of the map the sampler worked on).
    """
    if not isinstance(model, SSODModel):
        raise TypeError(f"train_ssod trains an SSODModel (build_model('ssod:<arch>', ...)), got {type(model).__name__}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1 or lr <= 0:
        raise ValueError(f"batch_size must be >= 1 and lr > 0, got batch_size={batch_size}, lr={lr}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    check_balance(balance)
    check_gamma(gamma)
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.identity} is empty")
    if (dataset.labels < 0).any():
        raise ValueError(f"dataset {dataset.identity} has unlabelled images; SSOD's sampler needs the target class")
    if dataset.image_shape[0] != model.in_channels:
        raise ValueError(f"dataset {dataset.identity} has {dataset.image_shape[0]} channels, the model expects "
                         f"{model.in_channels}")
    if int(dataset.labels.max()) >= model.num_classes:
        raise ValueError(f"dataset {dataset.identity} has label {int(dataset.labels.max())} but the model has "
                         f"{model.num_classes} classes")

    g = seed_everything(seed)
    g_resample = torch.Generator().manual_seed(seed + 1)
    if input_size is not None:
        model.set_input_size(input_size)
    model.set_image_size(dataset.image_shape[1:])
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = (len(dataset) + batch_size - 1) // batch_size
    total_steps = epochs * n_batches if max_steps is None else min(max_steps, epochs * n_batches)
    config = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "alpha": alpha, "gamma": gamma,
              "balance": balance, "input_size": model.input_size, "schedule": schedule, "step_epochs": step_epochs,
              "weight_decay": weight_decay, "ood_weight": ood_weight, "augment": augment, "max_steps": max_steps,
              "optimizer": "AdamW"}
    keys = ("loss", "cls_loss", "ood_loss", "accuracy", "n_id", "n_ood", "positions", "lr", "seconds")
    history: dict = {k: [] for k in keys}
    history["config"] = config
    step = 0
    for epoch in range(epochs):
        if step >= total_steps:
            break
        t0 = time.time()
        sums = dict.fromkeys(("loss", "cls_loss", "ood_loss"), 0.0)
        seen = correct = n_id = n_ood = positions = 0
        bar = tqdm(iterate_batches(dataset, batch_size, g), total=n_batches, desc=f"ssod {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        for x, y in bar:
            if step >= total_steps:
                break
            factor = _lr_factor(schedule, step, total_steps, epoch, step_epochs)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            if augment:
                x = augment_batch(x, g)
            x, y = x.to(device), y.to(device)
            out = model.forward_ssod(x)
            ood_labels = sample_positions(out.cls_map, y, gamma)  # Eq. 12, no gradient
            parts = ssod_loss(out.logits, y, out.ood_map, ood_labels, alpha=alpha, balance=balance,
                              ood_weight=ood_weight, generator=g_resample)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            step += 1
            b = len(y)
            sums["loss"] += parts.total.item() * b
            sums["cls_loss"] += parts.cls.item() * b
            sums["ood_loss"] += parts.ood.item() * b
            seen += b
            correct += int((out.logits.argmax(1) == y).sum())
            n_id += parts.n_id
            n_ood += parts.n_ood
            positions += ood_labels.numel()
            history["feature_map_size"] = tuple(out.feature_map.shape[-2:])
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{correct / seen:.3f}",
                            id=f"{n_id / positions:.2f}", ood=f"{n_ood / positions:.2f}")
        for k in ("loss", "cls_loss", "ood_loss"):
            history[k].append(sums[k] / max(seen, 1))
        history["accuracy"].append(correct / max(seen, 1))
        history["n_id"].append(n_id)
        history["n_ood"].append(n_ood)
        history["positions"].append(positions)
        history["lr"].append(opt.param_groups[0]["lr"])
        history["seconds"].append(time.time() - t0)
    model.eval()
    return history
