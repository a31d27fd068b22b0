"""Tables and plots of a benchmark run: ``report.md`` (like Table 1 of the papers) and ``plots/*.png``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .intervals import bootstrap_intervals
from .keys import detector_name, split_key
from .metrics import roc_curve


def best_method(results: dict, group: str | None = None, exclude: tuple[str, ...] = ()) -> tuple[str, float]:
    """The method with the highest mean *test* AUROC over a group of OOD sets (all sets when ``group`` is None).

    This reads the OOD test sets: use it only for a baseline labelled "chosen on the test sets" (it favours the
    baseline), never for a recommendation (:func:`oodforge.protocol.pick`)."""
    best, best_v = "", -1.0
    for m, res in results["methods"].items():
        if detector_name(m) in exclude:
            continue
        sets = results["groups"].get(group, []) if group else list(res)
        vals = [res[s]["auroc"] for s in sets if s in res]
        if vals and np.mean(vals) > best_v:
            best, best_v = m, float(np.mean(vals))
    return best, best_v


def group_mean(res: dict, method: str, group: str | None) -> tuple[float, float] | None:
    """Mean test (AUROC, FPR95) of ``method`` over a group of OOD sets (all sets when ``group`` is None): for
    tables only; no choice reads it (:mod:`oodforge.protocol`)."""
    r = res["methods"].get(method)
    sets = res["groups"].get(group, []) if group else list(r or {})
    if not r or not sets:
        return None
    return float(np.mean([r[s]["auroc"] for s in sets])), float(np.mean([r[s]["fpr95"] for s in sets]))


def _group_avg(res: dict, sets: list[str], metric: str) -> float | None:
    vals = [res[s][metric] for s in sets if s in res]
    return float(np.mean(vals)) if vals else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per method, AUROC / FPR95 (in %) per OOD set, then near and far averages."""
    methods = results["methods"]
    sets = list(next(iter(methods.values()))) if methods else []
    groups = [(g, s) for g, s in results.get("groups", {}).items() if s]
    header = ["method"] + sets + [f"{g} avg" for g, _ in groups] + ["all avg"]
    rows = []
    for m, res in methods.items():
        row = [m]
        for s in sets:
            row.append(f"{_fmt(res[s]['auroc'])} / {_fmt(res[s]['fpr95'])}")
        for _, gs in groups + [("all", sets)]:
            row.append(f"{_fmt(_group_avg(res, gs, 'auroc'))} / {_fmt(_group_avg(res, gs, 'fpr95'))}")
        rows.append(row)
    return header, rows


#: bootstrap resamples behind every interval of the report (oodforge.intervals; seeded, so reports reproduce)
N_BOOT = 1000


