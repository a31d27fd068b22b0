"""Tests for oodforge.data: loaders, OOD sets, photo catalogue, suites (runs in well under a minute)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from oodforge.data import (
    FASHION6_CLASSES,
    FASHION6_HELD_OUT,
    FASHION_MNIST_CLASSES,
    PHOTOS,
    SCENES_TEST_PHOTOS,
    SCENES_TRAIN_PHOTOS,
    SUITES,
    ArrayDataset,
    DatasetFormatError,
    DatasetNotFoundError,
    build_scenes,
    conform,
    list_photos,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    load_suite,
    load_svhn_mat,
    make_ood_set,
    ood_sets,
    photo_provenance,
    photos,
    read_idx,
    scenes,
    stratified_indices,
)
from oodforge.data.fashion import DEFAULT_FASHION_ROOT
from oodforge.data.suites import fashion6_near_classes

REAL_FASHION = (DEFAULT_FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    return path


def make_fake_fashion(root: Path, per_class_train: int, per_class_test: int, gz: bool = True) -> dict:
    """Fashion-MNIST-format files whose pixels encode (class, index) so mappings can be checked."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10), per)).astype(np.uint8)
        n = labels.size
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = labels * 20  # class marker
        imgs[:, 0, 1] = np.arange(n) % 256  # index marker
        imgs[:, 0, 2] = np.arange(n) // 256
        ext = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", imgs, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz)
        out[prefix] = (imgs, labels)
    return out


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    arrays = make_fake_fashion(root, per_class_train=600, per_class_test=100)
    return root, arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_loader_on_tiny_idx(tmp_path, gz):
    arrays = make_fake_fashion(tmp_path, 3, 2, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_fashion_mnist(split, data_root=tmp_path)
        imgs, labels = arrays[prefix]
        assert ds.images.dtype.is_floating_point is False and tuple(ds.images.shape) == (len(labels), 1, 28, 28)
        np.testing.assert_array_equal(ds.images.numpy()[:, 0], imgs)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)
        assert ds.class_names == FASHION_MNIST_CLASSES and ds.identity == f"fashion-mnist/{split}"


