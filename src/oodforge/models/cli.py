"""The ``--model`` options shared by ``oodforge bench``, ``export`` and ``synth shift``: a user's own classifier.

``--model package.module:factory [--weights FILE] [--head fc] [--features layer4] [--mean ..] [--std ..]``
imports the user's factory, loads the weights and wraps the network for the detectors
(:func:`oodforge.models.wrap.load_user_model`). The option objects are defined once here and used as the
defaults of each command's parameters, so the three commands spell and document them identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

MODEL = typer.Option(None, "--model", help="Your own classifier: package.module:factory (a function returning "
                     "the nn.Module; see oodforge.models.wrap). Instead of --checkpoint.")
WEIGHTS = typer.Option(None, "--weights", help="--model's weights: .safetensors, or a torch.save'd state dict "
                       "(read with weights_only=True).")
HEAD = typer.Option("fc", "--head", help="--model: name of its final nn.Linear.")
FEATURES = typer.Option("layer4", "--features", help="--model: name of the module that outputs its last feature map.")
MEAN = typer.Option(None, "--mean", help="--model: per-channel normalisation mean, e.g. '0.485,0.456,0.406' "
                    "(default 0.5 per channel).")
STD = typer.Option(None, "--std", help="--model: per-channel normalisation std (default 0.5).")


def parse_floats(text: Optional[str], option: str, n: int) -> tuple[float, ...]:
    """``'0.485,0.456,0.406'`` -> floats, one per channel (``n``); ``None`` -> 0.5 per channel."""
    if text is None:
        return (0.5,) * n
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None
    if len(values) != n:
        raise typer.BadParameter(f"expected {n} values (one per channel), got {len(values)}", param_hint=option)
    return values


def check_model_options(user_model: Optional[str], checkpoint: Optional[Path], weights: Optional[Path],
                        mean: Optional[str], std: Optional[str]) -> None:
    """Before any data is loaded: ``--model`` excludes ``--checkpoint``; ``--weights/--mean/--std`` need it."""
    if user_model is not None and checkpoint is not None:
        raise typer.BadParameter("give either --checkpoint or --model, not both", param_hint="--model")
    if user_model is None and any(v is not None for v in (weights, mean, std)):
        raise typer.BadParameter("--weights, --mean and --std describe --model; give --model too",
                                 param_hint="--model")
    if weights is not None and not Path(weights).is_file():
        raise typer.BadParameter(f"{weights}: no such file", param_hint="--weights")


def user_model_from_options(spec: str, weights: Optional[Path], head: str, features: str, mean: Optional[str],
                            std: Optional[str], image_shape: tuple[int, int, int]):
    """The wrapped user classifier for images of ``image_shape`` (C, H, W) and its provenance record."""
    from .wrap import load_user_model

    c, h, w = image_shape
    model = load_user_model(spec, str(weights) if weights else None, head, features,
                            parse_floats(mean, "--mean", c), parse_floats(std, "--std", c), (h, w))
    return model, {"user_model": spec, "weights": str(weights) if weights else None}


__all__ = ["MODEL", "WEIGHTS", "HEAD", "FEATURES", "MEAN", "STD", "parse_floats", "check_model_options",
           "user_model_from_options"]
