"""The short path in Python: a trained model and the user's own data to a fitted detector, a metrics table and a
shipped guard, in three calls (exported lazily as ``oodforge.fit``, ``oodforge.evaluate``, ``oodforge.guard``).

>>> detector = oodforge.fit(model, train_loader, method="vim")                      # doctest: +SKIP
>>> print(oodforge.evaluate(detector, test_loader, {"noise": noise_loader}))        # doctest: +SKIP
>>> oodforge.guard(model, detector, calib_loader, target=0.95).save("guard.oodf")   # doctest: +SKIP

``model`` is an oodforge classifier, e.g. the user's ``nn.Module`` through :func:`oodforge.models.wrap.wrap`
(``preprocessed=True`` when the loaders' transforms normalise). Data are torch ``Dataset`` s yielding
``(image, label)``, ``DataLoader`` s (:mod:`oodforge.models.torchdata`), oodforge datasets or FeatureSets. Each
call is a thin composition of the library's parts: the detector registry and its FitContext
(:mod:`oodforge.detectors.inputs`), the metrics of :func:`oodforge.metrics.evaluate`, and the deployment code
(:class:`~oodforge.deploy.guard.GuardedClassifier`, its threshold rule and its file format), so the folder
``guard(...).save`` writes is the one ``oodforge export`` writes and ``oodforge predict`` serves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .detectors import Detector, create
from .detectors.inputs import features_for
from .metrics import evaluate as _metrics
from .models.torchdata import is_torch_data, torch_images


def _data(model, data):
    """The user's torch data as the one adapter every later step reads (its fingerprint is taken once)."""
    return torch_images(data, model) if is_torch_data(data) else data


def _detector(method) -> Detector:
    if isinstance(method, Detector):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a detector name / spec ('vim', 'knn:k=10') or a Detector, got "
                        f"{type(method).__name__}")
    from .bench import parse_method

    name, params = parse_method(method)
    return create(name, **params)


def fit(model: torch.nn.Module, train, method: str | Detector = "vim", *, val=None, outliers=None,
        device: str = "cpu", batch_size: int = 256, cache_dir: str | Path | None = None, seed: int = 0,
        progress: bool = False) -> Detector:
    """A detector fitted on ``model``'s features of the ID training data ``train``.

    ``method``: a registered detector with parameters as on the command line (``"knn:k=10"``) or a Detector
    (fitted in place and returned, as scikit-learn's ``fit`` does). ``val``: held-out ID data for detectors that
    calibrate on it (``fusion``); ``outliers``: synthetic outliers for those trained on them (``shift``).
    """
    det = _detector(method)
    train = _data(model, train)
    names = getattr(train, "class_names", None)
    return det.fit(train, model=model, val=None if val is None else _data(model, val),
                   outliers=None if outliers is None else _data(model, outliers), device=device, seed=seed,
                   extra={"class_names": names} if names else None, batch_size=batch_size, cache_dir=cache_dir,
                   progress=progress)


class MetricsTable(dict):
    """``{ood_set: {"auroc", "fpr95", "aupr_in", "aupr_out"}}`` (fractions in [0, 1]; ID = positive class,
    :mod:`oodforge.metrics`), printed as a table in percent; ``scores`` holds the arrays they come from
    (``"id"`` and one per OOD set, higher = more ID)."""

    COLUMNS = ("auroc", "fpr95", "aupr_in", "aupr_out")

    def __init__(self, rows: dict, scores: dict[str, np.ndarray], detector: str) -> None:
        super().__init__(rows)
        self.scores = scores
        self.detector = detector

    def mean(self) -> dict[str, float]:
        return {c: float(np.mean([r[c] for r in self.values()])) for c in self.COLUMNS}

    def __str__(self) -> str:
        width = max([len("mean"), *map(len, self)])
        head = f"{self.detector:<{width}}  " + "  ".join(f"{c.upper():>8}" for c in self.COLUMNS)
        rows = [(n, r) for n, r in self.items()] + ([("mean", self.mean())] if len(self) > 1 else [])
        lines = [f"{n:<{width}}  " + "  ".join(f"{100 * r[c]:8.2f}" for c in self.COLUMNS) for n, r in rows]
        return "\n".join([head, *lines])


