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


class ExtraHeadModel(Classifier):
    """A backbone :class:`Classifier` with one extra head beside its class head (SSOD's OOD head, RotPred's
    rotation head): the Classifier contract (normalisation, body, feature map, class head) is the backbone's.

    Subclasses call :meth:`_wrap` instead of ``Classifier.__init__``, which would register a second copy of the
    normalisation buffers, and add their head; ``prefix`` names the architecture (``"ssod:small_resnet"``).
    """

    def _wrap(self, backbone: Classifier, prefix: str) -> None:
        nn.Module.__init__(self)
        name = type(self).__name__
        if not isinstance(backbone, Classifier):
            raise TypeError(f"{name} wraps an oodforge Classifier, got {type(backbone).__name__}")
        if isinstance(backbone, type(self)):
            raise TypeError(f"{name} cannot wrap another {name}")
        if not isinstance(getattr(backbone, "head", None), nn.Linear):
            raise TypeError(f"{name} needs a backbone whose .head is an nn.Linear")
        self.backbone = backbone
        self.num_classes, self.in_channels = backbone.num_classes, backbone.in_channels
        self.arch = f"{prefix}:{getattr(backbone, 'arch', type(backbone).__name__)}"

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return self.backbone.head

    @property
    def body(self) -> nn.Module:  # type: ignore[override]
        return self.backbone.body

    @property
    def mean(self) -> torch.Tensor:
        return self.backbone.mean

    @property
    def std(self) -> torch.Tensor:
        return self.backbone.std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.normalize(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.feature_map(x)


@dataclass
class ForwardOutput:
    logits: torch.Tensor
    penultimate: torch.Tensor
    feature_map: torch.Tensor
