"""Inpainters: (images, masks, seeds) -> images with the masked ID object replaced, SHIFT's second stage.

* ``sd`` — SHIFT Eq. 4: ``x~ = LDM_inpaint(x, M, Q_LDM)`` with diffusers' ``StableDiffusionInpaintPipeline``
  (the paper: ``stabilityai/stable-diffusion-2-inpainting``), positive prompt "a photo of background",
  negative prompt = the ID class names (joined by ", "; CLIP's 77-token limit truncates very long
  lists), guidance 7.5, 50 steps, the pipeline's own scheduler. The K outliers of an image differ by
  their seeds (one ``torch.Generator`` per outlier, on the CPU so results do not depend on the device).
  Images are resized up to ``size`` (512) for the model and back down (antialiased) afterwards;
  grey images are fed as RGB and converted back with ITU-R 601 luma weights. fp16 only on CUDA.
* ``telea`` / ``ns`` — KIRBY's fast-marching inpainting (Telea 2004) and OpenCV's Navier-Stokes
  variant, ``cv2.inpaint``.
* ``zero`` — erase only: ``x ⊙ M`` (KIRBY's masked image before inpainting).

**K > 1 with deterministic methods** (``telea``, ``ns``, ``zero``): variant ``k = 0`` is the plain method
on the plain mask. Variant ``k >= 1`` draws, from its own seed, (1) a dilation of the mask by an
elliptic kernel of radius 1 .. 8 % of the image side, (2) a copy of that mask shifted by up to 5 % of
the side, OR-ed in, and (3) for ``telea``/``ns`` the inpainting radius in 1 .. 20 % of the side
(at least 1 .. 3 px). The mask only grows, so the ID object stays erased; the variants differ in
how much context is removed and how far the fill reaches. Same seed -> same variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..data.base import luma
from ..hub import load_sd_inpaint_pipeline

SD_DEFAULT = "stabilityai/stable-diffusion-2-inpainting"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()


def jitter_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded, grown variant of a boolean mask ``[H, W]`` (see the module doc): dilation + shifted copy."""
    h, w = mask.shape
    side = max(h, w)
    m = mask.astype(np.uint8)
    r = int(rng.integers(1, max(1, round(0.08 * side)) + 1))
    kern = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    grown = cv2.dilate(m, kern)
    s = max(1, round(0.05 * side))
    dy, dx = (int(v) for v in rng.integers(-s, s + 1, size=2))
    shifted = np.zeros_like(grown)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    shifted[yd, xd] = grown[ys, xs]
    return (grown | shifted).astype(bool)


class Inpainter:
    """Base class: ``__call__(images [B,C,H,W] in [0,1], masks bool [B,H,W], seeds, ks, class_names) -> uint8``.

    ``seeds[i]`` and ``ks[i]`` are the seed and the variant index of output ``i`` (an image repeated K
    times with K seeds gives its K outliers). Constructors only store options; weights load lazily.
    """

    name: ClassVar[str] = "inpainter"
    deterministic: ClassVar[bool] = True

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def to(self, device: str) -> Inpainter:
        self.device = device
        return self

    def load(self) -> Inpainter:
        return self

    def config(self) -> dict:
        return {"name": self.name}

    @staticmethod
    def _check(images, masks, seeds, ks):
        images = torch.as_tensor(images)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        masks = torch.as_tensor(masks)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"inpainters take images [B, 1|3, H, W], got {tuple(images.shape)}")
        if masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"masks must be [B, H, W] = {(images.shape[0], *images.shape[2:])}, got {tuple(masks.shape)}")
        seeds = [int(s) for s in seeds]
        ks = [0] * len(seeds) if ks is None else [int(k) for k in ks]
        if len(seeds) != images.shape[0] or len(ks) != images.shape[0]:
            raise ValueError(f"need one seed and one k per image ({images.shape[0]}), got {len(seeds)} / {len(ks)}")
        return images.float(), masks.bool(), seeds, ks

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, seeds: Sequence[int],
                 ks: Sequence[int] | None = None, class_names: list[str] | None = None) -> np.ndarray:
        images, masks, seeds, ks = self._check(images, masks, seeds, ks)
        return self._inpaint(images, masks, seeds, ks, class_names)

    def _inpaint(self, images, masks, seeds, ks, class_names) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class CV2Inpainter(Inpainter):
    """``cv2.inpaint`` with fast marching (``telea``, Telea 2004, KIRBY's choice) or Navier-Stokes (``ns``).

    ``radius`` is the neighbourhood radius in pixels for variant ``k = 0``; variants ``k >= 1`` are jittered
    deterministically by their seed (module doc).
    """

    def __init__(self, method: str = "telea", radius: int = 3, device: str = "cpu") -> None:
        super().__init__(device)
        if method not in ("telea", "ns"):
            raise ValueError(f"cv2 inpainting method must be 'telea' or 'ns', got {method!r}")
        if radius < 1:
            raise ValueError(f"radius must be >= 1 pixel, got {radius}")
        self.method = method
        self.radius = int(radius)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.method

    def config(self) -> dict:
        return {"name": self.method, "radius": self.radius, "variants": "jitter-v1"}

    def _inpaint(self, images, masks, seeds, ks, class_names):
        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        imgs = to_uint8(images).transpose(0, 2, 3, 1)  # [B, H, W, C]
        out = np.empty_like(imgs)
        side = max(imgs.shape[1:3])
        for i in range(imgs.shape[0]):
            m = masks[i].numpy()
            radius = self.radius
            if ks[i] > 0:
                rng = np.random.default_rng(seeds[i])
                m = jitter_mask(m, rng)
                radius = int(rng.integers(1, max(3, round(0.2 * side)) + 1))
            src = np.ascontiguousarray(imgs[i])
            res = cv2.inpaint(src, m.astype(np.uint8) * 255, radius, flag)
            out[i] = res.reshape(src.shape)
        return out.transpose(0, 3, 1, 2).copy()