def test_fashion_missing_names_apt_package_and_option(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_fashion_mnist("train", data_root=tmp_path / "nowhere")
    msg = str(e.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_idx_corrupt_files_are_named(tmp_path):
    make_fake_fashion(tmp_path, 1, 1)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[2] = 0x42  # unknown type code -> bad magic
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz.*magic"):
        load_fashion_mnist("train", data_root=tmp_path)
    raw[2] = 0x08
    bad.write_bytes(gzip.compress(bytes(raw[:-5])))  # truncated payload
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_fashion_mnist("train", data_root=tmp_path)
    bad.write_bytes(b"\x1f\x8b garbage")  # broken gzip
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        read_idx(bad)
    # labels file given where images expected: wrong number of dimensions
    with pytest.raises(DatasetFormatError, match="3"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", expected_ndim=3)


@pytest.mark.skipif(not REAL_FASHION, reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert tuple(tr.images.shape) == (60000, 1, 28, 28) and tuple(te.images.shape) == (10000, 1, 28, 28)
    assert np.bincount(tr.labels.numpy()).tolist() == [6000] * 10
    assert np.bincount(te.labels.numpy()).tolist() == [1000] * 10
    # Fashion-MNIST objects are bright on a black background
    assert tr.images[:, 0, 0, 0].float().mean() < 5 and tr.images.float().mean() > 60


# ------------------------------------------------------------------------------------------------
# generic loaders


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    a = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(3)]
    b = [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(2)]
    for i, x in enumerate(a):
        _save_png(tmp_path / "zebra" / f"{i}.png", x)
    for i, x in enumerate(b):
        _save_png(tmp_path / "apple" / f"{i}.png", x)
    ds = load_image_folder(tmp_path)
    assert ds.class_names == ["apple", "zebra"]  # sorted
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and tuple(ds.images.shape) == (5, 3, 12, 12)
    np.testing.assert_array_equal(ds.images.numpy()[2], a[0].transpose(2, 0, 1))
    np.testing.assert_array_equal(ds.images.numpy()[0], np.repeat(b[0][None], 3, 0))  # gray -> replicated
    g = load_image_folder(tmp_path / "apple")  # flat folder: unlabelled, all gray -> 1 channel
    assert g.class_names is None and g.labels.tolist() == [-1, -1] and tuple(g.images.shape) == (2, 1, 12, 12)
    small = load_image_folder(tmp_path, size=6, channels=1)
    assert tuple(small.images.shape) == (5, 1, 6, 6)
    # a 2x2 block average of the gray image (area interpolation)
    ref = b[0].reshape(6, 2, 6, 2).astype(float).mean((1, 3))
    assert np.abs(small.images.numpy()[0, 0] - ref).max() <= 1


def test_image_folder_errors(tmp_path):
    _save_png(tmp_path / "c" / "a.png", np.zeros((8, 8), np.uint8))
    _save_png(tmp_path / "c" / "b.png", np.zeros((9, 8), np.uint8))
    with pytest.raises(DatasetFormatError, match="different sizes.*size="):
        load_image_folder(tmp_path)
    (tmp_path / "c" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match="broken.png"):
        load_image_folder(tmp_path, size=8)
    with pytest.raises(DatasetNotFoundError):
        load_image_folder(tmp_path / "missing")


def _cifar_batch(n: int, seed: int, key: str = "labels", nclass: int = 10) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, nclass, n)
    d = {b"data": imgs.reshape(n, 3072), key.encode(): labels.tolist(), b"batch_label": b"x"}
    return d, imgs, labels


def test_cifar10_folder_targz_and_single_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = []
    for i in (1, 2):
        d, x, y = _cifar_batch(4, i)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(d, protocol=2))
        parts.append((x, y))
    d, xt, yt = _cifar_batch(3, 9)
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))

    tr = load_cifar(tmp_path, split="train")  # parent folder is found too
    np.testing.assert_array_equal(tr.images.numpy(), np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(tr.labels.numpy(), np.concatenate([p[1] for p in parts]))
    assert tr.class_names == [f"class{i}" for i in range(10)]
    te = load_cifar(folder, split="test")
    np.testing.assert_array_equal(te.images.numpy(), xt)

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    te2 = load_cifar(archive, split="test")
    np.testing.assert_array_equal(te2.images.numpy(), xt)
    assert te2.identity == te.identity  # same content, same cache key

    one = load_cifar(folder / "data_batch_2")
    np.testing.assert_array_equal(one.labels.numpy(), parts[1][1])
    via_dispatch = load_dataset(archive, split="train")
    assert len(via_dispatch) == 8


def test_cifar100_and_bad_pickles(tmp_path):
    d, x, y = _cifar_batch(5, 3, key="fine_labels", nclass=100)
    d[b"coarse_labels"] = (np.asarray(y) // 5).tolist()
    (tmp_path / "train").write_bytes(pickle.dumps(d))  # modern protocol (numpy array pickles differ)
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                                  b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}))
    fine = load_cifar(tmp_path, "train")
    coarse = load_cifar(tmp_path, "train", label_mode="coarse")
    np.testing.assert_array_equal(fine.labels.numpy(), y)
    np.testing.assert_array_equal(coarse.labels.numpy(), y // 5)
    assert len(fine.class_names) == 100 and len(coarse.class_names) == 20
    with pytest.raises(DatasetFormatError, match="no CIFAR test batches"):
        load_cifar(tmp_path, "test")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil_batch"
    evil.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DatasetFormatError, match="evil_batch.*refusing"):
        load_cifar(evil)
    wrong = tmp_path / "wrong_batch"
    wrong.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match="wrong_batch.*3072"):
        load_cifar(wrong)


