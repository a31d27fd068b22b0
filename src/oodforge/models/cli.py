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
                            std: Optional[str], image_shape: tuple[int, int, int], seed: int | None = None):
    """The wrapped user classifier for images of ``image_shape`` (C, H, W) and its provenance record
    (``seed``: set torch's seed first, so a network without ``--weights`` starts from the same weights)."""
    from .wrap import load_user_model

    if seed is not None:
        import torch

        torch.manual_seed(seed)
    c, h, w = image_shape
    try:  # wrapping runs the network once on random images of this shape (models.wrap)
        model = load_user_model(spec, str(weights) if weights else None, head, features,
                                parse_floats(mean, "--mean", c), parse_floats(std, "--std", c), (h, w))
    except RuntimeError as e:  # (torch's errors from inside the user's forward; bad input raises ValueError)
        raise _probe_error(f"--model {spec}", image_shape, e) from None
    probe_model(model, image_shape, f"--model {spec}")
    return model, {"user_model": spec, "weights": str(weights) if weights else None}


def check_train_model_options(user_model: Optional[str], weights: Optional[Path], mean: Optional[str],
                              std: Optional[str], method: str, backbone: str, mode: Optional[str],
                              init_from: Optional[Path]) -> None:
    """``train --model``: the user's network is trained by the one loop with ``--method plain`` (from its own
    initialisation or ``--weights``) or ``oe`` (fine-tuning ``--weights`` on forged outliers); checked first."""
    check_model_options(user_model, None, weights, mean, std)
    if user_model is None:
        return
    if method not in ("plain", "oe"):
        raise typer.BadParameter(f"--method {method}: your own --model trains with --method plain or oe (ssod and "
                                 "the recipes change oodforge's own backbones)", param_hint="--method")
    if backbone != "small_resnet" or mode is not None:
        raise typer.BadParameter("--backbone / --mode choose oodforge's networks; with --model your own network is "
                                 "trained", param_hint="--backbone")
    if init_from is not None:
        raise typer.BadParameter("--init-from loads an oodforge checkpoint; your --model starts from --weights",
                                 param_hint="--init-from")
    if method == "oe" and weights is None:
        raise typer.BadParameter("outlier exposure fine-tunes a trained classifier: give your model's trained "
                                 "--weights", param_hint="--weights")


#: the files ``train --model`` writes (a user's network is rebuilt by its factory, not by oodforge.models)
USER_WEIGHTS, USER_META = "weights.safetensors", "user_model.json"


def save_user_model(model, out: Path, meta: dict) -> str:
    """Write a user's network trained by ``train --model``: ``weights.safetensors`` (its own module's state dict,
    the keys its ``load_state_dict`` expects, so ``--model SPEC --weights OUT/weights.safetensors`` loads it in
    bench / export / synth) and ``user_model.json`` (how to build it again, plus the training record).
    Returns the label printed for it."""
    import json
    import os

    from safetensors.torch import save_file

    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    save_file(state, str(out / (USER_WEIGHTS + ".tmp")))
    os.replace(out / (USER_WEIGHTS + ".tmp"), out / USER_WEIGHTS)
    doc = {"user_model": model.rebuild_spec(), "num_classes": model.num_classes, **meta,
           "use_with": f"--model {model.factory} --weights {out / USER_WEIGHTS} --head {model.head_name} "
                       f"--features {model.features_name}"}
    (out / (USER_META + ".tmp")).write_text(json.dumps(doc, indent=2, default=str))
    os.replace(out / (USER_META + ".tmp"), out / USER_META)
    return f"{model.factory} (use it with {doc['use_with']})"


def _probe_error(what: str, image_shape: tuple[int, int, int], e: Exception):
    from ..checks import InputError, one_line

    c, h, w = image_shape
    return InputError(f"{what} cannot take the suite's images ({c}x{h}x{w}, {c} channel{'s' * (c > 1)}): a dummy "
                      f"batch fails with {type(e).__name__}: {one_line(e)[:240]}; build it for {c}-channel "
                      f"{h}x{w} inputs (or set channels / image_size in the suite file)")


def probe_model(model, image_shape: tuple[int, int, int], what: str) -> None:
    """One dummy batch (2 images of the suite's ``image_shape``, zeros) through ``model`` before any extraction:
    a network built for other inputs (e.g. a first convolution for 3 channels given grey images) fails here in
    one line instead of with a traceback from inside its forward pass after the data is loaded."""
    import torch

    from ..checks import InputError

    c, h, w = image_shape
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, c, h, w))
    except Exception as e:  # noqa: BLE001 - whatever the user's forward raises
        raise _probe_error(what, image_shape, e) from None
    finally:
        model.train(was_training)
    if tuple(logits.shape) != (2, model.num_classes):
        raise InputError(f"{what} gives outputs of shape {list(logits.shape)} for a batch of 2; a classifier must "
                         f"return logits [N, {model.num_classes}]")


__all__ = ["MODEL", "WEIGHTS", "HEAD", "FEATURES", "MEAN", "STD", "parse_floats", "check_model_options",
           "user_model_from_options", "probe_model", "check_train_model_options", "save_user_model"]
