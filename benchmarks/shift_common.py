"""Shared helpers of the SHIFT CPU-forger benchmark (``benchmarks/bench_shift.py`` and its ``shift_*`` modules).

* the suite and classifier every mode uses, with exactly the settings of ``oodforge demo``
  (:func:`demo_suite_and_classifier`);
* **the feature-map cap**: ``input=feature_map`` feeds the flattened last feature map (128x7x7 = 6,272
  dims for 28 px, 8,192 for 32 px) to the 2048-wide MLP: about 0.5 s per batch of 128 on one core, so
  10 epochs over 20,000 ID + 80,000 outliers (K = 4) would take over an hour per suite. The capped jobs
  therefore train on ``--fm-max-sources`` ID images (stratified by class, seeded: :func:`cap_sources`)
  and on the outliers forged *from those same images* (all K of each, :func:`outliers_from`). The
  detector ``shift_cap`` (:class:`CappedShift`, registered here) is
  :class:`~oodforge.synth.rejection.ShiftRejection` that keeps only those ID rows;
* **fit times**: :func:`install_fit_timer` wraps ``ShiftRejection._fit`` in this process and logs the wall
  time, set sizes and loss history of every rejection-network fit into :data:`FIT_LOG`;
* per-group means of a result (:func:`summarise`), where the sets lie for the classifier
  (:func:`feature_position`, :func:`position_markdown`) and writing a mode's outputs (:func:`write_outputs`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from oodforge.data.base import ArrayDataset
from oodforge.data.loaders import stratified_indices
from oodforge.data.sampling import stratified_subset
from oodforge.detectors.base import FitContext, register
from oodforge.models.featureset import FeatureSet
from oodforge.synth.rejection import ShiftRejection
from oodforge.workflows import TrainPlan, get_model

FIT_LOG: list[dict] = []  # one entry per ShiftRejection fit, in run order


def demo_suite_and_classifier(name: str, args, log=print):
    """The suite ``name`` cut to ``--max-train`` stratified training images and its plain classifier, as
    ``oodforge demo`` makes them (so the classifier cached under ``$OODFORGE_CACHE`` is the demo's).

    Returns ``(suite, model, info, epochs)``.
    """
    from oodforge.data.suites import load_suite

    suite = stratified_subset(load_suite(name, seed=args.seed, quick=args.quick), args.max_train, args.seed)
    ep = 3 if args.quick else args.epochs  # as run_demo
    model, info = get_model(suite, TrainPlan(epochs=ep, seed=args.seed), device=args.device, log=log)
    return suite, model, info, ep


def cap_sources(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The ID training rows the capped detectors use: ``n`` stratified by class, deterministic for ``seed``."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    return stratified_indices(labels, n, seed)


def rows(fs: FeatureSet, idx: np.ndarray) -> FeatureSet:
    """The rows ``idx`` of a feature set."""
    import torch

    t = torch.as_tensor(idx, dtype=torch.long)
    return FeatureSet(fs.logits[t], fs.penultimate[t], fs.labels[t],
                      None if fs.feature_map is None else fs.feature_map[t])


@register
class CappedShift(ShiftRejection):
    """``shift`` fitted on ``max_sources`` stratified ID training rows only (see the module doc).

    The outliers must already be restricted to those sources (the benchmark job does it with
    :func:`cap_sources` and the store's ``source_index``); the ID rows are chosen here with the same
    function and the fit seed, so both sides agree.
    """

    name = "shift_cap"
    paper = ShiftRejection.paper + " (fit on a capped set of source images; benchmarks/bench_shift.py)"

    def __init__(self, max_sources: int = 2000, **params) -> None:
        super().__init__(**params)
        if max_sources < 1:
            raise ValueError(f"shift_cap: max_sources must be >= 1, got {max_sources}")
        self.max_sources = int(max_sources)

    @classmethod
    def check_params(cls, params: dict) -> dict:
        """``max_sources`` (an integer >= 1) plus every parameter of ``shift`` (its constructor takes ``**params``)."""
        rest = ShiftRejection.check_params({k: v for k, v in params.items() if k != "max_sources"})
        if "max_sources" in params and (isinstance(params["max_sources"], bool) or not isinstance(params["max_sources"], int)):
            raise ValueError(f"shift_cap: max_sources must be an integer, got {params['max_sources']!r}")
        return {**rest, **({"max_sources": params["max_sources"]} if "max_sources" in params else {})}

    def _fit(self, ctx: FitContext) -> None:
        idx = cap_sources(ctx.train.labels.numpy(), self.max_sources, int(ctx.seed))
        sub = FitContext(model=ctx.model, train=rows(ctx.train, idx), outliers=ctx.outliers, device=ctx.device,
                         seed=ctx.seed, extra=ctx.extra)
        super()._fit(sub)


def install_fit_timer() -> None:
    """Record the wall time, set sizes and loss history of every rejection-network fit in this process."""
    if getattr(ShiftRejection._fit, "_timed", False):
        return
    orig = ShiftRejection._fit

    def timed(self, ctx: FitContext) -> None:
        t0 = time.perf_counter()
        orig(self, ctx)
        FIT_LOG.append({"detector": type(self).name, "input": self.input, "n_id": len(ctx.train),
                        "n_outliers": len(ctx.outliers), "seconds": round(time.perf_counter() - t0, 2),
                        "loss": [round(v, 5) for v in self.history_]})

    timed._timed = True  # type: ignore[attr-defined]
    ShiftRejection._fit = timed  # type: ignore[method-assign]


def outliers_from(outliers: ArrayDataset, sources: np.ndarray) -> ArrayDataset:
    """The outliers forged from the ID images ``sources`` (all their K variants)."""
    keep = np.flatnonzero(np.isin(outliers.source_index, sources))
    ds = outliers.subset(keep, identity_suffix=f"sources{len(sources)}:{hash_of(sources)}")
    ds.source_index = outliers.source_index[keep]
    ds.k = outliers.k[keep]
    ds.store_config = getattr(outliers, "store_config", None)  # the forger, named in the result keys
    return ds


def hash_of(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:12]


def summarise(res: dict, key: str) -> dict:
    """Mean AUROC / FPR95 over all OOD sets and per group for one method."""
    r = res["methods"][key]
    out = {}
    for g, sets in (("all", list(r)), *res["groups"].items()):
        sel = [s for s in sets if s in r]
        out[g] = ({"auroc": float(np.mean([r[s]["auroc"] for s in sel])),
                   "fpr95": float(np.mean([r[s]["fpr95"] for s in sel]))} if sel else None)
    return out


def pct(v: dict | None, key: str) -> str:
    return "-" if v is None else f"{100 * v[key]:.2f}"


def image_stats(ds: ArrayDataset) -> dict:
    """Mean intensity and the share of near-flat images (pixel std < 0.05 on a [0, 1] scale)."""
    x = ds.images.float().div(255.0).flatten(1)
    std = x.std(1)
    return {"mean_intensity": float(x.mean()), "flat_share": float((std < 0.05).double().mean())}


def feature_position(model, suite, sets: dict[str, ArrayDataset], cache_dir) -> dict:
    """Median energy (logsumexp of the logits) and median KNN distance (k = 50, normalised penultimate, as
    the ``knn`` detector) of each set, relative to the ID training set."""
    import torch

    from oodforge.detectors import create
    from oodforge.models.features import extract_features

    train = extract_features(model, suite.id_train, cache_dir=cache_dir, progress=False)
    knn = create("knn").fit(FitContext(model=model, train=train, outliers=None, device="cpu", seed=0))
    out = {}
    for name, ds in sets.items():
        fs = extract_features(model, ds, cache_dir=cache_dir, progress=False)
        energy = torch.logsumexp(fs.logits.double(), 1).numpy()
        out[name] = {"energy": float(np.median(energy)), "knn_dist": float(np.median(-knn.score(fs))),
                     **image_stats(ds)}
    return out


def position_markdown(position: dict, synth: dict | None = None) -> list[str]:
    """Where the sets lie for the classifier, as a table; with ``synth``, led by the stores' mask coverage."""
    lead = ""
    if synth is not None:
        cov = "; ".join(f"K={k}: mean {synth[f'k{k}']['coverage_mean']:.3f}, median {synth[f'k{k}']['coverage_median']:.3f}"
                        for k in (1, 4) if "coverage_mean" in synth.get(f"k{k}", {}))
        lead = f"Mask coverage (share of the image erased): {cov}. "
    lines = ["", lead + "Where the sets lie for the classifier "
             "(medians; energy = logsumexp of the logits, higher = more ID-like; KNN = distance to the 50th "
             "nearest ID-training vector, normalised penultimate, as the `knn` detector; flat = pixel std < 0.05):",
             "", "| set | energy | KNN dist | mean intensity | flat share |", "|---|---|---|---|---|"]
    for sname, p in position.items():
        lines.append(f"| {sname} | {p['energy']:.2f} | {p['knn_dist']:.3f} | {p['mean_intensity']:.3f} | "
                     f"{100 * p['flat_share']:.1f} % |")
    return lines


def metric_cells(r: dict, groups: list[str]) -> list[str]:
    """Table cells of one method's means: AUROC and FPR95 (%) over all sets, then per group."""
    cells = [pct(r["all"], "auroc"), pct(r["all"], "fpr95")]
    for g in groups:
        cells += [pct(r[g], "auroc"), pct(r[g], "fpr95")]
    return cells


def per_set_auroc(per_set: dict, sets: list[str], first: str = "method") -> list[str]:
    """A table of the AUROC (%) of every method (row) on every OOD set (column)."""
    lines = ["| " + first + " | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for m, per in per_set.items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * per[x]['auroc']:.2f}" for x in sets) + " |")
    return lines


def command_line(argv: list[str] | None) -> str:
    """The command that ran this benchmark, as the markdown outputs record it."""
    return "OMP_NUM_THREADS=%s .venv/bin/python benchmarks/bench_shift.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:] if argv is None else argv))


def write_outputs(out: Path, bench_dir: Path, md: list[str], results: list[dict], written: bool = True) -> None:
    """Write a mode's markdown to ``out`` and its numbers to ``<out stem>/summary.json``, and print the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    (bench_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(md))
    if written:
        print(f"\nwritten: {out}, {bench_dir}/summary.json")
