"""Selective classification: what abstaining costs and buys, from ID test predictions and a detector's scores.

A guarded classifier accepts the images scoring ``>= t`` (its *coverage* is the share accepted) and
classifies them; its errors on accepted images are the price. With ``N`` ID test images, confidences
``g_i`` (here: a detector's ID score, higher = more confident) and ``e_i = 1`` when the classifier is
wrong on image ``i``:

    coverage(t)         = #{g >= t} / N
    selective risk(t)   = #{g >= t, e = 1} / #{g >= t}     (error rate among the accepted)
    generalized risk(t) = #{g >= t, e = 1} / N             (accepted *and* wrong, Traub et al. 2024, eq. 4)

The risk-coverage (RC) curve has one point per *distinct* confidence value (images tied at ``t`` are
accepted together, as in :mod:`oodforge.metrics`), plus the coverage-0 end: generalized risk 0 and
selective risk equal to that of the smallest non-empty coverage. Areas are trapezoids over coverage:

* **AURC** (Geifman et al. 2018): area under selective risk vs coverage;
* **AUGRC** (Traub et al. 2024, "Overcoming common flaws in the evaluation of selective classification
  systems", eq. 5): area under generalized risk vs coverage. It equals the probability that a random
  image is misclassified *and* ranked above another random image (ties: one half), i.e. the average
  risk of undetected failures over all working points; the trapezoid is exact for random tie breaking.

Both equal fd-shifts' ``RiskCoverageStats(confids, residuals).aurc`` / ``.augrc`` (the authors' code,
linear interpolation) divided by its display scale of 1000. Lower is better for both.

Fixed working points (:func:`at_coverage`): for coverage ``c`` the threshold is the **largest**
distinct confidence whose coverage is ``>= c`` (ties accepted together, as FPR95's threshold), and the
selective risk / accuracy there are reported with the achieved coverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import _runs, _validate

__all__ = ["COVERAGES", "RiskCoverage", "at_coverage", "augrc", "aurc", "risk_coverage_curve", "selective_metrics"]

#: the fixed coverages every bench result reports (results.json["selective"][method]["risk_at_90"], ...)
COVERAGES = (0.90, 0.95)


@dataclass(frozen=True)
class RiskCoverage:
    """The RC points, ordered by increasing coverage (decreasing threshold), without the coverage-0 end."""

    thresholds: np.ndarray
    accepted: np.ndarray  # int: images with confidence >= threshold
    errors: np.ndarray  # int: misclassified images among them
    n: int

    @property
    def coverage(self) -> np.ndarray:
        return self.accepted / self.n

    @property
    def selective_risk(self) -> np.ndarray:
        return self.errors / self.accepted

    @property
    def generalized_risk(self) -> np.ndarray:
        return self.errors / self.n


def _inputs(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    g = _validate(confidence, "confidence")
    c = np.asarray(correct.detach().cpu().numpy() if hasattr(correct, "detach") else correct)
    if c.shape != g.shape:
        raise ValueError(f"correct: expected one flag per confidence, shape {g.shape}, got {c.shape}")
    if c.dtype != bool and not np.isin(c, (0, 1)).all():
        raise ValueError("correct: expected booleans (prediction == label) or 0 / 1")
    return g, c.astype(bool)


def risk_coverage_curve(confidence, correct) -> RiskCoverage:
    """The RC points of confidences ``confidence`` (higher = accept first) and flags ``correct``."""
    g, c = _inputs(confidence, correct)
    order = np.argsort(-g, kind="stable")
    g_desc, err = g[order], (~c[order]).astype(np.int64)
    cum_err = np.cumsum(err)
    values, counts = _runs(g_desc[::-1])  # distinct values ascending
    if counts is None:
        ends = np.arange(1, g.size + 1)
    else:
        ends = np.cumsum(counts[::-1])  # descending values: images accepted at each distinct threshold
    return RiskCoverage(values[::-1], ends, cum_err[ends - 1], int(g.size))


def _area(cov: np.ndarray, risk: np.ndarray, risk_at_zero: float) -> float:
    x = np.concatenate(([0.0], cov))
    y = np.concatenate(([risk_at_zero], risk))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def aurc(confidence, correct) -> float:
    """Area under the selective-risk-coverage curve (trapezoid over the distinct-threshold RC points)."""
    rc = risk_coverage_curve(confidence, correct)
    return _area(rc.coverage, rc.selective_risk, float(rc.selective_risk[0]))


def augrc(confidence, correct) -> float:
    """Area under the generalized-risk-coverage curve (Traub et al. 2024); ``0.5 * error_rate**2`` at best."""
    rc = risk_coverage_curve(confidence, correct)
    return _area(rc.coverage, rc.generalized_risk, 0.0)


def at_coverage(confidence, correct, coverage: float) -> dict[str, float]:
    """Selective risk and accuracy at the largest threshold accepting at least ``coverage`` of the images."""
    if not 0.0 < float(coverage) <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    rc = risk_coverage_curve(confidence, correct)
    k = int(np.argmax(rc.coverage >= float(coverage) - 1e-12))  # the last point has coverage 1
    risk = float(rc.selective_risk[k])
    return {"coverage": float(rc.coverage[k]), "risk": risk, "accuracy": 1.0 - risk, "threshold": float(rc.thresholds[k])}


def selective_metrics(confidence, correct, coverages: tuple[float, ...] = COVERAGES) -> dict[str, float]:
    """Everything a bench result records per method: ``aurc``, ``augrc``, full-coverage ``accuracy`` and, per
    coverage ``c`` in percent, ``risk_at_{c}``, ``accuracy_at_{c}`` and the achieved ``coverage_at_{c}``."""
    rc = risk_coverage_curve(confidence, correct)
    out = {"aurc": _area(rc.coverage, rc.selective_risk, float(rc.selective_risk[0])),
           "augrc": _area(rc.coverage, rc.generalized_risk, 0.0),
           "accuracy": 1.0 - float(rc.errors[-1] / rc.n), "n": rc.n}
    for cov in coverages:
        k = int(np.argmax(rc.coverage >= float(cov) - 1e-12))
        tag = f"{100 * cov:g}"
        risk = float(rc.selective_risk[k])
        out.update({f"risk_at_{tag}": risk, f"accuracy_at_{tag}": 1.0 - risk, f"coverage_at_{tag}": float(rc.coverage[k])})
    return out
