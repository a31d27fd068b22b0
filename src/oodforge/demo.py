"""``oodforge demo``: the README's main job on the embedded data.

Per suite (``fashion``, ``fashion6``, ``scenes``, ``clipart``): train (or reuse) the plain classifier and the
SSOD, OE and recipe models (the recipe backbone the benchmark's protocol picks, :data:`DEMO_RECIPES`; ``clipart``:
EfficientNet-Lite0 fine-tuned, :data:`oodforge.workflows.SUITE_ARCH`),
forge SHIFT outliers with the CPU variant (Layer-CAM mask + Telea inpainting), then
benchmark every post-hoc detector, ``shift``, ``ssod`` and the fusions of two scores
(:data:`oodforge.workflows.FUSIONS`) side by side from cached features.
The CPU forger is not SHIFT's (CLIPSeg + Stable Diffusion), so the results report ``shift`` as
``shift[layercam+telea]`` (:mod:`oodforge.keys`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bench import BenchJob, run_bench
from .data.base import Suite
from .data.sampling import stratified_subset
from .keys import detector_name, split_key
from .outliers.heldout import FORGER_FOR_GROUP, heldout_outliers
from .protocol import is_plain_post_hoc, pick
from .report import best_method, group_mean, print_table
from .workflows import (
    CLASSIC,
    FUSIONS,
    OE_RECIPE,
    POST_HOC,
    TrainPlan,
    forge_cpu_outliers,
    get_model,
    suite_backbone,
)

DEMO_SUITES = ("fashion", "fashion6", "scenes", "clipart")

#: how the default demo is sized for a 2-core laptop (measured: docs/results.md "`make demo`"); ``--full``
#: lifts both. Detectors are fitted on at most this many ID training images (a stratified subset; the zoo's
#: classifiers were trained on all of them), so every backbone's feature pass skips the rest.
DEMO_FIT_LIMIT = 10000
#: and the protocol's validation sets are made from at most this many ID validation images (a stratified subset):
#: ID val itself, the forged validation outliers and the held-out forgers' outliers, scored on every backbone
#: (fashion 5,000 and fashion6 3,600 ID val images; scenes and clipart have 2,000 or fewer)
DEMO_VAL_LIMIT = 2000
#: detectors the default demo leaves out, with why: each costs more than the rest of its suite's detectors
DEMO_LEFT_OUT = {"odin": "a gradient and two forward passes per scored image: 71-125 s per suite, cold"}


OE_METHODS = [m for m in CLASSIC if m != "odin"]
@dataclass(frozen=True)
class DemoRecipe:
    """The no-outlier training recipe whose backbone the demo runs on a suite beside SSOD and OE.

    ``finetune_epochs``: fine-tuned for that many epochs from the plain classifier at the recipe fine-tune's lr
    (:data:`oodforge.workflows.RECIPE_FINETUNE`); ``None``: trained from scratch on the plain classifier's own
    plan (its epochs and schedule; on clipart from the ImageNet weights, like the plain Lite0). ``detectors``: the
    benchmark pick's detector where it is not among the demo's detectors for second backbones (:data:`OE_METHODS`
    and the fusions). ``label``: the backbone's label in ``benchmarks/bench_forged.py``.
    """

    method: str
    finetune_epochs: int | None
    label: str
    detectors: tuple[str, ...] = ()


#: per suite, the recipe backbone benchmarks/bench_forged.py's protocol picks on validation data over 3 seeds
#: (docs/results.md, sessions 14-16): fashion6 knn@t2fnorm-e10, scenes fusion:a=energy,b=knn@t2fnorm-scratch,
#: clipart kpca@ascood-scratch. fashion's pick is a fusion on the OE backbone (already run), and T2FNorm fine-tuned
#: for ten epochs is its best recipe backbone on validation (and the one above 93 % ID accuracy). The zoo's
#: ``<suite>-<method>`` models are these plans on seed 0 (scripts/build_zoo.sh); ``--retrain`` trains them here
#: (``--quick``: one epoch when fine-tuned).
DEMO_RECIPES = {"fashion": DemoRecipe("t2fnorm", 10, "t2fnorm-e10"),
                "fashion6": DemoRecipe("t2fnorm", 10, "t2fnorm-e10"),
                "scenes": DemoRecipe("t2fnorm", None, "t2fnorm-scratch"),
                "clipart": DemoRecipe("ascood", None, "ascood-scratch", detectors=("kpca",))}
#: a suite of the user's (``oodforge demo --suites my-suite.toml``): T2FNorm fine-tuned for ten epochs, the pick's
#: backbone on fashion6 (and on scenes and clipart until the from-scratch runs of sessions 15-16)
DEFAULT_DEMO_RECIPE = DEMO_RECIPES["fashion6"]


def demo_recipe(suite_name: str) -> DemoRecipe:
    """The :class:`DemoRecipe` of suite ``suite_name`` (:data:`DEFAULT_DEMO_RECIPE` for a suite of the user's)."""
    return DEMO_RECIPES.get(suite_name, DEFAULT_DEMO_RECIPE)


def plain_key(res: dict, name: str) -> str | None:
    """The key of detector ``name`` on the plain classifier in ``res`` (``"shift"`` -> ``"shift[layercam+telea]"``
    when the outliers were forged on the CPU); ``None`` when the run has none."""
    return next((m for m in res["methods"] if detector_name(m) == name and not split_key(m)[2]), None)


def _second_model(suite: Suite, method: str, pinfo: dict, epochs: int | None, seed: int, device: str,
                  progress: bool, log, use_zoo: bool, outlier_store: Path | None = None):
    """The SSOD, OE or recipe classifier: the zoo's when it has one for this suite, else fine-tuned from the plain
    one for ``epochs``, or (``epochs=None``) trained from scratch on the plain classifier's plan."""
    from .workflows import zoo_checkpoint

    net = suite_backbone(suite.name)
    if use_zoo and zoo_checkpoint(suite, TrainPlan(method=method, **net)) is not None:
        return get_model(suite, TrainPlan(method=method, **net), device=device, progress=progress, log=log)
    if epochs is None:  # from scratch: the plain classifier's recorded plan, only the method changed
        plan = TrainPlan.from_record(pinfo, method=method, seed=seed)
    else:
        recipe = {k: v for k, v in OE_RECIPE.items() if k != "epochs"} if method == "oe" else {}
        plan = TrainPlan(method=method, epochs=epochs, seed=seed, init_from=pinfo["checkpoint"],
                         outliers=str(outlier_store) if outlier_store else None, **net, **recipe)
    return get_model(suite, plan, device=device, progress=progress, log=log, use_zoo=False)


def run_demo(out: str | Path = "runs/demo", suites: tuple[str, ...] = DEMO_SUITES, quick: bool = False,
             data_root: str | None = None, seed: int = 0, device: str = "cpu", max_train: int | None = None,
             epochs: int = 4, ssod_epochs: int = 2, k: int = 1, forge_limit: int | None = 10000,
             retrain: bool = False, full: bool = False, fit_limit: int | None = DEMO_FIT_LIMIT,
             val_limit: int | None = DEMO_VAL_LIMIT, progress: bool = True, log=print) -> dict:
    """Run the demo; returns ``{suite: results}`` and writes ``out/<suite>/`` plus ``out/summary.md``.

    Per suite: the zoo's plain, SSOD, OE and recipe classifiers (:func:`demo_recipe`; or, with ``retrain``/``quick``,
    trained here: plain for ``epochs``, SSOD, OE and the recipe fine-tuned from it or, where the recipe trains from
    scratch, for ``epochs`` like the plain one), SHIFT outliers forged from
    at most ``forge_limit`` training images and from the ID validation images the protocol reads (held out, for its
    validation numbers), then every detector on every backbone: detectors fitted on at most ``fit_limit``
    training images, validated on at most ``val_limit`` ID validation images (and the outliers made from them)
    and without :data:`DEMO_LEFT_OUT`, unless ``full``.
    """
    from .data.suites import load_suite
    from .models.features import default_cache_dir
    from .synth.grid import save_outlier_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    all_results: dict = {}
    left_out = {} if full else DEMO_LEFT_OUT
    fit_limit = None if full else fit_limit
    val_limit = None if full else val_limit
    if not full:
        log(f"sized for a 2-core machine: detectors fitted on at most {fit_limit:,} training images and validated "
            f"on at most {val_limit:,} ID validation images per suite; "
            f"left out: {', '.join(f'{m} ({why})' for m, why in left_out.items())}. "
            "`oodforge demo --full` runs everything on every image.")
    for name in suites:
        log(f"\n=== suite {name} ===")
        t_suite = time.time()
        suite = stratified_subset(load_suite(name, data_root=data_root, seed=seed, quick=quick), max_train, seed)
        ep = 3 if quick else epochs
        use_zoo = not retrain
        plain, pinfo = get_model(suite, TrainPlan(epochs=ep, seed=seed, **suite_backbone(name)), device=device, progress=progress, log=log,
                                 use_zoo=use_zoo)
        outliers, store_dir, synth = forge_cpu_outliers(suite, plain, k=k, seed=seed, device=device, limit=forge_limit,
                                                        progress=progress, log=log)
        # the classifiers saw every training image; the detectors are fitted on ``fit_limit`` of them and the
        # protocol's validation sets are made from ``val_limit`` ID validation images
        fitted_on = stratified_subset(stratified_subset(suite, fit_limit, seed), val_limit, seed, split="val")
        val_outliers, val_dir, _ = forge_cpu_outliers(fitted_on, plain, k=1, seed=seed, device=device, split="val",
                                                      progress=progress, log=log)
        ssod, sinfo = _second_model(suite, "ssod", pinfo, 1 if quick else ssod_epochs, seed, device, progress, log,
                                    use_zoo)
        oe, oinfo = _second_model(suite, "oe", pinfo, 1, seed, device, progress, log, use_zoo, store_dir)
        recipe = demo_recipe(name)
        rec_epochs = 1 if quick and recipe.finetune_epochs else recipe.finetune_epochs  # None: from scratch
        rec, rinfo = _second_model(suite, recipe.method, pinfo, rec_epochs, seed, device, progress, log, use_zoo)
        save_outlier_grid(suite.id_train, outliers, out / name / "outliers_grid.png")

        heldout = heldout_outliers(fitted_on.id_val, seed=seed)

        def job(model, methods, label, info, outliers=outliers, val_outliers=val_outliers, heldout=heldout, **extra):
            return BenchJob(model, methods, label=label, outliers=outliers, val_outliers=val_outliers,
                            val_heldout=heldout,
                            info={"checkpoint": info["checkpoint"], "zoo": info.get("zoo"),
                                  "train_seconds": info.get("train_seconds"), **extra})

        post_hoc = [m for m in POST_HOC if m not in left_out]
        # every backbone also gets the FUSIONS (their parts are fitted once per job): on the plain classifier
        # they are post-hoc fusions, the baseline side; on SSOD / OE forged-outlier candidates (issue 28)
        jobs = [job(plain, post_hoc + FUSIONS + ["shift", "fusion:a=shift,b=knn"], "", pinfo,
                    outlier_store=str(store_dir), val_outlier_store=str(val_dir)),
                # ODIN's gradient passes are the costliest detector; the cheaper post-hoc detectors are enough
                # to compare backbones (Table 6 of SSOD)
                job(ssod, ["ssod"] + OE_METHODS + FUSIONS, "ssod", sinfo),
                job(oe, OE_METHODS + FUSIONS, "oe", oinfo),
                job(rec, OE_METHODS + list(recipe.detectors) + FUSIONS, recipe.method, rinfo, recipe=recipe.label)]
        config = {"suite": name, "quick": quick, "max_train": max_train, "forge_limit": forge_limit, "epochs": ep,
                  "k": k, "shift_synthesis": synth, "full": full, "fit_limit": fit_limit,
                  "fit_train_images": len(fitted_on.id_train), "val_limit": val_limit,
                  "val_images": len(fitted_on.id_val), "left_out": left_out}
        res = run_bench(fitted_on, jobs, out / name, device=device, cache_dir=default_cache_dir(), seed=seed,
                        progress=progress, config=config, log=log, report_detail=None if full else report_detail)
        print_table(res)
        all_results[name] = {k_: v for k_, v in res.items() if not k_.startswith("_")}
        # the suite's wall clock, report included: what benchmarks/profile_demo.py compares the stages with
        all_results[name]["seconds"] = round(time.time() - t_suite, 1)
    summary = write_summary(all_results, out)
    log(f"\ndemo finished in {time.time() - t_start:.0f} s; reports: {out}/<suite>/report.md, summary: {summary}")
    return all_results


def report_detail(res: dict) -> tuple[list[str], str]:
    """The methods the sized demo's report draws and gives bootstrap intervals for: the ones its summary
    compares (:func:`suite_summary`: the pick, the best post-hoc detector per group, the per-group picks) and
    the one the report's "Ship it" section recommends (:func:`oodforge.protocol.pick` among all methods, post-hoc
    included). With ~120 methods per suite, plots and intervals for all cost more than 40 s a suite (measured:
    docs/results.md "`make demo`", session 11); ``--full`` draws every one."""
    s = suite_summary(res)
    shipped = pick(res, among="all")
    keys = [s["pick"], shipped.key if shipped else None, *s["best_post_hoc"].values(),
            *s["per_group_picks"].values()]
    return list(dict.fromkeys(k for k in keys if k)), ("the picks, the best post-hoc detector per group and the "
                                                      "per-group picks (`oodforge demo --full` draws every one)")


def paired_group_comparison(scores, res: dict, a: str, b: str, group: str) -> dict | None:
    """``AUROC(a) - AUROC(b)`` on a group's OOD sets pooled (every image once, the group mean weighted by set
    size), with a paired bootstrap interval over ID and OOD images (:func:`oodforge.intervals.paired_auroc_difference`,
    2,000 resamples, seed 0); ``verdict`` is "win" / "loss" only when the 95 % interval excludes zero."""
    from .intervals import paired_auroc_difference

    sets = res["groups"].get(group) or []
    keys = [f"{m}/{s}" for m in (a, b) for s in ["id", *sets]]
    if scores is None or not sets or any(k not in scores for k in keys):
        return None
    d = paired_auroc_difference(scores[f"{a}/id"], np.concatenate([scores[f"{a}/{s}"] for s in sets]),
                                scores[f"{b}/id"], np.concatenate([scores[f"{b}/{s}"] for s in sets]))
    verdict = ("win" if d.difference > 0 else "loss") if d.significant else "no significant difference"
    return {"difference": d.difference, "low": d.low, "high": d.high, "p_value": d.p_value, "verdict": verdict}


def suite_summary(res: dict, scores=None) -> dict:
    """What the demo reports for one suite (``summary.json[suite]``, beside the run's results).

    ``pick``: the one forged-outlier method the protocol picks for the suite on validation data
    (:func:`oodforge.protocol.pick`; the detector a user would ship), with its validation numbers and its test
    means per group; ``best_post_hoc``: per group, the best post-hoc detector on the plain classifier *chosen on
    the test sets* (the strongest baseline; it favours the baseline); ``per_group_picks``: a diagnostic, the
    forged-outlier pick on the one held-out forger the first per-group rule let stand for each group;
    ``vs_best_post_hoc``: per group, the pick's pooled AUROC minus the baseline's with its paired bootstrap
    interval (:func:`paired_group_comparison`, from the run's ``scores``), a win only when it excludes zero."""
    chosen = pick(res)
    groups = [g for g in ("near", "far") if res["groups"].get(g)]
    plain_posthoc = {**res, "methods": {m: v for m, v in res["methods"].items() if is_plain_post_hoc(m)}}
    out: dict = {"pick": chosen.key if chosen else None,
                 "pick_validation": {"auroc": chosen.auroc, "fpr95": chosen.fpr95, "source": chosen.source}
                 if chosen else None,
                 "best_post_hoc": {}, "per_group_picks": {}, "test": {}, "vs_best_post_hoc": {}}
    for g in groups:
        best = best_method(plain_posthoc, group=g)[0] or None
        out["best_post_hoc"][g] = best
        diag = pick(res, source=f"forger:{FORGER_FOR_GROUP[g]}")
        out["per_group_picks"][g] = diag.key if diag else None
        if out["pick"] and best:
            out["vs_best_post_hoc"][g] = paired_group_comparison(scores, res, out["pick"], best, g)
        for key in {k for k in (out["pick"], best, out["per_group_picks"][g]) if k}:
            v = group_mean(res, key, g)
            if v is not None:
                out["test"].setdefault(key, {})[g] = {"auroc": v[0], "fpr95": v[1]}
    return out


def _diff_cell(c: dict | None) -> str:
    if c is None:
        return "-"
    return f"{100 * c['difference']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]: {c['verdict']}"


def write_summary(all_results: dict, out: Path) -> Path:
    """``summary.md`` and ``summary.json``: per suite, the protocol's one pick (:func:`suite_summary`) on near and
    on far beside the best post-hoc detector of each group chosen on the test sets, the per-group picks as a
    diagnostic, and the individual forged-outlier methods."""
    lines = ["# oodforge demo summary", "",
             "Mean AUROC / FPR95 (%) over each group of OOD sets. **pick**: the one forged-outlier method per suite "
             "with the best validation AUROC (ID val vs the outliers of the held-out forgers it never trained on, "
             "made from ID val: jigsaws and class mixes; backbones within 0.5 points of the plain classifier's ID "
             "val accuracy; docs/protocol.md): the detector `oodforge export` would ship, chosen without reading "
             "any OOD test set. **best post-hoc**: the best post-hoc detector on the plain classifier *chosen on "
             "the test sets*, per group (the strongest baseline). **per-group pick** (diagnostic): the pick on the "
             "one held-out forger of the earlier per-group rule (class mixes: near, jigsaws: far). **pick - best**: "
             "the pick's AUROC minus the baseline's on the group's OOD sets pooled, with its 95 % paired bootstrap "
             "interval; a win or a loss only when the interval excludes zero.", "",
             "| suite | group | ID acc plain / SSOD / OE / recipe | pick | best post-hoc (test-chosen) | pick - best | per-group "
             "pick (diagnostic) | shift | ssod@ssod | energy@oe |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summaries = {}
    for name, res in all_results.items():
        accs = res["models"]
        npz = out / name / "scores.npz"
        summ = summaries[name] = suite_summary(res, np.load(npz) if npz.exists() else None)

        def acc(label: str, accs: dict = accs) -> str:
            return f"{100 * accs[label]['id_accuracy']:.2f}" if label in accs else "-"

        def cell(m: str | None, group: str, res: dict = res) -> str:
            v = group_mean(res, m, group) if m else None
            return "-" if v is None else f"{m}: {100 * v[0]:.2f} / {100 * v[1]:.2f}"

        shift, diff = plain_key(res, "shift"), _diff_cell
        # the recipe backbone this run trained, as the run recorded it (not today's DEMO_RECIPES)
        recipe, rec_label = next(((lab, m["recipe"]) for lab, m in accs.items() if "recipe" in m), ("", "-"))
        for group in summ["best_post_hoc"]:
            lines.append(f"| {name} | {group} | {acc('plain')} / {acc('ssod')} / {acc('oe')} / "
                         f"{acc(recipe)} ({rec_label}) | "
                         f"**{cell(summ['pick'], group)}** | {cell(summ['best_post_hoc'][group], group)} | "
                         f"{diff(summ['vs_best_post_hoc'].get(group))} | "
                         f"{cell(summ['per_group_picks'][group], group)} | {cell(shift, group)} | "
                         f"{cell('ssod@ssod', group)} | {cell('energy@oe', group)} |")
    sized = {n: r["config"] for n, r in all_results.items() if not (r.get("config") or {}).get("full", True)}
    if sized:
        lines += ["", "Sized for a 2-core machine: " + "; ".join(
            f"{n}: detectors fitted on {c['fit_train_images']:,} training images"
            + (f" and validated on {c['val_images']:,} ID validation images" if c.get("val_images") else "")
            + (f", without {', '.join(c['left_out'])}" if c.get("left_out") else "") for n, c in sized.items())
            + ". `oodforge demo --full` fits and validates them on every image and runs every detector."]
    lines += ["", "The pick's validation numbers:", ""]
    for name, res in all_results.items():
        chosen = pick(res)
        lines.append(f"* {name}: " + (f"`{chosen.key}`, {chosen.describe()}" if chosen else
                                      "no forged-outlier method has validation numbers"))
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({n: {**r, **summaries[n]} for n, r in all_results.items()},
                                                 indent=1))
    return path
