"""How fast the CPU SHIFT forger is and what its stores hold (``bench_shift.py``; alone with ``--stats-only``).

* the benchmark's stores (K = 1 and K = 4, :func:`oodforge.workflows.forge_cpu_outliers`, cached) with a
  note whether this call forged them fresh (:func:`forge`);
* a fresh forge of the first ``--fresh-sources`` training images into a temporary folder (always fresh;
  best of ``--fresh-repeats``), with the time split into masking and inpainting (:func:`fresh_throughput`);
* mask coverage of the stores and where ID test, the OOD sets and the outliers lie for the classifier
  (:func:`outlier_stats`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from shift_common import feature_position, position_markdown

from oodforge.data.base import ArrayDataset
from oodforge.workflows import cache_root, forge_cpu_outliers


def fresh_throughput(suite, model, k: int, n_sources: int, seed: int, repeats: int = 1) -> dict:
    """Forge the first ``n_sources`` images with K = ``k`` into a temporary store: images/s of a fresh run
    (best of ``repeats``: the machine is shared, the best run is the least disturbed one), plus the time
    split between masking (per source) and inpainting (per outlier), measured on the same images."""
    import torch

    from oodforge.outliers.store import outlier_seed
    from oodforge.synth.shift import forge_shift, make_inpainter, make_masker

    runs = []
    for _ in range(max(1, repeats)):
        with tempfile.TemporaryDirectory(prefix="bench_shift_") as tmp:
            t0 = time.perf_counter()
            store = forge_shift(suite.id_train, Path(tmp) / "store", make_masker("layercam", model=model),
                                make_inpainter("telea"), k=k, seed=seed, limit=n_sources, progress=False)
            n = len(store.records())
            runs.append(time.perf_counter() - t0)
    dt = min(runs)
    masker, inpainter = make_masker("layercam", model=model), make_inpainter("telea")
    x = suite.id_train.images[:n_sources].float().div(255.0)
    y = suite.id_train.labels[:n_sources]
    t0 = time.perf_counter()
    masks = torch.cat([masker(x[i:i + 32], y[i:i + 32], suite.class_names) for i in range(0, len(x), 32)])
    t_mask = time.perf_counter() - t0
    rep = torch.arange(len(x)).repeat_interleave(k)
    ks = list(range(k)) * len(x)
    seeds = [outlier_seed(seed, int(i), kk) for i, kk in zip(rep.tolist(), ks)]
    t0 = time.perf_counter()
    for i in range(0, len(rep), 128):
        inpainter(x[rep[i:i + 128]], masks[rep[i:i + 128]], seeds[i:i + 128], ks[i:i + 128], suite.class_names)
    t_inp = time.perf_counter() - t0
    return {"k": k, "sources": n_sources, "n": n, "seconds": round(dt, 2), "images_per_second": round(n / dt, 1),
            "all_seconds": [round(v, 2) for v in runs], "mask_ms_per_source": round(1000 * t_mask / len(x), 3),
            "inpaint_ms_per_outlier": round(1000 * t_inp / len(rep), 3)}


def forge(suite, model, k: int, seed: int, log) -> tuple[ArrayDataset, Path, dict]:
    """The benchmark's store for K = ``k`` (cached); its stats say whether this call forged it (``fresh``)."""
    before = set((cache_root() / "outliers").glob("*")) if (cache_root() / "outliers").is_dir() else set()
    outliers, folder, stats = forge_cpu_outliers(suite, model, k=k, seed=seed, log=log)
    stats = {**stats, "fresh": folder not in before}
    return outliers, folder, stats


def outlier_stats(model, suite, outl: dict[int, ArrayDataset], synth: dict) -> dict:
    """Mask coverage of the stores (into ``synth``) and where ID test, the OOD sets and the outliers lie
    (median energy and KNN distance, mean intensity, share of flat images: :func:`feature_position`)."""
    from oodforge.models.features import default_cache_dir
    from oodforge.outliers.store import OutlierStore

    for k in outl:
        cov = np.array([r["coverage"] for r in OutlierStore(synth[f"k{k}"]["store"]).records()])
        synth[f"k{k}"]["coverage_mean"] = float(cov.mean())
        synth[f"k{k}"]["coverage_median"] = float(np.median(cov))
    sets = {"ID test": suite.id_test, **suite.ood, **{f"outliers K={k}": d for k, d in outl.items()}}
    return feature_position(model, suite, sets, default_cache_dir())


def synthesis_markdown(syn: dict) -> str:
    """One sentence on the synthesis of a suite's stores: size, throughput of this run or of a fresh forge."""
    return ("Synthesis (Layer-CAM λ=0.2 + Telea, 1 thread): "
            + "; ".join(
                f"K={k}: {syn[f'k{k}']['n']} outliers, "
                + (f"{syn[f'k{k}']['images_per_second']} img/s (first run, fresh)" if syn[f"k{k}"]["fresh"]
                   else "cached store (no synthesis time)")
                + (f", fresh forge of {syn[f'k{k}_fresh']['sources']} sources: "
                   f"{syn[f'k{k}_fresh']['images_per_second']} img/s" if f"k{k}_fresh" in syn else "")
                + (f" (best of {len(syn[f'k{k}_fresh']['all_seconds'])}; Layer-CAM "
                   f"{syn[f'k{k}_fresh']['mask_ms_per_source']} ms per source, Telea "
                   f"{syn[f'k{k}_fresh']['inpaint_ms_per_outlier']} ms per outlier"
                   + (", timed by the --stats-only run" if "from" in syn[f"k{k}_fresh"] else "") + ")"
                   if "mask_ms_per_source" in syn.get(f"k{k}_fresh", {}) else "")
                for k in (1, 4)) + ".")


def stats_markdown(results: list[dict], cmd: str) -> list[str]:
    """The ``--stats-only`` page: per suite, the fresh-forge timings and the store statistics."""
    md = ["# SHIFT CPU forger: the benchmark's outlier stores", "", f"Command: `{cmd}`", ""]
    for r in results:
        md += [f"### suite `{r['suite']}`", ""]
        for k in (1, 4):
            f = r["synthesis"].get(f"k{k}_fresh")
            if f:
                md.append(f"- fresh forge K={k}, {f['sources']} sources: {f['images_per_second']} outliers/s (best "
                          f"of {f['all_seconds']} s); Layer-CAM {f['mask_ms_per_source']} ms per source, Telea "
                          f"{f['inpaint_ms_per_outlier']} ms per outlier")
        md += position_markdown(r["position"], r["synthesis"]) + [""]
    return md
