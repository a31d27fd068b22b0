"""The ``clipart`` suite (oodforge.data.clipart): the quick suite builds from Debian's openclipart-png with the
documented classes and shapes, ID train / val / test are disjoint, no near-OOD image is an ID image, the
rendering flattens transparency onto white, and a missing package gets an error naming it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from oodforge.data.clipart import (
    CLIPART_APT_PACKAGE,
    CLIPART_ROOT,
    CLIPART_SIZE,
    MIN_IMAGES,
    build_clipart,
    clipart_files,
    id_categories,
    render_clipart,
)
from oodforge.data.idx import DatasetNotFoundError
from oodforge.data.suites import SUITES, load_suite

needs_clipart = pytest.mark.skipif(not CLIPART_ROOT.is_dir(), reason=f"Debian's {CLIPART_APT_PACKAGE} is not installed")


def _hashes(ds) -> set[bytes]:
    return {hashlib.sha1(img.tobytes()).digest() for img in ds.images.numpy()}


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    return load_suite("clipart", quick=True, cache_dir=tmp_path_factory.mktemp("clipart-data"))


@needs_clipart
def test_quick_suite_shapes_and_groups(quick_suite):
    s = quick_suite
    assert "clipart" in SUITES and s.name == "clipart"
    assert s.class_names == ["computer", "shapes", "signs_and_symbols", "recreation", "people", "food", "animals"]
    assert s.image_shape == (3, CLIPART_SIZE, CLIPART_SIZE)
    assert s.groups == {"near": ["held-out-categories"], "far": ["textures", "noise"]}
    for ds in (s.id_train, s.id_val, s.id_test, *s.ood.values()):
        assert ds.images.dtype.is_floating_point is False and tuple(ds.images.shape[1:]) == (3, 64, 64)
    # every class in every ID split (stratified), 12 per class before the splits
    for ds in (s.id_train, s.id_val, s.id_test):
        assert set(np.unique(ds.labels.numpy())) == set(range(7))
    assert len(s.id_train) + len(s.id_val) + len(s.id_test) == 7 * 12
    assert len(s.ood["held-out-categories"]) == 40 and len(s.ood["textures"]) == 40 == len(s.ood["noise"])
    # drawings on white: the border pixels are mostly white
    border = s.id_train.images[:, :, 0, :].float().mean()
    assert border > 200


@needs_clipart
def test_id_splits_disjoint_and_near_ood_not_id(quick_suite):
    s = quick_suite
    train, val, test, near = (_hashes(d) for d in (s.id_train, s.id_val, s.id_test, s.ood["held-out-categories"]))
    assert not (train & test) and not (train & val) and not (val & test)
    assert not (near & (train | val | test))


@needs_clipart
def test_category_rule_and_stable_identities(tmp_path):
    files = clipart_files()
    classes = id_categories(files)
    counts = {c: sum(1 for cc, _ in files if cc == c) for c in {c for c, _ in files}}
    assert all(counts[c] >= MIN_IMAGES for c in classes)
    assert all(n < MIN_IMAGES for c, n in counts.items() if c not in classes)
    assert "special" not in counts and "unsorted" not in counts
    assert len({p for _, p in files}) == len(files) and not any(p.is_symlink() for _, p in files)
    a = build_clipart(quick=True, cache_dir=tmp_path, progress=False)
    b = build_clipart(quick=True, cache_dir=tmp_path, progress=False)  # from the cache
    assert a.id_train.identity == b.id_train.identity and a.id_train.identity.startswith("clipart/train/64px/seed0/quick")
    assert np.array_equal(a.id_test.images.numpy(), b.id_test.images.numpy())


def test_render_flattens_alpha_onto_white_and_crops(tmp_path):
    rgba = np.zeros((40, 100, 4), np.uint8)  # transparent, with an opaque red box and a half-transparent blue one
    rgba[10:30, 20:40] = (255, 0, 0, 255)
    rgba[10:30, 60:80] = (0, 0, 255, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = render_clipart(tmp_path / "a.png", 32)
    assert img.shape == (3, 32, 32) and img.dtype == np.uint8
    assert (img[:, 0, :] == 255).all()  # padding above the cropped drawing is white
    red = img[:, 16, 5]
    assert red[0] > 240 and red[1] < 30  # the opaque box keeps its colour
    blue = img[:, 16, 26]
    assert blue[2] > 240 and 110 < blue[0] < 145  # half alpha over white: (0 + 255) / 2
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(tmp_path / "empty.png")
    assert render_clipart(tmp_path / "empty.png", 32) is None


def test_missing_package_names_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install openclipart-png"):
        build_clipart(root=tmp_path / "nowhere", quick=True, cache_dir=tmp_path)


@needs_clipart
def test_parallel_rendering_gives_the_one_process_arrays(monkeypatch):
    """The suite is rendered by four threads; with one the arrays are the same, byte for byte: the threads only
    change when the files are decoded, not which are kept or in what order."""
    import oodforge.data.clipart as clipart

    files = clipart_files()
    classes = id_categories(files)
    real_pool = clipart.render_pool
    monkeypatch.setattr(clipart, "render_pool", lambda workers=None: real_pool(workers=4))
    pooled = clipart._build_arrays(files, classes, CLIPART_SIZE, 0, True, False)
    monkeypatch.setattr(clipart, "render_pool", lambda workers=None: real_pool(workers=1))
    serial = clipart._build_arrays(files, classes, CLIPART_SIZE, 0, True, False)
    assert pooled.keys() == serial.keys()
    assert all(np.array_equal(pooled[k], serial[k]) for k in pooled)
