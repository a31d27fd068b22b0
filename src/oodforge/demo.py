"""``oodforge demo``: the README's main job on the embedded data.

Per suite (``fashion``, ``fashion6``, ``scenes``): train (or reuse) the plain classifier and the
SSOD model, forge SHIFT outliers with the CPU variant (Layer-CAM mask + Telea inpainting), then
benchmark every post-hoc detector, ``shift`` and ``ssod`` side by side from cached features.
The CPU forger is not SHIFT's (CLIPSeg + Stable Diffusion), so the results report ``shift`` as
``shift[layercam+telea]`` (:mod:`oodforge.keys`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .bench import BenchJob, run_bench
from .data.base import Suite
from .keys import detector_name, split_key
from .outliers.heldout import FORGER_FOR_GROUP, heldout_outliers
from .report import best_method, print_table
from .workflows import CLASSIC, OE_RECIPE, POST_HOC, TrainPlan, forge_cpu_outliers, get_model

DEMO_SUITES = ("fashion", "fashion6", "scenes")


def stratified_subset(suite: Suite, n: int | None, seed: int) -> Suite:
    """Keep at most ``n`` training images, the same share of every class (deterministic)."""
    if n is None or len(suite.id_train) <= n:
        return suite
    rng = np.random.default_rng(seed)
    labels = suite.id_train.labels.numpy()
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=max(1, round(n * len(idx) / len(labels))), replace=False))
    idx = np.sort(np.concatenate(keep))
    suite.id_train = suite.id_train.subset(idx, identity_suffix=f"stratified{n}-seed{seed}")
    return suite


#: backbones trained with forged outliers (OE) or SSOD's background samples: every detector on them counts as
#: a forged-outlier method
FORGED_BACKBONES = ("oe", "ssod")
OE_METHODS = [m for m in CLASSIC if m != "odin"]


def is_forged(method: str, backbones: tuple[str, ...] = FORGED_BACKBONES) -> bool:
    """Whether a result key belongs to a forged-outlier method: shift, fusion, ssod, or any detector on one of
    ``backbones`` (result-key labels; ``benchmarks/bench_forged.py`` names one per OE variant)."""
    return split_key(method)[2] in backbones or detector_name(method) in ("shift", "fusion", "ssod")


def is_plain_post_hoc(method: str, backbones: tuple[str, ...] = FORGED_BACKBONES) -> bool:
    """Whether a result key is a post-hoc detector on the plain classifier: no backbone label and not a
    forged-outlier method (:func:`is_forged`); the baseline every forged-outlier method is set beside."""
    return not split_key(method)[2] and not is_forged(method, backbones)


def plain_key(res: dict, name: str) -> str | None:
    """The key of detector ``name`` on the plain classifier in ``res`` (``"shift"`` -> ``"shift[layercam+telea]"``
    when the outliers were forged on the CPU); ``None`` when the run has none."""
    return next((m for m in res["methods"] if detector_name(m) == name and not split_key(m)[2]), None)


def _second_model(suite: Suite, method: str, pinfo: dict, epochs: int, seed: int, device: str, progress: bool,
                  log, use_zoo: bool, outlier_store: Path | None = None):
    """The SSOD or OE classifier: the zoo's when it has one for this suite, else fine-tuned from the plain one."""
    from .workflows import zoo_checkpoint

    if use_zoo and zoo_checkpoint(suite, TrainPlan(method=method)) is not None:
        return get_model(suite, TrainPlan(method=method), device=device, progress=progress, log=log)
    recipe = {k: v for k, v in OE_RECIPE.items() if k != "epochs"} if method == "oe" else {}
    plan = TrainPlan(method=method, epochs=epochs, seed=seed, init_from=pinfo["checkpoint"],
                     outliers=str(outlier_store) if outlier_store else None, **recipe)
    return get_model(suite, plan, device=device, progress=progress, log=log, use_zoo=False)


