"""oodforge: out-of-distribution detection for image classifiers without real outlier data.

Scores everywhere follow one convention: higher = more in-distribution (ID).

The short path in Python (:mod:`oodforge.api`): ``oodforge.fit(model, train_loader, method="vim")``,
``oodforge.evaluate(detector, id_loader, {"name": ood_loader})``, ``oodforge.guard(model, detector, calib_loader,
target=0.95).save(path)``. They are loaded on first use, so ``import oodforge`` stays cheap (no torch import).
"""

__version__ = "0.1.0"

_API = ("fit", "evaluate", "guard", "MetricsTable")


def __getattr__(name: str):
    # PEP 562: import oodforge.api on first access. importlib rather than an import statement: every module imports
    # __version__ from here, and the api sits above them all (tests/test_layering.py), so this facade must not be a
    # static dependency of the bottom layer
    if name in _API:
        import importlib

        return getattr(importlib.import_module("oodforge.api"), name)
    raise AttributeError(f"module 'oodforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
