"""Score fusion: combine two detectors through their ID percentiles on held-out ID data.

``fusion:a=shift,b=knn`` fits both detectors on the same :class:`FitContext`, scores the held-out
ID validation set (``FitContext.val``) with each, and turns every later score ``s_d(x)`` into its
ID percentile ``F_d(s_d(x))`` = the fraction of validation scores <= ``s_d(x)`` (the empirical CDF;
a p-value under "x is ID"). The fused score is

    rule="min":  min(F_a(s_a(x)), F_b(s_b(x)))      (flag x when *either* detector finds it unusual)
    rule="mean": (F_a(s_a(x)) + F_b(s_b(x))) / 2

Percentiles put two scores of different scales on one ID-calibrated axis without fitting any
weight to outliers; nothing here sees OOD data. Percentiles are multiples of ``1/n`` (``n``
validation images), so every image beyond the validation range would tie at 0; a per-image
tie-breaker ``0.25/n * mean_d tanh((s_d - mean_d) / std_d)`` (validation mean/std) orders those
by their standardised raw scores without ever reordering two distinct percentiles.

Within one benchmark job the parts are usually run on their own too (``shift``, ``knn``,
``fusion:a=shift,b=knn``). :class:`FittedParts` (handed over as ``FitContext.extra[FITTED]`` by
:mod:`oodforge.bench`) holds the job's fitted detectors by method spec and their scores by
``(spec, dataset identity)``: a part fitted already is reused rather than fitted again, and a part's
scores on a set are computed once for every method that needs them. The parts see the same
training data, outliers, validation data and seed either way, so the fused scores are bit-identical
with and without reuse (tests/test_reuse.py).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .base import Detector, FitContext, create, register

RULES = ("min", "mean")
#: the ``FitContext.extra`` key of a job's :class:`FittedParts`
FITTED = "fitted"


class FittedParts:
    """One job's fitted detectors by method spec (``fitted["knn"]``) and the scores they gave, by
    ``(spec, identity of FeatureSet.images)``: what ``fusion`` reuses instead of fitting and scoring again.

    Valid for one classifier and one fit context (train / outliers / val / seed), i.e. one
    :class:`~oodforge.bench.BenchJob`; :meth:`clear` it when the job ends. It holds no dataset (the protocol
    guard scans ``FitContext.extra`` for datasets)."""

    def __init__(self) -> None:
        self.fitted: dict[str, Detector] = {}
        self.scores: dict[tuple[str, str], np.ndarray] = {}

    def score(self, spec: str, det: Detector, feats) -> np.ndarray:
        """``det.score(feats)``, computed once per ``(spec, feats.images.identity)``; features without
        attached images (no identity) are always scored."""
        ident = getattr(getattr(feats, "images", None), "identity", None)
        if ident is None:
            return det.score(feats)
        key = (spec, str(ident))
        if key not in self.scores:
            self.scores[key] = det.score(feats)
        return self.scores[key]

    def clear(self) -> None:
        self.fitted.clear()
        self.scores.clear()


# a fitted Fusion's FittedParts, kept outside its attributes so that exporting its state
# (oodforge.deploy.state reads vars()) sees only the parts and percentiles
_PARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def id_percentile(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Fraction of ``reference`` (ID validation) scores <= each score: the empirical ID CDF."""
    ref = np.sort(np.asarray(reference, np.float64))
    return np.searchsorted(ref, np.asarray(scores, np.float64), side="right") / len(ref)


@register
class Fusion(Detector):
    """ID-percentile fusion of two detectors (``a``, ``b``) calibrated on held-out ID data."""

    name = "fusion"
    paper = ("score fusion by ID percentiles on held-out ID data (oodforge; cf. conformal p-values, "
             "Bates et al., Ann. Stat. 2023)")

    def __init__(self, a: str = "shift", b: str = "knn", rule: str = "min"):
        if rule not in RULES:
            raise ValueError(f"fusion rule must be one of {', '.join(RULES)}, got {rule!r}")
        if a == "fusion" or b == "fusion":
            raise ValueError("fusion combines two other detectors; nest them in Python, not by name")
        self.a, self.b, self.rule = a, b, rule
        parts = (create(a), create(b))  # validates the names now, before any work
        self.needs_outliers = any(p.needs_outliers for p in parts)
        self.needs_inputs = any(p.needs_inputs for p in parts)
        self.needs_feature_map = any(getattr(p, "needs_feature_map", False) for p in parts)
        # the training set's maps only when a part that needs maps reads them in fit (as run_bench does for it)
        self.needs_train_feature_map = any(getattr(p, "needs_feature_map", False) and
                                           getattr(p, "needs_train_feature_map", True) for p in parts)

    def _fit(self, ctx: FitContext) -> None:
        if ctx.val is None or len(ctx.val) == 0:
            raise ValueError("fusion calibrates on held-out ID data: the suite needs an ID validation split "
                             "(FitContext.val)")
        parts = (ctx.extra or {}).get(FITTED)
        if isinstance(parts, FittedParts):
            _PARTS[self] = parts
        else:  # fitted outside a benchmark job (or refitted): fit and score its own parts
            _PARTS.pop(self, None)
            parts = None
        self.det_a_, self.det_b_ = self._part(self.a, ctx, parts), self._part(self.b, ctx, parts)
        self.ref_a_ = self._part_scores(self.a, self.det_a_, ctx.val)
        self.ref_b_ = self._part_scores(self.b, self.det_b_, ctx.val)
        self.stats_ = [(r.mean(), r.std() + 1e-12) for r in (self.ref_a_, self.ref_b_)]

    @staticmethod
    def _part(spec: str, ctx: FitContext, parts: FittedParts | None) -> Detector:
        """The part ``spec`` fitted on ``ctx``: the job's when it fitted one already (then also kept for it)."""
        if parts is not None and spec in parts.fitted:
            return parts.fitted[spec]
        det = create(spec).fit(ctx)
        if parts is not None:
            parts.fitted[spec] = det
        return det

    def _part_scores(self, spec: str, det: Detector, feats) -> np.ndarray:
        parts = _PARTS.get(self)
        # the cached scores belong to the parts the job fitted; a part replaced since (set_params) is scored
        if parts is None or parts.fitted.get(spec) is not det:
            return det.score(feats)
        return parts.score(spec, det, feats)

    def _score(self, feats) -> np.ndarray:
        sa, sb = self._part_scores(self.a, self.det_a_, feats), self._part_scores(self.b, self.det_b_, feats)
        pa, pb = id_percentile(self.ref_a_, sa), id_percentile(self.ref_b_, sb)
        fused = np.minimum(pa, pb) if self.rule == "min" else 0.5 * (pa + pb)
        z = 0.5 * sum(np.tanh((s - m) / sd) for s, (m, sd) in zip((sa, sb), self.stats_))
        return torch.as_tensor(fused + 0.25 * z / len(self.ref_a_))
