"""oodforge.metrics against scikit-learn and a brute-force FPR@TPR, including heavy ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from oodforge import metrics as M


def sklearn_reference(id_s, ood_s, tpr=0.95) -> dict[str, float]:
    id_s, ood_s = np.asarray(id_s, float), np.asarray(ood_s, float)
    y = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    s = np.r_[id_s, ood_s]
    fpr, tpr_, _ = sk_roc_curve(y, s, drop_intermediate=False)
    return {"auroc": roc_auc_score(y, s), "aupr_in": average_precision_score(y, s),
            "aupr_out": average_precision_score(1 - y, -s), "fpr95": float(fpr[np.argmax(tpr_ >= tpr)])}


def brute_force_fpr(id_s, ood_s, tpr=0.95) -> float:
    """The documented definition, literally: the largest t keeping >= tpr of ID, then the OOD fraction >= t."""
    id_s, ood_s = np.asarray(id_s, float), np.asarray(ood_s, float)
    best_t = -np.inf
    for t in np.unique(np.r_[id_s, ood_s]):
        if np.mean(id_s >= t) >= tpr and t > best_t:
            best_t = t
    return float(np.mean(ood_s >= best_t))


def cases():
    rng = np.random.default_rng(0)
    yield "random", rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    yield "heavy_ties_int", rng.integers(0, 5, 400).astype(float), rng.integers(0, 4, 300).astype(float)
    yield "binary_scores", rng.integers(0, 2, 50).astype(float), rng.integers(0, 2, 70).astype(float)
    yield "all_equal", np.full(20, 3.0), np.full(13, 3.0)
    yield "separated", rng.uniform(2, 3, 40), rng.uniform(0, 1, 60)
    yield "reversed", rng.uniform(0, 1, 40), rng.uniform(2, 3, 60)
    yield "tiny_1v1", np.array([0.3]), np.array([0.1])
    yield "tiny_1v1_tie", np.array([0.3]), np.array([0.3])
    yield "tiny_1v1_reversed", np.array([0.1]), np.array([0.3])
    yield "unbalanced", rng.normal(0.5, 1, 5), rng.normal(0, 1, 500)
    yield "ties_across_sets", np.r_[np.zeros(10), np.ones(10)], np.r_[np.ones(5), 2 * np.ones(5)]
    yield "ties_only_across_sets", np.array([1.0, 2.0, 3.0, 5.0]), np.array([0.0, 2.0, 3.0, 4.0])
    yield "id_continuous_ood_tied", rng.normal(0.5, 1, 60), rng.integers(-1, 2, 40).astype(float)
    yield "id_tied_ood_continuous", rng.integers(0, 3, 40).astype(float), rng.normal(0.5, 1, 60)


@pytest.mark.parametrize("name,id_s,ood_s", list(cases()), ids=[c[0] for c in cases()])
def test_matches_sklearn_and_brute_force(name, id_s, ood_s):
    got = M.evaluate(id_s, ood_s)
    ref = sklearn_reference(id_s, ood_s)
    assert set(got) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
    for k in ref:
        assert type(got[k]) is float and 0.0 <= got[k] <= 1.0
        assert abs(got[k] - ref[k]) < 1e-9, (k, got[k], ref[k])
    assert got["fpr95"] == pytest.approx(brute_force_fpr(id_s, ood_s), abs=1e-12)
    # the single-metric functions agree with evaluate
    assert M.auroc(id_s, ood_s) == got["auroc"]
    assert M.fpr_at_tpr(id_s, ood_s) == got["fpr95"]
    assert M.aupr_in(id_s, ood_s) == got["aupr_in"]
    assert M.aupr_out(id_s, ood_s) == got["aupr_out"]


def test_known_values():
    assert M.evaluate([2.0, 3.0], [0.0, 1.0]) == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    r = M.evaluate([0.0, 1.0], [2.0, 3.0])
    assert r["auroc"] == 0.0 and r["fpr95"] == 1.0
    r = M.evaluate(np.full(3, 1.0), np.full(7, 1.0))  # one tied group: chance level everywhere
    assert r == {"auroc": 0.5, "fpr95": 1.0, "aupr_in": 0.3, "aupr_out": 0.7}
    # AUROC = P(id > ood) + 0.5 P(tie): pairs (1>0),(1=1),(2>0),(2>1) -> (3 + 0.5) / 4
    assert M.auroc([1.0, 2.0], [0.0, 1.0]) == 0.875


def test_fpr95_tie_at_threshold_accepts_all_tied():
    # 20 ID scores; the 95 % threshold is the 19th largest ID score (=1.0). Five OOD tie with it and
    # are all accepted together; a sample-order tie break would give something in between.
    id_s = np.r_[np.ones(19) * 5, 1.0]
    id_s[18] = 1.0
    ood = np.r_[np.ones(5) * 1.0, np.zeros(5)]
    assert M.fpr_at_tpr(id_s, ood) == 0.5
    # exactly 95 %: 19 of 20 ID above 2 -> threshold 2, no OOD accepted
    assert M.fpr_at_tpr(np.r_[np.full(19, 3.0), 0.0], np.full(10, 1.0)) == 0.0


@pytest.mark.parametrize("seed", range(40))
def test_random_small_problems(seed):
    rng = np.random.default_rng(seed)
    n1, n2 = rng.integers(1, 60, size=2)
    levels = rng.integers(1, 8)
    id_s = rng.integers(0, levels + 1, n1).astype(float) + (0 if seed % 2 else rng.normal(0, 1, n1))
    ood_s = rng.integers(0, levels, n2).astype(float) + (0 if seed % 2 else rng.normal(0, 1, n2))
    tpr = float(rng.choice([0.5, 0.8, 0.9, 0.95, 0.99, 1.0]))
    got = M.evaluate(id_s, ood_s, tpr=tpr)
    ref = sklearn_reference(id_s, ood_s, tpr=tpr)
    for k in ref:
        assert abs(got[k] - ref[k]) < 1e-9, (k, got[k], ref[k])
    assert got["fpr95"] == pytest.approx(brute_force_fpr(id_s, ood_s, tpr), abs=1e-12)


def test_large_heavy_ties_against_sklearn():
    rng = np.random.default_rng(7)
    id_s = rng.integers(0, 50, 200_000).astype(np.float32)
    ood_s = rng.integers(-10, 40, 150_000).astype(np.float32)
    got, ref = M.evaluate(id_s, ood_s), sklearn_reference(id_s, ood_s)
    for k in ref:
        assert abs(got[k] - ref[k]) < 1e-9, (k, got[k], ref[k])


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(3)
    id_s, ood_s = rng.integers(0, 6, 100).astype(float), rng.integers(0, 5, 80).astype(float)
    fpr, tpr, thr = M.roc_curve(id_s, ood_s)
    y = np.r_[np.ones(100), np.zeros(80)]
    sf, st, sthr = sk_roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sf)
    np.testing.assert_allclose(tpr, st)
    np.testing.assert_array_equal(thr[1:], sthr[1:])
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(thr) < 0)


def test_invariant_to_monotone_transform_and_accepts_tensors():
    rng = np.random.default_rng(1)
    id_s, ood_s = rng.normal(1, 1, 500), rng.normal(0, 1, 400)
    a = M.evaluate(id_s, ood_s)
    b = M.evaluate(np.exp(id_s / 3), np.exp(ood_s / 3))
    c = M.evaluate(torch.from_numpy(id_s), list(ood_s))
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-12) and a[k] == pytest.approx(c[k], abs=1e-12)


@pytest.mark.parametrize("bad,match", [
    (np.array([]), "empty"),
    (np.array([1.0, np.nan]), "NaN or infinite"),
    (np.array([1.0, np.inf]), "NaN or infinite"),
    (np.array([[1.0, 2.0]]), "1-D"),
    (np.array(1.0), "1-D"),
    (np.array(["a", "b"]), "numeric"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    good = np.array([0.1, 0.2])
    with pytest.raises(ValueError, match=match):
        M.evaluate(bad, good)
    with pytest.raises(ValueError, match="ood_scores.*" + match):
        M.auroc(good, bad)


def test_bad_tpr():
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_tpr([1.0], [0.0], tpr=0.0)
    with pytest.raises(ValueError, match="tpr"):
        M.evaluate([1.0], [0.0], tpr=1.5)
