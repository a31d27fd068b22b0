"""PixMix (Hendrycks, Zou, Mazeika, Tang, Li, Song & Steinhardt, "PixMix: Dreamlike Pictures Comprehensively
Improve Safety Measures", CVPR 2022, Sec. 3 and Algorithm 1) as a batch augmentation of the training loop.

Each training image (after the loop's crop / flip, the reference code's base transform) is mixed with
a "picture" (here the seeded procedural fractals of :mod:`oodforge.recipes.fractals`) and with
augmented copies of itself::

    mixed = augment(x) with prob. 1/2, else x
    repeat k' ~ U{0..k} times:
        other = augment(x) with prob. 1/2, else picture     (one picture per image, Resize(9/8) + RandomCrop)
        mixed = clip(mix(mixed, other), 0, 1),  mix = additive or multiplicative with prob. 1/2 each

with the mixing operations of the reference ``pixmix_utils.py`` (``beta`` the mixing severity)::

    (a, b) = (Beta(beta, 1), Beta(1, beta))        with prob. 1/2
           = (1 + Beta(1, beta), -Beta(1, beta))    otherwise
    additive:        ((a (2 x1 - 1) + b (2 x2 - 1)) + 1) / 2
    multiplicative:  ((2 x1)^a * max(2 x2, 1e-37)^b) / 2

Defaults are the paper's CIFAR ones (reference ``cifar.py``): ``k = 4``, ``beta = 3``, augmentation
severity 3, ``all_ops = False`` (the AugMix operators autocontrast, equalize, posterize, rotate,
solarize, shear x/y, translate x/y; ``all_ops`` adds color, contrast, brightness and sharpness, which
overlap with CIFAR-C's corruptions). The operators are the reference's, on PIL images of the
suite's size (one-channel suites as ``L`` images). The label is kept (the mixed image is trained as
its source image's class). Every draw comes from a seeded ``numpy`` generator whose state is saved
with the loop's per-epoch state, so a resumed run mixes exactly the same images.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ..data.base import ArrayDataset
from ..models.train import BatchTransform

PAPER = "Hendrycks et al., PixMix: Dreamlike Pictures Comprehensively Improve Safety Measures, CVPR 2022"
K, BETA, SEVERITY = 4, 3.0, 3


# --- the mixing operations (reference pixmix_utils.py) ----------------------------------------
def mixing_weights(rng: np.random.Generator, beta: float) -> tuple[float, float]:
    """``(a, b)`` of one mixing step (see the module docstring)."""
    if rng.random() < 0.5:
        return float(rng.beta(beta, 1)), float(rng.beta(1, beta))
    return 1.0 + float(rng.beta(1, beta)), -float(rng.beta(1, beta))


def add_mix(x1: torch.Tensor, x2: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Additive mixing in ``[-1, 1]`` space: ``((a (2 x1 - 1) + b (2 x2 - 1)) + 1) / 2``."""
    return (a * (x1 * 2 - 1) + b * (x2 * 2 - 1) + 1) / 2


