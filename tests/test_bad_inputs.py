"""The bad-input matrix: every input a user can get wrong gets one ``error:`` line naming the option or file,
exit code 2, no output folder and no results table, before any training or feature extraction.

Each case runs the real command line in-process (``oodforge.cli.main``). Cases that pass the cheap checks
would train or extract features, so a case that fails late shows up as a slow test and a wrong message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodforge.cli import main
from oodforge.outliers.store import OutlierStore

ZOO = Path(__file__).resolve().parents[1] / "src" / "oodforge" / "zoo"
FASHION_NAMES = json.loads((ZOO / "fashion-plain" / "meta.json").read_text())["class_names"]


def _store(root: Path, shape, dataset: str, names, n: int = 4) -> Path:
    store = OutlierStore(root, {"method": "test", "image_shape": list(shape), "dataset": dataset, "class_names": names})
    with store.writer():
        store.add_shard(np.zeros((n, *shape), np.uint8), [{"source_index": i, "k": 0, "seed": i, "label": 0} for i in range(n)])
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """Files a user might hand oodforge by mistake."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (d / "two_classes" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(d / "two_classes" / cls / f"{i}.png")
    (d / "empty_class" / "a").mkdir(parents=True)
    (d / "empty_class" / "b").mkdir()
    shutil.copy(d / "two_classes" / "a" / "0.png", d / "empty_class" / "a" / "0.png")
    (d / "corrupt_image" / "a").mkdir(parents=True)
    (d / "corrupt_image" / "a" / "0.png").write_bytes(b"\x89PNG not really")
    np.savez(d / "labels7.npz", images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.array([0, 1, 7, 2]))
    np.savez(d / "one_class.npz", images=np.zeros((4, 28, 28, 1), np.uint8), labels=np.zeros(4, np.int64))
    np.savez(d / "no_images_key.npz", pixels=np.zeros((4, 28, 28), np.uint8))
    for name, weights, meta_edit in (("ck_corrupt", b"xx" * 10, {}), ("ck_arch", None, {"arch": "resnet18"}),
                                     ("ck_badjson", None, None)):
        ck = d / name
        ck.mkdir()
        if weights is not None:
            (ck / "model.safetensors").write_bytes(weights)
        else:
            shutil.copy(ZOO / "fashion-plain" / "model.safetensors", ck / "model.safetensors")
        meta = json.loads((ZOO / "fashion-plain" / "meta.json").read_text())
        (ck / "meta.json").write_text("{not json" if meta_edit is None else json.dumps({**meta, **meta_edit}))
    (d / "ck_no_weights").mkdir()
    shutil.copy(ZOO / "fashion-plain" / "meta.json", d / "ck_no_weights" / "meta.json")
    (d / "store_badjson").mkdir()
    (d / "store_badjson" / "store.json").write_text("{nope")
    (d / "not_a_store").mkdir()
    _store(d / "store_scenes", (3, 32, 32), "scenes/train/seed0/n20000[train-minus-val:n2000:seed0]", FASHION_NAMES)
    _store(d / "store_fashion_train", (1, 28, 28), "fashion-mnist/train[train-minus-val:n5000:seed0]", FASHION_NAMES)
    _store(d / "store_fashion_val", (1, 28, 28), "fashion-mnist/train[val:n5000:seed0]", FASHION_NAMES)
    _store(d / "store_other_classes", (1, 28, 28), "fashion-mnist/train[train-minus-val:n5000:seed0]",
           [f"c{i}" for i in range(10)])
    (d / "a_file").write_text("not a folder")
    # issue 23: a user's folder (never written into), one-class and same-as-test ID data, a huge image, a network
    # built for another channel count, suite files with a bad background / resize
    (d / "precious" / "sub").mkdir(parents=True)
    (d / "precious" / "sub" / "data.txt").write_text("x")
    for name in ("one_class", "one_class_test"):
        (d / name / "a").mkdir(parents=True)
        shutil.copy(d / "two_classes" / "a" / "0.png", d / name / "a" / "0.png")
    (d / "huge" / "a").mkdir(parents=True)
    Image.new("1", (11_000, 10_000)).save(d / "huge" / "a" / "0.png")  # 110 megapixels, a few kB on disk
    (d / "huge" / "b").mkdir()
    shutil.copy(d / "two_classes" / "a" / "0.png", d / "huge" / "b" / "0.png")
    (d / "rgbnet.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), "
                                 "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n")
    for name, line in (("bad_background", 'background = "transparent-ish"'), ("bad_resize", 'resize = "squash"'),
                       ("same_train_test", None)):
        test = "two_classes" if name == "same_train_test" else "one_class_test"
        (d / f"{name}.toml").write_text((line or "") + f'\n[id]\ntrain = "two_classes"\ntest = "{test}"\n\n'
                                        '[ood]\nn = "two_classes/a"\n')
    return d


