"""The one stratified sampler of oodforge: validation splits, quick subsets and ``--max-train`` subsets.

:func:`stratified_indices` draws ``n`` indices without replacement, class by class, from one seeded
generator. Two allocation rules for how many items each class gets:

* ``"balanced"`` (the default, used for the ID validation split and the quick subsets): as nearly as
  possible the same count per class (classes with too few items give all they have). On balanced data
  (every embedded suite) this is the same as proportional allocation; it stays the default because the
  zoo's classifiers were trained on the validation split it draws (``tests/test_zoo.py`` checks their
  training-set identities), so changing it would silently retire them.
* ``"proportional"``: each class keeps its share of the data (largest-remainder rounding, at least one
  item per class present), the semantics of scikit-learn's ``train_test_split(stratify=labels)``;
  :func:`stratified_subset` uses it to cap a training set without changing its class balance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Suite

ALLOCATIONS = ("balanced", "proportional")


def _per_class(counts: np.ndarray, n: int, allocation: str) -> np.ndarray:
    if allocation == "balanced":
        per = np.full(len(counts), n // len(counts))
        per[: n % len(counts)] += 1
        return np.minimum(per, counts)
    exact = n * counts / counts.sum()
    per = np.maximum(np.floor(exact).astype(np.int64), 1)
    short = n - per.sum()
    if short > 0:  # largest remainders first (ties: the lower class index)
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        per[order[:short]] += 1
    return np.minimum(per, counts)


def stratified_indices(labels: np.ndarray, n: int, seed: int, allocation: str = "balanced") -> np.ndarray:
    """``n`` indices of ``labels`` drawn without replacement, stratified by label (see the module docstring for
    ``allocation``); deterministic for ``seed`` and returned in increasing order, so the data's own
    interleaving of classes is kept."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    labels = np.asarray(labels)
    if n > labels.shape[0]:
        raise ValueError(f"asked for {n} items but the dataset has {labels.shape[0]}")
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57A7]))
    out = []
    for c, k in zip(classes, _per_class(counts, n, allocation), strict=True):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, size=int(k), replace=False))
    return np.sort(np.concatenate(out))


def stratified_subset(suite: Suite, n: int | None, seed: int, split: str = "train") -> Suite:
    """A copy of ``suite`` whose training set (``split="val"``: ID validation set) keeps at most ``n`` images,
    every class its share (``"proportional"`` allocation); the suite itself when ``n`` is ``None`` or not
    smaller than the set."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    field = "id_train" if split == "train" else "id_val"
    data = getattr(suite, field)
    if n is None or data is None or len(data) <= n:
        return suite
    idx = stratified_indices(data.labels.numpy(), n, seed, "proportional")
    return dataclasses.replace(suite, **{field: data.subset(idx, identity_suffix=f"stratified{n}-seed{seed}")})


__all__ = ["ALLOCATIONS", "stratified_indices", "stratified_subset"]
