"""The model zoo: every checkpoint matches its recorded sha256 and, re-measured on its suite's
test set, its recorded ID accuracy; the workflows pick it up for the default recipe only."""

from __future__ import annotations

import json
import os

import pytest

from oodforge import zoo
from oodforge.data.suites import load_suite
from oodforge.demo import demo_recipe
from oodforge.models.train import accuracy
from oodforge.workflows import TrainPlan, zoo_checkpoint

HAVE_FASHION = os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
ENTRIES = sorted(zoo.manifest())


def suite_methods(suite: str) -> tuple[str, ...]:
    """What the zoo holds per suite: plain, SSOD, OE and the recipe backbone the demo runs there."""
    return ("plain", "ssod", "oe", demo_recipe(suite).method)


def test_the_zoo_has_every_model_the_demo_runs():
    for suite in ("fashion", "fashion6", "scenes", "clipart"):
        assert {n for n in ENTRIES if zoo.manifest()[n]["suite"] == suite} == \
            {zoo.entry_name(suite, m) for m in suite_methods(suite)}
    assert demo_recipe("clipart").method == "ascood" and demo_recipe("scenes").finetune_epochs is None
    for name in ENTRIES:
        rec = zoo.manifest()[name]
        assert rec["command"].startswith("oodforge train ") and f"--suite {rec['suite']}" in rec["command"]
        assert rec["seed"] == 0 and rec["train_seconds"] > 0 and len(rec["sha256"]) == 64


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("suite_name", ["fashion", "fashion6", "scenes"])  # clipart: below
def test_zoo_checkpoint_hash_and_accuracy(suite_name):
    """Every entry of the suite: its sha256, its training set, and its recorded accuracy on the first
    ``zoo.CHECK_IMAGES`` ID test images (the suite is loaded once for all its entries)."""
    suite = load_suite(suite_name)
    names = [n for n in ENTRIES if zoo.manifest()[n]["suite"] == suite_name]
    assert sorted(names) == sorted(zoo.entry_name(suite_name, m) for m in suite_methods(suite_name))
    for name in names:
        rec = zoo.verify(name)
        assert suite.id_train.identity == rec["train_set"]  # trained on the train split, not on val or test
        model, meta = zoo.load_zoo_model(rec["suite"], rec["method"])
        check = rec["check_accuracy"]
        assert check["images"] == zoo.CHECK_IMAGES
        assert zoo.check_accuracy_of(model, suite) == pytest.approx(check["accuracy"], abs=2e-3), name


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    name = ENTRIES[0]
    fake = tmp_path / "zoo"
    (fake / name).mkdir(parents=True)
    for f in ("meta.json",):
        (fake / name / f).write_bytes((zoo.ZOO_DIR / name / f).read_bytes())
    data = bytearray((zoo.ZOO_DIR / name / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (fake / name / "model.safetensors").write_bytes(bytes(data))
    (fake / "manifest.json").write_text(json.dumps({"entries": {name: zoo.manifest()[name]}}))
    monkeypatch.setattr(zoo, "ZOO_DIR", fake)
    monkeypatch.setattr(zoo, "MANIFEST", fake / "manifest.json")
    with pytest.raises(ValueError, match="changed or damaged"):
        zoo.verify(name)


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")
def test_zoo_serves_the_default_recipe_on_the_full_suite_only():
    full, quick = load_suite("fashion6"), load_suite("fashion6", quick=True)
    assert zoo_checkpoint(full, TrainPlan()) == zoo.ZOO_DIR / "fashion6-plain"
    assert zoo_checkpoint(full, TrainPlan(method="ssod")) == zoo.ZOO_DIR / "fashion6-ssod"
    assert zoo_checkpoint(full, TrainPlan(method="t2fnorm")) == zoo.ZOO_DIR / "fashion6-t2fnorm"
    assert zoo_checkpoint(full, TrainPlan(method="logitnorm")) is None  # a recipe the zoo has no model for
    assert zoo_checkpoint(quick, TrainPlan()) is None  # another training set
    assert zoo_checkpoint(full, TrainPlan(lr=0.1)) is None  # another recipe
    assert zoo_checkpoint(full, TrainPlan(seed=1)) is None
    assert zoo_checkpoint(full, TrainPlan(arch="resnet18")) is None  # another backbone


@pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/png"), reason="Debian's openclipart-png is not installed")
@pytest.mark.slow
def test_zoo_serves_clipart_with_its_pretrained_backbone_only():
    from oodforge.workflows import suite_backbone as backbone

    clipart = load_suite("clipart")  # built once here (about 35 s of rendering): hashes and accuracies too
    assert backbone("clipart") == {"arch": "efficientnet_lite0-finetune", "batch_size": 32}  # what the demo asks
    for method in suite_methods("clipart"):
        assert zoo_checkpoint(clipart, TrainPlan(method=method, **backbone("clipart"))) == \
            zoo.ZOO_DIR / f"clipart-{method}"
        rec = zoo.verify(f"clipart-{method}")
        assert clipart.id_train.identity == rec["train_set"]
        model, _ = zoo.load_zoo_model("clipart", method)
        assert accuracy(model, clipart.id_test) == pytest.approx(rec["id_test_accuracy"], abs=2e-3)
    assert zoo_checkpoint(clipart, TrainPlan()) is None  # small_resnet was not trained on clipart


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian's dataset-fashion-mnist is not installed")
def test_a_new_entry_is_checked_before_the_manifest_lists_it(tmp_path, monkeypatch):
    """scripts/build_zoo.sh runs ``check`` then ``manifest``: a freshly trained entry, not yet in the manifest,
    must get its accuracy check (it used to be refused as unknown), and the manifest then lists and verifies it."""
    import oodforge.data.suites as suites

    fake = tmp_path / "zoo"
    (fake / "fashion6-t2fnorm").mkdir(parents=True)
    for f in ("meta.json", "model.safetensors"):
        (fake / "fashion6-t2fnorm" / f).write_bytes((zoo.ZOO_DIR / "fashion6-t2fnorm" / f).read_bytes())
    monkeypatch.setattr(zoo, "ZOO_DIR", fake)
    monkeypatch.setattr(zoo, "MANIFEST", fake / "manifest.json")
    monkeypatch.setattr(zoo, "CHECK_IMAGES", 200)
    monkeypatch.setattr(suites, "load_suite", lambda name: load_suite(name, quick=True))  # 200 images are enough
    assert zoo.manifest() == {}
    checked = zoo.record_check_accuracies()
    assert set(checked) == {"fashion6-t2fnorm"} and checked["fashion6-t2fnorm"] > 0.9
    assert zoo.write_manifest()["fashion6-t2fnorm"]["check_accuracy"]["images"] == 200
    assert zoo.verify("fashion6-t2fnorm")["method"] == "t2fnorm"
