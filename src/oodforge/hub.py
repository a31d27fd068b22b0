"""Loading foundation-model weights from a hub id or a local folder, with one clear error.

No weights can be downloaded on many machines oodforge runs on (and none in its tests), so every
foundation model (CLIPSeg, Stable-Diffusion inpainting) is a component named by a hub id *or* a
local folder written by ``save_pretrained``. When neither works, :class:`ModelUnavailableError`
says which option to set instead of a page of retry messages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelUnavailableError(RuntimeError):
    """Weights for a foundation model could not be found locally or on the hub."""


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OODFORGE_OFFLINE"))


def resolve_model_ref(ref: str | os.PathLike, what: str, option: str) -> str:
    """Return an existing local folder (absolute) or a syntactically valid hub id; else raise.

    A reference that looks like a path (contains a path separator beyond ``org/name``, starts with
    ``/``, ``.`` or ``~``) must exist.
    """
    s = str(ref)
    p = Path(s).expanduser()
    if p.is_dir():
        return str(p.resolve())
    looks_local = s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s or not _HUB_ID.match(s)
    if looks_local:
        raise ModelUnavailableError(f"{what}: the folder {s!r} does not exist. Set {option} to a folder written by "
                                    "save_pretrained or to a hub id (e.g. the paper's model).")
    return s


def from_pretrained(cls, ref: str, what: str, option: str, **kwargs):
    """``cls.from_pretrained(ref)`` from the local cache first, then the hub; one clear error if both fail."""
    resolved = resolve_model_ref(ref, what, option)
    try:
        return cls.from_pretrained(resolved, local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as first:
        if Path(resolved).is_dir():
            raise ModelUnavailableError(f"{what}: cannot load {resolved!r} ({type(first).__name__}: "
                                        f"{str(first).splitlines()[0][:300]}). Check the folder, or set {option} "
                                        "to another folder or hub id.") from first
        if _offline():
            raise ModelUnavailableError(f"{what}: {resolved!r} is not in the local cache and the hub is disabled "
                                        f"(HF_HUB_OFFLINE). Set {option} to a local folder written by save_pretrained."
                                        ) from first
    try:
        return cls.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelUnavailableError(f"{what}: cannot load {resolved!r}: not a local folder, and the hub is unreachable "
                                    f"or has no such model. Set {option} to a local folder written by save_pretrained "
                                    "(or a reachable hub id).") from e


def load_sd_inpaint_pipeline(ref: str | os.PathLike, what: str, option: str, dtype=None):
    """diffusers' ``StableDiffusionInpaintPipeline`` from a hub id or a ``save_pretrained`` folder (through
    :func:`from_pretrained`): no safety checker, its progress bar off, ``dtype`` (e.g. fp16 on CUDA) when given.
    The one place SHIFT's inpainter and SynOOD's generator load Stable Diffusion."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None and dtype != torch.float32 else {}
    pipe = from_pretrained(StableDiffusionInpaintPipeline, str(ref), what, option, safety_checker=None,
                           requires_safety_checker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
