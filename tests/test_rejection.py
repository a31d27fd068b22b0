"""SHIFT's rejection network (Eq. 5): beats MSP when the synthetic outliers are informative, keeps the
classifier frozen, and reads the feature map when asked to."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from oodforge.data.base import ArrayDataset
from oodforge.detectors import create
from oodforge.detectors.base import FitContext, NotFittedError
from oodforge.models.base import Classifier
from oodforge.models.featureset import FeatureSet
from oodforge.synth.rejection import ShiftRejection, augment_outliers


class PixelNet(Classifier):
    """A tiny ReLU net on ``[N, D, 1, 1]`` 'images' (1x1 convolutions), following the Classifier contract."""

    def __init__(self, d=4, hidden=16, classes=2, seed=0):
        super().__init__(classes, d, (0.5,) * d, (0.1,) * d)
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(d, hidden, 1), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _pixels(x: np.ndarray) -> ArrayDataset:
    return ArrayDataset((np.clip(x, 0, 1) * 255).round().astype(np.uint8)[:, :, None, None])


def toy(seed=0, n=400):
    """ID: two classes at x0 = 0.35 / 0.65 (other dims 0.5). OOD: x0 pushed to the extremes, where the
    classifier is *more* confident than on ID (MSP fails), other dims scattered. The synthetic outliers
    come from the OOD distribution with another seed: informative outliers."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    x_id = 0.5 + 0.03 * g.standard_normal((n, 4))
    x_id[:, 0] = np.where(y == 1, 0.65, 0.35) + 0.03 * g.standard_normal(n)

    def ood(m):
        x = g.uniform(0.25, 0.75, (m, 4))
        x[:, 0] = np.where(g.random(m) < 0.5, g.uniform(0.0, 0.12, m), g.uniform(0.88, 1.0, m))
        return x

    return x_id, y, ood(n), ood(n)


def _train_classifier(x, y):
    net = PixelNet()
    xb = _pixels(x).float_images()
    yb = torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(40):
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def feats(net, ds: ArrayDataset, labels=None) -> FeatureSet:
    with torch.no_grad():
        out = net.forward_all(ds.float_images())
    lab = torch.as_tensor(labels) if labels is not None else torch.full((len(ds),), -1)
    return FeatureSet(out.logits, out.penultimate, lab, out.feature_map)


@pytest.fixture(scope="module")
def problem():
    x_id, y, x_out, x_ood = toy()
    net = _train_classifier(x_id, y)
    x_test, y_test, _, x_ood_test = toy(seed=1)
    return dict(net=net, train=feats(net, _pixels(x_id), y), outliers=feats(net, _pixels(x_out)),
                test=feats(net, _pixels(x_test), y_test), ood=feats(net, _pixels(x_ood_test)),
                test_images=_pixels(x_test))


def auroc(s_id, s_ood):
    return roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])


def test_rejection_beats_msp_when_outliers_are_informative(problem):
    p = problem
    acc = float((p["test"].logits.argmax(1) == p["test"].labels).float().mean())
    assert acc > 0.95  # a good classifier...
    msp = lambda f: torch.softmax(f.logits, 1).max(1).values.numpy()  # noqa: E731
    au_msp = auroc(msp(p["test"]), msp(p["ood"]))
    assert au_msp < 0.6  # ...that is more confident on this OOD than on ID
    net_before = {k: v.clone() for k, v in p["net"].state_dict().items()}
    logits_before = p["net"](p["test_images"].float_images()).detach()
    det = create("shift", hidden=256, epochs=10)
    det.fit(FitContext(model=p["net"], train=p["train"], outliers=p["outliers"], seed=0))
    s_id, s_ood = det.score(p["test"]), det.score(p["ood"])
    au = auroc(s_id, s_ood)
    assert au > 0.97 and au - au_msp > 0.35, (au, au_msp)
    assert det.history_[-1] < det.history_[0]  # the Eq. 5 loss went down
    # the classifier is frozen: weights, test logits, hence ID accuracy, unchanged
    assert all(torch.equal(net_before[k], v) for k, v in p["net"].state_dict().items())
    assert torch.equal(p["net"](p["test_images"].float_images()).detach(), logits_before)
    # score="prob" is P(ID|x) = sigmoid(logit): same ranking, values in (0, 1)
    prob = create("shift", hidden=256, epochs=10, score="prob").fit(
        FitContext(model=p["net"], train=p["train"], outliers=p["outliers"], seed=0))
    sp = prob.score(p["test"])
    assert np.allclose(sp, 1 / (1 + np.exp(-s_id)), atol=1e-6) and ((sp > 0) & (sp < 1)).all()


def test_paper_hyperparameters_and_determinism(problem):
    p = problem
    det = ShiftRejection()
    assert (det.hidden, det.epochs, det.lr, det.momentum, det.weight_decay) == (2048, 10, 0.01, 0.9, 5e-4)
    a = create("shift", hidden=64, epochs=2).fit(FitContext(p["net"], p["train"], p["outliers"], seed=3))
    b = create("shift", hidden=64, epochs=2).fit(FitContext(p["net"], p["train"], p["outliers"], seed=3))
    assert np.array_equal(a.score(p["ood"]), b.score(p["ood"]))
    assert a.net_.fc1.out_features == 64 and a.net_.fc2.out_features == 1


def test_feature_map_input_is_an_instance_property(problem):
    p = problem
    pen, fm = create("shift", hidden=64, epochs=3), create("shift", input="feature_map", hidden=64, epochs=3)
    assert pen.needs_feature_map is False and fm.needs_feature_map is True and fm.needs_outliers
    ctx = FitContext(p["net"], p["train"], p["outliers"], seed=0)
    # with 1x1 feature maps the flattened map is the penultimate vector: identical scores
    s_pen = pen.fit(ctx).score(p["ood"])
    s_fm = fm.fit(ctx).score(p["ood"])
    assert np.allclose(s_pen, s_fm, atol=1e-5)
    no_map = FeatureSet(p["train"].logits, p["train"].penultimate, p["train"].labels)
    with pytest.raises(ValueError, match="feature_map=True"):
        create("shift", input="feature_map", epochs=1).fit(FitContext(p["net"], no_map, p["outliers"]))
    with pytest.raises(ValueError, match="outlier store"):
        create("shift").fit(FitContext(p["net"], p["train"], None))
    with pytest.raises(NotFittedError):
        create("shift").score(p["ood"])
    with pytest.raises(ValueError, match="input"):
        create("shift", input="logits")


def test_augment_outliers_in_image_space():
    g = np.random.default_rng(0)
    ds = ArrayDataset(g.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8), np.arange(6) % 2, ["a", "b"], "six")
    ds.source_index = np.arange(6) * 10
    aug = augment_outliers(ds, copies=2, seed=1)
    assert aug.images.shape == (18, 3, 16, 16) and aug.images.dtype == torch.uint8
    assert torch.equal(aug.images[:6], ds.images) and aug.labels.tolist() == ds.labels.tolist() * 3
    assert not torch.equal(aug.images[6:12], ds.images) and not torch.equal(aug.images[6:12], aug.images[12:])
    assert torch.equal(augment_outliers(ds, copies=2, seed=1).images, aug.images)
    assert aug.source_index.tolist() == ds.source_index.tolist() * 3 and aug.identity != ds.identity
    ident = augment_outliers(ds, copies=1, seed=0, flip=False, max_rotate=0, max_translate=0, zoom=(1.0, 1.0),
                             keep_original=False)
    assert (ident.images.int() - ds.images.int()).abs().max() <= 1  # the identity transform
