"""OOD test sets built from real data that ships offline, at any size and channel count.

The standard far-OOD benchmarks (SVHN, DTD textures, LSUN, Places, iSUN; SHIFT Table 1) cannot be
downloaded on our machines, so oodforge builds their closest offline stand-ins from real images:

=========  ==========================================================================  ====  =====
name       what                                                                        full  quick
=========  ==========================================================================  ====  =====
digits     scikit-learn ``load_digits``: 1,797 real 8x8 handwritten digits (UCI),     1797   300
           upsampled into an MNIST-like 20/28 box with +-2 px jitter (SVHN / MNIST
           stand-in)
textures   random crops of scikit-image ``brick``, ``grass``, ``gravel`` (CC0), random  2000   300
           scale / 90-degree rotation / flip (DTD stand-in)
photos     random crops of the real photographs in :mod:`oodforge.data.photos`          2000   300
           (LSUN / Places / iSUN stand-in)
noise      one third each: Gaussian, uniform, and "blobs" (smoothed noise             2000   300
           thresholded into two-colour shapes)
=========  ==========================================================================  ====  =====

Every set is a function ``f(n, size, channels, seed) -> ArrayDataset`` (uint8, labels ``-1``), so
the same set fits a 28x28 gray suite and a 32x32 RGB one; it is deterministic for a seed and its
identity (``"ood/<name>/<H>x<W>x<C>/seed<seed>/n<n>"``) is the feature-cache key.
Gray sources become RGB by a random per-image colour tint (textures) or replication (digits); RGB
sources become gray by ITU-R 601 luma.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from oodforge.data.base import ArrayDataset, luma

__all__ = [
    "OOD_SETS",
    "FAR_OOD_SETS",
    "FULL_SIZES",
    "QUICK_SIZES",
    "NUM_DIGITS",
    "digits",
    "textures",
    "photos",
    "noise",
    "make_ood_set",
    "far_ood_sets",
    "digit_objects",
    "random_crops",
    "rng_for",
]

NUM_DIGITS = 1797
FULL_SIZES = {"digits": NUM_DIGITS, "textures": 2000, "photos": 2000, "noise": 2000}
QUICK_SIZES = {"digits": 300, "textures": 300, "photos": 300, "noise": 300}
OOD_SETS = {
    "digits": "sklearn load_digits: 1,797 real 8x8 handwritten digits, upsampled (far OOD; SVHN stand-in)",
    "textures": "random crops of skimage brick / grass / gravel (far OOD; DTD stand-in)",
    "photos": "random crops of the offline real photographs, see oodforge.data.photos (far OOD; LSUN/Places stand-in)",
    "noise": "Gaussian, uniform and thresholded smooth-noise blobs (far OOD sanity check)",
}
FAR_OOD_SETS = ("digits", "textures", "photos", "noise")
TEXTURE_NAMES = ("brick", "grass", "gravel")


def rng_for(name: str, seed: int) -> np.random.Generator:
    """A generator for set ``name`` and ``seed``: different sets never share random streams."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def _check(n: int, size: int, channels: int, name: str) -> None:
    if n < 1:
        raise ValueError(f"{name}: n must be >= 1, got {n}")
    if size < 8:
        raise ValueError(f"{name}: size must be >= 8 pixels, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"{name}: channels must be 1 or 3, got {channels}")


#: Bump when a set's recipe changes: identities (feature-cache keys) then get a ``/v<k>`` suffix.
OOD_VERSION = 1


def _identity(name: str, n: int, size: int, channels: int, seed: int, extra: str = "") -> str:
    version = f"/v{OOD_VERSION}" if OOD_VERSION > 1 else ""
    return f"ood/{name}/{size}x{size}x{channels}/seed{seed}/n{n}{extra}{version}"


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of ``[..., 3]`` arrays."""
    return luma(rgb, axis=-1)


def random_crops(
    image: np.ndarray,
    n: int,
    size: int,
    rng: np.random.Generator,
    min_frac: float = 1 / 8,
    max_frac: float = 2 / 3,
    rotate: bool = False,
) -> np.ndarray:
    """``n`` random square crops of ``image`` (H x W [x C] uint8), resized to ``size`` x ``size``.

    The crop side is log-uniform in ``[max(size, min_frac*m), max_frac*m]`` (``m`` = the shorter
    side), so crops range from close-ups to most of the picture; shrinking uses area interpolation
    (anti-aliased). Each crop is flipped left-right with probability 1/2 and, with ``rotate``,
    rotated by a random multiple of 90 degrees.
    """
    import cv2

    h, w = image.shape[:2]
    m = min(h, w)
    lo = min(max(size, min_frac * m), m)
    hi = max(lo, max_frac * m)
    sides = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int).clip(1, m)
    ys = (rng.random(n) * (h - sides + 1)).astype(int)
    xs = (rng.random(n) * (w - sides + 1)).astype(int)
    flips = rng.random(n) < 0.5
    rots = rng.integers(0, 4, n) if rotate else np.zeros(n, int)
    # a pyramid of 2x area-downscaled copies: a crop is cut from the level where it is still
    # >= 2*size pixels wide, which gives the same anti-aliased result much faster for big photos
    pyramid = [image]
    while min(pyramid[-1].shape[:2]) >= 8 * size:
        p = pyramid[-1]
        pyramid.append(cv2.resize(p, (p.shape[1] // 2, p.shape[0] // 2), interpolation=cv2.INTER_AREA))
    levels = np.clip(np.floor(np.log2(np.maximum(sides / (2 * size), 1))), 0, len(pyramid) - 1).astype(int)
    out = np.empty((n, size, size) + image.shape[2:], np.uint8)
    for i in range(n):
        lv = levels[i]
        img = pyramid[lv]
        y, x, s = ys[i] >> lv, xs[i] >> lv, max(1, sides[i] >> lv)
        crop = img[y : y + s, x : x + s]
        interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (size, size), interpolation=interp)
        if flips[i]:
            crop = crop[:, ::-1]
        if rots[i]:
            crop = np.rot90(crop, rots[i])
        out[i] = crop.reshape(out.shape[1:])
    return out


# --------------------------------------------------------------------------------------------------
# digits


def _load_digit_images() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32) / 16.0  # [1797, 8, 8] in [0, 1]


def digit_objects(indices: np.ndarray, size: int = 28, box: int | None = None) -> np.ndarray:
    """sklearn digits ``indices`` as float ``[N, size, size]`` in [0, 1], centred in a ``box``.

    The 8x8 digit is upsampled bicubically (anti-aliased, then a light Gaussian blur removes the
    8x8 block structure) into a ``box`` x ``box`` square (default ``round(size * 20 / 28)``, the
    MNIST convention) centred on a black canvas, and rescaled so its brightest pixel is 1.
    """
    if box is None:
        box = round(size * 20 / 28)
    box = min(box, size)
    src = torch.from_numpy(_load_digit_images()[np.asarray(indices)])[:, None]
    up = F.interpolate(src, size=(box, box), mode="bicubic", align_corners=False).clamp_(0, 1)
    sigma = box / 24
    r = max(1, int(round(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    up = F.conv2d(F.pad(up, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    up = F.conv2d(F.pad(up, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]
    up = up / up.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    out = torch.zeros((up.shape[0], size, size))
    o = (size - box) // 2
    out[:, o : o + box, o : o + box] = up
    return out.numpy()


def digits(n: int = NUM_DIGITS, size: int = 28, channels: int = 1, seed: int = 0) -> ArrayDataset:
    """Real handwritten digits (scikit-learn ``load_digits``, UCI; 1,797 images of 8x8 at most).

    A seeded permutation picks ``n`` digits; each is upsampled by :func:`digit_objects`
    (MNIST-like 20/28 box) and shifted by up to +-2 px at random. RGB = replicated gray.
    """
    _check(n, size, channels, "digits")
    if n > NUM_DIGITS:
        raise ValueError(f"digits: sklearn load_digits has {NUM_DIGITS} images, asked for n={n}")
    rng = rng_for("digits", seed)
    idx = rng.permutation(NUM_DIGITS)[:n]
    objs = digit_objects(idx, size)
    j = min(2, (size - round(size * 20 / 28)) // 2)
    shifts = rng.integers(-j, j + 1, size=(n, 2))
    for i in range(n):
        objs[i] = np.roll(objs[i], tuple(shifts[i]), axis=(0, 1))
    imgs = _to_uint8(objs)[:, None]
    if channels == 3:
        imgs = np.repeat(imgs, 3, axis=1)
    return ArrayDataset(imgs, None, None, _identity("digits", n, size, channels, seed))


# --------------------------------------------------------------------------------------------------
# textures


def _tint(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gray ``[N, H, W]`` uint8 -> ``[N, 3, H, W]`` with a random per-image colour (max channel 1)."""
    c = rng.uniform(0.35, 1.0, size=(gray.shape[0], 3)).astype(np.float32)
    c /= c.max(axis=1, keepdims=True)
    return np.clip(np.rint(gray[:, None].astype(np.float32) * c[:, :, None, None]), 0, 255).astype(np.uint8)


def textures(n: int = 2000, size: int = 28, channels: int = 1, seed: int = 0) -> ArrayDataset:
    """Random crops of the scikit-image textures ``brick``, ``grass`` and ``gravel`` (CC0 photos).

    Equal numbers per texture; crop side log-uniform between ``max(size, 64)`` and 341 px of the
    512x512 source, random 90-degree rotation and flip. RGB = a random colour tint per image.
    """
    import skimage.data

    _check(n, size, channels, "textures")
    rng = rng_for("textures", seed)
    which = rng.permutation(np.arange(n) % len(TEXTURE_NAMES))
    out = np.empty((n, size, size), np.uint8)
    for t, name in enumerate(TEXTURE_NAMES):
        sel = np.flatnonzero(which == t)
        if sel.size:
            out[sel] = random_crops(getattr(skimage.data, name)(), sel.size, size, rng, rotate=True)
    imgs = _tint(out, rng) if channels == 3 else out[:, None]
    return ArrayDataset(imgs, None, None, _identity("textures", n, size, channels, seed))


# --------------------------------------------------------------------------------------------------
# photos


def photo_crops(
    names: list[str], n: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB crops ``[n, size, size, 3]`` spread evenly over the photos ``names``.

    Returns the crops and, for each, the index into ``names`` of the photo it was cut from.
    """
    from oodforge.data.photos import load_photo

    which = rng.permutation(np.arange(n) % len(names))
    out = np.empty((n, size, size, 3), np.uint8)
    for k, name in enumerate(names):
        sel = np.flatnonzero(which == k)
        if sel.size:
            out[sel] = random_crops(load_photo(name), sel.size, size, rng)
    return out, which


def photos(n: int = 2000, size: int = 28, channels: int = 1, seed: int = 0) -> ArrayDataset:
    """Random crops of every real photograph in :func:`oodforge.data.photos.list_photos`.

    Equal numbers per photo, crop side log-uniform in ``[m/8, 2m/3]`` of the photo's shorter side
    ``m``, random flip; gray = ITU-R 601 luma. When Debian's ``darknet`` photos are installed they
    join the pool and the identity gets a ``+darknet<k>`` suffix (different content, different key).
    """
    from oodforge.data.photos import PHOTOS, system_photos

    _check(n, size, channels, "photos")
    names = list(PHOTOS) + list(system_photos())
    extra = len(names) - len(PHOTOS)
    crops, _ = photo_crops(names, n, size, rng_for("photos", seed))
    if channels == 1:
        imgs = np.clip(np.rint(_luma(crops.astype(np.float32))), 0, 255).astype(np.uint8)[:, None]
    else:
        imgs = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))
    suffix = f"+darknet{extra}" if extra else ""
    return ArrayDataset(imgs, None, None, _identity("photos", n, size, channels, seed, suffix))


# --------------------------------------------------------------------------------------------------
# noise


def noise(n: int = 2000, size: int = 28, channels: int = 1, seed: int = 0) -> ArrayDataset:
    """Synthetic noise images, a shuffled mix of three kinds (one third each):

    * Gaussian: per-image mean U(0.25, 0.75), std U(0.08, 0.3), i.i.d. per pixel and channel;
    * uniform: i.i.d. U(lo, hi) with lo ~ U(0, 0.4), hi ~ U(0.6, 1);
    * blobs: white noise smoothed by a Gaussian (sigma U(1, size/6)), thresholded at a random
      quantile U(0.3, 0.7), edges softened, and painted with two random colours/gray levels.
    """
    from scipy.ndimage import gaussian_filter

    _check(n, size, channels, "noise")
    rng = rng_for("noise", seed)
    kind = rng.permutation(np.arange(n) % 3)
    out = np.empty((n, channels, size, size), np.float32)
    g = np.flatnonzero(kind == 0)
    mean = rng.uniform(0.25, 0.75, (g.size, 1, 1, 1))
    std = rng.uniform(0.08, 0.3, (g.size, 1, 1, 1))
    out[g] = mean + std * rng.standard_normal((g.size, channels, size, size))
    u = np.flatnonzero(kind == 1)
    lo = rng.uniform(0.0, 0.4, (u.size, 1, 1, 1))
    hi = rng.uniform(0.6, 1.0, (u.size, 1, 1, 1))
    out[u] = lo + (hi - lo) * rng.random((u.size, channels, size, size))
    for i in np.flatnonzero(kind == 2):
        field = gaussian_filter(rng.standard_normal((size, size)), rng.uniform(1.0, max(1.5, size / 6)))
        mask = (field > np.quantile(field, rng.uniform(0.3, 0.7))).astype(np.float32)
        mask = gaussian_filter(mask, 0.5)
        fg, bg = rng.random(channels), rng.random(channels)
        out[i] = bg[:, None, None] + (fg - bg)[:, None, None] * mask[None]
    return ArrayDataset(_to_uint8(out), None, None, _identity("noise", n, size, channels, seed))


_BUILDERS = {"digits": digits, "textures": textures, "photos": photos, "noise": noise}


def make_ood_set(
    name: str, n: int | None = None, size: int = 28, channels: int = 1, seed: int = 0, quick: bool = False
) -> ArrayDataset:
    """Build OOD set ``name`` (one of :data:`OOD_SETS`); ``n`` defaults to the full / quick size."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown OOD set {name!r}; choose from {sorted(_BUILDERS)}")
    if n is None:
        n = (QUICK_SIZES if quick else FULL_SIZES)[name]
    return _BUILDERS[name](n=n, size=size, channels=channels, seed=seed)


def far_ood_sets(
    size: int, channels: int, seed: int = 0, quick: bool = False, names: tuple[str, ...] = FAR_OOD_SETS
) -> dict[str, ArrayDataset]:
    """The standard far-OOD sets shaped ``channels x size x size``, e.g. for a user's own ID data."""
    return {nm: make_ood_set(nm, size=size, channels=channels, seed=seed, quick=quick) for nm in names}
