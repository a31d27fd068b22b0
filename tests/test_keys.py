"""Result keys (oodforge.keys): a method trained on outliers names their forger when it is not its paper's."""

from __future__ import annotations

import numpy as np
import pytest

from oodforge.keys import detector_name, method_key, outlier_source, split_key
from oodforge.outliers.store import OutlierStore

CPU = {"method": "shift", "masker": {"name": "layercam", "threshold": 0.2}, "inpainter": {"name": "telea", "radius": 3}}
PAPER = {"method": "shift", "masker": {"name": "clipseg"}, "inpainter": {"name": "sd", "steps": 50}}
SYNOOD = {"method": "synood", "strength": 0.6}


def test_outlier_source_from_the_store_config():
    assert outlier_source(CPU) == "layercam+telea"
    assert outlier_source(PAPER) == "clipseg+sd"
    assert outlier_source(SYNOOD) == "synood"
    assert outlier_source(None) is None and outlier_source({}) is None


@pytest.mark.parametrize("spec, label, config, key", [
    ("shift", "", CPU, "shift[layercam+telea]"),
    ("shift", "", PAPER, "shift"),  # the paper's forger: the plain key
    ("shift", "", None, "shift"),  # outliers made in Python: no known source
    ("shift", "oe", CPU, "shift[layercam+telea]@oe"),
    ("shift:input=feature_map", "k1", CPU, "shift:input=feature_map[layercam+telea]@k1"),
    ("shift", "", SYNOOD, "shift[synood]"),
    ("synood:num_neg=10", "", SYNOOD, "synood:num_neg=10"),
    ("synood", "", CPU, "synood[layercam+telea]"),
    ("fusion:a=shift,b=knn", "", CPU, "fusion:a=shift,b=knn[layercam+telea]"),
    ("fusion:a=shift,b=knn", "", PAPER, "fusion:a=shift,b=knn"),
    ("fusion", "", PAPER, "fusion"),  # the defaults a=shift, b=knn
    ("fusion:a=msp,b=knn", "", PAPER, "fusion:a=msp,b=knn[clipseg+sd]"),  # no part with a paper forger
])
def test_method_key_and_split_key_round_trip(spec, label, config, key):
    source = outlier_source(config)
    assert method_key(spec, label, source) == key
    got_spec, got_source, got_label = split_key(key)
    assert (got_spec, got_label) == (spec, label)
    assert got_source == (None if key.split("@")[0] == spec else source)
    assert detector_name(key) == spec.split(":")[0]


def test_methods_without_outliers_keep_their_key():
    assert method_key("knn:k=10", "ssod") == "knn:k=10@ssod" and split_key("knn:k=10@ssod") == ("knn:k=10", None, "ssod")
    assert split_key("msp") == ("msp", None, "")


def test_a_loaded_store_carries_its_config(tmp_path):
    store = OutlierStore(tmp_path / "s", {**CPU, "image_shape": [1, 4, 4], "class_names": ["a"]})
    store.add_shard(np.zeros((2, 1, 4, 4), np.uint8), [{"source_index": i, "k": 0, "seed": i, "label": 0} for i in (0, 1)])
    ds = OutlierStore(tmp_path / "s").load()
    assert outlier_source(ds.store_config) == "layercam+telea"


def test_readers_of_results_take_the_source_apart():
    """The export hint asks for the method spec (export takes a spec) with the store; the demo summary finds
    ``shift`` and counts it (and anything on the OE backbone) as forged-outlier methods."""
    from oodforge.demo import plain_key
    from oodforge.protocol import is_forged
    from oodforge.report import best_method, export_hint

    per = {"far": {"auroc": 0.9, "fpr95": 0.1}}
    res = {"suite": "fashion", "groups": {"far": ["far"]}, "models": {"plain": {"outlier_store": "STORE_DIR"}},
           "methods": {"msp": {"far": {"auroc": 0.5, "fpr95": 0.9}}, "shift[layercam+telea]": per},
           "validation_heldout": {"msp": {"auroc": 0.6, "fpr95": 0.8},
                                  "shift[layercam+telea]": {"auroc": 0.7, "fpr95": 0.5}}}
    hint = "\n".join(export_hint(res))
    assert "--method shift --outliers STORE_DIR" in hint and "`shift[layercam+telea]`" in hint
    assert best_method(res, exclude=("shift",))[0] == "msp"
    assert plain_key(res, "shift") == "shift[layercam+telea]" and plain_key(res, "knn") is None
    assert is_forged("shift[layercam+telea]") and is_forged("shift[layercam+telea]@oe") and is_forged("energy@oe")
    # any detector on a backbone trained with forged outliers or SSOD's background samples counts as forged
    assert is_forged("energy@ssod") and is_forged("knn@energy-oe", backbones=("energy-oe",))
    assert not is_forged("msp") and not is_forged("energy@ssod", backbones=("oe",))


def test_plain_post_hoc_is_the_baseline_side_only():
    from oodforge.protocol import is_forged, is_plain_post_hoc

    assert is_plain_post_hoc("knn") and is_plain_post_hoc("vim")
    # detectors on a forged-outlier backbone, and the forged-outlier detectors themselves, are not baselines
    assert not any(is_plain_post_hoc(m) for m in ("knn@oe", "energy@ssod", "shift[layercam+telea]",
                                                  "fusion:a=shift,b=knn[layercam+telea]", "ssod"))
    assert not is_plain_post_hoc("knn@energy-oe", backbones=("energy-oe",))
    # a fusion is forged when one of its parts is (its defaults: a=shift, b=knn); of two post-hoc parts it is not
    assert is_plain_post_hoc("fusion:a=msp,b=knn") and not is_forged("fusion:a=msp,b=knn")
    assert is_forged("fusion") and is_forged("fusion:a=ssod,b=knn@ssod") and is_forged("fusion:a=msp,b=knn@oe")
    # backbones trained by the no-outlier recipes (oodforge.recipes) are on the forged side; a user's is not
    assert is_forged("energy@logitnorm") and is_forged("rotpred@rotpred+pixmix") and is_forged("knn@pixmix")
    assert not is_forged("energy@user") and is_plain_post_hoc("energy") and not is_plain_post_hoc("msp@user")


def test_the_console_table_shows_the_whole_result_key(capsys):
    """rich reads ``[layercam+telea]`` as markup unless the cell is escaped: the table must show the key the
    report and results.json use."""
    from oodforge.report import print_table

    per = {"far": {"auroc": 0.9, "fpr95": 0.1}}
    print_table({"suite": "toy", "groups": {"far": ["far"]}, "models": {},
                 "methods": {"shift[layercam+telea]": per, "fusion:a=shift,b=knn[layercam+telea]@oe": per}})
    out = capsys.readouterr().out
    assert "shift[layercam+telea]" in out and "knn[layercam+telea]@oe" in out
