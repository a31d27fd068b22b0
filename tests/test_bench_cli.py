"""`oodforge bench --quick` end to end through the CLI: artifacts, schema, and metrics that
scikit-learn reproduces from scores.npz."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oodforge.metrics import evaluate

pytestmark = pytest.mark.slow
FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
needs_fashion = pytest.mark.skipif(not os.path.exists(FASHION), reason="Debian's dataset-fashion-mnist is not installed")


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "oodforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    return proc


def fpr95_by_definition(id_s, ood_s):
    t = np.sort(id_s)[::-1][int(np.ceil(0.95 * len(id_s))) - 1]  # the largest t that keeps >= 95 % of ID
    return float(np.mean(ood_s >= t))


@needs_fashion
def test_bench_quick_writes_reproducible_artifacts(tmp_path):
    out = tmp_path / "run"
    methods = "msp,energy,odin,mahalanobis,react,knn:k=5"
    proc = run_cli("bench", "--suite", "fashion6", "--methods", methods, "--out", str(out), "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == "fashion6"
    assert 0.5 < res["id_accuracy"] <= 1.0
    assert set(res["methods"]) == {"msp", "energy", "odin", "mahalanobis", "react", "knn:k=5"}
    assert res["groups"]["near"] and res["groups"]["far"]
    assert {"seed", "torch", "oodforge"} <= set(res["config"])
    scores = np.load(out / "scores.npz")
    for method, per_set in res["methods"].items():
        assert set(per_set) == set(res["groups"]["near"]) | set(res["groups"]["far"])
        id_s = scores[f"{method}/id"]
        for s, m in per_set.items():
            ood_s = scores[f"{method}/{s}"]
            y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
            x = np.r_[id_s, ood_s]
            assert m["auroc"] == pytest.approx(roc_auc_score(y, x), abs=1e-9)
            assert m["aupr_in"] == pytest.approx(average_precision_score(y, x), abs=1e-9)
            assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -x), abs=1e-9)
            assert m["fpr95"] == pytest.approx(fpr95_by_definition(id_s, ood_s), abs=1e-12)
            assert m == evaluate(id_s, ood_s)
    report = (out / "report.md").read_text()
    assert "near avg" in report and "far avg" in report and "ID accuracy" in report
    # the report recommends the protocol's pick on validation numbers (held-out forgers, on by default), and
    # `export --from-run` ships that same detector
    from oodforge.protocol import pick

    chosen = pick(res, among="all")
    assert chosen is not None and set(res["validation_heldout"]) == set(res["methods"])
    assert f"The protocol's pick among this run's methods is `{chosen.key}`" in report
    guard = tmp_path / "guard.oodf"
    proc3 = run_cli("export", "--suite", "fashion6", "--from-run", str(out), "--quick", "--out", str(guard))
    assert proc3.returncode == 0, proc3.stderr[-3000:]
    assert f"shipping {chosen.key} from" in proc3.stdout
    assert chosen.key.split(":")[0] in (guard / "guard.json").read_text()
    assert len(list((out / "plots").glob("scores_*.png"))) == 6
    assert not list((out / "plots").glob("roc_*.png"))  # one picture per method: ROC beside the histograms
    # far-OOD sets are easy in feature space for a trained classifier: a broken pipeline (wrong sign,
    # wrong set, untrained model) lands near 0.5. (Logit-based scores such as energy are NOT reliable
    # here: high-contrast textures get larger logits than Fashion-MNIST items, a known failure mode.)
    for method in ("mahalanobis", "knn:k=5"):
        assert np.mean([res["methods"][method][s]["auroc"] for s in res["groups"]["far"]]) > 0.8

    # the second run reuses the cached classifier and features: same numbers
    proc2 = run_cli("bench", "--suite", "fashion6", "--methods", "msp,energy", "--out", str(tmp_path / "b"), "--quick",
                    "--heldout-val")
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "reusing" in proc2.stdout
    res2 = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res2["methods"]["msp"] == res["methods"]["msp"]
    # --heldout-val: ID val vs jigsaws and class mixes of ID val, computed from the saved scores
    scores2 = np.load(tmp_path / "b" / "scores.npz")
    assert set(res2["validation_heldout"]) == {"msp", "energy"}
    assert scores2["msp/val-heldout"].shape == (2 * scores2["msp/val"].shape[0],)
    assert res2["validation_heldout"]["msp"]["auroc"] == pytest.approx(
        evaluate(scores2["msp/val"], scores2["msp/val-heldout"])["auroc"], abs=1e-12)


def test_bench_rejects_bad_input_with_clear_errors(tmp_path):
    proc = run_cli("bench", "--suite", "nosuchsuite", "--out", str(tmp_path))
    assert proc.returncode != 0 and "nosuchsuite" in (proc.stderr + proc.stdout)
    proc = run_cli("bench", "--suite", "fashion", "--out", str(tmp_path), "--checkpoint", str(tmp_path / "nope"),
                   "--quick")
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr and "no such folder" in proc.stderr


@needs_fashion
def test_shift_without_outliers_names_the_option(tmp_path):
    proc = run_cli("bench", "--suite", "fashion", "--methods", "shift", "--out", str(tmp_path), "--quick")
    assert proc.returncode != 0 and "--outliers" in proc.stderr
