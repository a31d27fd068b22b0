"""Issue 3: how good is the CPU SHIFT forger + rejection network next to the post-hoc detectors?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py [--suites fashion,fashion6,scenes] [--quick]
        [--max-train 20000] [--epochs 4] [--fm-max-sources 3000] [--fresh-sources 1000] [--out runs/bench_shift.md]

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

Outputs: ``--out`` (markdown tables), and next to it ``<out stem>/<suite>/`` with ``results.json``,
``scores.npz``, ``report.md`` of :func:`~oodforge.bench.run_bench`, the K = 1 / K = 4 outlier grids, and
``<out stem>/summary.json`` with every number of the tables.
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


def fresh_throughput(suite, model, k: int, n_sources: int, seed: int) -> dict:
    """Forge the first ``n_sources`` images with K = ``k`` into a temporary store: images/s of a fresh run."""
    from oodforge.synth.shift import forge_shift, make_inpainter, make_masker

    with tempfile.TemporaryDirectory(prefix="bench_shift_") as tmp:
        t0 = time.perf_counter()
        store = forge_shift(suite.id_train, Path(tmp) / "store", make_masker("layercam", model=model),
                            make_inpainter("telea"), k=k, seed=seed, limit=n_sources, progress=False)
        n = len(store.records())
        dt = time.perf_counter() - t0
    return {"k": k, "sources": n_sources, "n": n, "seconds": round(dt, 2), "images_per_second": round(n / dt, 1)}


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
                                                    args.seed)
            log(f"fresh forge K={k}: {synth[f'k{k}_fresh']}")
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
            "checkpoint": info["checkpoint"], "fm_max_sources": cap, "seconds": round(time.time() - t_start, 1)}


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
                  f"K={k}: {syn[f'k{k}']['n']} outliers, {syn[f'k{k}']['images_per_second']} img/s "
                  f"({'fresh' if syn[f'k{k}']['fresh'] else 'cached store, not a synthesis time'})"
                  + (f", fresh forge of {syn[f'k{k}_fresh']['sources']} sources: "
                     f"{syn[f'k{k}_fresh']['images_per_second']} img/s" if f"k{k}_fresh" in syn else "")
                  for k in (1, 4)) + "."]
    # every method, every set (AUROC)
    sets = s["sets"]
    lines += ["", "<details><summary>AUROC (%) of every method on every OOD set</summary>", "",
              "| method | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for m, per in s["per_set"].items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * per[x]['auroc']:.2f}" for x in sets) + " |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench_shift.md", help="markdown tables (default: %(default)s)")
    args = p.parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    out = Path(args.out)
    bench_dir = out.with_suffix("")
    bench_dir.mkdir(parents=True, exist_ok=True)
    _install_fit_timer()
    t0 = time.time()
    results = [run_suite(name, args, bench_dir) for name in suites]
    cmd = "OMP_NUM_THREADS=%s .venv/bin/python benchmarks/bench_shift.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:] if argv is None else argv))
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
