"""The cached result of one forward pass over a dataset."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureSet:
    """Per-image outputs of a classifier, all on the CPU in float32.

    ``feature_map`` is only present when it was asked for (it is large: ``[N, C, H, W]``).
    ``images`` is attached by :mod:`oodforge.bench` for detectors that need the pixels
    (``Detector.needs_inputs``), e.g. ODIN's input perturbation or GradNorm's backward pass.
    """

    logits: torch.Tensor
    penultimate: torch.Tensor
    labels: torch.Tensor
    feature_map: torch.Tensor | None = None
    images: object | None = None  # an ArrayDataset, when attached

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __post_init__(self) -> None:
        n = self.logits.shape[0]
        if self.penultimate.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError("FeatureSet fields disagree on the number of images")
