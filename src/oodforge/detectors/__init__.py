"""OOD detectors: one module per family, registered by name. See :mod:`.base` for the API."""

from __future__ import annotations

import importlib

from .base import REGISTRY, Detector, FitContext, NotFittedError, available, create, register

# Modules that define registered detectors. Optional ones (needing extra packages or other
# subpackages) are imported lazily and silently skipped only when their module is absent.
_MODULES = [
    "oodforge.detectors.logit_based",
    "oodforge.detectors.odin",
    "oodforge.detectors.mahalanobis",
    "oodforge.detectors.activation_shaping",
    "oodforge.detectors.knn",
    "oodforge.detectors.vim",
    "oodforge.detectors.gradnorm",
    "oodforge.detectors.shaping",
    "oodforge.detectors.feature_rank",
    "oodforge.detectors.softmax_based",
    "oodforge.detectors.distance",
    "oodforge.detectors.class_geometry",
    "oodforge.detectors.fusion",
    "oodforge.synth.rejection",
    "oodforge.ssod.detector",
    "oodforge.synood.clip_detectors",
    "oodforge.synood.detector",
]
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a subpackage not built yet
            if e.name is None or not mod.startswith(e.name):
                raise
    _loaded = True


__all__ = ["Detector", "FitContext", "NotFittedError", "REGISTRY", "available", "create", "register"]
