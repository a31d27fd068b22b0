"""Run a benchmark suite: fit detectors on ID-train features, score ID-test and every OOD set.

One forward pass per (model, dataset) feeds every detector (see :mod:`oodforge.models.features`).
A run writes into its output folder:

* ``results.json`` -- ``{"suite", "id_accuracy", "methods": {method: {ood_set: {auroc, fpr95,
  aupr_in, aupr_out}}}, "groups": {"near": [...], "far": [...]}, "models": {...}, "config": {...}}``;
* ``results.json["selective"][method]`` -- selective classification with the method's ID-test scores as the
  confidence: ``aurc``, ``augrc``, ``risk_at_90`` / ``accuracy_at_90`` / ``coverage_at_90`` (and ``_95``), see
  :mod:`oodforge.selective`;
* ``scores.npz`` -- one array per ``"{method}/{set}"`` (set ``"id"`` = ID test), the exact arrays the
  metrics were computed from, so anyone can recompute them with scikit-learn;
* ``report.md`` and ``plots/`` -- see :mod:`oodforge.report`.

Methods are detector names from the registry, optionally with parameters and a backbone label:
``"react"``, ``"knn:k=10"``, ``"shift:input=feature_map"``; a :class:`BenchJob` with a ``label``
(e.g. the SSOD-trained backbone, label ``"ssod"``) reports its methods as ``"energy@ssod"``, and a
method trained on outliers not forged the paper's way names their forger (``"shift[layercam+telea]"``):
:mod:`oodforge.keys`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data.base import ArrayDataset, Suite
from .data.images import pipeline_of
from .detectors import FitContext, create
from .detectors.fusion import FITTED, FittedParts
from .keys import method_key, outlier_source
from .metrics import evaluate
from .models.checkpoint import weights_hash
from .models.features import extract_features
from .models.featureset import FeatureSet
from .protocol import check_fit_inputs, check_not_test
from .selective import selective_metrics


def parse_method(spec: str) -> tuple[str, dict]:
    """``"knn:k=10,backend=torch"`` -> ``("knn", {"k": 10, "backend": "torch"})``."""
    name, _, rest = spec.partition(":")
    params: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method {spec!r}: parameters are written key=value, e.g. 'knn:k=10'")
        params[key.strip()] = _parse_value(value.strip())
    return name.strip(), params


def normalise_method(spec: str) -> str:
    """One spelling per method: ``"knn: k = 5"`` -> ``"knn:k=5"`` (spaces around ``:``, ``,`` and ``=`` dropped),
    so a method asked for twice with other spacing is one method with one result key."""
    name, colon, rest = spec.partition(":")
    items = ["=".join(s.strip() for s in part.split("=", 1)) for part in rest.split(",") if part.strip()]
    return name.strip() + (":" + ",".join(items) if colon and items else "")


def split_methods(text: str) -> list[str]:
    """Split a comma-separated method list where parameters also use commas: ``"msp,knn:k=5,backend=torch"``;
    each method is :func:`normalise_method`-ed. A list that names no method (``""``, ``","``) is refused."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part and ":" not in part and out:
            out[-1] += "," + part
        else:
            out.append(part)
    if not out:
        raise ValueError(f"--methods {text!r} names no method; give e.g. --methods msp,energy,knn:k=10 "
                         "(or leave the option out for all post-hoc detectors)")
    return [normalise_method(m) for m in out]


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


@dataclass
class BenchJob:
    """A classifier and the methods to run on it; ``label`` suffixes the method names (``energy@ssod``)."""

    model: torch.nn.Module
    methods: list[str]
    label: str = ""
    outliers: ArrayDataset | None = None  # synthetic outliers for detectors that train on them
    info: dict = field(default_factory=dict)  # recorded in results.json (checkpoint path, training history...)
    #: outliers forged from the ID *validation* images (never trained on): with them every method also
    #: gets a validation AUROC / FPR95 (ID val vs these), the number model selection uses (docs/protocol.md)
    val_outliers: ArrayDataset | None = None
    #: outliers of *held-out* forgers (:mod:`oodforge.outliers.heldout`, made from ID validation images by
    #: procedures no method trains on): every method also gets ``validation_heldout`` AUROC / FPR95
    val_heldout: ArrayDataset | None = None


