"""Checks that run before any expensive work, so that bad input never yields a table of meaningless numbers.

Every check raises :class:`InputError` (a ``ValueError``) with one line that names the option or file, says
what was expected and what to do; the command line prints that line and exits with code 2 (``cli.main``).
The checks are cheap (no forward pass, no training) and are called by the CLI commands right after
parsing, and by :func:`oodforge.bench.run_bench` before the output folder is created.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class InputError(ValueError):
    """Bad input a user can fix: the message names the option or file and the fix."""


def one_line(text) -> str:
    """``text`` (or an exception's message) with every run of whitespace, newlines included, as one space."""
    return " ".join(str(text).split())


# --- options ------------------------------------------------------------------------------------

def check_device(device: str, option: str = "--device") -> str:
    """``device`` must name a device this machine has (a CPU-only torch has no ``cuda``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"{option} {device!r} is not a device name; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{option} {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"{option} {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{option} {device}: oodforge runs on cpu, cuda or mps")
    return device


def check_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` becomes this run's output folder (:func:`oodforge.outdir.claim_out_dir`): it must be new, empty or
    oodforge's; it is created now (an unwritable place fails here, not after the work), marked and locked."""
    from .outdir import claim_out_dir

    return claim_out_dir(path, option)


def check_positive(value: int | float | None, option: str) -> None:
    if value is not None and value < 1:
        raise InputError(f"{option} must be >= 1, got {value}")


# --- data against the model ---------------------------------------------------------------------

def check_images_fit(ds, in_channels: int, image_hw: tuple[int, int] | None, what: str) -> None:
    """Images of ``ds`` (an ArrayDataset) must have the classifier's channels and the ID images' size.

    A 1-channel set given to a 3-channel model would broadcast through the normalisation and a 20 px
    set through global pooling: both give numbers, neither means anything.
    """
    c, h, w = ds.image_shape
    if c != in_channels:
        fix = ("convert it to RGB (e.g. PIL .convert('RGB'))" if in_channels == 3 else
               "convert it to grayscale (PIL .convert('L'))" if in_channels == 1 else "convert its channels")
        raise InputError(f"{what} has {c}-channel images but the classifier takes {in_channels} channels; {fix}")
    if image_hw is not None and (h, w) != tuple(image_hw):
        raise InputError(f"{what} has {h}x{w} images but the classifier was trained on {image_hw[0]}x{image_hw[1]}; "
                         f"resize it to {image_hw[0]}x{image_hw[1]} first")


def check_labels(ds, num_classes: int, what: str) -> None:
    """Labels must index the classifier's classes (``-1`` = unlabelled is allowed)."""
    if len(ds.labels) == 0:
        return
    lo, hi = int(ds.labels.min()), int(ds.labels.max())
    if hi >= num_classes or lo < -1:
        bad = hi if hi >= num_classes else lo
        raise InputError(f"{what} has label {bad} but the classifier has {num_classes} classes (0..{num_classes - 1});"
                         " fix the labels or use a classifier trained on these classes")


def check_model_classes(model_classes: list[str] | None, num_classes: int, data_classes: list[str] | None,
                        what: str, model_what: str) -> None:
    """A classifier used on a dataset must have its classes: same number and, when both are named, same names."""
    if data_classes is None:
        return
    if len(data_classes) != num_classes:
        raise InputError(f"{what} has {len(data_classes)} classes but {model_what} has {num_classes}; use a "
                         "classifier trained on this data (oodforge train)")
    if model_classes is not None and list(model_classes) != list(data_classes):
        diff = next((i for i, (a, b) in enumerate(zip(model_classes, data_classes)) if a != b), 0)
        raise InputError(f"{what} class {diff} is {data_classes[diff]!r} but {model_what} has "
                         f"{model_classes[diff]!r}; use a classifier trained on this data")


# --- outlier stores -----------------------------------------------------------------------------

def dataset_family(identity: str) -> str:
    """The data an identity comes from, without subset and split tags: ``scenes/train/...[...]`` -> ``scenes``."""
    return identity.split("[", 1)[0].split("/", 1)[0]


def store_mismatches(store_config: dict, id_train, class_names: list[str] | None) -> list[str]:
    """What makes an outlier store unfit for a suite: another image shape, class list or source data."""
    problems = []
    shape = store_config.get("image_shape")
    if shape is not None and tuple(shape) != tuple(id_train.image_shape):
        problems.append(f"its images are {'x'.join(map(str, shape))} but the ID images are "
                        f"{'x'.join(map(str, id_train.image_shape))}")
    names = store_config.get("class_names")
    if names is not None and class_names is not None and list(names) != list(class_names):
        problems.append(f"it was forged from classes {names[:3]}... but the suite has {list(class_names)[:3]}...")
    source = store_config.get("dataset")
    if source and dataset_family(source) != dataset_family(id_train.identity):
        problems.append(f"it was forged from {source!r}, not from {dataset_family(id_train.identity)!r} data")
    return problems


def check_store_fits(store, id_train, class_names, option: str, allow_foreign: bool = False,
                     split: str = "train") -> list[str]:
    """Refuse an outlier store forged from other data (or, for ``split="val"``, not from a validation split).

    Returns the mismatches accepted with ``allow_foreign`` (recorded in ``results.json``).
    """
    problems = store_mismatches(store.config, id_train, class_names)
    source = str(store.config.get("dataset", ""))
    if split == "val" and source and "[val:" not in source:
        problems.append(f"it was forged from {source!r}, not from an ID validation split (forge it with "
                        "`oodforge synth shift --split val`)")
    if split == "train" and "[val:" in source:
        problems.append("it was forged from the ID validation split, which model selection must not train on "
                        "(forge training outliers with --split train)")
    if problems and not allow_foreign:
        raise InputError(f"{option} {store.root}: {problems[0]}; forge a store from this suite (oodforge synth "
                         "shift --data SUITE ...) or pass --allow-foreign-outliers to use it anyway")
    return problems



def check_suite_fits_model(suite, model, meta: dict | None = None, what: str = "the classifier") -> None:
    """Every image set of ``suite`` against ``model``: channels, size, labels and class names."""
    meta = meta or {}
    hw = tuple(meta["input_shape"][1:]) if meta.get("input_shape") else tuple(suite.id_train.image_shape[1:])
    check_model_classes(meta.get("class_names"), model.num_classes, suite.class_names, f"suite {suite.name!r}", what)
    named = {"ID train": suite.id_train, "ID test": suite.id_test, "ID val": suite.id_val,
             **{f"OOD set {k!r}": v for k, v in suite.ood.items()}}
    for name, ds in named.items():
        if ds is None:
            continue
        check_images_fit(ds, model.in_channels, hw, f"{name} of suite {suite.name!r}")
        if name.startswith("ID"):
            check_labels(ds, model.num_classes, f"{name} of suite {suite.name!r}")


__all__ = ["InputError", "one_line", "check_device", "check_out_dir", "check_positive", "check_images_fit",
           "check_labels", "check_model_classes", "check_suite_fits_model", "dataset_family", "store_mismatches",
           "check_store_fits"]
