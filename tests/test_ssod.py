"""Tests of SSOD (Pei, ICLR 2024): sampler (Eq. 12), loss + balance schemes (Eq. 14, Table 5),
training on a toy problem, detectors (Eqs. 7, 15), checkpoint round trip, the explain picture."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from oodforge.data.base import ArrayDataset
from oodforge.detectors import create
from oodforge.detectors.base import FitContext
from oodforge.models import build_model, extract_features
from oodforge.models.checkpoint import load_checkpoint, save_checkpoint
from oodforge.models.featureset import FeatureSet
from oodforge.ssod.detector import combined_posterior, id_probability
from oodforge.ssod.explain import GREEN, GRID, RED, explain_image, render_overlay
from oodforge.ssod.loss import ood_loss, resample_balanced, ssod_loss
from oodforge.ssod.model import SSODModel, apply_per_position
from oodforge.ssod.sampler import sample_labels_from_confidence, sample_positions, target_confidence
from oodforge.ssod.train import train_ssod

torch.set_num_threads(1)


def _ce(logits: list[float], label: int) -> float:
    """Cross entropy of one position, by hand."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


# --- sampler (Eq. 12) ------------------------------------------------------------------------

def test_sampler_thresholds_on_handmade_confidence():
    conf = torch.tensor([[[0.99, 0.75, 0.7499, 0.5], [0.2501, 0.25, 0.2499, 0.0]]])
    labels = sample_labels_from_confidence(conf, gamma=0.75)
    # >= gamma -> ID (1); < 1 - gamma -> OOD (0) (strict, Eq. 12); else ignored (-1)
    assert labels.tolist() == [[[1, 1, -1, -1], [-1, -1, 0, 0]]]
    assert sample_labels_from_confidence(torch.tensor([0.96, 0.5, 0.04]), 0.95).tolist() == [1, -1, 0]
    for bad in (0.4, 1.1):
        with pytest.raises(ValueError, match="gamma"):
            sample_labels_from_confidence(conf, bad)


def test_sampler_reads_the_target_class_softmax():
    # 2 images, 3 classes, 1x3 map; logits chosen so the softmax is known exactly
    p = torch.tensor([[[0.97, 0.02, 0.01], [0.30, 0.40, 0.30], [0.01, 0.01, 0.98]],
                      [[0.50, 0.49, 0.01], [0.01, 0.98, 0.01], [0.02, 0.01, 0.97]]])  # [N, pos, M]
    cls_map = p.log().permute(0, 2, 1).unsqueeze(2).requires_grad_(True)  # [N, M, 1, 3]
    targets = torch.tensor([0, 1])
    conf = target_confidence(cls_map, targets)
    assert torch.allclose(conf[:, 0], torch.tensor([[0.97, 0.30, 0.01], [0.49, 0.98, 0.01]]), atol=1e-6)
    labels = sample_positions(cls_map, targets, gamma=0.95)
    assert labels.tolist() == [[[1, -1, 0]], [[-1, 1, 0]]]
    assert not labels.requires_grad and not conf.requires_grad  # detached: no gradient into f_cls
    with pytest.raises(ValueError, match="class indices"):
        sample_positions(cls_map, torch.tensor([0, 3]))


# --- loss (Eq. 14) and the balance schemes of Table 5 -----------------------------------------

OOD_MAP = torch.tensor([[[[0.5, 2.0, -1.0, 0.3]], [[1.5, -1.0, 0.5, 0.0]]]])  # [1, 2, 1, 4]
LABELS = torch.tensor([[[1, 0, 0, -1]]])  # one ID position, two OOD positions, one ignored
CE = [_ce([0.5, 1.5], 1), _ce([2.0, -1.0], 0), _ce([-1.0, 0.5], 0)]


def test_loss_wise_balance_by_hand():
    loss, n_id, n_ood = ood_loss(OOD_MAP, LABELS, "loss")
    assert (n_id, n_ood) == (1, 2)
    assert loss.item() == pytest.approx((CE[0] + (CE[1] + CE[2]) / 2) / 2, rel=1e-6)


