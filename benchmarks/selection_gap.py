"""Where the shipped detector loses: to its selection or to its candidates? Read after the fact.

    .venv/bin/python benchmarks/selection_gap.py [--out benchmarks/results/forged]

For every suite and OOD group of the committed ``bench_forged.py`` runs (``bench_forged.load_runs``, nothing
else), three test numbers (mean AUROC / FPR95 over the group's OOD sets, averaged over the seeds that have the
method, as in ``summary.md``):

* **baseline**: the best post-hoc detector on the zoo classifier, *chosen on the test sets* (issue 28's bar);
* **pick**: the protocol's one pick per suite (``oodforge.protocol.pick``: validation only);
* **best candidate**: the forged-outlier candidate with the highest test AUROC among those the protocol
  could have picked (its backbone keeps ID validation accuracy within 0.5 points, and it has a validation
  number): what a perfect per-group selection would ship from today's candidates;
* **best single candidate**: the one candidate whose worse group is furthest ahead of that group's baseline
  (what one shipped detector could reach at best; per-group bests are two detectors);
* **how the validation ranks**: Spearman's rho between the pick's validation AUROC (``protocol.ranking``: the
  candidates with a validation number in every seed run) and the group's test AUROC over those candidates, and
  the pick's rank on the group's test AUROC among them (1 = the best): a low rho or a far rank says the
  validation outliers do not order candidates as that group of test sets does.

``candidate gap = best candidate - baseline`` says whether any candidate wins at all (if not, no selection rule
can: new candidates are needed); ``selection gap = best candidate - pick`` says what validation gives away. The
best candidate is read on the test sets: **a diagnostic of the protocol, never an input** (docs/protocol.md); it
chooses nothing and is not a result; the maximum over a hundred-odd candidates is also biased upwards by the
test sets' noise (the winner's curse), so a small positive candidate gap is no proof. Candidates screened on
one seed are compared with their one seed (the "seeds" column). Output: the table on stdout and ``OUT/selection_gap.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_forged import FORGED_LABELS, best_post_hoc_on_test, load_runs, per_seed_test
from scipy.stats import spearmanr

from oodforge.protocol import (
    is_forged,
    keeps_accuracy,
    mean_accuracies,
    pick,
    ranking,
    validation_numbers,
)


def mean_test(by_seed: dict, method: str, group: str) -> tuple[float, float, int] | None:
    """Mean test ``(AUROC, FPR95, seeds)`` of ``method`` on ``group`` (``bench_forged.per_seed_test``)."""
    per = per_seed_test(by_seed, method, group)
    return None if per is None else (float(per[:, 0].mean()), float(per[:, 1].mean()), len(per))


def gaps(by_seed: dict) -> list[dict]:
    """One row per OOD group of a suite: baseline, pick and best candidate with their test numbers."""
    runs = [by_seed[k] for k in sorted(by_seed)]
    r0 = runs[0]
    accuracies = mean_accuracies(runs)
    validated = set().union(*(validation_numbers(r) for r in runs))
    candidates = [m for m in validated if is_forged(m, FORGED_LABELS)
                  and keeps_accuracy(m, accuracies)]
    chosen = pick(runs, backbones=FORGED_LABELS)
    groups = [g for g in ("near", "far") if r0["groups"].get(g)]
    baseline = best_post_hoc_on_test(r0, groups)
    tests = {m: {g: mean_test(by_seed, m, g) for g in groups} for m in candidates}
    tests = {m: t for m, t in tests.items() if all(t.values())}
    # the one candidate whose worse group is furthest ahead of that group's baseline (what one shipped detector
    # could reach at best)
    single = max(tests, key=lambda m: min(tests[m][g][0] - mean_test(by_seed, baseline[g], g)[0] for g in groups))
    ranked = [p for p in ranking(runs, backbones=FORGED_LABELS) if p.key in tests]  # the pick's candidates
    rows = []
    for group in groups:
        best = max(tests, key=lambda m: tests[m][group][0])
        test_order = sorted(ranked, key=lambda p: -tests[p.key][group][0])
        rho = spearmanr([p.auroc for p in ranked], [tests[p.key][group][0] for p in ranked])[0]
        rows.append({"group": group, "baseline": (baseline[group], mean_test(by_seed, baseline[group], group)),
                     "pick": (chosen.key, mean_test(by_seed, chosen.key, group)),
                     "best candidate": (best, tests[best][group]), "best single": (single, tests[single][group]),
                     "candidates": len(tests), "rho": float(rho), "ranked": len(ranked),
                     "pick test rank": 1 + [p.key for p in test_order].index(chosen.key)})
    return rows


def _cell(entry: tuple[str, tuple[float, float, int] | None]) -> str:
    name, t = entry
    return f"{name}: {100 * t[0]:.2f} / {100 * t[1]:.2f} ({t[2]})" if t else f"{name}: -"


def table(all_runs: dict) -> str:
    """The markdown table of :func:`gaps` for every suite of ``all_runs`` (``bench_forged.load_runs``)."""
    lines = ["# Selection gap and candidate gap (benchmarks/selection_gap.py; read on the test sets, chooses nothing)",
             "", "Test AUROC / FPR95 in % (seeds averaged). candidate gap = best candidate - baseline; selection gap "
             "= best candidate - pick (AUROC points).", "",
             "| suite | group | baseline (post-hoc, best on test) | pick (validation) | best candidate (on test) | "
             "candidate gap | selection gap | best single candidate for both groups (on test) | candidates | "
             "rho(val, test) | pick's test rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for suite, by_seed in all_runs.items():
        for row in gaps(by_seed):
            b, p, c = (row[k][1] for k in ("baseline", "pick", "best candidate"))
            lines.append(f"| {suite} | {row['group']} | {_cell(row['baseline'])} | {_cell(row['pick'])} | "
                         f"{_cell(row['best candidate'])} | {100 * (c[0] - b[0]):+.2f} | {100 * (c[0] - p[0]):+.2f} | "
                         f"{_cell(row['best single'])} | {row['candidates']} | {row['rho']:.2f} | "
                         f"{row['pick test rank']} of {row['ranked']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "forged")
    args = ap.parse_args()
    text = table(load_runs(args.out))
    print(text)
    (args.out / "selection_gap.md").write_text(text)


if __name__ == "__main__":
    main()
