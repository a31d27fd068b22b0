"""The catalogue of real photographs available offline, with provenance.

oodforge has no LSUN, Places, iSUN or ImageNet on its machines (see docs/datasets.md), so the
photo-based OOD sets (``photos``, the ``scenes`` backgrounds) are cut from the handful of real
photographs that ship inside our dependencies:

* scikit-image's ``skimage.data`` (public-domain / CC0 photographs),
* scikit-learn's ``load_sample_images`` (``china.jpg``, ``flower.jpg``, CC-BY 2.0),
* matplotlib's sample ``grace_hopper.jpg`` (US Navy, public domain),
* optionally the 7 example photos of Debian's ``darknet`` package in ``/usr/share/darknet/data/``
  (used only when installed; they never enter the ``scenes`` suite, so that suite is the same on
  every machine).

``skimage.data.cat`` is the same picture as ``chelsea``, and ``motorcycle_right`` is the other view
of the stereo pair ``motorcycle_left``: each appears once here, so no two catalogue entries share
content (the ``scenes`` train/test split relies on that).

:func:`list_photos` returns ``(name, image)`` pairs (``H x W x 3`` uint8; grayscale photographs are
replicated to three channels); :data:`PHOTOS` records, for each name, where it comes from and its
licence.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PHOTOS", "PhotoInfo", "DARKNET_DIR", "list_photos", "load_photo", "photo_provenance", "system_photos"]

#: Where Debian's ``darknet`` package puts its example photos (``apt-get install darknet``).
DARKNET_DIR = Path("/usr/share/darknet/data")


@dataclass(frozen=True)
class PhotoInfo:
    """Where a catalogue photo comes from."""

    name: str
    source: str  #: how to obtain it (a Python call or a file)
    license: str
    description: str
    grayscale: bool = False  #: True when the original photograph is single-channel


def _skimage(fn: str):
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, fn)()
        return out[0] if isinstance(out, tuple) else out

    return load


def _sklearn(filename: str):
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _matplotlib(filename: str):
    def load() -> np.ndarray:
        import matplotlib.cbook as cbook
        from PIL import Image

        path = cbook.get_sample_data(filename, asfileobj=False)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    return load


_CATALOGUE: list[tuple[PhotoInfo, object]] = [
    (PhotoInfo("astronaut", "skimage.data.astronaut()", "public domain (NASA)",
               "portrait of astronaut Eileen Collins with a flag"), _skimage("astronaut")),
    (PhotoInfo("chelsea", "skimage.data.chelsea() (= skimage.data.cat())", "CC0 (Stefan van der Walt)",
               "a cat on a blanket"), _skimage("chelsea")),
    (PhotoInfo("coffee", "skimage.data.coffee()", "CC0 (Rachel Michetti)",
               "a cup of coffee on a table"), _skimage("coffee")),
    (PhotoInfo("rocket", "skimage.data.rocket()", "public domain (SpaceX)",
               "Falcon 9 rocket on the launch pad, sky"), _skimage("rocket")),
    (PhotoInfo("hubble_deep_field", "skimage.data.hubble_deep_field()", "public domain (NASA)",
               "Hubble eXtreme Deep Field, galaxies on black"), _skimage("hubble_deep_field")),
    (PhotoInfo("immunohistochemistry", "skimage.data.immunohistochemistry()", "no known copyright (CMMI)",
               "stained colonic glands under a microscope"), _skimage("immunohistochemistry")),
    (PhotoInfo("retina", "skimage.data.retina()", "CC0 (Mikael Haggstrom)",
               "fundus photograph of a human retina"), _skimage("retina")),
    (PhotoInfo("motorcycle", "skimage.data.stereo_motorcycle()[0]", "Middlebury stereo dataset (research use)",
               "a motorcycle in a workshop (left view of the stereo pair)"), _skimage("stereo_motorcycle")),
    (PhotoInfo("camera", "skimage.data.camera()", "CC0 (Lav Varshney)",
               "a person with a camera on a tripod, outdoors", True), _skimage("camera")),
    (PhotoInfo("clock", "skimage.data.clock()", "public domain (Stefan van der Walt)",
               "motion-blurred wall clock", True), _skimage("clock")),
    (PhotoInfo("coins", "skimage.data.coins()", "no known copyright (Brooklyn Museum)",
               "Greek coins on a dark background", True), _skimage("coins")),
    (PhotoInfo("moon", "skimage.data.moon()", "scikit-image sample data (public domain)",
               "low-contrast lunar surface", True), _skimage("moon")),
    (PhotoInfo("text", "skimage.data.text()", "public domain (Wikipedia, Corner.png)",
               "photograph of a street corner with painted text", True), _skimage("text")),
    (PhotoInfo("china", "sklearn.datasets.load_sample_image('china.jpg')", "CC-BY 2.0 (danielbuechele, Flickr)",
               "a Chinese temple roof and trees"), _sklearn("china.jpg")),
    (PhotoInfo("flower", "sklearn.datasets.load_sample_image('flower.jpg')", "CC-BY 2.0 (vultilion, Flickr)",
               "close-up of a flower"), _sklearn("flower.jpg")),
    (PhotoInfo("grace_hopper", "matplotlib.cbook.get_sample_data('grace_hopper.jpg')", "public domain (US Navy)",
               "portrait of Rear Admiral Grace Hopper"), _matplotlib("grace_hopper.jpg")),
]

#: name -> provenance of every photo that is always available (the ones shipped by our dependencies).
PHOTOS: dict[str, PhotoInfo] = {info.name: info for info, _ in _CATALOGUE}
_LOADERS = {info.name: fn for info, fn in _CATALOGUE}


def _as_rgb(img: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        raise ValueError(f"photo {name!r} has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"photo {name!r} has shape {img.shape}, expected H x W x 3")
    out = np.ascontiguousarray(img)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One catalogue photo as a read-only ``H x W x 3`` uint8 array (cached in memory)."""
    if name in _LOADERS:
        return _as_rgb(_LOADERS[name](), name)  # type: ignore[operator]
    if name.startswith("darknet/"):
        from PIL import Image

        path = DARKNET_DIR / name.split("/", 1)[1]
        with Image.open(path) as im:
            return _as_rgb(np.asarray(im.convert("RGB")), name)
    raise KeyError(f"unknown photo {name!r}; known: {sorted(PHOTOS)} (+ darknet/* when installed)")