def interval_section(results: dict, scores: dict[str, np.ndarray], n_boot: int = N_BOOT, seed: int = 0,
                     methods: list[str] | None = None) -> list[str]:
    """Markdown lines: per method (default: every method of ``results``) and OOD set, AUROC and FPR95 (%) with
    95 % percentile-bootstrap intervals (ID and OOD test images resampled apart,
    :func:`oodforge.intervals.bootstrap_intervals`)."""
    methods = [m for m in (results["methods"] if methods is None else methods) if f"{m}/id" in scores]
    if not methods:
        return []
    sets = list(results["methods"][methods[0]])
    lines = [f"### 95 % bootstrap intervals ({n_boot:,} resamples, ID and OOD resampled apart, seed {seed})", "",
             "AUROC [interval] / FPR95 [interval], in %. Two methods whose intervals overlap may still differ "
             "significantly on the same images: `oodforge.intervals.paired_auroc_difference` tests that.", "",
             "| method | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for m in methods:
        cells = []
        for s in sets:
            if f"{m}/{s}" not in scores:
                cells.append("-")
                continue
            iv = bootstrap_intervals(scores[f"{m}/id"], scores[f"{m}/{s}"], n_boot=n_boot, seed=seed)
            r = results["methods"][m][s]
            cells.append(f"{100 * r['auroc']:.2f} [{100 * iv['auroc'][0]:.2f}, {100 * iv['auroc'][1]:.2f}] / "
                         f"{100 * r['fpr95']:.2f} [{100 * iv['fpr95'][0]:.2f}, {100 * iv['fpr95'][1]:.2f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown_table(results: dict) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(results: dict, title: str | None = None) -> None:
    """A rich table on the terminal (AUROC / FPR95 in %, best AUROC per column in bold)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    header, rows = table_rows(results)
    accs = ", ".join(f"{k}: {100 * v['id_accuracy']:.2f}%" for k, v in results.get("models", {}).items())
    t = Table(title=title or f"suite {results['suite']}: AUROC / FPR95 (%)  (ID accuracy {accs})")
    for h in header:
        t.add_column(h, justify="left" if h == "method" else "right")
    for r in rows:
        t.add_row(*(escape(c) for c in r))  # result keys hold [source]: not rich markup
    Console(width=max(120, 22 * len(header))).print(t)


def export_hint(results: dict, suite_arg: str | None = None) -> list[str]:
    """A 'ship it' section: the export command for the detector the protocol picks on *validation* data
    (:func:`oodforge.protocol.pick` over every method of the run, docs/protocol.md), never the best test
    AUROC. ``suite_arg`` is what ``--suite`` must be given (a user suite's file path; default: the suite name).
    A run without validation numbers gets no recommendation, and the section says how to get one."""
    from .protocol import pick

    chosen = pick(results, among="all")
    if chosen is None:
        return ["## Ship it", "",
                "This run has no validation numbers, so the protocol recommends no detector (a choice made on the "
                "OOD test sets above would not be one). Re-run `bench` with held-out validation (the default; not "
                "`--no-heldout-val`) to get the pick, then `oodforge export --method ...` (docs/deploy.md).", ""]
    name, source, label = split_key(chosen.key)  # export takes the method spec; the store says how it was forged
    models = results.get("models", {})
    ckpt = (models.get(label or "plain") or {}).get("checkpoint")
    parts = [f"oodforge export --suite {suite_arg or results['suite']}", f"--method {name}"]
    if ckpt:
        parts.append(f"--checkpoint {ckpt}")
    if source is not None or name.split(":")[0] in ("shift", "fusion") or "shift" in name:
        store = (models.get(label or "plain") or {}).get("outlier_store")
        parts.append(f"--outliers {store or 'STORE'}")
    return ["## Ship it", "",
            f"The protocol's pick among this run's methods is `{chosen.key}`: {chosen.describe()}; chosen without "
            "reading any OOD test set (docs/protocol.md). A guarded classifier with it, its threshold calibrated "
            "on held-out ID data to accept 95 % of ID images (docs/deploy.md):", "", "```bash",
            " ".join(parts) + " --target 0.95 --out guard.oodf", "oodforge predict guard.oodf IMAGES_OR_FOLDERS...",
            "```", ""]


#: the name of a method's plot is ``plots/<PLOT_PREFIX><method>.png``; runs before 2026-12 wrote two pictures,
#: ``roc_<method>.png`` and ``hist_<method>.png`` (still removed as stale from oodforge's own folders)
PLOT_PREFIX = "scores_"
OLD_PLOT_PREFIXES = ("roc_", "hist_")


def write_report(results: dict, scores: dict[str, np.ndarray], out: Path, extra_md: str = "",
                 detail: list[str] | None = None, detail_note: str = "") -> Path:
    """Write ``report.md`` and one plot per method (ROC curves beside score histograms); returns the report's path.

    ``detail``: the methods that get a plot and bootstrap intervals (default: all). A run with many methods
    (the demo's ~120) spends most of its report time on those two; every method's numbers stay in the table,
    ``results.json`` and ``scores.npz``. ``detail_note`` says in the report which ones were drawn and why."""
    out.mkdir(parents=True, exist_ok=True)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    pictures = []
    wanted = set(results["methods"] if detail is None else detail)
    drawn = [m for m in results["methods"] if m in wanted]
    for method in drawn:
        safe = method.replace("/", "_").replace(":", "_").replace("=", "-").replace(",", "_").replace("@", "-at-")
        safe = safe.replace("[", "_").replace("]", "").replace("+", "-")  # the outlier source of oodforge.keys
        _plot_method(method, scores, results, plots / f"{PLOT_PREFIX}{safe}.png")
        pictures.append((method, f"plots/{PLOT_PREFIX}{safe}.png"))
    _remove_stale_plots(out, {Path(p).name for _, p in pictures})
    accs = "\n".join(f"- ID accuracy ({k}): **{100 * v['id_accuracy']:.2f} %**" for k, v in results["models"].items())
    groups = "\n".join(f"- {g}-OOD: {', '.join(s)}" for g, s in results["groups"].items() if s)
    cfg = results.get("config", {})
    md = [f"# oodforge benchmark: suite `{results['suite']}`", "", accs, groups, "",
          "AUROC / FPR95 in % (ID = positive class; FPR95 = share of OOD accepted at the threshold that keeps "
          "95 % of ID). Higher AUROC and lower FPR95 are better.", "", markdown_table(results), "",
          *interval_section(results, scores, methods=drawn)]
    if len(drawn) < len(results["methods"]):
        md += [f"Intervals and plots for {len(drawn)} of the {len(results['methods'])} methods"
               + (f": {detail_note}" if detail_note else "") + ". Every method's scores are in `scores.npz`.", ""]
    if extra_md:
        md += [extra_md, ""]
    md += export_hint(results, (results.get("config") or {}).get("suite_file"))
    md += ["## Plots", ""]
    for method, picture in pictures:
        md.append(f"**{method}**: [ROC curves and score histograms]({picture})")
        md.append("")
    md += ["## Run", "", "```", *(f"{k}: {v}" for k, v in cfg.items()), "```", ""]
    path = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, path)
    return path


def _remove_stale_plots(out: Path, keep: set[str]) -> None:
    """Plots of methods this run did not write (an earlier run's), removed only from a folder oodforge owns
    (:func:`oodforge.outdir.is_ours`) and only by the names oodforge gives plots."""
    from .outdir import is_ours

    if not is_ours(out):
        return
    for f in [p for prefix in (PLOT_PREFIX, *OLD_PLOT_PREFIXES) for p in (out / "plots").glob(f"{prefix}*.png")]:
        if f.name not in keep:
            f.unlink(missing_ok=True)


def _plot_method(method: str, scores: dict, results: dict, path: Path) -> None:
    """One PNG per method: the ROC curve of every OOD set (AUROC % in the legend) beside the score histograms
    of ID test and each OOD set. One figure, drawn once with fixed margins (no pyplot state, no tight layout):
    a report writes one per method, and the two ``tight_layout`` figures it drew before cost 1.5x the time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.9))
    FigureCanvasAgg(fig)
    roc, hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.13, top=0.9, wspace=0.22)
    id_s = scores[f"{method}/id"]
    for s, r in results["methods"][method].items():
        fpr, tpr, _ = roc_curve(id_s, scores[f"{method}/{s}"])
        roc.plot(fpr, tpr, label=f"{s} ({100 * r['auroc']:.1f})")
    roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    roc.axhline(0.95, color="grey", lw=0.6, ls="--")
    roc.set(xlabel="FPR (OOD accepted)", ylabel="TPR (ID accepted)", title=f"{method}: ROC (AUROC %)")
    roc.legend(fontsize=7, loc="lower right")
    arrays = {"ID test": id_s, **{s: scores[f"{method}/{s}"] for s in results["methods"][method]}}
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0, 1)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    for name, a in arrays.items():
        hist.hist(np.clip(a, lo, hi), bins=bins, histtype="step" if name != "ID test" else "stepfilled",
                  alpha=0.45 if name == "ID test" else 0.9, density=True, label=name)
    hist.set(xlabel="score (higher = more ID)", ylabel="density", title=f"{method}: scores")
    hist.legend(fontsize=7)
    fig.savefig(path, dpi=80)
