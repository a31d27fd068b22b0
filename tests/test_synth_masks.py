"""Maskers: CLIPSeg (SHIFT Eq. 3) through the real from-a-folder path, Layer-CAM / Grad-CAM (KIRBY Eq. 2)."""

from __future__ import annotations

import pytest
import torch
from synth_tiny import save_tiny_clipseg
from torch import nn

from oodforge.hub import ModelUnavailableError
from oodforge.models.base import Classifier
from oodforge.synth.masks import dilate_masks, dilation_kernel_size, make_masker, mask_coverage

NAMES = ["t-shirt", "trouser", "bag"]


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


def _images(n, c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


@pytest.mark.parametrize("c,size", [(1, 28), (3, 32), (3, 48)])
def test_clipseg_masks_shapes_ranges_threshold(clipseg_dir, c, size):
    m = make_masker("clipseg", model=str(clipseg_dir), threshold=0.5)
    x, y = _images(5, c, size), torch.tensor([0, 1, 2, 0, 1])
    sal = m.saliency(*m._check(x, y), NAMES)
    assert sal.shape == (5, size, size) and sal.dtype == torch.float32
    assert float(sal.min()) >= 0.0 and float(sal.max()) <= 1.0 and float(sal.std()) > 0
    masks = m(x, y, NAMES)
    assert masks.shape == (5, size, size) and masks.dtype == torch.bool
    assert torch.equal(masks, sal >= 0.5)  # Eq. 3 (our mask = the erased region, P >= lambda)
    # the threshold lambda orders coverage; 0 keeps everything, > max keeps nothing
    covs = [float(mask_coverage(make_masker("clipseg", model=str(clipseg_dir), threshold=t)(x, y, NAMES)).mean())
            for t in (0.0, 0.3, 0.5, 0.7)]
    assert covs[0] == 1.0 and covs == sorted(covs, reverse=True)
    thr = float(sal.max()) + 1e-3
    if thr <= 1.0:
        assert not make_masker("clipseg", model=str(clipseg_dir), threshold=thr)(x, y, NAMES).any()
    # deterministic, and the text prompt ("a photo of a {class}") conditions the map
    assert torch.equal(m.saliency(*m._check(x, y), NAMES), sal)
    other = m.saliency(*m._check(x, torch.tensor([2, 2, 0, 1, 0])), NAMES)
    assert not torch.allclose(other, sal)
    assert m.config()["model"] == str(clipseg_dir.resolve()) and m.config()["prompt"] == "a photo of a {}"


def test_clipseg_single_image_and_errors(clipseg_dir, monkeypatch):
    m = make_masker("clipseg", model=str(clipseg_dir))
    assert m(_images(1, 3, 32), torch.tensor([1]), NAMES).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="class names"):
        m(_images(1, 3, 32), torch.tensor([1]), None)
    with pytest.raises(ModelUnavailableError, match="--clipseg-model"):
        make_masker("clipseg", model=str(clipseg_dir / "missing")).load()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="--clipseg-model"):
        make_masker("clipseg", model="no-such-org/no-such-clipseg").load()
    with pytest.raises(ValueError, match="unknown masker"):
        make_masker("sam")


def test_dilation_grows_masks_by_the_kernel():
    assert dilation_kernel_size(0.0, 512) == 1 and dilation_kernel_size(25 / 512, 512) == 25
    m = torch.zeros(1, 28, 28, dtype=torch.bool)
    m[0, 10, 12] = True
    d = dilate_masks(m, 5 / 28)  # 5x5 square, as the reference code's 25x25 at 512 px
    assert int(d.sum()) == 25 and bool(d[0, 8:13, 10:15].all()) and (d | m).equal(d)