F, F6, SC = (str(ZOO / f"{s}-plain") for s in ("fashion", "fashion6", "scenes"))
BENCH = ["bench", "--suite", "fashion", "--quick", "--checkpoint", F]
SHIFT = ["synth", "shift", "--masker", "layercam", "--inpainter", "telea", "--checkpoint", F]
TRAIN = ["train", "--suite", "fashion", "--quick"]

# (case id, argv with {d} = the bad-files folder, a fragment the one error line must contain)
MATRIX = [
    # options and method specs
    ("unknown-suite", ["bench", "--suite", "nosuch", "--out", "{out}"], "--suite"),
    ("unknown-option", BENCH + ["--bogus", "--out", "{out}"], "--bogus"),
    ("missing-out", ["bench", "--suite", "fashion"], "--out"),
    ("unknown-detector", BENCH + ["--methods", "nosuch", "--out", "{out}"], "unknown detector 'nosuch'"),
    ("param-type", BENCH + ["--methods", "knn:k=abc", "--out", "{out}"], "k must be an integer"),
    ("param-range", BENCH + ["--methods", "react:percentile=150", "--out", "{out}"], "percentile must be in (0, 100]"),
    ("param-unknown", BENCH + ["--methods", "knn:kk=3", "--out", "{out}"], "no parameter 'kk'"),
    ("param-syntax", BENCH + ["--methods", "knn:k", "--out", "{out}"], "key=value"),
    ("param-float-range", BENCH + ["--methods", "msp:temperature=0", "--out", "{out}"], "temperature"),
    ("shift-without-store", BENCH + ["--methods", "shift", "--out", "{out}"], "--outliers"),
    ("out-is-file", BENCH + ["--methods", "msp", "--out", "{d}/a_file"], "--out"),
    ("device-cuda-missing", BENCH + ["--methods", "msp", "--device", "cuda:7", "--out", "{out}"], "--device"),
    ("device-unknown", BENCH + ["--methods", "msp", "--device", "tpu", "--out", "{out}"], "--device"),
    # checkpoints
    ("checkpoint-missing", ["bench", "--suite", "fashion", "--quick", "--checkpoint", "{d}/nope", "--out", "{out}"],
     "no such folder"),
    ("checkpoint-no-weights", ["bench", "--suite", "fashion", "--quick", "--checkpoint", "{d}/ck_no_weights",
                               "--out", "{out}"], "model.safetensors"),
    ("checkpoint-corrupt", ["bench", "--suite", "fashion", "--quick", "--checkpoint", "{d}/ck_corrupt",
                            "--out", "{out}"], "truncated or corrupt"),
    ("checkpoint-architecture", ["bench", "--suite", "fashion", "--quick", "--checkpoint", "{d}/ck_arch",
                                 "--out", "{out}"], "does not match architecture"),
    ("checkpoint-bad-json", ["bench", "--suite", "fashion", "--quick", "--checkpoint", "{d}/ck_badjson",
                             "--out", "{out}"], "not valid JSON"),
    ("checkpoint-other-channels", ["bench", "--suite", "fashion", "--quick", "--checkpoint", SC, "--out", "{out}"],
     "channels"),
    ("checkpoint-other-classes", ["bench", "--suite", "fashion", "--quick", "--checkpoint", F6, "--out", "{out}"],
     "classes"),
    # outlier stores
    ("store-bad-json", BENCH + ["--methods", "shift", "--outliers", "{d}/store_badjson", "--out", "{out}"],
     "store.json is not valid JSON"),
    ("store-not-a-store", BENCH + ["--methods", "shift", "--outliers", "{d}/not_a_store", "--out", "{out}"],
     "not an outlier store"),
    ("store-other-shape", BENCH + ["--methods", "shift", "--outliers", "{d}/store_scenes", "--out", "{out}"],
     "3x32x32"),
    ("store-other-classes", BENCH + ["--methods", "shift", "--outliers", "{d}/store_other_classes", "--out", "{out}"],
     "classes"),
    ("store-val-as-train", BENCH + ["--methods", "shift", "--outliers", "{d}/store_fashion_val", "--out", "{out}"],
     "validation split"),
    ("store-train-as-val", BENCH + ["--methods", "msp", "--val-outliers", "{d}/store_fashion_train",
                                    "--out", "{out}"], "--split val"),
    ("model-not-importable", ["bench", "--suite", "fashion", "--quick", "--model", "no_such_module:build",
                              "--out", "{out}"], "cannot import"),
    ("model-bad-spec", ["bench", "--suite", "fashion", "--quick", "--model", "no_colon", "--out", "{out}"],
     "package.module:factory"),
    ("weights-without-model", BENCH + ["--weights", "{d}/a_file", "--out", "{out}"], "--model"),
    # training
    ("train-max-train-0", TRAIN + ["--max-train", "0", "--out", "{out}"], "--max-train"),
    ("train-epochs-0", TRAIN + ["--epochs", "0", "--out", "{out}"], "epochs"),
    ("train-unknown-method", TRAIN + ["--method", "nope", "--out", "{out}"], "unknown training method"),
    ("train-negative-lr", TRAIN + ["--lr", "-1", "--out", "{out}"], "lr"),
    ("train-oe-without-store", TRAIN + ["--method", "oe", "--init-from", F, "--out", "{out}"], "--outliers"),
    ("train-init-from-other-arch", TRAIN + ["--init-from", "{d}/ck_arch", "--out", "{out}"],
     "does not match architecture"),
    ("train-oe-foreign-store", TRAIN + ["--method", "oe", "--init-from", F, "--outliers", "{d}/store_scenes",
                                       "--out", "{out}"], "--allow-foreign-outliers"),
    ("train-out-is-file", TRAIN + ["--out", "{d}/a_file"], "--out"),
    ("train-paper-setting-plain", TRAIN + ["--paper-setting", "--out", "{out}"], "--paper-setting"),
    # forging from user data
    ("synth-data-missing", SHIFT + ["--data", "{d}/nope", "--out", "{out}"], "no such file or folder"),
    ("synth-empty-class-folder", SHIFT + ["--data", "{d}/empty_class", "--out", "{out}"], "class folder with no images"),
    ("synth-corrupt-image", SHIFT + ["--data", "{d}/corrupt_image", "--out", "{out}"], "not a readable image"),
    ("synth-npz-no-images", SHIFT + ["--data", "{d}/no_images_key.npz", "--out", "{out}"], "no_images_key.npz"),
    ("synth-labels-out-of-range", SHIFT[:-1] + [F6, "--data", "{d}/labels7.npz", "--out", "{out}"], "label 7"),
    ("synth-class-count", SHIFT + ["--data", "{d}/two_classes", "--out", "{out}"], "2 classes"),
    ("synth-checkpoint-other-suite", SHIFT[:-1] + [F6, "--data", "fashion", "--quick", "--out", "{out}"],
     "10 classes"),
    ("synth-channels", SHIFT + ["--data", "scenes", "--quick", "--out", "{out}"], "channel"),
    ("synth-unknown-masker", ["synth", "shift", "--data", "fashion", "--masker", "nope", "--out", "{out}"],
     "--masker"),
    ("synth-bad-shard", SHIFT + ["--data", "fashion", "--quick", "--shard", "3/2", "--out", "{out}"], "--shard"),
    ("synth-k-0", SHIFT + ["--data", "fashion", "--quick", "--k", "0", "--out", "{out}"], "--k"),
    ("synth-layercam-without-checkpoint", ["synth", "shift", "--data", "fashion", "--masker", "layercam",
                                           "--inpainter", "telea", "--out", "{out}"], "--checkpoint"),
    # the procedural and ASCOOD forgers (issue 28: outlier exposure on any forger's store)
    ("synth-mix-limit-0", ["synth", "mix", "--data", "fashion", "--quick", "--limit", "0", "--out", "{out}"],
     "--limit"),
    ("synth-mix-one-class", ["synth", "mix", "--data", "{d}/one_class.npz", "--out", "{out}"], "two classes"),
    ("synth-jigsaw-grid-0", ["synth", "jigsaw", "--data", "fashion", "--quick", "--grid", "0", "--out", "{out}"],
     "--grid"),
    ("synth-jigsaw-users-folder", ["synth", "jigsaw", "--data", "fashion", "--quick", "--out", "{d}/precious"],
     "oodforge did not write"),
    ("synth-ascood-no-checkpoint", ["synth", "ascood", "--data", "fashion", "--quick", "--checkpoint", "{d}/nope",
                                    "--out", "{out}"], "--checkpoint"),
    ("synth-ascood-bad-p", ["synth", "ascood", "--data", "fashion", "--quick", "--checkpoint", F, "--p", "1.5",
                            "--out", "{out}"], "--p"),
    ("demo-unknown-suite", ["demo", "--suites", "fashion,nope", "--out", "{out}"], "--suites"),
    ("demo-out-is-file", ["demo", "--quick", "--out", "{d}/a_file"], "--out"),
    ("demo-forge-limit-0", ["demo", "--quick", "--forge-limit", "0", "--out", "{out}"], "--forge-limit"),
    # deployment
    ("predict-missing-guard", ["predict", "{d}/nope.oodf", "{d}/two_classes"], "nope.oodf"),
    ("export-target-range", ["export", "--suite", "fashion", "--method", "msp", "--target", "1.5", "--quick",
                             "--out", "{out}"], "--target"),
    ("export-param-type", ["export", "--suite", "fashion", "--method", "knn:k=abc", "--quick", "--out", "{out}"],
     "k must be an integer"),
    ("export-out-is-file", ["export", "--suite", "fashion", "--method", "msp", "--quick", "--out", "{d}/a_file"],
     "--out"),
    ("export-result-key", ["export", "--suite", "fashion", "--method", "shift[layercam+telea]", "--quick", "--out",
                           "{out}"], "give the method spec 'shift'"),
    # issue 23: methods that name nothing
    ("methods-comma", BENCH + ["--methods", ",", "--out", "{out}"], "--methods ',' names no method"),
    ("methods-empty", BENCH + ["--methods", "", "--out", "{out}"], "--methods '' names no method"),
    ("methods-blank", BENCH + ["--methods", " , ", "--out", "{out}"], "names no method"),
    # --out: a user's folder is never written into, an uncreatable one is refused up front
    ("bench-out-users-folder", BENCH + ["--methods", "msp", "--out", "{d}/precious"], "oodforge did not write (sub)"),
    ("export-out-users-folder", ["export", "--suite", "fashion", "--method", "msp", "--quick", "--out", "{d}/precious"],
     "oodforge did not write"),
    ("train-out-users-folder", TRAIN + ["--out", "{d}/precious"], "oodforge did not write"),
    ("synth-out-users-folder", SHIFT + ["--data", "fashion", "--quick", "--out", "{d}/precious"],
     "oodforge did not write"),
    ("demo-out-users-folder", ["demo", "--quick", "--out", "{d}/precious"], "oodforge did not write"),
    ("example-out-users-folder", ["suites", "--example", "{d}/precious"], "oodforge did not write"),
    ("bench-out-proc", BENCH + ["--methods", "msp", "--out", "/proc/oodforge-x"], "cannot create or write"),
    ("export-out-proc", ["export", "--suite", "fashion", "--method", "msp", "--quick", "--out", "/proc/oodforge-x"],
     "cannot create or write"),
    ("train-out-proc", TRAIN + ["--out", "/proc/oodforge-x/ck"], "cannot create or write"),
    # users' suites that cannot be benchmarked
    ("one-class-id", ["bench", "--id-train", "{d}/one_class", "--id-test", "{d}/one_class_test", "--ood",
                      "n={d}/two_classes/a", "--out", "{out}"], "has one class ('a')"),
    ("id-train-is-id-test", ["bench", "--id-train", "{d}/two_classes", "--id-test", "{d}/two_classes", "--ood",
                             "n={d}/one_class", "--out", "{out}"], "the ID test data is the ID training data"),
    ("suite-file-train-is-test", ["bench", "--suite", "{d}/same_train_test.toml", "--out", "{out}"],
     "the ID test data is the ID training data"),
    ("suite-file-bad-background", ["bench", "--suite", "{d}/bad_background.toml", "--out", "{out}"],
     "background must be a colour"),
    ("suite-file-bad-resize", ["bench", "--suite", "{d}/bad_resize.toml", "--out", "{out}"],
     "resize must be one of crop, letterbox, stretch"),
    ("image-size-with-suite-name", BENCH + ["--image-size", "32", "--out", "{out}"], "--image-size"),
    # crashes that are now one line
    ("pixel-limit", SHIFT[:-1] + [F6, "--data", "{d}/huge", "--out", "{out}"], "OODFORGE_MAX_PIXELS=110000000"),
    ("model-other-channels", ["bench", "--suite", "fashion", "--quick", "--model", "rgbnet:build", "--head", "3",
                              "--features", "0", "--methods", "msp", "--out", "{out}"],
     "cannot take the suite's images (1x28x28, 1 channel)"),
    ("export-model-other-channels", ["export", "--suite", "fashion", "--quick", "--model", "rgbnet:build", "--head", "3",
                                     "--features", "0", "--method", "msp", "--target", "0.9", "--out", "{out}"],
     "cannot take the suite's images"),
    ("predict-device-cuda", ["predict", "{d}/nope.oodf", "{d}/two_classes", "--device", "cuda"], "--device cuda"),
    ("export-device-cuda", ["export", "--suite", "fashion", "--method", "msp", "--quick", "--device", "cuda:3",
                            "--out", "{out}"], "--device"),
]


