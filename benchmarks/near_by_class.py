"""Why the shipped detector loses fashion6 near: the four held-out garment classes one by one. Read after the fact.

    .venv/bin/python benchmarks/near_by_class.py [--out benchmarks/results/near_by_class]

fashion6's near group is one OOD set, the test images of the four Fashion-MNIST classes the suite holds out
(Coat, Sandal, Shirt, Ankle boot; ID: T-shirt/top, Trouser, Pullover, Dress, Sneaker, Bag). This script splits it
by class (``oodforge.data.suites.fashion6_near_classes``: the Fashion-MNIST test labels in the suite's order) and
gives, on the zoo's seed-0 models, for each class:

* which ID class the plain classifier calls its images, and how often (the look-alike it is mistaken for);
* AUROC / FPR95 against the ID test set of the shipped pick's detector (``knn@t2fnorm``: KNN on T2FNorm fine-tuned
  ten epochs, the zoo's ``fashion6-t2fnorm``, the plan of ``bench_forged.py``'s ``t2fnorm-e10`` on seed 0), of the
  best post-hoc detectors on the test sets (``react``, ``fusion:a=energy,b=react`` on the plain classifier), and of
  the other parts of those fusions on both backbones.

It reads the OOD test set: **a diagnostic that chooses nothing** (like ``selection_gap.py``); one seed (the zoo's
models), so differences under a point are noise. The benchmark itself (``oodforge.bench.run_bench``) computes every
score; this script only splits the near scores by class. Output: the tables on stdout, ``OUT/near_by_class.md``
and ``OUT/near_by_class.json``; about 3 min on 2 cores (2 min 46 s measured).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from oodforge.bench import BenchJob, run_bench
from oodforge.data.suites import FASHION6_CLASSES, FASHION6_HELD_OUT, fashion6_near_classes, load_suite
from oodforge.metrics import evaluate
from oodforge.models.features import default_cache_dir, extract_features
from oodforge.workflows import TrainPlan, get_model, zoo_checkpoint

NEAR = "held-out-classes"
PLAIN_METHODS = ["msp", "energy", "react", "knn", "vim", "fusion:a=energy,b=react"]
RECIPE_METHODS = ["energy", "react", "knn", "vim", "fusion:a=energy,b=react"]
RECIPE_LABEL = "t2fnorm"  # the zoo's fashion6-t2fnorm: bench_forged.py's t2fnorm-e10 on seed 0
SHIPPED = "knn@t2fnorm"


def per_class(scores, names: np.ndarray, methods: list[str]) -> dict:
    """``{method: {class: (AUROC, FPR95)}}``, ID test against the near images of each held-out class."""
    rows = {}
    for m in methods:
        rows[m] = {}
        for c in FASHION6_HELD_OUT:
            e = evaluate(scores[f"{m}/id"], scores[f"{m}/{NEAR}"][names == c])
            rows[m][c] = (e["auroc"], e["fpr95"])
    return rows


def mistaken_for(model, suite, names: np.ndarray) -> dict:
    """``{held-out class: (the ID class the plain classifier predicts most for it, that share)}``."""
    logits = extract_features(model, suite.ood[NEAR], cache_dir=default_cache_dir(), progress=False).logits
    pred = np.asarray(logits).argmax(1)
    out = {}
    for c in FASHION6_HELD_OUT:
        counts = np.bincount(pred[names == c], minlength=len(FASHION6_CLASSES))
        out[c] = (FASHION6_CLASSES[int(counts.argmax())], float(counts.max() / counts.sum()))
    return out


def table(rows: dict, mistaken: dict) -> str:
    lines = ["# fashion6 near by held-out class (benchmarks/near_by_class.py; read on the test sets, chooses nothing)",
             "", "Zoo models, seed 0. AUROC / FPR95 in %, ID test against one held-out class's test images "
             "(1,000 each). 'mistaken for': the plain classifier's most frequent prediction for the class.", "",
             "| method | " + " | ".join(f"{c} (mistaken for {mistaken[c][0]}, {100 * mistaken[c][1]:.0f} %)"
                                        for c in FASHION6_HELD_OUT) + " | mean |",
             "|---|" + "---|" * (len(FASHION6_HELD_OUT) + 1)]
    for m, by_class in rows.items():
        mean = np.mean([v for v in by_class.values()], axis=0)
        name = f"**{m}** (shipped)" if m == SHIPPED else m
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.2f} / {100 * f:.2f}" for a, f in by_class.values())
                     + f" | {100 * mean[0]:.2f} / {100 * mean[1]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "near_by_class")
    ap.add_argument("--data-root", default=None, help="the Fashion-MNIST idx files (default: Debian's)")
    args = ap.parse_args()
    suite = load_suite("fashion6", data_root=args.data_root)
    for plan in (TrainPlan(), TrainPlan(method="t2fnorm")):
        if zoo_checkpoint(suite, plan) is None:
            raise SystemExit(f"the zoo has no fashion6 {plan.method} model for this data; see scripts/build_zoo.sh")
    plain, _ = get_model(suite, TrainPlan(), log=None)
    recipe, _ = get_model(suite, TrainPlan(method="t2fnorm"), log=None)
    jobs = [BenchJob(plain, PLAIN_METHODS), BenchJob(recipe, RECIPE_METHODS, label=RECIPE_LABEL)]
    run_dir = Path("runs") / "near_by_class"  # the run itself (scores.npz: 10 MB) stays out of git
    run_bench(suite, jobs, run_dir, cache_dir=default_cache_dir(), seed=0, progress=False,
              config={"bench": "near_by_class"})
    names = fashion6_near_classes(args.data_root)
    assert len(names) == len(suite.ood[NEAR]), "the near set and its class names must line up"
    with np.load(run_dir / "scores.npz") as scores:
        methods = PLAIN_METHODS + [f"{m}@{RECIPE_LABEL}" for m in RECIPE_METHODS]
        rows = per_class(scores, names, methods)
    mistaken = mistaken_for(plain, suite, names)
    text = table(rows, mistaken)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "near_by_class.md").write_text(text)
    (args.out / "near_by_class.json").write_text(json.dumps({"per_class": rows, "mistaken_for": mistaken}, indent=1))


if __name__ == "__main__":
    main()