class _FeatureCache:
    """Features of one model on named datasets, computed once (and cached on disk when asked)."""

    def __init__(self, model, device, cache_dir, batch_size, progress, model_hash: str | None = None):
        self.model, self.device, self.cache_dir = model, device, cache_dir
        self.batch_size, self.progress = batch_size, progress
        self.model_hash = model_hash  # weights_hash(model), computed once per job (the cache key)
        self._mem: dict[tuple[str, bool], FeatureSet] = {}

    def get(self, dataset: ArrayDataset, feature_map: bool = False) -> FeatureSet:
        for fm in ((True,) if feature_map else (False, True)):
            if (dataset.identity, fm) in self._mem:
                return self._mem[(dataset.identity, fm)]
        fs = extract_features(self.model, dataset, self.device, self.batch_size, feature_map, self.cache_dir,
                              self.progress, model_hash=self.model_hash)
        self._mem[(dataset.identity, feature_map)] = fs
        return fs


def _with_images(fs: FeatureSet, ds: ArrayDataset) -> FeatureSet:
    return FeatureSet(fs.logits, fs.penultimate, fs.labels, fs.feature_map, images=ds)


def _needs_feature_map(method: str) -> bool:
    name, params = parse_method(method)
    return bool(getattr(create(name, **params), "needs_feature_map", False))


def run_bench(suite: Suite, jobs: list[BenchJob], out: str | Path | None = None, device: str = "cpu",
              cache_dir: str | Path | None = None, seed: int = 0, batch_size: int = 256,
              progress: bool = True, config: dict | None = None, extra: dict | None = None, log=print,
              report_detail=None) -> dict:
    """Fit and score every method of every job on ``suite``; write the artifacts when ``out`` is given.

    ``report_detail``: ``results -> (methods, note)``, the methods the report draws and gives intervals for
    (:func:`oodforge.report.write_report`'s ``detail``); default every method.

    ``extra`` reaches every detector as ``FitContext.extra`` (e.g. ``{"clip_model": DIR}`` for the
    CLIP detectors), beside the suite's ``class_names``. Returns the results dict plus ``"_scores"``
    (the score arrays; not written into ``results.json``).
    """
    from .progress import bars

    with bars(progress):
        return _run_jobs(suite, jobs, out, device, cache_dir, seed, batch_size, progress, config, extra, log,
                         report_detail)


