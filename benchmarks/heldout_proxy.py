"""How well each held-out forger stands for a group of OOD test sets: rank correlations, read after the fact.

    .venv/bin/python benchmarks/heldout_proxy.py [--out benchmarks/results/forged]

For every suite with held-out validation numbers (``bench_forged.py`` runs), over every method of seed 0:
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

from bench_forged import backfill_by_forger, upgrade_keys
from scipy.stats import spearmanr

from oodforge.demo import group_mean


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
    table = {}
    for f in sorted(out.glob("*/seed0/results.json")):
        res = upgrade_keys(backfill_by_forger(json.loads(f.read_text()), f.parent / "scores.npz"))
        if "validation_heldout_by_forger" in res:
            table[f.parent.parent.name] = proxy_table(res)
    print("| suite | group | methods | rho(val mix, test) | rho(val jigsaw, test) | rho(val both, test) |")
    print("|---|---|---|---|---|---|")
    for suite, groups in table.items():
        for group, r in groups.items():
            print(f"| {suite} | {group} | {r['mix'][1]} | {r['mix'][0]:.2f} | {r['jigsaw'][0]:.2f} | {r['both'][0]:.2f} |")
    (out / "heldout_proxy.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
