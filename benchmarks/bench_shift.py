"""Issue 3: how good is the CPU SHIFT forger + rejection network next to the post-hoc detectors?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py [--suites fashion,fashion6,scenes] [--quick]
        [--max-train 20000] [--epochs 4] [--fm-max-sources 3000] [--fresh-sources 1000] [--out runs/bench_shift.md]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py --stats-only --fresh-repeats 3 --out runs/bench_shift_stats.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py --rescore
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py --analysis --quick [--seed-spread 5] [--no-feature-map]

Per suite, with exactly the settings of ``oodforge demo`` (so the classifier cached under
``$OODFORGE_CACHE`` is the demo's): stratified ID subset of ``--max-train`` images
(:func:`oodforge.demo.stratified_subset`), the plain ``small_resnet`` from
:func:`oodforge.workflows.get_model` (``TrainPlan(epochs=3 if quick else epochs)``), then

1. SHIFT outliers with the CPU forger (Layer-CAM mask, λ = 0.2, + Telea inpainting) for K = 1 and K = 4
   (:func:`oodforge.workflows.forge_cpu_outliers`); synthesis throughput is reported twice: the number
   of the cached call (a fresh forge on the first run, a cache hit afterwards: marked) and a fresh forge
   of the first ``--fresh-sources`` training images into a temporary folder (always fresh);
2. one :func:`oodforge.bench.run_bench` call with these jobs on the same classifier:

   ========  =====================  =============================================================
   label     outliers               methods
   ========  =====================  =============================================================
   (none)    -                      every post-hoc detector (:data:`oodforge.workflows.POST_HOC`)
   ``k1``    K = 1 (all sources)    ``shift`` (``input=penultimate``, the paper's Eq. 5)
   ``k4``    K = 4 (all sources)    ``shift``
   ``k1cap`` K = 1, capped sources  ``shift_cap:input=feature_map`` and ``shift_cap`` (control)
   ``k4cap`` K = 4, capped sources  the same
   ========  =====================  =============================================================

**The feature-map cap.** ``input=feature_map`` feeds the flattened last feature map (128x7x7 = 6,272
dims for 28 px, 8,192 for 32 px) to the 2048-wide MLP: about 0.5 s per batch of 128 on one core, so
10 epochs over 20,000 ID + 80,000 outliers (K = 4) would take over an hour per suite. The ``*cap`` jobs
therefore train on ``--fm-max-sources`` ID images (stratified by class, seeded:
:func:`cap_sources`) and on the outliers forged *from those same images* (all K of each). The detector
``shift_cap`` (registered here) is :class:`~oodforge.synth.rejection.ShiftRejection` that keeps only
those ID rows; the job's outlier set is filtered by ``source_index``. The capped ``penultimate`` run is
the control that separates the effect of the input from the effect of the cap.

**Fit time** of each shift variant is the wall time of the rejection network's ``_fit`` alone (measured by
wrapping ``ShiftRejection._fit`` in this process); for post-hoc detectors the benchmark's fit + score time.

**Fusion rows.** The best penultimate and the best feature-map shift variant are each fused with the best
post-hoc detector: each score is mapped to its percentile among the scores of a random half of the ID test
set, the fused score is the smaller percentile; the two detectors and the fusion are then evaluated on
the other half (no OOD data is used for calibration; the choice of the "best" variants is made on the
test sets, so it is optimistic).

Outputs: ``--out`` (markdown tables), and next to it ``<out stem>/<suite>/`` with ``results.json``,
``scores.npz``, ``report.md`` of :func:`~oodforge.bench.run_bench`, the K = 1 / K = 4 outlier grids, and
``<out stem>/summary.json`` with every number of the tables.

Other modes (the analysis behind docs/shift.md):

* ``--stats-only``: no fits; mask coverage of the stores, where ID test, the OOD sets and the outliers lie
  for the classifier (median energy, KNN distance, share of flat images) and best-of-``--fresh-repeats``
  synthesis timings split into masking and inpainting;
* ``--rescore``: re-render a finished run's markdown from its ``summary.json`` / ``scores.npz`` (adds the
  fusion rows and, when ``<out stem>_stats/summary.json`` exists, the store statistics);
* ``--analysis`` (with ``--quick``): outlier ablations -- λ 0.2 / 0.5, K 1 / 4, Telea / erase-only, Layer-CAM /
  Grad-CAM, ``balance``, ``standardize``, feature-map input, and on ``fashion6`` an oracle with real images of
  the held-out classes as outliers -- each with mask coverage, separability (held-out accuracy of the
  rejection network on ID vs outliers) and feature-space position; ``--seed-spread N`` refits every shift
  variant with N seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from oodforge.bench import BenchJob, run_bench
from oodforge.data.base import ArrayDataset
from oodforge.data.loaders import stratified_indices
from oodforge.demo import DEMO_SUITES, stratified_subset
from oodforge.detectors.base import FitContext, register
from oodforge.models.featureset import FeatureSet
from oodforge.synth.rejection import ShiftRejection
from oodforge.workflows import POST_HOC, TrainPlan, cache_root, forge_cpu_outliers, get_model

FIT_LOG: list[dict] = []  # one entry per ShiftRejection fit, in run order


def cap_sources(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The ID training rows the capped detectors use: ``n`` stratified by class, deterministic for ``seed``."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    return stratified_indices(labels, n, seed)


def _rows(fs: FeatureSet, idx: np.ndarray) -> FeatureSet:
    import torch

    t = torch.as_tensor(idx, dtype=torch.long)
    return FeatureSet(fs.logits[t], fs.penultimate[t], fs.labels[t],
                      None if fs.feature_map is None else fs.feature_map[t])


@register
class CappedShift(ShiftRejection):
    """``shift`` fitted on ``max_sources`` stratified ID training rows only (see the module doc).

    The outliers must already be restricted to those sources (the benchmark job does it with
    :func:`cap_sources` and the store's ``source_index``); the ID rows are chosen here with the same
    function and the fit seed, so both sides agree.
    """

    name = "shift_cap"
    paper = ShiftRejection.paper + " (fit on a capped set of source images; benchmarks/bench_shift.py)"

    def __init__(self, max_sources: int = 2000, **params) -> None:
        super().__init__(**params)
        if max_sources < 1:
            raise ValueError(f"shift_cap: max_sources must be >= 1, got {max_sources}")
        self.max_sources = int(max_sources)

    def _fit(self, ctx: FitContext) -> None:
        idx = cap_sources(ctx.train.labels.numpy(), self.max_sources, int(ctx.seed))
        sub = FitContext(model=ctx.model, train=_rows(ctx.train, idx), outliers=ctx.outliers, device=ctx.device,
                         seed=ctx.seed, extra=ctx.extra)
        super()._fit(sub)


def _install_fit_timer() -> None:
    """Record the wall time, set sizes and loss history of every rejection-network fit in this process."""
    if getattr(ShiftRejection._fit, "_timed", False):
        return
    orig = ShiftRejection._fit

    def timed(self, ctx: FitContext) -> None:
        t0 = time.perf_counter()
        orig(self, ctx)
        FIT_LOG.append({"detector": type(self).name, "input": self.input, "n_id": len(ctx.train),
                        "n_outliers": len(ctx.outliers), "seconds": round(time.perf_counter() - t0, 2),
                        "loss": [round(v, 5) for v in self.history_]})

    timed._timed = True  # type: ignore[attr-defined]
    ShiftRejection._fit = timed  # type: ignore[method-assign]


def outliers_from(outliers: ArrayDataset, sources: np.ndarray) -> ArrayDataset:
    """The outliers forged from the ID images ``sources`` (all their K variants)."""
    keep = np.flatnonzero(np.isin(outliers.source_index, sources))
    ds = outliers.subset(keep, identity_suffix=f"sources{len(sources)}:{hash_of(sources)}")
    ds.source_index = outliers.source_index[keep]
    ds.k = outliers.k[keep]
    return ds


def hash_of(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:12]


def fresh_throughput(suite, model, k: int, n_sources: int, seed: int, repeats: int = 1) -> dict:
    """Forge the first ``n_sources`` images with K = ``k`` into a temporary store: images/s of a fresh run
    (best of ``repeats``: the machine is shared, the best run is the least disturbed one), plus the time
    split between masking (per source) and inpainting (per outlier), measured on the same images."""
    import torch

    from oodforge.outliers.store import outlier_seed
    from oodforge.synth.shift import forge_shift, make_inpainter, make_masker

    runs = []
    for _ in range(max(1, repeats)):
        with tempfile.TemporaryDirectory(prefix="bench_shift_") as tmp:
            t0 = time.perf_counter()
            store = forge_shift(suite.id_train, Path(tmp) / "store", make_masker("layercam", model=model),
                                make_inpainter("telea"), k=k, seed=seed, limit=n_sources, progress=False)
            n = len(store.records())
            runs.append(time.perf_counter() - t0)
    dt = min(runs)
    masker, inpainter = make_masker("layercam", model=model), make_inpainter("telea")
    x = suite.id_train.images[:n_sources].float().div(255.0)
    y = suite.id_train.labels[:n_sources]
    t0 = time.perf_counter()
    masks = torch.cat([masker(x[i:i + 32], y[i:i + 32], suite.class_names) for i in range(0, len(x), 32)])
    t_mask = time.perf_counter() - t0
    rep = torch.arange(len(x)).repeat_interleave(k)
    ks = list(range(k)) * len(x)
    seeds = [outlier_seed(seed, int(i), kk) for i, kk in zip(rep.tolist(), ks)]
    t0 = time.perf_counter()
    for i in range(0, len(rep), 128):
        inpainter(x[rep[i:i + 128]], masks[rep[i:i + 128]], seeds[i:i + 128], ks[i:i + 128], suite.class_names)
    t_inp = time.perf_counter() - t0
    return {"k": k, "sources": n_sources, "n": n, "seconds": round(dt, 2), "images_per_second": round(n / dt, 1),
            "all_seconds": [round(v, 2) for v in runs], "mask_ms_per_source": round(1000 * t_mask / len(x), 3),
            "inpaint_ms_per_outlier": round(1000 * t_inp / len(rep), 3)}


def forge(suite, model, k: int, seed: int, log) -> tuple[ArrayDataset, Path, dict]:
    before = set((cache_root() / "outliers").glob("*")) if (cache_root() / "outliers").is_dir() else set()
    outliers, folder, stats = forge_cpu_outliers(suite, model, k=k, seed=seed, log=log)
    stats = {**stats, "fresh": folder not in before}
    return outliers, folder, stats


def summarise(res: dict, key: str) -> dict:
    """Mean AUROC / FPR95 over all OOD sets and per group for one method."""
    r = res["methods"][key]
    out = {}
    for g, sets in (("all", list(r)), *res["groups"].items()):
        sel = [s for s in sets if s in r]
        out[g] = ({"auroc": float(np.mean([r[s]["auroc"] for s in sel])),
                   "fpr95": float(np.mean([r[s]["fpr95"] for s in sel]))} if sel else None)
    return out


def run_suite(name: str, args, bench_dir: Path, log=print) -> dict:
    from oodforge.data.suites import load_suite
    from oodforge.models.features import default_cache_dir
    from oodforge.synth.grid import save_outlier_grid

    t_start = time.time()
    log(f"\n=== suite {name} ===")
    suite = stratified_subset(load_suite(name, seed=args.seed, quick=args.quick), args.max_train, args.seed)
    ep = 3 if args.quick else args.epochs  # as run_demo
    model, info = get_model(suite, TrainPlan(epochs=ep, seed=args.seed), device=args.device, log=log)
    synth, outl = {}, {}
    for k in (1, 4):
        outliers, folder, stats = forge(suite, model, k, args.seed, log)
        outl[k] = outliers
        synth[f"k{k}"] = {**stats, "store": str(folder)}
        save_outlier_grid(suite.id_train, outliers, bench_dir / name / f"outliers_grid_k{k}.png")
        if args.fresh_sources:
            synth[f"k{k}_fresh"] = fresh_throughput(suite, model, k, min(args.fresh_sources, len(suite.id_train)),
                                                    args.seed, args.fresh_repeats)
            log(f"fresh forge K={k}: {synth[f'k{k}_fresh']}")
    stats = outlier_stats(model, suite, outl, synth)
    if args.stats_only:
        return {"suite": name, "id_accuracy": None, "n_train": len(suite.id_train), "synthesis": synth,
                "position": stats, "groups": suite.groups}
    cap = min(args.fm_max_sources, len(suite.id_train))
    sources = cap_sources(suite.id_train.labels.numpy(), cap, args.seed)
    cap_spec = f"shift_cap:max_sources={cap}"
    jobs = [BenchJob(model, list(POST_HOC), info={"checkpoint": info["checkpoint"]})]
    for k in (1, 4):
        jobs.append(BenchJob(model, ["shift"], label=f"k{k}", outliers=outl[k], info={"outlier_store": synth[f"k{k}"]}))
    for k in (1, 4):
        jobs.append(BenchJob(model, [f"{cap_spec},input=feature_map", cap_spec], label=f"k{k}cap",
                             outliers=outliers_from(outl[k], sources),
                             info={"outlier_store": synth[f"k{k}"], "max_sources": cap}))
    n_fit0 = len(FIT_LOG)
    res = run_bench(suite, jobs, bench_dir / name, device=args.device, cache_dir=default_cache_dir(), seed=args.seed,
                    config={"suite": name, "quick": args.quick, "max_train": args.max_train, "epochs": ep,
                            "fm_max_sources": cap, "shift_synthesis": synth}, log=log)
    fits = FIT_LOG[n_fit0:]
    shift_keys = [m for m in res["methods"] if m.startswith("shift")]
    if len(fits) != len(shift_keys):
        raise RuntimeError(f"expected {len(shift_keys)} rejection-network fits, logged {len(fits)}")
    rows = {}
    for m in res["methods"]:
        rows[m] = {**summarise(res, m), "seconds": res["timings"].get(m)}
    for m, f in zip(shift_keys, fits):
        rows[m]["fit"] = f
        rows[m]["seconds"] = f["seconds"]
    post = [m for m in res["methods"] if not m.startswith("shift")]
    best = max(post, key=lambda m: rows[m]["all"]["auroc"])
    return {"suite": name, "id_accuracy": res["id_accuracy"], "n_train": len(suite.id_train),
            "groups": res["groups"], "sets": list(suite.ood), "best_post_hoc": best, "rows": rows,
            "per_set": res["methods"], "synthesis": synth, "train_seconds": info.get("train_seconds"),
            "checkpoint": info["checkpoint"], "fm_max_sources": cap, "seconds": round(time.time() - t_start, 1),
            "position": stats, "_scores": res["_scores"]}


def outlier_stats(model, suite, outl: dict[int, ArrayDataset], synth: dict) -> dict:
    """Mask coverage of the stores (into ``synth``) and where ID test, the OOD sets and the outliers lie
    (median energy and KNN distance, mean intensity, share of flat images: :func:`feature_position`)."""
    from oodforge.models.features import default_cache_dir
    from oodforge.outliers.store import OutlierStore

    for k in outl:
        cov = np.array([r["coverage"] for r in OutlierStore(synth[f"k{k}"]["store"]).records()])
        synth[f"k{k}"]["coverage_mean"] = float(cov.mean())
        synth[f"k{k}"]["coverage_median"] = float(np.median(cov))
    sets = {"ID test": suite.id_test, **suite.ood, **{f"outliers K={k}": d for k, d in outl.items()}}
    return feature_position(model, suite, sets, default_cache_dir())


def position_markdown(position: dict, synth: dict) -> list[str]:
    cov = "; ".join(f"K={k}: mean {synth[f'k{k}']['coverage_mean']:.3f}, median {synth[f'k{k}']['coverage_median']:.3f}"
                    for k in (1, 4) if "coverage_mean" in synth.get(f"k{k}", {}))
    lines = ["", f"Mask coverage (share of the image erased): {cov}. Where the sets lie for the classifier "
             "(medians; energy = logsumexp of the logits, higher = more ID-like; KNN = distance to the 50th "
             "nearest ID-training vector, normalised penultimate, as the `knn` detector; flat = pixel std < 0.05):",
             "", "| set | energy | KNN dist | mean intensity | flat share |", "|---|---|---|---|---|"]
    for sname, p in position.items():
        lines.append(f"| {sname} | {p['energy']:.2f} | {p['knn_dist']:.3f} | {p['mean_intensity']:.3f} | "
                     f"{100 * p['flat_share']:.1f} % |")
    return lines


def _pct(v: dict | None, key: str) -> str:
    return "-" if v is None else f"{100 * v[key]:.2f}"


def variant_name(m: str) -> tuple[str, str, str]:
    """``(label, K, input)`` for a method key."""
    spec, _, label = m.partition("@")
    k = {"k1": "1", "k4": "4", "k1cap": "1", "k4cap": "4"}.get(label, "-")
    if not spec.startswith("shift"):
        return spec, "-", "-"
    inp = "feature_map" if "input=feature_map" in spec else "penultimate"
    capped = "cap" in label
    return f"shift ({inp}{', capped' if capped else ''})", k, inp


def fusion(scores: dict[str, np.ndarray], a: str, b: str, sets: list[str], groups: dict, seed: int) -> dict:
    """Score fusion of two detectors, calibrated without touching OOD data: a random half of the ID test set
    (``seed``) maps each detector's score to its ID percentile; the fused score is the smaller percentile
    (an image is flagged when either detector flags it). All three (a, b, fused) are evaluated on the
    *other* half of the ID test set against every OOD set, so they are comparable with each other."""
    from oodforge.metrics import evaluate

    n = len(scores[f"{a}/id"])
    perm = np.random.default_rng(seed).permutation(n)
    cal, held = perm[: n // 2], perm[n // 2:]

    def pct(m: str, x: np.ndarray) -> np.ndarray:
        ref = np.sort(scores[f"{m}/id"][cal])
        return np.searchsorted(ref, x, side="right") / len(ref)

    out = {}
    for name, f in ((a, lambda s_: scores[f"{a}/{s_}"]), (b, lambda s_: scores[f"{b}/{s_}"]),
                    ("fused", lambda s_: np.minimum(pct(a, scores[f"{a}/{s_}"]), pct(b, scores[f"{b}/{s_}"])))):
        id_s = f("id")[held]
        per = {x: evaluate(id_s, f(x)) for x in sets}
        out[name] = summarise({"methods": {"m": per}, "groups": groups}, "m")
    return out


def add_fusions(s: dict, scores: dict[str, np.ndarray], seed: int) -> None:
    """Fuse the best post-hoc detector with the best penultimate and the best feature-map shift variant."""
    rows = s["rows"]
    pen = [m for m in rows if m.startswith("shift") and "feature_map" not in m]
    fm = [m for m in rows if "feature_map" in m]
    s["fusion"] = {}
    for group in (pen, fm):
        if group:
            best = max(group, key=lambda m: rows[m]["all"]["auroc"])
            s["fusion"][best] = fusion(scores, best, s["best_post_hoc"], s["sets"], s["groups"], seed)


def fusion_markdown(s: dict) -> list[str]:
    if not s.get("fusion"):
        return []
    groups = [g for g, sets in s["groups"].items() if sets]
    lines = ["", f"Fusion with the best post-hoc detector (`{s['best_post_hoc']}`): fused score = min of the two ID "
             "percentiles, calibrated on a random half of the ID test set; all three rows evaluated on the other half:",
             "", "| detector | AUROC | FPR95 | " + " | ".join(f"AUROC {g} | FPR95 {g}" for g in groups) + " |",
             "|" + "---|" * (3 + 2 * len(groups))]
    for m, f in s["fusion"].items():
        for name in (s["best_post_hoc"], m, "fused"):
            r = f[name]
            label = f"min-percentile({m}, {s['best_post_hoc']})" if name == "fused" else name
            cells = [label, _pct(r["all"], "auroc"), _pct(r["all"], "fpr95")]
            for g in groups:
                cells += [_pct(r[g], "auroc"), _pct(r[g], "fpr95")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def suite_markdown(s: dict) -> str:
    rows, groups = s["rows"], [g for g, sets in s["groups"].items() if sets]
    head = "| method | K | fit set (ID + outliers) | AUROC | FPR95 | " + " | ".join(
        f"AUROC {g} | FPR95 {g}" for g in groups) + " | fit s |"
    lines = [f"### suite `{s['suite']}`", "",
             f"ID accuracy {100 * s['id_accuracy']:.2f} % ({s['n_train']} training images); OOD sets: "
             + ", ".join(f"{g}: {', '.join(sets)}" for g, sets in s["groups"].items() if sets)
             + ". Mean AUROC / FPR95 (%) over the sets.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    order = [s["best_post_hoc"]] + [m for m in rows if m.startswith("shift")]
    for m in order:
        r = rows[m]
        label, k, _ = variant_name(m)
        if m == s["best_post_hoc"]:
            label, fitset = f"best post-hoc: **{m}**", f"{s['n_train']} ID"
        else:
            fitset = f"{r['fit']['n_id']} + {r['fit']['n_outliers']}"
        cells = [label, k, fitset, _pct(r["all"], "auroc"), _pct(r["all"], "fpr95")]
        for g in groups:
            cells += [_pct(r[g], "auroc"), _pct(r[g], "fpr95")]
        sec = r.get("seconds")
        cells.append("-" if sec is None else f"{sec:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    syn = s["synthesis"]
    lines += ["", "Synthesis (Layer-CAM λ=0.2 + Telea, 1 thread): "
              + "; ".join(
                  f"K={k}: {syn[f'k{k}']['n']} outliers, "
                  + (f"{syn[f'k{k}']['images_per_second']} img/s (first run, fresh)" if syn[f"k{k}"]["fresh"]
                     else "cached store (no synthesis time)")
                  + (f", fresh forge of {syn[f'k{k}_fresh']['sources']} sources: "
                     f"{syn[f'k{k}_fresh']['images_per_second']} img/s" if f"k{k}_fresh" in syn else "")
                  + (f" (best of {len(syn[f'k{k}_fresh']['all_seconds'])}; Layer-CAM "
                     f"{syn[f'k{k}_fresh']['mask_ms_per_source']} ms per source, Telea "
                     f"{syn[f'k{k}_fresh']['inpaint_ms_per_outlier']} ms per outlier"
                     + (", timed by the --stats-only run" if "from" in syn[f"k{k}_fresh"] else "") + ")"
                     if "mask_ms_per_source" in syn.get(f"k{k}_fresh", {}) else "")
                  for k in (1, 4)) + "."]
    lines += fusion_markdown(s)
    if s.get("position"):
        lines += position_markdown(s["position"], syn)
    # every method, every set (AUROC)
    sets = s["sets"]
    lines += ["", "<details><summary>AUROC (%) of every method on every OOD set</summary>", "",
              "| method | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for m, per in s["per_set"].items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * per[x]['auroc']:.2f}" for x in sets) + " |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


# --- analysis (--analysis): why does shift lose where it loses? ----------------------------------------

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


def image_stats(ds: ArrayDataset) -> dict:
    """Mean intensity and the share of near-flat images (pixel std < 0.05 on a [0, 1] scale)."""
    x = ds.images.float().div(255.0).flatten(1)
    std = x.std(1)
    return {"mean_intensity": float(x.mean()), "flat_share": float((std < 0.05).double().mean())}


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
    det.fit(FitContext(model=None, train=_rows(train, np.flatnonzero(~held)), outliers=_rows(outl, np.flatnonzero(~o_held)),
                       device="cpu", seed=seed))
    s_id_tr, s_o_tr = det.score(_rows(train, np.flatnonzero(~held))), det.score(_rows(outl, np.flatnonzero(~o_held)))
    s_id, s_o = det.score(_rows(train, np.flatnonzero(held))), det.score(_rows(outl, np.flatnonzero(o_held)))
    acc = lambda a, b: float((np.sum(a > 0) + np.sum(b <= 0)) / (len(a) + len(b)))  # noqa: E731
    return {"train_acc": acc(s_id_tr, s_o_tr), "heldout_acc": acc(s_id, s_o), "heldout_auroc": auroc(s_id, s_o),
            "loss_epoch1": det.history_[0], "loss_final": det.history_[-1]}


def feature_position(model, suite, sets: dict[str, ArrayDataset], cache_dir) -> dict:
    """Median energy (logsumexp of the logits) and median KNN distance (k = 50, normalised penultimate, as
    the ``knn`` detector) of each set, relative to the ID training set."""
    import torch

    from oodforge.detectors import create
    from oodforge.models.features import extract_features

    train = extract_features(model, suite.id_train, cache_dir=cache_dir, progress=False)
    knn = create("knn").fit(FitContext(model=model, train=train, outliers=None, device="cpu", seed=0))
    out = {}
    for name, ds in sets.items():
        fs = extract_features(model, ds, cache_dir=cache_dir, progress=False)
        energy = torch.logsumexp(fs.logits.double(), 1).numpy()
        out[name] = {"energy": float(np.median(energy)), "knn_dist": float(np.median(-knn.score(fs))),
                     **image_stats(ds)}
    return out


def analyse_suite(name: str, args, bench_dir: Path, log=print) -> dict:
    from oodforge.data.suites import load_suite
    from oodforge.models.features import default_cache_dir, extract_features
    from oodforge.synth.grid import save_outlier_grid

    log(f"\n=== analysis: suite {name} ===")
    suite = stratified_subset(load_suite(name, seed=args.seed, quick=args.quick), args.max_train, args.seed)
    ep = 3 if args.quick else args.epochs
    model, info = get_model(suite, TrainPlan(epochs=ep, seed=args.seed), device=args.device, log=log)
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
    lines += ["", "Where the sets lie for the classifier (medians; energy = logsumexp of the logits, higher = more "
              "ID-like; KNN = distance to the 50th nearest ID-training vector, normalised penultimate, as the `knn` "
              "detector; flat = pixel std < 0.05):", "",
              "| set | energy | KNN dist | mean intensity | flat share |", "|---|---|---|---|---|"]
    for sname, p in a["position"].items():
        lines.append(f"| {sname} | {p['energy']:.2f} | {p['knn_dist']:.3f} | {p['mean_intensity']:.3f} | "
                     f"{100 * p['flat_share']:.1f} % |")
    head = "| method | AUROC | FPR95 | " + " | ".join(f"AUROC {g} | FPR95 {g}" for g in groups) + " |"
    lines += ["", "Detection (mean over the OOD sets, %):", "", head, "|" + "---|" * (head.count("|") - 1)]
    order = [a["best_post_hoc"]] + [m for m in a["rows"] if m.startswith("shift")]
    for m in order:
        r = a["rows"][m]
        cells = [("best post-hoc: " if m == a["best_post_hoc"] else "") + m, _pct(r["all"], "auroc"),
                 _pct(r["all"], "fpr95")]
        for g in groups:
            cells += [_pct(r[g], "auroc"), _pct(r[g], "fpr95")]
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
    lines += ["", "| method (AUROC per set) | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for m, per in a["per_set"].items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * per[x]['auroc']:.2f}" for x in sets) + " |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default=",".join(DEMO_SUITES), help="comma-separated suites (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small suites (as `oodforge demo --quick`)")
    p.add_argument("--max-train", type=int, default=20000, help="stratified ID training subset, as the demo")
    p.add_argument("--epochs", type=int, default=4, help="classifier epochs (quick: 3), as the demo")
    p.add_argument("--fm-max-sources", type=int, default=3000,
                   help="ID images (and their outliers) the capped shift variants are fitted on")
    p.add_argument("--fresh-sources", type=int, default=1000,
                   help="images forged fresh into a temp store to time synthesis (0: skip)")
    p.add_argument("--fresh-repeats", type=int, default=1, help="fresh forges to time (the best is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--analysis", action="store_true",
                   help="instead of the benchmark: outlier ablations (λ, K, inpainter, CAM, balance, standardize) "
                   "with coverage / separability / feature-space statistics (use with --quick)")
    p.add_argument("--variants", default=None,
                   help="--analysis: comma-separated outlier variants to run (default: all): " + ", ".join(VARIANTS))
    p.add_argument("--stats-only", action="store_true",
                   help="only the outlier-store statistics (coverage, energy / KNN position), no detector fits")
    p.add_argument("--rescore", action="store_true",
                   help="re-render the markdown of a finished run from <out stem>/summary.json and the scores.npz "
                   "files (adds the fusion rows; merges <out stem>_stats/summary.json positions when present)")
    p.add_argument("--no-feature-map", action="store_true", help="--analysis: skip the input=feature_map fits")
    p.add_argument("--seed-spread", type=int, default=0,
                   help="--analysis: also refit every shift variant with this many seeds in all (mean ± std)")
    p.add_argument("--out", default=None,
                   help="markdown tables (default: runs/bench_shift.md, with --analysis runs/bench_shift_analysis.md)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = "runs/bench_shift_analysis.md" if args.analysis else "runs/bench_shift.md"
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    out = Path(args.out)
    bench_dir = out.with_suffix("")
    bench_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cmd = "OMP_NUM_THREADS=%s .venv/bin/python benchmarks/bench_shift.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:] if argv is None else argv))
    if args.analysis:
        found = [analyse_suite(name, args, bench_dir) for name in suites]
        md = ["# SHIFT CPU forger: ablations and diagnostics", "", f"Command: `{cmd}` ({time.time() - t0:.0f} s)", ""]
        md += [analysis_markdown(a) for a in found]
        out.write_text("\n".join(md))
        (bench_dir / "summary.json").write_text(json.dumps(found, indent=1, default=str))
        print("\n".join(md))
        print(f"\nwritten: {out}, {bench_dir}/summary.json")
        return 0
    if args.rescore:  # re-render a finished run (its summary.json + scores.npz), adding the fusion rows
        results = json.loads((bench_dir / "summary.json").read_text())
        stats_file = bench_dir.with_name(bench_dir.name + "_stats") / "summary.json"
        stats = {r["suite"]: r for r in json.loads(stats_file.read_text())} if stats_file.is_file() else {}
        for r in results:
            st = stats.get(r["suite"])
            if st:  # store statistics and the best-of-n fresh forge timings of the --stats-only run
                r["position"] = st["position"]
                for k in (1, 4):
                    r["synthesis"][f"k{k}"].update({c: st["synthesis"][f"k{k}"][c] for c in
                                                    ("coverage_mean", "coverage_median") if c in st["synthesis"][f"k{k}"]})
                    if f"k{k}_fresh" in st["synthesis"]:
                        r["synthesis"][f"k{k}_fresh"] = {**st["synthesis"][f"k{k}_fresh"], "from": str(stats_file)}
            with np.load(bench_dir / r["suite"] / "scores.npz") as z:
                add_fusions(r, {k: z[k] for k in z.files}, args.seed)
        head = "\n".join(line for line in out.read_text().split("\n### suite")[0].split("\n")
                         if not line.startswith("Fusion rows and store statistics added by"))
        head = head.rstrip("\n") + f"\n\nFusion rows and store statistics added by `{cmd}`.\n\n"
        out.write_text(head + "\n".join(suite_markdown(s) for s in results))
        (bench_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
        print(out.read_text())
        return 0
    _install_fit_timer()
    results = [run_suite(name, args, bench_dir) for name in suites]
    for r in results:
        if "_scores" in r:
            add_fusions(r, r.pop("_scores"), args.seed)
    if args.stats_only:
        md = ["# SHIFT CPU forger: the benchmark's outlier stores", "", f"Command: `{cmd}`", ""]
        for r in results:
            md += [f"### suite `{r['suite']}`", ""]
            for k in (1, 4):
                f = r["synthesis"].get(f"k{k}_fresh")
                if f:
                    md.append(f"- fresh forge K={k}, {f['sources']} sources: {f['images_per_second']} outliers/s (best "
                              f"of {f['all_seconds']} s); Layer-CAM {f['mask_ms_per_source']} ms per source, Telea "
                              f"{f['inpaint_ms_per_outlier']} ms per outlier")
            md += position_markdown(r["position"], r["synthesis"]) + [""]
        out.write_text("\n".join(md))
        (bench_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
        print("\n".join(md))
        return 0
    md = ["# SHIFT (CPU forger) vs post-hoc detectors", "", f"Command: `{cmd}`", "",
          f"Total {time.time() - t0:.0f} s. `shift` = rejection network on the pooled penultimate vector (Eq. 5); "
          "`feature_map` = on the flattened last feature map (reference code). Capped variants are fitted on "
          f"{args.fm_max_sources} stratified ID images and the outliers forged from them. Fit s = wall time of the "
          "rejection-network fit (post-hoc: fit + scoring).", ""]
    md += [suite_markdown(s) for s in results]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    (bench_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(md))
    print(f"\nwritten: {out}, {bench_dir}/summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
