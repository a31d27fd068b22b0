"""A classifier that abstains: the classifier, one fitted detector and an ID-calibrated threshold.

``predict(images)`` returns, per image, the predicted class, its softmax confidence, the
detector's ID score (higher = more in-distribution) and whether the image is *accepted*
(``id_score >= threshold``); a rejected image is an abstention.

Calibration rule: the threshold is the score such that the ``target`` fraction of the held-out ID
validation scores (``suite.id_val``, never the images the detector was fitted on, never OOD data)
are ``>=`` it, i.e. the ``ceil(target * n)``-th largest of the ``n`` validation scores.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..data.base import ArrayDataset, Suite
from ..detectors import Detector, FitContext, create
from ..metrics import evaluate
from ..models.base import Classifier
from ..models.featureset import FeatureSet


class Prediction(NamedTuple):
    """Per-image outputs of :meth:`GuardedClassifier.predict` (unpacks as a 4-tuple)."""

    classes: np.ndarray  # int64 predicted class indices
    confidence: np.ndarray  # float64 max softmax probability
    id_score: np.ndarray  # float64 detector score, higher = more in-distribution
    accepted: np.ndarray  # bool: id_score >= threshold (False = abstain)


def calibrate_threshold(id_val_scores: np.ndarray, target: float) -> float:
    """The score ``t`` such that the ``target`` fraction of ``id_val_scores`` are ``>= t``.

    ``t`` is the ``k``-th largest score with ``k = ceil(target * n)`` (at least 1), so at least
    ``target * n`` validation images are accepted (more only when scores tie at ``t``).
    """
    if not 0 < float(target) <= 1:
        raise ValueError(f"target acceptance rate must be in (0, 1], got {target}")
    s = np.asarray(id_val_scores, np.float64).ravel()
    if s.size == 0:
        raise ValueError("cannot calibrate a threshold on zero ID validation scores")
    if not np.isfinite(s).all():
        raise ValueError("the detector gave non-finite ID validation scores; cannot calibrate a threshold")
    k = min(max(int(math.ceil(float(target) * s.size - 1e-9)), 1), s.size)
    return float(np.sort(s)[::-1][k - 1])


def acceptance_rate(scores: np.ndarray, threshold: float) -> float:
    return float((np.asarray(scores, np.float64) >= threshold).mean())


class FloatImages:
    """Float ``[0, 1]`` images in the shape of an ArrayDataset's ``float_images`` API (for ``needs_inputs``
    detectors: no uint8 round trip, so scores equal those on the given pixels)."""

    def __init__(self, images: torch.Tensor, identity: str = "deploy/predict") -> None:
        self.images = images
        self.identity = identity
        self.labels = torch.full((images.shape[0],), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def float_images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.images[start:stop].float()


def _detectors(det: Detector) -> Iterator[Detector]:
    yield det
    for k, v in vars(det).items():
        if k.endswith("_") and isinstance(v, Detector):
            yield from _detectors(v)


@contextlib.contextmanager
def _quiet(det: Detector):
    """Silence the detectors' own progress bars while predicting (restored afterwards)."""
    saved = [(d, d.progress) for d in _detectors(det) if isinstance(getattr(d, "progress", None), bool)]
    for d, _ in saved:
        d.progress = False
    try:
        yield
    finally:
        for d, p in saved:
            d.progress = p


def parse_method_spec(method: str) -> tuple[str, dict]:
    from ..bench import parse_method

    return parse_method(method)


