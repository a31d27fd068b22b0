"""Detectors behave like scikit-learn estimators: get_params / set_params round trip, clone (unfitted, same
params), repr showing the params, fitted state only in attributes ending in '_', fit on a FeatureSet with the
FitContext built for the user. The checks run for every registered detector (method packages' included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodforge.detectors import REGISTRY, NotFittedError, available, clone, create
from oodforge.models.featureset import FeatureSet


def _changed_value(cls, key, value):
    """Another valid value of a numeric / boolean parameter (None when there is none to try)."""
    if isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, (int, float)):
        candidates = [value + 1, value * 2, value / 2, value - 1] if isinstance(value, float) else \
            [value + 1, value * 2, value - 1]
    else:
        return None
    for c in candidates:
        try:
            return cls.check_params({key: c})[key]
        except ValueError:
            continue
    return None


@pytest.mark.parametrize("name", available())
def test_sklearn_contract(name):
    det = create(name)
    cls = REGISTRY[name]
    params = det.get_params()
    assert list(params) == cls.param_names()
    assert not [k for k in vars(det) if k.endswith("_")], f"{name}: the constructor set fitted state"
    text = repr(det)
    assert text.startswith(f"{cls.__name__}(") and all(f"{k}={v!r}" in text for k, v in params.items())

    copy = clone(det)
    assert type(copy) is cls and copy is not det and copy.get_params() == params
    assert not getattr(copy, "fitted_", False)

    assert create(name).set_params(**params).get_params() == params  # round trip
    for key, value in params.items():
        new = _changed_value(cls, key, value)
        if new is None or new == value:
            continue
        other = create(name).set_params(**{key: new})
        assert other.get_params() == {**params, key: new}, (name, key)
        assert f"{key}={new!r}" in repr(other)
        assert clone(other).get_params()[key] == new
    with pytest.raises(ValueError, match="no parameter"):
        create(name).set_params(no_such_parameter=1)


def test_clone_of_knn_k7_is_unfitted_with_k7():
    gen = torch.Generator().manual_seed(0)
    train = FeatureSet(torch.randn(40, 3, generator=gen), torch.randn(40, 8, generator=gen), torch.arange(40) % 3)
    model = torch.nn.Module()
    model.head = torch.nn.Linear(8, 3)
    knn = create("knn", k=7).fit(train, model=model)  # a FeatureSet: the FitContext is built for the user
    copy = clone(knn)
    assert copy.k == 7 and copy.get_params() == knn.get_params()
    assert not [k for k in vars(copy) if k.endswith("_")]
    with pytest.raises(NotFittedError):
        copy.score(train)
    # the fitted one scores as KNN does (Sun et al. 2022): minus the distance to the k-th nearest normalised
    # training vector; on the training set itself the nearest is the vector itself
    z = torch.nn.functional.normalize(train.penultimate.double(), dim=1)
    d = torch.cdist(z, z).sort(dim=1).values[:, 6]
    np.testing.assert_allclose(knn.score(train), -d.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="k must be in"):
        clone(knn).set_params(k=0)
    with pytest.raises(TypeError, match="no other arguments"):
        from oodforge.detectors import FitContext

        create("knn").fit(FitContext(model=model, train=train), model=model)


def test_fusion_set_params_rederives_what_it_needs():
    det = create("fusion", a="msp", b="energy")
    assert not det.needs_inputs
    det.set_params(b="odin")
    assert det.needs_inputs and det.get_params() == {"a": "msp", "b": "odin", "rule": "min"}
    with pytest.raises(ValueError, match="rule"):
        det.set_params(rule="max")
