"""Backbones, checkpoints, training and the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodforge.data.base import ArrayDataset
from oodforge.models import (
    ARCHS,
    build_model,
    extract_features,
    load_checkpoint,
    save_checkpoint,
    train_classifier,
)
from oodforge.models import features as features_mod
from oodforge.models.train import accuracy, augment_batch


@pytest.mark.parametrize("arch", ARCHS)
def test_backbones_follow_the_classifier_contract(arch):
    torch.manual_seed(0)
    m = build_model(arch, 7, 3).eval()
    x = torch.rand(2, 3, 32, 32)
    out = m.forward_all(x)
    assert out.logits.shape == (2, 7)
    assert out.penultimate.shape == (2, m.feature_dim)
    assert out.feature_map.shape[:2] == (2, m.feature_dim)
    # the three stages compose to the forward pass: GAP of the map, then the head
    torch.testing.assert_close(out.penultimate, out.feature_map.mean(dim=(2, 3)))
    torch.testing.assert_close(m(x), m.head(out.penultimate))


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="small_resnet"):
        build_model("resnet999", 10, 1)


def test_checkpoint_round_trip(tmp_path):
    m = build_model("small_resnet", 4, 1, (0.3,), (0.2,))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    save_checkpoint(m, tmp_path / "ckpt", {"class_names": list("abcd")})
    m2, meta = load_checkpoint(tmp_path / "ckpt" / "model.safetensors")
    assert meta["class_names"] == list("abcd") and meta["arch"] == "small_resnet"
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(m.eval()(x), m2(x))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_checkpoint(tmp_path)


def _blobs(n=600, seed=0):
    """Three classes: a bright square in one of three places on a dark noisy image."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 3, n)
    x = g.integers(0, 40, (n, 1, 16, 16)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 0, 2 + 5 * c:6 + 5 * c, 4:12] = 230
    return ArrayDataset(x, y, ["a", "b", "c"])


def test_training_learns_a_separable_problem():
    ds = _blobs()
    m = build_model("small_resnet", 3, 1)
    hist = train_classifier(m, ds, epochs=3, lr=0.05, batch_size=64, progress=False, augment=False)
    assert hist["loss"][-1] < hist["loss"][0]
    assert accuracy(m, _blobs(300, seed=1)) > 0.95


def test_augment_batch_is_a_shifted_or_flipped_copy():
    x = torch.rand(8, 1, 10, 10)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, g, pad=2)
    assert y.shape == x.shape
    # every output is the input (or its mirror) translated by at most 2 pixels in each direction
    for i in range(8):
        ok = False
        for src in (x[i], x[i].flip(-1)):
            padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    ok |= torch.equal(padded[:, dy:dy + 10, dx:dx + 10], y[i])
        assert ok


def test_feature_cache_computes_once(tmp_path, monkeypatch):
    ds = _blobs(100)
    m = build_model("small_resnet", 3, 1).eval()
    calls = []
    real = features_mod._forward
    monkeypatch.setattr(features_mod, "_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = extract_features(m, ds, cache_dir=tmp_path, feature_map=True, progress=False)
    b = extract_features(m, ds, cache_dir=tmp_path, progress=False)  # served by the feature-map entry
    c = extract_features(m, ds, cache_dir=tmp_path, feature_map=True, progress=False)
    assert len(calls) == 1
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.feature_map, c.feature_map)
    assert b.feature_map is None
    # other weights -> another entry
    with torch.no_grad():
        m.head.bias.add_(1.0)
    d = extract_features(m, ds, cache_dir=tmp_path, progress=False)
    assert len(calls) == 2
    torch.testing.assert_close(d.logits, a.logits + 1.0)
    # the cached values are those of a direct forward pass
    with torch.no_grad():
        torch.testing.assert_close(d.logits, m(ds.float_images()))


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    ds = _blobs(50)
    m = build_model("small_resnet", 3, 1).eval()
    a = extract_features(m, ds, cache_dir=tmp_path, progress=False)
    expected = a.logits.clone()  # a is memory-mapped from the entry about to be corrupted
    entries = list(tmp_path.glob("*.features"))
    assert len(entries) == 1
    for f in entries[0].glob("*.npy"):
        f.write_bytes(b"garbage")
    b = extract_features(m, ds, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(expected, b.logits)
