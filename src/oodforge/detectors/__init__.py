"""OOD detectors: one module per family, registered by name. See :mod:`.base` for the API."""

from __future__ import annotations

import importlib

from .base import REGISTRY, Detector, FitContext, NotFittedError, available, create, register

# The post-hoc families of this package. Method packages (shift, ssod, the CLIP detectors, synood) add
# their detectors through ``oodforge.detectors`` entry points (pyproject.toml), so this layer never imports
# them by name. A module that fails to import is an error, never silently skipped.
_FAMILIES = [
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
]
ENTRY_POINT_GROUP = "oodforge.detectors"
_loaded = False


def _load_all() -> None:
    """Import every module that registers detectors: this package's families and the entry points'."""
    global _loaded
    if _loaded:
        return
    from importlib.metadata import entry_points

    for mod in _FAMILIES:
        importlib.import_module(mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    _loaded = True


__all__ = ["Detector", "FitContext", "NotFittedError", "REGISTRY", "available", "create", "register"]
