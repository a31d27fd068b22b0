"""Seed spread of the post-hoc detectors: the zoo's plain recipe trained with seeds 0, 1, 2 (issue 9).

    .venv/bin/python benchmarks/bench_plain_seeds.py [--suites scenes,fashion6] [--seeds 0,1,2]
        [--out benchmarks/results/plain_seeds] [--fusion-only] [--summarise]

``benchmarks/bench_forged.py`` re-runs the forged-outlier side per seed on the zoo's seed-0 classifier, so
its post-hoc rows have no spread. The issue asks for three seeds of the best post-hoc detector too, and
whether a forged-outlier method wins "by more than the seed standard deviation" depends on the post-hoc
side's spread as well. Here seed 0 is the zoo's plain classifier and seed k > 0 the same recipe (the
``plan`` recorded in the zoo checkpoint's ``meta.json``: epochs, lr, augmentation) trained from scratch
with seed k, cached like every trained model; every post-hoc detector is benchmarked on each. The OOD
test sets are read only to print the table; nothing here is picked.

``--oe-variant V`` (a ``bench_forged.VARIANTS`` recipe) also runs the whole forged-outlier pipeline on
each seed's classifier: SHIFT outliers forged by that classifier (seed k), the OE fine-tune of recipe V
from it (seed k), and the cheap post-hoc detectors on the result (``<detector>@V``). bench_forged's
forged-side seeds all start from the zoo's seed-0 classifier; this measures a picked method's spread
when the classifier's seed varies too, which is the spread to set beside the post-hoc detectors'.

Results: ``OUT/<suite>/seed<k>/results.json`` (the bench's format) and ``OUT/summary.md`` / ``.json``:
per detector and group, mean ± std over the classifier seeds of mean AUROC / FPR95 (%), and the ID
test and val accuracy of each classifier. Each run includes the post-hoc fusions of two scores
(``oodforge.workflows.FUSIONS``, part of issue 28's baseline); ``--fusion-only`` adds them to runs made before that,
as a part run per seed merged by the summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_forged import CHEAP, FORGE_LIMIT, MASKS, VARIANTS, load_runs, oe_plan, zoo_model, zoo_recipe

from oodforge.bench import BenchJob, run_bench
from oodforge.data.suites import load_suite
from oodforge.models.features import default_cache_dir
from oodforge.protocol import is_plain_post_hoc
from oodforge.report import group_mean
from oodforge.workflows import FUSIONS, POST_HOC, forge_cpu_outliers, get_model


def plain_classifier(suite, seed: int, log):
    """The zoo's plain classifier (seed 0) or its recorded recipe trained with ``seed`` (cached)."""
    zoo, info = zoo_model(suite, "plain", log)
    if seed == 0:
        return zoo, info
    return get_model(suite, zoo_recipe(info, seed), log=log, use_zoo=False)


def oe_job(suite, plain, pinfo: dict, variant: str, seed: int, log) -> BenchJob:
    """The forged-outlier pipeline of recipe ``variant`` on one seed's classifier: forge (seed), fine-tune
    (seed), and the cheap post-hoc detectors on the fine-tuned model, labelled ``variant``."""
    _, store, _ = forge_cpu_outliers(suite, plain, limit=FORGE_LIMIT, seed=seed, log=log, progress=False,
                                     **MASKS[VARIANTS[variant][1]])
    model, info = get_model(suite, oe_plan(variant, seed, pinfo, store), log=log, use_zoo=False)
    return BenchJob(model, CHEAP, label=variant, info={"checkpoint": info["checkpoint"],
                                                       "train_seconds": info.get("train_seconds")})


def run_seed(name: str, seed: int, out: Path, log, oe_variant: str | None = None, fusion_only: bool = False) -> dict:
    """Every post-hoc detector and the post-hoc fusions (issue 28's baseline) on seed ``seed``'s plain classifier;
    ``fusion_only``: the fusions alone, into the part folder ``seed<k>/fusion`` that :func:`bench_forged.load_runs`
    merges over a seed run made before the fusions were part of it."""
    suite = load_suite(name)
    model, info = plain_classifier(suite, seed, log)
    jobs = [BenchJob(model, FUSIONS if fusion_only else POST_HOC + FUSIONS,
                     info={"train_seconds": info.get("train_seconds")})]
    if oe_variant:
        jobs.append(oe_job(suite, model, info, oe_variant, seed, log))
    run_dir = out / name / f"seed{seed}" / ("fusion" if fusion_only else "")
    res = run_bench(suite, jobs, run_dir, cache_dir=default_cache_dir(), seed=seed, progress=False,
                    config={"bench": "bench_plain_seeds", "oe_variant": oe_variant, "fusion_only": fusion_only},
                    log=log)
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _cell(values: list[tuple[float, float]]) -> str:
    a, f = np.array(values).T * 100
    return f"{a.mean():.2f} ± {a.std():.2f} / {f.mean():.2f} ± {f.std():.2f}"


