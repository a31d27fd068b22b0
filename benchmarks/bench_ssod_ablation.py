"""SSOD ablation on a suite: alpha (Table 4) x gamma (Eq. 12), OOD metrics of the ``ssod`` score per group.

    .venv/bin/python benchmarks/bench_ssod_ablation.py [--suite fashion6] [--quick] [--epochs 3]
        [--alphas 0.5,1,2] [--gammas 0.9,0.95,0.99] [--balance loss] [--input-size N] [--out results.json]

For every (alpha, gamma) an ``ssod:small_resnet`` is trained from the same seed with
``oodforge.ssod.train.train_ssod`` (AdamW, cosine schedule: the CPU default) and scored on the
suite's ID test set and every OOD set with the ``ssod`` detector (P(ID|x), Eq. 15); metrics come
from ``oodforge.metrics.evaluate`` and are averaged over the sets of each group (near / far).
Also printed per run: ID test accuracy, training seconds per epoch, and the fraction of feature-map
positions the sampler labelled ID / OOD in the last epoch. With ``--baseline`` a plain
``small_resnet`` (same epochs, ``train_classifier``) is scored with MSP for reference, and every
SSOD run also reports MSP of its own logits and ``ssod-combined`` (Eq. 7).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from oodforge.data.suites import load_suite
from oodforge.detectors import FitContext, create
from oodforge.metrics import evaluate
from oodforge.models import build_model, extract_features
from oodforge.models.train import accuracy, train_classifier
from oodforge.ssod.train import train_ssod
from oodforge.workflows import normalisation


def score_sets(model, suite, methods, device):
    """Metrics of each method on every OOD set, and their means per group."""
    feats = {"id": extract_features(model, suite.id_test, device=device, progress=False)}
    for name, ds in suite.ood.items():
        feats[name] = extract_features(model, ds, device=device, progress=False)
    train_feats = feats["id"]  # ssod / msp fit nothing from the training features
    out = {}
    for m in methods:
        det = create(m).fit(FitContext(model=model, train=train_feats, device=device))
        s_id = det.score(feats["id"])
        per_set = {name: evaluate(s_id, det.score(feats[name])) for name in suite.ood}
        groups = {g: {k: float(np.mean([per_set[n][k] for n in names])) for k in ("auroc", "fpr95")}
                  for g, names in suite.groups.items() if names}
        out[m] = {"sets": per_set, "groups": groups}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="fashion6")
    ap.add_argument("--quick", action="store_true", help="the suite's quick subsets")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--alphas", default="0.5,1,2")
    ap.add_argument("--gammas", default="0.9,0.95,0.99")
    ap.add_argument("--balance", default="loss", choices=["loss", "weight", "resample"])
    ap.add_argument("--input-size", type=int, default=None, help="resize inputs inside the model (paper: 224)")
    ap.add_argument("--baseline", action="store_true", help="also train a plain classifier and score its MSP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write all numbers to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suite = load_suite(args.suite, quick=args.quick, seed=args.seed)
    mean, std = normalisation(suite)
    alphas = [float(a) for a in args.alphas.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    print(f"suite {suite.name}{' (quick)' if args.quick else ''}: {len(suite.id_train)} train / "
          f"{len(suite.id_test)} test ID images {suite.image_shape}, OOD groups "
          + "; ".join(f"{g}: {', '.join(n)}" for g, n in suite.groups.items() if n))
    print(f"epochs {args.epochs}, lr {args.lr}, batch {args.batch_size}, balance {args.balance}, "
          f"input_size {args.input_size}, seed {args.seed}, threads {args.threads}")
    groups = [g for g, n in suite.groups.items() if n]
    rows = []
    if args.baseline:
        torch.manual_seed(args.seed)
        plain = build_model("small_resnet", suite.num_classes, suite.image_shape[0], mean, std)
        hist = train_classifier(plain, suite.id_train, epochs=args.epochs, batch_size=args.batch_size,
                                seed=args.seed, device=args.device, progress=False)
        res = score_sets(plain.eval(), suite, ["msp"], args.device)
        rows.append({"run": "plain", "alpha": None, "gamma": None, "id_acc": accuracy(plain, suite.id_test),
                     "s_per_epoch": float(np.mean(hist["seconds"])), "id_frac": None, "ood_frac": None,
                     "metrics": res})
    for alpha in alphas:
        for gamma in gammas:
            torch.manual_seed(args.seed)
            model = build_model("ssod:small_resnet", suite.num_classes, suite.image_shape[0], mean, std)
            t0 = time.time()
            hist = train_ssod(model, suite.id_train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              seed=args.seed, device=args.device, alpha=alpha, gamma=gamma, balance=args.balance,
                              input_size=args.input_size, progress=False)
            res = score_sets(model, suite, ["ssod", "ssod-combined", "msp"], args.device)
            row = {"run": "ssod", "alpha": alpha, "gamma": gamma, "id_acc": accuracy(model, suite.id_test),
                   "s_per_epoch": float(np.mean(hist["seconds"])),
                   "id_frac": hist["n_id"][-1] / hist["positions"][-1],
                   "ood_frac": hist["n_ood"][-1] / hist["positions"][-1],
                   "feature_map": list(hist["feature_map_size"]), "metrics": res,
                   "history": {k: hist[k] for k in ("loss", "cls_loss", "ood_loss", "n_id", "n_ood", "seconds")}}
            rows.append(row)
            g0 = res["ssod"]["groups"]
            print(f"  alpha {alpha} gamma {gamma}: acc {row['id_acc']:.3f}, {row['s_per_epoch']:.1f} s/epoch, "
                  + ", ".join(f"{g} AUROC {100 * v['auroc']:.1f} FPR95 {100 * v['fpr95']:.1f}" for g, v in g0.items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)

    head = "| run | alpha | gamma | ID acc | s/epoch | ID pos | OOD pos | " + " | ".join(
        f"{g} AUROC | {g} FPR95" for g in groups) + " | " + " | ".join(f"{g} AUROC (comb / msp)" for g in groups) + " |"
    print()
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        main_m = "msp" if r["run"] == "plain" else "ssod"
        gm = r["metrics"][main_m]["groups"]
        cells = [r["run"] if r["run"] == "ssod" else "plain (msp)", "-" if r["alpha"] is None else f"{r['alpha']:g}",
                 "-" if r["gamma"] is None else f"{r['gamma']:g}", f"{100 * r['id_acc']:.1f}", f"{r['s_per_epoch']:.1f}",
                 "-" if r["id_frac"] is None else f"{100 * r['id_frac']:.1f}%",
                 "-" if r["ood_frac"] is None else f"{100 * r['ood_frac']:.1f}%"]
        cells += [f"{100 * gm[g]['auroc']:.1f} | {100 * gm[g]['fpr95']:.1f}" for g in groups]
        if r["run"] == "ssod":
            cells += [f"{100 * r['metrics']['ssod-combined']['groups'][g]['auroc']:.1f} / "
                      f"{100 * r['metrics']['msp']['groups'][g]['auroc']:.1f}" for g in groups]
        else:
            cells += ["-" for _ in groups]
        print("| " + " | ".join(cells) + " |")
    print()
    sets = list(suite.ood)
    print("ssod AUROC per OOD set: | run | " + " | ".join(sets) + " |")
    for r in rows:
        m = "msp" if r["run"] == "plain" else "ssod"
        tag = "plain msp" if r["run"] == "plain" else f"a={r['alpha']:g} g={r['gamma']:g}"
        print(f"| {tag} | " + " | ".join(f"{100 * r['metrics'][m]['sets'][s]['auroc']:.1f}" for s in sets) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
