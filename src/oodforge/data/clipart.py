"""The ``clipart`` suite: real colour clip art from Debian's ``openclipart-png`` (public domain), 3x64x64.

Why: oodforge's other suites are Fashion-MNIST, grey or composited onto photos. ``openclipart-png`` ships
about 8,100 colour drawings made by people, sorted into about 22 category folders: the first many-class,
colour ID data available offline that none of us drew, and one an ImageNet backbone has never been trained
on as such (a test of transfer, :mod:`oodforge.models.pretrained`).

How the suite is built (deterministic for the data ``seed``; cached as ``.npz`` by
:func:`oodforge.data.loaders.cached_arrays`):

* **Files**: every ``*.png`` under the root (default ``/usr/share/openclipart/png``) that is not a symlink
  (the package links some drawings into a second category), labelled by its top-level folder. Byte-identical
  files are kept once (the first in path order), and a drawing whose pixels at the suite's size equal an
  earlier kept one is dropped as well. Files above 16 Mpx (17 of them, up to 169 Mpx) are skipped: one
  costs seconds and gigabytes to decode and becomes the same 64 px thumbnail as a smaller copy would.
  ``special`` (gradients, patterns, examples) and ``unsorted`` are not categories of objects and are left
  out entirely.
* **ID classes**: the categories with at least :data:`MIN_IMAGES` (250) unique files: computer (1,797),
  shapes (1,582), signs_and_symbols (1,004), recreation (487), people (345), food (330), animals (286),
  i.e. 7 classes. The rule, not a list, decides, so it is written down here and checked by the tests.
  Each class contributes at most :data:`PER_CLASS` (300) images, a seeded sample, so that computer icons
  do not outnumber animals 6:1 (and a CPU can train on the result); animals keeps all it has.
* **ID split**: stratified per class with the data seed, :data:`TEST_FRACTION` (20 %) to ``id_test``; the
  suite builder then moves 10 % of ``id_train`` into ``id_val`` (:func:`~oodforge.data.suites.load_suite`).
* **near OOD** ``held-out-categories``: every unique image of the other categories (transportation,
  geography, tools, office, buildings, plants, education, electronics, decorations, science, containers,
  logos, buttons: about 800): clip art of the same style and source, other objects.
* **far OOD** ``textures`` and ``noise``: :mod:`oodforge.data.ood_sets` at 3x64x64, :data:`FAR_SIZE` each.
* **Rendering**: PIL decodes the file as RGBA (palette and grey+alpha images included), the drawing is
  cropped to its non-transparent bounding box, flattened onto white by its alpha, padded to a white square
  with a 4 % margin (aspect ratio kept) and area-resized to :data:`CLIPART_SIZE` px.

Image size: 64 px. EfficientNet-Lite0 (the pretrained backbone this suite was made for) runs about 12x
faster at 64 px than at its native 224 px and fine-tunes about 7x faster (one torch thread on the 2 shared
cores: 174.5 vs 14.8 images/s forward, 34.9 vs 5.2 per training step; ``benchmarks/bench_clipart.py``
measures it in every run, ``docs/datasets.md`` lists the numbers); at 64 px a probe, a fine-tune and a small
ResNet trained from scratch, each with every post-hoc detector and SHIFT, fit in well under an hour there.

``quick`` (tests, smoke runs): :data:`QUICK_SIZES` (12 images per ID class, 40 near, 40 per far set) from
the same classes; only the sampled files are decoded.

Identities (feature-cache keys) are stable strings such as
``"clipart/train/64px/seed0/v1/<listing hash>"``: the listing hash changes when the installed files do.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from oodforge.data.base import ArrayDataset, Suite
from oodforge.data.idx import DatasetNotFoundError
from oodforge.data.loaders import cached_arrays
from oodforge.data.ood_sets import make_ood_set
from oodforge.progress import progress_bar

__all__ = ["CLIPART_APT_PACKAGE", "CLIPART_ROOT", "CLIPART_SIZE", "CLIPART_VERSION", "EXCLUDED", "MIN_IMAGES",
           "PER_CLASS", "build_clipart", "clipart_files", "id_categories", "render_clipart"]

CLIPART_APT_PACKAGE = "openclipart-png"
CLIPART_ROOT = Path("/usr/share/openclipart/png")
CLIPART_SIZE = 64
CLIPART_VERSION = 1
#: a category with at least this many unique files is an ID class
MIN_IMAGES = 250
#: at most this many images per ID class (a seeded sample)
PER_CLASS = 300
TEST_FRACTION = 0.2
FAR_SIZE = 500
QUICK_SIZES = {"per_class": 12, "near": 40, "far": 40}
#: folders that are not categories of objects
EXCLUDED = ("special", "unsorted")
MAX_PIXELS = 16_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MARGIN = 0.04


def _root(root: str | os.PathLike | None) -> Path:
    path = Path(root).expanduser() if root is not None else CLIPART_ROOT
    if not path.is_dir() or next(path.glob("*/*.png"), None) is None:
        raise DatasetNotFoundError(
            f"openclipart PNGs not found in {path}: install them with `sudo apt-get install {CLIPART_APT_PACKAGE}` "
            f"(files go to {CLIPART_ROOT}, `make data` does it), or pass --data-root <folder with the category "
            "folders>")
    return path


def clipart_files(root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """``(category, path)`` of every unique drawing (rules in the module docstring: no symlinks, byte-identical
    files once, no file above 16 Mpx, no ``special`` / ``unsorted``), in path order."""
    base = _root(root)
    seen: set[str] = set()
    out = []
    for path in sorted(p for p in base.rglob("*.png") if not p.is_symlink() and p.is_file()):
        category = path.relative_to(base).parts[0]
        if category in EXCLUDED or len(path.relative_to(base).parts) < 2:
            continue
        data = path.read_bytes()
        if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
            continue  # not a PNG: leave it out
        w, h = struct.unpack(">II", data[16:24])  # the header's size: no decoding (some files are 169 Mpx)
        if w * h > MAX_PIXELS:
            continue
        digest = hashlib.sha1(data).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append((category, path))
    return out


def id_categories(files: list[tuple[str, Path]]) -> list[str]:
    """The ID classes: categories with at least :data:`MIN_IMAGES` files, largest first (ties by name)."""
    counts = Counter(c for c, _ in files)
    return sorted((c for c, n in counts.items() if n >= MIN_IMAGES), key=lambda c: (-counts[c], c))


def render_clipart(path: str | os.PathLike, size: int = CLIPART_SIZE) -> np.ndarray | None:
    """One drawing as uint8 ``[3, size, size]``: cropped to its visible part, flattened onto white by its
    alpha, padded to a white square (aspect kept, 4 % margin), area-resized. ``None`` when nothing is visible."""
    import cv2
    from PIL import Image

    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3] / 255.0
    rows, cols = np.flatnonzero(alpha.max(1) > 0), np.flatnonzero(alpha.max(0) > 0)
    if rows.size == 0:
        return None
    rgba, alpha = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    rgb = rgba[..., :3] * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])
    h, w = alpha.shape
    side = int(np.ceil(max(h, w) * (1 + 2 * MARGIN)))
    canvas = np.full((side, side, 3), 255.0, np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    small = cv2.resize(canvas, (size, size), interpolation=interp)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8).transpose(2, 0, 1)


#: files rendered per parallel step when a class needs fewer: the waste past a class's limit stays this small
RENDER_CHUNK = 64


@contextlib.contextmanager
def render_pool(workers: int | None = None):
    """Threads that decode and render drawings (one per core, at most 4): PIL's decoder, OpenCV's resize and
    numpy's array maths release the GIL, and a building suite spends most of its time there (about 2,900
    files). Threads, not processes: a process forked after OpenCV has started its own threads (the Telea
    inpainter of an earlier suite) can deadlock in it, and spawned ones would import torch again."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        yield pool