def system_photos(directory: str | os.PathLike | None = None) -> dict[str, PhotoInfo]:
    """Photos found in Debian's ``darknet`` example folder (empty when the package is absent)."""
    d = Path(directory) if directory is not None else DARKNET_DIR
    if not d.is_dir():
        return {}
    out = {}
    for p in sorted(d.glob("*.jpg")):
        name = f"darknet/{p.name}"
        out[name] = PhotoInfo(name, str(p), "Debian package darknet (public example images)",
                              f"darknet example photo {p.stem}")
    return out


def photo_provenance(name: str) -> PhotoInfo:
    """The :class:`PhotoInfo` of a catalogue photo (including ``darknet/*`` ones)."""
    if name in PHOTOS:
        return PHOTOS[name]
    found = system_photos()
    if name in found:
        return found[name]
    raise KeyError(f"unknown photo {name!r}; known: {sorted(PHOTOS)} (+ darknet/* when installed)")


def list_photos(names: list[str] | None = None, include_system: bool = True) -> list[tuple[str, np.ndarray]]:
    """``(name, H x W x 3 uint8 image)`` for the requested photos, in a fixed order.

    ``names=None`` means the whole catalogue: the 16 dependency-shipped photos (:data:`PHOTOS`)
    plus, when ``include_system`` and Debian's ``darknet`` package is installed, its example
    photos (named ``darknet/<file>``). See :func:`photo_provenance` for each one's origin.
    """
    if names is None:
        names = list(PHOTOS)
        if include_system:
            names += list(system_photos())
    return [(n, load_photo(n)) for n in names]
