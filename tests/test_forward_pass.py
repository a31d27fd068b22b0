"""Issue 25 item 6: the feature pass in inference mode (pinned, non-blocking copies and autocast on CUDA only)
computes on the CPU exactly what the plain ``no_grad`` loop computed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodforge.data.base import ArrayDataset
from oodforge.models.backbones import build_model
from oodforge.models.features import extract_features


def _tiny():
    torch.manual_seed(0)
    model = build_model("small_resnet", 3, 1, (0.5,), (0.25,)).eval()
    x = np.random.default_rng(0).integers(0, 256, size=(37, 1, 12, 12), dtype=np.uint8)
    return model, ArrayDataset(x, np.arange(37) % 3, ["a", "b", "c"], "fwd/tiny")


def _old_path(model, ds, batch_size):
    """The loop as it was before issue 25: ``no_grad``, a synchronous ``.to(device)``, float32 on the CPU."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            outs.append(model.forward_all(ds.float_images(i, i + batch_size).to("cpu")))
    return {f: torch.cat([getattr(o, f).float() for o in outs]) for f in ("logits", "penultimate", "feature_map")}


@pytest.mark.parametrize("cached", [False, True])
def test_cpu_features_are_bit_identical_to_the_plain_no_grad_loop(tmp_path, cached):
    model, ds = _tiny()
    ref = _old_path(model, ds, 16)
    fs = extract_features(model, ds, batch_size=16, feature_map=True, progress=False,
                          cache_dir=tmp_path if cached else None)
    for f in ("logits", "penultimate", "feature_map"):
        assert torch.equal(getattr(fs, f), ref[f]), f
    assert not fs.logits.is_inference() and not fs.labels.is_inference()  # usable with autograd and in place
    fs.penultimate.add_(0)  # an in-place op on the features works outside inference mode


def test_mixed_precision_is_cuda_only_and_named():
    model, ds = _tiny()
    with pytest.raises(ValueError, match="CUDA only"):
        extract_features(model, ds, amp="bf16", progress=False)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        extract_features(model, ds, amp="fp8", progress=False)