def multiply_mix(x1: torch.Tensor, x2: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Multiplicative (geometric) mixing: ``((2 x1)^a * max(2 x2, 1e-37)^b) / 2``."""
    return ((x1 * 2) ** a) * ((x2 * 2).clamp_min(1e-37) ** b) / 2


MIXINGS = (add_mix, multiply_mix)


# --- the base augmentation operators (reference pixmix_utils.py, AugMix's) ---------------------
def _level(rng, severity: float) -> float:
    return rng.uniform(0.1, severity)


def _int(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def _float(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0


def _sign(rng) -> float:
    return -1.0 if rng.uniform() > 0.5 else 1.0


def _affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR)


OPS = {
    "autocontrast": lambda img, s, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, s, rng: ImageOps.equalize(img),
    "posterize": lambda img, s, rng: ImageOps.posterize(img, 4 - _int(_level(rng, s), 4)),
    "rotate": lambda img, s, rng: img.rotate(_int(_level(rng, s), 30) * _sign(rng), resample=Image.BILINEAR),
    "solarize": lambda img, s, rng: ImageOps.solarize(img, 256 - _int(_level(rng, s), 256)),
    "shear_x": lambda img, s, rng: _affine(img, (1, _float(_level(rng, s), 0.3) * _sign(rng), 0, 0, 1, 0)),
    "shear_y": lambda img, s, rng: _affine(img, (1, 0, 0, _float(_level(rng, s), 0.3) * _sign(rng), 1, 0)),
    "translate_x": lambda img, s, rng: _affine(img, (1, 0, _int(_level(rng, s), img.size[0] / 3) * _sign(rng),
                                                     0, 1, 0)),
    "translate_y": lambda img, s, rng: _affine(img, (1, 0, 0, 0, 1,
                                                     _int(_level(rng, s), img.size[1] / 3) * _sign(rng))),
}
EXTRA_OPS = {  # all_ops only: they overlap with the corruption benchmarks' test set
    "color": lambda img, s, rng: ImageEnhance.Color(img).enhance(_float(_level(rng, s), 1.8) + 0.1),
    "contrast": lambda img, s, rng: ImageEnhance.Contrast(img).enhance(_float(_level(rng, s), 1.8) + 0.1),
    "brightness": lambda img, s, rng: ImageEnhance.Brightness(img).enhance(_float(_level(rng, s), 1.8) + 0.1),
    "sharpness": lambda img, s, rng: ImageEnhance.Sharpness(img).enhance(_float(_level(rng, s), 1.8) + 0.1),
}


def to_pil(x: torch.Tensor) -> Image.Image:
    """A ``[C, H, W]`` float image in [0, 1] -> a PIL image (``L`` for one channel, ``RGB`` for three)."""
    a = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0], "L") if a.shape[2] == 1 else Image.fromarray(a, "RGB")


def from_pil(img: Image.Image) -> torch.Tensor:
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


class PixMix(BatchTransform):
    """The PixMix augmentation (module docstring) with ``pictures`` as the mixing set.

    Args:
        pictures: uint8 mixing pictures shaped like the training images (e.g. ``fractal_pictures``).
        k: maximum number of mixing rounds (``k' ~ U{0..k}``).
        beta: mixing severity.
        severity: severity of the base augmentation operators.
        all_ops: also use color / contrast / brightness / sharpness.
        seed: seeds every draw.
    """

    name = "pixmix"

    def __init__(self, pictures: ArrayDataset, k: int = K, beta: float = BETA, severity: float = SEVERITY,
                 all_ops: bool = False, seed: int = 0):
        if len(pictures) == 0:
            raise ValueError("PixMix needs at least one mixing picture")
        if k < 0 or beta <= 0 or not 0 < severity <= 10:
            raise ValueError(f"PixMix needs k >= 0, beta > 0 and severity in (0, 10], got k={k}, beta={beta}, "
                             f"severity={severity}")
        self.pictures, self.k, self.beta, self.severity = pictures, int(k), float(beta), float(severity)
        self.all_ops, self.seed = bool(all_ops), seed
        self.ops = [*OPS.values(), *(EXTRA_OPS.values() if all_ops else ())]
        self.rng = np.random.default_rng([seed, 7])

    def bind(self, dataset: ArrayDataset) -> None:
        if self.pictures.image_shape != dataset.image_shape:
            raise ValueError(f"PixMix pictures {self.pictures.identity} are {self.pictures.image_shape} images but "
                             f"the training images are {dataset.image_shape}")

    def augment(self, img: Image.Image) -> Image.Image:
        """One base operator drawn uniformly (``augment_input`` of the reference)."""
        return self.ops[int(self.rng.integers(len(self.ops)))](img.copy(), self.severity, self.rng)

    def picture(self) -> torch.Tensor:
        """A random mixing picture with the reference's ``Resize(36) + RandomCrop(32)``, at any size."""
        pic = self.pictures.images[int(self.rng.integers(len(self.pictures)))].float().div(255.0)
        h, w = pic.shape[1:]
        big = to_pil(pic).resize((round(w * 9 / 8), round(h * 9 / 8)), Image.BILINEAR)
        top, left = int(self.rng.integers(big.size[1] - h + 1)), int(self.rng.integers(big.size[0] - w + 1))
        return from_pil(big.crop((left, top, left + w, top + h)))

    def mix_one(self, x: torch.Tensor) -> torch.Tensor:
        """PixMix of one ``[C, H, W]`` image in [0, 1] (Algorithm 1)."""
        orig = to_pil(x)
        pic = self.picture()
        mixed = from_pil(self.augment(orig)) if self.rng.random() < 0.5 else x.float()
        for _ in range(int(self.rng.integers(self.k + 1))):
            other = from_pil(self.augment(orig)) if self.rng.random() < 0.5 else pic
            op = MIXINGS[int(self.rng.integers(len(MIXINGS)))]
            a, b = mixing_weights(self.rng, self.beta)
            mixed = op(mixed, other, a, b).clamp(0, 1)
        return mixed

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device = x.device
        return torch.stack([self.mix_one(xi) for xi in x.detach().cpu()]).to(device)

    def describe(self) -> dict:
        return {"transform": self.name, "k": self.k, "beta": self.beta, "severity": self.severity,
                "all_ops": self.all_ops, "pictures": self.pictures.identity, "n_pictures": len(self.pictures),
                "paper": PAPER}

    def state_dict(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = json.loads(state["rng"])
