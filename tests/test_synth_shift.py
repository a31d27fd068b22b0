"""SHIFT synthesis: inpainters, forge_shift end to end (tiny CLIPSeg + tiny SD from folders), determinism,
sharding + merge, and the kill-and-resume guarantee of the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from synth_tiny import save_tiny_clipseg, save_tiny_sd_inpaint

from oodforge.data.base import ArrayDataset
from oodforge.hub import ModelUnavailableError
from oodforge.outliers.store import OutlierStore, StoreError, merge_stores, outlier_seed
from oodforge.synth.grid import save_outlier_grid
from oodforge.synth.inpaint import jitter_mask
from oodforge.synth.shift import forge_shift, make_inpainter, make_masker

NAMES = ["shirt", "bag", "shoe"]


def square_images(n, c, size, seed=0):
    """A bright square (the 'object') on a smooth dark background, at a random place."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    imgs = np.empty((n, c, size, size), np.uint8)
    for i in range(n):
        bg = 40 + 20 * np.sin(yy / 5.0 + i) + 20 * np.cos(xx / 7.0)
        img = np.repeat(bg[None], c, 0) + g.integers(-5, 6, (c, size, size))
        s = size // 3
        y0, x0 = g.integers(2, size - s - 2, 2)
        img[:, y0:y0 + s, x0:x0 + s] = 230
        imgs[i] = np.clip(img, 0, 255)
    return imgs


def square_mask(imgs):
    return torch.from_numpy(imgs[:, 0] >= 200)


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_cv2_inpainting_erases_the_object_and_keeps_the_rest(method):
    imgs = square_images(3, 1, 28)
    masks = square_mask(imgs)
    inp = make_inpainter(method)
    out = inp(torch.from_numpy(imgs), masks, seeds=[1, 2, 3], ks=[0, 0, 0])
    assert out.shape == imgs.shape and out.dtype == np.uint8
    keep = ~masks.numpy()[:, None]
    assert np.array_equal(out[keep], imgs[keep])  # k = 0: only the mask changes
    filled = out[:, 0][masks.numpy()].astype(float)
    assert filled.mean() < 110  # the 230-valued object is replaced by background-like values


def test_k_variants_of_deterministic_inpainters_differ_deterministically():
    imgs = torch.from_numpy(square_images(1, 3, 32)).repeat(4, 1, 1, 1)
    masks = square_mask(imgs.numpy())
    seeds = [outlier_seed(0, 0, k) for k in range(4)]
    for name in ("telea", "ns", "zero"):
        inp = make_inpainter(name)
        a = inp(imgs, masks, seeds, ks=[0, 1, 2, 3])
        b = inp(imgs, masks, seeds, ks=[0, 1, 2, 3])
        assert np.array_equal(a, b), name
        diffs = [np.abs(a[i].astype(int) - a[j].astype(int)).mean() for i in range(4) for j in range(i + 1, 4)]
        assert min(diffs) > 0.5, (name, diffs)  # every pair of variants differs visibly
    z = make_inpainter("zero")(imgs[:1], masks[:1], [0], [0])
    assert (z[0][:, masks[0].numpy()] == 0).all()
    assert np.array_equal(z[0][:, ~masks[0].numpy()], imgs[0].numpy()[:, ~masks[0].numpy()])
    m = masks[0].numpy()
    for s in range(5):  # jittered masks only grow: the object stays erased
        j = jitter_mask(m, np.random.default_rng(s))
        assert (j | m).sum() == j.sum() and j.sum() > m.sum()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_clipseg(root / "clipseg"), save_tiny_sd_inpaint(root / "sd")


