"""ONNX export of a guarded classifier: classifier + detector as one graph.

Input ``images`` (float32 ``[N, C, H, W]`` in ``[0, 1]``, the model's normalisation is inside the
graph); outputs ``logits`` (float32 ``[N, classes]``) and ``id_score`` (float64 ``[N]``; accept an
image when ``id_score >= threshold`` from ``guard.json``). The detector part is written as the
same tensor operations the PyTorch detector runs (in float64 where it computes in float64), so
onnxruntime's scores match :meth:`GuardedClassifier.predict` to about 1e-6.

Exportable: the detectors that read only the logits, the penultimate vector and the head
(``msp``, ``maxlogit``, ``energy``, ``react``, ``dice``, ``gradnorm``), the matrix-op detectors
``mahalanobis`` (without input pre-processing, ``noise=0``) and ``vim``, and SHIFT's rejection
MLP (``shift``). Not exportable: ``knn`` (needs its nearest-neighbour index), ``odin`` and
``mahalanobis:noise>0`` (a gradient step on the input), ``fusion`` (ID-percentile look-ups),
``ssod`` / ``ssod-combined`` and the CLIP detectors; the PyTorch path
(``oodforge predict`` / :meth:`GuardedClassifier.predict`) serves every detector.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..detectors import Detector
from ..detectors.gradnorm import gradnorm_score
from ..detectors.logit_based import energy_score
from ..models.base import ForwardOutput

ONNX_EXPORTABLE = ("dice", "energy", "gradnorm", "mahalanobis", "maxlogit", "msp", "react", "shift", "vim")


def _scorer(det: Detector) -> Callable[[ForwardOutput], torch.Tensor]:
    n = det.name
    t = float(getattr(det, "temperature", 1.0))
    if n == "msp":
        return lambda o: torch.softmax(o.logits.double() / t, dim=1).max(dim=1).values
    if n == "maxlogit":
        return lambda o: o.logits.double().max(dim=1).values
    if n == "energy":
        return lambda o: energy_score(o.logits, t)
    if n == "react":
        return lambda o: energy_score(det.rectified_logits(o.penultimate), t)
    if n == "dice":
        return lambda o: energy_score(det.sparse_logits(o.penultimate), t)
    if n == "gradnorm":
        return lambda o: gradnorm_score(o.logits, o.penultimate, t)
    if n == "mahalanobis" and not det.needs_inputs:
        return lambda o: -det.distances(o.penultimate).min(dim=1).values
    if n == "vim":
        return lambda o: torch.logsumexp(o.logits.double(), dim=1) - det.alpha_ * det._residual_norm(o.penultimate)
    if n == "shift":
        def shift(o: ForwardOutput) -> torch.Tensor:
            x = o.penultimate.float() if det.input == "penultimate" else o.feature_map.float().flatten(1)
            logit = det.net_((x - det.mean_) / det.std_)
            return (torch.sigmoid(logit) if det.score_kind == "prob" else logit).double()
        return shift
    raise ValueError(f"detector {n!r}{' with noise > 0' if n == 'mahalanobis' else ''} cannot be exported to ONNX; "
                     f"exportable: {', '.join(ONNX_EXPORTABLE)} (mahalanobis only with noise=0). `oodforge predict` "
                     "(the PyTorch path) serves every detector")


def check_exportable(det: Detector) -> None:
    """Raise a ``ValueError`` listing the exportable detectors when ``det`` is not one of them."""
    _scorer(det)


class GuardGraph(nn.Module):
    """``images -> (logits, id_score)``: the module :func:`export_onnx` traces."""

    def __init__(self, model: nn.Module, det: Detector) -> None:
        super().__init__()
        self.model = model
        # register the detector's own modules (SHIFT's MLP) so their weights become graph initialisers
        self.parts = nn.ModuleDict({k: v for k, v in vars(det).items()
                                    if k.endswith("_") and isinstance(v, nn.Module) and v is not model})
        self.det = det
        self._score = _scorer(det)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_all(images)
        return out.logits, self._score(out)


def onnx_module(guard) -> GuardGraph:
    return GuardGraph(guard.model, guard.detector).eval()


def export_onnx(guard, path: str | Path, opset: int = 17) -> Path:
    """Trace the guard into ``path`` (needs the ``onnx`` package; torch's TorchScript-based exporter)."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: `pip install onnx onnxruntime` "
                          "(or oodforge[deploy])") from None
    graph = onnx_module(guard).cpu()
    if str(guard.device) != "cpu":
        raise ValueError("export ONNX from a guarded classifier loaded on the CPU (device='cpu')")
    c, h, w = guard.image_shape
    dummy = torch.zeros(2, c, h, w)
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation + tracer notes
        torch.onnx.export(graph, (dummy,), str(path), input_names=["images"], output_names=["logits", "id_score"],
                          dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}, "id_score": {0: "N"}},
                          opset_version=opset, dynamo=False)
    return path
