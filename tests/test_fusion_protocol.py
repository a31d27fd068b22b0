"""Score fusion by ID percentiles, and the protocol guard: detector fitting never sees OOD test data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_problems import features_of, make_toy_problem

from oodforge.bench import BenchJob, run_bench
from oodforge.data.base import Suite
from oodforge.detectors import FitContext, create
from oodforge.detectors.base import REGISTRY, Detector
from oodforge.detectors.fusion import id_percentile
from oodforge.metrics import evaluate
from oodforge.protocol import check_fit_inputs


def test_id_percentile_is_the_empirical_cdf():
    ref = np.array([1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(id_percentile(ref, np.array([0.5, 1.0, 2.0, 2.5, 9.0])), [0, 0.25, 0.75, 0.75, 1.0])


def _toy_ctx():
    p = make_toy_problem()
    val = features_of(p.model, p.id_val)  # held-out ID data, disjoint from train and test
    return p, FitContext(model=p.model, train=p.train, val=val)


def test_fusion_catches_what_either_detector_catches():
    """msp misses far noise, knn misses little near the class centroid: min-fusion keeps both."""
    p, ctx = _toy_ctx()
    fused = create("fusion", a="msp", b="knn").fit(ctx)
    s_id = fused.score(p.test)
    aurocs = {}
    for name, fs in (("near", p.near), ("far", p.far)):
        aurocs[name] = evaluate(s_id, fused.score(fs))["auroc"]
        for part in ("msp", "knn"):
            single = create(part).fit(ctx)
            aurocs[f"{name}-{part}"] = evaluate(single.score(p.test), single.score(fs))["auroc"]
    assert aurocs["far"] >= max(aurocs["far-msp"], aurocs["far-knn"]) - 0.02
    assert aurocs["near"] >= min(aurocs["near-msp"], aurocs["near-knn"])
    assert aurocs["far"] > 0.95 and aurocs["near"] > 0.9
    assert np.all((s_id >= -0.01) & (s_id <= 1.01))  # percentiles (plus a sub-step tie-breaker)


def test_fusion_needs_validation_data_and_valid_parts():
    p, ctx = _toy_ctx()
    with pytest.raises(ValueError, match="validation"):
        create("fusion", a="msp", b="knn").fit(FitContext(model=p.model, train=p.train))
    with pytest.raises(KeyError, match="unknown detector"):
        create("fusion", a="msp", b="nope")
    with pytest.raises(ValueError, match="rule"):
        create("fusion", rule="max")


class _Spy(Detector):
    name = "spy-protocol"
    seen: list = []

    def _fit(self, ctx):
        for f in ("train", "val", "outliers"):
            fs = getattr(ctx, f)
            _Spy.seen.append(getattr(getattr(fs, "images", None), "identity", None))

    def _score(self, feats):
        return torch.zeros(len(feats))


def test_detector_fitting_never_receives_ood_test_data():
    p = make_toy_problem()
    REGISTRY["spy-protocol"] = _Spy
    try:
        suite = Suite("toy", p.id_train, p.id_test, {"near": p.ood_near, "far": p.ood_far},
                      {"near": ["near"], "far": ["far"]}, ["c0", "c1", "c2", "c3"], id_val=p.id_val)
        _Spy.seen.clear()
        run_bench(suite, [BenchJob(p.model, ["spy-protocol", "knn"], outliers=p.id_train.subset(np.arange(10)))],
                  progress=False, log=None)
        test_ids = {p.id_test.identity, p.ood_near.identity, p.ood_far.identity}
        assert _Spy.seen and not (set(_Spy.seen) & test_ids)
        # a suite wired wrongly (an OOD test set as the validation split) is refused before fitting
        bad = Suite("toy", p.id_train, p.id_test, {"near": p.ood_near}, {"near": ["near"], "far": []},
                    ["c0", "c1", "c2", "c3"], id_val=p.ood_near)
        with pytest.raises(RuntimeError, match="protocol violation.*OOD test set 'near'"):
            run_bench(bad, [BenchJob(p.model, ["knn"])], progress=False, log=None)
        ctx = FitContext(model=p.model, train=features_of(p.model, p.id_test))
        with pytest.raises(RuntimeError, match="ID test"):
            check_fit_inputs(ctx, suite)
    finally:
        REGISTRY.pop("spy-protocol", None)
