"""Time oodforge.metrics.evaluate against the scikit-learn equivalent on 10 million scores.

Scores: 5M ID ~ N(1, 1) and 5M OOD ~ N(0, 1), rounded to 3 decimals so there are heavy ties
(about 10k distinct values). scikit-learn needs four calls for the same four numbers:
``roc_auc_score``, ``average_precision_score`` twice (ID and OOD positive) and ``roc_curve`` for
FPR95 (``drop_intermediate=False``, first point with TPR >= 0.95), each sorting the data again.

Run:  .venv/bin/python benchmarks/bench_metrics.py [--n 5000000] [--seed 0] [--repeats 1] [--decimals 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def sklearn_metrics(id_s: np.ndarray, ood_s: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.r_[np.ones(id_s.size, dtype=np.int8), np.zeros(ood_s.size, dtype=np.int8)]
    s = np.r_[id_s, ood_s]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auroc": float(roc_auc_score(y, s)), "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
            "aupr_in": float(average_precision_score(y, s)), "aupr_out": float(average_precision_score(1 - y, -s))}


def main() -> None:
    from oodforge.metrics import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5_000_000, help="scores per side (ID and OOD)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="best-of-N timing")
    ap.add_argument("--decimals", type=int, default=3, help="round scores to this many decimals (ties); -1: no rounding")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    id_s, ood_s = rng.normal(1.0, 1.0, args.n), rng.normal(0.0, 1.0, args.n)
    if args.decimals >= 0:
        id_s, ood_s = np.round(id_s, args.decimals), np.round(ood_s, args.decimals)
    print(f"{2 * args.n:,} scores ({args.n:,} ID + {args.n:,} OOD), "
          f"{np.unique(np.r_[id_s, ood_s]).size:,} distinct values")

    t_ours, t_sk = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = evaluate(id_s, ood_s)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = sklearn_metrics(id_s, ood_s)
        t_sk.append(time.perf_counter() - t0)
    a, b = min(t_ours), min(t_sk)
    diff = max(abs(ours[k] - ref[k]) for k in ref)
    for k in ref:
        print(f"  {k:<9} oodforge {ours[k]:.12f}   sklearn {ref[k]:.12f}")
    print(f"oodforge.evaluate: {a:.2f} s   sklearn (4 calls): {b:.2f} s   speed-up x{b / a:.1f}   "
          f"max |diff| = {diff:.2e}")


if __name__ == "__main__":
    main()