def _run_jobs(suite: Suite, jobs: list[BenchJob], out, device, cache_dir, seed, batch_size, progress, config, extra,
              log, report_detail=None) -> dict:
    from .report import write_report  # matplotlib is imported only when a report is written

    results: dict = {"suite": suite.name, "id_accuracy": None, "methods": {}, "groups": suite.groups,
                     "models": {}, "timings": {}, "config": {}}
    scores: dict[str, np.ndarray] = {}
    ood_names = list(suite.ood)
    for job in jobs:
        # validation outliers decide picks: they must not be test data either (protocol.check_not_test)
        check_not_test({"BenchJob.val_outliers": job.val_outliers, "BenchJob.val_heldout": job.val_heldout,
                        "Suite.id_val": suite.id_val}, suite)
        t0 = time.time()
        w_hash = weights_hash(job.model)  # once per job: the feature-cache key and results.json's record
        cache = _FeatureCache(job.model, device, cache_dir, batch_size, progress, model_hash=w_hash)
        # the job's fitted detectors and their scores: fusion reuses the parts it names (detectors.fusion)
        parts = FittedParts()
        # one pass per scored set: when any method needs feature maps, take them in the first pass (the test,
        # OOD and validation sets; the training set only for a detector that fits on its maps)
        want_fmap = any(_needs_feature_map(m) for m in job.methods)
        test = cache.get(suite.id_test, want_fmap)
        correct = (test.logits.argmax(1) == suite.id_test.labels).numpy()  # per ID test image: the selective metrics
        acc = float(correct.mean())
        if results["id_accuracy"] is None:
            results["id_accuracy"] = acc
        model_info = {"id_accuracy": acc, "arch": getattr(job.model, "arch", "?"),
                      "weights_hash": w_hash, **job.info}
        if suite.id_val is not None:
            val_fs = cache.get(suite.id_val, want_fmap)
            model_info["id_val_accuracy"] = float((val_fs.logits.argmax(1) == suite.id_val.labels).double().mean())
        results["models"][job.label or "plain"] = model_info
        for method in job.methods:
            name, params = parse_method(method)
            prefit = parts.fitted.get(method)  # fitted already as a fusion's part: the same fit, reused
            det = prefit if prefit is not None else create(name, **params)
            source = outlier_source(getattr(job.outliers, "store_config", None)) if det.needs_outliers else None
            key = method_key(method, job.label, source)
            fmap = bool(getattr(det, "needs_feature_map", False))
            t1 = time.time()
            train = cache.get(suite.id_train, fmap and getattr(det, "needs_train_feature_map", True))
            outliers = None
            if det.needs_outliers:
                if job.outliers is None:
                    raise ValueError(f"method {key!r} trains on synthetic outliers: give an outlier store "
                                     "(CLI: --outliers DIR from `oodforge synth shift ...`)")
                outliers = _with_images(cache.get(job.outliers, fmap), job.outliers)
            val = _with_images(cache.get(suite.id_val, fmap or want_fmap), suite.id_val) if suite.id_val is not None else None
            ctx = FitContext(model=job.model, train=_with_images(train, suite.id_train), outliers=outliers, val=val,
                             device=device, seed=seed, extra={"class_names": suite.class_names, **(extra or {})})
            check_fit_inputs(ctx, suite)
            ctx.extra[FITTED] = parts  # after the guard: fitted detectors and scores, no dataset
            if prefit is None:
                det.fit(ctx)
            if name != "fusion":
                parts.fitted.setdefault(method, det)
            if val is not None:
                _validate(det, key, val, job, cache, fmap or want_fmap, scores, results, parts, method)
            sets = {"id": suite.id_test, **suite.ood}
            res_m = {}
            for set_name, ds in sets.items():
                fs = _with_images(cache.get(ds, fmap or want_fmap), ds)
                scores[f"{key}/{set_name}"] = parts.score(method, det, fs)
            for set_name in ood_names:
                res_m[set_name] = evaluate(scores[f"{key}/id"], scores[f"{key}/{set_name}"])
            results["methods"][key] = res_m
            results.setdefault("selective", {})[key] = selective_metrics(scores[f"{key}/id"], correct)
            results["timings"][key] = round(time.time() - t1, 3)
            if log:
                avg = np.mean([r["auroc"] for r in res_m.values()])
                log(f"  {key:<24} mean AUROC {100 * avg:.2f}  ({time.time() - t1:.1f} s)")
        # timings: per method, seconds to fit and score it, including the feature pass of any set it was
        # the first to need (features are cached across methods); "job[@label]": the whole job
        results["timings"][f"job{('@' + job.label) if job.label else ''}"] = round(time.time() - t0, 3)
        parts.clear()
    results["config"] = {**(config or {}), **run_environment(seed, device),
                         "preprocessing": pipeline_of(suite).to_dict()}  # how image files were read (data.images)
    if out is not None:
        write_artifacts(results, scores, Path(out), suite)
        detail, note = report_detail(results) if report_detail else (None, "")
        write_report(results, scores, Path(out), detail=detail, detail_note=note)
    return {**results, "_scores": scores}


def _validate(det, key: str, val: FeatureSet, job: BenchJob, cache: _FeatureCache, fmap: bool, scores: dict,
              results: dict, parts: FittedParts, method: str) -> None:
    """The protocol's numbers for one fitted method: ID val against each validation outlier set of the job
    (``results["validation"]``: same-forger outliers; ``results["validation_heldout"]``: held-out forgers, and
    ``results["validation_heldout_by_forger"][key][forger]`` per forger when the set has ``parts``)."""
    s_val = None
    for entry, name, ds in (("validation", "val-outliers", job.val_outliers),
                            ("validation_heldout", "val-heldout", job.val_heldout)):
        if ds is None:
            continue
        if s_val is None:
            s_val = scores[f"{key}/val"] = parts.score(method, det, val)
        s_out = scores[f"{key}/{name}"] = parts.score(method, det, _with_images(cache.get(ds, fmap), ds))
        results.setdefault(entry, {})[key] = _auroc_fpr(s_val, s_out)
        for forger, rows in getattr(ds, "parts", {}).items():  # held-out forgers: also one number per forger
            results.setdefault(f"{entry}_by_forger", {}).setdefault(key, {})[forger] = _auroc_fpr(s_val, s_out[rows])


