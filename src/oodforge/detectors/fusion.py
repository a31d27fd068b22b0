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
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Detector, FitContext, create, register

RULES = ("min", "mean")


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

    def _fit(self, ctx: FitContext) -> None:
        if ctx.val is None or len(ctx.val) == 0:
            raise ValueError("fusion calibrates on held-out ID data: the suite needs an ID validation split "
                             "(FitContext.val)")
        self.det_a_, self.det_b_ = create(self.a).fit(ctx), create(self.b).fit(ctx)
        self.ref_a_ = self.det_a_.score(ctx.val)
        self.ref_b_ = self.det_b_.score(ctx.val)
        self.stats_ = [(r.mean(), r.std() + 1e-12) for r in (self.ref_a_, self.ref_b_)]

    def _score(self, feats) -> np.ndarray:
        sa, sb = self.det_a_.score(feats), self.det_b_.score(feats)
        pa, pb = id_percentile(self.ref_a_, sa), id_percentile(self.ref_b_, sb)
        fused = np.minimum(pa, pb) if self.rule == "min" else 0.5 * (pa + pb)
        z = 0.5 * sum(np.tanh((s - m) / sd) for s, (m, sd) in zip((sa, sb), self.stats_))
        return torch.as_tensor(fused + 0.25 * z / len(self.ref_a_))
