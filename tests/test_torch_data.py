"""A PyTorch user's own Datasets and DataLoaders into extract_features (oodforge.models.torchdata): the user's
transforms as they are, the preprocessing rule (float = [0, 1] pixels unless the model is wrapped with
preprocessed=True), refusals that name the option, and the content-fingerprinted feature cache."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler

from oodforge.data.base import ArrayDataset
from oodforge.models.features import extract_features
from oodforge.models.torchdata import TorchImages
from oodforge.models.wrap import wrap

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def tiny_resnet(seed: int = 0) -> nn.Module:
    """A torchvision-style classifier in miniature: conv1 / layer1..layer4 / avgpool / fc."""
    torch.manual_seed(seed)
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 8, 3, padding=1)
    net.layer4 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.fc = nn.Linear(12, 4)
    net.forward = lambda x: net.fc(net.avgpool(net.layer4(net.conv1(x))).flatten(1))
    return net.eval()


def images(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g), torch.arange(n) % 4


# torchvision-style transforms as plain callables: an HWC uint8 array in, a CHW float tensor out
def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().div(255)


def normalize(t: torch.Tensor) -> torch.Tensor:
    return (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


class Compose:
    def __init__(self, *fs):
        self.fs = fs

    def __call__(self, x):
        for f in self.fs:
            x = f(x)
        return x


class Photos(Dataset):
    """A user's dataset: HWC uint8 arrays through a transform, like a torchvision ImageFolder."""

    classes = ["a", "b", "c", "d"]

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None):
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        img = self.x[i]
        return (self.transform(img) if self.transform else img), int(self.y[i])


@pytest.fixture(scope="module")
def reference():
    x, y = images()
    model = wrap(tiny_resnet(), head="fc", features="layer4", mean=MEAN, std=STD, input_size=(12, 12))
    return x, y, model, extract_features(model, ArrayDataset(x, y), progress=False)


def test_loaders_and_datasets_give_the_array_route_features(reference):
    x, y, model, ref = reference
    pre = wrap(tiny_resnet(), head="fc", features="layer4", mean=MEAN, std=STD, input_size=(12, 12),
               preprocessed=True)
    routes = {
        "raw arrays (no transform)": (model, Photos(x, y)),
        "ToTensor, Dataset": (model, Photos(x, y, to_tensor)),
        "ToTensor, DataLoader": (model, DataLoader(Photos(x, y, to_tensor), batch_size=10)),
        "ToTensor + Normalize, preprocessed=True": (pre, DataLoader(Photos(x, y, Compose(to_tensor, normalize)),
                                                                    batch_size=16, num_workers=0)),
    }
    for what, (m, data) in routes.items():
        fs = extract_features(m, data, progress=False)
        assert torch.equal(fs.labels, y), what
        np.testing.assert_allclose(fs.logits.numpy(), ref.logits.numpy(), atol=1e-6, err_msg=what)
        np.testing.assert_allclose(fs.penultimate.numpy(), ref.penultimate.numpy(), atol=1e-6, err_msg=what)
    adapter = TorchImages(Photos(x, y, to_tensor))
    assert adapter.class_names == Photos.classes and adapter.image_shape == (3, 12, 12)
    assert torch.equal(adapter.float_images(3, 7), ArrayDataset(x, y).float_images(3, 7))


def test_a_shuffling_loader_is_read_in_dataset_order(reference):
    x, y, model, ref = reference
    fs = extract_features(model, DataLoader(Photos(x, y, to_tensor), batch_size=8, shuffle=True), progress=False)
    assert torch.equal(fs.labels, y)
    np.testing.assert_allclose(fs.logits.numpy(), ref.logits.numpy(), atol=1e-6)


def test_the_preprocessing_rule_refuses_what_it_cannot_read(reference):
    x, y, model, _ = reference
    normalised = Photos(x, y, Compose(to_tensor, normalize))
    with pytest.raises(ValueError, match="preprocessed=True"):  # normalised data, model not told
        extract_features(model, normalised, progress=False)
    wrong = wrap(tiny_resnet(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(12, 12), preprocessed=True)
    with pytest.raises(ValueError, match="mean and std of the transforms"):  # stats that are not the Normalize's
        extract_features(wrong, normalised, progress=False)
    with pytest.warns(UserWarning, match="no negative value"):  # told preprocessed, given [0, 1] pixels
        pre = wrap(tiny_resnet(), mean=MEAN, std=STD, input_size=(12, 12), preprocessed=True)
        try:
            extract_features(pre, Photos(x, y, to_tensor), progress=False)
        except ValueError:
            pass
    sampler = WeightedRandomSampler(torch.ones(len(x)), len(x))
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        extract_features(model, DataLoader(Photos(x, y, to_tensor), batch_size=8, sampler=sampler), progress=False)
    with pytest.raises(ValueError, match="drop_last"):
        extract_features(model, DataLoader(Photos(x, y, to_tensor), batch_size=8, drop_last=True), progress=False)
    with pytest.raises(TypeError, match="yields dicts"):
        extract_features(model, DataLoader([{"image": torch.zeros(3, 12, 12)}], batch_size=1), progress=False)


def test_the_cache_key_is_the_content_and_random_transforms_are_not_cached(reference, tmp_path):
    x, y, model, ref = reference
    calls = []
    hook = model.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        data = Photos(x, y, to_tensor)
        first = extract_features(model, data, progress=False, cache_dir=tmp_path)
        n_first = len(calls)
        again = extract_features(model, Photos(x, y, to_tensor), progress=False, cache_dir=tmp_path)  # new object
        assert len(calls) == n_first and torch.equal(again.logits, first.logits)  # served from the cache
        other = x.clone()
        other[5] = 255 - other[5]
        changed = extract_features(model, Photos(other, y, to_tensor), progress=False, cache_dir=tmp_path)
        assert len(calls) > n_first and not torch.equal(changed.logits[5], first.logits[5])  # a new entry
        assert torch.equal(changed.logits[:5], first.logits[:5])
        entries = sorted(p.name for p in tmp_path.iterdir())
        assert len(entries) == 2

        def flip(t):
            return t.flip(2) if random.random() < 0.5 else t

        random.seed(0)
        augmented = DataLoader(Photos(x, y, Compose(to_tensor, flip)), batch_size=16, shuffle=True)
        with pytest.warns(UserWarning, match="random augmentation"):
            extract_features(model, augmented, progress=False, cache_dir=tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == entries  # nothing cached
        # data that change after the fingerprint was taken (beyond the first items the probe reads) are refused
        mutable = Photos(x, y, to_tensor)
        extract_features(model, mutable, progress=False, cache_dir=tmp_path / "b")
        mutable.x = mutable.x.copy()
        mutable.x[-1] = 255 - mutable.x[-1]
        fresh = TorchImages(mutable)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fresh.cache_refusal() is None
        with pytest.raises(RuntimeError, match="changed between two reads"):
            extract_features(model, mutable, progress=False, cache_dir=tmp_path / "c")
        assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    finally:
        hook.remove()


def test_a_subset_is_its_own_dataset(reference):
    x, y, model, ref = reference
    fs = extract_features(model, Subset(Photos(x, y, to_tensor), list(range(10, 20))), progress=False)
    np.testing.assert_allclose(fs.logits.numpy(), ref.logits[10:20].numpy(), atol=1e-6)
    sub = TorchImages(DataLoader(Photos(x, y, to_tensor), batch_size=4)).subset([1, 3])
    assert torch.equal(sub.labels, y[[1, 3]])
