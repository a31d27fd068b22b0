"""``bench_shift.py --analysis`` (use with ``--quick``): why does shift lose where it loses?

Outlier ablations -- λ 0.2 / 0.5, K 1 / 4, Telea / erase-only, Layer-CAM / Grad-CAM (:data:`VARIANTS`),
``balance``, ``standardize``, feature-map input (:data:`DETECTOR_OPTIONS`), and on ``fashion6`` an oracle
with real images of the held-out classes as outliers -- each with mask coverage, separability (held-out
accuracy of the rejection network on ID vs outliers) and feature-space position; ``--seed-spread N``
refits every shift variant with N seeds. The analysis behind docs/shift.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from shift_common import (
    demo_suite_and_classifier,
    feature_position,
    metric_cells,
    per_set_auroc,
    position_markdown,
    rows,
    summarise,
    write_outputs,
)

from oodforge.bench import BenchJob, run_bench
from oodforge.data.base import ArrayDataset
from oodforge.data.loaders import stratified_indices
from oodforge.detectors.base import FitContext
from oodforge.models.featureset import FeatureSet
from oodforge.synth.rejection import ShiftRejection
from oodforge.workflows import POST_HOC, cache_root

VARIANTS = {  # name: (masker, λ, inpainter, K)
    "lc0.2-telea-k1": ("layercam", 0.2, "telea", 1),
    "lc0.2-telea-k4": ("layercam", 0.2, "telea", 4),
    "lc0.5-telea-k1": ("layercam", 0.5, "telea", 1),
    "lc0.5-telea-k4": ("layercam", 0.5, "telea", 4),
    "lc0.2-zero-k1": ("layercam", 0.2, "zero", 1),
    "gc0.2-telea-k1": ("gradcam", 0.2, "telea", 1),
    # fashion6 only: real images of the 4 held-out classes from the Fashion-MNIST *training* split as the
    # outliers (an outlier-exposure oracle): can the rejection network separate near OOD at all?
    "oracle-heldout": ("oracle", None, None, 1),
}
DETECTOR_OPTIONS = {  # variant: extra shift specs (besides the default "shift")
    "lc0.2-telea-k1": ["shift:standardize=false", "shift:input=feature_map"],
    "lc0.2-telea-k4": ["shift:balance=true", "shift:standardize=false"],
    "lc0.5-telea-k1": ["shift:input=feature_map"],
    "lc0.5-telea-k4": ["shift:balance=true"],
}


def forge_variant(suite, model, masker: str, lam: float, inpainter: str, k: int, seed: int) -> ArrayDataset:
    """A SHIFT store with an explicit mask threshold λ (cached under ``$OODFORGE_CACHE/outliers``)."""
    import hashlib

    from oodforge.models.checkpoint import weights_hash
    from oodforge.synth.shift import forge_shift, make_inpainter, make_masker

    key = hashlib.sha256(f"{suite.id_train.identity}|{weights_hash(model)}|{masker}|{lam}|{inpainter}|{k}|{seed}"
                         .encode()).hexdigest()[:12]
    folder = cache_root() / "outliers" / f"bench_shift-{suite.name}-{masker}{lam}-{inpainter}-k{k}-{key}"
    store = forge_shift(suite.id_train, folder, make_masker(masker, model=model, threshold=lam),
                        make_inpainter(inpainter), k=k, seed=seed, class_names=suite.class_names, progress=False)
    ds, recs = store.load(with_records=True)
    ds.coverage = np.array([r["coverage"] for r in recs])
    ds.n_skipped = len(store.skipped())
    return ds


def oracle_outliers(suite, seed: int) -> ArrayDataset:
    """fashion6: ``len(id_train)`` training-split images of the held-out classes (stratified; never the test ones)."""
    from oodforge.data.fashion import FASHION_MNIST_CLASSES, load_fashion_mnist
    from oodforge.data.suites import FASHION6_HELD_OUT

    full = load_fashion_mnist("train")
    held = [FASHION_MNIST_CLASSES.index(c) for c in FASHION6_HELD_OUT]
    idx = np.flatnonzero(np.isin(full.labels.numpy(), held))
    pick = idx[stratified_indices(full.labels.numpy()[idx], min(len(suite.id_train), len(idx)), seed)]
    ds = full.subset(pick, identity_suffix=f"oracle-heldout:n{len(pick)}:seed{seed}")
    ds.coverage, ds.n_skipped, ds.source_index = np.full(len(ds), np.nan), 0, None
    return ds


def separability(train: FeatureSet, outl: FeatureSet, source_index: np.ndarray | None, seed: int) -> dict:
    """Hold out 20 % of the ID training images and the outliers forged from them; fit ``shift`` on the rest.

    Returns train / held-out accuracy (threshold 0 on the logit), held-out AUROC (ID vs outliers) and the
    loss after the first and the last epoch: ~100 % after one epoch = the outliers are trivially separable.
    """
    from oodforge.metrics import auroc

    rng = np.random.default_rng(seed)
    n = len(train)
    held = np.zeros(n, bool)
    held[rng.choice(n, size=n // 5, replace=False)] = True
    if source_index is None:  # outliers not made from the ID images: hold out 20 % of them at random
        o_held = np.zeros(len(outl), bool)
        o_held[rng.choice(len(outl), size=len(outl) // 5, replace=False)] = True
    else:
        o_held = held[source_index]
    det = ShiftRejection()
    det.fit(FitContext(model=None, train=rows(train, np.flatnonzero(~held)), outliers=rows(outl, np.flatnonzero(~o_held)),
                       device="cpu", seed=seed))
    s_id_tr, s_o_tr = det.score(rows(train, np.flatnonzero(~held))), det.score(rows(outl, np.flatnonzero(~o_held)))
    s_id, s_o = det.score(rows(train, np.flatnonzero(held))), det.score(rows(outl, np.flatnonzero(o_held)))
    acc = lambda a, b: float((np.sum(a > 0) + np.sum(b <= 0)) / (len(a) + len(b)))  # noqa: E731
    return {"train_acc": acc(s_id_tr, s_o_tr), "heldout_acc": acc(s_id, s_o), "heldout_auroc": auroc(s_id, s_o),
            "loss_epoch1": det.history_[0], "loss_final": det.history_[-1]}


def analyse_suite(name: str, args, bench_dir: Path, log=print) -> dict:
    """Forge every ``--variants`` outlier set, measure it (coverage, separability, feature-space position) and
    benchmark ``shift`` (plus the variant's extra options) on each beside every post-hoc detector;
    ``--seed-spread`` refits every shift variant with more seeds."""
    from oodforge.models.features import default_cache_dir, extract_features
    from oodforge.synth.grid import save_outlier_grid

    log(f"\n=== analysis: suite {name} ===")
    suite, model, info, ep = demo_suite_and_classifier(name, args, log)
    cache_dir = default_cache_dir()
    variants, jobs = {}, [BenchJob(model, list(POST_HOC))]
    train = extract_features(model, suite.id_train, cache_dir=cache_dir, progress=False)
    wanted = [v for v in (args.variants.split(",") if args.variants else VARIANTS) if v]
    for v in wanted:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        masker, lam, inp, k = VARIANTS[v]
        if masker == "oracle" and name != "fashion6":
            continue
        t0 = time.time()
        ds = (oracle_outliers(suite, args.seed) if masker == "oracle"
              else forge_variant(suite, model, masker, lam, inp, k, args.seed))
        save_outlier_grid(suite.id_train, ds, bench_dir / name / f"grid_{v}.png")
        outl = extract_features(model, ds, cache_dir=cache_dir, progress=False)
        variants[v] = {"n": len(ds), "skipped": ds.n_skipped, "coverage_mean": float(np.mean(ds.coverage)),
                       "coverage_median": float(np.median(ds.coverage)),
                       "separability": separability(train, outl, ds.source_index, args.seed),
                       "forge_and_stats_seconds": round(time.time() - t0, 1)}
        log(f"  {v}: {variants[v]}")
        extra = [m for m in DETECTOR_OPTIONS.get(v, []) if not (args.no_feature_map and "feature_map" in m)]
        jobs.append(BenchJob(model, ["shift"] + extra, label=v, outliers=ds))
        variants[v]["_ds"] = ds
    sets = {"ID test": suite.id_test, **suite.ood, **{f"outliers {v}": d.pop("_ds") for v, d in variants.items()}}
    position = feature_position(model, suite, sets, cache_dir)
    res = run_bench(suite, jobs, bench_dir / name, device=args.device, cache_dir=cache_dir, seed=args.seed,
                    config={"suite": name, "quick": args.quick, "analysis": True}, log=log)
    rows = {m: summarise(res, m) for m in res["methods"]}
    post = [m for m in res["methods"] if not m.startswith("shift")]
    best = max(post, key=lambda m: rows[m]["all"]["auroc"])
    spread = {}
    if args.seed_spread > 1:  # refit every shift variant with other seeds (same outliers)
        runs = [{m: rows[m] for m in rows if m.startswith("shift")}]
        for extra_seed in range(args.seed + 1, args.seed + args.seed_spread):
            r = run_bench(suite, [BenchJob(model, j.methods, label=j.label, outliers=j.outliers) for j in jobs[1:]],
                          None, device=args.device, cache_dir=cache_dir, seed=extra_seed, progress=False, log=None)
            runs.append({m: summarise(r, m) for m in r["methods"]})
        for m in runs[0]:
            spread[m] = {g: None if runs[0][m][g] is None else
                         {k: [float(run[m][g][k]) for run in runs] for k in ("auroc", "fpr95")}
                         for g in runs[0][m] if g != "seconds"}
    return {"suite": name, "id_accuracy": res["id_accuracy"], "n_train": len(suite.id_train), "groups": res["groups"],
            "best_post_hoc": best, "rows": rows, "per_set": res["methods"], "variants": variants,
            "position": position, "seed_spread": spread}


def analysis_markdown(a: dict) -> str:
    """The markdown of one suite's analysis."""
    groups = [g for g, sets in a["groups"].items() if sets]
    lines = [f"### analysis, suite `{a['suite']}` (ID accuracy {100 * a['id_accuracy']:.2f} %, "
             f"{a['n_train']} training images)", "",
             "Outlier sets (λ = mask threshold; separability = `shift` fitted on 80 % of the ID images and their "
             "outliers, evaluated on the other 20 %):", "",
             "| outliers | n (skipped) | mask coverage mean / median | flat share | train acc | held-out acc | "
             "held-out AUROC | loss ep1 / ep10 |", "|---|---|---|---|---|---|---|---|"]
    for v, d in a["variants"].items():
        s = d["separability"]
        flat = a["position"][f"outliers {v}"]["flat_share"]
        lines.append(f"| {v} | {d['n']} ({d['skipped']}) | "
                     + ("- (real images)" if np.isnan(d["coverage_mean"])
                        else f"{d['coverage_mean']:.3f} / {d['coverage_median']:.3f}") + " | "
                     f"{100 * flat:.1f} % | {100 * s['train_acc']:.2f} | {100 * s['heldout_acc']:.2f} | "
                     f"{100 * s['heldout_auroc']:.2f} | {s['loss_epoch1']:.4f} / {s['loss_final']:.4f} |")
    lines += position_markdown(a["position"])
    head = "| method | AUROC | FPR95 | " + " | ".join(f"AUROC {g} | FPR95 {g}" for g in groups) + " |"
    lines += ["", "Detection (mean over the OOD sets, %):", "", head, "|" + "---|" * (head.count("|") - 1)]
    order = [a["best_post_hoc"]] + [m for m in a["rows"] if m.startswith("shift")]
    for m in order:
        r = a["rows"][m]
        cells = [("best post-hoc: " if m == a["best_post_hoc"] else "") + m] + metric_cells(r, groups)
        lines.append("| " + " | ".join(cells) + " |")
    if a.get("seed_spread"):
        n = len(next(iter(next(iter(a["seed_spread"].values()))["all"].values())))
        lines += ["", f"Seed spread of the `shift` variants: mean ± std over {n} fit seeds (same outliers), %:", "",
                  "| method@outliers | AUROC | FPR95 | " + " | ".join(f"AUROC {g}" for g in groups) + " |",
                  "|" + "---|" * (3 + len(groups))]
        for m, sp in a["seed_spread"].items():
            ms = lambda v: f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}"  # noqa: E731
            lines.append(f"| {m} | {ms(sp['all']['auroc'])} | {ms(sp['all']['fpr95'])} | "
                         + " | ".join(ms(sp[g]["auroc"]) for g in groups) + " |")
    sets = list(next(iter(a["per_set"].values())))
    lines += [""] + per_set_auroc(a["per_set"], sets, "method (AUROC per set)")
    return "\n".join(lines + [""])


def run_analysis(suites: list[str], args, out: Path, bench_dir: Path, cmd: str, t0: float) -> None:
    """The ``--analysis`` mode: every suite's analysis into ``out`` and ``<out stem>/summary.json``."""
    found = [analyse_suite(name, args, bench_dir) for name in suites]
    md = ["# SHIFT CPU forger: ablations and diagnostics", "", f"Command: `{cmd}` ({time.time() - t0:.0f} s)", ""]
    md += [analysis_markdown(a) for a in found]
    write_outputs(out, bench_dir, md, found)