def _listing_hash(files: list[tuple[str, Path]], root: Path) -> str:
    h = hashlib.sha256()
    for category, path in files:
        h.update(f"{category}/{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return h.hexdigest()[:10]


def _build_arrays(files, classes, size, seed, quick, progress) -> dict[str, np.ndarray]:
    """Decode the sampled files in a seeded order, dropping pixel duplicates; split ID train / test."""
    rng = np.random.default_rng([seed, 0xC11A])
    per_class = QUICK_SIZES["per_class"] if quick else PER_CLASS
    kept: set[bytes] = set()

    def take(paths: list[Path], limit: int | None, desc: str, pool) -> list[np.ndarray]:
        images = []
        bar = progress_bar(total=len(paths), desc=desc, disable=not progress, leave=False)
        start = 0
        while start < len(paths) and (limit is None or len(images) < limit):
            # render the next chunk in parallel, then keep images in path order: the serial loop's result
            need = len(paths) - start if limit is None else limit - len(images)
            chunk = paths[start:start + max(need, RENDER_CHUNK)]
            start += len(chunk)
            for img in pool.map(render_clipart, chunk, itertools.repeat(size)):
                bar.update(1)
                if limit is not None and len(images) >= limit:
                    break
                if img is None:
                    continue
                digest = hashlib.sha1(img.tobytes()).digest()
                if digest in kept:
                    continue
                kept.add(digest)
                images.append(img)
        bar.close()
        return images

    train_x, train_y, test_x, test_y = [], [], [], []
    with render_pool() as pool:
        for label, category in enumerate(classes):
            paths = [p for c, p in files if c == category]
            order = rng.permutation(len(paths))
            images = take([paths[i] for i in order], per_class, f"clipart {category}", pool)
            n_test = max(1, int(round(TEST_FRACTION * len(images))))
            split = rng.permutation(len(images))
            test_x += [images[i] for i in sorted(split[:n_test])]
            train_x += [images[i] for i in sorted(split[n_test:])]
            test_y += [label] * n_test
            train_y += [label] * (len(images) - n_test)
        held = [p for c, p in files if c not in classes]
        if quick:
            held = [held[i] for i in np.sort(rng.choice(len(held), min(len(held), 3 * QUICK_SIZES["near"]), replace=False))]
        near = take(held, QUICK_SIZES["near"] if quick else None, "clipart held-out categories", pool)
    return {"train/images": np.stack(train_x), "train/labels": np.asarray(train_y, np.int64),
            "test/images": np.stack(test_x), "test/labels": np.asarray(test_y, np.int64),
            "near/images": np.stack(near)}


def build_clipart(root: str | os.PathLike | None = None, seed: int = 0, quick: bool = False,
                  cache_dir: str | os.PathLike | None = None, use_cache: bool = True, progress: bool = True) -> Suite:
    """Build (or load from the cache) the ``clipart`` suite; see the module docstring.

    ``root`` is the folder with the category folders (default ``/usr/share/openclipart/png``, from the
    ``openclipart-png`` Debian package); a missing one raises :class:`DatasetNotFoundError` naming the package.
    """
    base = _root(root)
    files = clipart_files(base)
    classes = id_categories(files)
    listing = _listing_hash(files, base)
    size = CLIPART_SIZE
    params = {"version": CLIPART_VERSION, "seed": seed, "quick": quick, "size": size, "listing": listing,
              "classes": classes, "min_images": MIN_IMAGES, "per_class": PER_CLASS, "test_fraction": TEST_FRACTION,
              "quick_sizes": QUICK_SIZES}
    a = cached_arrays("clipart", params, lambda: _build_arrays(files, classes, size, seed, quick, progress),
                      cache_dir, use_cache)
    # identities are feature-cache keys: the recipe version and the installed files' listing are part of them
    tag = f"{size}px/seed{seed}" + ("/quick" if quick else "") + f"/v{CLIPART_VERSION}/{listing}"
    train = ArrayDataset(a["train/images"], a["train/labels"], classes, f"clipart/train/{tag}")
    test = ArrayDataset(a["test/images"], a["test/labels"], classes, f"clipart/test/{tag}")
    far_n = QUICK_SIZES["far"] if quick else FAR_SIZE
    ood = {
        "held-out-categories": ArrayDataset(a["near/images"], None, None, f"clipart/ood/held-out-categories/{tag}"),
        "textures": make_ood_set("textures", n=far_n, size=size, channels=3, seed=seed),
        "noise": make_ood_set("noise", n=far_n, size=size, channels=3, seed=seed),
    }
    return Suite(
        name="clipart",
        id_train=train,
        id_test=test,
        ood=ood,
        groups={"near": ["held-out-categories"], "far": ["textures", "noise"]},
        class_names=list(classes),
        description=(f"openclipart colour drawings, {len(classes)} categories with >= {MIN_IMAGES} images "
                     f"(3x{size}x{size}); near OOD: the held-out categories; far OOD: textures, noise"),
    )
