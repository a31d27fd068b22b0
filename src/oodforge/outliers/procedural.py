"""Outlier stores of the forgers that need no model: jigsaws and class mixes, made from ID *training* images.

The protocol holds these two forgers out (:mod:`.heldout`): it makes their outliers from ID validation images and
validates every method on the ones it never trained on. Issue 28 also asks for outlier exposure on *any* forger's
store, these included, so this module writes them as :class:`~.store.OutlierStore` folders that
``oodforge train --method oe --outliers DIR`` (or MixOE's ``--outliers``) reads like a SHIFT store:

* ``jigsaw``: the image's ``grid x grid`` tiles shuffled (:func:`.heldout.jigsaw`, grid 4);
* ``mix``: the pixel-wise average of the image and one of another class drawn from the whole dataset (so
  ``limit``, which bounds the images forged *from*, never changes an outlier; :func:`.heldout.average`, lambda 0.5).

Each outlier ``(i, 0)`` has its own seed (:func:`.store.outlier_seed`: its tile order, its partner), so a killed run
resumes where it stopped and gives the same store. A backbone trained on such a store records the forger
(:func:`store_forgers` -> ``models.<label>.forgers``), and the protocol validates it only on held-out forgers it
never saw, at least ``protocol.MIN_UNSEEN_FORGERS`` of them: with today's two held-out forgers such a backbone has
no validation number and cannot be picked; a third held-out forger would make it a candidate (docs/protocol.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.base import ArrayDataset
from ..progress import note_resume, progress_bar
from .heldout import HELDOUT_FORGERS, average, jigsaw
from .store import OutlierStore, outlier_seed

#: the forgers this module writes stores for (each is also a held-out forger of the protocol)
PROCEDURAL_FORGERS = ("jigsaw", "mix")


def forge_procedural(dataset: ArrayDataset, kind: str, out_dir: str | Path, seed: int = 0, limit: int | None = None,
                     grid: int = 4, batch_size: int = 512, progress: bool = False) -> OutlierStore:
    """One ``kind`` outlier per image of ``dataset`` (the first ``limit``) into the store at ``out_dir``;
    resumable (done keys are skipped). Refuses an unknown ``kind`` and, for ``mix``, unlabelled data or a
    single class, before anything is written."""
    if kind not in PROCEDURAL_FORGERS:
        raise ValueError(f"unknown procedural forger {kind!r}; choose from {', '.join(PROCEDURAL_FORGERS)}")
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    labels = None if dataset.labels is None else np.asarray(dataset.labels)
    if kind == "mix" and (labels is None or (labels < 0).any() or len(np.unique(labels)) < 2):
        raise ValueError("mix: needs labelled images of at least two classes")
    config = {"method": kind, "description": HELDOUT_FORGERS[kind], "dataset": dataset.identity,
              "num_sources": len(dataset), "image_shape": list(dataset.image_shape),
              "class_names": dataset.class_names, "seed": int(seed), **({"grid": int(grid)} if kind == "jigsaw" else {})}
    store = OutlierStore(out_dir, config)
    note_resume(f"the {kind} outliers written so far in {out_dir} (the same command resumes)")
    with store.writer():
        done = store.done_keys()
        todo = [i for i in range(n) if (i, 0) not in done]
        for start in progress_bar(range(0, len(todo), batch_size), desc=f"{kind} outliers", disable=not progress):
            idx = todo[start:start + batch_size]
            seeds = [outlier_seed(seed, i, 0) for i in idx]
            images = dataset.images[idx]
            if kind == "jigsaw":
                made = torch.cat([jigsaw(images[j:j + 1], grid, s) for j, s in enumerate(seeds)])
            else:
                partners = [_partner(labels, i, s) for i, s in zip(idx, seeds)]
                made = average(images, dataset.images[partners])
            store.add_shard(made.numpy(), [{"source_index": i, "k": 0, "seed": s,
                                            "label": -1 if labels is None else int(labels[i])}
                                           for i, s in zip(idx, seeds)])
    return store


def _partner(labels: np.ndarray, i: int, seed: int) -> int:
    """A random image (index) of another class than image ``i``'s, drawn with the outlier's own seed."""
    others = np.flatnonzero(labels != labels[i])
    return int(np.random.default_rng(seed).choice(others))


def store_forgers(store_config: dict | None) -> list[str]:
    """The held-out forgers whose kind of outlier a store holds (its config's ``method``), for
    ``models.<label>.forgers``: a jigsaw or mix store -> ``["jigsaw"]`` / ``["mix"]``; SHIFT, SynOOD and ASCOOD
    stores -> ``[]`` (none of them is a held-out forger's kind: ``recipes.recipe_forgers`` says why for ASCOOD)."""
    kind = (store_config or {}).get("method")
    return [kind] if kind in HELDOUT_FORGERS else []


__all__ = ["PROCEDURAL_FORGERS", "forge_procedural", "store_forgers"]
