"""Time the parts of ``report.md``: the bootstrap intervals and the plots (one PNG per method).

A benchmark run writes its report after ``results.json``; on the demo's suites the report took a third of
the warm demo (session 9). This times its two costly parts on synthetic scores the size of a suite
(default: 30 methods, 4 OOD sets, 6,000 ID and 4,000 OOD images per set, as fashion6), so a change to
``oodforge.report`` can be measured without a benchmark run.

Run:  .venv/bin/python benchmarks/bench_report.py [--methods 30] [--sets 4] [--n-id 6000] [--n-ood 4000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic(n_methods: int, n_sets: int, n_id: int, n_ood: int, seed: int = 0) -> tuple[dict, dict]:
    """``results`` / ``scores`` as ``run_bench`` returns them, with normal scores (ID shifted by one)."""
    rng = np.random.default_rng(seed)
    methods = [f"method{i}" for i in range(n_methods)]
    sets = [f"ood{j}" for j in range(n_sets)]
    scores = {}
    for m in methods:
        scores[f"{m}/id"] = rng.normal(1.0, 1.0, n_id)
        for s in sets:
            scores[f"{m}/{s}"] = rng.normal(0.0, 1.0, n_ood)
    results = {"suite": "synthetic", "models": {}, "groups": {"far": sets}, "config": {},
               "methods": {m: {s: {"auroc": 0.76, "fpr95": 0.6} for s in sets} for m in methods}}
    return results, scores


def main() -> None:
    from oodforge import report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", type=int, default=30)
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--n-id", type=int, default=6000)
    ap.add_argument("--n-ood", type=int, default=4000)
    args = ap.parse_args()
    results, scores = synthetic(args.methods, args.sets, args.n_id, args.n_ood)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report.interval_section(results, scores)
        t_int = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m in results["methods"]:
            report._plot_method(m, scores, results, Path(tmp) / f"{m}.png")
        t_plot = time.perf_counter() - t0
    print(f"{args.methods} methods x {args.sets} OOD sets ({args.n_id} ID, {args.n_ood} OOD images per set)")
    print(f"bootstrap intervals: {t_int:6.1f} s")
    print(f"plots:               {t_plot:6.1f} s ({t_plot / args.methods:.3f} s per method)")


if __name__ == "__main__":
    main()
