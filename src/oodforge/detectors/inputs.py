"""What a detector reads, built from data: ``Detector.fit(data, model=...)`` and ``Detector.score(data)``.

A detector reads :class:`~oodforge.models.featureset.FeatureSet` s inside a :class:`~.base.FitContext`;
:func:`features_for` computes the FeatureSet a detector needs from a dataset (an oodforge dataset, a torch
``Dataset`` or ``DataLoader``: :mod:`oodforge.models.torchdata`), with the feature maps only when it reads
them and the images attached when it needs the pixels (``needs_inputs``), as :mod:`oodforge.bench` does.
:func:`~.base.fit_context` builds the FitContext for the user from data or FeatureSets with it.
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


__all__ = ["features_for"]
