"""Distribution-free guarantees for a guard's threshold: split conformal, PAC (Learn-then-Test),
conformal p-values and Benjamini-Hochberg.

Setting. ``cal`` holds the scores (higher = more in-distribution) of ``n`` ID calibration images that
no part of the guard was fitted on; a new ID image is *exchangeable* with them (drawn from the same
distribution, independently of how the calibration set was drawn). An image is **accepted** when its
score is ``>= threshold`` and **rejected** (the guard abstains) otherwise. Every threshold below is
the ``k``-th smallest calibration score ``s_(k)`` for some rank ``k``; ``alpha`` is the ID rejection
rate the user tolerates (``alpha = 1 - target``).

1. **Split conformal** (:func:`split_conformal_rank`; Vovk et al. 2005, Lei et al. 2018, Angelopoulos &
   Bates 2023, Sec. 1). With ``k = floor((n + 1) * alpha)``, rejecting every score ``< s_(k)`` gives

       P(an exchangeable ID image is rejected) = k / (n + 1) <= alpha          (no ties)
       P(...) <= k / (n + 1)                                                   (ties)

   and ``k / (n + 1) > alpha - 1 / (n + 1)``: the rate is at most ``alpha`` and, without ties, at
   least ``alpha - 1/(n + 1)``. The probability is over the calibration set *and* the new image
   (marginal). Proof: the new score's rank among the ``n + 1`` is uniform, and it is rejected exactly
   when it is among the ``k`` smallest. **Ties**: the rule rejects only scores *strictly* below
   ``s_(k)``, so an image tied with ``s_(k)`` is accepted; ties can only lower the rejection rate
   (the upper bound holds, the lower one need not). ``k = 0`` (``n + 1 < 1 / alpha``) would reject
   nothing: refused, the guard needs ``n >= ceil(1 / alpha) - 1`` images.

2. **PAC / training-conditional** (:func:`pac_rank`; Vovk 2012, Prop. 2a; Learn-then-Test, Angelopoulos
   et al. 2021, with the binomial-tail p-value and fixed-sequence testing; Park et al. 2020). The ID
   rejection rate of the *fixed* threshold ``R(t) = P(score < t)`` is a random variable over the
   calibration draw. With

       k* = max { k >= 1 : BinomCDF(k - 1; n, alpha) <= delta }

   the threshold ``s_(k*)`` satisfies ``P_cal( R(s_(k*)) > alpha ) <= delta``. Proof: let
   ``q = inf{t : R(t) > alpha}``; ``R(s_(k)) > alpha`` means ``s_(k) > q``, i.e. at most ``k - 1``
   calibration scores are ``<= q``, and that count is ``Binomial(n, P(score <= q))`` with
   ``P(score <= q) >= alpha``. This holds for any score distribution, ties included, and equals
   Learn-then-Test's fixed-sequence procedure over thresholds from low to high with p-value
   ``BinomCDF(#{cal < t}; n, alpha)`` (``<= delta`` exactly when the Clopper-Pearson upper bound of
   the rejection rate at level ``1 - delta`` is ``<= alpha``). Without ties the bound is tight:
   ``R(s_(k)) ~ Beta(k, n + 1 - k)``. It needs ``(1 - alpha)^n <= delta``, i.e.
   ``n >= log(delta) / log(1 - alpha)`` (:func:`min_calibration_size`; 90 images for alpha = 0.05,
   delta = 0.01); fewer are refused.

3. **Conformal p-values** (:func:`conformal_p_values`; Bates et al. 2023, "Testing for outliers with
   conformal p-values", eq. 3). For the null "this image is ID" and scores where *low* means OOD,

       p(s) = (1 + #{i : cal_i <= s}) / (n + 1)

   is super-uniform for an exchangeable ID image (``P(p <= u) <= u``; ties count against the image,
   so they only make ``p`` larger). ``p(s) <= alpha`` is exactly the split-conformal rejection rule
   (``s < s_(k)``), since ``(n + 1) p`` is an integer.

4. **Benjamini-Hochberg** (:func:`benjamini_hochberg`; Benjamini & Hochberg 1995). Conformal p-values
   of one batch sharing a calibration set are PRDS (Bates et al. 2023, Thm. 2), so BH at level ``q``
   controls the false discovery rate (the expected share of ID images among those flagged OOD) at
   ``q * m0 / m <= q``.

5. **Exchangeability check** (:func:`batch_rejection_p_value`): without ties and given the calibration
   set, each new ID image is rejected independently with probability ``R(s_(k)) ~ Beta(k, n + 1 - k)``,
   so the number of rejected images among ``m`` exchangeable ID images is Beta-binomial
   ``(m, k, n + 1 - k)``. A batch rejecting far more is evidence that it is not exchangeable with the
   calibration set: OOD images, or ID images from a shifted source.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Calibration", "RULES", "batch_rejection_p_value", "benjamini_hochberg", "calibrate",
           "conformal_p_values", "min_calibration_size", "pac_rank", "split_conformal_rank"]

#: the calibration rules of :func:`calibrate` (``quantile`` is oodforge's earlier, guarantee-free rule)
RULES = ("split-conformal", "pac", "quantile")
_EPS = 1e-9  # (n + 1) * alpha is an integer up to float rounding (0.05 * 100 = 5.000000000000001)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"the tolerated ID rejection rate alpha = 1 - target must be in (0, 1), got {alpha}")
    return alpha


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta = 1 - confidence must be in (0, 1), got {delta} (confidence {1 - delta})")
    return delta


def min_calibration_size(alpha: float, delta: float | None = None) -> int:
    """The fewest calibration images for which a rule rejects anything.

    Split conformal (``delta`` None): ``floor((n + 1) alpha) >= 1``, i.e. ``n >= ceil(1 / alpha) - 1``.
    PAC: ``(1 - alpha)^n <= delta``, i.e. ``n >= log(delta) / log(1 - alpha)``.
    """
    alpha = _check_alpha(alpha)
    if delta is None:
        return max(1, math.ceil(1.0 / alpha - _EPS) - 1)
    delta = _check_delta(delta)
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha) - _EPS))
    while n > 1 and (1.0 - alpha) ** (n - 1) <= delta:  # guard the float rounding of the logarithms
        n -= 1
    while (1.0 - alpha) ** n > delta:
        n += 1
    return n


def split_conformal_rank(n: int, alpha: float) -> int:
    """``k = floor((n + 1) alpha)``: reject below the ``k``-th smallest of ``n`` calibration scores (0 = none)."""
    return min(int(math.floor((int(n) + 1) * _check_alpha(alpha) + _EPS)), int(n))


def pac_rank(n: int, alpha: float, delta: float) -> int:
    """``k* = max{k >= 1 : BinomCDF(k - 1; n, alpha) <= delta}`` (0 when even ``k = 1`` fails)."""
    from scipy.stats import binom

    alpha, delta, n = _check_alpha(alpha), _check_delta(delta), int(n)
    cdf = binom.cdf(np.arange(n), n, alpha)  # cdf[j] = P(Bin(n, alpha) <= j), j = k - 1
    ok = np.flatnonzero(cdf <= delta)
    return int(ok[-1]) + 1 if ok.size else 0


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and what it guarantees (stored as ``guard.json["calibration"]``).

    ``threshold = s_(k)`` (the ``k``-th smallest of the ``n`` calibration scores); accept ``score >= threshold``.
    ``rejection_bound`` is the guaranteed bound on the ID rejection rate: marginal ``k / (n + 1)``
    (split conformal) or ``alpha`` with probability ``>= 1 - delta`` over the calibration draw (PAC);
    ``None`` for the ``quantile`` rule, which guarantees nothing.
    """

    rule: str
    threshold: float
    n: int
    k: int
    alpha: float
    delta: float | None
    rejection_bound: float | None
    min_n: int
    calibration_rejection: float  # share of the calibration scores below the threshold

    def guarantee(self) -> str:
        """One sentence a user can quote."""
        if self.rule == "split-conformal":
            return (f"rejects an exchangeable ID image with probability <= {100 * self.rejection_bound:.2f} % "
                    f"(split conformal, n = {self.n})")
        if self.rule == "pac":
            return (f"rejects <= {100 * self.alpha:.2f} % of exchangeable ID images, with probability >= "
                    f"{1 - self.delta:g} over the calibration draw (PAC, n = {self.n})")
        return f"no guarantee (empirical {100 * (1 - self.alpha):.1f} % quantile of n = {self.n} scores)"

    def as_dict(self) -> dict:
        return {**asdict(self), "guarantee": self.guarantee()}


