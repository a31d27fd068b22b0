"""Command functions of the SSOD subpackage, wired into the ``oodforge`` CLI by ``oodforge.cli``.

``explain``: draw where SSOD samples ID (green) / OOD (red) supervision in one image (Fig. 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import cv2
import numpy as np
import torch
import typer


def load_image_file(path: Path, in_channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a PNG/JPEG as float ``[C, H, W]`` in ``[0, 1]`` with ``in_channels`` channels (1 or 3),
    resized to ``size = (H, W)`` when given (area interpolation when shrinking, linear when growing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"cannot read image file {path}: expected a PNG or JPEG image")
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"image file {path} has pixel type {arr.dtype}; save it as 8-bit PNG or JPEG")
    if arr.ndim == 2:
        gray, rgb = arr, cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    elif arr.shape[2] == 4:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    else:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if in_channels == 1:
        img = gray[:, :, None]
    elif in_channels == 3:
        img = rgb
    else:
        raise ValueError(f"the model expects {in_channels} channels; image files give 1 (gray) or 3 (RGB)")
    if size is not None and tuple(img.shape[:2]) != tuple(size):
        shrink = size[0] * size[1] < img.shape[0] * img.shape[1]
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if img.ndim == 2:
            img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def explain(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint folder of an SSOD-trained model (arch ssod:<backbone>)")],
    image: Annotated[Path, typer.Argument(help="PNG or JPEG image; resized to the model's training size")],
    out: Annotated[Path, typer.Argument(help="output PNG with ID (green) / OOD (red) positions drawn")],
    gamma: Annotated[float, typer.Option(help="sampler confidence threshold of Eq. 12")] = 0.95,
    label: Annotated[Optional[int], typer.Option(help="target class index; default: the predicted class")] = None,
) -> None:
    """Draw where SSOD samples ID (green) and OOD (red) positions in IMAGE (Pei 2024, Fig. 2)."""
    from ..models.checkpoint import load_checkpoint
    from .explain import explain_image
    from .model import SSODModel

    model, meta = load_checkpoint(checkpoint)
    if not isinstance(model, SSODModel):
        raise typer.BadParameter(f"{checkpoint} holds a {meta.get('arch')!r} model without an OOD head; pass the "
                                 "checkpoint of an SSOD-trained model (arch 'ssod:<backbone>')",
                                 param_hint="CHECKPOINT")
    size = model.image_size
    if size is None and meta.get("image_size"):
        size = tuple(int(v) for v in meta["image_size"][-2:])
    try:
        x = load_image_file(image, model.in_channels, size)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="IMAGE") from e
    if label is not None and not 0 <= label < model.num_classes:
        raise typer.BadParameter(f"must be a class index in [0, {model.num_classes})", param_hint="--label")
    res = explain_image(model, x, label=label, gamma=gamma, path=out)
    names = meta.get("class_names") or []

    def name(i: int) -> str:
        return f"{i} ({names[i]})" if i < len(names) else str(i)

    h, w = res["labels"].shape
    typer.echo(f"wrote {res['path']} ({res['size'][1]}x{res['size'][0]} px): target class {name(res['target'])}, "
               f"predicted {name(res['predicted'])}, P(ID|x) = {res['p_id']:.4f}; of {h}x{w} positions "
               f"{res['n_id']} ID (green, conf >= {gamma}) and {res['n_ood']} OOD (red, conf < {1 - gamma:.4g})")
