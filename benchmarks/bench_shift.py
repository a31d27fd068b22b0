"""Issue 3: how good is the CPU SHIFT forger + rejection network next to the post-hoc detectors?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py [--suites fashion,fashion6,scenes] [--quick]
        [--max-train 20000] [--epochs 4] [--fm-max-sources 3000] [--fresh-sources 1000] [--out runs/bench_shift.md]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py --stats-only --fresh-repeats 3 --out runs/bench_shift_stats.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py --rescore
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_shift.py --analysis --quick [--seed-spread 5] [--no-feature-map]

Per suite, with exactly the settings of ``oodforge demo`` (so the classifier cached under
``$OODFORGE_CACHE`` is the demo's): stratified ID subset of ``--max-train`` images
(:func:`oodforge.data.sampling.stratified_subset`), the plain ``small_resnet`` from
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

**The feature-map cap** (``*cap`` jobs, detector ``shift_cap``) and the **fit times** of the shift variants
(the rejection network's ``_fit`` alone; post-hoc detectors: the benchmark's fit + score time): see
``shift_common.py``. **Fusion rows** (each best shift variant fused with the best post-hoc detector): see
``shift_fusion.py``.

Outputs: ``--out`` (markdown tables), and next to it ``<out stem>/<suite>/`` with ``results.json``,
``scores.npz``, ``report.md`` of :func:`~oodforge.bench.run_bench`, the K = 1 / K = 4 outlier grids, and
``<out stem>/summary.json`` with every number of the tables.

Other modes (the analysis behind docs/shift.md), each in its own module beside this one:

* ``--stats-only`` (``shift_synthesis.py``): no fits; mask coverage of the stores, where ID test, the OOD
  sets and the outliers lie for the classifier (median energy, KNN distance, share of flat images) and
  best-of-``--fresh-repeats`` synthesis timings split into masking and inpainting;
* ``--rescore`` (``shift_fusion.py``): re-render a finished run's markdown from its ``summary.json`` /
  ``scores.npz`` (adds the fusion rows and, when ``<out stem>_stats/summary.json`` exists, the store
  statistics);
* ``--analysis`` (``shift_analysis.py``, with ``--quick``): outlier ablations -- λ, K, inpainter, CAM,
  ``balance``, ``standardize``, feature-map input, an oracle on ``fashion6`` -- with coverage,
  separability and feature-space position; ``--seed-spread N`` refits every shift variant with N seeds.

Method keys: the rejection network trained on these outliers is reported as ``shift[layercam+telea]``
(``docs/architecture.md``, "Result keys"), e.g. ``shift[layercam+telea]@k1``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shift_analysis import VARIANTS, run_analysis
from shift_common import (
    FIT_LOG,
    cap_sources,
    command_line,
    demo_suite_and_classifier,
    install_fit_timer,
    metric_cells,
    outliers_from,
    per_set_auroc,
    position_markdown,
    summarise,
    write_outputs,
)
from shift_fusion import add_fusions, fusion_markdown, rescore
from shift_synthesis import forge, fresh_throughput, outlier_stats, stats_markdown, synthesis_markdown

from oodforge.bench import BenchJob, run_bench
from oodforge.demo import DEMO_SUITES
from oodforge.workflows import POST_HOC


def run_suite(name: str, args, bench_dir: Path, log=print) -> dict:
    """One suite of the benchmark: forge the K = 1 / K = 4 stores (and time fresh forges), then, unless
    ``--stats-only``, one :func:`~oodforge.bench.run_bench` call with every job of the module doc."""
    from oodforge.models.features import default_cache_dir
    from oodforge.synth.grid import save_outlier_grid

    t_start = time.time()
    log(f"\n=== suite {name} ===")
    suite, model, info, ep = demo_suite_and_classifier(name, args, log)
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
    """The markdown of one suite of the benchmark."""
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
        cells = [label, k, fitset] + metric_cells(r, groups)
        sec = r.get("seconds")
        cells.append("-" if sec is None else f"{sec:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    syn = s["synthesis"]
    lines += ["", synthesis_markdown(syn)]
    lines += fusion_markdown(s)
    if s.get("position"):
        lines += position_markdown(s["position"], syn)
    # every method, every set (AUROC)
    sets = s["sets"]
    lines += ["", "<details><summary>AUROC (%) of every method on every OOD set</summary>", ""]
    lines += per_set_auroc(s["per_set"], sets)
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    """The options of every mode."""
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
    return args


def benchmark_markdown(results: list[dict], args, cmd: str, seconds: float) -> list[str]:
    """The benchmark page: how the shift variants were fitted, then every suite."""
    md = ["# SHIFT (CPU forger) vs post-hoc detectors", "", f"Command: `{cmd}`", "",
          f"Total {seconds:.0f} s. `shift` = rejection network on the pooled penultimate vector (Eq. 5); "
          "`feature_map` = on the flattened last feature map (reference code). Capped variants are fitted on "
          f"{args.fm_max_sources} stratified ID images and the outliers forged from them. Fit s = wall time of the "
          "rejection-network fit (post-hoc: fit + scoring).", ""]
    return md + [suite_markdown(s) for s in results]


def main(argv: list[str] | None = None) -> int:
    """Run the mode the options ask for (the benchmark by default); see the module doc."""
    args = parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    out = Path(args.out)
    bench_dir = out.with_suffix("")
    bench_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cmd = command_line(argv)
    if args.analysis:
        run_analysis(suites, args, out, bench_dir, cmd, t0)
        return 0
    if args.rescore:  # re-render a finished run (its summary.json + scores.npz), adding the fusion rows
        rescore(out, bench_dir, args.seed, cmd, suite_markdown)
        return 0
    install_fit_timer()
    results = [run_suite(name, args, bench_dir) for name in suites]
    for r in results:
        if "_scores" in r:
            add_fusions(r, r.pop("_scores"), args.seed)
    if args.stats_only:
        write_outputs(out, bench_dir, stats_markdown(results, cmd), results, written=False)
        return 0
    write_outputs(out, bench_dir, benchmark_markdown(results, args, cmd, time.time() - t0), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
