"""What a detector reads, built from data: ``Detector.fit(data, model=...)`` and ``Detector.score(data)``.

A detector reads :class:`~oodforge.models.featureset.FeatureSet` s inside a :class:`~.base.FitContext`;
:func:`features_for` computes the FeatureSet a detector needs from a dataset (an oodforge dataset, a torch
``Dataset`` or ``DataLoader``: :mod:`oodforge.models.torchdata`), with the feature maps only when it reads
them and the images attached when it needs the pixels (``needs_inputs``), as :mod:`oodforge.bench` does.
:func:`fit_context` builds the FitContext for the user from data or FeatureSets.
"""

from __future__ import annotations

from pathlib import Path

from ..models.features import extract_features
from ..models.featureset import FeatureSet
from ..models.torchdata import is_torch_data, torch_images


def features_for(det, model, data, *, train: bool = False, device: str = "cpu", batch_size: int = 256,
                 cache_dir: str | Path | None = None, progress: bool = False) -> FeatureSet:
    """The FeatureSet ``det`` reads on ``data`` (a FeatureSet passes through). ``train``: the set it is fitted
    on (its feature maps only when ``needs_train_feature_map``)."""
    if isinstance(data, FeatureSet):
        return data
    if model is None:
        raise ValueError(f"{det.name}: reading images needs the classifier: pass model=... (or a FeatureSet from "
                         "oodforge.models.extract_features)")
    fmap = bool(getattr(det, "needs_feature_map", False))
    if train:
        fmap = fmap and bool(getattr(det, "needs_train_feature_map", True))
    images = torch_images(data, model) if is_torch_data(data) else data
    fs = extract_features(model, images, device, batch_size, feature_map=fmap, cache_dir=cache_dir,
                          progress=progress)
    return FeatureSet(fs.logits, fs.penultimate, fs.labels, fs.feature_map, images=images)


def fit_context(det, data, model, *, val=None, outliers=None, device: str = "cpu", seed: int = 0,
                extra: dict | None = None, batch_size: int = 256, cache_dir: str | Path | None = None,
                progress: bool = False):
    """A :class:`~.base.FitContext` for ``det`` from training data (and optional ID validation data and
    synthetic outliers), each a dataset, a torch Dataset / DataLoader or a FeatureSet."""
    from .base import FitContext

    opts = {"device": device, "batch_size": batch_size, "cache_dir": cache_dir, "progress": progress}
    train = features_for(det, model, data, train=True, **opts)
    val_fs = None if val is None else features_for(det, model, val, **opts)
    out_fs = None if outliers is None else features_for(det, model, outliers, train=True, **opts)
    return FitContext(model=model, train=train, outliers=out_fs, val=val_fs, device=device, seed=seed,
                      extra=dict(extra or {}))


__all__ = ["features_for", "fit_context"]
