"""Detector API shared by every OOD detector in oodforge.

Conventions (see docs/architecture.md):

* ``score`` returns one float per image, **higher = more in-distribution**;
* the constructor only stores hyperparameters (scikit-learn style); ``fit`` returns ``self``
  and fitted state ends in ``_``; scoring an unfitted detector raises :class:`NotFittedError`;
  ``get_params`` / ``set_params`` / :func:`clone` / ``repr`` behave as scikit-learn's estimators';
* ``fit`` takes a :class:`FitContext`, or data (a FeatureSet, an oodforge dataset, a torch ``Dataset`` or
  ``DataLoader``) plus ``model=`` and builds the FitContext (:mod:`.inputs`); ``score`` takes a FeatureSet
  or data (read with the classifier it was fitted with);
* detectors read a :class:`~oodforge.models.featureset.FeatureSet` computed once per
  (model, dataset); those that need the pixels or gradients set ``needs_inputs = True`` and get
  the model and images through :class:`FitContext` / ``FeatureSet.images``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..models.featureset import FeatureSet


class NotFittedError(RuntimeError):
    """Raised when ``score`` is called before ``fit``."""


@dataclass
class FitContext:
    """Everything a detector may use at fit time; all of it comes from ID training data.

    ``model`` is the frozen classifier (an :class:`oodforge.models.base.Classifier`), ``train``
    its features on the ID training set, ``outliers`` the features of synthetic outliers
    (SHIFT / SynOOD stores) when the detector is trained on them, ``val`` the features of the
    held-out ID validation set (calibration, e.g. the ``fusion`` detector's percentiles),
    ``device`` where to compute. Never OOD test data: ``oodforge.bench`` checks the identities.
    """

    model: torch.nn.Module
    train: FeatureSet
    outliers: FeatureSet | None = None
    val: FeatureSet | None = None
    device: str = "cpu"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.head.weight.detach().cpu().float()

    @property
    def head_bias(self) -> torch.Tensor:
        b = self.model.head.bias
        if b is None:
            return torch.zeros(self.model.head.out_features)
        return b.detach().cpu().float()


class Detector:
    """Base class. Subclasses set ``name`` and ``paper`` and implement ``_fit`` / ``_score``."""

    name: ClassVar[str] = "detector"
    paper: ClassVar[str] = ""
    needs_inputs: ClassVar[bool] = False  # needs FeatureSet.images and the model at score time
    needs_outliers: ClassVar[bool] = False  # needs FitContext.outliers
    needs_feature_map: ClassVar[bool] = False
    #: with ``needs_feature_map``: whether ``fit`` reads the training set's maps too (large: N x C x H x W);
    #: detectors that only shape the maps of scored images set it False
    needs_train_feature_map: ClassVar[bool] = True
    #: the valid range of each numeric hyperparameter, as interval text (``"(0, 100]"``, ``"[1, inf)"``);
    #: :func:`create` checks types (from the constructor's defaults) and these ranges before any work
    param_ranges: ClassVar[dict[str, str]] = {}
    #: the allowed values of each categorical hyperparameter (``{"where": ("pooled", "map")}``), checked likewise
    param_choices: ClassVar[dict[str, tuple]] = {}
    #: constructor parameters stored under another attribute name (``shift``'s ``score`` -> ``score_kind``,
    #: since ``score`` is the method); read by :meth:`get_params`
    param_aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameters (none for a detector without its own ``__init__``)."""
        if cls.__init__ is object.__init__:
            return []
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items()
                if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor parameters, read back from the attributes that store them (scikit-learn's contract;
        ``deep`` is accepted for compatibility: no parameter is itself an estimator here)."""
        del deep
        out = {}
        for name in self.param_names():
            attr = self.param_aliases.get(name, name)
            if not hasattr(self, attr):
                raise AttributeError(f"{type(self).__name__} does not store its parameter {name!r} as the attribute "
                                     f"{attr!r}; store it (or declare it in param_aliases)")
            out[name] = getattr(self, attr)
        return out

    def set_params(self, **params) -> Detector:
        """Change parameters (validated as :func:`create` does), keeping any fitted state; returns ``self``.

        The detector is constructed again with the merged parameters, so what the constructor derives from them
        (``fusion``'s ``needs_*`` flags) and its checks follow.
        """
        fresh = type(self)(**{**self.get_params(), **type(self).check_params(params)})
        for k, v in vars(fresh).items():
            setattr(self, k, v)
        return self

    @classmethod
    def check_params(cls, params: dict) -> dict:
        """Validate ``params`` against the constructor: known names, the defaults' types, ``param_ranges``.

        Returns the params with ints widened to floats where the default is a float. Raises ``ValueError``
        naming the parameter, what it must be and what it got.
        """
        sig = inspect.signature(cls.__init__)
        known = {n: p.default for n, p in sig.parameters.items() if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD}
        out = {}
        for key, value in params.items():
            if key not in known:
                raise ValueError(f"{cls.name} has no parameter {key!r}; its parameters: {', '.join(known) or 'none'}")
            default = known[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{cls.name}: {key} must be true or false, got {value!r}")
            elif isinstance(default, int) and value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{cls.name}: {key} must be an integer, got {value!r}")
            elif isinstance(default, float) and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{cls.name}: {key} must be a number, got {value!r}")
                value = float(value)
            cls._check_range(key, value)
            out[key] = value
        return out

    @classmethod
    def _check_range(cls, key: str, value) -> None:
        if key in cls.param_ranges and value is not None:
            lo, hi, lo_closed, hi_closed = _interval(cls.param_ranges[key])
            v = float(value)
            if not ((v >= lo if lo_closed else v > lo) and (v <= hi if hi_closed else v < hi)):
                raise ValueError(f"{cls.name}: {key} must be in {cls.param_ranges[key]}, got {value}")
        if key in cls.param_choices and value not in cls.param_choices[key]:
            raise ValueError(f"{cls.name}: {key} must be one of {', '.join(map(repr, cls.param_choices[key]))}, "
                             f"got {value!r}")

    def fit(self, ctx, model: torch.nn.Module | None = None, **data_options) -> Detector:
        """Fit on a :class:`FitContext`, or on data with ``model=`` (``val=``, ``outliers=``, ``device=``,
        ``seed=``, ``batch_size=``, ``cache_dir=``: :func:`fit_context` builds the FitContext)."""
        if not isinstance(ctx, FitContext):
            ctx = fit_context(self, ctx, model, **data_options)
        elif model is not None or data_options:
            raise TypeError(f"{self.name}: fit(FitContext) takes no other arguments; the FitContext holds them")
        # the declared ranges hold also for a detector constructed directly rather than through create()
        for key in {**self.param_ranges, **self.param_choices}:
            self._check_range(key, getattr(self, key, None))
        if self.needs_outliers and ctx.outliers is None:
            raise ValueError(f"detector {self.name!r} is trained on synthetic outliers: pass an outlier store "
                             "(CLI: --outliers DIR, made by `oodforge synth ...`)")
        self._fit(ctx)
        if not hasattr(self, "model_"):  # the classifier it was fitted with: score(data) reads images through it
            self.model_ = ctx.model
        self.fitted_ = True
        return self

    def score(self, feats, **data_options) -> np.ndarray:
        """One score per image, higher = more ID; ``feats`` a FeatureSet, or data read through the fitted
        classifier (``batch_size=``, ``cache_dir=``, ``device=``)."""
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call .fit(ctx) first")
        if not isinstance(feats, FeatureSet):
            from .inputs import features_for

            data_options.setdefault("device", str(getattr(self, "device_", "cpu")))
            feats = features_for(self, getattr(self, "model_", None), feats, **data_options)
        if self.needs_inputs and feats.images is None:
            raise ValueError(f"detector {self.name!r} needs the input images: attach them as FeatureSet.images")
        s = self._score(feats)
        s = s.detach().cpu().double().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
        if s.shape != (len(feats),):
            raise RuntimeError(f"{self.name}: score returned shape {s.shape}, expected ({len(feats)},)")
        return s

    # --- to implement -------------------------------------------------------------------
    def _fit(self, ctx: FitContext) -> None:  # default: nothing to fit
        self.model_ = ctx.model
        self.device_ = ctx.device

    def _score(self, feats: FeatureSet) -> np.ndarray | torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def fit_context(det: Detector, data, model, *, val=None, outliers=None, device: str = "cpu", seed: int = 0,
                extra: dict | None = None, batch_size: int = 256, cache_dir=None, progress: bool = False) -> FitContext:
    """A :class:`FitContext` for ``det`` from training data (and optional held-out ID data and synthetic
    outliers), each a dataset, a torch Dataset / DataLoader or a FeatureSet (:func:`.inputs.features_for`)."""
    from .inputs import features_for

    opts = {"device": device, "batch_size": batch_size, "cache_dir": cache_dir, "progress": progress}
    return FitContext(model=model, train=features_for(det, model, data, train=True, **opts),
                      outliers=None if outliers is None else features_for(det, model, outliers, train=True, **opts),
                      val=None if val is None else features_for(det, model, val, **opts),
                      device=device, seed=seed, extra=dict(extra or {}))


def clone(detector: Detector) -> Detector:
    """An unfitted copy with the same parameters (scikit-learn's ``clone``): constructed again from
    ``get_params()``; parameters that are objects (a CLIP model) are shared, not copied."""
    if not isinstance(detector, Detector):
        raise TypeError(f"clone expects an oodforge Detector, got {type(detector).__name__}")
    return type(detector)(**detector.get_params())


REGISTRY: dict[str, type[Detector]] = {}

# The post-hoc families of this package. Method packages (shift, ssod, the CLIP detectors, synood) add
# their detectors through ``oodforge.detectors`` entry points (pyproject.toml), so this layer never imports
# them by name. A module that fails to import is an error, never silently skipped.
_FAMILIES = [
    "oodforge.detectors.logit_based",
    "oodforge.detectors.odin",
    "oodforge.detectors.mahalanobis",
    "oodforge.detectors.activation_shaping",
    "oodforge.detectors.knn",
    "oodforge.detectors.vim",
    "oodforge.detectors.gradnorm",
    "oodforge.detectors.shaping",
    "oodforge.detectors.feature_rank",
    "oodforge.detectors.softmax_based",
    "oodforge.detectors.distance",
    "oodforge.detectors.class_geometry",
    "oodforge.detectors.feature_subspace",
    "oodforge.detectors.openmax",
    "oodforge.detectors.adaptive_shaping",
    "oodforge.detectors.fusion",
]
ENTRY_POINT_GROUP = "oodforge.detectors"
_loaded = False


def _load_all() -> None:
    """Import every module that registers detectors: this package's families and the entry points'."""
    global _loaded
    if _loaded:
        return
    from importlib.metadata import entry_points

    for mod in _FAMILIES:
        importlib.import_module(mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    _loaded = True



def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector available by its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two detectors are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def create(name: str, **params) -> Detector:
    """Instantiate a registered detector by name, e.g. ``create("react", percentile=90)``."""
    _load_all()
    if name not in REGISTRY:
        raise KeyError(f"unknown detector {name!r}; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    return cls(**cls.check_params(params))


def _interval(text: str) -> tuple[float, float, bool, bool]:
    """``"(0, 100]"`` -> ``(0.0, 100.0, False, True)``; ``inf`` is allowed as a bound."""
    t = text.strip()
    lo, hi = (float(x) for x in t[1:-1].split(","))
    return lo, hi, t[0] == "[", t[-1] == "]"


def available() -> list[str]:
    _load_all()
    return sorted(REGISTRY)
