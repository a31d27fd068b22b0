"""SSOD on the zoo: the zoo's SSOD model vs an alpha = 0 control vs the plain classifier, same detectors.

    .venv/bin/python benchmarks/bench_ssod_zoo.py [--suites fashion,fashion6,scenes] [--out benchmarks/results/ssod]

The zoo's SSOD model is the zoo's plain classifier fine-tuned for 2 epochs with the joint loss
(Eq. 14, alpha 1, gamma 0.95; AdamW lr 1e-4 cosine). The control repeats exactly that run with
``alpha = 0`` (same loop, optimiser, data order, seed; the OOD term switched off), so

* control vs plain = what two more epochs of AdamW fine-tuning do;
* SSOD vs control  = what the OOD term does.

Each backbone is scored with MSP, energy and KNN, and the SSOD model also with ``ssod`` (P(ID|x),
Eq. 15) and ``ssod-combined`` (Eq. 7). Prints mean AUROC / FPR95 per group and writes
``OUT/<suite>/results.json`` (the bench format).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from oodforge.bench import BenchJob, run_bench
from oodforge.data.suites import load_suite
from oodforge.models.features import default_cache_dir
from oodforge.report import group_mean
from oodforge.workflows import TrainPlan, get_model

BASE = ["msp", "energy", "knn"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="fashion,fashion6,scenes")
    ap.add_argument("--out", default="benchmarks/results/ssod")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for name in args.suites.split(","):
        suite = load_suite(name)
        plain, pinfo = get_model(suite, TrainPlan())
        ssod, sinfo = get_model(suite, TrainPlan(method="ssod"))
        control, cinfo = get_model(suite, TrainPlan(method="ssod", alpha=0.0, epochs=args.epochs,
                                                    init_from=pinfo["checkpoint"]), use_zoo=False)
        jobs = [BenchJob(plain, BASE, info={"zoo": pinfo.get("zoo")}),
                BenchJob(ssod, ["ssod", "ssod-combined"] + BASE, label="ssod", info={"zoo": sinfo.get("zoo")}),
                BenchJob(control, ["ssod"] + BASE, label="alpha0",
                         info={"checkpoint": cinfo["checkpoint"], "train_seconds": cinfo.get("train_seconds")})]
        res = run_bench(suite, jobs, Path(args.out) / name, cache_dir=default_cache_dir(), progress=False,
                        config={"bench": "bench_ssod_zoo"}, log=None)
        for m in res["methods"]:
            label = m.split("@")[1] if "@" in m else "plain"
            cells = []
            for g in ("near", "far"):
                v = group_mean(res, m, g)
                cells.append("-" if v is None else f"{100 * v[0]:.2f} / {100 * v[1]:.2f}")
            rows.append(f"| {name} | {m} | {100 * res['models'][label]['id_accuracy']:.2f} | {cells[0]} | {cells[1]} |")
    table = "\n".join(["| suite | method | ID test acc | near AUROC / FPR95 | far AUROC / FPR95 |",
                       "|---|---|---|---|---|", *rows])
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.md").write_text(table + "\n")
    (Path(args.out) / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
