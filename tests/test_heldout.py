"""Held-out forgers (oodforge.outliers.heldout): what they make, and the validation numbers bench derives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodforge.data.base import ArrayDataset
from oodforge.outliers.heldout import class_mix, heldout_outliers, jigsaw


def _images(n=6, c=3, h=17, w=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))


def test_jigsaw_moves_whole_tiles_and_keeps_the_border():
    x = _images()
    y = jigsaw(x, grid=4, seed=1)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(y[:, :, 16:, :], x[:, :, 16:, :])  # the row that does not fill a tile stays
    for i in range(len(x)):
        tiles_x = {x[i, :, r:r + 4, c:c + 4].numpy().tobytes() for r in range(0, 16, 4) for c in range(0, 16, 4)}
        tiles_y = {y[i, :, r:r + 4, c:c + 4].numpy().tobytes() for r in range(0, 16, 4) for c in range(0, 16, 4)}
        assert tiles_x == tiles_y  # the same 16 tiles, in another order
        assert not torch.equal(x[i], y[i])
    assert torch.equal(jigsaw(x, 4, seed=1), y)  # seeded
    with pytest.raises(ValueError, match="cannot be cut"):
        jigsaw(_images(h=3, w=3), grid=4)


def test_class_mix_averages_with_an_image_of_another_class():
    x = _images(n=40)
    labels = torch.arange(40) % 4
    y = class_mix(x, labels, seed=0).to(torch.int32)
    xi = x.to(torch.int32)
    for i in range(40):
        # y = (x_i + x_j + 1) // 2 for some j of another class
        partners = [j for j in range(40) if labels[j] != labels[i] and torch.equal((xi[i] + xi[j] + 1) // 2, y[i])]
        assert partners, i
    with pytest.raises(ValueError, match="two classes"):
        class_mix(x, torch.zeros(40, dtype=torch.int64))


def test_heldout_outliers_are_unlabelled_and_one_per_image_per_forger():
    ds = ArrayDataset(_images(n=12), torch.arange(12) % 3, ["a", "b", "c"], "toy/val")
    out = heldout_outliers(ds, seed=3)
    assert len(out) == 24 and (out.labels == -1).all() and "toy/val" in out.identity
    assert torch.equal(out.images[:12], jigsaw(ds.images, 4, 3))
    with pytest.raises(ValueError, match="unknown held-out forgers"):
        heldout_outliers(ds, kinds=("rotate",))


def test_bench_reports_heldout_validation_for_every_method(tmp_path):
    from toy_problems import make_toy_problem

    from oodforge.bench import BenchJob, run_bench
    from oodforge.data.base import Suite
    from oodforge.metrics import evaluate

    p = make_toy_problem()
    val = p.id_test.subset(np.arange(0, 400, 4), "val-standin")
    suite = Suite("toy", p.id_train, p.id_test, {"near": p.ood_near, "far": p.ood_far},
                  {"near": ["near"], "far": ["far"]}, ["c0", "c1", "c2", "c3"], id_val=val)
    held = heldout_outliers(val, kinds=("mix",), seed=0)  # toy images are 1x1 pixels: no jigsaw
    res = run_bench(suite, [BenchJob(p.model, ["msp", "energy"], val_heldout=held)], progress=False, log=None)
    assert set(res["validation_heldout"]) == {"msp", "energy"} and "validation" not in res
    s = res["_scores"]
    assert s["energy/val-heldout"].shape == (len(held),) and s["energy/val"].shape == (len(val),)
    assert res["validation_heldout"]["energy"]["auroc"] == evaluate(s["energy/val"], s["energy/val-heldout"])["auroc"]
    # class mixes of well-separated blobs sit between the classes: the classifier is unsure of them
    assert res["validation_heldout"]["msp"]["auroc"] > 0.8


def test_protocol_pick_reads_the_heldout_forgers_when_the_run_has_them():
    from oodforge.demo import protocol_pick

    res = {"validation": {"shift": {"auroc": 0.999, "fpr95": 0.0}, "knn@oe": {"auroc": 0.98, "fpr95": 0.1},
                          "knn": {"auroc": 1.0, "fpr95": 0.0}},
           "validation_heldout": {"shift": {"auroc": 0.60, "fpr95": 0.9}, "knn@oe": {"auroc": 0.90, "fpr95": 0.4},
                                  "knn": {"auroc": 0.99, "fpr95": 0.0}}}
    assert protocol_pick(res) == "knn@oe"  # knn on the plain classifier is post-hoc: never the forged pick
    assert protocol_pick({"validation": res["validation"]}) == "shift"  # older runs: the training forger's number