@pytest.mark.parametrize("argv,fragment", [pytest.param(a, f, id=i) for i, a, f in MATRIX])
def test_bad_input_gets_one_clear_line(argv, fragment, bad, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(bad))  # the user modules of --model
    out = tmp_path / "out"
    args = [a.format(d=bad, out=out) for a in argv]
    rc = main(args)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert rc == 2, (rc, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-2000:]
    assert fragment in lines[0], lines[0]
    assert not out.exists(), f"partial output left in {out}"
    assert "AUROC" not in captured.out and "auroc" not in captured.out  # no results table
    # nothing written into, nothing deleted from the user's folder
    assert sorted(str(p.relative_to(bad / "precious")) for p in (bad / "precious").rglob("*")) == ["sub", "sub/data.txt"]
    assert (bad / "precious" / "sub" / "data.txt").read_text() == "x"


def test_the_matrix_is_large_enough():
    assert len(MATRIX) >= 80 and len({i for i, _, _ in MATRIX}) == len(MATRIX)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from oodforge.data.loaders import load_image_folder

    (tmp_path / "a").mkdir()
    values = np.tile(np.array([[0, 257, 32896, 65535]], dtype=np.uint16), (4, 1))
    Image.fromarray(values).save(tmp_path / "a" / "0.png")
    ds = load_image_folder(tmp_path)
    assert ds.images[0, 0, 0].tolist() == [0, 1, 128, 255]


def test_debug_variable_shows_the_traceback(bad, tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_DEBUG", "1")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        main(["bench", "--suite", "fashion", "--quick", "--checkpoint", str(bad / "ck_corrupt"),
              "--out", str(tmp_path / "o")])