class GuardedClassifier:
    """Classifier + fitted detector + threshold; see the module docstring.

    Build one with :meth:`fit` (from a suite) or :meth:`load` (from an export folder), save it
    with :meth:`save`.
    """

    def __init__(self, model: Classifier, detector: Detector, threshold: float, *, target: float | None = None,
                 class_names: list[str] | None = None, image_shape: tuple[int, int, int] | None = None,
                 rates: dict | None = None, provenance: dict | None = None, device: str = "cpu") -> None:
        if not getattr(detector, "fitted_", False):
            raise ValueError(f"detector {detector.name!r} is not fitted")
        self.model = model.to(device).eval()
        self.detector = detector
        self.threshold = float(threshold)
        self.target = target
        self.class_names = list(class_names) if class_names else [str(i) for i in range(model.num_classes)]
        self.image_shape = tuple(int(v) for v in image_shape) if image_shape else None
        self.rates = rates or {}
        self.provenance = provenance or {}
        self.device = device

    # --- building --------------------------------------------------------------------------
    @classmethod
    def fit(cls, model: Classifier, suite: Suite, method: str | Detector, outliers: ArrayDataset | None = None,
            target: float = 0.95, device: str = "cpu", batch_size: int = 256, cache_dir: str | Path | None = None,
            seed: int = 0, progress: bool = False, extra: dict | None = None) -> GuardedClassifier:
        """Fit ``method`` as :func:`oodforge.bench.run_bench` does, calibrate on ``suite.id_val`` and
        record the achieved ID-test acceptance rate and the FPR on every OOD set.

        ``method`` is a bench method spec (``"knn:k=10"``) or an unfitted detector.
        """
        from .. import __version__
        from ..bench import _FeatureCache, _with_images, check_fit_inputs
        from ..models.checkpoint import weights_hash

        if suite.id_val is None or len(suite.id_val) == 0:
            raise ValueError(f"suite {suite.name!r} has no ID validation split (suite.id_val): the threshold is "
                             "calibrated on held-out ID images (see oodforge.data.suites.with_validation_split)")
        if isinstance(method, str):
            name, params = parse_method_spec(method)
            det, spec = create(name, **params), method
        else:
            det, spec = method, method.name
        from .state import SERIALISABLE, serialisable_detectors

        if det.name not in SERIALISABLE:  # fail before any work
            raise ValueError(f"detector {det.name!r} cannot be exported; detectors that can: "
                             f"{', '.join(serialisable_detectors())}")
        model = model.to(device).eval()
        fmap = bool(getattr(det, "needs_feature_map", False))
        cache = _FeatureCache(model, device, cache_dir, batch_size, progress)
        train_fmap = fmap and getattr(det, "needs_train_feature_map", True)  # as run_bench does
        train = _with_images(cache.get(suite.id_train, train_fmap), suite.id_train)
        val = _with_images(cache.get(suite.id_val, fmap), suite.id_val)
        out_fs = None
        if det.needs_outliers:
            if outliers is None:
                raise ValueError(f"detector {det.name!r} trains on synthetic outliers: give an outlier store "
                                 "(CLI: --outliers DIR from `oodforge synth shift ...`)")
            out_fs = _with_images(cache.get(outliers, fmap), outliers)
        ctx = FitContext(model=model, train=train, outliers=out_fs, val=val, device=device, seed=seed,
                         extra={"class_names": suite.class_names, **(extra or {})})
        check_fit_inputs(ctx, suite)
        with contextlib.nullcontext() if progress else _quiet(det):
            det.fit(ctx)
        with _quiet(det):
            s_val = det.score(val)
            threshold = calibrate_threshold(s_val, target)
            test_fs = _with_images(cache.get(suite.id_test, fmap), suite.id_test)
            s_id = det.score(test_fs)
            s_ood = {n: det.score(_with_images(cache.get(ds, fmap), ds)) for n, ds in suite.ood.items()}
        acc = float((test_fs.logits.argmax(1) == suite.id_test.labels).double().mean())
        rates = {"id_val_acceptance": acceptance_rate(s_val, threshold),
                 "id_test_acceptance": acceptance_rate(s_id, threshold),
                 "ood_fpr": {n: acceptance_rate(s, threshold) for n, s in s_ood.items()}}
        provenance = {"suite": suite.name, "method": spec, "seed": seed, "oodforge": __version__,
                      "torch": torch.__version__, "weights_hash": weights_hash(model), "id_test_accuracy": acc,
                      "calibration": {"set": "id_val", "identity": suite.id_val.identity, "n": len(suite.id_val)},
                      "sets": {"id_test": len(suite.id_test), **{n: len(ds) for n, ds in suite.ood.items()}},
                      "metrics": {n: evaluate(s_id, s) for n, s in s_ood.items()}}
        guard = cls(model, det, threshold, target=float(target), class_names=suite.class_names,
                    image_shape=suite.image_shape, rates=rates, provenance=provenance, device=device)
        guard.fit_scores = {"id_val": s_val, "id": s_id, **s_ood}  # the arrays the rates come from
        return guard

    # --- inference ---------------------------------------------------------------------------
    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("predict expects a float tensor [N, C, H, W] with values in [0, 1]")
        if not images.is_floating_point():
            raise ValueError(f"predict expects float images in [0, 1], got {images.dtype} (divide uint8 by 255)")
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"the guarded classifier takes images of shape {list(self.image_shape)} "
                             f"(C, H, W), got {list(images.shape[1:])}")
        return images.float()

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> FeatureSet:
        fmap = bool(getattr(self.detector, "needs_feature_map", False))
        out = self.model.forward_all(x.to(self.device))
        fs = FeatureSet(out.logits.float().cpu(), out.penultimate.float().cpu(),
                        torch.full((x.shape[0],), -1, dtype=torch.int64),
                        out.feature_map.float().cpu() if fmap else None)
        if self.detector.needs_inputs:
            fs.images = FloatImages(x)
        return fs

    def predict(self, images: torch.Tensor, batch_size: int = 256) -> Prediction:
        """Classify or abstain for float ``[0, 1]`` images ``[N, C, H, W]`` of the recorded size."""
        x = self._check(images)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        classes, conf, scores = [], [], []
        with _quiet(self.detector):
            for i in range(0, x.shape[0], int(batch_size)):
                fs = self._features(x[i:i + int(batch_size)])
                p = torch.softmax(fs.logits.double(), dim=1).max(dim=1)
                classes.append(p.indices.numpy())
                conf.append(p.values.numpy())
                scores.append(self.detector.score(fs))
        if not scores:
            e = np.zeros(0)
            return Prediction(e.astype(np.int64), e, e, e.astype(bool))
        s = np.concatenate(scores)
        return Prediction(np.concatenate(classes).astype(np.int64), np.concatenate(conf), s, s >= self.threshold)

    def scores(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        return self.predict(images, batch_size).id_score

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, onnx: bool = False) -> Path:
        """Write the export folder (see :mod:`oodforge.deploy.fileformat`); ``onnx`` also writes ``guard.onnx``."""
        from .fileformat import save_guard

        return save_guard(self, path, onnx=onnx)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> GuardedClassifier:
        """Read an export folder, verifying its format version and every file's sha256."""
        from .fileformat import read_guard

        model, detector, doc, folder = read_guard(path, device)
        pre = doc["preprocessing"]
        guard = cls(model, detector, doc["threshold"], target=doc.get("target_acceptance"),
                    class_names=doc.get("class_names"), image_shape=(pre["channels"], *pre["image_size"]),
                    rates=doc.get("rates"), provenance=doc.get("provenance"), device=device)
        guard.manifest = doc
        guard.path = folder
        return guard

    def onnx_module(self) -> nn.Module:
        from .onnx import onnx_module

        return onnx_module(self)

    def export_onnx(self, path: str | Path) -> Path:
        from .onnx import export_onnx

        return export_onnx(self, path)

    def __repr__(self) -> str:
        return (f"GuardedClassifier({getattr(self.model, 'arch', type(self.model).__name__)}, "
                f"{self.detector!r}, threshold={self.threshold:.6g}, target={self.target})")


def load_guard(path: str | Path, device: str = "cpu") -> GuardedClassifier:
    """Read an export folder (``GuardedClassifier.load``)."""
    return GuardedClassifier.load(path, device)
