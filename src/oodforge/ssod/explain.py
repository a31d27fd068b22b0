"""Show where SSOD samples its ID and OOD supervision in an image (Pei, ICLR 2024, Fig. 2 (c)/(d)).

The classification head applied to every feature-map position gives the target-class
confidence map; the sampler of Eq. 12 marks each position ID (>= gamma, drawn green), OOD
(< 1 - gamma, drawn red) or ignored (left as is). Each position is drawn over the image region it
corresponds to (the map's grid stretched over the image), so one can see whether the OOD samples
really are background.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from .model import SSODModel, apply_per_position
from .sampler import ID_LABEL, OOD_LABEL, sample_labels_from_confidence, target_confidence

GREEN = (0, 200, 0)
RED = (230, 0, 0)
GRID = (128, 128, 128)


def _to_rgb_uint8(image: torch.Tensor) -> np.ndarray:
    arr = (image.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] != 3:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def render_overlay(image: torch.Tensor, labels: np.ndarray, scale: int = 1, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture ``[H*scale, W*scale, 3]``: the image with ID/OOD positions tinted.

    Args:
        image: ``[C, H, W]`` float in ``[0, 1]``.
        labels: ``[h, w]`` sampler labels (1 ID, 0 OOD, -1 ignored) on the feature-map grid.
        scale: integer nearest-neighbour upscaling of the image (small images are hard to see).
        alpha: opacity of the tint.
    """
    rgb = _to_rgb_uint8(image)
    if scale > 1:
        rgb = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8))
    out = rgb.astype(np.float32)
    big_h, big_w = out.shape[:2]
    fh, fw = labels.shape
    rows = np.linspace(0, big_h, fh + 1).round().astype(int)
    cols = np.linspace(0, big_w, fw + 1).round().astype(int)
    for i in range(fh):
        for j in range(fw):
            color = {ID_LABEL: GREEN, OOD_LABEL: RED}.get(int(labels[i, j]))
            if color is not None:
                region = out[rows[i]:rows[i + 1], cols[j]:cols[j + 1]]
                region[:] = (1 - alpha) * region + alpha * np.asarray(color, dtype=np.float32)
    for r in rows[1:-1]:
        out[r, :] = GRID
    for c in cols[1:-1]:
        out[:, c] = GRID
    return out.round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def explain_image(
    model: SSODModel,
    image: torch.Tensor,
    label: int | None = None,
    gamma: float = 0.95,
    path: str | Path = "ssod_explain.png",
    min_side: int = 224,
    device: str = "cpu",
) -> dict:
    """Save a PNG of ``image`` with the positions SSOD samples as ID (green) / OOD (red), Fig. 2.

    Args:
        model: an SSOD model (its classification head drives the sampler, its OOD head ``p_id``).
        image: ``[C, H, W]`` float in ``[0, 1]`` at the model's training size.
        label: the target class of Eq. 12; ``None`` uses the predicted class.
        gamma: sampler threshold (Eq. 12).
        path: output ``.png``; written atomically.
        min_side: the image is upscaled by an integer factor until its short side is at least
            this many pixels; the PNG is ``(H * scale, W * scale)``.

    Returns:
        dict with ``path``, ``target``, ``predicted``, ``p_id`` (Eq. 15), ``confidence`` (the
        ``[h, w]`` target-confidence map), ``labels`` (``[h, w]``), ``n_id``, ``n_ood``, ``scale``
        and ``size`` (height, width of the PNG).
    """
    if not isinstance(model, SSODModel):
        raise TypeError(f"explain_image needs an SSODModel, got {type(model).__name__}; load the --checkpoint of "
                        "an SSOD-trained model")
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"image must be a float tensor [C, H, W] in [0, 1], got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if image.shape[0] != model.in_channels:
        raise ValueError(f"image has {image.shape[0]} channels, the model expects {model.in_channels}")
    if not image.is_floating_point():
        raise ValueError(f"image must be float in [0, 1], got dtype {image.dtype}; divide uint8 images by 255")
    if label is not None and not 0 <= int(label) < model.num_classes:
        raise ValueError(f"label must be a class index in [0, {model.num_classes}), got {label}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output path {path} must end in .png")

    model = model.to(device).eval()
    x = image.float().unsqueeze(0).to(device)
    fmap = model.feature_map(x)
    pen = model.pool(fmap)
    logits = model.head(pen)
    predicted = int(logits.argmax(1))
    target = predicted if label is None else int(label)
    cls_map = apply_per_position(model.head, fmap)
    conf = target_confidence(cls_map, torch.tensor([target], device=cls_map.device))
    labels = sample_labels_from_confidence(conf, gamma)[0].cpu().numpy()
    p_id = float(model.id_probability(pen)[0])

    h, w = image.shape[1:]
    scale = max(1, math.ceil(min_side / min(h, w)))
    picture = render_overlay(image, labels, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {tmp}")
    os.replace(tmp, path)
    return {"path": path, "target": target, "predicted": predicted, "p_id": p_id,
            "confidence": conf[0].cpu().numpy(), "labels": labels, "n_id": int((labels == ID_LABEL).sum()),
            "n_ood": int((labels == OOD_LABEL).sum()), "scale": scale, "size": picture.shape[:2]}
