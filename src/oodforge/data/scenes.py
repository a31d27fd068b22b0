"""The ``scenes`` suite: Fashion-MNIST objects composited onto crops of real photographs (32x32 RGB).

Why: Fashion-MNIST images have a black background, so nothing in them resembles the
"background-only" OOD images of Ming et al. (2022), which the SHIFT paper (section 5.7) points to:
images that keep the training backgrounds but lose the ID object lie near the classifier's decision
boundaries, and they are exactly what SHIFT / KIRBY forge (erase the object, keep the background)
and what SSOD samples from feature-map positions. ``scenes`` gives every ID image a real-photo
background, so both object and background carry signal, and adds OOD sets that test it:

* ``backgrounds`` (near): crops of the *test* photos with no object;
* ``digits-on-scenes`` (near): real handwritten digits (sklearn) composited the same way onto
  test-photo crops: a new object on familiar-looking backgrounds;
* ``textures`` and ``noise`` (far): the generic sets of :mod:`oodforge.data.ood_sets` at 32x32x3.

Compositing (:func:`composite`): the 28x28 object is area-resized to a random side of 22-26 px and put at
a random position; its alpha mask is its own intensity (``clip(4 * (v - 0.02), 0, 1)``); it is
painted with a colour sampled from the background crop (half-desaturated towards white), with a
brightness chosen *against* the background under it (bright object on a dark background, dark on a
bright one) and its own intensity pattern kept as shading, so the object stays visible.

Train and test use DISJOINT photos (:data:`SCENES_TRAIN_PHOTOS`, :data:`SCENES_TEST_PHOTOS`; every
test-time background, and every OOD background, comes from a photo the classifier never saw), and
Fashion-MNIST train / test objects respectively. Built arrays are cached as ``.npz`` (see
:func:`oodforge.data.loaders.cached_arrays`); the build records, for every image, the photo it was
cut from and the source object index (:attr:`ScenesBuild.provenance`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from oodforge.data.base import ArrayDataset, Suite, luma
from oodforge.data.fashion import FASHION_MNIST_CLASSES, fashion_files, load_fashion_mnist
from oodforge.data.loaders import cached_arrays, stratified_indices
from oodforge.data.ood_sets import digit_objects, make_ood_set, photo_crops, rng_for

__all__ = [
    "SCENES_TRAIN_PHOTOS",
    "SCENES_TEST_PHOTOS",
    "SCENES_SIZES",
    "SCENES_VERSION",
    "ScenesBuild",
    "composite",
    "build_scenes",
]

#: Photos whose crops are the backgrounds of the ID *training* images.
SCENES_TRAIN_PHOTOS = (
    "astronaut", "coffee", "rocket", "china", "immunohistochemistry", "camera", "coins", "moon",
)
#: Photos whose crops are the backgrounds of ID *test* images and of the OOD sets (disjoint from the above).
SCENES_TEST_PHOTOS = (
    "chelsea", "flower", "grace_hopper", "motorcycle", "hubble_deep_field", "retina", "clock", "text",
)
SCENES_SIZES = {
    False: {"train": 20_000, "test": 4_000, "ood": 2_000},
    True: {"train": 2_000, "test": 500, "ood": 300},
}
SCENES_VERSION = 1
SIZE = 32
_OBJECT_SIDES = (22, 26)
_CHUNK = 1024


@dataclass
class ScenesBuild:
    """The built suite plus, per part, where each image came from.

    ``provenance[part]`` has ``"photo"`` (the name of the photo each background was cut from) and,
    for composited parts, ``"object_index"`` (index into Fashion-MNIST train/test, or into
    sklearn ``load_digits`` for ``digits-on-scenes``).
    """

    suite: Suite
    provenance: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def composite(objects: np.ndarray, backgrounds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paste gray objects onto RGB backgrounds.

    ``objects``: float ``[N, h, w]`` in [0, 1] (bright object on black, like Fashion-MNIST);
    ``backgrounds``: uint8 ``[N, S, S, 3]``. Returns uint8 ``[N, 3, S, S]``. See the module
    docstring for the recipe; every random choice comes from ``rng``.
    """
    import cv2

    n, s = objects.shape[0], backgrounds.shape[1]
    sides = rng.integers(_OBJECT_SIDES[0], _OBJECT_SIDES[1] + 1, n)
    ys = (rng.random(n) * (s - sides + 1)).astype(int)
    xs = (rng.random(n) * (s - sides + 1)).astype(int)
    pick = rng.integers(0, s * s, n)  # background pixel whose colour tints the object
    canvas = np.zeros((n, s, s), np.float32)
    src = np.ascontiguousarray(objects, dtype=np.float32)
    h, w = src.shape[1:]
    for side in np.unique(sides):
        sel = np.flatnonzero(sides == side)
        side = int(side)
        # area (box-filter) resizing is separable and linear: out = Ay @ X @ Ax^T, batched over images;
        # the matrices are cv2's own INTER_AREA weights, read off by resizing an identity matrix
        ay = cv2.resize(np.eye(h, dtype=np.float32), (h, side), interpolation=cv2.INTER_AREA)
        ax = cv2.resize(np.eye(w, dtype=np.float32), (w, side), interpolation=cv2.INTER_AREA)
        res = ay @ src[sel] @ ax.T
        for j, i in enumerate(sel):
            canvas[i, ys[i] : ys[i] + side, xs[i] : xs[i] + side] = res[j]
    # channel-first float32 throughout: broadcasting over [N, 1, S, S] is far faster than over [..., 3]
    bg = backgrounds.transpose(0, 3, 1, 2).astype(np.float32)
    bg *= 1.0 / 255.0  # [N, 3, S, S]
    alpha = np.clip(4.0 * (canvas - 0.02), 0.0, 1.0)[:, None]  # [N, 1, S, S]
    lum = luma(bg, axis=1)
    lum_under = (alpha[:, 0] * lum).sum((1, 2)) / alpha.sum((1, 2, 3)).clip(1e-6)
    # object colour: a background pixel's colour, normalised to max 1 and half-desaturated
    colour = bg.reshape(n, 3, -1)[np.arange(n), :, pick]  # [N, 3]
    colour = 0.5 * colour / colour.max(axis=1, keepdims=True).clip(1e-3) + 0.5
    # shading keeps the object's own intensity pattern; brightness range chosen against the background
    rel = canvas / canvas.max(axis=(1, 2), keepdims=True).clip(1e-6)
    bright = lum_under < 0.5
    lo = np.where(bright, 0.55, 0.04).astype(np.float32)[:, None, None]
    hi = np.where(bright, 1.0, 0.45).astype(np.float32)[:, None, None]
    shade = (lo + (hi - lo) * rel)[:, None]  # [N, 1, S, S]
    obj = shade * colour[:, :, None, None]
    obj -= bg
    obj *= alpha
    bg += obj  # = alpha * object + (1 - alpha) * background
    bg *= 255.0
    bg += 0.5
    np.clip(bg, 0, 255, out=bg)
    return bg.astype(np.uint8)


