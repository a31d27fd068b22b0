"""Supervised training of a classifier on an :class:`ArrayDataset` (the plain baseline)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..data.base import ArrayDataset
from .base import Classifier


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip + random crop with zero padding (the standard CIFAR augmentation)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
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


def train_classifier(model: Classifier, dataset: ArrayDataset, epochs: int = 5, lr: float = 0.05,
                     batch_size: int = 128, seed: int = 0, device: str = "cpu", augment: bool = True,
                     weight_decay: float = 5e-4, progress: bool = True) -> dict:
    """SGD (momentum 0.9, Nesterov) with a one-cycle cosine schedule and cross-entropy.

    Returns a history dict with per-epoch loss, training accuracy and seconds.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if (dataset.labels < 0).any():
        raise ValueError(f"dataset {dataset.identity} has unlabelled images; training needs labels")
    g = seed_everything(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = epochs * ((len(dataset) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    history: dict = {"loss": [], "accuracy": [], "seconds": []}
    for epoch in range(epochs):
        t0, total, correct, loss_sum = time.time(), 0, 0, 0.0
        bar = tqdm(iterate_batches(dataset, batch_size, g), total=(len(dataset) + batch_size - 1) // batch_size,
                   desc=f"train {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, y in bar:
            if augment:
                x = augment_batch(x, g)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            total += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
        history["loss"].append(loss_sum / total)
        history["accuracy"].append(correct / total)
        history["seconds"].append(time.time() - t0)
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ArrayDataset, device: str = "cpu", batch_size: int = 512) -> float:
    model.to(device).eval()
    correct = 0
    for x, y in iterate_batches(dataset, batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(dataset)
