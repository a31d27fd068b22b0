"""Scoring every detector from one cached forward pass vs one forward pass per detector.

    .venv/bin/python benchmarks/bench_feature_cache.py [--suite fashion] [--quick]

Both sides fit and score the same detectors on the same suite with the same model, measured in
one run; the script checks the scores are identical and prints the wall-clock ratio. A third
timing re-runs the shared side with a warm on-disk cache (what a second `oodforge bench` costs).
The model is the default ``small_resnet`` trained for one epoch (timings do not depend on accuracy).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from oodforge.bench import BenchJob, run_bench
from oodforge.data.suites import load_suite
from oodforge.detectors import FitContext, create
from oodforge.models.featureset import FeatureSet
from oodforge.workflows import POST_HOC, TrainPlan, get_model


def per_detector(suite, model, methods):
    """The naive way: every detector runs its own forward passes over every dataset."""
    scores = {}
    for m in methods:
        det = create(m)

        def feats(ds):
            with torch.no_grad():
                out = [model.forward_all(ds.float_images(i, i + 256)) for i in range(0, len(ds), 256)]
            return FeatureSet(torch.cat([o.logits for o in out]), torch.cat([o.penultimate for o in out]),
                              ds.labels, images=ds)

        det.fit(FitContext(model=model, train=feats(suite.id_train), extra={"class_names": suite.class_names}))
        for name, ds in {"id": suite.id_test, **suite.ood}.items():
            scores[f"{m}/{name}"] = det.score(feats(ds))
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="fashion")
    ap.add_argument("--quick", action="store_true", help="the suite's quick subsets")
    ap.add_argument("--methods", default=",".join(m for m in POST_HOC if m != "odin"),
                    help="detectors (ODIN is left out by default: it needs its own gradient passes either way)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    methods = args.methods.split(",")
    suite = load_suite(args.suite, quick=args.quick)
    model, _ = get_model(suite, TrainPlan(epochs=1), progress=False, log=None)
    n_images = len(suite.id_train) + len(suite.id_test) + sum(len(d) for d in suite.ood.values())
    print(f"suite {args.suite}: {n_images} images, {len(methods)} detectors: {', '.join(methods)}")

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        shared = run_bench(suite, [BenchJob(model, methods)], cache_dir=cache, progress=False, log=None)["_scores"]
        t_shared = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_bench(suite, [BenchJob(model, methods)], cache_dir=cache, progress=False, log=None)
        t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = per_detector(suite, model, methods)
    t_naive = time.perf_counter() - t0

    worst = max(float(np.max(np.abs(shared[k] - naive[k]) / (1 + np.abs(naive[k])))) for k in naive)
    print(f"one forward pass per detector : {t_naive:8.2f} s")
    print(f"one shared pass (cold cache)  : {t_shared:8.2f} s   -> {t_naive / t_shared:.2f}x faster")
    print(f"one shared pass (warm cache)  : {t_warm:8.2f} s   -> {t_naive / t_warm:.2f}x faster")
    print(f"max relative score difference : {worst:.2e}")


if __name__ == "__main__":
    main()