def test_sd_inpainter_from_folder(tiny_models, monkeypatch, tmp_path):
    clip_dir, sd_dir = tiny_models
    inp = make_inpainter("sd", model=str(sd_dir), steps=2, size=32, batch_size=3)
    for c, size in ((1, 28), (3, 32)):
        imgs = torch.from_numpy(square_images(4, c, size))
        imgs[1] = imgs[3] = imgs[0]
        masks = square_mask(imgs.numpy())
        seeds = [5, 6, 8, 5]
        a = inp(imgs, masks, seeds=seeds, ks=[0, 1, 2, 0], class_names=NAMES)
        assert a.shape == (4, c, size, size) and a.dtype == np.uint8 and a.std() > 0
        b = inp(imgs, masks, seeds=seeds, ks=[0, 1, 2, 0], class_names=NAMES)
        assert np.array_equal(a, b)  # seeded
        assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 1.0  # same image, other seed: other outlier
        # an outlier depends on its image and seed only, not on its batch (item 3 ran in a batch of one)
        assert np.abs(a[0].astype(int) - a[3].astype(int)).max() <= 1
    assert inp.config()["negative_prompt"] is None and inp.config()["guidance_scale"] == 7.5
    with pytest.raises(ValueError, match="class_names"):
        inp(imgs[:1], masks[:1], [0], [0], None)
    with pytest.raises(ModelUnavailableError, match="--inpaint-model"):
        make_inpainter("sd", model=str(sd_dir / "nope")).load()
    ds = ArrayDataset(square_images(2, 1, 28), np.array([0, 1]), NAMES, "two")
    with pytest.raises(ModelUnavailableError, match="--inpaint-model"):  # ... and nothing is left behind
        forge_shift(ds, tmp_path / "never", make_masker("clipseg", model=str(clip_dir)),
                    make_inpainter("sd", model=str(sd_dir / "nope")), progress=False)
    assert not (tmp_path / "never").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="--inpaint-model"):
        make_inpainter("sd", model="nobody/no-such-inpainting").load()


def test_forge_shift_clipseg_sd_end_to_end(tiny_models, tmp_path):
    clip_dir, sd_dir = tiny_models
    ds = ArrayDataset(square_images(7, 1, 28, seed=3), np.array([0, 1, 2, 0, 1, 2, 0]), NAMES, "squares7")

    def run(out, **kw):
        m = make_masker("clipseg", model=str(clip_dir), threshold=0.5)
        inp = make_inpainter("sd", model=str(sd_dir), steps=2, size=32, batch_size=4)
        return forge_shift(ds, out, m, inp, k=2, seed=11, batch_size=3, progress=False, **kw)

    st = run(tmp_path / "a", limit=5)
    data, recs = st.load(with_records=True)
    skipped = {s["source_index"] for s in st.skipped()}
    expect = [(i, k) for i in range(5) if i not in skipped for k in range(2)]
    assert [(r["source_index"], r["k"]) for r in recs] == expect and len(expect) >= 6
    assert data.images.shape == (len(expect), 1, 28, 28)
    assert all(r["seed"] == outlier_seed(11, r["source_index"], r["k"]) for r in recs)
    assert all(0 < r["coverage"] <= 1 and r["label"] == ds.labels[r["source_index"]] for r in recs)
    assert [r["class"] for r in recs] == [NAMES[r["label"]] for r in recs]
    cfg = st.config
    assert cfg["masker"]["name"] == "clipseg" and cfg["masker"]["threshold"] == 0.5
    assert cfg["inpainter"]["name"] == "sd" and cfg["inpainter"]["steps"] == 2
    assert cfg["inpainter"]["model"] == str(sd_dir.resolve()) and cfg["class_names"] == NAMES
    # K outliers of one image differ; the run is deterministic given the seed
    assert not torch.equal(data.images[0], data.images[1])
    again = run(tmp_path / "b", limit=5).load()
    assert torch.equal(again.images, data.images)
    # re-running is a no-op; a larger limit only adds the new sources
    n_entries = len(st.entries())
    run(tmp_path / "a", limit=5)
    assert len(OutlierStore(tmp_path / "a").entries()) == n_entries
    ext = run(tmp_path / "a").load()
    assert torch.equal(ext.images[: len(data)], data.images) and len(ext) >= len(data)
    with pytest.raises(StoreError, match="seed"):
        forge_shift(ds, tmp_path / "a", make_masker("clipseg", model=str(clip_dir), threshold=0.5),
                    make_inpainter("sd", model=str(sd_dir), steps=2, size=32), k=2, seed=12, progress=False)
    png = save_outlier_grid(ds, ext, tmp_path / "grid.png")
    from PIL import Image

    w, h = Image.open(png).size
    assert h > 64 * 5 and w > 64 * 3


