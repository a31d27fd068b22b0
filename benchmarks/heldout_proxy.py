"""How well each held-out forger stands for a group of OOD test sets: rank correlations, read after the fact.

    .venv/bin/python benchmarks/heldout_proxy.py [--out benchmarks/results/forged]

For every suite with held-out validation numbers (``bench_forged.py`` runs), over every method of the lowest
seed's run (its part runs merged: ``bench_forged.load_runs``, nothing else; the seed is printed) that records
per-forger numbers (runs made before session 6 do not):
Spearman's rank correlation between a validation AUROC (ID val vs class mixes, vs jigsaws, vs both) and
the method's mean test AUROC on the near and on the far group. A forger that stands for a group should
rank methods as that group does. This is a **diagnostic of the protocol, written after the test numbers
were read; no choice reads it** (docs/protocol.md). Output: the table on stdout and
``OUT/heldout_proxy.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_forged import load_runs
from scipy.stats import spearmanr

from oodforge.report import group_mean


def proxy_table(res: dict) -> dict:
    """``{group: {"mix"|"jigsaw"|"both": (spearman rho, n methods)}}`` for one run's results."""
    by, both = res["validation_heldout_by_forger"], res["validation_heldout"]
    out = {}
    for group in [g for g in ("near", "far") if res["groups"].get(g)]:
        keys = [m for m in by if group_mean(res, m, group) is not None]
        test = [group_mean(res, m, group)[0] for m in keys]
        vals = {"mix": [by[m]["mix"]["auroc"] for m in keys], "jigsaw": [by[m]["jigsaw"]["auroc"] for m in keys],
                "both": [both[m]["auroc"] for m in keys]}
        out[group] = {k: (round(float(spearmanr(v, test)[0]), 3), len(keys)) for k, v in vals.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/forged")
    out = Path(ap.parse_args().out)
    table, seeds = {}, {}
    for suite, by_seed in load_runs(out).items():
        recorded = [k for k in sorted(by_seed) if by_seed[k].get("validation_heldout_by_forger")]
        if not recorded:
            print(f"{suite}: no run records per-forger numbers; skipped")
            continue
        table[suite], seeds[suite] = proxy_table(by_seed[recorded[0]]), recorded[0]
    print("| suite | seed | group | methods | rho(val mix, test) | rho(val jigsaw, test) | rho(val both, test) |")
    print("|---|---|---|---|---|---|---|")
    for suite, groups in table.items():
        for group, r in groups.items():
            print(f"| {suite} | {seeds[suite]} | {group} | {r['mix'][1]} | {r['mix'][0]:.2f} | {r['jigsaw'][0]:.2f} | "
                  f"{r['both'][0]:.2f} |")
    (out / "heldout_proxy.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
