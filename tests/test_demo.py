"""The demo end to end on one small suite: plain, SSOD, OE and recipe (T2FNorm) training, SHIFT forging, bench, summary."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from oodforge.demo import run_demo, write_summary
from oodforge.protocol import is_forged, pick
from oodforge.workflows import FUSIONS

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_quick_demo_reports_shift_and_ssod_beside_post_hoc(tmp_path):
    out = tmp_path / "demo"
    lines: list[str] = []
    results = run_demo(out, suites=("fashion6",), quick=True, max_train=1200, val_limit=150, progress=False,
                       log=lines.append)
    res = results["fashion6"]
    methods = set(res["methods"])
    # the CPU forger (Layer-CAM + Telea) is not SHIFT's, so the keys of the methods trained on its outliers say so
    assert {"msp", "energy", "knn", "vim", "ash", "fdbd", "shift[layercam+telea]",
            "fusion:a=shift,b=knn[layercam+telea]", "ssod@ssod", "energy@ssod", "energy@oe", "knn@oe"} <= methods
    # sized for 2 cores: what it leaves out is recorded and said, with the command for the full run
    assert "odin" not in methods and set(res["config"]["left_out"]) == {"odin"}
    assert res["config"]["fit_train_images"] == 1200 and res["seconds"] > 0
    # ... and its validation sets come from val_limit of the 300 ID validation images: ID val, the forged
    # validation outliers (one per image) and the held-out forgers' outliers (one per image and forger)
    assert res["config"]["val_images"] == 150
    with np.load(out / "fashion6" / "scores.npz") as z:
        assert len(z["msp/val"]) == 150 and len(z["msp/val-outliers"]) == 150 and len(z["msp/val-heldout"]) == 300
    assert any("left out: odin" in line and "oodforge demo --full" in line for line in lines)
    # the fusions of two scores are candidates on every backbone, and post-hoc fusions on the plain one
    assert {f"{f}{label}" for f in FUSIONS for label in ("", "@ssod", "@oe", "@t2fnorm")} <= methods
    # the report draws and gives intervals only for the methods the summary compares, and says so
    drawn = {p.name for p in (out / "fashion6" / "plots").glob("scores_*.png")}
    assert 1 <= len(drawn) <= 6 < len(methods)
    report = (out / "fashion6" / "report.md").read_text()
    shipped = pick(res, among="all").key  # the report's "Ship it" recommendation has its plot
    assert f"{shipped}**: [ROC curves" in report
    assert f"Intervals and plots for {len(drawn)} of the {len(methods)} methods" in report
    # beside SSOD and OE, the no-outlier recipe the benchmark's protocol picks (T2FNorm), a forged-side candidate
    assert set(res["models"]) == {"plain", "ssod", "oe", "t2fnorm"}
    assert "knn@t2fnorm" in methods and is_forged("knn@t2fnorm")
    # the protocol's validation numbers exist for every method; no test set is read to choose
    assert set(res["validation"]) == methods
    assert res["config"]["shift_synthesis"]["n"] == 1200  # one outlier per training image (K=1)
    on_disk = json.loads((out / "fashion6" / "results.json").read_text())
    assert on_disk["methods"] == res["methods"]
    assert (out / "fashion6" / "outliers_grid.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "| fashion6 | near |" in summary and "| fashion6 | far |" in summary
    # one pick per suite, made on validation numbers (the held-out forgers), shown on near and on far, and
    # recorded in summary.json as the detector a user would ship
    assert {f for v in res["validation_heldout_by_forger"].values() for f in v} == {"jigsaw", "mix"}
    chosen = pick(res)
    assert chosen is not None and is_forged(chosen.key)
    saved = json.loads((out / "summary.json").read_text())["fashion6"]
    assert saved["pick"] == chosen.key and saved["methods"] == res["methods"]
    for group in ("near", "far"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| fashion6 | {group} |"))
        assert f"| **{chosen.key}: " in row and saved["best_post_hoc"][group] in row
        # the recipe column names the backbone the run trained (its recorded benchmark label)
        assert f"/ {100 * res['models']['t2fnorm']['id_accuracy']:.2f} (t2fnorm-e10) |" in row
        # a win only when the paired bootstrap interval of the difference excludes zero
        c = saved["vs_best_post_hoc"][group]
        assert c["low"] <= c["difference"] <= c["high"] and c["verdict"] in row
        assert (c["verdict"] == "no significant difference") == (c["low"] <= 0 <= c["high"])
    # the SHIFT rejection network, trained only on forged outliers, separates far-OOD sets
    far = res["groups"]["far"]
    assert sum(res["methods"]["shift[layercam+telea]"][s]["auroc"] for s in far) / len(far) > 0.8
    assert "shift[layercam+telea]:" in summary
    assert any("demo finished" in line for line in lines)
    assert "without odin" in summary and "`oodforge demo --full`" in summary
    # a run summarised again later names the recipe it recorded, not the one DEMO_RECIPES holds by then
    res["models"]["t2fnorm"]["recipe"] = "t2fnorm-e5"
    write_summary({"fashion6": res}, out)
    assert "(t2fnorm-e5) |" in (out / "summary.md").read_text()



def test_a_recipe_backbone_trains_as_its_benchmark_label_says(monkeypatch):
    """Without the zoo, the demo's recipe backbone is trained as the benchmark's picked label: fine-tuned from the
    plain classifier for ``finetune_epochs`` (``t2fnorm-e10``), or from scratch on the plain classifier's recorded
    plan (``t2fnorm-scratch``, ``ascood-scratch``: its epochs and schedule, no ``init_from``)."""
    from types import SimpleNamespace

    import oodforge.demo as demo

    plans = []
    monkeypatch.setattr(demo, "get_model", lambda suite, plan, **kw: plans.append(plan) or (None, {}))
    pinfo = {"checkpoint": "zoo/scenes-plain", "plan": {"method": "plain", "epochs": 12, "seed": 0, "lr": None}}
    for name in ("scenes", "fashion6"):
        recipe = demo.demo_recipe(name)
        demo._second_model(SimpleNamespace(name=name), recipe.method, pinfo, recipe.finetune_epochs, 1, "cpu",
                           False, None, False)
    scratch, finetune = plans
    assert (scratch.method, scratch.epochs, scratch.seed, scratch.init_from) == ("t2fnorm", 12, 1, None)
    config = scratch.train_config()  # the plain classifier's optimiser and schedule: its own plan
    assert (config.lr, config.schedule) == (0.05, "onecycle")
    assert (finetune.method, finetune.epochs, finetune.init_from) == ("t2fnorm", 10, "zoo/scenes-plain")
    assert finetune.train_config().lr == 0.01  # the recipe fine-tune's (workflows.RECIPE_FINETUNE)
    assert demo.demo_recipe("my-suite.toml") == demo.DEFAULT_DEMO_RECIPE