def summarise(runs: dict, out: Path) -> str:
    """Per suite: every detector's mean ± std over the classifier seeds, per group; the best per group by
    mean AUROC (the "best post-hoc detector" of docs/results.md, chosen on the test sets like there)."""
    lines = ["# Post-hoc detectors over classifier seeds (benchmarks/bench_plain_seeds.py)", "",
             "Seed 0: the zoo's plain classifier; seed k > 0: its recipe trained with seed k. Mean ± std over "
             "the seeds of the group's mean AUROC / FPR95 (%).", ""]
    summary = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        groups = [g for g in ("near", "far") if by_seed[seeds[0]]["groups"].get(g)]
        acc = {label: [(r["models"][label]["id_accuracy"], r["models"][label]["id_val_accuracy"])
                       for _, r in sorted(by_seed.items()) if label in r["models"]]
               for label in by_seed[seeds[0]]["models"]}
        lines += [f"## {name} (seeds {', '.join(map(str, seeds))})", ""]
        lines += [f"ID test / val accuracy per seed, {label}: " + ", ".join(f"{100 * t:.2f} / {100 * v:.2f}"
                                                                           for t, v in a) for label, a in acc.items()]
        lines += ["", "| detector | seeds | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
        table: dict = {}
        for m in by_seed[seeds[0]]["methods"]:
            runs_m = [r for _, r in sorted(by_seed.items()) if m in r["methods"]]
            per = {g: [group_mean(r, m, g) for r in runs_m] for g in groups}
            table[m] = {g: {"auroc": [p[0] for p in v], "fpr95": [p[1] for p in v]} for g, v in per.items()}
            lines.append(f"| {m} | {len(runs_m)} | " + " | ".join(_cell(per[g]) for g in groups) + " |")
        post_hoc = [m for m in table if is_plain_post_hoc(m, tuple(VARIANTS))]
        best = {g: max(post_hoc, key=lambda m: np.mean(table[m][g]["auroc"])) for g in groups}
        lines += [""] + [f"* best post-hoc {g} (mean AUROC over seeds): **{m}** "
                         f"{_cell(list(zip(table[m][g]['auroc'], table[m][g]['fpr95'])))}" for g, m in best.items()]
        lines.append("")
        summary[name] = {"seeds": seeds, "accuracy": acc, "table": table, "best": best}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


#: what summarise reads of a run: its test numbers (it picks nothing, so no validation numbers; runs made before
#: bench_forged.read_run asked for them have none)
PLAIN_SEEDS_REQUIRED = ("methods", "groups")


def rows_a_rerun_would_drop(out: Path, name: str, seed: int, oe_variant: str | None, fusion_only: bool) -> list[str]:
    """The backbone labels of the committed run ``OUT/<suite>/seed<k>`` (or its ``fusion`` part) that re-running it
    with these flags would not make again: :func:`run_seed` rewrites the folder's ``results.json`` whole, so a
    seed run made with ``--oe-variant`` and re-made without it would lose its OE rows (it happened in session 18)."""
    path = out / name / f"seed{seed}" / ("fusion" if fusion_only else "") / "results.json"
    if not path.is_file():
        return []
    made = {"plain", *([oe_variant] if oe_variant else [])}
    return sorted(set(json.loads(path.read_text()).get("models", {})) - made)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="scenes,fashion6")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="benchmarks/results/plain_seeds")
    ap.add_argument("--oe-variant", choices=sorted(VARIANTS), help="also forge, fine-tune and benchmark this OE "
                    "recipe on each seed's classifier")
    ap.add_argument("--fusion-only", action="store_true", help="run only the post-hoc fusions (oodforge.workflows."
                    "FUSIONS, part of the baseline since issue 28) into OUT/<suite>/seed<k>/fusion, for runs made "
                    "before they were")
    ap.add_argument("--summarise", action="store_true", help="only rebuild OUT/summary.md from the runs in OUT")
    args = ap.parse_args()
    if args.fusion_only and args.oe_variant:
        ap.error("--fusion-only adds the plain classifier's fusions to earlier runs; run --oe-variant apart")
    out = Path(args.out)
    suites, seeds = [s for s in args.suites.split(",") if s], [int(s) for s in args.seeds.split(",")]
    if not args.summarise:
        for name in suites:  # before any work: a re-run must not drop rows the committed run holds
            for seed in seeds:
                lost = rows_a_rerun_would_drop(out, name, seed, args.oe_variant, args.fusion_only)
                if lost:
                    raise SystemExit(f"{out / name / f'seed{seed}'}: its results.json holds the backbone(s) "
                                     f"{', '.join(lost)}, which this re-run would drop; pass --oe-variant "
                                     f"{lost[0]} to re-make them, or move the folder away first")
        out.mkdir(parents=True, exist_ok=True)
        for name in suites:
            for seed in seeds:
                print(f"=== {name} seed {seed} ===", flush=True)
                t0 = time.time()
                run_seed(name, seed, out, log=print, oe_variant=args.oe_variant, fusion_only=args.fusion_only)
                print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    print(summarise(load_runs(out, required=PLAIN_SEEDS_REQUIRED), out))


if __name__ == "__main__":
    main()
