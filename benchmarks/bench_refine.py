"""Does boundary refinement make CPU-forged SHIFT outliers more useful?

    .venv/bin/python benchmarks/bench_refine.py [--suites fashion,fashion6,scenes] [--quick] [--eps 8] [--steps 5]

For each suite: train the ``small_resnet`` classifier on the ID training set, forge SHIFT outliers
with the CPU ``layercam + telea`` forger, refine them with :func:`oodforge.synood.refine.refine_outliers`
(a bounded signed-gradient perturbation pushing each outlier's energy score up to the boundary
``m_out`` = 5th percentile of the ID-training energies, SynOOD Eq. 7 in its hinge form), then train the
``shift`` rejection detector on the unrefined and on the refined outliers and report AUROC / FPR95
(mean over the suite's OOD sets, and per near/far group) next to the best post-hoc detector.
An energy histogram (ID test, real OOD, unrefined and refined outliers) is saved per suite.

Outputs go to ``--out`` (default ``runs/bench_refine``): ``<suite>/results.json`` etc. from
:func:`oodforge.bench.run_bench`, ``<suite>/energy_hist.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from oodforge.bench import BenchJob, run_bench
from oodforge.data.base import ArrayDataset
from oodforge.data.suites import load_suite
from oodforge.models.backbones import build_model
from oodforge.models.checkpoint import load_checkpoint, save_checkpoint
from oodforge.models.train import train_classifier
from oodforge.report import best_method
from oodforge.synood.energy import energy_scores
from oodforge.synood.refine import refine_outliers
from oodforge.synth.inpaint import make_inpainter
from oodforge.synth.masks import make_masker
from oodforge.synth.shift import forge_shift
from oodforge.workflows import POST_HOC, normalisation


def stratified(ds: ArrayDataset, n: int | None, seed: int) -> ArrayDataset:
    if n is None or n >= len(ds):
        return ds
    from oodforge.data.loaders import stratified_indices

    return ds.subset(np.sort(stratified_indices(ds.labels.numpy(), n, seed)), f"strat{n}s{seed}")


def mean_metric(res: dict, sets: list[str], key: str) -> float:
    vals = [res[s][key] for s in sets if s in res]
    return float(np.mean(vals)) if vals else float("nan")


def energy_histogram(path: Path, title: str, groups: dict[str, np.ndarray], m_out: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    lo = min(np.percentile(v, 0.5) for v in groups.values())
    hi = max(np.percentile(v, 99.5) for v in groups.values())
    bins = np.linspace(lo, hi, 60)
    for name, v in groups.items():
        ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.6, label=f"{name} (n={len(v)})")
    ax.axvline(m_out, color="k", linestyle="--", linewidth=1, label=f"m_out = {m_out:.2f}")
    ax.set_xlabel("energy score  T·logsumexp(logits/T)  (higher = more ID)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_suite(name: str, args, out: Path) -> dict:
    t0 = time.time()
    suite = load_suite(name, seed=args.seed, quick=args.quick)
    train = stratified(suite.id_train, args.max_train, args.seed)
    if train is not suite.id_train:
        suite.id_train = train
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / "classifier"
    model = None
    if (ckpt / "model.safetensors").is_file() and not args.retrain:
        model, meta = load_checkpoint(ckpt, args.device)
        if meta.get("train_set") == suite.id_train.identity and meta.get("epochs") == args.epochs:
            print(f"[{name}] reusing classifier {ckpt}")
        else:
            model = None
    if model is None:
        mean, std = normalisation(suite)
        torch.manual_seed(args.seed)
        model = build_model("small_resnet", suite.num_classes, suite.image_shape[0], mean, std)
        hist = train_classifier(model, suite.id_train, epochs=args.epochs, lr=0.05, batch_size=128, seed=args.seed,
                                device=args.device, progress=True)
        meta = {"class_names": suite.class_names, "epochs": args.epochs, "train_set": suite.id_train.identity,
                "history": {k: v for k, v in hist.items() if isinstance(v, list)}}
        save_checkpoint(model, ckpt, meta)
    model.eval()
    t_train = time.time() - t0

    t1 = time.time()
    masker = make_masker("layercam", model=model)
    store = forge_shift(suite.id_train, d / "outliers-layercam-telea", masker, make_inpainter("telea"), k=args.k,
                        seed=args.seed, limit=args.limit, device=args.device, class_names=suite.class_names,
                        progress=True)
    outliers = store.load()
    t_forge = time.time() - t1

    t2 = time.time()
    refined, info = refine_outliers(model, outliers, eps=args.eps / 255.0, steps=args.steps,
                                    id_dataset=suite.id_train, m_out_percentile=args.m_out_percentile,
                                    loss_form=args.loss_form, device=args.device, return_info=True, progress=True)
    t_refine = time.time() - t2
    m_out = info["m_out"]

    methods = list(POST_HOC) + ["shift"]
    jobs = [BenchJob(model, methods, outliers=outliers, info={"outliers": "layercam+telea"}),
            BenchJob(model, ["shift"], label="refined", outliers=refined,
                     info={"outliers": f"layercam+telea refined eps={args.eps}/255 steps={args.steps}"})]
    res = run_bench(suite, jobs, d, device=args.device, cache_dir=d / "features", seed=args.seed,
                    config={"bench": "bench_refine", **{k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(args).items()}}, log=print)

    s_id = energy_scores(model, suite.id_test, device=args.device)
    s_ood = np.concatenate([energy_scores(model, ds, device=args.device) for ds in suite.ood.values()])
    s_out = energy_scores(model, outliers, device=args.device)
    s_ref = energy_scores(model, refined, device=args.device)
    energy_histogram(d / "energy_hist.png", f"{name}: energy scores of the small_resnet", {
        "ID test": s_id, "real OOD (all sets)": s_ood, "SHIFT outliers (layercam+telea)": s_out,
        f"refined (eps {args.eps}/255, {args.steps} steps)": s_ref}, m_out)

    groups = {g: sets for g, sets in res["groups"].items() if sets}
    groups["all"] = list(suite.ood)
    best, _ = best_method(res, exclude=("shift",))
    rows = {}
    for label, key in (("best post-hoc: " + best, best), ("shift (unrefined)", "shift"), ("shift (refined)", "shift@refined")):
        r = res["methods"][key]
        rows[label] = {g: {"auroc": mean_metric(r, sets, "auroc"), "fpr95": mean_metric(r, sets, "fpr95")}
                       for g, sets in groups.items()}
    below = info["score_before"] < m_out
    summary = {
        "suite": name, "id_accuracy": res["id_accuracy"], "n_train": len(suite.id_train), "n_outliers": len(outliers),
        "m_out": m_out, "rows": rows,
        "energy": {"id_test_median": float(np.median(s_id)), "real_ood_median": float(np.median(s_ood)),
                   "outliers_median": float(np.median(s_out)), "refined_median": float(np.median(s_ref)),
                   "frac_outliers_below_m_out": float(below.mean()),
                   "mean_gap_to_m_out_before": float(np.mean(m_out - info["score_before"][below])) if below.any()
                   else 0.0,
                   "mean_gap_to_m_out_after": float(np.mean(m_out - info["score_after"][below])) if below.any()
                   else 0.0},
        "seconds": {"train": round(t_train, 1), "forge": round(t_forge, 1), "refine": round(t_refine, 1),
                    "total": round(time.time() - t0, 1)},
    }
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(summaries: list[dict]) -> None:
    for s in summaries:
        groups = list(next(iter(s["rows"].values())))
        print(f"\n== {s['suite']}  (ID acc {100 * s['id_accuracy']:.2f} %, {s['n_train']} train images, "
              f"{s['n_outliers']} outliers, m_out {s['m_out']:.3f}) ==")
        head = "".join(f"{g + ' AUROC':>13}{g + ' FPR95':>13}" for g in groups)
        print(f"{'method':<34}{head}")
        for label, r in s["rows"].items():
            cells = "".join(f"{100 * r[g]['auroc']:>13.2f}{100 * r[g]['fpr95']:>13.2f}" for g in groups)
            print(f"{label:<34}{cells}")
        e = s["energy"]
        print(f"energy medians: ID test {e['id_test_median']:.2f}, real OOD {e['real_ood_median']:.2f}, outliers "
              f"{e['outliers_median']:.2f} -> refined {e['refined_median']:.2f}; gap to m_out (outliers below it, "
              f"{100 * e['frac_outliers_below_m_out']:.0f} %) {e['mean_gap_to_m_out_before']:.2f} -> "
              f"{e['mean_gap_to_m_out_after']:.2f}; seconds {s['seconds']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default="fashion,fashion6,scenes")
    p.add_argument("--quick", action="store_true", help="the suites' quick subsets (3000 train / 600 test)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-train", type=int, default=None, help="train (and forge) on at most N ID images")
    p.add_argument("--limit", type=int, default=None, help="forge outliers from the first N training images only")
    p.add_argument("--k", type=int, default=1, help="SHIFT outliers per ID image")
    p.add_argument("--eps", type=float, default=8.0, help="L_inf bound of the refinement, in 1/255 units")
    p.add_argument("--steps", type=int, default=5, help="signed-gradient steps of the refinement")
    p.add_argument("--m-out-percentile", type=float, default=5.0)
    p.add_argument("--loss-form", default="hinge", choices=["hinge", "linear", "squared"])
    p.add_argument("--out", type=Path, default=Path("runs/bench_refine"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train the classifier even if --out has one")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    summaries = [run_suite(s.strip(), args, args.out) for s in args.suites.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=2))
    print_summary(summaries)


if __name__ == "__main__":
    main()
