"""Issue 25, repeated work removed without changing a number: fusion reuses the job's fitted parts and their
scores, the weights are hashed once per job (and a changed weight still changes the hash), ODIN with
``epsilon = 0`` reads the cached logits, and every validation set is scored once per method."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from toy_problems import make_toy_problem

import oodforge.bench as bench_mod
import oodforge.detectors.odin as odin_mod
import oodforge.models.features as features_mod
from oodforge.bench import BenchJob, run_bench
from oodforge.data.base import ArrayDataset, Suite
from oodforge.detectors import create
from oodforge.detectors.knn import KNN
from oodforge.detectors.mahalanobis import Mahalanobis
from oodforge.models.checkpoint import weights_hash
from oodforge.models.features import extract_features


def _suite(p) -> Suite:
    return Suite("toy", p.id_train, p.id_test, {"near": p.ood_near, "far": p.ood_far},
                 {"near": ["near"], "far": ["far"]}, ["c0", "c1", "c2", "c3"], id_val=p.id_val)


def _noise(n: int, seed: int, name: str) -> ArrayDataset:
    """Validation outliers that are no test image (uniform noise drawn here)."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 1, 1), dtype=np.uint8)
    return ArrayDataset(x, None, None, name)


def _count_calls(monkeypatch, cls, attr: str, counter: Counter, label: str) -> None:
    orig = getattr(cls, attr)

    def wrapped(self, *a, **k):
        counter[label] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, attr, wrapped)


def _run(p, methods, **job):
    res = run_bench(_suite(p), [BenchJob(p.model, methods, **job)], progress=False, log=None)
    return res["_scores"]


FUSED = "fusion:a=mahalanobis,b=knn"


def test_fusion_reuses_the_jobs_fitted_parts_and_scores_with_identical_numbers(monkeypatch):
    p = make_toy_problem()
    val_out = _noise(120, 1, "toy/val-noise")
    calls: Counter = Counter()
    for cls, label in ((KNN, "knn"), (Mahalanobis, "mahalanobis")):
        _count_calls(monkeypatch, cls, "_fit", calls, f"fit {label}")
        _count_calls(monkeypatch, cls, "_score", calls, f"score {label}")
    alone = _run(p, [FUSED], val_outliers=val_out)  # nothing to reuse: fusion fits and scores its own parts
    assert calls == {"fit knn": 1, "fit mahalanobis": 1, "score knn": 5, "score mahalanobis": 5}
    calls.clear()
    shared = _run(p, ["mahalanobis", "knn", FUSED, "fusion:a=mahalanobis,b=knn,rule=mean"], val_outliers=val_out)
    # one fit and one pass per scored set (id, near, far, val, val-outliers) for each part, for three methods each
    assert calls == {"fit knn": 1, "fit mahalanobis": 1, "score knn": 5, "score mahalanobis": 5}
    for s in ("id", "near", "far", "val", "val-outliers"):
        np.testing.assert_array_equal(shared[f"{FUSED}/{s}"], alone[f"{FUSED}/{s}"])  # bit-identical
    calls.clear()
    first = _run(p, [FUSED, "knn"], val_outliers=val_out)  # the part fitted by fusion serves the later method
    assert calls["fit knn"] == 1 and calls["score knn"] == 5
    for s in ("id", "near", "far", "val"):
        np.testing.assert_array_equal(first[f"knn/{s}"], shared[f"knn/{s}"])
        np.testing.assert_array_equal(first[f"{FUSED}/{s}"], alone[f"{FUSED}/{s}"])


def test_fusion_outside_a_job_fits_its_own_parts():
    """A fusion fitted once in a job and then refitted on a plain FitContext uses its new parts, not the job's."""
    p = make_toy_problem()
    from toy_problems import features_of

    from oodforge.detectors import FitContext

    ctx = FitContext(model=p.model, train=p.train, val=features_of(p.model, p.id_val))
    ref = create("fusion", a="msp", b="knn").fit(ctx).score(p.test)
    det = create("fusion", a="msp", b="knn")
    parts = bench_mod.FittedParts()
    stale = create("knn", k=1).fit(ctx)  # a different fit under the spec's name: must not leak into a refit
    parts.fitted["knn"] = stale
    det.fit(FitContext(model=p.model, train=p.train, val=ctx.val, extra={"fitted": parts}))
    assert det.det_b_ is stale
    det.fit(ctx)
    assert det.det_b_ is not stale
    np.testing.assert_array_equal(det.score(p.test), ref)