def test_svhn_mat(tmp_path):
    import scipy.io

    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9], [5]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    ds = load_svhn_mat(tmp_path / "test_32x32.mat")
    assert ds.labels.tolist() == [0, 1, 2, 0, 9, 5] and ds.class_names == [str(i) for i in range(10)]
    for i in range(6):
        np.testing.assert_array_equal(ds.images.numpy()[i].transpose(1, 2, 0), x[:, :, :, i])
    scipy.io.savemat(tmp_path / "bad.mat", {"X": x})
    with pytest.raises(DatasetFormatError, match="bad.mat.*'y'"):
        load_svhn_mat(tmp_path / "bad.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk" * 10)
    with pytest.raises(DatasetFormatError, match="junk.mat"):
        load_dataset(tmp_path / "junk.mat")


def test_npz_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    nchw = rng.integers(0, 256, (4, 3, 10, 10), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1])
    np.savez(tmp_path / "nhwc.npz", images=nchw.transpose(0, 2, 3, 1), labels=labels,
             class_names=np.array(["a", "b", "c"]))
    np.savez(tmp_path / "nchw_float.npz", x=nchw.astype(np.float32) / 255.0, y=labels)
    np.savez(tmp_path / "gray.npz", images=nchw[:, 0])
    a = load_npz(tmp_path / "nhwc.npz")
    b = load_npz(tmp_path / "nchw_float.npz", images_key="x", labels_key="y")
    np.testing.assert_array_equal(a.images.numpy(), nchw)
    np.testing.assert_array_equal(b.images.numpy(), nchw)  # float round trip is exact
    assert a.class_names == ["a", "b", "c"] and b.labels.tolist() == labels.tolist()
    g = load_dataset(tmp_path / "gray.npz", labels_key=None)
    assert tuple(g.images.shape) == (4, 1, 10, 10) and g.labels.tolist() == [-1] * 4
    with pytest.raises(DatasetFormatError, match="gray.npz.*labels_key=None"):
        load_npz(tmp_path / "gray.npz")
    with pytest.raises(DatasetFormatError, match="found \\['x', 'y'\\]"):
        load_npz(tmp_path / "nchw_float.npz")
    np.savez(tmp_path / "range.npz", images=nchw.astype(np.float32), labels=labels)
    with pytest.raises(DatasetFormatError, match="range.npz.*\\[0, 1\\]"):
        load_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((4, 5, 6, 7), np.uint8), labels=labels)
    with pytest.raises(DatasetFormatError, match="shape.npz.*channel"):
        load_npz(tmp_path / "shape.npz")


def test_load_dataset_dispatch_and_conform(tmp_path, fake_fashion):
    root, arrays = fake_fashion
    ds = load_dataset("fashion-mnist:test", data_root=root, size=32, channels=3)
    assert tuple(ds.images.shape) == (1000, 3, 32, 32) and ds.identity == "fashion-mnist/test[c3,32x32]"
    assert load_dataset(root, split="train").identity == "fashion-mnist/train"
    _save_png(tmp_path / "imgs" / "k" / "0.png", np.full((20, 20, 3), (255, 0, 0), np.uint8))
    red = load_dataset(tmp_path / "imgs", channels=1)
    assert red.images.numpy()[0, 0, 0, 0] == round(255 * 0.299)  # ITU-R 601 luma
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_dataset(tmp_path / "nothing.npz")
    # conform keeps a uniform image uniform (anti-aliased bilinear resize)
    flat = ArrayDataset(np.full((2, 1, 28, 28), 77, np.uint8))
    assert (conform(flat, size=14).images.numpy() == 77).all()


# ------------------------------------------------------------------------------------------------
# photo catalogue and OOD sets


def test_photo_catalogue_provenance():
    cat = list_photos(include_system=False)
    assert len(cat) == len(PHOTOS) == 16
    seen = set()
    for name, img in cat:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 150
        info = photo_provenance(name)
        assert info.source and info.license
        key = img[::7, ::7].tobytes()
        assert key not in seen  # no duplicate pictures (skimage cat == chelsea is listed once)
        seen.add(key)
    assert set(SCENES_TRAIN_PHOTOS).isdisjoint(SCENES_TEST_PHOTOS)
    assert set(SCENES_TRAIN_PHOTOS) | set(SCENES_TEST_PHOTOS) <= set(PHOTOS)


