"""Fusion rows of the SHIFT benchmark, and ``--rescore`` (``bench_shift.py``).

The best penultimate and the best feature-map shift variant are each fused with the best post-hoc
detector: each score is mapped to its percentile among the scores of a random half of the ID test set,
the fused score is the smaller percentile; the two detectors and the fusion are then evaluated on the
other half (no OOD data is used for calibration; the choice of the "best" variants is made on the test
sets, so it is optimistic). ``--rescore`` re-renders a finished run's markdown from its ``summary.json``
and ``scores.npz`` with these rows (and the store statistics of a ``--stats-only`` run, when present).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from shift_common import metric_cells, summarise


def fusion(scores: dict[str, np.ndarray], a: str, b: str, sets: list[str], groups: dict, seed: int) -> dict:
    """Score fusion of two detectors, calibrated without touching OOD data: a random half of the ID test set
    (``seed``) maps each detector's score to its ID percentile; the fused score is the smaller percentile
    (an image is flagged when either detector flags it). All three (a, b, fused) are evaluated on the
    *other* half of the ID test set against every OOD set, so they are comparable with each other."""
    from oodforge.metrics import evaluate

    n = len(scores[f"{a}/id"])
    perm = np.random.default_rng(seed).permutation(n)
    cal, held = perm[: n // 2], perm[n // 2:]

    def id_pct(m: str, x: np.ndarray) -> np.ndarray:
        ref = np.sort(scores[f"{m}/id"][cal])
        return np.searchsorted(ref, x, side="right") / len(ref)

    out = {}
    for name, f in ((a, lambda s_: scores[f"{a}/{s_}"]), (b, lambda s_: scores[f"{b}/{s_}"]),
                    ("fused", lambda s_: np.minimum(id_pct(a, scores[f"{a}/{s_}"]), id_pct(b, scores[f"{b}/{s_}"])))):
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
    """The fusion table of a suite (empty when it has no fusion rows)."""
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
            lines.append("| " + " | ".join([label] + metric_cells(r, groups)) + " |")
    return lines


def rescore(out: Path, bench_dir: Path, seed: int, cmd: str, suite_markdown) -> None:
    """Re-render a finished run (its ``summary.json`` + ``scores.npz``) with the fusion rows, merging the
    store statistics and best-of-n fresh-forge timings of ``<out stem>_stats/summary.json`` when present;
    ``suite_markdown`` renders one suite (``bench_shift.suite_markdown``)."""
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
            add_fusions(r, {k: z[k] for k in z.files}, seed)
    head = "\n".join(line for line in out.read_text().split("\n### suite")[0].split("\n")
                     if not line.startswith("Fusion rows and store statistics added by"))
    head = head.rstrip("\n") + f"\n\nFusion rows and store statistics added by `{cmd}`.\n\n"
    out.write_text(head + "\n".join(suite_markdown(s) for s in results))
    (bench_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    print(out.read_text())
