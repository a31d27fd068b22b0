"""Checkpoints: weights in safetensors plus a JSON sidecar describing how to rebuild the model.

``model.safetensors`` never executes code when loaded; ``meta.json`` records the architecture,
number of classes, input channels, normalisation, class names and how the model was trained.
A checkpoint path may be the folder or the ``.safetensors`` file inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checks import one_line
from .backbones import build_model
from .base import Classifier

WEIGHTS = "model.safetensors"
META = "meta.json"
REQUIRED_META = ("arch", "num_classes", "in_channels")


def _folder(path: str | Path) -> Path:
    p = Path(path)
    return p.parent if p.suffix == ".safetensors" else p


def model_meta(model: Classifier) -> dict:
    return {"arch": getattr(model, "arch", type(model).__name__), "num_classes": model.num_classes,
            "in_channels": model.in_channels, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}


def save_checkpoint(model: Classifier, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/meta.json`` atomically (temp file + rename)."""
    folder = _folder(path)
    folder.mkdir(parents=True, exist_ok=True)
    full_meta = {**model_meta(model), **(meta or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, folder / WEIGHTS)
    tmp_meta = folder / (META + ".tmp")
    tmp_meta.write_text(json.dumps(full_meta, indent=2))
    os.replace(tmp_meta, folder / META)
    return folder


def checkpoint_files(path: str | Path, option: str = "checkpoint") -> tuple[Path, Path]:
    """``(weights file, meta.json)`` of a checkpoint folder (or its ``.safetensors`` file); a missing folder
    or file raises ``FileNotFoundError`` naming ``option``. Cheap: the CLI calls it before loading any data."""
    folder = _folder(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {path}: no such folder (a checkpoint folder from `oodforge train`)")
    missing = [f for f in (WEIGHTS, META) if not (folder / f).is_file()]
    if missing and (folder / "user_model.json").is_file():  # written by `train --model` (models.cli)
        try:
            use = json.loads((folder / "user_model.json").read_text()).get("use_with", "--model ... --weights ...")
        except ValueError:
            use = "--model ... --weights ..."
        raise FileNotFoundError(f"{option} {path} holds your own network trained by `oodforge train --model`, "
                                f"not an oodforge checkpoint: give it as {use}")
    if missing:
        raise FileNotFoundError(f"{option} {path}: missing {', '.join(missing)}; a checkpoint folder holds "
                                f"{WEIGHTS} and {META} (written by `oodforge train` or save_checkpoint)")
    return folder / WEIGHTS, folder / META


def load_checkpoint(path: str | Path, device: str = "cpu", option: str = "checkpoint") -> tuple[Classifier, dict]:
    """Rebuild the model from ``meta.json`` and load its weights; returns ``(model.eval(), meta)``."""
    wfile, mfile = checkpoint_files(path, option)
    try:
        meta = json.loads(mfile.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mfile} is not valid JSON ({e}); re-save the checkpoint") from e
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{mfile} lacks {missing}; it needs arch, num_classes and in_channels")
    model = build_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta.get("mean"), meta.get("std"))
    try:
        state = load_file(str(wfile))
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{wfile} cannot be read ({one_line(e)}); the file is truncated or corrupt: "
                         "copy it again or re-run the command that wrote it") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), one_line(e)[:200])
        raise ValueError(f"{wfile} does not match architecture {meta['arch']!r} with {meta['num_classes']} classes "
                         f"and {meta['in_channels']} channels as {mfile.name} says ({first}); the weights come "
                         "from another model") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{wfile} does not match architecture {meta['arch']!r}: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return model.to(device).eval(), meta


def weights_hash(model: torch.nn.Module) -> str:
    """A short content hash of the model's parameters and buffers (the feature-cache key).

    It reads every weight (a full pass, seconds for a ResNet-50 on a CPU), so it is computed when asked and
    never memoised on the model: an in-place change through ``param.data`` leaves no trace a cheap check
    could see. Callers that need it many times for one unchanged model compute it once (``oodforge.bench``
    per job, passed to ``extract_features(model_hash=)``). CPU tensors are hashed in place, without the
    copy ``tobytes`` made (same bytes, same hash)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy())
    return h.hexdigest()[:16]