def _scores(cal) -> np.ndarray:
    s = np.asarray(cal, np.float64).ravel()
    if s.size == 0:
        raise ValueError("cannot calibrate a threshold on zero calibration scores")
    if not np.isfinite(s).all():
        raise ValueError("the detector gave non-finite calibration scores; cannot calibrate a threshold")
    return np.sort(s)


def calibrate(cal, target: float, confidence: float | None = None, rule: str | None = None) -> Calibration:
    """Threshold on calibration scores ``cal`` for ID acceptance ``target`` (``alpha = 1 - target``).

    ``rule`` defaults to ``"pac"`` when ``confidence`` (= ``1 - delta``) is given, else
    ``"split-conformal"``. ``"quantile"`` is oodforge's earlier rule (ours, no guarantee): the
    ``ceil(target * n)``-th largest score. Raises ``ValueError`` naming the minimum calibration size
    when ``cal`` is too small for the rule to reject anything.
    """
    s = _scores(cal)
    n = s.size
    target = float(target)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target acceptance rate must be in (0, 1], got {target}")
    rule = rule or ("pac" if confidence is not None else "split-conformal")
    if rule not in RULES:
        raise ValueError(f"unknown calibration rule {rule!r}; choose one of {', '.join(RULES)}")
    if confidence is not None and rule != "pac":
        raise ValueError(f"confidence is a parameter of the 'pac' rule, not of {rule!r}")
    alpha = round(1.0 - target, 12)  # 1 - 0.95 = 0.050000000000000044 in floats
    if rule == "quantile":
        j = min(max(int(math.ceil(target * n - _EPS)), 1), n)  # the j-th largest = the (n - j + 1)-th smallest
        k, delta, bound, min_n = n - j + 1, None, None, 1
    elif target == 1.0:
        raise ValueError("target 1.0 (reject no ID image) needs no calibration and has no conformal threshold: "
                         "give a target below 1, e.g. 0.95")
    elif rule == "split-conformal":
        k, delta, min_n = split_conformal_rank(n, alpha), None, min_calibration_size(alpha)
        bound = k / (n + 1)
    else:
        if confidence is None:
            raise ValueError("the 'pac' rule needs confidence = 1 - delta, e.g. 0.99")
        delta = _check_delta(round(1.0 - float(confidence), 12))
        k, bound, min_n = pac_rank(n, alpha, delta), alpha, min_calibration_size(alpha, delta)
    if k < 1:
        what = (f"with confidence {1 - delta:g} (PAC: (1 - alpha)^n <= delta)" if rule == "pac"
                else "(split conformal: floor((n + 1) alpha) >= 1)")
        raise ValueError(f"{n} calibration images are too few to guarantee ID rejection <= {alpha:g} {what}: "
                         f"the rule needs at least {min_n}; use a larger ID validation split or a lower target")
    thr = float(s[k - 1])
    return Calibration(rule=rule, threshold=thr, n=n, k=k, alpha=alpha, delta=delta, rejection_bound=bound,
                       min_n=min_n, calibration_rejection=float(np.searchsorted(s, thr, side="left") / n))