def evaluate(detector: Detector, id_data, ood: dict, *, model: torch.nn.Module | None = None, device: str = "cpu",
             batch_size: int = 256, cache_dir: str | Path | None = None, progress: bool = False) -> MetricsTable:
    """AUROC, FPR95, AUPR-In / AUPR-Out of a fitted ``detector`` with ``id_data`` (ID test) against each OOD set
    of ``ood`` (``{name: data}``), read with ``model`` (default: the classifier the detector was fitted with)."""
    if not isinstance(ood, dict) or not ood:
        raise ValueError("ood must be a non-empty dict {name: data} of OOD test sets")
    model = model if model is not None else getattr(detector, "model_", None)
    opts = {"device": device, "batch_size": batch_size, "cache_dir": cache_dir, "progress": progress}

    def scores(data):
        return detector.score(features_for(detector, model, _data(model, data), **opts))

    s = {"id": scores(id_data), **{str(n): scores(d) for n, d in ood.items()}}
    return MetricsTable({n: _metrics(s["id"], v) for n, v in s.items() if n != "id"}, s, detector.name)


def guard(model: torch.nn.Module, detector: Detector, calib, target: float = 0.95, *, ood: dict | None = None,
          confidence: float | None = None, rule: str | None = None, class_names: list[str] | None = None,
          device: str = "cpu", batch_size: int = 256, cache_dir: str | Path | None = None, progress: bool = False):
    """A :class:`~oodforge.deploy.guard.GuardedClassifier`: ``model`` + the fitted ``detector`` + the threshold
    calibrated on the held-out ID images ``calib`` (never the data the detector was fitted on) by the
    deployment's own rule, :func:`oodforge.deploy.conformal.calibrate`: split conformal by default (ID images
    rejected with probability <= 1 - ``target``), the PAC rule with ``confidence``, or ``rule``. ``ood``
    (optional ``{name: data}``) records the FPR at that threshold per set. ``.save(path)`` writes the folder
    ``oodforge export`` writes (with the calibration scores, for p-values); a wrapped model needs
    ``wrap(..., factory="package.module:function")`` so that ``oodforge predict`` can build it again."""
    from . import __version__
    from .deploy.conformal import calibrate
    from .deploy.guard import GuardedClassifier, acceptance_rate
    from .deploy.state import SERIALISABLE, serialisable_detectors
    from .models.checkpoint import weights_hash

    if not getattr(detector, "fitted_", False):
        raise ValueError(f"detector {detector.name!r} is not fitted: oodforge.fit(model, train, ...) first")
    if detector.name not in SERIALISABLE:  # fail before any work
        raise ValueError(f"detector {detector.name!r} cannot be saved in a guard; detectors that can: "
                         f"{', '.join(serialisable_detectors())}")
    if not 0 < float(target) <= 1:
        raise ValueError(f"target acceptance rate must be in (0, 1], got {target}")
    calib = _data(model, calib)
    calibrate(np.zeros(len(calib)), target, confidence, rule)  # too few calibration images: refused before any work
    opts = {"device": device, "batch_size": batch_size, "cache_dir": cache_dir, "progress": progress}
    s_val = detector.score(features_for(detector, model, calib, **opts))
    cal = calibrate(s_val, target, confidence, rule)
    threshold = cal.threshold
    s_ood = {str(n): detector.score(features_for(detector, model, _data(model, d), **opts))
             for n, d in (ood or {}).items()}
    rates = {"id_val_acceptance": acceptance_rate(s_val, threshold),
             "ood_fpr": {n: acceptance_rate(s, threshold) for n, s in s_ood.items()}}
    provenance = {"method": f"{detector.name}:" + ",".join(f"{k}={v}" for k, v in detector.get_params().items()
                                                          if isinstance(v, (bool, int, float, str))),
                  "built_by": "oodforge.guard", "oodforge": __version__, "torch": torch.__version__,
                  "weights_hash": weights_hash(model),
                  "calibration": {"set": getattr(calib, "name", None) or getattr(calib, "identity", "calib"),
                                  "n": len(s_val)}}
    shape = getattr(calib, "image_shape", None)
    names = class_names or getattr(calib, "class_names", None)
    g = GuardedClassifier(model, detector, threshold, target=float(target), class_names=names, image_shape=shape,
                          rates=rates, provenance=provenance, device=device, calibration=cal.as_dict(),
                          calibration_scores=s_val)
    g.fit_scores = {"id_val": s_val, **s_ood}
    return g


__all__ = ["MetricsTable", "evaluate", "fit", "guard"]
