"""Stores of the procedural forgers (jigsaw, class mix) for outlier exposure: what each outlier is, resumption, and
the record that keeps the protocol from validating a backbone on the forger it trained on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from oodforge.data.base import ArrayDataset
from oodforge.outliers.heldout import average
from oodforge.outliers.procedural import forge_procedural, store_forgers
from oodforge.outliers.store import OutlierStore
from oodforge.protocol import trained_forgers, validation_numbers
from oodforge.workflows import TrainPlan, plan_forgers

HAVE_FASHION = os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _data(n: int = 24) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n) % 3, ["a", "b", "c"], f"toy/train/n{n}")


def _tiles(img: torch.Tensor, grid: int = 4) -> list[bytes]:
    c, h, w = img.shape
    t = img.reshape(c, grid, h // grid, grid, w // grid).permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)
    return sorted(row.numpy().tobytes() for row in t)


def test_jigsaw_store_holds_each_image_with_its_tiles_moved(tmp_path):
    data = _data()
    store = forge_procedural(data, "jigsaw", tmp_path / "s", seed=3)
    out, records = store.load(with_records=True)
    assert len(out) == len(data) and store.config["method"] == "jigsaw" and store.config["grid"] == 4
    for img, rec in zip(out.images, records):
        src = data.images[rec["source_index"]]
        assert _tiles(img) == _tiles(src)  # the same 16 tiles ...
        assert not torch.equal(img, src)  # ... in another order
        assert rec["label"] == int(data.labels[rec["source_index"]])


def test_mix_store_averages_each_image_with_one_of_another_class(tmp_path):
    data = _data()
    out, records = forge_procedural(data, "mix", tmp_path / "s", seed=1, limit=12).load(with_records=True)
    assert len(out) == 12
    for img, rec in zip(out.images, records):
        i = rec["source_index"]
        partners = [j for j in range(len(data)) if data.labels[j] != data.labels[i]
                    and torch.equal(average(data.images[i:i + 1], data.images[j:j + 1])[0], img)]
        assert partners, f"outlier {i} is no average of image {i} with an image of another class"


def test_a_killed_run_resumes_to_the_same_store(tmp_path):
    data = _data()
    whole = forge_procedural(data, "mix", tmp_path / "whole", seed=5).load().images
    forge_procedural(data, "mix", tmp_path / "part", seed=5, limit=7)  # "killed" after 7 images
    resumed, records = forge_procedural(data, "mix", tmp_path / "part", seed=5).load(with_records=True)
    order = np.argsort([r["source_index"] for r in records])
    assert torch.equal(resumed.images[order], whole)
    with pytest.raises(ValueError, match="two classes"):
        forge_procedural(ArrayDataset(data.images, torch.zeros(24, dtype=torch.long), ["a"], "toy/one"), "mix",
                         tmp_path / "one")
    with pytest.raises(ValueError, match="unknown procedural forger"):
        forge_procedural(data, "rotation", tmp_path / "rot")


def test_training_on_a_held_out_forgers_store_records_it(tmp_path):
    """OE on a jigsaw or mix store records that forger (SHIFT's and ASCOOD's kinds record none), so the
    protocol validates the backbone on the other held-out forgers only."""
    data = _data()
    forge_procedural(data, "mix", tmp_path / "mix")
    forge_procedural(data, "jigsaw", tmp_path / "jig")
    assert store_forgers(OutlierStore(tmp_path / "mix").config) == ["mix"]
    assert store_forgers({"method": "shift"}) == [] and store_forgers({"method": "ascood"}) == [] == store_forgers(None)
    assert plan_forgers(TrainPlan(method="oe", outliers=str(tmp_path / "jig")), {}) == ["jigsaw"]
    assert plan_forgers(TrainPlan(method="mixoe", outliers=str(tmp_path / "mix")),
                        {"mixoe_source": "classes"}) == ["mix"]  # the recipe's and the store's, once
    res = {"models": {"oe": {"forgers": ["jigsaw"]}},
           "validation_heldout_by_forger": {"knn@oe": {"jigsaw": {"auroc": 0.99, "fpr95": 0.01},
                                                       "mix": {"auroc": 0.70, "fpr95": 0.60}},
                                            "knn": {"jigsaw": {"auroc": 0.90, "fpr95": 0.20},
                                                    "mix": {"auroc": 0.80, "fpr95": 0.40}}}}
    assert trained_forgers(res, "knn@oe") == {"jigsaw"}
    # one held-out forger it never saw is not enough for a number (protocol.MIN_UNSEEN_FORGERS)
    assert set(validation_numbers(res)) == {"knn"}


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")
def test_cli_forges_a_mix_store_and_oe_on_it_records_the_forger(tmp_path):
    from typer.testing import CliRunner

    from oodforge.cli import app
    from oodforge.zoo import ZOO_DIR

    run = CliRunner().invoke
    r = run(app, ["synth", "mix", "--data", "fashion6", "--quick", "--limit", "256", "--no-progress",
                  "--out", str(tmp_path / "mix")])
    assert r.exit_code == 0, r.output
    assert "256 mix outliers" in r.output and "--method oe --outliers" in r.output
    r = run(app, ["train", "--suite", "fashion6", "--quick", "--method", "oe", "--init-from",
                  str(ZOO_DIR / "fashion6-plain"), "--outliers", str(tmp_path / "mix"), "--epochs", "1",
                  "--out", str(tmp_path / "oe")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "oe" / "meta.json").read_text())["forgers"] == ["mix"]


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")
def test_cli_forges_ascood_and_jigsaw_stores(tmp_path):
    from typer.testing import CliRunner

    from oodforge.cli import app
    from oodforge.zoo import ZOO_DIR

    run = CliRunner().invoke
    r = run(app, ["synth", "ascood", "--data", "fashion6", "--quick", "--limit", "64", "--checkpoint",
                  str(ZOO_DIR / "fashion6-plain"), "--out", str(tmp_path / "ascood")])
    assert r.exit_code == 0, r.output
    store = OutlierStore(tmp_path / "ascood")
    assert len(store) == 64 and store.config["method"] == "ascood" and store_forgers(store.config) == []
    r = run(app, ["synth", "jigsaw", "--data", "fashion6", "--quick", "--limit", "64", "--no-progress",
                  "--out", str(tmp_path / "jig")])
    assert r.exit_code == 0 and "64 jigsaw outliers" in r.output, r.output
    # the same command again resumes: nothing is forged twice
    r = run(app, ["synth", "jigsaw", "--data", "fashion6", "--quick", "--limit", "64", "--no-progress",
                  "--out", str(tmp_path / "jig")])
    assert r.exit_code == 0 and len(OutlierStore(tmp_path / "jig")) == 64, r.output