class TwoChannelNet(Classifier):
    """Feature map = [x, 1 - x] at full resolution (1x1 conv + ReLU); head logit_0 = GAP(x) - 0.5 GAP(1 - x).

    The CAMs are then known in closed form for class 0: Layer-CAM (element-wise ReLU of the gradient)
    keeps only the positive channel, A = x; Grad-CAM sums with the signed channel means,
    A = ReLU(x - 0.5 (1 - x)) = ReLU(1.5 x - 0.5).
    """

    def __init__(self):
        super().__init__(2, 1, (0.0,), (1.0,))
        self.body = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.body[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.body[0].bias.copy_(torch.tensor([0.0, 1.0]))
            self.head.weight.copy_(torch.tensor([[1.0, -0.5], [-1.0, 0.0]]))
            self.head.bias.zero_()


def _three_level_image():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 2:14, 2:14] = 0.3  # a ring of dim pixels
    x[..., 5:11, 5:11] = 1.0  # a bright core
    return x


def test_layercam_and_gradcam_match_closed_form():
    net = TwoChannelNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _three_level_image(), torch.tensor([0])
    lc = make_masker("layercam", model=net, threshold=0.2)
    gc = make_masker("gradcam", model=net, threshold=0.2)
    a_lc = lc.saliency(*lc._check(x, y), None)[0]
    a_gc = gc.saliency(*gc._check(x, y), None)[0]
    img = x[0, 0]
    assert torch.allclose(a_lc, img / img.max(), atol=1e-6)  # min-max normalised x
    ref = torch.relu(1.5 * img - 0.5)
    assert torch.allclose(a_gc, ref / ref.max(), atol=1e-6)
    m_lc, m_gc = lc(x, y)[0], gc(x, y)[0]
    assert torch.equal(m_lc, img >= 0.2)  # core + ring
    assert torch.equal(m_gc, img >= 0.9)  # core only
    assert abs(float(mask_coverage(m_lc[None])) - 144 / 256) < 1e-6
    # the classifier is untouched: same weights, still in training mode, no gradients left behind
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    # class 1 has no positive evidence anywhere: empty mask (forge_shift then skips the image)
    assert not lc(x, torch.tensor([1])).any()
    # an unlabelled image (-1) uses the predicted class
    assert torch.equal(lc(x, torch.tensor([-1]))[0], m_lc)


def test_cam_on_a_strided_network_upsamples_to_image_size():
    from oodforge.models import build_model

    net = build_model("small_resnet", 3, 1).eval()
    x = _images(4, 1, 28)
    m = make_masker("layercam", model=net, threshold=0.2)(x, torch.tensor([0, 1, 2, 0]))
    assert m.shape == (4, 28, 28) and m.any(dim=(1, 2)).all()
    g = make_masker("gradcam", model=net, threshold=0.2)
    sal = g.saliency(*g._check(x, torch.tensor([0, 1, 2, 0])), None).flatten(1)
    for row in sal:  # min-max normalised per image (or all zero when the CAM is constant)
        assert (float(row.min()), float(row.max())) in ((0.0, 1.0), (0.0, 0.0))
    with pytest.raises(ValueError, match="--checkpoint"):
        make_masker("layercam", model=None)


def test_max_coverage_keeps_only_the_most_salient_share():
    from oodforge.synth.masks import Masker

    # a ramp saliency: A >= 0.2 covers 80 % of the image; a blob image covers 6 %
    ramp = torch.linspace(0, 1, 100).view(1, 10, 10)
    blob = torch.zeros(1, 10, 10)
    blob[0, 4:6, 4:7] = 1.0
    sal = torch.cat([ramp, blob])
    paper = Masker(threshold=0.2).threshold_maps(sal.clone())
    capped = Masker(threshold=0.2, max_coverage=0.5).threshold_maps(sal.clone())
    assert mask_coverage(paper).tolist() == pytest.approx([0.8, 0.06])
    assert mask_coverage(capped).tolist() == pytest.approx([0.5, 0.06])  # the blob is under the cap: unchanged
    assert capped[0].flatten()[50:].all() and not capped[0].flatten()[:50].any()  # the top half of the ramp
    assert torch.equal(capped[1], paper[1])
    assert "max_coverage" in Masker(max_coverage=0.5).config() and "max_coverage" not in Masker().config()
    with pytest.raises(ValueError, match="max_coverage"):
        Masker(max_coverage=0.0)