def run_demo(out: str | Path = "runs/demo", suites: tuple[str, ...] = DEMO_SUITES, quick: bool = False,
             data_root: str | None = None, seed: int = 0, device: str = "cpu", max_train: int | None = None,
             epochs: int = 4, ssod_epochs: int = 2, k: int = 1, forge_limit: int | None = 10000,
             retrain: bool = False, progress: bool = True, log=print) -> dict:
    """Run the demo; returns ``{suite: results}`` and writes ``out/<suite>/`` plus ``out/summary.md``.

    Per suite: the zoo's plain, SSOD and OE classifiers (or, with ``retrain``/``quick``, trained
    here: plain for ``epochs``, SSOD and OE fine-tuned from it), SHIFT outliers forged from at most
    ``forge_limit`` training images and from every ID validation image (held out, for the protocol's
    validation numbers), then every detector on every backbone.
    """
    from .data.suites import load_suite
    from .models.features import default_cache_dir
    from .synth.grid import save_outlier_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    all_results: dict = {}
    for name in suites:
        log(f"\n=== suite {name} ===")
        suite = stratified_subset(load_suite(name, data_root=data_root, seed=seed, quick=quick), max_train, seed)
        ep = 3 if quick else epochs
        use_zoo = not retrain
        plain, pinfo = get_model(suite, TrainPlan(epochs=ep, seed=seed), device=device, progress=progress, log=log,
                                 use_zoo=use_zoo)
        outliers, store_dir, synth = forge_cpu_outliers(suite, plain, k=k, seed=seed, device=device, limit=forge_limit,
                                                        progress=progress, log=log)
        val_outliers, val_dir, _ = forge_cpu_outliers(suite, plain, k=1, seed=seed, device=device, split="val",
                                                      progress=progress, log=log)
        ssod, sinfo = _second_model(suite, "ssod", pinfo, 1 if quick else ssod_epochs, seed, device, progress, log,
                                    use_zoo)
        oe, oinfo = _second_model(suite, "oe", pinfo, 1, seed, device, progress, log, use_zoo, store_dir)
        save_outlier_grid(suite.id_train, outliers, out / name / "outliers_grid.png")

        heldout = heldout_outliers(suite.id_val, seed=seed)

        def job(model, methods, label, info, outliers=outliers, val_outliers=val_outliers, heldout=heldout, **extra):
            return BenchJob(model, methods, label=label, outliers=outliers, val_outliers=val_outliers,
                            val_heldout=heldout,
                            info={"checkpoint": info["checkpoint"], "zoo": info.get("zoo"),
                                  "train_seconds": info.get("train_seconds"), **extra})

        jobs = [job(plain, POST_HOC + ["shift", "fusion:a=shift,b=knn"], "", pinfo, outlier_store=str(store_dir),
                    val_outlier_store=str(val_dir)),
                # ODIN's gradient passes are the costliest detector; the cheaper post-hoc detectors are enough
                # to compare backbones (Table 6 of SSOD)
                job(ssod, ["ssod"] + OE_METHODS, "ssod", sinfo),
                job(oe, OE_METHODS, "oe", oinfo)]
        config = {"suite": name, "quick": quick, "max_train": max_train, "forge_limit": forge_limit, "epochs": ep,
                  "k": k, "shift_synthesis": synth}
        res = run_bench(suite, jobs, out / name, device=device, cache_dir=default_cache_dir(), seed=seed,
                        progress=progress, config=config, log=log)
        print_table(res)
        all_results[name] = {k_: v for k_, v in res.items() if not k_.startswith("_")}
    summary = write_summary(all_results, out)
    log(f"\ndemo finished in {time.time() - t_start:.0f} s; reports: {out}/<suite>/report.md, summary: {summary}")
    return all_results


def group_mean(res: dict, method: str, group: str | None) -> tuple[float, float] | None:
    """Mean (AUROC, FPR95) of ``method`` over a group of OOD sets (all sets when ``group`` is None)."""
    r = res["methods"].get(method)
    sets = res["groups"].get(group, []) if group else list(r or {})
    if not r or not sets:
        return None
    return float(np.mean([r[s]["auroc"] for s in sets])), float(np.mean([r[s]["fpr95"] for s in sets]))


def validation_numbers(res: dict, group: str | None = None) -> dict:
    """The validation numbers the protocol reads, ``{method: {"auroc", "fpr95"}}``.

    ``group`` ``None``: ID val vs all the held-out forgers' outliers (``validation_heldout``); ``"near"`` /
    ``"far"``: ID val vs the outliers of the one held-out forger that stands for that group
    (:data:`~oodforge.outliers.heldout.FORGER_FOR_GROUP`: class mixes for near, jigsaws for far), when the run
    has per-forger numbers. Older runs fall back to the combined held-out number, then to ID val vs outliers
    of the training forger (``validation``)."""
    by_forger = res.get("validation_heldout_by_forger")
    if group is not None and by_forger:
        forger = FORGER_FOR_GROUP[group]
        return {m: v[forger] for m, v in by_forger.items() if forger in v}
    return res.get("validation_heldout") or res.get("validation", {})


