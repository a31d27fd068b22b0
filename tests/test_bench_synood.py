"""The CLIP detectors (mcm, neglabel, synood) through `run_bench`, on a tiny random CLIP: the bench
passes the CLIP model and WordNet folder via FitContext.extra and the outliers' pixels to synood."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_synood_clip import ADJS, NOUNS

from oodforge.bench import BenchJob, run_bench
from oodforge.data.base import ArrayDataset, Suite
from oodforge.models import build_model


def _images(n, seed, bright):
    g = np.random.default_rng(seed)
    x = g.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
    if bright:
        x[:, :, 8:24, 8:24] = 220
    return x


@pytest.fixture()
def tiny_suite():
    names = ["boot", "sky", "thing"]
    train = ArrayDataset(_images(30, 0, True), np.arange(30) % 3, names, "tiny/train")
    test = ArrayDataset(_images(12, 1, True), np.arange(12) % 3, names, "tiny/test")
    ood = {"dark": ArrayDataset(_images(10, 2, False), identity="tiny/dark")}
    return Suite("tiny", train, test, ood, {"near": [], "far": ["dark"]}, names)


def test_clip_detectors_run_in_bench_with_extra_and_outlier_pixels(tiny_suite, tmp_path):
    from oodforge.synood.clip_model import clear_loaded
    from oodforge.synood.tiny import build_tiny_clip

    clear_loaded()
    clip = str(build_tiny_clip(tmp_path / "clip", seed=0))
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "data.noun").write_text(NOUNS)
    (wn / "data.adj").write_text(ADJS)
    model = build_model("small_resnet", 3, 3).eval()
    outliers = ArrayDataset(_images(20, 3, False), identity="tiny/outliers")
    methods = ["mcm", "neglabel:num_neg=10,ngroup=2", "synood:num_neg=10,ngroup=2"]
    res = run_bench(tiny_suite, [BenchJob(model, methods, outliers=outliers)], tmp_path / "out", progress=False,
                    extra={"clip_model": clip, "wordnet_dir": str(wn)}, log=None)
    assert set(res["methods"]) == set(methods)
    scores = np.load(tmp_path / "out" / "scores.npz")
    for m in methods:
        assert scores[f"{m}/id"].shape == (12,) and np.isfinite(scores[f"{m}/dark"]).all()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"] == res["methods"]


def test_clip_detectors_without_a_model_name_the_option(tiny_suite):
    model = build_model("small_resnet", 3, 3).eval()
    with pytest.raises(Exception, match="--clip-model"):
        run_bench(tiny_suite, [BenchJob(model, ["mcm"])], progress=False, log=None)
