"""Boundary refinement of outliers (bounded energy-guided perturbation) and SynOOD's fine-tuning
losses (Eqs. 12 and 14) on synthetic CLIP-like features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodforge.data.base import ArrayDataset
from oodforge.models.backbones import build_model
from oodforge.synood.energy import energy_scores
from oodforge.synood.finetune import (
    VARIANTS,
    Projection,
    assign_negative_labels,
    finetune_synood,
    learnable_subset,
    train_label_features,
    train_projection,
)
from oodforge.synood.refine import refine_outliers


@pytest.fixture(scope="module")
def toy_classifier():
    """A small ResNet trained for a few steps to tell bright-top from bright-bottom images (ID)."""
    torch.manual_seed(0)
    model = build_model("small_resnet", 2, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 16, 16, generator=g) * 0.2
    y = torch.arange(64) % 2
    x[y == 0, :, :8] += 0.7
    x[y == 1, :, 8:] += 0.7
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    id_ds = ArrayDataset((x.clamp(0, 1) * 255).round().to(torch.uint8), y)
    return model, id_ds


def test_refine_moves_outlier_energies_to_m_out_within_eps(toy_classifier):
    model, id_ds = toy_classifier
    rng = np.random.default_rng(0)
    out = ArrayDataset(rng.integers(0, 60, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 2, ["a", "b"])
    s_id = energy_scores(model, id_ds)
    s0 = energy_scores(model, out)
    m_out = float(np.percentile(s_id, 5))
    assert np.median(s0) < m_out  # the dark outliers start on the OOD side
    eps = 24 / 255
    ref, info = refine_outliers(model, out, eps=eps, steps=8, id_dataset=id_ds, progress=False, return_info=True)
    assert info["m_out"] == pytest.approx(m_out, rel=1e-5)  # default: 5th percentile of ID energies
    delta = ref.images.to(torch.int16) - out.images.to(torch.int16)
    assert int(delta.abs().max()) <= 24 and info["max_abs_change"] == int(delta.abs().max()) > 0
    assert ref.labels.tolist() == out.labels.tolist() and ref.class_names == ["a", "b"]
    assert ref.identity != out.identity
    s1 = energy_scores(model, ref)
    np.testing.assert_allclose(info["score_after"], s1, rtol=1e-5, atol=1e-5)
    below = s0 < m_out
    gap0, gap1 = m_out - s0[below], m_out - s1[below]
    assert np.mean(gap1) < 0.5 * np.mean(gap0)  # energies moved most of the way to the boundary
    assert np.mean(np.abs(s1 - m_out)) < np.mean(np.abs(s0 - m_out))
    assert np.mean(s1[below] > m_out + 0.5 * np.mean(gap0)) < 0.2  # hinge: they stop near it, not deep in ID
    # each outlier ends at its iterate closest to the boundary (never farther than it started, up to uint8 rounding)
    assert np.all(np.abs(s1 - m_out) <= np.abs(s0 - m_out) + 0.02)
    # images already past the boundary (ID side) have no hinge gradient: untouched
    inside = id_ds.subset(np.flatnonzero(s_id > m_out + 0.05)[:8])
    assert torch.equal(refine_outliers(model, inside, eps=eps, steps=4, m_out=m_out, progress=False).images,
                       inside.images)


def test_refine_bounds_and_errors(toy_classifier):
    model, id_ds = toy_classifier
    out = ArrayDataset(np.full((4, 1, 16, 16), 30, np.uint8))
    with pytest.raises(ValueError, match="m_out.*id_dataset"):
        refine_outliers(model, out, progress=False)
    same = refine_outliers(model, out, eps=0.0, steps=3, m_out=100.0, progress=False)
    assert torch.equal(same.images, out.images)
    r = refine_outliers(model, out, eps=0.01, steps=3, m_out=100.0, random_start=True, seed=3, progress=False)
    assert int((r.images.to(torch.int16) - 30).abs().max()) <= 2  # floor(0.01 * 255) = 2
    r2 = refine_outliers(model, out, eps=0.01, steps=3, m_out=100.0, random_start=True, seed=3, progress=False)
    assert torch.equal(r.images, r2.images)


def _clusters(n_per: int, centers: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(centers)).repeat_interleave(n_per)
    x = centers[y] + noise * torch.randn(len(y), centers.shape[1], generator=g)
    return F.normalize(x, dim=1), y


def test_finetuning_losses_decrease_and_labels_attract_outliers():
    g = torch.Generator().manual_seed(0)
    d = 32
    pos = F.normalize(torch.randn(4, d, generator=g), dim=1)  # 4 ID classes
    neg = F.normalize(torch.randn(20, d, generator=g), dim=1)  # 20 negative labels
    id_feats, id_y = _clusters(30, pos, 0.6, 1)
    # outliers cluster around 6 directions that sit between negative labels and the ID labels
    out_centers = F.normalize(neg[:6] + 0.8 * pos[torch.arange(6) % 4], dim=1)
    out_feats, _ = _clusters(30, out_centers, 0.5, 2)

    assigned = assign_negative_labels(out_feats, neg)
    torch.testing.assert_close(assigned, (out_feats @ neg.T).argmax(1))
    subset = learnable_subset(assigned, len(neg), 0.5)
    assert len(subset) <= 10 and set(subset.tolist()) <= set(assigned.tolist())
    capped = learnable_subset(torch.tensor([0, 0, 0, 1, 1, 2, 3]), 4, 0.5)
    assert capped.tolist() == [0, 1]  # the two most frequently paired labels

    targets = assign_negative_labels(out_feats, neg[subset])
    proj, hist_p = train_projection(id_feats, id_y, out_feats, targets, pos, neg[subset], epochs=3, seed=0)
    assert isinstance(proj, Projection) and hist_p[-1] < hist_p[0]
    feats, hist_l = train_label_features(out_feats, targets, neg[subset] * 5.0, epochs=5, seed=0)
    assert hist_l[-1] < hist_l[0]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(subset)))
    # the learned label features are closer to their outliers than the initial text features
    before = (out_feats * neg[subset][targets]).sum(1).mean()
    after = (out_feats * feats[targets]).sum(1).mean()
    assert after > before

    res = finetune_synood(id_feats, id_y, out_feats, pos, neg, neg_norms=torch.full((20,), 5.0), seed=0,
                          variant="labels-only")
    assert res.projection is None and res.history["label_loss"][-1] < res.history["label_loss"][0]
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[res.subset] = False
    torch.testing.assert_close(res.neg_feats[untouched], neg[untouched])  # the other labels stay fixed
    res_p = finetune_synood(id_feats, id_y, out_feats, pos, neg, variant="projected-labels", seed=0)
    assert res_p.projection is not None and res_p.history["projection_loss"][-1] < res_p.history["projection_loss"][0]
    with pytest.raises(ValueError, match="synthetic outliers"):
        finetune_synood(id_feats, id_y, out_feats[:0], pos, neg)


def _toy_features():
    g = torch.Generator().manual_seed(3)
    d = 16
    pos = F.normalize(torch.randn(3, d, generator=g), dim=1)
    neg = F.normalize(torch.randn(12, d, generator=g), dim=1)
    id_feats, id_y = _clusters(10, pos, 0.6, 4)
    out_feats, _ = _clusters(10, F.normalize(neg[:4] + 0.8 * pos[torch.arange(4) % 3], dim=1), 0.5, 5)
    return id_feats, id_y, out_feats, pos, neg


def _proj_params(res):
    return torch.cat([p.flatten() for p in res.projection.parameters()])


def test_finetune_variants_train_what_they_say():
    id_feats, id_y, out_feats, pos, neg = _toy_features()
    norms = torch.full((len(neg),), 4.0)
    res = {v: finetune_synood(id_feats, id_y, out_feats, pos, neg, neg_norms=norms, variant=v, seed=0, proj_epochs=2,
                              label_epochs=3) for v in VARIANTS}
    default = finetune_synood(id_feats, id_y, out_feats, pos, neg, neg_norms=norms, seed=0, proj_epochs=2,
                              label_epochs=3)
    assert default.variant == "table1"  # the paper's configuration by default
    torch.testing.assert_close(default.neg_feats, res["table1"].neg_feats, rtol=0, atol=0)
    for v, r in res.items():
        spec = VARIANTS[v]
        assert r.variant == v and (r.projection is not None) == spec.projection
        assert ("projection_loss" in r.history) == spec.projection
        assert ("label_loss" in r.history) == (spec.labels_on is not None)
        if spec.labels_on is None:  # CLIP's label features, untouched
            torch.testing.assert_close(r.neg_feats, neg, rtol=0, atol=0)
    # the same seed gives the same projection, whatever is done with it afterwards
    for v in ("projected-labels", "projection-only"):
        torch.testing.assert_close(_proj_params(res[v]), _proj_params(res["table1"]), rtol=0, atol=0)
    # table1 trains the labels on the unprojected features: exactly labels-only's labels ...
    torch.testing.assert_close(res["table1"].neg_feats, res["labels-only"].neg_feats, rtol=0, atol=0)
    sub = res["table1"].subset
    targets = assign_negative_labels(out_feats, neg[sub])
    raw, _ = train_label_features(out_feats, targets, neg[sub] * 4.0, epochs=3, seed=0)
    torch.testing.assert_close(res["table1"].neg_feats[sub], raw, rtol=0, atol=0)
    # ... while projected-labels trains them on delta(F(x)), and that is a different result
    projd, _ = train_label_features(out_feats, targets, neg[sub] * 4.0, epochs=3, seed=0,
                                    projection=res["projected-labels"].projection)
    torch.testing.assert_close(res["projected-labels"].neg_feats[sub], projd, rtol=0, atol=0)
    assert (res["projected-labels"].neg_feats[sub] - raw).abs().max() > 1e-3


def test_finetune_variant_is_checked_first():
    id_feats, id_y, out_feats, pos, neg = _toy_features()
    with pytest.raises(ValueError, match="variant must be one of 'table1', 'labels-only'.*got 'table-1'"):
        finetune_synood(id_feats, id_y, out_feats[:0], pos, neg, variant="table-1")  # checked before anything else
    r = finetune_synood(id_feats, id_y, out_feats, pos, neg, variant="no-finetune")
    assert r.variant == "no-finetune" and r.projection is None
