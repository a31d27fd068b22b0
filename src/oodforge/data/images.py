"""The one image pipeline: how an image *file* becomes the uint8 pixels every part of oodforge sees.

``decode -> orientation (EXIF) -> alpha flattened onto a background colour -> colour mode -> resize policy``

Every image-folder loader (:mod:`oodforge.data.loaders`, :mod:`oodforge.data.streaming`), ``bench``,
``export``, ``predict`` and ``explain`` read files through :func:`decode`, so a guard serves images prepared
exactly as the images it was calibrated on (``predict``'s scores equal ``bench``'s). The settings are an
:class:`ImagePipeline`, given per suite file (``background = "#ffffff"``, ``resize = "crop"``), recorded in
``results.json`` (``config.preprocessing``) and in a guard's ``guard.json`` (``preprocessing.pipeline``).

1. **decode** with Pillow, refusing images above :func:`max_pixels` (a decompression-bomb guard with a clear
   message; ``$OODFORGE_MAX_PIXELS`` raises it) before any pixel is decoded;
2. **orientation**: the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), as a photo viewer
   shows the picture;
3. **alpha**: transparent pixels (RGBA, LA, palette or grey images with a transparent colour) are composited
   onto :attr:`ImagePipeline.background` (white by default): ``out = a * rgb + (1 - a) * background``.
   Dropping alpha instead (``convert("RGB")``) turns black line-art on a transparent background into an
   all-black image;
4. **colour mode**: grey sources (``1``, ``L``, ``LA``, 16-bit grey) give one channel, everything else RGB;
   16-bit grey is scaled by ``round(v / 257)`` (not clipped at 255); the caller converts to the model's
   channel count with the BT.601 luma (:func:`oodforge.data.base.luma`);
5. **resize policy** to the model's ``H x W`` (:data:`RESIZE_POLICIES`), area interpolation when shrinking,
   linear when enlarging (OpenCV):

   * ``crop`` (default): the image is scaled so it covers ``H x W`` (for a square target: its shorter side
     becomes ``H``), then centre-cropped; the aspect ratio is kept, the borders are lost;
   * ``letterbox``: scaled to fit inside ``H x W``, then padded with the background colour, centred; the
     whole image is kept;
   * ``stretch``: resized to ``H x W`` directly; the aspect ratio is not kept.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oodforge.data.base import luma
from oodforge.data.idx import DatasetFormatError

__all__ = ["ImagePipeline", "DEFAULT_PIPELINE", "RESIZE_POLICIES", "DEFAULT_MAX_PIXELS", "max_pixels", "pipeline_of", "parse_colour",
           "read_image", "resize_image", "decode"]

#: resize policies by name (module docstring); ``crop`` is the default
RESIZE_POLICIES = ("crop", "letterbox", "stretch")

#: the largest image decoded by default: 100 megapixels (a 10,000 x 10,000 image, 400 MB as RGBA)
DEFAULT_MAX_PIXELS = 100_000_000


def max_pixels() -> int:
    """The pixel limit of one image: ``$OODFORGE_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`."""
    env = os.environ.get("OODFORGE_MAX_PIXELS", "").strip()
    if not env:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(env))
    except ValueError:
        raise DatasetFormatError(f"OODFORGE_MAX_PIXELS={env!r} is not a number; give a pixel count such as "
                                 "700000000") from None
    if value < 1:
        raise DatasetFormatError(f"OODFORGE_MAX_PIXELS={env!r} must be >= 1")
    return value


def parse_colour(value, where: str = "background") -> tuple[int, int, int]:
    """``"#ffffff"``, ``"#fff"``, a colour name (``"white"``) or ``[r, g, b]`` (0..255) as an RGB triple."""
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                                    for v in value):
        return tuple(int(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, str):
        from PIL import ImageColor

        try:
            rgb = ImageColor.getrgb(value.strip())
        except ValueError:
            pass
        else:
            return tuple(int(v) for v in rgb[:3])  # type: ignore[return-value]
    raise ValueError(f"{where} must be a colour such as \"#ffffff\", \"white\" or [255, 255, 255], got {value!r}")


@dataclass(frozen=True)
class ImagePipeline:
    """The settings of the one image pipeline (module docstring): background colour and resize policy."""

    background: tuple[int, int, int] = (255, 255, 255)
    resize: str = "crop"

    def __post_init__(self) -> None:
        object.__setattr__(self, "background", parse_colour(self.background))
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")

    def to_dict(self) -> dict:
        """What ``results.json`` and ``guard.json`` record (read back by :meth:`from_dict`)."""
        r, g, b = self.background
        return {"background": f"#{r:02x}{g:02x}{b:02x}", "resize": self.resize, "orientation": "exif",
                "alpha": "flattened onto background", "max_pixels": max_pixels()}

    @classmethod
    def from_dict(cls, doc: dict | None) -> ImagePipeline:
        """The pipeline recorded by :meth:`to_dict`; ``None`` (a guard exported before it was recorded): the default."""
        if not doc:
            return cls()
        return cls(background=doc.get("background", "#ffffff"), resize=doc.get("resize", "crop"))

    @property
    def tag(self) -> str:
        """A short identity tag (part of a streamed dataset's identity, so cached features follow the settings)."""
        return f"{self.to_dict()['background']}|{self.resize}"


DEFAULT_PIPELINE = ImagePipeline()


def pipeline_of(suite) -> ImagePipeline:
    """The pipeline a :class:`~oodforge.data.base.Suite` read its files with (``Suite.pipeline``; default when unset)."""
    return getattr(suite, "pipeline", None) or DEFAULT_PIPELINE


def _high_bit_depth_to_uint8(im, path: Path) -> np.ndarray:
    """16-bit (and 32-bit integer) grey images scaled to 0..255: ``round(v / 257)``, so 65535 -> 255.

    PIL's ``convert("L")`` clips such values at 255 instead, which turns almost every 16-bit image white.
    Float images are taken as 0..1 and refused outside that range (their scale is unknown).
    """
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        if arr.min() < 0 or arr.max() > 1:
            raise DatasetFormatError(f"{path}: a floating-point image with values outside 0..1 "
                                     f"({arr.min():.3g}..{arr.max():.3g}); save it as an 8-bit PNG")
        return np.round(arr * 255.0).astype(np.uint8)
    return np.round(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8)


def _has_alpha(im) -> bool:
    return im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info


def _flatten(im, background: tuple[int, int, int], grey: bool) -> np.ndarray:
    """``a * rgb + (1 - a) * background`` in float, rounded; grey sources then reduced by the BT.601 luma."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    a = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * a + np.asarray(background, np.float32) * (1.0 - a)
    if grey:
        rgb = luma(rgb, axis=2)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, pipeline: ImagePipeline = DEFAULT_PIPELINE) -> np.ndarray:
    """Steps 1-4 of the pipeline: one file as uint8 ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB), at its own size.

    Raises :class:`DatasetFormatError` naming the file for an unreadable image or one above :func:`max_pixels`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    limit = max_pixels()
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a message that says how to raise it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise DatasetFormatError(
                        f"{path}: {w}x{h} = {w * h:,} pixels is above the limit of {limit:,} pixels per image "
                        f"(a guard against decompression bombs); shrink the file, or raise the limit with "
                        f"OODFORGE_MAX_PIXELS={w * h}")
                im = ImageOps.exif_transpose(im)
                grey = im.mode in ("1", "L", "LA", "La") or im.mode.startswith("I") or im.mode == "F"
                if im.mode.startswith("I") or im.mode == "F":
                    return _high_bit_depth_to_uint8(im, path)
                if _has_alpha(im):
                    return _flatten(im, pipeline.background, grey)
                return np.asarray(im.convert("L" if grey else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DatasetFormatError):
            raise
        raise DatasetFormatError(f"{path}: not a readable image ({e}); remove it or replace it") from e
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def resize_image(img: np.ndarray, size: tuple[int, int], policy: str = "crop",
                 background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Step 5: uint8 ``[h, w]`` or ``[h, w, 3]`` to ``size = (H, W)`` by ``policy`` (module docstring)."""
    import cv2

    H, W = int(size[0]), int(size[1])
    h, w = img.shape[:2]
    if (h, w) == (H, W):
        return img
    if policy == "stretch":
        interp = cv2.INTER_AREA if H * W < h * w else cv2.INTER_LINEAR
        return cv2.resize(np.ascontiguousarray(img), (W, H), interpolation=interp)
    if policy == "crop":
        s = max(H / h, W / w)
        nh, nw = max(H, round(h * s)), max(W, round(w * s))
    elif policy == "letterbox":
        s = min(H / h, W / w)
        nh, nw = min(H, max(1, round(h * s))), min(W, max(1, round(w * s)))
    else:
        raise ValueError(f"resize policy must be one of {', '.join(RESIZE_POLICIES)}, got {policy!r}")
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    img = cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=interp)
    if policy == "crop":
        y, x = (nh - H) // 2, (nw - W) // 2
        return img[y:y + H, x:x + W]
    fill = np.asarray(background, np.float32)
    fill = np.rint(luma(fill, axis=0)) if img.ndim == 2 else fill
    out = np.empty((H, W, *img.shape[2:]), np.uint8)
    out[...] = fill.astype(np.uint8)
    y, x = (H - nh) // 2, (W - nw) // 2
    out[y:y + nh, x:x + nw] = img
    return out


def decode(path: str | os.PathLike, pipeline: ImagePipeline = DEFAULT_PIPELINE,
           size: int | tuple[int, int] | None = None, info: dict | None = None) -> np.ndarray:
    """The whole pipeline: one file as uint8 ``[C, H, W]`` (C = 1 for grey sources, else 3), brought to
    ``size`` (an int: a square) by the pipeline's resize policy when given. ``info``, when given, receives
    the file's own ``channels`` and ``size`` (``(h, w)``) before resizing."""
    img = read_image(path, pipeline)
    if info is not None:
        info.update(channels=1 if img.ndim == 2 else 3, size=tuple(img.shape[:2]))
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        img = resize_image(img, hw, pipeline.resize, pipeline.background)
    return np.ascontiguousarray(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))