class ZeroInpainter(Inpainter):
    """Erase the masked pixels to ``fill`` (0 = black): ``x ⊙ M`` (KIRBY Eq. 2 without inpainting)."""

    name = "zero"

    def __init__(self, fill: float = 0.0, device: str = "cpu") -> None:
        super().__init__(device)
        self.fill = float(fill)

    def config(self) -> dict:
        return {"name": "zero", "fill": self.fill, "variants": "jitter-v1"}

    def _inpaint(self, images, masks, seeds, ks, class_names):
        out = images.clone()
        for i in range(images.shape[0]):
            m = masks[i].numpy()
            if ks[i] > 0:
                m = jitter_mask(m, np.random.default_rng(seeds[i]))
            out[i][:, torch.from_numpy(m)] = self.fill
        return to_uint8(out)


class SDInpainter(Inpainter):
    """Stable-Diffusion inpainting, SHIFT Eq. 4 (see module doc). ``model``: hub id, local folder or a pipeline."""

    name = "sd"
    deterministic = False

    def __init__(self, model=SD_DEFAULT, prompt: str = "a photo of background", negative_prompt: str | None = None,
                 guidance_scale: float = 7.5, steps: int = 50, size: int = 512, strength: float = 1.0,
                 batch_size: int = 8, device: str = "cpu", option: str = "--inpaint-model") -> None:
        super().__init__(device)
        if size % 8 or size < 8:
            raise ValueError(f"size must be a positive multiple of 8 (the VAE's downsampling), got {size}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.guidance_scale = float(guidance_scale)
        self.steps = int(steps)
        self.size = int(size)
        self.strength = float(strength)
        self.batch_size = int(batch_size)
        self.option = option
        self._pipe = None

    def config(self) -> dict:
        ref = self.model if isinstance(self.model, str) else getattr(getattr(self.model, "config", {}),
                                                                      "_name_or_path", "in-memory")
        return {"name": "sd", "model": str(ref), "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "guidance_scale": self.guidance_scale, "steps": self.steps, "size": self.size,
                "strength": self.strength}

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if str(self.device).startswith("cuda") else torch.float32

    def load(self) -> SDInpainter:
        if self._pipe is None:
            if isinstance(self.model, str):
                pipe = load_sd_inpaint_pipeline(self.model, "Stable-Diffusion inpainter", self.option, self.dtype)
            else:
                pipe = self.model
                pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        self._pipe.to(self.device, self.dtype)
        return self

    def _work_size(self, h: int, w: int) -> tuple[int, int]:
        scale = self.size / max(h, w)
        return max(8, int(round(h * scale / 8)) * 8), max(8, int(round(w * scale / 8)) * 8)

    @torch.no_grad()
    def _inpaint(self, images, masks, seeds, ks, class_names):
        self.load()
        neg = self.negative_prompt
        if neg is None:
            if not class_names:
                raise ValueError("the sd inpainter's negative prompt is the ID class names: pass class_names "
                                 "(or negative_prompt=...)")
            neg = ", ".join(class_names)
        n, c, h, w = images.shape
        wh, ww = self._work_size(h, w)
        out = np.empty((n, c, h, w), dtype=np.uint8)
        for i in range(0, n, self.batch_size):
            x = images[i:i + self.batch_size]
            b = x.shape[0]
            rgb = x.expand(-1, 3, -1, -1) if c == 1 else x
            big = F.interpolate(rgb, size=(wh, ww), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
            mbig = F.interpolate(masks[i:i + b, None].float(), size=(wh, ww), mode="nearest")
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + b]]
            res = self._pipe(prompt=[self.prompt] * b, negative_prompt=[neg] * b, image=big.to(self.dtype),
                             mask_image=mbig.to(self.dtype), height=wh, width=ww, strength=self.strength,
                             guidance_scale=self.guidance_scale, num_inference_steps=self.steps, generator=gens,
                             output_type="np").images
            y = torch.from_numpy(np.asarray(res, dtype=np.float32)).permute(0, 3, 1, 2)
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            if c == 1:
                y = luma(y, axis=1).unsqueeze(1)
            out[i:i + b] = to_uint8(y)
        return out


INPAINTERS = ("sd", "telea", "ns", "zero")


def make_inpainter(name: str, **opts) -> Inpainter:
    """Build an inpainter by name: ``sd`` (model=hub id | folder | pipeline, steps, guidance_scale, size, ...),
    ``telea`` / ``ns`` (radius), ``zero`` (fill)."""
    if name == "sd":
        return SDInpainter(**opts)
    if name in ("telea", "ns"):
        return CV2Inpainter(method=name, **opts)
    if name == "zero":
        return ZeroInpainter(**opts)
    raise ValueError(f"unknown inpainter {name!r}; choose one of {', '.join(INPAINTERS)}")


__all__ = ["Inpainter", "CV2Inpainter", "ZeroInpainter", "SDInpainter", "make_inpainter", "jitter_mask",
           "INPAINTERS", "SD_DEFAULT"]
