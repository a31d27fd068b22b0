"""Suites described by the user: their own ID data and OOD sets, from a TOML file or from CLI options.

A suite file (paths are relative to the file's folder)::

    name = "cifar10"            # optional; default: the file name without .toml
    image_size = 32             # optional; default: the ID training images' size
    channels = 3                # optional; default: as the ID training images
    stream = false              # true: read image folders from disk on demand (data larger than memory)
    background = "#ffffff"      # optional: transparent pixels are flattened onto this colour (default white)
    resize = "crop"             # optional: crop (shorter side + centre crop, default), letterbox or stretch

    [id]
    train = "cifar-10-python.tar.gz"     # any format of oodforge.data.loaders.load_dataset
    test = "cifar-10-python.tar.gz"      # (CIFAR archives: the train / test batches)

    [ood]                                # name = path, as many as you like
    svhn = "test_32x32.mat"
    textures = "dtd/images"

    [groups]
    near = ["cifar100"]                  # the other OOD sets are "far"

The same from the command line: ``--id-train PATH --id-test PATH --ood NAME=PATH ... [--near NAME,...]
[--image-size N] [--stream]``. Every OOD set is brought to the ID images' channels and size (image
folders: shorter side resized and centre-cropped; arrays: resized), and its labels, if any, are
dropped. The ID test set must have the ID training set's classes (at least two) and must not be the ID
training data itself. Image files are read by the one image pipeline (:mod:`oodforge.data.images`) with the
suite's ``background`` and ``resize``, recorded in ``Suite.pipeline``. Every error names the file or option
and what to do, and is raised before any training.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (a dependency there)
    import tomli as tomllib

from oodforge.data.base import ArrayDataset, Suite
from oodforge.data.images import DEFAULT_PIPELINE, ImagePipeline
from oodforge.data.loaders import (
    DatasetFormatError,
    DatasetNotFoundError,
    conform,
    is_plain_image_folder,
    load_dataset,
    load_image_folder,
)

__all__ = ["SuiteSpec", "SuiteSpecError", "is_suite_file", "read_suite_file", "spec_from_options", "build_suite",
           "write_example_suite"]

_TOP_KEYS = {"name", "image_size", "channels", "stream", "id", "ood", "groups", "description", "background",
             "resize"}


class SuiteSpecError(ValueError):
    """A suite file or the suite options are malformed (the message names the file or option)."""


@dataclass
class SuiteSpec:
    """What a user's suite is made of; paths are absolute or relative to ``base``."""

    id_train: str
    id_test: str
    ood: dict[str, str]
    near: list[str] = field(default_factory=list)
    name: str = "user"
    image_size: int | None = None
    channels: int | None = None
    stream: bool = False
    pipeline: ImagePipeline = DEFAULT_PIPELINE
    base: Path = Path(".")
    source: str = "the suite options"  # named in error messages

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base / q

    def validate(self) -> SuiteSpec:
        where = self.source
        if not self.ood:
            raise SuiteSpecError(f"{where}: no OOD sets; give at least one ([ood] name = \"path\", or --ood NAME=PATH)")
        unknown = [n for n in self.near if n not in self.ood]
        if unknown:
            raise SuiteSpecError(f"{where}: near OOD set(s) {unknown} are not among the OOD sets "
                                 f"{sorted(self.ood)}")
        if self.image_size is not None and not (isinstance(self.image_size, int) and self.image_size >= 8):
            raise SuiteSpecError(f"{where}: image_size must be an integer >= 8, got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise SuiteSpecError(f"{where}: channels must be 1 or 3, got {self.channels!r}")
        for what, p in (("ID train", self.id_train), ("ID test", self.id_test), *self.ood.items()):
            if not self.path(p).exists():
                raise SuiteSpecError(f"{where}: {what} data {self.path(p)} does not exist; fix the path "
                                     "(suite-file paths are relative to the file's folder)")
        train, test = self.path(self.id_train).resolve(), self.path(self.id_test).resolve()
        # one CIFAR archive / folder holds both splits; any other data is the same images on both sides
        if train == test and (is_plain_image_folder(train) or train.suffix.lower() in (".npz", ".mat")):
            raise SuiteSpecError(f"{where}: the ID test data is the ID training data ({train}); test on images the "
                                 "classifier and the detectors were not fitted on (a separate folder)")
        return self

    @property
    def groups(self) -> dict[str, list[str]]:
        return {"near": list(self.near), "far": [n for n in self.ood if n not in self.near]}


def is_suite_file(name: str | os.PathLike) -> bool:
    """True for a ``.toml`` path: a user's suite instead of an embedded suite's name."""
    return str(name).lower().endswith(".toml")


def read_suite_file(path: str | os.PathLike) -> SuiteSpec:
    """Parse and check a suite file (format in the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(f"suite file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SuiteSpecError(f"suite file {path} is not valid TOML: {e}") from None
    extra = sorted(set(doc) - _TOP_KEYS)
    if extra:
        raise SuiteSpecError(f"suite file {path}: unknown key(s) {extra}; allowed: {sorted(_TOP_KEYS)}")
    ids, ood, groups = doc.get("id", {}), doc.get("ood", {}), doc.get("groups", {})
    if not isinstance(ids, dict) or not {"train", "test"} <= set(ids):
        raise SuiteSpecError(f"suite file {path}: needs an [id] table with train = \"...\" and test = \"...\"")
    if not isinstance(ood, dict) or not all(isinstance(v, str) for v in ood.values()):
        raise SuiteSpecError(f"suite file {path}: [ood] maps names to paths, e.g. svhn = \"test_32x32.mat\"")
    near = groups.get("near", []) if isinstance(groups, dict) else None
    if not isinstance(near, list) or not all(isinstance(n, str) for n in near):
        raise SuiteSpecError(f"suite file {path}: [groups] near must be a list of OOD set names")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise SuiteSpecError(f"suite file {path}: stream must be true or false, got {stream!r}")
    try:
        pipeline = ImagePipeline(background=doc.get("background", "#ffffff"), resize=doc.get("resize", "crop"))
    except ValueError as e:
        raise SuiteSpecError(f"suite file {path}: {e}") from None
    return SuiteSpec(id_train=str(ids["train"]), id_test=str(ids["test"]), ood=dict(ood), near=near,
                     name=str(doc.get("name", path.stem)), image_size=doc.get("image_size"),
                     channels=doc.get("channels"), stream=stream, pipeline=pipeline, base=path.parent,
                     source=f"suite file {path}").validate()


def spec_from_options(id_train: str | None, id_test: str | None, ood: list[str] | None, near: str | None,
                      image_size: int | None, stream: bool, name: str = "user") -> SuiteSpec:
    """The suite given by ``--id-train``, ``--id-test``, ``--ood NAME=PATH`` (repeated), ``--near``, ...."""
    if not id_train or not id_test:
        raise SuiteSpecError("a suite from options needs both --id-train PATH and --id-test PATH")
    sets: dict[str, str] = {}
    for item in ood or []:
        key, eq, p = item.partition("=")
        if not eq or not key.strip() or not p.strip():
            raise SuiteSpecError(f"--ood {item!r}: write NAME=PATH, e.g. --ood svhn=data/test_32x32.mat")
        if key.strip() in sets:
            raise SuiteSpecError(f"--ood: the name {key.strip()!r} is given twice")
        sets[key.strip()] = p.strip()
    near_list = [n.strip() for n in (near or "").split(",") if n.strip()]
    return SuiteSpec(id_train=id_train, id_test=id_test, ood=sets, near=near_list, name=name,
                     image_size=image_size, stream=stream, source="the suite options").validate()


def _load(spec: SuiteSpec, rel: str, split: str, size: int | None, channels: int | None, what: str):
    """One dataset of the suite, brought to ``size`` x ``size`` and ``channels`` when they are given."""
    p = spec.path(rel)
    try:
        if is_plain_image_folder(p):
            if spec.stream:
                from oodforge.data.streaming import stream_image_folder

                return stream_image_folder(p, size=size, channels=channels, pipeline=spec.pipeline)
            return load_image_folder(p, size=size, channels=channels, pipeline=spec.pipeline)
        return load_dataset(p, split=split, size=size, channels=channels, pipeline=spec.pipeline)
    except (DatasetFormatError, DatasetNotFoundError) as e:
        raise type(e)(f"{spec.source}, {what}: {e}") from None


def _unlabelled(ds, identity_suffix: str):
    """An OOD set without labels (an image folder of OOD data may have sub-folders)."""
    if isinstance(ds, ArrayDataset):
        return ArrayDataset(ds.images, None, None, f"{ds.identity}[{identity_suffix}]")
    out = ds.subset(np.arange(len(ds)), identity_suffix=identity_suffix)
    out.labels.fill_(-1)
    out.class_names = None
    return out


def build_suite(spec: SuiteSpec) -> Suite:
    """Load every dataset of ``spec`` into a :class:`Suite` (no validation split yet: ``load_suite`` adds it)."""
    train = _load(spec, spec.id_train, "train", spec.image_size, spec.channels, "ID train")
    c, h, w = train.image_shape
    # image folders are resized (shorter side) and centre-cropped to a square: only for square ID images
    size = spec.image_size or (h if h == w else None)
    if train.class_names is None or (train.labels < 0).any():
        raise DatasetFormatError(f"{spec.source}: the ID training data {spec.path(spec.id_train)} has no class "
                                 "labels; use an image folder with one sub-folder per class (or labelled arrays)")
    if len(train.class_names) < 2:
        raise DatasetFormatError(f"{spec.source}: the ID training data {spec.path(spec.id_train)} has one class "
                                 f"({train.class_names[0]!r}); a classifier needs at least two, so add a sub-folder "
                                 "per class (one class is not a classification task to guard)")
    test = _load(spec, spec.id_test, "test", size, c, "ID test")
    if isinstance(test, ArrayDataset) and test.image_shape != train.image_shape:
        test = conform(test, (h, w), c)
    if test.class_names is not None and list(test.class_names) != list(train.class_names):
        raise DatasetFormatError(f"{spec.source}: the ID test classes {test.class_names[:5]}... differ from the "
                                 f"ID training classes {train.class_names[:5]}...; both need the same class folders")
    if int(test.labels.max()) >= len(train.class_names) or (test.labels < 0).any():
        raise DatasetFormatError(f"{spec.source}: the ID test data {spec.path(spec.id_test)} needs labels "
                                 f"0..{len(train.class_names) - 1} (the ID training classes)")
    ood = {}
    for name, rel in spec.ood.items():
        ds = _load(spec, rel, "test", size, c, f"OOD set {name!r}")
        if isinstance(ds, ArrayDataset) and ds.image_shape != train.image_shape:
            ds = conform(ds, (h, w), c)
        if ds.image_shape != train.image_shape:
            raise DatasetFormatError(f"{spec.source}: OOD set {name!r} ({spec.path(rel)}) has {ds.image_shape} "
                                     f"images, the ID data {train.image_shape}; give image_size to resize all")
        ood[name] = _unlabelled(ds, "unlabelled")
    return Suite(name=spec.name, id_train=train, id_test=test, ood=ood, groups=spec.groups,
                 class_names=list(train.class_names), description=f"user suite from {spec.source}",
                 pipeline=spec.pipeline)


#: the example suite of ``oodforge suites --example DIR``: Fashion-MNIST classes as a user's image folders
EXAMPLE_ID_CLASSES = ("T-shirt/top", "Trouser", "Sneaker", "Bag")
EXAMPLE_NEAR_CLASSES = ("Coat", "Sandal")


def write_example_suite(folder: str | os.PathLike, data_root: str | os.PathLike | None = None,
                        per_class: tuple[int, int] = (300, 100), n_ood: int = 200, seed: int = 0) -> Path:
    """Write a small user suite as PNG folders plus its ``suite.toml`` and return the file's path.

    ID: ``per_class`` (train, test) Fashion-MNIST images of each of :data:`EXAMPLE_ID_CLASSES`
    (``train/<class>/*.png``, ``test/<class>/*.png``); near OOD ``held-out``: test images of
    :data:`EXAMPLE_NEAR_CLASSES`; far OOD ``noise`` and ``textures`` from :mod:`oodforge.data.ood_sets`.
    The layout is the one to copy for your own data (docs/datasets.md).
    """
    from PIL import Image

    from oodforge.data.fashion import FASHION_MNIST_CLASSES, load_fashion_mnist
    from oodforge.data.ood_sets import make_ood_set

    folder = Path(folder)
    rng = np.random.default_rng(seed)

    def save(images: np.ndarray, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img[0]).save(where / f"{i:04d}.png")

    for split, n in zip(("train", "test"), per_class, strict=True):
        ds = load_fashion_mnist(split, data_root)
        labels = ds.labels.numpy()
        for cls in EXAMPLE_ID_CLASSES:
            idx = rng.choice(np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(cls)), n, replace=False)
            save(ds.images.numpy()[np.sort(idx)], folder / split / cls.replace("/", "-"))
    test = load_fashion_mnist("test", data_root)
    near = np.flatnonzero(np.isin(test.labels.numpy(), [FASHION_MNIST_CLASSES.index(c) for c in EXAMPLE_NEAR_CLASSES]))
    save(test.images.numpy()[np.sort(rng.choice(near, n_ood, replace=False))], folder / "ood" / "held-out")
    for name in ("noise", "textures"):
        save(make_ood_set(name, n=n_ood, size=28, channels=1, seed=seed).images.numpy(), folder / "ood" / name)
    path = folder / "suite.toml"
    path.write_text('# a user suite: paths are relative to this file (format: docs/datasets.md)\n'
                    'name = "example"\n\n[id]\ntrain = "train"\ntest = "test"\n\n'
                    '[ood]\nheld-out = "ood/held-out"\nnoise = "ood/noise"\ntextures = "ood/textures"\n\n'
                    '[groups]\nnear = ["held-out"]\n')
    return path