def test_loss_weighting_by_hand():
    w = 0.25
    loss, _, _ = ood_loss(OOD_MAP, LABELS, "weight", ood_weight=w)
    assert loss.item() == pytest.approx((CE[0] + w * CE[1] + w * CE[2]) / (1 + 2 * w), rel=1e-6)


def test_data_resampling_by_hand():
    # k = min(1 ID, 2 OOD) = 1 of each: the loss is the mean of the ID CE and one drawn OOD CE
    values = set()
    for seed in range(12):
        loss, n_id, n_ood = ood_loss(OOD_MAP, LABELS, "resample", generator=torch.Generator().manual_seed(seed))
        assert (n_id, n_ood) == (1, 1)
        options = [(CE[0] + CE[1]) / 2, (CE[0] + CE[2]) / 2]
        match = [abs(loss.item() - o) < 1e-5 for o in options]
        assert any(match)
        values.add(match.index(True))
    assert values == {0, 1}  # both OOD positions get drawn across seeds
    a = ood_loss(OOD_MAP, LABELS, "resample", generator=torch.Generator().manual_seed(3))[0]
    b = ood_loss(OOD_MAP, LABELS, "resample", generator=torch.Generator().manual_seed(3))[0]
    assert a.item() == b.item()


def test_resampling_balances_each_image():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (5, 6, 6), generator=g)
    labels[4] = 0  # an image without ID positions contributes nothing
    out = resample_balanced(labels, torch.Generator().manual_seed(1))
    for i in range(5):
        k = min(int((labels[i] == 1).sum()), int((labels[i] == 0).sum()))
        assert int((out[i] == 1).sum()) == k and int((out[i] == 0).sum()) == k
        kept = out[i] != -1
        assert torch.equal(out[i][kept], labels[i][kept])  # only relabels drawn positions as themselves


def test_total_loss_is_ce_plus_alpha_ood():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    res = ssod_loss(logits, torch.tensor([2]), OOD_MAP, LABELS, alpha=0.7, balance="loss")
    expect_cls = _ce([2.0, -1.0, 0.5], 2)
    expect_ood = (CE[0] + (CE[1] + CE[2]) / 2) / 2
    assert res.total.item() == pytest.approx(expect_cls + 0.7 * expect_ood, rel=1e-6)
    assert (res.n_id, res.n_ood) == (1, 2)
    with pytest.raises(ValueError, match="balance"):
        ssod_loss(logits, torch.tensor([2]), OOD_MAP, LABELS, balance="mean")


@pytest.mark.parametrize("balance", ["loss", "weight", "resample"])
def test_only_id_only_ood_and_empty_batches(balance):
    ood_map = OOD_MAP.clone().requires_grad_(True)
    only_ood = torch.tensor([[[-1, 0, 0, -1]]])
    only_id = torch.tensor([[[1, -1, -1, -1]]])
    none = torch.full((1, 1, 4), -1)
    l_ood = ood_loss(ood_map, only_ood, balance)[0]
    l_id = ood_loss(ood_map, only_id, balance)[0]
    l_none = ood_loss(ood_map, none, balance)[0]
    for v in (l_ood, l_id, l_none):
        assert torch.isfinite(v)
    if balance == "resample":  # no image has both kinds: nothing is drawn
        assert l_ood.item() == 0.0 and l_id.item() == 0.0
    else:  # the mean CE of the kind present
        assert l_ood.item() == pytest.approx((CE[1] + CE[2]) / 2, rel=1e-6)
        assert l_id.item() == pytest.approx(CE[0], rel=1e-6)
    assert l_none.item() == 0.0
    (l_ood + l_id + l_none).backward()
    assert torch.isfinite(ood_map.grad).all()


# --- model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssod_model() -> SSODModel:
    torch.manual_seed(0)
    return build_model("ssod:small_resnet", 4, 1).eval()


