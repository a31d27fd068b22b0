"""The classifier contract every backbone follows.

A :class:`Classifier` maps ``[0, 1]`` images to logits through three named stages, so every
detector and synthesis method can reach the part it needs without hooks:

* ``feature_map(x)`` -> last convolutional feature map ``[N, C, H, W]`` (after normalisation
  and the final activation), used by SSOD, CAM masks and SHIFT's reference-code input;
* ``pool(fmap)`` -> penultimate vector ``[N, C]`` (global average pooling);
* ``head`` -> an ``nn.Linear`` from penultimate to logits (ReAct, DICE, ViM, GradNorm read it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Classifier(nn.Module):
    """Base class: subclasses build ``self.body`` (normalised images -> feature map) and ``self.head``."""

    arch: str = "classifier"

    def __init__(self, num_classes: int, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.body: nn.Module
        self.head: nn.Linear

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    @staticmethod
    def pool(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.feature_map(x)))

    def forward_all(self, x: torch.Tensor) -> "ForwardOutput":
        """One pass returning logits, the penultimate vector and the last feature map."""
        fmap = self.feature_map(x)
        pen = self.pool(fmap)
        return ForwardOutput(self.head(pen), pen, fmap)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features


@dataclass
class ForwardOutput:
    logits: torch.Tensor
    penultimate: torch.Tensor
    feature_map: torch.Tensor