def _composited(objects: np.ndarray, photos: tuple[str, ...], rng: np.random.Generator, progress: bool, desc: str):
    from ..progress import progress_bar

    n = objects.shape[0]
    bgs, which = photo_crops(list(photos), n, SIZE, rng)
    out = np.empty((n, 3, SIZE, SIZE), np.uint8)
    for s in progress_bar(range(0, n, _CHUNK), desc=desc, disable=not progress or n < 4 * _CHUNK, leave=False):
        out[s : s + _CHUNK] = composite(objects[s : s + _CHUNK], bgs[s : s + _CHUNK], rng)
    return out, which


def _build_arrays(data_root, seed: int, quick: bool, progress: bool) -> dict[str, np.ndarray]:
    sizes = SCENES_SIZES[quick]
    arrays: dict[str, np.ndarray] = {}
    for part, split, photos in (("train", "train", SCENES_TRAIN_PHOTOS), ("test", "test", SCENES_TEST_PHOTOS)):
        fm = load_fashion_mnist(split, data_root)
        idx = stratified_indices(fm.labels.numpy(), sizes[part], seed)
        rng = rng_for(f"scenes/{part}", seed)
        objs = fm.images.numpy()[idx, 0].astype(np.float32) / 255.0
        imgs, which = _composited(objs, photos, rng, progress, f"scenes {part}")
        arrays[f"{part}/images"] = imgs
        arrays[f"{part}/labels"] = fm.labels.numpy()[idx]
        arrays[f"{part}/photo"] = np.asarray(photos)[which]
        arrays[f"{part}/object_index"] = idx

    n = sizes["ood"]
    rng = rng_for("scenes/backgrounds", seed)
    bgs, which = photo_crops(list(SCENES_TEST_PHOTOS), n, SIZE, rng)
    arrays["backgrounds/images"] = np.ascontiguousarray(bgs.transpose(0, 3, 1, 2))
    arrays["backgrounds/photo"] = np.asarray(SCENES_TEST_PHOTOS)[which]

    rng = rng_for("scenes/digits-on-scenes", seed)
    didx = np.concatenate([rng.permutation(1797) for _ in range(-(-n // 1797))])[:n]
    objs = digit_objects(didx, 28)
    imgs, which = _composited(objs, SCENES_TEST_PHOTOS, rng, progress, "scenes digits")
    arrays["digits-on-scenes/images"] = imgs
    arrays["digits-on-scenes/photo"] = np.asarray(SCENES_TEST_PHOTOS)[which]
    arrays["digits-on-scenes/object_index"] = didx
    return arrays


def build_scenes(
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ScenesBuild:
    """Build (or load from the cache) the ``scenes`` suite; see the module docstring.

    Sizes: train 20,000 / test 4,000 / each OOD set 2,000 (``quick``: 2,000 / 500 / 300); ID
    objects are a stratified, seeded sample of Fashion-MNIST train / test (10 classes, equal counts).
    """
    sizes = SCENES_SIZES[quick]
    stamp = [(p.name, p.stat().st_size) for split in ("train", "test") for p in fashion_files(split, data_root)]
    params = {"version": SCENES_VERSION, "seed": seed, "quick": quick, "sizes": sizes, "fashion": stamp,
              "train_photos": SCENES_TRAIN_PHOTOS, "test_photos": SCENES_TEST_PHOTOS}
    a = cached_arrays("scenes", params, lambda: _build_arrays(data_root, seed, quick, progress), cache_dir, use_cache)
    # identities are feature-cache keys: a new SCENES_VERSION (a change of the recipe) changes them too
    tag = f"seed{seed}" + ("/quick" if quick else "") + (f"/v{SCENES_VERSION}" if SCENES_VERSION > 1 else "")
    names = list(FASHION_MNIST_CLASSES)
    train = ArrayDataset(a["train/images"], a["train/labels"], names, f"scenes/train/{tag}/n{sizes['train']}")
    test = ArrayDataset(a["test/images"], a["test/labels"], names, f"scenes/test/{tag}/n{sizes['test']}")
    n = sizes["ood"]
    ood = {
        "backgrounds": ArrayDataset(a["backgrounds/images"], None, None, f"scenes/ood/backgrounds/{tag}/n{n}"),
        "digits-on-scenes": ArrayDataset(a["digits-on-scenes/images"], None, None,
                                         f"scenes/ood/digits-on-scenes/{tag}/n{n}"),
        "textures": make_ood_set("textures", n=n, size=SIZE, channels=3, seed=seed),
        "noise": make_ood_set("noise", n=n, size=SIZE, channels=3, seed=seed),
    }
    suite = Suite(
        name="scenes",
        id_train=train,
        id_test=test,
        ood=ood,
        groups={"near": ["backgrounds", "digits-on-scenes"], "far": ["textures", "noise"]},
        class_names=names,
        description=(
            "Fashion-MNIST objects composited onto 32x32 crops of real photos (train/test photos disjoint); "
            "near OOD: object-free backgrounds and digits on the same backgrounds; far OOD: textures, noise"
        ),
    )
    prov = {}
    for part in ("train", "test", "backgrounds", "digits-on-scenes"):
        prov[part] = {k.split("/", 1)[1]: v for k, v in a.items() if k.startswith(part + "/") and not k.endswith(
            ("/images", "/labels"))}
    return ScenesBuild(suite, prov)
