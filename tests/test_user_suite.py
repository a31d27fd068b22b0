"""A user's own data and model from the command line: image folders as ID train / test and OOD sets (by options
or a suite file, in memory or streamed from disk), the user's own ``nn.Module`` through ``--model``, and
``train`` / ``synth shift`` / ``bench`` on a suite file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oodforge.cli import main

CLASSES = ("disc", "square", "stripes")

USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's classifier, written without oodforge in mind."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, 3)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build():
    return Net()
'''


def _picture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An RGB image of ``kind`` on a noisy grey background, 36-48 px (so --image-size has work to do)."""
    s = int(rng.integers(36, 49))
    img = np.clip(rng.normal(110, 25, (s, s, 3)), 0, 255)
    yy, xx = np.mgrid[:s, :s]
    cy, cx, r = rng.integers(s // 3, 2 * s // 3, 2).tolist() + [int(rng.integers(s // 6, s // 3))]
    if kind == "disc":
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (230, 40, 40)
    elif kind == "square":
        img[(abs(yy - cy) < r) & (abs(xx - cx) < r)] = (40, 220, 60)
    elif kind == "stripes":
        img[(yy // 4) % 2 == 0] = (40, 60, 230)
    elif kind == "triangle":
        img[(yy > cy - r) & (abs(xx - cx) < (yy - cy + r) / 2)] = (240, 220, 30)
    else:  # noise
        img = rng.integers(0, 256, (s, s, 3))
    return img.astype(np.uint8)


def _write(folder, kind: str, n: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(_picture(kind, rng)).save(folder / f"{kind}{i:03d}.png")


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """ID train / test image folders (3 classes), two OOD folders (one with sub-folders), the user's module and
    its weights, trained here for a few seconds."""
    root = tmp_path_factory.mktemp("userdata")
    for k, cls in enumerate(CLASSES):
        _write(root / "train" / cls, cls, 40, 10 + k)
        _write(root / "test" / cls, cls, 12, 20 + k)
    _write(root / "noise", "noise", 30, 30)
    _write(root / "shapes" / "a", "triangle", 15, 31)
    _write(root / "shapes" / "b", "triangle", 15, 32)
    (root / "usernet.py").write_text(USER_MODULE)
    import importlib.util

    from safetensors.torch import save_file

    from oodforge.data.loaders import load_image_folder

    spec = importlib.util.spec_from_file_location("usernet_ref", root / "usernet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train = load_image_folder(root / "train", size=32)
    torch.manual_seed(0)
    net = mod.build()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x, y = (train.float_images() - 0.5) / 0.25, train.labels
    for _ in range(60):
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file(net.state_dict(), str(root / "w.safetensors"))
    (root / "suite.toml").write_text(
        'name = "shapes3"\nimage_size = 32\n\n[id]\ntrain = "train"\ntest = "test"\n\n'
        '[ood]\nnoise = "noise"\nshapes = "shapes"\n\n[groups]\nnear = ["shapes"]\n')
    (root / "streamed.toml").write_text((root / "suite.toml").read_text().replace("image_size = 32",
                                                                                "image_size = 32\nstream = true"))
    return root


def _run(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr()


USER_MODEL = ["--model", "usernet:build", "--weights", "w.safetensors", "--head", "classifier", "--features",
              "features", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


def test_bench_on_users_folders_and_users_model(user_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(user_data)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc, cap = _run(["bench", "--id-train", "train", "--id-test", "test", "--ood", "noise=noise", "--ood",
                    "shapes=shapes", "--near", "shapes", "--image-size", "32", *USER_MODEL,
                    "--methods", "msp,energy,knn:k=5,vim", "--out", str(out)], capsys)
    assert rc == 0, cap.err[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["groups"] == {"near": ["shapes"], "far": ["noise"]}
    assert set(res["methods"]) == {"msp@user", "energy@user", "knn:k=5@user", "vim@user"}
    assert res["id_accuracy"] > 0.9  # the user's trained model, evaluated on the user's test folder
    assert res["methods"]["knn:k=5@user"]["noise"]["auroc"] > 0.9
    scores = np.load(out / "scores.npz")
    assert scores["msp@user/id"].shape == (36,) and scores["msp@user/shapes"].shape == (30,)
    assert (out / "report.md").is_file()

    # the same suite from a file, streamed from disk: the same scores, bit for bit
    out2 = tmp_path / "out2"
    rc, cap = _run(["bench", "--suite", "streamed.toml", *USER_MODEL, "--methods", "msp,energy,knn:k=5,vim",
                    "--out", str(out2)], capsys)
    assert rc == 0, cap.err[-3000:]
    streamed = np.load(out2 / "scores.npz")
    assert set(streamed.files) == set(scores.files)
    for k in scores.files:
        np.testing.assert_array_equal(streamed[k], scores[k], err_msg=k)
    assert json.loads((out2 / "results.json").read_text())["suite"] == "shapes3"


def test_train_forge_and_bench_on_a_suite_file(user_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(user_data)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    ck, store = tmp_path / "ck", tmp_path / "store"
    rc, cap = _run(["train", "--suite", "suite.toml", "--epochs", "2", "--out", str(ck)], capsys)
    assert rc == 0, cap.err[-3000:]
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["class_names"] == list(CLASSES) and meta["input_shape"] == [3, 32, 32]
    rc, cap = _run(["synth", "shift", "--data", "suite.toml", "--masker", "layercam", "--inpainter", "telea", "--checkpoint", str(ck),
                    "--limit", "30", "--out", str(store), "--no-progress"], capsys)
    assert rc == 0, cap.err[-3000:]
    rc, cap = _run(["bench", "--suite", "suite.toml", "--checkpoint", str(ck), "--outliers", str(store),
                    "--methods", "msp,shift", "--out", str(tmp_path / "b")], capsys)
    assert rc == 0, cap.err[-3000:]
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert {m.split("@")[0].split("[")[0] for m in res["methods"]} == {"msp", "shift"}
    assert set(next(iter(res["methods"].values()))) >= {"noise", "shapes"}
    # synth shift also takes a plain image folder as --data
    rc, cap = _run(["synth", "shift", "--data", "train", "--masker", "layercam", "--inpainter", "telea", "--checkpoint", str(ck),
                    "--image-size", "32", "--limit", "6", "--out", str(tmp_path / "store2"), "--no-progress"], capsys)
    assert rc == 0, cap.err[-3000:]


def test_users_model_makes_cam_masks_and_ships_as_a_guard(user_data, tmp_path, monkeypatch, capsys):
    """--model in synth shift (Layer-CAM masks of the user's network) and in export: the guard saves the user's
    weights with how to build the module again, and predict restores it and gives the same decisions."""
    monkeypatch.chdir(user_data)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    store, guard = tmp_path / "store", tmp_path / "guard.oodf"
    rc, cap = _run(["synth", "shift", "--data", "suite.toml", "--masker", "layercam", "--inpainter", "telea",
                    *USER_MODEL, "--limit", "20", "--out", str(store), "--no-progress"], capsys)
    assert rc == 0, cap.err[-3000:]
    assert "user:usernet:build" in (store / "store.json").read_text()  # the masks' model is in the config
    from oodforge.outliers.store import OutlierStore

    forged = OutlierStore(store).load()
    assert len(forged) == 20 and forged.images.shape[1:] == (3, 32, 32)
    # a tiny suite: 90 % is the highest target its few ID val images give a split-conformal guarantee for
    rc, cap = _run(["export", "--suite", "suite.toml", "--method", "vim", *USER_MODEL, "--onnx", "--target", "0.9",
                    "--out", str(guard)],
                   capsys)
    assert rc == 0, cap.err[-3000:]
    doc = json.loads((guard / "guard.json").read_text())
    assert doc["model"]["user_model"]["factory"] == "usernet:build"
    assert doc["provenance"]["user_model"] == "usernet:build"
    from oodforge.data.loaders import load_image_folder
    from oodforge.deploy.guard import GuardedClassifier
    from oodforge.models.wrap import load_user_model

    g = GuardedClassifier.load(guard)
    test = load_image_folder(user_data / "test", size=32)
    own = load_user_model("usernet:build", "w.safetensors", "classifier", "features", (0.5,) * 3, (0.25,) * 3,
                          (32, 32))
    with torch.no_grad():
        np.testing.assert_allclose(g.model(test.float_images()).numpy(), own(test.float_images()).numpy(),
                                   rtol=1e-5, atol=1e-5)
    rc, cap = _run(["predict", str(guard), "test", "noise", "--json"], capsys)
    assert rc == 0, cap.err[-3000:]
    rows = [json.loads(ln) for ln in cap.out.splitlines() if ln.startswith("{")]
    images, summary = rows[:-1], rows[-1]["summary"]
    assert len(images) == summary["images"] == 36 + 30
    # at the 95 % target, the user's trained net accepts most of its ID test images and abstains on most noise
    accepted = {"test": 0, "noise": 0}
    for r in images:
        accepted[r["file"].split("/")[0]] += r["accepted"]
    assert accepted["test"] >= 30 and accepted["noise"] <= 10, accepted
    # --checkpoint and --model together, or --weights alone, fail before anything is loaded
    rc, cap = _run(["synth", "shift", "--data", "suite.toml", "--masker", "layercam", "--inpainter", "telea",
                    "--weights", "w.safetensors", "--out", str(tmp_path / "never")], capsys)
    assert rc == 2 and "give --model too" in cap.err, cap.err
    assert not (tmp_path / "never").exists()
    rc, cap = _run(["synth", "shift", "--data", "suite.toml", "--masker", "layercam", "--inpainter", "telea",
                    "--model", "no_such_module:build", "--out", str(tmp_path / "never")], capsys)
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "cannot import 'no_such_module'" in lines[0], cap.err


@pytest.mark.parametrize("argv, fragment", [
    (["--id-train", "train", "--id-test", "test"], "no OOD sets"),
    (["--id-train", "train", "--id-test", "test", "--ood", "noise"], "write NAME=PATH"),
    (["--id-train", "train", "--id-test", "test", "--ood", "noise=nowhere"], "nowhere does not exist"),
    (["--id-train", "train", "--id-test", "test", "--ood", "noise=noise", "--near", "cifar"], "'cifar'"),
    (["--id-train", "train", "--ood", "noise=noise"], "--id-test"),
    (["--id-train", "noise", "--id-test", "test", "--ood", "n=noise", "--image-size", "32"], "no class labels"),
    (["--id-train", "train", "--id-test", "shapes", "--ood", "n=noise", "--image-size", "32"], "ID test classes"),
    (["--suite", "missing.toml"], "missing.toml does not exist"),
    (["--suite", "broken.toml"], "not valid TOML"),
    (["--suite", "nokeys.toml"], "needs an [id] table"),
    (["--near", "x"], "--near, --image-size and --stream describe"),
])
def test_bad_user_suites_fail_first_with_one_line(user_data, tmp_path, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(user_data)
    (user_data / "broken.toml").write_text("name = [\n")
    (user_data / "nokeys.toml").write_text('[ood]\nnoise = "noise"\n')
    out = tmp_path / "never"
    rc, cap = _run(["bench", *argv, "--methods", "msp", "--out", str(out)], capsys)
    assert rc == 2, cap.err
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], cap.err
    assert not out.exists()


def test_streamed_folder_matches_the_in_memory_one_and_stays_lazy(user_data):
    from oodforge.data.loaders import load_image_folder
    from oodforge.data.streaming import FileDataset, stream_image_folder

    mem = load_image_folder(user_data / "train", size=32)
    st = stream_image_folder(user_data / "train", size=32, num_workers=2)
    assert isinstance(st, FileDataset) and st.image_shape == mem.image_shape and st.class_names == mem.class_names
    torch.testing.assert_close(st.labels, mem.labels)
    torch.testing.assert_close(torch.cat(list(st.batches(16))), mem.float_images())  # through 2 workers
    idx = torch.tensor([5, 0, 77])
    torch.testing.assert_close(st.images[idx], mem.images[idx])
    sub = st.subset([3, 4], identity_suffix="two")
    assert len(sub) == 2 and sub.identity.endswith("[two]")
    torch.testing.assert_close(sub.float_images(), mem.float_images()[3:5])
    # touching a file changes the identity (the feature-cache key) without reading pixels
    f = st.images.path(0)
    before = st.identity
    f.touch()
    import os

    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert stream_image_folder(user_data / "train", size=32).identity != before


def test_knn_warns_when_k_exceeds_a_class():
    """k = 50 on 36 images per class scored OOD above ID (AUROC 0.04 on this file's noise): a warning says so."""
    from oodforge.detectors import FitContext, create
    from oodforge.models.featureset import FeatureSet

    z = torch.randn(108, 8)
    feats = FeatureSet(torch.randn(108, 3), z, torch.arange(108) % 3)
    with pytest.warns(UserWarning, match="k=50 exceeds the 36 ID training vectors"):
        create("knn").fit(FitContext(model=None, train=feats))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create("knn", k=5).fit(FitContext(model=None, train=feats))