def test_model_heads_per_position_and_pooled(ssod_model):
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = ssod_model.forward_ssod(x)
    assert out.cls_map.shape == (3, 4, 4, 4) and out.ood_map.shape == (3, 2, 4, 4)
    # the same f_cls weights on every position (Sec. 2.3); pooled = GAP of the map (linear heads)
    pos = out.feature_map[:, :, 1, 2]
    assert torch.allclose(out.cls_map[:, :, 1, 2], ssod_model.head(pos), atol=1e-5)
    assert torch.allclose(out.ood_map[:, :, 1, 2], ssod_model.ood_head(pos), atol=1e-5)
    assert torch.allclose(out.logits, ssod_model(x), atol=1e-5)  # Eq. 11 = the Classifier forward
    assert torch.allclose(out.cls_map.mean((2, 3)), out.logits, atol=1e-5)
    assert torch.allclose(out.ood_map.mean((2, 3)), out.ood_logits, atol=1e-5)
    assert ssod_model.feature_dim == ssod_model.backbone.feature_dim and ssod_model.head is ssod_model.backbone.head
    with pytest.raises(TypeError):
        SSODModel(torch.nn.Linear(3, 3))


def test_sampler_sends_no_gradient_into_the_classification_head():
    model = build_model("ssod:small_resnet", 4, 1).train()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = model.forward_ssod(x)
    labels = sample_positions(out.cls_map, torch.tensor([0, 1, 2, 3]), gamma=0.5)  # from the live map
    labels[:, :2] = 1  # make sure both kinds are present on a random model
    labels[:, 2:] = torch.where(labels[:, 2:] == 1, labels[:, 2:], 0)
    loss, n_id, n_ood = ood_loss(out.ood_map, labels, "loss")
    assert n_id > 0 and n_ood > 0
    loss.backward()
    assert model.head.weight.grad is None  # the OOD term reaches only the backbone and f_ood
    assert model.ood_head.weight.grad.abs().sum() > 0
    assert model.backbone.body[0].weight.grad.abs().sum() > 0


def test_input_size_resizes_inside_the_model():
    model = build_model("ssod:small_resnet", 3, 1).eval()
    x = torch.rand(2, 1, 16, 16)
    assert model.feature_map(x).shape[-2:] == (4, 4)
    model.set_input_size(32)
    assert model.input_size == (32, 32) and model.feature_map(x).shape[-2:] == (8, 8)
    big = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(model(x), model.backbone(big), atol=1e-5)


# --- checkpoint round trip --------------------------------------------------------------------

def test_checkpoint_round_trip_keeps_both_heads(tmp_path):
    torch.manual_seed(3)
    model = build_model("ssod:small_resnet", 5, 3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    with torch.no_grad():
        model.ood_head.weight.normal_()
        model.ood_head.bias.copy_(torch.tensor([0.3, -0.2]))
    model.set_input_size((24, 20))
    model.set_image_size((12, 10))
    model.eval()
    save_checkpoint(model, tmp_path / "ck", {"class_names": list("abcde")})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded, SSODModel) and meta["arch"] == "ssod:small_resnet"
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert loaded.input_size == (24, 20) and loaded.image_size == (12, 10)
    x = torch.rand(2, 3, 12, 10)
    assert torch.allclose(model(x), loaded(x)) and torch.allclose(model.ood_score(x), loaded.ood_score(x))


# --- detectors (Eqs. 7, 15) -------------------------------------------------------------------

def _feats(model, x):
    out = model.forward_all(x)
    return FeatureSet(out.logits.detach(), out.penultimate.detach(), torch.zeros(len(x), dtype=torch.long))


def test_detectors_match_eq15_and_eq7(ssod_model):
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ssod_model.ood_head.weight.normal_(generator=torch.Generator().manual_seed(5))
        feats = _feats(ssod_model, x)
        direct = torch.sigmoid(ssod_model.forward_ssod(x).ood_logits @ torch.tensor([-1.0, 1.0]))  # Eq. 15
    ctx = FitContext(ssod_model, feats)
    det = create("ssod").fit(ctx)
    s = det.score(feats)
    assert np.allclose(s, direct.numpy(), atol=1e-5)
    assert np.allclose(s, ssod_model.ood_score(x).numpy(), atol=1e-5)
    post = combined_posterior(ssod_model, feats)
    assert post.shape == (6, 5) and torch.allclose(post.sum(1), torch.ones(6, dtype=torch.float64))
    expect = feats.logits.double().softmax(1) * id_probability(ssod_model, feats)[:, None]
    assert torch.allclose(post[:, :4], expect)
    comb = create("ssod-combined").fit(ctx).score(feats)
    assert np.allclose(comb, expect.max(1).values.numpy())