def backbone_accuracies(res: dict) -> dict[str, float]:
    """ID validation accuracy of each backbone of a run, by result-key label (``"plain"``: no label)."""
    return {label: m["id_val_accuracy"] for label, m in res.get("models", {}).items() if "id_val_accuracy" in m}


def forged_candidates(numbers: dict, accuracies: dict[str, float], backbones: tuple[str, ...] = FORGED_BACKBONES,
                      max_accuracy_drop: float = 0.005) -> list[tuple[float, float, str]]:
    """``(validation AUROC, -validation FPR95, key)`` of every forged-outlier method (:func:`is_forged` with
    ``backbones``) in ``numbers`` whose backbone keeps ID validation accuracy within ``max_accuracy_drop`` of the
    plain classifier's, best first.

    ``accuracies`` maps backbone labels to ID val accuracy (:func:`backbone_accuracies`; a method's backbone is
    its key's label, no label: ``"plain"``). Backbones missing from it, or a missing ``"plain"``, skip the rule."""
    base = accuracies.get("plain")
    out = []
    for m, v in numbers.items():
        if not is_forged(m, backbones):
            continue
        acc = accuracies.get(split_key(m)[2] or "plain")
        if base is not None and acc is not None and acc < base - max_accuracy_drop:
            continue
        out.append((v["auroc"], -v["fpr95"], m))
    return sorted(out, reverse=True)


def protocol_pick(res: dict, group: str | None = None) -> str | None:
    """The forged-outlier method with the best *validation* AUROC (:func:`validation_numbers` for ``group``)
    among those whose backbone keeps ID validation accuracy (:func:`forged_candidates`).

    This is the protocol's choice (docs/protocol.md): it never reads an OOD test set. Ties go to
    the lower validation FPR95.
    """
    cands = forged_candidates(validation_numbers(res, group), backbone_accuracies(res))
    return cands[0][2] if cands else None


def write_summary(all_results: dict, out: Path) -> Path:
    """Per suite and group (near / far): ID accuracies, the best post-hoc detector on the plain
    classifier (picked on the test sets: the strongest baseline), the forged-outlier method picked by
    the protocol on validation data, and the individual forged-outlier methods."""
    lines = ["# oodforge demo summary", "",
             "Mean AUROC / FPR95 (%) over each group of OOD sets. 'best post-hoc' is the best post-hoc detector on "
             "the plain classifier *chosen on the test sets* (the strongest baseline); 'protocol pick' is the "
             "forged-outlier method with the best validation AUROC for the group (ID val vs the outliers of the "
             "held-out forger that stands for it, made from ID val: class mixes for near, jigsaws for far; "
             "docs/protocol.md), chosen without reading any OOD test set.", "",
             "| suite | group | ID acc plain / SSOD / OE | best post-hoc | protocol pick | shift | fusion | "
             "ssod@ssod | energy@oe |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res in all_results.items():
        accs = res["models"]

        def acc(label: str, accs: dict = accs) -> str:
            return f"{100 * accs[label]['id_accuracy']:.2f}" if label in accs else "-"

        def cell(m: str | None, group: str | None, res: dict = res) -> str:
            v = group_mean(res, m, group) if m else None
            return "-" if v is None else f"{100 * v[0]:.2f} / {100 * v[1]:.2f}"

        shift, fusion = plain_key(res, "shift"), plain_key(res, "fusion")
        for group in [g for g in ("near", "far") if res["groups"].get(g)]:
            pick = protocol_pick(res, group)
            plain_posthoc = {m: v for m, v in res["methods"].items() if is_plain_post_hoc(m)}
            best, _ = best_method({**res, "methods": plain_posthoc}, group=group)
            lines.append(f"| {name} | {group} | {acc('plain')} / {acc('ssod')} / {acc('oe')} | {best}: "
                         f"{cell(best, group)} | {pick}: {cell(pick, group)} | {shift or 'shift'}: {cell(shift, group)} | "
                         f"{cell(fusion, group)} | {cell('ssod@ssod', group)} | {cell('energy@oe', group)} |")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(all_results, indent=1))
    return path