def conformal_p_values(cal, scores) -> np.ndarray:
    """``p(s) = (1 + #{cal <= s}) / (n + 1)`` per score (higher score = more ID; small p = evidence of OOD)."""
    s = _scores(cal)
    x = np.asarray(scores, np.float64).ravel()
    counts = np.searchsorted(s, x, side="right")  # #{cal <= x}; NaN sorts last -> p = 1 (never flagged)
    return (1.0 + counts) / (s.size + 1.0)


def benjamini_hochberg(p_values, q: float) -> np.ndarray:
    """Boolean mask of the hypotheses BH rejects at FDR level ``q``: all ``p <= p_(j)`` with
    ``j = max{i : p_(i) <= i q / m}`` (none when no such ``i``)."""
    q = float(q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"the false discovery rate q must be in (0, 1), got {q}")
    p = np.asarray(p_values, np.float64).ravel()
    m = p.size
    if m == 0:
        return np.zeros(0, dtype=bool)
    ps = np.sort(p)
    ok = np.flatnonzero(ps <= q * np.arange(1, m + 1) / m)
    if not ok.size:
        return np.zeros(m, dtype=bool)
    return p <= ps[ok[-1]]


def batch_rejection_p_value(rejected: int, m: int, k: int, n: int) -> float:
    """P(at least ``rejected`` of ``m`` exchangeable ID images are rejected) under the Beta-binomial
    ``(m, k, n + 1 - k)`` law of a threshold ``s_(k)`` of ``n`` calibration scores (no ties)."""
    from scipy.stats import betabinom

    if m <= 0 or rejected <= 0:
        return 1.0
    return float(betabinom.sf(int(rejected) - 1, int(m), int(k), int(n) + 1 - int(k)))
