"""Held-out forgers: outliers made from ID validation images by procedures no oodforge method trains on.

The protocol (docs/protocol.md) picks methods on ID validation data against forged outliers. Outliers from
the *same* forger a method trained on (SHIFT's CAM mask + inpainting) measure how well it learned that
forger, and every forged-outlier method separates them at 99.9+ AUROC, so that number cannot choose between
methods. These forgers are held out: no detector, rejection network or outlier-exposure run ever sees
their images, so separating them from ID data has to come from what a method learned about ID data in
general. Two directions, both standard synthetic outliers in the literature, and cheap (no model):

* ``jigsaw``: the image cut into a ``grid x grid`` array of tiles, shuffled by a random permutation
  (the jigsaw puzzles of Noroozi & Favaro, ECCV 2016, used as a self-supervised "not a natural
  image" signal): local colour and texture statistics of ID data, no object shape.
* ``mix``: the pixel-wise average of two ID images of *different* classes (Zhang et al., mixup, ICLR
  2018, at lambda = 0.5; mixed images as virtual outliers, Zhang et al., MixOE, WACV 2023): an image of
  no one class, close to ID data.

They were added after the first protocol runs showed the same-forger number saturating; no parameter of
them was chosen by reading an OOD test set (grid 4 and lambda 0.5 are the papers' usual values).

Each forger stands for one group of OOD test sets (:data:`FORGER_FOR_GROUP`): a class mix is an image
close to ID data that belongs to no class (near-OOD); a jigsaw keeps ID data's low-level statistics and
loses every shape (far-OOD). :class:`HeldoutOutliers` remembers which rows each forger made, so ``bench``
reports the validation numbers per forger too and the protocol can pick per group.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.base import ArrayDataset

__all__ = ["HELDOUT_FORGERS", "FORGER_FOR_GROUP", "HeldoutOutliers", "jigsaw", "class_mix", "average",
           "heldout_parts", "heldout_outliers"]


def jigsaw(images: torch.Tensor, grid: int = 4, seed: int = 0) -> torch.Tensor:
    """Each image's ``grid x grid`` tiles in a random order (one permutation per image, never the identity).

    ``images`` is uint8 ``[N, C, H, W]``; ``H`` and ``W`` are cropped to multiples of ``grid`` for the tiling
    and the uncovered border rows / columns keep their pixels."""
    n, c, h, w = images.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"jigsaw: images of {h}x{w} pixels cannot be cut into a {grid}x{grid} grid")
    rng = np.random.default_rng(seed)
    out = images.clone()
    core = images[:, :, :th * grid, :tw * grid].reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = core.reshape(n, grid * grid, c, th, tw)
    perms = np.stack([_derangement(rng, grid * grid) for _ in range(n)])
    shuffled = tiles[torch.arange(n)[:, None], torch.from_numpy(perms)]
    out[:, :, :th * grid, :tw * grid] = (shuffled.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5)
                                         .reshape(n, c, th * grid, tw * grid))
    return out


def _derangement(rng: np.random.Generator, k: int) -> np.ndarray:
    """A random permutation of ``k`` items that moves at least one (so no image comes back unchanged)."""
    while True:
        p = rng.permutation(k)
        if (p != np.arange(k)).any():
            return p


def class_mix(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image averaged pixel-wise with a random image of another class (rounded to uint8)."""
    y = labels.numpy()
    classes = np.unique(y)
    if len(classes) < 2 or (y < 0).any():
        raise ValueError("mix: needs labelled images of at least two classes")
    rng = np.random.default_rng(seed)
    partner = np.empty(len(y), np.int64)
    for c in classes:
        mine, others = np.flatnonzero(y == c), np.flatnonzero(y != c)
        partner[mine] = rng.choice(others, size=len(mine))
    return average(images, images[torch.from_numpy(partner)])


def average(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The pixel-wise mean of two uint8 image batches (mixup at lambda 0.5), rounded half up to uint8."""
    return ((a.to(torch.int32) + b.to(torch.int32) + 1) // 2).to(torch.uint8)


HELDOUT_FORGERS = {"jigsaw": "tiles of a 4x4 grid shuffled", "mix": "average of two images of different classes"}
#: which held-out forger's outliers stand for which group of OOD test sets (docs/protocol.md)
FORGER_FOR_GROUP = {"near": "mix", "far": "jigsaw"}


class HeldoutOutliers(ArrayDataset):
    """The held-out forgers' outliers in one dataset, with ``parts``: forger name -> the ``slice`` of its rows."""

    def __init__(self, images: torch.Tensor, parts: dict[str, slice], identity: str):
        super().__init__(images, None, None, identity)
        self.parts = dict(parts)


def heldout_parts(n: int, kinds: tuple[str, ...] = ("jigsaw", "mix")) -> dict[str, slice]:
    """The rows of each forger in :func:`heldout_outliers` of ``n`` images: ``n`` per forger, in ``kinds`` order."""
    return {kind: slice(i * n, (i + 1) * n) for i, kind in enumerate(kinds)}


def heldout_outliers(dataset: ArrayDataset, kinds: tuple[str, ...] = ("jigsaw", "mix"), seed: int = 0
                     ) -> HeldoutOutliers:
    """One outlier per image of ``dataset`` (the ID validation split) per forger in ``kinds``, unlabelled, in
    the order of ``kinds`` (``parts`` records the rows of each)."""
    unknown = [k for k in kinds if k not in HELDOUT_FORGERS]
    if unknown:
        raise ValueError(f"unknown held-out forgers {unknown}; choose from {', '.join(HELDOUT_FORGERS)}")
    # a streamed dataset's images decode on indexing: read them once (the validation split is small)
    images = dataset.images if isinstance(dataset.images, torch.Tensor) else dataset.images[:]
    made = [jigsaw(images, 4, seed + i) if kind == "jigsaw" else class_mix(images, dataset.labels, seed + i)
            for i, kind in enumerate(kinds)]
    return HeldoutOutliers(torch.cat(made), heldout_parts(len(dataset), kinds),
                           f"heldout[{'+'.join(kinds)},seed={seed}]({dataset.identity})")