def test_darknet_photos_join_the_pool(tmp_path, monkeypatch):
    img = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "dog.jpg")
    monkeypatch.setattr(photos, "DARKNET_DIR", tmp_path)
    names = [n for n, _ in list_photos()]
    assert names[-1] == "darknet/dog.jpg" and photo_provenance("darknet/dog.jpg").source.endswith("dog.jpg")
    ds = make_ood_set("photos", n=40, size=16, channels=3, seed=0)
    assert ds.identity.endswith("+darknet1")


@pytest.mark.parametrize("name", ["digits", "textures", "photos", "noise"])
def test_ood_sets_deterministic_shape_range(name):
    a = make_ood_set(name, n=60, size=28, channels=1, seed=0)
    b = make_ood_set(name, n=60, size=28, channels=1, seed=0)
    c = make_ood_set(name, n=60, size=28, channels=1, seed=1)
    rgb = make_ood_set(name, n=60, size=32, channels=3, seed=0)
    assert tuple(a.images.shape) == (60, 1, 28, 28) and tuple(rgb.images.shape) == (60, 3, 32, 32)
    assert a.images.dtype == rgb.images.dtype and str(a.images.dtype) == "torch.uint8"
    assert (a.images == b.images).all() and a.identity == b.identity == f"ood/{name}/28x28x1/seed0/n60"
    assert not (a.images == c.images).all() and a.identity != c.identity
    assert (a.labels == -1).all()
    x = a.images.float()
    assert x.std() > 10 and x.max() > 100  # not blank
    assert len({im.tobytes() for im in a.images.numpy()}) == 60  # all distinct


def test_ood_set_contents():
    d = make_ood_set("digits", quick=False, size=28)
    assert len(d) == 1797 and len(make_ood_set("digits", quick=True)) == 300
    border = d.images.numpy()[:, 0, [0, 1, -1, -2]].astype(float)
    assert border.mean() < 2 and d.images.float().mean() > 20  # MNIST-like: dark frame, bright digit
    with pytest.raises(ValueError, match="1797"):
        make_ood_set("digits", n=1798)
    # RGB textures are the gray crops tinted by a colour whose largest channel is 1
    g = make_ood_set("textures", n=30, size=20, channels=1, seed=3).images.numpy().astype(int)
    c = make_ood_set("textures", n=30, size=20, channels=3, seed=3).images.numpy().astype(int)
    assert np.abs(c.max(1) - g[:, 0]).max() <= 1
    # gray photos are the luma of the RGB crops
    pg = make_ood_set("photos", n=30, size=20, channels=1, seed=2).images.numpy().astype(float)
    pc = make_ood_set("photos", n=30, size=20, channels=3, seed=2).images.numpy().astype(float)
    luma = 0.299 * pc[:, 0] + 0.587 * pc[:, 1] + 0.114 * pc[:, 2]
    assert np.abs(pg[:, 0] - luma).max() <= 1
    # noise: blobs are the only piecewise-flat kind -> some images have few distinct values
    nz = make_ood_set("noise", n=30, size=28, channels=1, seed=0).images.numpy()
    distinct = np.array([np.unique(im).size for im in nz])
    assert (distinct < 60).sum() == 10 and (distinct > 70).sum() == 20
    with pytest.raises(KeyError, match="choose from"):
        make_ood_set("svhn")


