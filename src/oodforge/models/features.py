"""One forward pass per (model, dataset), cached on disk.

Every feature-based detector reads the same :class:`FeatureSet`, so a benchmark with ten
detectors costs one pass over each dataset. The cache key is the hash of the model's weights
plus the dataset's ``identity``; entries are safetensors files written atomically, so a killed
run never leaves a half-written entry behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.base import ArrayDataset
from ..progress import progress_bar
from .checkpoint import weights_hash
from .featureset import FeatureSet


def default_cache_dir() -> Path:
    return Path(os.environ.get("OODFORGE_CACHE", Path.home() / ".cache" / "oodforge")) / "features"


def _cache_file(cache_dir: Path, model: torch.nn.Module, dataset: ArrayDataset, feature_map: bool) -> Path:
    import hashlib

    key = hashlib.sha256(f"{weights_hash(model)}|{dataset.identity}|{int(feature_map)}".encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{key}.safetensors"


@torch.no_grad()
def _forward(model, dataset: ArrayDataset, device: str, batch_size: int, feature_map: bool, progress: bool):
    model.to(device).eval()
    logits, pens, fmaps = [], [], []
    n = len(dataset)
    for i in progress_bar(range(0, n, batch_size), desc=f"features {dataset.identity[:40]}", disable=not progress,
                  leave=False):
        out = model.forward_all(dataset.float_images(i, i + batch_size).to(device))
        logits.append(out.logits.float().cpu())
        pens.append(out.penultimate.float().cpu())
        if feature_map:
            fmaps.append(out.feature_map.float().cpu())
    return FeatureSet(torch.cat(logits), torch.cat(pens), dataset.labels.clone(),
                      torch.cat(fmaps) if feature_map else None)


def extract_features(model: torch.nn.Module, dataset: ArrayDataset, device: str = "cpu", batch_size: int = 256,
                     feature_map: bool = False, cache_dir: str | Path | None = None,
                     progress: bool = True) -> FeatureSet:
    """Logits, penultimate vectors (and optionally last feature maps) of ``model`` on ``dataset``.

    With ``cache_dir`` set, results are read from / written to disk. A cached entry with feature
    maps also serves requests without them.
    """
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.identity} is empty")
    if cache_dir is None:
        return _forward(model, dataset, device, batch_size, feature_map, progress)
    cache_dir = Path(cache_dir)
    for with_map in ((True,) if feature_map else (False, True)):
        f = _cache_file(cache_dir, model, dataset, with_map)
        if f.is_file():
            try:
                t = load_file(str(f))
            except Exception:  # a corrupt entry is recomputed, not trusted
                f.unlink(missing_ok=True)
                continue
            return FeatureSet(t["logits"], t["penultimate"], t["labels"],
                              t["feature_map"] if feature_map else None)
    feats = _forward(model, dataset, device, batch_size, feature_map, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    f = _cache_file(cache_dir, model, dataset, feature_map)
    tensors = {"logits": feats.logits, "penultimate": feats.penultimate, "labels": feats.labels}
    if feature_map:
        tensors["feature_map"] = feats.feature_map.contiguous()
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, f)
    return feats
