"""A PyTorch user's own Datasets and DataLoaders into extract_features (oodforge.models.torchdata): the user's
transforms as they are, the preprocessing rule (float = [0, 1] pixels unless the model is wrapped with
preprocessed=True), refusals that name the option, and the content-fingerprinted feature cache."""

from __future__ import annotations

import random
import time
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
    """A torchvision-style classifier in miniature: conv1 / layer4 / avgpool / fc, its head's bias set so that
    it predicts the four classes about equally often on random images (the pool of :func:`images`)."""
    torch.manual_seed(seed)
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, 8, 3, padding=1)
    net.layer4 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.fc = nn.Linear(12, 4)
    net.forward = lambda x: net.fc(net.avgpool(net.layer4(net.conv1(x))).flatten(1))
    with torch.no_grad():
        pool = _pool(0).float().div(255)
        net.fc.bias -= net((pool - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).mean(0)
    return net.eval()


def _pool(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (256, 3, 12, 12), dtype=torch.uint8, generator=g)


def images(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images labelled with the tiny model's own predictions, ``n / 4`` of each class (so every
    training image is correctly classified, as class-conditional detectors expect of ID data)."""
    pool, net = _pool(seed), tiny_resnet()
    with torch.no_grad():
        pred = net((pool.float().div(255) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    pred = pred.argmax(1)
    idx = torch.cat([torch.nonzero(pred == c).flatten()[: n // 4] for c in range(4)])
    assert len(idx) == n, "the tiny model predicts some class too rarely"
    idx = idx[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return pool[idx], pred[idx]


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


def _post_hoc() -> list[str]:
    from oodforge.detectors import REGISTRY, available

    return [n for n in available() if REGISTRY[n].__module__.startswith("oodforge.detectors.")]


def test_every_post_hoc_detector_fits_and_scores_from_a_dataloader_as_from_arrays(reference):
    """The issue's done-when: fit and score from a DataLoader over a torch Dataset with a transforms pipeline
    (ToTensor + Normalize, model wrapped with preprocessed=True) equals the ArrayDataset route to 1e-6."""
    from oodforge.bench import _with_images
    from oodforge.detectors import FitContext, clone, create

    x, y, model, _ = reference
    pre = wrap(tiny_resnet(), head="fc", features="layer4", mean=MEAN, std=STD, input_size=(12, 12),
               preprocessed=True)
    xo, _ = images(16, seed=1)
    train_a, val_a, ood_a = ArrayDataset(x[:32], y[:32]), ArrayDataset(x[32:], y[32:]), ArrayDataset(xo)
    tf = Compose(to_tensor, normalize)
    names = _post_hoc()
    assert {"msp", "odin", "gradnorm", "knn", "vim", "ash", "mahalanobis", "fusion"} <= set(names)
    # the paper defaults, except what 32 training images of 12 features cannot hold; then mahalanobis' input
    # noise, a perturbation of the pixels: from ToTensor's [0, 1] pixels to 1e-6; from normalised images, which
    # oodforge maps back to pixels (x * std + mean, one float32 ulp off), to 1e-5 relative (the sign of
    # near-zero gradient entries may flip on that ulp)
    params = {"fusion": {"a": "msp", "b": "energy"}, "knn": {"k": 3}, "nnguide": {"k": 3}, "vim": {"principal_dim": 4},
              "gmm": {"n_components": 4}}
    runs = [(n, params.get(n, {}), tf, pre, 1e-6, 0) for n in names]
    runs += [("mahalanobis", {"noise": 0.001}, to_tensor, model, 1e-6, 0),
             ("mahalanobis", {"noise": 0.001}, tf, pre, 0, 1e-5)]
    for name, kw, transform, m, atol, rtol in runs:
        det = create(name, **kw)
        t0 = time.perf_counter()
        fmap = det.needs_feature_map

        def fs(ds, train=False, det=det, fmap=fmap):
            return _with_images(extract_features(model, ds, progress=False,
                                                 feature_map=fmap and (not train or det.needs_train_feature_map)), ds)

        ref_det = clone(det).fit(FitContext(model=model, train=fs(train_a, True), val=fs(val_a)))
        want = np.concatenate([ref_det.score(fs(val_a)), ref_det.score(fs(ood_a))])
        before = {k: v for k, v in vars(det).items() if not k.endswith("_")}
        train_l, val_l, ood_l = (DataLoader(Photos(a.images, a.labels, transform), batch_size=16)
                                 for a in (train_a, val_a, ood_a))
        det.fit(train_l, model=m, val=val_l)  # the FitContext is built from the loaders
        assert {k: v for k, v in vars(det).items() if not k.endswith("_")} == before, \
            f"{name}: fit changed attributes that do not end in '_'"
        got = np.concatenate([det.score(val_l), det.score(ood_l)])  # read with the classifier it was fitted with
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{name} {kw}")
        assert np.ptp(want) > 0, name  # not a constant score
        print(f"{name} {kw}: {time.perf_counter() - t0:.2f} s")


def test_a_suite_of_torch_data_runs_through_bench_and_the_guard(reference):
    """Suites whose splits are torch DataLoaders (torch_images(loader, model)) go through run_bench and
    GuardedClassifier.fit, with the same scores as the same images in ArrayDatasets."""
    from oodforge.bench import BenchJob, run_bench
    from oodforge.data.base import Suite
    from oodforge.deploy import GuardedClassifier
    from oodforge.models.torchdata import torch_images

    x, y, model, _ = reference
    pre = wrap(tiny_resnet(), head="fc", features="layer4", mean=MEAN, std=STD, input_size=(12, 12),
               preprocessed=True)
    xo, _ = images(16, seed=1)
    parts = {"train": (x[:24], y[:24]), "test": (x[24:36], y[24:36]), "val": (x[36:], y[36:]),
             "ood": (xo, torch.full((16,), -1))}
    tf = Compose(to_tensor, normalize)
    loaders = {k: torch_images(DataLoader(Photos(a, b, tf), batch_size=8), pre) for k, (a, b) in parts.items()}
    arrays = {k: ArrayDataset(a, b) for k, (a, b) in parts.items()}

    def suite(d):
        return Suite("mine", d["train"], d["test"], {"o": d["ood"]}, class_names=list("abcd"), id_val=d["val"])

    g_torch = GuardedClassifier.fit(pre, suite(loaders), "energy", target=0.9)
    g_array = GuardedClassifier.fit(model, suite(arrays), "energy", target=0.9)
    assert g_torch.threshold == pytest.approx(g_array.threshold, abs=1e-6)
    for k in ("id_val", "id", "o"):
        np.testing.assert_allclose(g_torch.fit_scores[k], g_array.fit_scores[k], atol=1e-6)
    res = run_bench(suite(loaders), [BenchJob(pre, ["msp"])], progress=False, log=lambda *a: None)
    ref = run_bench(suite(arrays), [BenchJob(model, ["msp"])], progress=False, log=lambda *a: None)
    assert res["methods"]["msp"]["o"]["auroc"] == pytest.approx(ref["methods"]["msp"]["o"]["auroc"])
