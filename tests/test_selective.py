"""Selective-classification metrics (oodforge.selective) and bootstrap / DeLong intervals (oodforge.intervals),
against hand computations and independent brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from oodforge.intervals import (
    bootstrap_counts,
    bootstrap_intervals,
    paired_auroc_difference,
    weighted_auroc_fpr,
)
from oodforge.metrics import auroc, evaluate
from oodforge.selective import at_coverage, augrc, aurc, risk_coverage_curve, selective_metrics


def test_worked_example_by_hand():
    # confidences 0.9 > 0.8 > 0.7 > 0.6, the 0.8 one misclassified
    g, correct = [0.9, 0.8, 0.7, 0.6], [True, False, True, True]
    # RC points (coverage, selective risk, generalized risk): (1/4, 0, 0) (2/4, 1/2, 1/4) (3/4, 1/3, 1/4) (1, 1/4, 1/4)
    # AUGRC = trapezoids from (0, 0): 0 + 1/4 (0 + 1/4) / 2 + 1/4 (1/4 + 1/4) / 2 + 1/4 (1/4 + 1/4) / 2 = 5/32
    assert augrc(g, correct) == pytest.approx(5 / 32, abs=1e-15)
    # AURC from (0, 0) (the risk at the smallest coverage): 0 + (0 + 1/2) / 8 + (1/2 + 1/3) / 8 + (1/3 + 1/4) / 8
    assert aurc(g, correct) == pytest.approx((0.5 + 5 / 6 + 7 / 12) / 8, abs=1e-15)
    m = selective_metrics(g, correct)
    assert m["accuracy"] == 0.75 and m["coverage_at_90"] == 1.0 and m["risk_at_90"] == 0.25
    assert at_coverage(g, correct, 0.5) == {"coverage": 0.5, "risk": 0.5, "accuracy": 0.5, "threshold": 0.8}
    # ties: both 1.0-images are accepted together (one RC point at coverage 1/2)
    rc = risk_coverage_curve([1.0, 1.0, 0.0, 0.0], [True, False, True, True])
    assert rc.accepted.tolist() == [2, 4] and rc.errors.tolist() == [1, 1]
    assert augrc([1.0, 1.0, 0.0, 0.0], [True, False, True, True]) == pytest.approx(0.5 * 0.25 / 2 + 0.5 * 0.25)
    with pytest.raises(ValueError, match="one flag per confidence"):
        aurc([0.1, 0.2], [True])


def _fd_shifts_reference(g, correct):
    """The RC curve as fd-shifts' rc_stats builds it (ascending confidences, one point per distinct value,
    a (0, last risk) / (0, 0) end) and numpy's trapezoid: an independent loop."""
    order = np.argsort(g)
    g, res = np.asarray(g)[order], (~np.asarray(correct))[order].astype(float)
    n = len(g)
    cov, err = n, res.sum()
    covs, sr, gr = [1.0], [err / n], [err / n]
    for i in range(n - 1):
        cov -= 1
        err -= res[i]
        if g[i] != g[i + 1]:
            covs.append(cov / n)
            sr.append(err / cov)
            gr.append(err / n)
    covs, sr_end, gr_end = covs + [0.0], sr + [sr[-1]], gr + [0.0]
    trap = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    return -trap(sr_end, covs), -trap(gr_end, covs)


def test_against_fd_shifts_curve_and_the_pairwise_definition():
    rng = np.random.default_rng(0)
    for ties in (False, True):
        g = rng.integers(0, 12, 400).astype(float) if ties else rng.normal(size=400)
        correct = rng.random(400) < 0.8
        ref_aurc, ref_augrc = _fd_shifts_reference(g, correct)
        assert aurc(g, correct) == pytest.approx(ref_aurc, abs=1e-12)
        assert augrc(g, correct) == pytest.approx(ref_augrc, abs=1e-12)
        # AUGRC = P(image i is misclassified and ranked above image j), i, j independent, ties one half
        above = (g[:, None] > g[None, :]) + 0.5 * (g[:, None] == g[None, :])
        assert augrc(g, correct) == pytest.approx(float(((~correct)[:, None] * above).mean()), abs=1e-12)
    # an oracle confidence (every error ranked last) reaches the optimum 0.5 * error_rate^2
    correct = rng.random(1000) < 0.9
    assert augrc(correct.astype(float) + rng.random(1000) * 0.1, correct) == pytest.approx(
        0.5 * np.mean(~correct) ** 2, abs=1e-12)


