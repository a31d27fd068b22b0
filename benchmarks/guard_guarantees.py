"""What a guard's guarantees give on an embedded suite: achieved ID acceptance, the exchangeability check, BH.

    .venv/bin/python benchmarks/guard_guarantees.py --suite scenes --method knn --quick

Fits the guarded classifier ``export`` would (same classifier: zoo / cache / a quick training), once with
the split-conformal threshold and once with the PAC one (``--confidence``), and prints per rule: the
calibration size ``n`` and rank ``k``, the accepted share of ID validation and ID test images, the
Beta-binomial p-value of the ID-test rejections (``predict``'s batch check), and the AUROC of ID-val
scores against ID-test scores (0.5 when the two splits are exchangeable). For the split-conformal guard it
then draws ``--batches`` batches of ``--batch`` ID-test + ``--batch`` OOD images per OOD set and reports
Benjamini-Hochberg's mean false discovery proportion and power at several levels ``q`` (docs/deploy.md,
"Calibration and guarantees"). Nothing is written.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from oodforge.data.suites import load_suite
from oodforge.deploy import GuardedClassifier
from oodforge.deploy.conformal import batch_rejection_p_value, benjamini_hochberg
from oodforge.metrics import auroc
from oodforge.models.features import default_cache_dir
from oodforge.workflows import TrainPlan, get_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True)
    ap.add_argument("--method", default="knn")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--confidence", type=float, default=0.99)
    ap.add_argument("--batch", type=int, default=200, help="ID and OOD images per BH batch (each)")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = load_suite(args.suite, quick=args.quick, seed=args.seed)
    model, _ = get_model(s, TrainPlan(epochs=3 if args.quick else 4, seed=args.seed), None, "cpu", log=print)
    tag = f"{args.suite}{' quick' if args.quick else ''} {args.method}"
    for conf in (None, args.confidence):
        t0 = time.time()
        try:
            g = GuardedClassifier.fit(model, s, args.method, target=args.target, cache_dir=default_cache_dir(),
                                      confidence=conf, seed=args.seed)
        except ValueError as e:
            print(f"{tag}: PAC refused: {e}")
            continue
        c, sv, sid = g.calibration, g.fit_scores["id_val"], g.fit_scores["id"]
        rej = int((sid < g.threshold).sum())
        print(f"{tag} {c['rule']}: n={c['n']} k={c['k']} bound={c['rejection_bound']:.4f}  accepted: ID val "
              f"{100 * g.rates['id_val_acceptance']:.1f} %, ID test {100 * g.rates['id_test_acceptance']:.1f} % "
              f"({rej} of {sid.size} rejected, batch-check p = {batch_rejection_p_value(rej, sid.size, c['k'], c['n']):.2g})"
              f"  AUROC(ID val vs ID test scores) {auroc(sv, sid):.3f}  ({time.time() - t0:.0f} s)")
        if conf is not None:
            continue
        rng = np.random.default_rng(args.seed)
        for name in s.ood:
            so = g.fit_scores[name]
            for q in (0.05, 0.1, 0.2):
                fdp, power = [], []
                for _ in range(args.batches):
                    i = rng.choice(sid.size, min(args.batch, sid.size), replace=False)
                    o = rng.choice(so.size, min(args.batch, so.size), replace=False)
                    flags = benjamini_hochberg(g.p_values(np.concatenate([sid[i], so[o]])), q)
                    fdp.append(flags[:i.size].sum() / max(int(flags.sum()), 1))
                    power.append(flags[i.size:].mean())
                print(f"   BH q={q:.2f} {name:<18} mean FDP {np.mean(fdp):.4f}  power {np.mean(power):.3f}")


if __name__ == "__main__":
    main()
