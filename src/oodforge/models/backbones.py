"""Backbones of the papers' classifiers plus a small, fast CPU default.

All follow :class:`~oodforge.models.base.Classifier`: ``body`` maps normalised images to the last
feature map (after the final activation), ``head`` is the linear classifier on its global average.

* ``small_resnet``: a 3-stage ResNet (widths 32/64/128, one block per stage, strides 2/1/2: a 7x7 map
  for 28 px inputs, 8x8 for 32 px);
  about 0.3 M parameters, trains on Fashion-MNIST on 2 CPU cores in well under a minute per epoch.
* ``resnet18`` / ``resnet34``: CIFAR-style ResNets (3x3 stem, no max-pool) as used by SHIFT and SSOD.
* ``wrn40_2``: WideResNet-40-2 (Zagoruyko & Komodakis 2016), the OE / Energy / SHIFT CIFAR backbone.
* ``densenet100``: DenseNet-BC-100, growth 12 (Huang et al. 2017), the ODIN / Mahalanobis backbone.
* ``efficientnet_lite0-probe`` / ``efficientnet_lite0-finetune`` (lite1, lite2): an ImageNet-pretrained
  EfficientNet-Lite with a new head, trained as a linear probe or fine-tuned (:mod:`.pretrained`, optional
  extra ``pretrained``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Classifier
from .pretrained import BACKBONES, build_pretrained, is_pretrained_arch


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _resnet_body(in_channels: int, widths: list[int], blocks: list[int], strides: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    cin = widths[0]
    for w, n, s in zip(widths, blocks, strides):
        for i in range(n):
            layers.append(BasicBlock(cin, w, s if i == 0 else 1))
            cin = w
    return nn.Sequential(*layers)


class ResNet(Classifier):
    def __init__(self, num_classes, in_channels, mean, std, widths, blocks, strides, arch):
        super().__init__(num_classes, in_channels, mean, std)
        self.arch = arch
        self.body = _resnet_body(in_channels, widths, blocks, strides)
        self.head = nn.Linear(widths[-1], num_classes)


class WideBlock(nn.Module):
    """Pre-activation wide residual block; the body ends with BN+ReLU so the map is post-activation."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.drop > 0:
            y = F.dropout(y, self.drop, self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(Classifier):
    arch = "wrn40_2"

    def __init__(self, num_classes, in_channels, mean, std, depth: int = 40, widen: int = 2, drop: float = 0.3):
        super().__init__(num_classes, in_channels, mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        cin = widths[0]
        for w, s in zip(widths[1:], [1, 2, 2]):
            for i in range(n):
                layers.append(WideBlock(cin, w, s if i == 0 else 1, drop))
                cin = w
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                 nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
                                 nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.net(x)], 1)


class DenseNet(Classifier):
    arch = "densenet100"

    def __init__(self, num_classes, in_channels, mean, std, depth: int = 100, growth: int = 12, reduction: float = 0.5):
        super().__init__(num_classes, in_channels, mean, std)
        n = (depth - 4) // 6
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)]
        for stage in range(3):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if stage < 2:
                cout = int(c * reduction)
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, cout, 1, bias=False), nn.AvgPool2d(2)]
                c = cout
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)


ARCHS = ("small_resnet", "resnet18", "resnet34", "wrn40_2", "densenet100")
WRAPPER_GROUP = "oodforge.model_wrappers"


def model_wrapper(prefix: str):
    """The factory a method package registered for ``"<prefix>:<backbone>"`` architectures.

    Method packages declare their wrappers as ``oodforge.model_wrappers`` entry points in pyproject.toml
    (``ssod = "oodforge.ssod.model:SSODModel"``), so this layer builds their models without importing them.
    """
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=WRAPPER_GROUP)}
    if prefix not in found:
        hint = "" if found else " (none is registered: is oodforge installed, e.g. `pip install -e .`?)"
        raise ValueError(f"unknown model wrapper {prefix!r} in the architecture name; registered: "
                         f"{', '.join(sorted(found)) or 'none'}{hint}")
    return found[prefix].load()


def build_model(arch: str, num_classes: int, in_channels: int, mean: tuple[float, ...] | None = None,
                std: tuple[float, ...] | None = None) -> Classifier:
    """Build a classifier by name; ``"<wrapper>:<backbone>"`` (e.g. ``"ssod:small_resnet"``) wraps the backbone.

    ``mean``/``std`` are the per-channel normalisation applied inside the model (defaults 0.5/0.25).
    """
    mean = tuple(mean) if mean is not None else (0.5,) * in_channels
    std = tuple(std) if std is not None else (0.25,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (one per channel), got {mean} / {std}")
    if ":" in arch:
        prefix, inner = arch.split(":", 1)
        return model_wrapper(prefix)(build_model(inner, num_classes, in_channels, mean, std))
    if is_pretrained_arch(arch):
        # the ImageNet weights fix their own normalisation (0.5 / 0.5); ``mean``/``std`` do not apply
        return build_pretrained(arch, num_classes, in_channels)
    if arch == "small_resnet":
        return ResNet(num_classes, in_channels, mean, std, [32, 64, 128], [1, 1, 1], [2, 1, 2], arch)
    if arch == "resnet18":
        return ResNet(num_classes, in_channels, mean, std, [64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2], arch)
    if arch == "resnet34":
        return ResNet(num_classes, in_channels, mean, std, [64, 128, 256, 512], [3, 4, 6, 3], [1, 2, 2, 2], arch)
    if arch == "wrn40_2":
        return WideResNet(num_classes, in_channels, mean, std)
    if arch == "densenet100":
        return DenseNet(num_classes, in_channels, mean, std)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)} (or 'ssod:<one of them>'), "
                     f"or a pretrained {' / '.join(BACKBONES)} as '<backbone>-probe' or '<backbone>-finetune'")