def test_weights_hashed_once_per_job_and_a_changed_weight_is_not_served_stale(monkeypatch, tmp_path):
    p = make_toy_problem(seed=3)
    model = p.model
    count = Counter()
    for mod in (bench_mod, features_mod):
        orig = mod.weights_hash

        def counting(m, _orig=orig):
            count["hash"] += 1
            return _orig(m)

        monkeypatch.setattr(mod, "weights_hash", counting)
    res = run_bench(_suite(p), [BenchJob(model, ["msp", "knn", "energy"])], cache_dir=tmp_path, progress=False,
                    log=None)
    assert count["hash"] == 1  # 5 sets x 3 methods used to hash up to 3 times per extract_features call
    h0 = res["models"]["plain"]["weights_hash"]
    assert h0 == weights_hash(model)
    fs0 = extract_features(model, p.id_test, cache_dir=tmp_path, progress=False)
    saved = model.head.bias.detach().clone()
    try:
        model.head.bias.data[0] += 0.5  # through .data: no version counter sees it
        assert weights_hash(model) != h0
        fs1 = extract_features(model, p.id_test, cache_dir=tmp_path, progress=False)
        assert not torch.equal(fs1.logits, fs0.logits)  # recomputed, not the old model's cache entry
        with torch.no_grad():
            torch.testing.assert_close(fs1.logits, model.eval().forward_all(p.id_test.float_images()).logits)
        res2 = run_bench(_suite(p), [BenchJob(model, ["msp"])], cache_dir=tmp_path, progress=False, log=None)
        assert res2["models"]["plain"]["weights_hash"] == weights_hash(model) != h0
        assert not np.array_equal(res2["_scores"]["msp/id"], res["_scores"]["msp/id"])
    finally:
        with torch.no_grad():
            model.head.bias.copy_(saved)


def test_odin_without_perturbation_reads_the_cached_logits():
    p = make_toy_problem()
    fs = extract_features(p.model, p.ood_far, batch_size=64, progress=False)
    for t in (1.0, 1000.0):
        det = create("odin", temperature=t, epsilon=0.0).fit(p.ctx())
        assert not det.needs_inputs and create("odin").needs_inputs
        # the image path as it was: the images through the classifier in ODIN's batches of 128
        with torch.no_grad():
            ref = torch.cat([torch.softmax(p.model(p.ood_far.float_images(i, i + 128)).double() / t, 1).max(1).values
                             for i in range(0, len(p.ood_far), 128)]).numpy()
        np.testing.assert_array_equal(det.score(fs), ref)  # fs has no images attached: none are read
    with pytest.raises(ValueError, match="input images"):
        create("odin").fit(p.ctx()).score(fs)


def test_every_validation_set_is_scored_once_per_method(monkeypatch):
    p = make_toy_problem()
    passes: Counter = Counter()
    orig = odin_mod.iter_image_batches

    def counting(images, *a, **k):
        passes[images.identity] += 1
        return orig(images, *a, **k)

    monkeypatch.setattr(odin_mod, "iter_image_batches", counting)
    grad_calls: Counter = Counter()
    import oodforge.detectors.gradnorm as gradnorm_mod

    _count_calls(monkeypatch, gradnorm_mod.GradNorm, "_score", grad_calls, "gradnorm")
    val_out, held = _noise(60, 1, "toy/val-noise"), _noise(60, 2, "toy/heldout-noise")
    _run(p, ["odin", "odin:epsilon=0", "gradnorm"], val_outliers=val_out, val_heldout=held)
    sets = [p.id_test, p.ood_near, p.ood_far, p.id_val, val_out, held]
    assert passes == {ds.identity: 1 for ds in sets}  # odin only; odin:epsilon=0 read no image
    assert grad_calls["gradnorm"] == len(sets)


def test_a_job_with_a_feature_map_detector_runs_one_forward_pass_per_set(monkeypatch):
    """When a method of the job reads feature maps, every scored set (test, OOD, ID validation and both
    validation outlier sets) gets them in its first and only pass; the training set gets none (the detector
    fits nothing on its maps). Before, validation sets were extracted twice: once plain, once with maps."""
    p = make_toy_problem()
    passes: Counter = Counter()
    maps: dict = {}
    orig = bench_mod.extract_features

    def counted(model, ds, *a, **k):
        passes[ds.identity] += 1
        fs = orig(model, ds, *a, **k)
        maps[ds.identity] = fs.feature_map is not None
        return fs

    monkeypatch.setattr(bench_mod, "extract_features", counted)
    val_out, held = _noise(60, 1, "toy/val-noise"), _noise(60, 2, "toy/val-heldout")
    scores = _run(p, ["msp", "scale:where=map", "energy"], val_outliers=val_out, val_heldout=held)
    sets = [p.id_test, p.ood_near, p.ood_far, p.id_val, val_out, held]
    assert all(passes[d.identity] == 1 and maps[d.identity] for d in sets), passes
    assert passes[p.id_train.identity] == 1 and not maps[p.id_train.identity]
    assert len(passes) == len(sets) + 1
    assert "scale:where=map/val-heldout" in scores and "msp/val-outliers" in scores
