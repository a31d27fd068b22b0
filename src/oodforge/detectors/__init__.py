"""OOD detectors: one module per family, registered by name. See :mod:`.base` for the API."""

from __future__ import annotations

from .base import REGISTRY, Detector, FitContext, NotFittedError, available, clone, create, register

__all__ = ["Detector", "FitContext", "NotFittedError", "REGISTRY", "available", "clone", "create", "register"]
