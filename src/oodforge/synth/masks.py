"""Maskers: (images, classes) -> binary mask of the ID object, the first stage of SHIFT / KIRBY.

A masker computes a saliency map ``A`` in ``[0, 1]`` per image and thresholds it at ``λ``:
the mask is ``A >= λ``. **Convention:** our masks are ``True`` on the ID object, i.e. the region to
erase and inpaint (the convention of diffusers and ``cv2.inpaint``). The papers write the
complement: ``M_ij = 0 if A_ij >= λ`` (SHIFT Eq. 3, KIRBY Eq. 2), with ``M = 1`` on the kept pixels.

* ``clipseg`` — SHIFT (Eq. 3): CLIPSeg (``CIDAS/clipseg-rd64-refined`` in the paper) with the
  prompt "a photo of a {class}", ``P = sigmoid(logits)``, ``λ = 0.2``. Low-resolution images are
  resized up to the processor's input size (352 px for CLIPSeg) by the processor, and the
  probability map is resized back to the image size before thresholding. (The SHIFT reference
  code upsamples with an SD x4 upscaler instead; we use plain bicubic resizing.)
* ``layercam`` / ``gradcam`` — KIRBY (Eq. 2) and SHIFT's ablation (Table 4): a class activation map
  of the user's classifier at its last feature map (the layer before global average pooling),
  upsampled to the image size, min-max normalised to ``[0, 1]`` per image, thresholded at ``λ``.

Common options: ``dilate`` (fraction of the image side; the SHIFT reference code dilates 25x25 at
512 px, i.e. ``dilate ≈ 0.05``) and ``min_coverage`` (the reference code skips images whose mask
covers < 2 % of the image, ``min_coverage=0.02``); both default to 0 (the paper).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from ..hub import from_pretrained

CLIPSEG_DEFAULT = "CIDAS/clipseg-rd64-refined"


def dilation_kernel_size(dilate: float, side: int) -> int:
    """Odd kernel size for dilating by ``dilate`` x image side (0 -> 1 = no dilation)."""
    if dilate <= 0:
        return 1
    return 2 * int(round(dilate * side / 2.0)) + 1


def dilate_masks(masks: torch.Tensor, dilate: float) -> torch.Tensor:
    """Dilate boolean masks ``[B, H, W]`` with a square kernel of ``dilate`` x the image side (as the reference code)."""
    ks = dilation_kernel_size(dilate, max(masks.shape[-2:]))
    if ks <= 1:
        return masks
    x = masks[:, None].float()
    return F.max_pool2d(x, ks, stride=1, padding=ks // 2)[:, 0, : masks.shape[-2], : masks.shape[-1]] > 0.5


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, h, w]`` float maps to ``size`` (antialiased when shrinking)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    shrink = maps.shape[-2] > size[0] or maps.shape[-1] > size[1]
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False,
                         antialias=shrink)[:, 0]


class Masker:
    """Base class: ``saliency(images, labels, class_names) -> [B, H, W]`` in ``[0, 1]``; ``__call__`` thresholds.

    Constructors only store options; weights load lazily on first use (or :meth:`load`).
    """

    name: ClassVar[str] = "masker"

    def __init__(self, threshold: float = 0.2, dilate: float = 0.0, min_coverage: float = 0.0,
                 device: str = "cpu", batch_size: int = 32, max_coverage: float = 1.0) -> None:
        if not 0.0 < max_coverage <= 1.0:
            raise ValueError(f"max_coverage must be in (0, 1], got {max_coverage}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold (lambda) must be in [0, 1], got {threshold}")
        if not 0.0 <= min_coverage < 1.0:
            raise ValueError(f"min_coverage must be in [0, 1), got {min_coverage}")
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0 (a fraction of the image side), got {dilate}")
        self.threshold = float(threshold)
        self.dilate = float(dilate)
        self.min_coverage = float(min_coverage)
        self.max_coverage = float(max_coverage)
        self.device = device
        self.batch_size = int(batch_size)

    def to(self, device: str) -> Masker:
        self.device = device
        return self

    def load(self) -> Masker:
        return self

    def config(self) -> dict:
        """Everything that determines the masks (saved in the outlier store's config)."""
        cfg = {"name": self.name, "threshold": self.threshold, "dilate": self.dilate,
               "min_coverage": self.min_coverage}
        if self.max_coverage < 1.0:  # only when set, so stores forged before the option keep their config
            cfg["max_coverage"] = self.max_coverage
        return cfg

    def saliency(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _check(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"maskers take float images [B, 1|3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        return images.float(), labels

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 class_names: list[str] | None = None) -> torch.Tensor:
        """Boolean masks ``[B, H, W]``, True on the ID object (``A >= λ``, then optional dilation)."""
        images, labels = self._check(images, labels)
        outs = []
        for i in range(0, images.shape[0], self.batch_size):
            sal = self.saliency(images[i:i + self.batch_size], labels[i:i + self.batch_size], class_names)
            outs.append(dilate_masks(self.threshold_maps(sal.cpu()), self.dilate))
        return torch.cat(outs) if outs else torch.zeros((0, *images.shape[-2:]), dtype=torch.bool)

    def threshold_maps(self, sal: torch.Tensor) -> torch.Tensor:
        """``A >= λ`` per image; where that covers more than ``max_coverage`` of the image, keep only
        the most salient ``max_coverage`` share instead (``A >= `` the image's ``1 - max_coverage``
        quantile of ``A``), so an object-wide saliency cannot erase the whole image."""
        masks = sal >= self.threshold
        if self.max_coverage >= 1.0:
            return masks
        flat = sal.flatten(1)
        over = masks.flatten(1).float().mean(1) > self.max_coverage
        if over.any():
            q = torch.quantile(flat[over].float(), 1.0 - self.max_coverage, dim=1)
            masks[over] = sal[over] >= q.view(-1, 1, 1)
        return masks

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class ClipSegMasker(Masker):
    """CLIPSeg text-prompted segmentation, SHIFT Eq. 3: ``M = sigmoid(CLIPSeg(x, "a photo of a {class}")) >= λ``.

    ``model`` is a hub id (default, the paper's ``CIDAS/clipseg-rd64-refined``) or a local folder holding
    the model and its ``CLIPSegProcessor`` (``save_pretrained`` of both); a preloaded
    ``(model, processor)`` pair is accepted too.
    """

    name = "clipseg"

    def __init__(self, model=CLIPSEG_DEFAULT, prompt: str = "a photo of a {}", threshold: float = 0.2,
                 dilate: float = 0.0, min_coverage: float = 0.0, device: str = "cpu", batch_size: int = 32,
                 option: str = "--clipseg-model", max_coverage: float = 1.0) -> None:
        super().__init__(threshold, dilate, min_coverage, device, batch_size, max_coverage)
        if "{}" not in prompt:
            raise ValueError(f"the CLIPSeg prompt needs a '{{}}' where the class name goes, got {prompt!r}")
        self.model = model
        self.prompt = prompt
        self.option = option
        self._net = None
        self._proc = None

    def config(self) -> dict:
        ref = self.model if isinstance(self.model, str) else getattr(getattr(self.model[0], "config", None),
                                                                      "_name_or_path", "in-memory")
        return {**super().config(), "model": str(ref), "prompt": self.prompt}

    def load(self) -> ClipSegMasker:
        if self._net is None:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            if isinstance(self.model, (tuple, list)):
                net, proc = self.model
            else:
                net = from_pretrained(CLIPSegForImageSegmentation, str(self.model), "CLIPSeg masker", self.option)
                proc = from_pretrained(CLIPSegProcessor, str(self.model), "CLIPSeg processor", self.option)
            self._net = net.to(self.device).eval()
            self._proc = proc
        elif next(self._net.parameters()).device != torch.device(self.device):
            self._net.to(self.device)
        return self

    @torch.no_grad()
    def saliency(self, images, labels, class_names):
        if not class_names:
            raise ValueError("the clipseg masker needs the ID class names for its prompts "
                             "(dataset.class_names, or class_names=... / --class-names)")
        self.load()
        if ((labels < 0) | (labels >= len(class_names))).any():
            raise ValueError(f"labels must be class indices in [0, {len(class_names)}) for clipseg prompts")
        n, c, h, w = images.shape
        rgb = images.expand(-1, 3, -1, -1) if c == 1 else images
        arrays = [(img.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8) for img in rgb.cpu()]
        prompts = [self.prompt.format(class_names[int(y)]) for y in labels]
        inputs = self._proc(text=prompts, images=arrays, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        logits = self._net(**inputs).logits.float()
        logits = logits.reshape(n, *logits.shape[-2:])
        prob = torch.sigmoid(logits).cpu()
        return resize_maps(prob, (h, w)).clamp_(0.0, 1.0)


class CamMasker(Masker):
    """Class activation maps of the user's classifier at its last feature map (KIRBY Eq. 2).

    ``method="layercam"`` (Jiang et al. 2021): ``A = ReLU(sum_c ReLU(dY/dF_c) * F_c)``, element-wise weights;
    ``method="gradcam"`` (Selvaraju et al. 2017): ``A = ReLU(sum_c mean_ij(dY/dF_c) * F_c)``.
    ``Y`` is the logit of the image's label (``target="label"``) or of the predicted class
    (``target="pred"``, also used for unlabelled images). The map is upsampled bilinearly to the image
    size and min-max normalised to ``[0, 1]`` per image; a constant map gives an empty mask.
    Only the head is differentiated: the classifier's weights and mode are left unchanged.
    """

    def __init__(self, model: torch.nn.Module, method: str = "layercam", threshold: float = 0.2,
                 dilate: float = 0.0, min_coverage: float = 0.0, target: str = "label", device: str = "cpu",
                 batch_size: int = 64, model_id: str | None = None, max_coverage: float = 1.0) -> None:
        super().__init__(threshold, dilate, min_coverage, device, batch_size, max_coverage)
        if method not in ("layercam", "gradcam"):
            raise ValueError(f"CAM method must be 'layercam' or 'gradcam', got {method!r}")
        if target not in ("label", "pred"):
            raise ValueError(f"target must be 'label' or 'pred', got {target!r}")
        if model is None or not all(hasattr(model, a) for a in ("feature_map", "pool", "head")):
            raise ValueError(f"the {method} masker needs the classifier (an oodforge Classifier with feature_map, pool "
                             "and head); CLI: --checkpoint DIR")
        self.model = model
        self.method = method
        self.target = target
        self.model_id = model_id

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.method

    def config(self) -> dict:
        ident = self.model_id
        if ident is None:
            from ..models.checkpoint import weights_hash

            ident = "weights:" + weights_hash(self.model)
        return {**super().config(), "model": ident, "target": self.target}

    def saliency(self, images, labels, class_names):
        model = self.model
        was_training = model.training
        model.eval()
        try:
            # computed where the classifier lives (the masker never moves the user's model)
            dev = next(model.parameters()).device
            x = images.to(dev)
            with torch.no_grad():
                fmap = model.feature_map(x)
            fmap = fmap.detach().float().requires_grad_(True)
            with torch.enable_grad():
                logits = model.head(model.pool(fmap))
                tgt = labels.to(dev).clone()
                if self.target == "pred":
                    tgt = logits.argmax(1)
                else:
                    tgt = torch.where(tgt < 0, logits.argmax(1), tgt)
                if (tgt >= logits.shape[1]).any():
                    raise ValueError(f"labels exceed the classifier's {logits.shape[1]} classes")
                score = logits.gather(1, tgt[:, None]).sum()
                (grad,) = torch.autograd.grad(score, fmap)
        finally:
            model.train(was_training)
        fmap, grad = fmap.detach(), grad.detach()
        if self.method == "layercam":
            cam = (F.relu(grad) * fmap).sum(1)
        else:
            cam = (grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(1)
        cam = F.relu(cam)
        cam = resize_maps(cam.cpu(), tuple(images.shape[-2:]))
        flat = cam.flatten(1)
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        span = hi - lo
        norm = torch.where(span > 1e-12, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
        return norm.view_as(cam).clamp_(0.0, 1.0)


MASKERS = ("clipseg", "layercam", "gradcam")


def make_masker(name: str, model=None, **opts) -> Masker:
    """Build a masker by name (a swappable SHIFT component).

    * ``make_masker("clipseg", model="CIDAS/clipseg-rd64-refined" | folder, threshold=0.2, dilate=0, min_coverage=0)``
    * ``make_masker("layercam" | "gradcam", model=classifier, threshold=0.2, ...)``
    """
    if name == "clipseg":
        return ClipSegMasker(model if model is not None else CLIPSEG_DEFAULT, **opts)
    if name in ("layercam", "gradcam"):
        return CamMasker(model, method=name, **opts)
    raise ValueError(f"unknown masker {name!r}; choose one of {', '.join(MASKERS)}")


def mask_coverage(masks: torch.Tensor) -> torch.Tensor:
    """Fraction of each image covered by its mask, ``[B]``."""
    return masks.flatten(1).float().mean(1)


__all__ = ["Masker", "ClipSegMasker", "CamMasker", "make_masker", "dilate_masks", "mask_coverage", "MASKERS",
           "CLIPSEG_DEFAULT", "dilation_kernel_size"]
