"""SynOOD generation (Eqs. 4-10) on a tiny Stable-Diffusion inpainting pipeline built from configs:
the energy loss, the skip-gradient noise update, JPEG-complexity selection, and the resumable,
shardable outlier store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oodforge.data.base import ArrayDataset
from oodforge.hub import ModelUnavailableError
from oodforge.outliers.store import OutlierStore, merge_stores, outlier_seed
from oodforge.synood.energy import default_m_out, energy_loss, energy_score, energy_scores, logit_fn
from oodforge.synood.generate import (
    NearBoundaryGenerator,
    jpeg_bytes_per_pixel,
    load_inpaint_pipeline,
    select_complex_images,
    synthesize_synood,
)


class Pattern(torch.nn.Module):
    """Toy 1-class classifier: logit = gain * <w, x> for a fixed zero-mean pattern w (energy score = logit)."""

    def __init__(self, gain: float = 100.0, in_channels: int = 3):
        super().__init__()
        w = torch.randn(1, in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        self.register_buffer("w", (w - w.mean()) / w.norm())
        self.gain = gain
        self.in_channels = in_channels

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return self.gain * (x * self.w).sum((1, 2, 3))[:, None]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from oodforge.synood.tiny import build_tiny_inpaint_pipeline

    return load_inpaint_pipeline(str(build_tiny_inpaint_pipeline(tmp_path_factory.mktemp("sd") / "sd", seed=0)))


# --- Sec. 3.4 -----------------------------------------------------------------------------------------
def test_jpeg_complexity_selects_the_busiest_images_per_class():
    rng = np.random.default_rng(0)
    flat = np.full((1, 28, 28), 128, np.uint8)
    images, labels, busy = [], [], []
    for i in range(12):
        c = i % 3
        amount = (i // 3) * 40  # noise amplitude grows with i within each class
        img = np.clip(flat.astype(int) + rng.integers(-amount, amount + 1, flat.shape), 0, 255).astype(np.uint8)
        images.append(img)
        labels.append(c)
    ds = ArrayDataset(np.stack(images), np.array(labels))
    bpp = jpeg_bytes_per_pixel(ds.images.numpy())
    assert bpp[0] < bpp[3] < bpp[6] < bpp[9]  # noisier = more JPEG bytes per pixel
    got = select_complex_images(ds, per_class=2)
    assert got.tolist() == [6, 7, 8, 9, 10, 11]  # the two noisiest of each class
    busy = np.stack([rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), np.zeros((3, 8, 8), np.uint8)])
    assert jpeg_bytes_per_pixel(busy)[0] > jpeg_bytes_per_pixel(busy)[1]  # RGB images too


# --- Eq. 7 -----------------------------------------------------------------------------------------------
def test_energy_loss_forms_follow_eq7():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    s = torch.logsumexp(logits, 1)
    torch.testing.assert_close(energy_score(logits), s)
    torch.testing.assert_close(energy_score(logits, 2.0), 2.0 * torch.logsumexp(logits / 2.0, 1))
    m = 2.0
    torch.testing.assert_close(energy_loss(logits, m, form="linear", reduction="none"), m - s)
    torch.testing.assert_close(energy_loss(logits, m, form="hinge", reduction="none"), (m - s).clamp_min(0))
    torch.testing.assert_close(energy_loss(logits, m, form="squared", reduction="none"), (m - s) ** 2)
    assert float(energy_loss(logits, m, form="hinge", reduction="none")[0]) == 0.0  # ID side: no push
    with pytest.raises(ValueError, match="hinge"):
        energy_loss(logits, m, form="cubic")
    ds = ArrayDataset(np.random.default_rng(0).integers(0, 256, (50, 3, 16, 16), dtype=np.uint8))
    fn = Pattern(10.0)
    scores = energy_scores(fn, ds)
    assert default_m_out(fn, ds, 5.0) == pytest.approx(np.percentile(scores, 5.0))


def test_logit_fn_adapts_rgb_generations_to_a_gray_classifier():
    seen = {}

    class Gray(torch.nn.Module):
        in_channels = 1

        def forward(self, x):
            seen["shape"] = tuple(x.shape)
            return x.mean((1, 2, 3))[:, None]

    out = logit_fn(Gray(), image_size=28)(torch.ones(2, 3, 64, 64))
    assert seen["shape"] == (2, 1, 28, 28) and torch.allclose(out, torch.ones(2, 1))


# --- Eqs. 4-10 ---------------------------------------------------------------------------------------------
def test_skip_gradient_noise_update_reduces_the_energy_loss(pipe):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["A photo only remain grass."] * 2
    kw = dict(resolution=32, num_inference_steps=10)  # strength 0.6: 6 denoising steps per regeneration
    gen = NearBoundaryGenerator(pipe, Pattern(100.0), m_out=1000.0, iterations=3, loss_form="linear", **kw)
    x, info = gen.generate(images, prompts, [1, 2])
    loss = info["loss"]  # [iterations + 1, B]
    assert x.shape == (2, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert loss.shape == (4, 2)
    assert bool((loss[1:] < loss[:-1]).all()), loss  # every Eq. 10 update lowers Eq. 7
    assert bool((loss[-1] < loss[0] - 50).all()), loss
    torch.testing.assert_close(info["score"], 1000.0 - loss, atol=1e-3, rtol=0)
    # without the update the regeneration is deterministic: the loss does not move
    still = NearBoundaryGenerator(pipe, Pattern(100.0), m_out=1000.0, iterations=1, step_size=0.0, **kw)
    _, info0 = still.generate(images, prompts, [1, 2])
    torch.testing.assert_close(info0["loss"][0], info0["loss"][-1])
    torch.testing.assert_close(info0["loss"][0], loss[0])
    # hinge form: once an outlier reaches m_out from the OOD side it is left where it is
    m_out = float(loss.new_tensor(1000.0) - loss[0].max()) + 30.0  # 30 above the initial scores
    hinge = NearBoundaryGenerator(pipe, Pattern(100.0), m_out=m_out, iterations=3, loss_form="hinge", **kw)
    _, ih = hinge.generate(images, prompts, [1, 2])
    assert bool((ih["loss"] >= 0).all()) and bool((ih["loss"][-1] == 0).all()), ih["loss"]
    first_zero = int(torch.nonzero(ih["loss"][:, 0] == 0)[0])
    assert torch.allclose(ih["score"][first_zero:, 0], ih["score"][first_zero, 0])


def test_missing_pipeline_names_the_option():
    with pytest.raises(ModelUnavailableError, match="--sd-model"):
        load_inpaint_pipeline(None)
    with pytest.raises(ModelUnavailableError, match="does not exist.*--sd-model"):
        load_inpaint_pipeline("/nonexistent/sd-inpaint")


def test_synthesize_is_resumable_and_shardable(pipe, tmp_path):
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (6, 1, 28, 28), dtype=np.uint8), np.array([0, 1, 2, 0, 1, 2]),
                      ["shirt", "boot", "bag"], identity="toy-gray")
    contexts = {i: ["grass", "fence"] if i % 2 else "sky, road" for i in range(6)}
    gen = NearBoundaryGenerator(pipe, Pattern(100.0, in_channels=1), m_out=50.0, classifier_size=28, resolution=32,
                                iterations=1, num_inference_steps=5)
    idx = [1, 2, 3, 4]

    full = synthesize_synood(ds, contexts, gen, tmp_path / "full", indices=idx, batch_size=2, commit_every=2,
                             progress=False)
    ref, recs = full.load(with_records=True)
    assert ref.images.shape == (4, 1, 28, 28) and ref.labels.tolist() == [1, 2, 0, 1]
    assert [r["source_index"] for r in recs] == idx
    assert recs[0]["prompt"] == "A photo only remain grass, fence." and recs[1]["prompt"] == "A photo only remain sky, road."
    assert recs[0]["seed"] == outlier_seed(0, 1, 0) and len(recs[0]["loss"]) == 2
    assert full.config["strength"] == 0.6 and full.config["mask"] == "full"

    # a run killed after its first batch: one committed shard, plus the debris of the next one
    part = synthesize_synood(ds, contexts, gen, tmp_path / "part", indices=idx[:2], batch_size=2, commit_every=2,
                             progress=False)
    assert len(part) == 2
    (tmp_path / "part" / "shards" / "shard-000001.npz").write_bytes(b"half-written")
    with open(tmp_path / "part" / "manifest.jsonl", "a") as f:
        f.write('{"shard": "shard-000001.npz", "records": [{"source_ind')
    resumed = synthesize_synood(ds, contexts, gen, tmp_path / "part", indices=idx, batch_size=2, commit_every=2,
                                progress=False)
    got, grecs = resumed.load(with_records=True)
    assert [(r["source_index"], r["k"]) for r in grecs] == [(i, 0) for i in idx]  # each once
    assert np.array_equal(got.images.numpy(), ref.images.numpy())  # same outliers as one uninterrupted run
    lines = (tmp_path / "part" / "manifest.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 2

    # two work shards merge into the unsharded store
    for s in ("0/2", "1/2"):
        synthesize_synood(ds, contexts, gen, tmp_path / f"s{s[0]}", indices=idx, shard=s, batch_size=2,
                          progress=False)
    merged = merge_stores([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged").load()
    assert np.array_equal(merged.images.numpy(), ref.images.numpy())

    with pytest.raises(ValueError, match="no contexts"):
        synthesize_synood(ds, {1: ["grass"]}, gen, tmp_path / "x", indices=[1, 5], progress=False)
    with pytest.raises(Exception, match="different configuration"):
        synthesize_synood(ds, contexts, gen, tmp_path / "full", indices=idx, k=2, progress=False)
    assert isinstance(OutlierStore(tmp_path / "full"), OutlierStore)
