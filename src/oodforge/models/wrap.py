"""Users' own classifiers: :func:`wrap` turns any ``torch.nn.Module`` into the :class:`Classifier` contract
the detectors read, by naming two of its submodules, with forward hooks and no change to the user's class.

* ``head``: the final ``nn.Linear`` (ReAct, DICE, ViM, GradNorm, fDBD, ... read its weights); a forward
  pre-hook records its input, which is the penultimate vector, exactly as the model computes it;
* ``features``: the module whose output is the last feature map ``[N, C, H, W]`` (ASH, SCALE, RankFeat, SSOD
  and CAM masks read it); a forward hook records it.

One call of the user's ``forward`` gives logits, penultimate vector and feature map (``forward_all``), so
feature extraction stays one pass. The images oodforge hands a classifier are in ``[0, 1]``; the wrapper
applies the normalisation the user states (``mean``/``std``) before the model, as every oodforge
classifier does.

Detectors that *re-shape* the feature map and push it through the head (ASH, SCALE, RankFeat) assume the
head's input is the global average of the feature map. :func:`wrap` checks that on a probe input and
records it as ``gap_head``; when it does not hold (a model with dropout-free attention pooling, say),
``pool`` refuses with a message instead of computing a score that means nothing.

>>> model = wrap(my_resnet, head="fc", features="layer4", mean=(0.485, 0.456, 0.406),
...              std=(0.229, 0.224, 0.225), input_size=(224, 224))   # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import one_line
from .base import Classifier, ForwardOutput


def _submodule(model: nn.Module, name: str, option: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"{option}={name!r}: the model has no submodule of that name; its top-level modules: "
                         f"{', '.join(names)} (nested ones as 'layer4.1.conv2')") from None


class WrappedClassifier(Classifier):
    """A user's ``nn.Module`` seen through the :class:`Classifier` contract (built by :func:`wrap`)."""

    def __init__(self, module: nn.Module, head: str, features: str, mean, std, in_channels: int,
                 input_size: tuple[int, int]):
        head_module = _submodule(module, head, "head")
        if not isinstance(head_module, nn.Linear):
            raise ValueError(f"head={head!r} is a {type(head_module).__name__}; it must be the final nn.Linear "
                             "(the detectors read its weight and bias)")
        super().__init__(head_module.out_features, in_channels, tuple(mean), tuple(std))
        self.arch = f"user:{type(module).__name__}"
        self.module = module
        self.head = head_module
        self.head_name, self.features_name = head, features
        self.input_size = tuple(input_size)
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [
            _submodule(module, features, "features").register_forward_hook(self._keep_features),
            head_module.register_forward_pre_hook(self._keep_penultimate),
        ]
        self.gap_head = self._check_gap_head()
        self.factory: str | None = None  # "package.module:factory" when built by load_user_model

    def rebuild_spec(self) -> dict:
        """What :func:`load_user_model` needs to build this classifier again (before loading its weights): saved
        with an exported guard (``oodforge export --model``) so that ``predict`` can restore it."""
        if self.factory is None:
            raise ValueError(f"{self.arch} was wrapped in Python, so no file can say how to build it again; to export "
                             "it, give the model as --model package.module:factory (or set .factory to that spec)")
        return {"factory": self.factory, "head": self.head_name, "features": self.features_name,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
                "input_size": list(self.input_size)}

    # -- hooks ---------------------------------------------------------------------------------
    def _keep_features(self, _module, _inputs, output) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"features={self.features_name!r} returned {shape}; it must be a [N, C, H, W] "
                             "feature map (name the last convolutional stage, e.g. 'layer4')")
        self._captured["fmap"] = output

    def _keep_penultimate(self, _module, inputs) -> None:
        self._captured["penultimate"] = inputs[0]

    def _run(self, x: torch.Tensor) -> ForwardOutput:
        self._captured.clear()
        logits = self.module(self.normalize(x))
        if "fmap" not in self._captured or "penultimate" not in self._captured:
            missing = [n for k, n in (("fmap", self.features_name), ("penultimate", self.head_name))
                       if k not in self._captured]
            raise ValueError(f"the model's forward did not run {missing}; name modules its forward calls")
        return ForwardOutput(logits, self._captured["penultimate"].flatten(1), self._captured["fmap"])

    def _check_gap_head(self) -> bool:
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            out = self._run(torch.rand(2, self.in_channels, *self.input_size))
        self.module.train(was_training)
        if out.feature_map.shape[1] != out.penultimate.shape[1]:
            return False
        return torch.allclose(out.feature_map.mean(dim=(2, 3)), out.penultimate, rtol=1e-4, atol=1e-5)

    # -- the Classifier contract ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x).logits

    def forward_all(self, x: torch.Tensor) -> ForwardOutput:
        return self._run(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x).feature_map

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.gap_head:
            raise ValueError(f"{self.arch}: the head's input is not the global average of {self.features_name!r}, "
                             "so detectors that reshape the feature map (ash, scale, rankfeat) cannot run on it")
        return fmap.mean(dim=(2, 3))


def wrap(model: nn.Module, head: str = "fc", features: str = "layer4", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
         in_channels: int | None = None, input_size: tuple[int, int] = (224, 224), preprocessed: bool = False,
         factory: str | None = None) -> WrappedClassifier:
    """Wrap a user's classifier (see the module docstring). ``mean``/``std`` are the normalisation the model
    was trained with, applied to ``[0, 1]`` images; ``input_size`` is only used for the wrap-time probe.

    ``preprocessed=True`` says that the float images of the user's torch Datasets / DataLoaders are normalised
    already (their transforms end with ``Normalize(mean, std)``): they are not normalised again
    (:mod:`oodforge.models.torchdata`). ``factory`` (``"package.module:function"``, returning the module) lets
    an exported guard build the model again where it is served (``oodforge predict``)."""
    channels = in_channels if in_channels is not None else len(tuple(mean))
    if len(tuple(mean)) != channels or len(tuple(std)) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {mean} / {std}")
    wrapped = WrappedClassifier(model, head, features, mean, std, channels, input_size).eval()
    wrapped.preprocessed = bool(preprocessed)
    wrapped.factory = factory
    return wrapped



def load_user_model(spec: str, weights: str | None = None, head: str = "fc", features: str = "layer4",
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size: tuple[int, int] = (224, 224)
                    ) -> WrappedClassifier:
    """``--model package.module:factory [--weights FILE]``: import the factory, call it with no arguments,
    load the weights (safetensors, or a ``torch.save``d state dict read with ``weights_only=True``: never
    arbitrary pickled code), and :func:`wrap` the result. Every failure names the option and the fix."""
    import importlib
    import sys
    from pathlib import Path

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model {spec!r}: write it as package.module:factory (a function that returns the "
                         "nn.Module)")
    if "" not in sys.path:
        sys.path.insert(0, "")  # a module in the current folder, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({e}); run from the folder that "
                         "holds it or install its package") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    net = factory()
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model {spec!r}: {attr}() returned a {type(net).__name__}, not a torch.nn.Module")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {path}: no such file")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, or a pickle that is not a plain state dict
            raise ValueError(f"--weights {path} cannot be read as a state dict ({one_line(e)[:200]}); "
                             "save it with safetensors or torch.save(model.state_dict())") from None
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            first = one_line(e)[:300]
            raise ValueError(f"--weights {path} does not fit {spec} ({first})") from None
    model = wrap(net.eval(), head=head, features=features, mean=mean, std=std, input_size=input_size)
    model.factory = spec
    return model


__all__ = ["WrappedClassifier", "load_user_model", "wrap"]