def test_random_crops_pyramid_matches_direct_area_resize():
    import cv2

    img = photos.load_photo("retina")  # 1411 px: the pyramid path is used
    rng = np.random.default_rng(0)
    crops = ood_sets.random_crops(img, 20, 32, rng)
    rng = np.random.default_rng(0)
    m = min(img.shape[:2])
    lo, hi = max(32, m / 8), 2 * m / 3
    sides = np.exp(rng.uniform(np.log(lo), np.log(hi), 20)).astype(int)
    ys = (rng.random(20) * (img.shape[0] - sides + 1)).astype(int)
    xs = (rng.random(20) * (img.shape[1] - sides + 1)).astype(int)
    flips = rng.random(20) < 0.5
    for i in range(20):
        ref = cv2.resize(img[ys[i] : ys[i] + sides[i], xs[i] : xs[i] + sides[i]], (32, 32), interpolation=cv2.INTER_AREA)
        ref = ref[:, ::-1] if flips[i] else ref
        assert np.abs(crops[i].astype(int) - ref).mean() < 4


# ------------------------------------------------------------------------------------------------
# suites


def test_stratified_indices():
    labels = np.repeat(np.arange(4), [50, 50, 50, 5])
    idx = stratified_indices(labels, 40, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 10, 10, 5]  # a small class gives what it has
    assert (idx == stratified_indices(labels, 40, seed=0)).all() and not (idx == stratified_indices(labels, 40, 1)).all()
    assert (np.diff(idx) > 0).all()


def test_stratified_subset_caps_either_split_and_keeps_class_shares():
    from oodforge.data.base import ArrayDataset, Suite
    from oodforge.data.sampling import stratified_subset

    def ds(counts, name):
        labels = np.repeat(np.arange(len(counts)), counts)
        return ArrayDataset(np.zeros((len(labels), 1, 2, 2), np.uint8), labels, list("abc"), name)

    s = Suite("s", ds([60, 30, 10], "train"), ds([5] * 3, "test"), {}, {"near": [], "far": []},
              id_val=ds([40, 20, 20], "val"))
    capped = stratified_subset(s, 40, seed=0, split="val")
    assert np.bincount(capped.id_val.labels.numpy()).tolist() == [20, 10, 10]  # each class keeps its share
    assert capped.id_train is s.id_train and capped.id_val.identity != s.id_val.identity
    assert np.bincount(stratified_subset(s, 50, 0).id_train.labels.numpy()).tolist() == [30, 15, 5]
    assert stratified_subset(s, 80, 0, split="val") is s and stratified_subset(s, None, 0, split="val") is s
    with pytest.raises(ValueError, match="split"):
        stratified_subset(s, 10, 0, split="test")


def test_fashion_suite_quick(fake_fashion):
    root, arrays = fake_fashion
    s = load_suite("fashion", data_root=root, quick=True)
    # the quick subset holds 3,000 training images; 300 of them (30 per class) are the ID validation split
    assert len(s.id_train) == 2700 and len(s.id_val) == 300 and len(s.id_test) == 600
    assert s.class_names == FASHION_MNIST_CLASSES
    assert np.bincount(s.id_train.labels.numpy()).tolist() == [270] * 10
    assert np.bincount(s.id_val.labels.numpy()).tolist() == [30] * 10
    assert "[val:" in s.id_val.identity and "[train-minus-val:" in s.id_train.identity
    assert np.bincount(s.id_test.labels.numpy()).tolist() == [60] * 10
    assert s.groups == {"near": [], "far": ["digits", "textures", "photos", "noise"]}
    assert {k: len(v) for k, v in s.ood.items()} == {"digits": 300, "textures": 300, "photos": 300, "noise": 300}
    assert all(v.image_shape == (1, 28, 28) for v in s.ood.values())
    # pixels carry their class: every ID image matches its label
    x = s.id_train.images.numpy()[:, 0, 0, 0]
    assert (x == s.id_train.labels.numpy() * 20).all()
    again = load_suite("fashion", data_root=root, quick=True)
    other = load_suite("fashion", data_root=root, quick=True, seed=1)
    assert again.id_train.identity == s.id_train.identity and (again.id_train.images == s.id_train.images).all()
    assert other.id_train.identity != s.id_train.identity and not (other.id_train.images == s.id_train.images).all()