def _auroc_fpr(s_id: np.ndarray, s_out: np.ndarray) -> dict:
    return {k: v for k, v in evaluate(s_id, s_out).items() if k in ("auroc", "fpr95")}


def run_environment(seed: int, device: str) -> dict:
    import sklearn

    return {"seed": seed, "device": device, "oodforge": __version__, "torch": torch.__version__,
            "numpy": np.__version__, "sklearn": sklearn.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_artifacts(results: dict, scores: dict[str, np.ndarray], out: Path, suite: Suite | None = None) -> None:
    """``results.json`` and ``scores.npz``, each written to a temp file and renamed (never half-written)."""
    from .outdir import mark_out_dir

    mark_out_dir(out)  # a new or empty folder becomes oodforge's (its stale plots may then be removed)
    clean = {k: v for k, v in results.items() if not k.startswith("_")}
    if suite is not None:
        clean["sets"] = {"id": len(suite.id_test), **{k: len(v) for k, v in suite.ood.items()}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(clean, indent=2))
    os.replace(tmp, out / "results.json")
    tmp_npz = out / "scores.tmp.npz"
    np.savez_compressed(tmp_npz, **scores)
    os.replace(tmp_npz, out / "scores.npz")


# ------------------------------------------------------------------------------ across processes (torchrun)
def torchrun_world() -> tuple[int, int]:
    """``(rank, world size)`` of a process started by ``torchrun`` (``RANK`` / ``WORLD_SIZE``); ``(0, 1)`` otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _job_sets(suite: Suite, job: BenchJob) -> list[tuple[object, bool]]:
    """Every dataset ``_run_jobs`` extracts for ``job``, each with the feature-map flag that serves all its requests
    (an entry with maps also serves a request without them)."""
    dets = [create(name, **params) for name, params in map(parse_method, job.methods)]
    maps = [bool(getattr(d, "needs_feature_map", False)) for d in dets]
    want = any(maps)
    train_map = any(m and getattr(d, "needs_train_feature_map", True) for d, m in zip(dets, maps))
    sets = [(suite.id_train, train_map), (suite.id_test, want), *((ds, want) for ds in suite.ood.values())]
    extra = [suite.id_val, job.val_outliers, job.val_heldout,
             job.outliers if any(d.needs_outliers for d in dets) else None]
    return sets + [(ds, want) for ds in extra if ds is not None]


def extract_across_processes(suite: Suite, jobs: list[BenchJob], cache_dir: str | Path, device: str = "cpu",
                             batch_size: int = 256, progress: bool = False, log=None) -> int:
    """Under ``torchrun --nproc-per-node N``: rank ``r`` extracts shard ``r`` of every dataset of every job into the
    feature cache (:func:`~oodforge.models.features.extract_part`), then rank 0 concatenates the parts into the
    cache entries (:func:`~oodforge.models.features.merge_parts`), which :func:`run_bench` then reads. A shard is a
    run of whole batches, so the features, and every score, are bit-identical to one process's. Process group:
    gloo on the CPU, nccl on CUDA (one process per GPU). Returns this process's rank; only rank 0 goes on to fit
    and score."""
    import torch.distributed as dist

    from .models.features import extract_part, merge_parts

    t0 = time.time()
    rank, world = torchrun_world()
    if cache_dir is None:
        raise ValueError("extraction across processes goes through the feature cache: drop --no-cache")
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    try:
        plan = [(job.model, weights_hash(job.model), _job_sets(suite, job)) for job in jobs]
        for model, w_hash, sets in plan:
            for ds, fmap in sets:
                extract_part(model, ds, rank, world, cache_dir, device, batch_size, fmap, w_hash, progress=progress)
        dist.barrier()  # every part written
        if rank == 0:
            merged = sum(merge_parts(model, ds, world, cache_dir, fmap, w_hash) for model, w_hash, sets in plan
                         for ds, fmap in sets)
            if log:
                log(f"features of {merged} dataset(s) extracted in {world} processes ({time.time() - t0:.1f} s)")
    finally:
        if own:
            dist.destroy_process_group()
    return rank
