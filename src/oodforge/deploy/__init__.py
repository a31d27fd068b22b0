"""Deployment: a guarded classifier that classifies or abstains, saved in one folder, served from Python
and the command line (``oodforge export`` / ``oodforge predict``). See docs/deploy.md.

>>> guard = GuardedClassifier.fit(model, suite, "knn", target=0.95)   # doctest: +SKIP
>>> guard.save("guard.oodf")                                           # doctest: +SKIP
>>> classes, confidence, id_score, accepted = GuardedClassifier.load("guard.oodf").predict(images)  # doctest: +SKIP
"""

from __future__ import annotations

from .fileformat import FORMAT_VERSION, GuardFileError, read_manifest, save_guard
from .guard import GuardedClassifier, Prediction, acceptance_rate, calibrate_threshold, load_guard
from .state import SERIALISABLE, UnsupportedDetectorError, serialisable_detectors

__all__ = ["FORMAT_VERSION", "GuardFileError", "GuardedClassifier", "Prediction", "SERIALISABLE",
           "UnsupportedDetectorError", "acceptance_rate", "calibrate_threshold", "load_guard", "read_manifest",
           "save_guard", "serialisable_detectors"]
