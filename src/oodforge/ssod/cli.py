"""Command functions of the SSOD subpackage, wired into the ``oodforge`` CLI by ``oodforge.cli``.

``explain``: draw where SSOD samples ID (green) / OOD (red) supervision in one image (Fig. 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


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
        from ..data.loaders import load_image_file

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
