"""RankFeat: power iteration (float32, the paper's speed-up) against the exact float64 SVD.

Two measurements, printed as a small table:

1. **time** of the rank-1 removal + head on random non-negative feature maps of the fashion classifier's
   shape (``small_resnet``: ``[N, 128, 7, 7]``, ``N = --n``, default 10,000 images), for both solvers;
2. **agreement** on the real quick fashion suite: the classifier (zoo checkpoint, or trained quickly),
   its cached last feature maps of the ID test set and of every OOD set, and the AUROC of RankFeat with
   each solver per OOD set (the difference must stay below 1e-3).

    .venv/bin/python benchmarks/bench_rankfeat.py [--n 10000] [--threads 1] [--skip-suite]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from oodforge.detectors import FitContext, create
from oodforge.metrics import evaluate
from oodforge.models.featureset import FeatureSet


class _Head(torch.nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.head = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(b)


def _random_maps(n: int, seed: int = 0) -> tuple[_Head, FeatureSet]:
    g = torch.Generator().manual_seed(seed)
    fmap = torch.relu(torch.randn(n, 128, 7, 7, generator=g))
    model = _Head(torch.randn(10, 128, generator=g) * 0.1, torch.zeros(10))
    h = fmap.mean(dim=(2, 3))
    with torch.no_grad():
        logits = model.head(h)
    return model, FeatureSet(logits, h, torch.zeros(n, dtype=torch.long), fmap)


def _time(det, feats: FeatureSet) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    s = det.score(feats)
    return time.perf_counter() - t0, s


def timing(n: int) -> None:
    model, feats = _random_maps(n)
    ctx = FitContext(model=model, train=FeatureSet(feats.logits[:10], feats.penultimate[:10], feats.labels[:10]))
    rows = {}
    for solver in ("svd", "power"):
        det = create("rankfeat", solver=solver).fit(ctx)
        rows[solver] = _time(det, feats)
    t_svd, s_svd = rows["svd"]
    t_pow, s_pow = rows["power"]
    print(f"random maps [{n}, 128, 7, 7], {torch.get_num_threads()} thread(s)")
    print(f"  svd   (float64): {t_svd:7.2f} s  ({1000 * t_svd / n:.3f} s / 1000 images)")
    print(f"  power (float32): {t_pow:7.2f} s  ({1000 * t_pow / n:.3f} s / 1000 images)  speed-up {t_svd / t_pow:.1f}x")
    print(f"  max |score difference| {np.abs(s_svd - s_pow).max():.2e}")


def suite_agreement() -> None:
    from oodforge.data.suites import load_suite
    from oodforge.models.features import extract_features
    from oodforge.workflows import TrainPlan, get_model

    suite = load_suite("fashion", quick=True)
    model, _ = get_model(suite, TrainPlan(epochs=3, seed=0), log=lambda *a: None)
    model.eval()

    def feats(ds):
        return extract_features(model, ds, feature_map=True, progress=False)

    train, test = feats(suite.id_train), feats(suite.id_test)
    ctx = FitContext(model=model, train=train)
    dets = {s: create("rankfeat", solver=s).fit(ctx) for s in ("svd", "power")}
    sid = {s: d.score(test) for s, d in dets.items()}
    print(f"quick fashion suite: {len(test)} ID test images, feature map {tuple(test.feature_map.shape[1:])}")
    worst = 0.0
    for name, ds in suite.ood.items():
        f = feats(ds)
        a = {s: evaluate(sid[s], d.score(f))["auroc"] for s, d in dets.items()}
        worst = max(worst, abs(a["svd"] - a["power"]))
        print(f"  {name:<12} AUROC svd {a['svd']:.5f}  power {a['power']:.5f}  |diff| {abs(a['svd'] - a['power']):.1e}")
    print(f"  largest AUROC difference {worst:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="random feature maps to time (default 10000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--skip-suite", action="store_true", help="only the timing on random maps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    timing(args.n)
    if not args.skip_suite:
        suite_agreement()


if __name__ == "__main__":
    main()
