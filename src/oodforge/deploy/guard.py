"""A classifier that abstains: the classifier, one fitted detector and an ID-calibrated threshold.

``predict(images)`` returns, per image, the predicted class, its softmax confidence, the
detector's ID score (higher = more in-distribution) and whether the image is *accepted*
(``id_score >= threshold``); a rejected image is an abstention.

Calibration (:mod:`.conformal`): the threshold is set on the held-out ID validation split
``suite.id_val``, which no part of the guard was fitted on (the detector is fitted on ``suite.id_train``,
disjoint by construction and checked by image content) and which holds no OOD data. By default it is
the split-conformal threshold, the ``floor((n + 1) alpha)``-th smallest of the ``n`` validation scores
(``alpha = 1 - target``): an exchangeable ID image is rejected with probability ``<= alpha``. With
``confidence = 1 - delta`` it is the PAC threshold: the ID rejection rate is ``<= alpha`` with probability
``>= 1 - delta`` over the calibration draw. The sorted calibration scores are kept with the guard, so
:meth:`GuardedClassifier.p_values` gives each image's conformal p-value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..data.base import ArrayDataset, Suite
from ..data.images import ImagePipeline, pipeline_of
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


def calibrate_threshold(id_val_scores: np.ndarray, target: float, confidence: float | None = None,
                        rule: str | None = None) -> float:
    """The threshold of :func:`oodforge.deploy.conformal.calibrate` (accept ``score >= threshold``).

    Default: split conformal, the ``floor((n + 1)(1 - target))``-th smallest score; with ``confidence``,
    the PAC threshold; ``rule="quantile"``: the ``ceil(target * n)``-th largest score (oodforge's earlier
    rule, no guarantee).
    """
    from .conformal import calibrate

    return calibrate(id_val_scores, target, confidence, rule).threshold


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


def calibration_provenance(suite: Suite, outliers: FeatureSet | None = None) -> dict:
    """Which split calibrates and that it is disjoint from everything the detector was fitted on.

    The calibration split is ``suite.id_val`` (held-out ID images). It is compared by image *content*
    (:meth:`oodforge.data.base.ArrayDataset.fingerprints`) with the detector's fit data, ``suite.id_train``
    and the outlier store; ``shared_images`` counts validation images whose exact pixels also occur there
    (0 for the embedded suites; duplicates inside a user's source data would show here).
    """
    val = suite.id_val
    doc = {"set": "id_val", "identity": val.identity, "n": len(val),
           "fit_data": ["id_train"] + (["outliers"] if outliers is not None else []),
           "disjoint_by": "construction (oodforge.data.suites.with_validation_split)"}
    fingerprints = getattr(val, "fingerprints", None)
    if callable(fingerprints):
        fp = fingerprints()
        shared = {"id_train": int(np.isin(fp, suite.id_train.fingerprints()).sum())}
        store = getattr(outliers, "images", None) if outliers is not None else None
        if callable(getattr(store, "fingerprints", None)):
            shared["outliers"] = int(np.isin(fp, store.fingerprints()).sum())
        doc.update({"disjoint_by": "construction, checked by image content (64-bit BLAKE2b per image)",
                    "shared_images": shared})
    return doc


class GuardedClassifier:
    """Classifier + fitted detector + threshold; see the module docstring.

    Build one with :meth:`fit` (from a suite) or :meth:`load` (from an export folder), save it
    with :meth:`save`.
    """

    def __init__(self, model: Classifier, detector: Detector, threshold: float, *, target: float | None = None,
                 class_names: list[str] | None = None, image_shape: tuple[int, int, int] | None = None,
                 rates: dict | None = None, provenance: dict | None = None, device: str = "cpu",
                 calibration: dict | None = None, calibration_scores: np.ndarray | None = None) -> None:
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
        #: ``guard.json["calibration"]``: rule, n, k, alpha, delta, the guaranteed bound (:class:`.conformal.Calibration`)
        self.calibration = calibration
        #: the sorted ID-validation scores the threshold was set on (for conformal p-values); None for old exports
        self.calibration_scores = None if calibration_scores is None else np.sort(
            np.asarray(calibration_scores, np.float64).ravel())

    # --- building --------------------------------------------------------------------------
    @classmethod
    def fit(cls, model: Classifier, suite: Suite, method: str | Detector, outliers: ArrayDataset | None = None,
            target: float = 0.95, device: str = "cpu", batch_size: int = 256, cache_dir: str | Path | None = None,
            seed: int = 0, progress: bool = False, extra: dict | None = None, confidence: float | None = None,
            rule: str | None = None) -> GuardedClassifier:
        """Fit ``method`` as :func:`oodforge.bench.run_bench` does, calibrate on ``suite.id_val`` and
        record the achieved ID-test acceptance rate and the FPR on every OOD set.

        ``method`` is a bench method spec (``"knn:k=10"``) or an unfitted detector. ``confidence``
        (``1 - delta``) selects the PAC threshold instead of the split-conformal one; ``rule`` is one of
        :data:`.conformal.RULES`. A validation split too small for the rule fails before the detector is fitted.
        """
        from .. import __version__
        from ..bench import _FeatureCache, _with_images, check_fit_inputs
        from ..models.checkpoint import weights_hash

        if suite.id_val is None or len(suite.id_val) == 0:
            raise ValueError(f"suite {suite.name!r} has no ID validation split (suite.id_val): the threshold is "
                             "calibrated on held-out ID images (see oodforge.data.suites.with_validation_split)")
        from .conformal import calibrate, min_calibration_size

        rule = rule or ("pac" if confidence is not None else "split-conformal")
        if rule != "quantile" and float(target) < 1:  # too few calibration images: say so before any work
            alpha, delta = 1 - float(target), None if confidence is None else 1 - float(confidence)
            need = min_calibration_size(alpha, delta)
            if len(suite.id_val) < need:
                calibrate(np.zeros(len(suite.id_val)), target, confidence, rule)  # raises, naming the minimum
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
            cal = calibrate(s_val, target, confidence, rule)
            threshold = cal.threshold
            test_fs = _with_images(cache.get(suite.id_test, fmap), suite.id_test)
            s_id = det.score(test_fs)
            s_ood = {n: det.score(_with_images(cache.get(ds, fmap), ds)) for n, ds in suite.ood.items()}
        acc = float((test_fs.logits.argmax(1) == suite.id_test.labels).double().mean())
        rates = {"id_val_acceptance": acceptance_rate(s_val, threshold),
                 "id_test_acceptance": acceptance_rate(s_id, threshold),
                 "ood_fpr": {n: acceptance_rate(s, threshold) for n, s in s_ood.items()}}
        provenance = {"suite": suite.name, "method": spec, "seed": seed, "oodforge": __version__,
                      "torch": torch.__version__, "weights_hash": weights_hash(model), "id_test_accuracy": acc,
                      "calibration": calibration_provenance(suite, out_fs),
                      "sets": {"id_test": len(suite.id_test), **{n: len(ds) for n, ds in suite.ood.items()}},
                      "metrics": {n: evaluate(s_id, s) for n, s in s_ood.items()}}
        guard = cls(model, det, threshold, target=float(target), class_names=suite.class_names,
                    image_shape=suite.image_shape, rates=rates, provenance=provenance, device=device,
                    calibration=cal.as_dict(), calibration_scores=s_val)
        guard.fit_scores = {"id_val": s_val, "id": s_id, **s_ood}  # the arrays the rates come from
        guard.pipeline = pipeline_of(suite)  # how the suite's image files were read: predict reads them the same way
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

    def p_values(self, id_score: np.ndarray) -> np.ndarray:
        """Conformal p-values ``(1 + #{cal <= s}) / (n + 1)`` of ID scores (small = evidence of OOD;
        :func:`.conformal.conformal_p_values`). ``p <= alpha`` is the split-conformal rejection rule."""
        from .conformal import conformal_p_values

        if self.calibration_scores is None:
            raise ValueError("this guarded classifier holds no calibration scores (exported by an older oodforge): "
                             "re-export it with `oodforge export` to get conformal p-values")
        return conformal_p_values(self.calibration_scores, id_score)

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, onnx: bool = False) -> Path:
        """Write the export folder (see :mod:`oodforge.deploy.fileformat`); ``onnx`` also writes ``guard.onnx``."""
        from .fileformat import save_guard

        return save_guard(self, path, onnx=onnx)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> GuardedClassifier:
        """Read an export folder, verifying its format version and every file's sha256."""
        from .fileformat import read_guard

        model, detector, doc, folder, cal_scores = read_guard(path, device)
        pre = doc["preprocessing"]
        guard = cls(model, detector, doc["threshold"], target=doc.get("target_acceptance"),
                    class_names=doc.get("class_names"), image_shape=(pre["channels"], *pre["image_size"]),
                    rates=doc.get("rates"), provenance=doc.get("provenance"), device=device,
                    calibration=doc.get("calibration"), calibration_scores=cal_scores)
        guard.manifest = doc
        guard.pipeline = ImagePipeline.from_dict(pre.get("pipeline"))  # (older guards: the default pipeline)
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
