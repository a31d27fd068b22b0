"""A frozen CLIP model (transformers ``CLIPModel`` + its processor) as a feature extractor.

Loaded lazily from a hub id (``openai/clip-vit-base-patch16``) or a local folder saved with
``save_pretrained``. Images come in as oodforge :class:`~oodforge.data.base.ArrayDataset` (uint8,
``[N, C, H, W]``); grayscale images are repeated to 3 channels and the model's own image processor
(resize, centre crop, CLIP normalisation) prepares them, exactly as for the model's training.

Features are L2-normalised float32 on the CPU and cached: in memory per (model, image set), and
on disk when a ``cache_dir`` is given (keyed by the model, the image set's ``identity`` and the
processor settings), so fitting several CLIP detectors reads every image set through CLIP once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..data.base import ArrayDataset
from ..hub import ModelUnavailableError, from_pretrained

CLIP_OPTION_HELP = ("a CLIP model: pass --clip-model (or the detector parameter clip_model=...) with a hub id "
                    "such as openai/clip-vit-base-patch16 or a local folder saved with save_pretrained")


def resolve_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def rgb_uint8_hwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> uint8 ``[N, H, W, 3]``; grayscale is repeated to 3 channels."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    elif x.shape[1] != 3:
        raise ValueError(f"images have {x.shape[1]} channels; CLIP takes 1 (gray, repeated) or 3 (RGB)")
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _pooled(out) -> torch.Tensor:
    """transformers < 5 returns a tensor from get_*_features, >= 5 a model output whose pooler_output is it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipFeatures:
    """Frozen CLIP image/text encoders; use :func:`load_clip` (cached per model and device)."""

    def __init__(self, model, processor, name: str, device: str | torch.device = "cpu",
                 cache_dir: str | os.PathLike | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = str(name)
        self.device = resolve_device(device)
        self.dtype = next(model.parameters()).dtype
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._mem: dict[str, torch.Tensor] = {}
        h = hashlib.sha256(self.name.encode())
        for p in list(model.parameters())[:4]:  # cheap fingerprint of the weights (random tiny models differ)
            h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        self.key = h.hexdigest()[:16]

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    # --- text -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 1000, progress: bool = False,
                    desc: str = "CLIP text", normalize: bool = True) -> torch.Tensor:
        """Text features ``[len(texts), D]`` (float32, CPU), L2-normalised unless ``normalize=False`` (the raw
        text-encoder outputs, whose norms SynOOD's label fine-tuning starts from); cached by the list's content."""
        h = hashlib.sha256(("\n".join(texts)).encode()).hexdigest()[:24]
        key = f"text:{self.key}:{h}"
        hit = self._lookup(key)
        if hit is not None:
            return torch.nn.functional.normalize(hit, dim=-1) if normalize else hit
        from ..progress import progress_bar

        tok = self.processor.tokenizer
        max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        feats = []
        for i in progress_bar(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            feats.append(_pooled(self.model.get_text_features(**enc)).float().cpu())
        out = torch.cat(feats) if feats else torch.zeros(0, self.dim)
        self._store(key, out)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    # --- images -----------------------------------------------------------------------------
    def pixel_values(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """CLIP-preprocessed pixels for uint8 ``[N, C, H, W]`` images (the processor's resize/crop/normalise)."""
        arr = rgb_uint8_hwc(images)
        ip = getattr(self.processor, "image_processor", self.processor)
        return ip(images=list(arr), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f = _pooled(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu()

    def image_features(self, dataset: ArrayDataset, batch_size: int = 64, progress: bool = False,
                       desc: str = "CLIP images") -> torch.Tensor:
        """L2-normalised image features ``[N, D]`` of ``dataset``, computed once per (model, image set)."""
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"image_features expects an ArrayDataset, got {type(dataset).__name__}")
        key = f"img:{self.key}:{dataset.identity}"
        hit = self._lookup(key)
        if hit is not None:
            return hit
        from ..progress import progress_bar

        feats = []
        n = len(dataset)
        for i in progress_bar(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
            feats.append(self.encode_pixels(self.pixel_values(dataset.images[i:i + batch_size])))
        out = torch.cat(feats) if feats else torch.zeros(0, self.dim)
        self._store(key, out)
        return out

    # --- cache ------------------------------------------------------------------------------
    def _file(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "clip" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".pt")

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key in self._mem:
            return self._mem[key]
        f = self._file(key)
        if f is not None and f.is_file():
            try:
                t = torch.load(f, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache entry is recomputed, never trusted
                return None
            self._mem[key] = t
            return t
        return None

    def _store(self, key: str, t: torch.Tensor) -> None:
        self._mem[key] = t
        f = self._file(key)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            torch.save(t, tmp)
            os.replace(tmp, f)


def load_pretrained(cls, ref: str | os.PathLike, what: str, option: str, **kwargs):
    """``cls.from_pretrained`` through :func:`oodforge.hub.from_pretrained` (local folder or cache first,
    then the hub), raising :class:`ModelUnavailableError` that names ``option`` when the model is unavailable."""
    return from_pretrained(cls, str(ref), what, option, **kwargs)


_LOADED: dict[tuple[str, str], ClipFeatures] = {}


def load_clip(name_or_path: str | os.PathLike | None, device: str | torch.device = "cpu",
              cache_dir: str | os.PathLike | None = None, what: str = "this method") -> ClipFeatures:
    """Load a CLIP model + processor from a hub id or local folder (kept loaded for reuse in this process).

    fp16 is used only on CUDA. Raises :class:`ModelUnavailableError` naming ``--clip-model`` when the model
    is not given or cannot be loaded (no weights are downloadable offline).
    """
    if name_or_path is None or str(name_or_path).strip() == "":
        raise ModelUnavailableError(f"{what} needs {CLIP_OPTION_HELP}")
    dev = resolve_device(device)
    key = (str(name_or_path), str(dev))
    if key in _LOADED:
        clip = _LOADED[key]
        if cache_dir is not None and clip.cache_dir is None:
            clip.cache_dir = Path(cache_dir)
        return clip
    try:
        from transformers import AutoProcessor, CLIPModel
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the foundation extra
        raise ModelUnavailableError(f"{what} needs transformers: pip install 'oodforge[foundation]'") from e
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = load_pretrained(CLIPModel, name_or_path, f"{what}: CLIP model", "--clip-model", dtype=dtype)
    processor = load_pretrained(AutoProcessor, name_or_path, f"{what}: CLIP processor", "--clip-model")
    clip = ClipFeatures(model.to(dev), processor, str(name_or_path), dev, cache_dir)
    _LOADED[key] = clip
    return clip


def clear_loaded() -> None:
    """Forget the models kept loaded by :func:`load_clip` (frees memory; tests use it)."""
    _LOADED.clear()


__all__ = ["ClipFeatures", "load_clip", "load_pretrained", "clear_loaded", "rgb_uint8_hwc", "CLIP_OPTION_HELP"]