def test_fashion6_suite_remaps_and_holds_out(fake_fashion):
    root, arrays = fake_fashion
    for quick in (False, True):
        s = load_suite("fashion6", data_root=root, quick=quick)
        assert s.class_names == FASHION6_CLASSES == s.id_train.class_names
        assert s.groups["near"] == ["held-out-classes"]
        keep = [FASHION_MNIST_CLASSES.index(c) for c in FASHION6_CLASSES]
        held = [FASHION_MNIST_CLASSES.index(c) for c in FASHION6_HELD_OUT]
        for ds in (s.id_train, s.id_test):
            orig = ds.images.numpy()[:, 0, 0, 0] // 20  # class marker written in the pixels
            assert set(ds.labels.tolist()) == set(range(6))
            assert (np.asarray(keep)[ds.labels.numpy()] == orig).all()  # remap 0..5 -> original class
            assert not np.isin(orig, held).any()
        near = s.ood["held-out-classes"].images.numpy()[:, 0, 0, 0] // 20
        assert np.isin(near, held).all() and set(near.tolist()) == set(held)
        if quick:
            assert (len(s.id_train), len(s.id_val), len(s.id_test), len(s.ood["held-out-classes"])) == (
                2700, 300, 600, 300)
            assert np.bincount(near).tolist()[4:] == [75, 75, 75, 0, 0, 75]
        else:
            assert (len(s.id_train), len(s.id_val), len(s.id_test), len(near)) == (3240, 360, 600, 400)
            assert s.id_train.identity.startswith("fashion6/train[") and s.ood["held-out-classes"].identity == (
                "fashion6/held-out-classes")
            # the near set is exactly the held-out TEST images
            t_imgs, t_labels = arrays["t10k"]
            np.testing.assert_array_equal(s.ood["held-out-classes"].images.numpy()[:, 0], t_imgs[np.isin(t_labels, held)])
            # ... and fashion6_near_classes names each near image's class in the suite's order (the pixel marker)
            names = fashion6_near_classes(root)
            assert len(names) == len(near) and (names == np.array(FASHION_MNIST_CLASSES, dtype=object)[near]).all()


@pytest.mark.skipif(not REAL_FASHION, reason="Debian dataset-fashion-mnist not installed")
def test_fashion6_full_sizes_on_real_data():
    s = load_suite("fashion6")
    assert (len(s.id_train), len(s.id_val), len(s.id_test), len(s.ood["held-out-classes"])) == (
        32400, 3600, 6000, 4000)
    assert {k: len(v) for k, v in s.ood.items() if k != "held-out-classes"} == {
        "digits": 1797, "textures": 2000, "photos": 2000, "noise": 2000}


def test_unknown_suite():
    assert set(SUITES) == {"fashion", "fashion6", "scenes", "clipart"}
    with pytest.raises(KeyError, match="choose from"):
        load_suite("cifar10")


# ------------------------------------------------------------------------------------------------
# scenes


def test_composite_keeps_background_and_shows_object():
    rng = np.random.default_rng(0)
    bgs = photos.load_photo("coffee")[100:132, 200:232][None].repeat(8, 0)
    empty = scenes.composite(np.zeros((8, 28, 28), np.float32), bgs, rng)
    np.testing.assert_array_equal(empty, bgs.transpose(0, 3, 1, 2))  # no object -> background untouched
    obj = np.zeros((8, 28, 28), np.float32)
    obj[:, 4:24, 6:22] = np.linspace(0.4, 1.0, 16)[None, None]  # a shaded rectangle
    out = scenes.composite(obj, bgs, rng).astype(float)
    changed = np.abs(out - bgs.transpose(0, 3, 1, 2)).max(1) > 0
    assert 0.2 < changed.mean() < 0.6  # object of 22-26 px on a 32x32 canvas
    lum = lambda x: 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # noqa: E731
    diff = np.abs(lum(out) - lum(bgs.transpose(0, 3, 1, 2).astype(float)))
    assert diff[changed].mean() > 50  # the object contrasts with its background
    # the object's own shading survives: left and right halves of the painted rectangle differ
    assert np.std(lum(out)[changed]) > 5