def test_detector_rejects_a_plain_classifier():
    plain = build_model("small_resnet", 4, 1)
    feats = _feats(plain, torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="--checkpoint"):
        create("ssod").fit(FitContext(plain, feats))


# --- training on a toy problem ----------------------------------------------------------------

def _toy(n: int, rng: np.random.Generator, with_object: bool = True, size: int = 24, p: int = 8) -> ArrayDataset:
    """A bright class-specific pattern (4 classes) at a random place on a dim noise background."""
    pats = np.zeros((4, p, p), np.float32)
    pats[0] = 1.0
    pats[1, [0, 1, -2, -1], :] = 1
    pats[1, :, [0, 1, -2, -1]] = 1
    pats[2, p // 2 - 1:p // 2 + 1, :] = 1
    pats[2, :, p // 2 - 1:p // 2 + 1] = 1
    pats[3, ::3, :] = 1
    x = rng.uniform(0, 0.35, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 4, n)
    if with_object:
        for i in range(n):
            r, c = rng.integers(0, size - p + 1, 2)
            x[i, 0, r:r + p, c:c + p] = np.maximum(x[i, 0, r:r + p, c:c + p], pats[y[i]] * rng.uniform(0.7, 1.0))
    return ArrayDataset((x * 255).round().astype(np.uint8), y)


def test_training_separates_objects_from_background():
    rng = np.random.default_rng(0)
    train, objects, background = _toy(384, rng), _toy(150, rng), _toy(150, rng, with_object=False)
    torch.manual_seed(0)
    model = build_model("ssod:small_resnet", 4, 1)
    with torch.no_grad():  # start from "no opinion": P(ID|x) = 0.5 everywhere, AUROC 0.5
        model.ood_head.weight.zero_()
        model.ood_head.bias.zero_()

    def auroc() -> float:
        si = id_probability(model, extract_features(model, objects, progress=False)).numpy()
        so = id_probability(model, extract_features(model, background, progress=False)).numpy()
        return roc_auc_score(np.r_[np.ones(len(si)), np.zeros(len(so))], np.r_[si, so])

    assert auroc() == 0.5
    # With M = 4 classes a position without evidence has target confidence ~ 1/M = 0.25; Eq. 12 can
    # only call it OOD when 1 - gamma > 1/M, hence gamma = 0.7 here (ImageNet's M = 1000 makes 0.95 work).
    hist = train_ssod(model, train, epochs=3, lr=2e-3, batch_size=64, seed=0, gamma=0.7, progress=False)
    assert len(hist["loss"]) == 3 and hist["feature_map_size"] == (6, 6)
    assert sum(hist["n_id"]) > 0 and sum(hist["n_ood"]) > 0  # the sampler found both kinds
    assert all(np.isfinite(hist["loss"]))
    assert model.image_size == (24, 24)
    assert hist["accuracy"][-1] > 0.9
    assert auroc() > 0.95  # seeds 0-3 give 0.986-1.0; with the sampler's labels swapped it is < 0.01


# --- explain picture (Fig. 2) -----------------------------------------------------------------

def test_render_overlay_tints_the_sampled_cells():
    img = torch.full((1, 4, 4), 0.5)
    img[0, 0, 0] = 1.0
    labels = np.array([[1, 0], [-1, 1]])
    pic = render_overlay(img, labels, scale=3, alpha=0.45)
    assert pic.shape == (12, 12, 3) and pic.dtype == np.uint8
    g = 128.0  # 0.5 * 255 rounded
    for (i, j), color in {(0, 0): GREEN, (0, 1): RED, (1, 0): None, (1, 1): GREEN}.items():
        px = pic[i * 6 + 3, j * 6 + 3].astype(float)  # centre of each cell (off the grid lines)
        expect = np.full(3, g) if color is None else 0.55 * g + 0.45 * np.asarray(color, float)
        assert np.abs(px - expect).max() <= 1.0, (i, j, px, expect)
    assert np.array_equal(pic[6, 3], np.asarray(GRID, np.uint8))  # grid line between the rows of cells


def test_explain_writes_the_png(tmp_path, ssod_model):
    img = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(4))
    res = explain_image(ssod_model, img, label=2, gamma=0.5, path=tmp_path / "sub" / "e.png", min_side=64)
    raw = (tmp_path / "sub" / "e.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pic = cv2.cvtColor(cv2.imread(str(res["path"])), cv2.COLOR_BGR2RGB)
    assert pic.shape == (64, 64, 3) and res["scale"] == 4 and res["size"] == (64, 64)
    with torch.no_grad():
        cls_map = apply_per_position(ssod_model.head, ssod_model.feature_map(img[None]))
    conf = target_confidence(cls_map, torch.tensor([2]))[0]
    assert res["labels"].shape == (4, 4)
    assert np.array_equal(res["labels"], sample_labels_from_confidence(conf, 0.5).numpy())
    assert np.array_equal(pic, render_overlay(img, res["labels"], scale=4))  # the picture is the overlay
    assert res["n_id"] + res["n_ood"] == 16  # gamma 0.5 labels every position
    pred = explain_image(ssod_model, img, None, 0.95, tmp_path / "p.png")
    assert pred["target"] == pred["predicted"] and pred["size"] == (224, 224)
    with pytest.raises(ValueError, match="png"):
        explain_image(ssod_model, img, None, 0.95, tmp_path / "p.jpg")


def test_explain_cli(tmp_path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from oodforge.ssod.cli import explain

    torch.manual_seed(0)
    model = build_model("ssod:small_resnet", 3, 3).eval()
    model.set_image_size((20, 20))
    save_checkpoint(model, tmp_path / "ck", {"class_names": ["a", "b", "c"]})
    photo = (np.random.default_rng(0).uniform(0, 255, (37, 41, 3))).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "in.jpg"), photo)
    app = typer.Typer()
    app.command()(explain)
    r = CliRunner().invoke(app, [str(tmp_path / "ck"), str(tmp_path / "in.jpg"), str(tmp_path / "out.png"),
                                 "--gamma", "0.6", "--label", "1"])
    assert r.exit_code == 0, r.output
    assert "target class 1 (b)" in r.output
    assert cv2.imread(str(tmp_path / "out.png")).shape == (240, 240, 3)  # 20 px image, scale 12
    bad = CliRunner().invoke(app, [str(tmp_path / "ck"), str(tmp_path / "missing.png"), str(tmp_path / "o.png")])
    assert bad.exit_code != 0 and "missing.png" in bad.output
    plain = build_model("small_resnet", 3, 3)
    save_checkpoint(plain, tmp_path / "plain")
    r2 = CliRunner().invoke(app, [str(tmp_path / "plain"), str(tmp_path / "in.jpg"), str(tmp_path / "o.png")])
    assert r2.exit_code != 0 and "OOD head" in r2.output


def test_schedules_and_input_validation():
    from oodforge.ssod.train import PAPER_SETTING

    # (the schedules themselves are the shared loop's: tests/test_training_loop.py)
    assert PAPER_SETTING["lr"] == 1e-4 and PAPER_SETTING["input_size"] == 224
    assert PAPER_SETTING["optimizer"] == "adamw" and PAPER_SETTING["schedule"] == "step"
    model = build_model("ssod:small_resnet", 2, 1)
    unlabelled = ArrayDataset(np.zeros((4, 1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="unlabelled"):
        train_ssod(model, unlabelled, progress=False)
    labelled = ArrayDataset(np.zeros((4, 1, 8, 8), np.uint8), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="balance"):
        train_ssod(model, labelled, balance="none", progress=False)
    with pytest.raises(TypeError, match="SSODModel"):
        train_ssod(build_model("small_resnet", 2, 1), labelled, progress=False)
    hist = train_ssod(model, labelled, epochs=2, batch_size=2, max_steps=3, schedule="step", progress=False)
    assert len(hist["loss"]) == 2 and hist["positions"] == [2 * 2 * 4, 1 * 2 * 4]  # 2 steps, then 1 (2x2 map)