def test_bootstrap_replicates_equal_metrics_on_explicit_resamples():
    rng = np.random.default_rng(1)
    id_s = rng.integers(0, 25, 300).astype(float)  # heavy ties
    ood_s = rng.integers(-8, 18, 200).astype(float)
    W, V = bootstrap_counts(300, 40, rng), bootstrap_counts(200, 40, rng)
    assert (W.sum(1) == 300).all() and (V.sum(1) == 200).all()
    a, f = weighted_auroc_fpr(id_s, ood_s, W, V)
    for b in range(40):
        ref = evaluate(np.repeat(id_s, W[b]), np.repeat(ood_s, V[b]))
        assert a[b] == pytest.approx(ref["auroc"], abs=1e-12) and f[b] == pytest.approx(ref["fpr95"], abs=1e-12)
    iv = bootstrap_intervals(id_s, ood_s, n_boot=300, seed=3)
    assert iv == bootstrap_intervals(id_s, ood_s, n_boot=300, seed=3)  # seeded
    point = evaluate(id_s, ood_s)
    assert iv["auroc"][0] < point["auroc"] < iv["auroc"][1] and iv["fpr95"][0] <= point["fpr95"] <= iv["fpr95"][1]
    # the interval's width matches the normal-theory standard error of the AUROC (Hanley & McNeil 1982)
    x, y = rng.normal(1, 1, 2000), rng.normal(0, 1, 2000)
    A = auroc(x, y)
    q1, q2 = A / (2 - A), 2 * A * A / (1 + A)
    se = np.sqrt((A * (1 - A) + (2000 - 1) * (q1 - A * A) + (2000 - 1) * (q2 - A * A)) / (2000 * 2000))
    lo, hi = bootstrap_intervals(x, y, n_boot=1000)["auroc"]
    assert (hi - lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.15)


def test_paired_auroc_difference():
    rng = np.random.default_rng(2)
    id_s, ood_s = rng.normal(1, 1, 400), rng.normal(0, 1, 300)
    # a monotone transform ranks the images identically: no difference, whatever the method
    for method in ("bootstrap", "delong"):
        d = paired_auroc_difference(id_s, ood_s, np.exp(id_s), np.exp(ood_s), method=method, n_boot=200)
        assert d.difference == 0 and d.low == d.high == 0 and d.p_value == 1.0 and not d.significant
    # b = a plus noise: a is better; both tests agree on the size and the significance
    id_b, ood_b = id_s + rng.normal(0, 1.5, 400), ood_s + rng.normal(0, 1.5, 300)
    boot = paired_auroc_difference(id_s, ood_s, id_b, ood_b, n_boot=2000, seed=0)
    de = paired_auroc_difference(id_s, ood_s, id_b, ood_b, method="delong")
    assert boot.difference == de.difference == pytest.approx(auroc(id_s, ood_s) - auroc(id_b, ood_b))
    assert boot.significant and de.significant and boot.low > 0 and boot.p_value < 0.01 and de.p_value < 0.01
    assert boot.high - boot.low == pytest.approx(de.high - de.low, rel=0.2)
    # the pairing matters: the paired interval is narrower than the two unpaired intervals combined
    ia, ib = bootstrap_intervals(id_s, ood_s)["auroc"], bootstrap_intervals(id_b, ood_b)["auroc"]
    assert boot.high - boot.low < np.hypot(ia[1] - ia[0], ib[1] - ib[0])
    with pytest.raises(ValueError, match="same images"):
        paired_auroc_difference(id_s, ood_s, id_b[:-1], ood_b)


def test_midranks_by_definition():
    from oodforge.intervals import _midranks

    x = np.random.default_rng(3).integers(0, 10, 200).astype(float)
    # rank_i = #{x_j < x_i} + (#{x_j == x_i} + 1) / 2 (scipy.stats.rankdata's "average")
    ref = (x[None, :] < x[:, None]).sum(1) + ((x[None, :] == x[:, None]).sum(1) + 1) / 2
    np.testing.assert_array_equal(_midranks(x), ref)


def test_bootstrap_intervals_are_the_same_with_kept_and_with_freshly_drawn_counts(monkeypatch):
    """The report keeps the seeded multiplicities it drew (intervals._cached_counts) while they are small; above
    the size limit it draws them anew: both must give the same replicates, and a second call the same again."""
    from oodforge import intervals

    rng = np.random.default_rng(5)
    id_s, ood_s = rng.normal(1, 1, 700), np.round(rng.normal(0, 1, 300), 1)  # ties on the OOD side
    intervals._cached_counts.cache_clear()
    kept = [intervals.bootstrap_intervals(id_s, ood_s, n_boot=300, seed=2) for _ in range(2)]
    monkeypatch.setattr(intervals, "_COUNTS_BYTES", 0)
    fresh = intervals.bootstrap_intervals(id_s, ood_s, n_boot=300, seed=2)
    assert kept[0] == kept[1] == fresh
    assert intervals._cached_counts.cache_info().hits >= 1