def test_scenes_quick_build_disjoint_backgrounds_and_cache(fake_fashion, tmp_path, monkeypatch):
    root, arrays = fake_fashion
    b = build_scenes(root, seed=0, quick=True, cache_dir=tmp_path / "c")
    s = b.suite
    assert (len(s.id_train), len(s.id_test)) == (2000, 500)
    assert {k: len(v) for k, v in s.ood.items()} == {"backgrounds": 300, "digits-on-scenes": 300, "textures": 300,
                                                     "noise": 300}
    assert s.image_shape == (3, 32, 32) and all(v.image_shape == (3, 32, 32) for v in s.ood.values())
    assert s.groups == {"near": ["backgrounds", "digits-on-scenes"], "far": ["textures", "noise"]}
    assert np.bincount(s.id_train.labels.numpy()).tolist() == [200] * 10
    # labels are those of the composited Fashion-MNIST objects (recorded provenance)
    t_imgs, t_labels = arrays["train"]
    assert (t_labels[b.provenance["train"]["object_index"]] == s.id_train.labels.numpy()).all()
    train_photos = set(b.provenance["train"]["photo"].tolist())
    assert train_photos == set(SCENES_TRAIN_PHOTOS)
    for part in ("test", "backgrounds", "digits-on-scenes"):
        used = set(b.provenance[part]["photo"].tolist())
        assert used <= set(SCENES_TEST_PHOTOS) and used.isdisjoint(train_photos), part
    # a cached second build does not recompute, and equals a fresh uncached build
    monkeypatch.setattr(scenes, "_build_arrays", lambda *a, **k: pytest.fail("cache not used"))
    again = build_scenes(root, seed=0, quick=True, cache_dir=tmp_path / "c").suite
    assert (again.id_train.images == s.id_train.images).all() and again.id_test.identity == s.id_test.identity
    assert [p.name for p in (tmp_path / "c").iterdir()] == [p.name for p in (tmp_path / "c").glob("scenes-*.npz")]
    monkeypatch.undo()
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "cache"))
    fresh = build_scenes(root, seed=0, quick=True, use_cache=False).suite
    assert (fresh.ood["digits-on-scenes"].images == s.ood["digits-on-scenes"].images).all()
    other = load_suite("scenes", data_root=root, seed=1, quick=True)
    assert not (other.id_test.images == s.id_test.images).all() and other.id_test.identity != s.id_test.identity


def test_validation_split_is_disjoint_stratified_and_seed_stable():
    import torch

    from oodforge.data.base import ArrayDataset, Suite
    from oodforge.data.suites import with_validation_split

    n = 1000
    imgs = np.arange(n, dtype=np.int64).reshape(n, 1, 1, 1)  # image i holds i (mod 256) ...
    labels = np.arange(n) % 4
    ds = ArrayDataset((imgs % 256).astype(np.uint8), labels, list("abcd"), "unique")
    ids = lambda d: set(d.images.numpy().ravel().tolist())  # noqa: E731

    def split(seed):
        s = Suite("t", ds, ds.subset(np.arange(10)), {}, class_names=list("abcd"))
        return with_validation_split(s, seed, quick=False)

    a, b, c = split(0), split(0), split(1)
    assert len(a.id_val) == 100 and len(a.id_train) == 900
    assert np.bincount(a.id_val.labels.numpy()).tolist() == [25] * 4
    assert a.id_val.identity == b.id_val.identity and torch.equal(a.id_val.images, b.id_val.images)
    assert not torch.equal(a.id_val.images, c.id_val.images)
    # disjoint: together they are the training set exactly once (labels + pixels as a multiset)
    both = np.concatenate([a.id_train.images.numpy().ravel().astype(np.int64) * 4 + a.id_train.labels.numpy(),
                           a.id_val.images.numpy().ravel().astype(np.int64) * 4 + a.id_val.labels.numpy()])
    assert sorted(both.tolist()) == sorted(((imgs % 256).ravel() * 4 + labels).tolist())
    assert ids(a.id_val) <= ids(ds)
