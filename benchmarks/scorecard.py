"""Issue 28's scorecard: does the one detector each suite ships beat the best post-hoc detector? Read after the fact.

    .venv/bin/python benchmarks/scorecard.py [--forged benchmarks/results/forged]
        [--plain-seeds benchmarks/results/plain_seeds]

The verdicts of docs/results.md and the closing notes, computed by one rule from committed files alone
(``bench_forged.load_runs`` and ``bench_plain_seeds``' ``summary.json``), instead of by hand. Per suite and OOD group:

* **pick**: the protocol's one pick per suite (``oodforge.protocol.pick`` over the ``bench_forged.py`` seeds:
  validation only), its test AUROC / FPR95 (mean over the group's OOD sets) per forged-side seed;
* **zoo baseline**: the best post-hoc detector on the zoo classifier *chosen on the test sets*
  (``bench_forged.best_post_hoc_on_test``, one run: no spread);
* **seeds baseline**: the best post-hoc detector over the plain classifier trained with seeds 0-2, chosen on the
  mean test AUROC (``benchmarks/bench_plain_seeds.py``'s ``best``), per classifier seed.

The rule is issue 28's done-when: on each metric the pick **wins** when it is better by more than the larger of
the two seed standard deviations (population std over the seeds, as every table here), **loses** when it is worse
by more, and **ties** otherwise; a group meets the done-when when both metrics win against both baselines and the
pick's backbone keeps the plain classifier's ID validation accuracy within 0.5 points (``protocol.keeps_accuracy``,
which the pick already obeys). The stretch goal is half the zoo baseline's error (100 - AUROC, and FPR95).

It reads the OOD test sets (that is what a verdict is) and chooses nothing: the pick comes from validation numbers
only, and no number here feeds a choice (docs/protocol.md). Output: the table on stdout and ``OUT/scorecard.md``
(``--forged`` is OUT).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_forged import FORGED_LABELS, best_post_hoc_on_test, load_runs, per_seed_test

from oodforge.keys import split_key
from oodforge.protocol import MAX_ACCURACY_DROP, mean_accuracies, pick

RESULTS = Path(__file__).resolve().parent / "results"


def verdict(pick_values: np.ndarray, base_values: np.ndarray, higher_is_better: bool) -> str:
    """``win`` / ``tie`` / ``loss`` of one metric: the pick's mean against the baseline's, by more than the larger of
    the two standard deviations over their seeds (values in fractions, one per seed)."""
    diff = float(np.mean(pick_values) - np.mean(base_values)) * (1 if higher_is_better else -1)
    margin = max(float(np.std(pick_values)), float(np.std(base_values)))
    return "win" if diff > margin else "loss" if diff < -margin else "tie"


def seeds_baseline(plain_summary: dict, suite: str, group: str) -> tuple[str, np.ndarray] | None:
    """The best post-hoc detector over classifier seeds on ``group`` and its per-seed ``[seeds, 2]`` test numbers
    (``bench_plain_seeds.py``'s summary), or ``None`` when the suite has no such run."""
    entry = plain_summary.get(suite)
    if not entry or group not in entry["best"]:
        return None
    name = entry["best"][group]
    cell = entry["table"][name][group]
    return name, np.array([cell["auroc"], cell["fpr95"]]).T


def rows(by_seed: dict, suite: str, plain_summary: dict) -> list[dict]:
    """One row per OOD group of a suite: the pick, both baselines, the verdicts and the accuracies."""
    runs = [by_seed[k] for k in sorted(by_seed)]
    r0 = runs[0]
    chosen = pick(runs, backbones=FORGED_LABELS)
    groups = [g for g in ("near", "far") if r0["groups"].get(g)]
    zoo = best_post_hoc_on_test(r0, groups)
    label = split_key(chosen.key)[2] or "plain"
    accuracies = mean_accuracies(runs)
    test_acc = [r["models"][label]["id_accuracy"] for r in runs if "id_accuracy" in r["models"].get(label, {})]
    out = []
    for group in groups:
        p = per_seed_test(by_seed, chosen.key, group)
        z = per_seed_test(by_seed, zoo[group], group)
        s = seeds_baseline(plain_summary, suite, group)
        row = {"group": group, "pick": (chosen.key, p), "zoo": (zoo[group], z), "seeds": s,
               "val_acc_drop": accuracies["plain"] - accuracies[label],
               "test_acc": (float(np.mean(test_acc)) if test_acc else None,
                            float(r0["models"]["plain"]["id_accuracy"]))}
        for name, base in (("zoo", z), ("seeds", None if s is None else s[1])):
            row[f"{name} verdict"] = None if base is None else (verdict(p[:, 0], base[:, 0], True),
                                                                verdict(p[:, 1], base[:, 1], False))
        row["meets"] = (all(v == ("win", "win") for v in (row["zoo verdict"], row["seeds verdict"]) if v)
                        and row["val_acc_drop"] <= MAX_ACCURACY_DROP)
        row["halves"] = (1 - p[:, 0].mean() <= (1 - z[:, 0].mean()) / 2, p[:, 1].mean() <= z[:, 1].mean() / 2)
        out.append(row)
    return out


def _numbers(values: np.ndarray) -> str:
    a, f = values.T * 100
    spread = f" ± {a.std():.2f}" if len(values) > 1 else ""
    fspread = f" ± {f.std():.2f}" if len(values) > 1 else ""
    return f"{a.mean():.2f}{spread} / {f.mean():.2f}{fspread} ({len(values)})"


def table(all_runs: dict, plain_summary: dict) -> str:
    """The markdown scorecard of :func:`rows` for every suite of ``all_runs`` (``bench_forged.load_runs``)."""
    lines = ["# Issue 28's scorecard (benchmarks/scorecard.py; read on the test sets, chooses nothing)", "",
             "Test AUROC / FPR95 in %, mean ± std over seeds (how many in brackets). Verdict per metric: win / loss "
             "when the pick is better / worse by more than the larger seed std, tie otherwise (AUROC, FPR95). "
             "'meets' = both metrics win against both baselines and the pick's backbone keeps ID validation "
             "accuracy within 0.5 points; 'halves' = half the zoo baseline's error (AUROC, FPR95).", "",
             "| suite | group | pick (validation) | zoo baseline (post-hoc, chosen on test) | verdict | "
             "seeds baseline (post-hoc over classifier seeds, chosen on test) | verdict | ID val acc drop | "
             "ID test acc (pick / plain) | meets | halves |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for suite, by_seed in all_runs.items():
        for row in rows(by_seed, suite, plain_summary):
            seeds = "-" if row["seeds"] is None else f"{row['seeds'][0]}: {_numbers(row['seeds'][1])}"
            sv = "-" if row["seeds verdict"] is None else " / ".join(row["seeds verdict"])
            t_pick, t_plain = row["test_acc"]
            lines.append(
                f"| {suite} | {row['group']} | {row['pick'][0]}: {_numbers(row['pick'][1])} | "
                f"{row['zoo'][0]}: {_numbers(row['zoo'][1])} | {' / '.join(row['zoo verdict'])} | {seeds} | {sv} | "
                f"{100 * row['val_acc_drop']:+.2f} | {100 * t_pick:.2f} / {100 * t_plain:.2f} | "
                f"{'yes' if row['meets'] else 'no'} | {' / '.join('yes' if h else 'no' for h in row['halves'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forged", type=Path, default=RESULTS / "forged")
    ap.add_argument("--plain-seeds", type=Path, default=RESULTS / "plain_seeds")
    args = ap.parse_args()
    text = table(load_runs(args.forged), json.loads((args.plain_seeds / "summary.json").read_text()))
    print(text)
    (args.forged / "scorecard.md").write_text(text)


if __name__ == "__main__":
    main()
