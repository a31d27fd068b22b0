"""Outlier exposure on forged outliers: the two losses against their papers' formulas, the auto
margins, and a fine-tune that makes the classifier unsure on the outliers while it still classifies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_training_loop import _toy_images

from oodforge.data.base import ArrayDataset
from oodforge.models import build_model
from oodforge.models.train import CrossEntropy, TrainConfig, run_training
from oodforge.oe import OutlierExposure, energy_margin_loss, uniform_ce_loss


def test_uniform_cross_entropy_matches_the_oe_formula():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 0.5]])
    # Hendrycks et al. 2019: CE(u, softmax(z)) = -1/M sum_c log softmax(z)_c
    lsm = torch.log_softmax(logits, 1)
    expect = float(-(lsm.sum(1) / 4).mean())
    assert uniform_ce_loss(logits).item() == pytest.approx(expect)
    assert uniform_ce_loss(logits[:1]).item() == pytest.approx(math.log(4))  # already uniform: log M


def test_energy_margin_loss_matches_liu_eq9():
    z_in = torch.tensor([[5.0, 0.0], [1.0, 1.0]])
    z_out = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    e_in = -torch.logsumexp(z_in, 1)  # [-5.0067, -1.6931]
    e_out = -torch.logsumexp(z_out, 1)  # [-0.6931, -3.6931]
    m_in, m_out = -3.0, -1.0
    expect = (torch.relu(e_in - m_in) ** 2).mean() + (torch.relu(m_out - e_out) ** 2).mean()
    assert energy_margin_loss(z_in, z_out, m_in, m_out).item() == pytest.approx(expect.item())
    # hand values: ID [0, 1.3069^2]/2, outliers [0, 2.6931^2]/2
    assert expect.item() == pytest.approx(1.3069 ** 2 / 2 + 2.6931 ** 2 / 2, abs=1e-3)


def _blank_outliers(n=96, size=12, seed=1):
    """Forged-outlier stand-ins: the noisy background without the square (the object erased)."""
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.uniform(0, 60, (n, 1, size, size)).astype(np.uint8), None, None, "toy-erased")


def _trained():
    torch.manual_seed(0)
    model = build_model("small_resnet", 2, 1)
    run_training(model, _toy_images(), CrossEntropy(), TrainConfig(epochs=4, batch_size=32, lr=0.05, seed=0),
                 progress=False)
    return model


@torch.no_grad()
def _msp(model, ds):
    return model.eval()(ds.float_images()).softmax(1).max(1).values


def test_oe_finetune_makes_outliers_uniform_and_keeps_accuracy():
    data, outliers = _toy_images(), _blank_outliers()
    model = _trained()
    before = _msp(model, outliers).mean().item()
    hist = run_training(model, data, OutlierExposure(outliers, loss="oe", seed=0),
                        TrainConfig(epochs=6, batch_size=32, lr=0.05, schedule="cosine", seed=0), progress=False)
    after = _msp(model, outliers).mean().item()
    assert after < 0.6 < before  # 2 classes: uniform is 0.5
    acc = (model(data.float_images()).argmax(1) == data.labels).float().mean().item()
    assert acc > 0.95
    assert hist["outlier_loss"][-1] < hist["outlier_loss"][0]
    assert hist["objective"]["lambda"] == 0.5 and hist["objective"]["loss"] == "oe"


def test_energy_loss_auto_margins_come_from_the_initial_model():
    data, outliers = _toy_images(), _blank_outliers()
    model = _trained()
    with torch.no_grad():
        e_id = (-torch.logsumexp(model(data.float_images()), 1)).median().item()
    obj = OutlierExposure(outliers, loss="energy", seed=0)
    run_training(model, data, obj, TrainConfig(epochs=1, batch_size=32, lr=0.01, schedule="cosine"), progress=False)
    assert obj.lam == 0.1
    assert obj.m_in == pytest.approx(e_id, abs=1e-3)
    assert obj.m_out >= obj.m_in + 1.0 - 1e-9


def test_bad_outlier_sets_are_refused():
    with pytest.raises(ValueError, match="empty"):
        OutlierExposure(ArrayDataset(np.zeros((0, 1, 12, 12), np.uint8)))
    with pytest.raises(ValueError, match="outlier loss"):
        OutlierExposure(_blank_outliers(), loss="hinge")
    obj = OutlierExposure(ArrayDataset(np.zeros((4, 3, 12, 12), np.uint8), identity="rgb"))
    with pytest.raises(ValueError, match="forge them from this suite"):
        run_training(build_model("small_resnet", 2, 1), _toy_images(), obj, TrainConfig(epochs=1), progress=False)