def test_min_coverage_skips_sources_and_sharding_merges_to_the_unsharded_store(tmp_path):
    from oodforge.models import build_model

    net = build_model("small_resnet", 3, 3).eval()
    ds = ArrayDataset(square_images(11, 3, 32, seed=5), np.arange(11) % 3, NAMES, "squares11")

    def run(out, shard=None, min_cov=0.0):
        return forge_shift(ds, out, make_masker("layercam", model=net, min_coverage=min_cov), make_inpainter("telea"),
                           k=3, seed=2, shard=shard, batch_size=4, shard_size=5, progress=False)

    full = run(tmp_path / "full")
    parts = [run(tmp_path / f"p{i}", shard=f"{i}/3") for i in range(3)]
    merged = merge_stores([p.root for p in parts], tmp_path / "merged")
    a, ra = merged.load(with_records=True)
    b, rb = full.load(with_records=True)
    assert len(a) == 33 and torch.equal(a.images, b.images)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("shard", "row")} for r in rs]  # noqa: E731
    assert strip(ra) == strip(rb) and merged.config == full.config
    covs = sorted({r["coverage"] for r in rb})
    cut = covs[len(covs) // 2]
    high = run(tmp_path / "cov", min_cov=cut)
    kept = {r["source_index"] for r in high.records()}
    assert kept == {r["source_index"] for r in rb if r["coverage"] >= cut}
    assert {s["source_index"] for s in high.skipped()} == set(range(11)) - kept
    assert high.done_keys() == {(i, k) for i in range(11) for k in range(3)}


def _cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "oodforge.cli", "synth", "shift", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _wait_for_commits(store_dir: Path, n_lines: int, proc, timeout=120.0) -> bool:
    t0 = time.time()
    man = store_dir / "manifest.jsonl"
    while time.time() - t0 < timeout:
        if man.is_file() and man.read_bytes().count(b"\n") >= n_lines:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def test_cli_resumes_after_sigkill_with_every_outlier_exactly_once(tmp_path):
    from oodforge.models import build_model
    from oodforge.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build_model("small_resnet", 3, 1)
    save_checkpoint(net, tmp_path / "ckpt", {"class_names": NAMES})
    n, k = 600, 2
    imgs = square_images(n, 1, 28, seed=9)
    np.savez(tmp_path / "data.npz", images=imgs, labels=np.arange(n) % 3, class_names=np.array(NAMES))
    out = tmp_path / "store"
    args = ["--data", tmp_path / "data.npz", "--masker", "layercam", "--checkpoint", tmp_path / "ckpt",
            "--inpainter", "telea", "--k", k, "--out", out, "--batch-size", 16, "--shard-size", 16, "--seed", 4,
            "--no-progress"]
    proc = _cli(args)  # killed with SIGKILL right after its first shard is committed
    landed = _wait_for_commits(out, 1, proc)
    finished_early = proc.poll() is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert landed and not finished_early, proc.stdout.read().decode()
    st = OutlierStore(out)
    assert 0 < len(st.done_keys()) < n * k  # really interrupted mid-run
    proc = _cli(args)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    st = OutlierStore(out)
    data, recs = st.load(with_records=True)  # every shard loads and matches its checksum
    keys = [(r["source_index"], r["k"]) for r in recs] + [(s["source_index"], s["k"]) for s in st.skipped()]
    assert len(keys) == len(set(keys)) == n * k and set(keys) == {(i, j) for i in range(n) for j in range(k)}
    assert len(data) == len(recs)
    shards = {e["shard"] for e in st.entries() if e["shard"]}
    assert {p.name for p in (out / "shards").iterdir()} == shards  # no orphans or temp files left
    # identical to an uninterrupted run
    ref = forge_shift(ArrayDataset(imgs, np.arange(n) % 3, NAMES), tmp_path / "ref",
                      make_masker("layercam", model=net), make_inpainter("telea"), k=k, seed=4, progress=False)
    assert torch.equal(ref.load().images, data.images)
