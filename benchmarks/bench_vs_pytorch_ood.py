"""oodforge against pytorch-ood, side by side in one run: the whole benchmark and the detector maths alone.

    PYTHONPATH=src python benchmarks/bench_vs_pytorch_ood.py            # defaults: fashion6 --quick, 1 thread
    PYTHONPATH=src python benchmarks/bench_vs_pytorch_ood.py --max-train 1000 --repeats 5 --threads 2

Model and data: the zoo's plain classifier of ``--suite`` (trained on the full suite) on the suite's data; by
default the quick sample of it (``--full`` for all of it), ``--max-train`` keeps a stratified subset of the
training set. Every detector both libraries have, with parameters matched so both compute the same score
(``docs/detectors.md``, "Where oodforge differs from pytorch-ood"); the table prints, per detector, the largest
AUROC difference over the OOD sets, so a speed ratio can be read together with whether the two computed the same
thing.

Two ratios (pytorch-ood's seconds / oodforge's, so > 1 = oodforge faster):

1. **whole benchmark** -- oodforge: :func:`oodforge.bench.run_bench` with an empty feature cache (one forward pass
   per dataset, feature extraction included, every detector fitted and scored, metrics computed). pytorch-ood:
   its usual loop, per detector ``fit(train_loader)`` and ``predict`` batch by batch over a DataLoader of each
   scored set (ID test and every OOD set), the same uint8 images as float ``[0, 1]`` pixels. Reported with and
   without ``odin`` (the one detector that perturbs the images and runs the network again on both sides).
2. **detector maths alone** -- fit + score of each detector on the same precomputed logits / penultimate vectors /
   feature maps (oodforge's ``FeatureSet``\\ s; pytorch-ood's ``fit_*`` / ``predict_*`` on the same tensors), the
   median of ``--repeats`` runs. Detectors that need images (``odin``, and pytorch-ood's ``GradNorm``, which
   back-propagates per image where oodforge uses the closed form) are not in this part.

pytorch-ood runs in its own venv (``--venv``, default ``~/.cache/oodforge/ptood-venv``, created and filled by
pip on first use: the same torch version as here, pytorch-ood, scikit-learn for its KNN) as a subprocess
(``benchmarks/_ptood_worker.py``) that reads the model and data this script writes. Both sides get the same
torch thread count and batch size and are timed after their imports. Without pytorch-ood (no network, ...)
the script says why in one line and exits 0.

Writes ``--out`` (default ``benchmarks/results/vs_pytorch_ood.json``): the per-detector table, both ratios,
the command line and the library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_ptood_worker.py"
DEFAULT_VENV = Path.home() / ".cache" / "oodforge" / "ptood-venv"

#: oodforge's detector name -> pytorch-ood's class (the worker builds it with matched parameters)
SHARED = {"msp": "MaxSoftmax", "maxlogit": "MaxLogit", "energy": "EnergyBased", "entropy": "Entropy",
          "gen": "GEN", "tempscale": "TemperatureScaling", "klm": "KLMatching", "gradnorm": "GradNorm",
          "react": "ReAct", "dice": "DICE", "vra": "VRA", "ash": "ASH", "scale": "SCALE", "rankfeat": "RankFeat",
          "mahalanobis": "Mahalanobis", "rmds": "RMD", "gmm": "GMM", "knn": "KNN", "nnguide": "NNGuide",
          "vim": "ViM", "she": "SHE", "fdbd": "fDBD", "nci": "NCI",
          "odin": "ODIN"}  # last: its time then holds no feature extraction, so "without odin" subtracts only it
NEEDS_IMAGES_PT = {"odin", "gradnorm"}  # pytorch-ood needs the images (gradients) for these


def log(msg: str = "") -> None:
    print(msg, flush=True)


def ensure_venv(venv: Path) -> tuple[Path | None, str]:
    """The venv's python with pytorch-ood importable, installing it when missing; ``(None, why)`` on failure."""
    py = venv / "bin" / "python"
    check = [str(py), str(WORKER), "--check"]  # imports pytorch-ood as the worker does
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py, "present"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the same torch as oodforge's side (a CPU wheel here)
    log(f"installing pytorch-ood into {venv} (python -m venv; pip install {torch_pin} pytorch-ood scikit-learn) ...")
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", torch_pin, "pytorch-ood", "scikit-learn"]]
    for cmd in steps:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"`{' '.join(cmd[:4])} ...` failed: {e}"
        if r.returncode != 0:
            last = next((ln for ln in reversed((r.stderr or r.stdout).splitlines()) if ln.strip()), "no output")
            return None, f"`{' '.join(cmd[:4])} ...` exited {r.returncode}: {last.strip()}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"pytorch-ood still does not import in {venv}"
    return py, "installed"


def write_inputs(work: Path, model, sets: dict, feats: dict, score_sets: list[str], detectors: list[str]) -> None:
    """The model (exported feature map + head), the images and labels and oodforge's cached features, as files."""

    class FeatureMap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.feature_map(x)

    x0 = sets["id"].float_images(0, 8)
    ep = torch.export.export(FeatureMap(model).eval(), (x0,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, str(work / "backbone.pt2"))
    torch.save({k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}, work / "head.pt")
    for name, ds in sets.items():
        np.save(work / f"images_{name}.npy", ds.images.numpy())
        np.save(work / f"labels_{name}.npy", ds.labels.numpy().astype(np.int64))
        fs = feats[name]
        np.save(work / f"logits_{name}.npy", fs.logits.numpy())
        np.save(work / f"penultimate_{name}.npy", fs.penultimate.numpy())
        if fs.feature_map is not None:
            np.save(work / f"fmap_{name}.npy", np.asarray(fs.feature_map))
    (work / "spec.json").write_text(json.dumps({"detectors": detectors, "score_sets": score_sets}))


def aurocs(scores: dict[str, np.ndarray], ood_names: list[str], higher_is_ood: bool) -> dict[str, float]:
    from oodforge.metrics import evaluate

    sign = -1.0 if higher_is_ood else 1.0
    return {o: evaluate(sign * scores["id"], sign * scores[o])["auroc"] for o in ood_names}


def oodforge_maths(name: str, model, feats: dict, score_sets: list[str], repeats: int, seed: int):
    """Median seconds of fit + score of oodforge's ``name`` on the cached FeatureSets, and its scores."""
    from oodforge.detectors import FitContext, create

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        det = create(name)
        det.fit(FitContext(model=model, train=feats["train"], val=feats["val"], seed=seed))
        scores = {s: det.score(feats[s]) for s in score_sets}
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="fashion6")
    ap.add_argument("--full", action="store_true", help="the whole suite instead of its quick sample")
    ap.add_argument("--max-train", type=int, default=None, help="stratified subset of the ID training set")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the maths part per detector (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="pytorch-ood's venv (made when missing)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "vs_pytorch_ood.json")
    ap.add_argument("--detectors", default=None, help="comma-separated subset of the shared detectors (default: all)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the files handed to the worker in this folder")
    args = ap.parse_args(argv)

    py, how = ensure_venv(args.venv)
    if py is None:
        log(f"pytorch-ood comparison skipped: {how}")
        return 0
    log(f"pytorch-ood venv: {args.venv} ({how})")

    import oodforge
    from oodforge.bench import BenchJob, run_bench
    from oodforge.data.sampling import stratified_subset
    from oodforge.data.suites import load_suite
    from oodforge.models.features import extract_features
    from oodforge.zoo import load_zoo_model

    torch.set_num_threads(args.threads)
    suite = stratified_subset(load_suite(args.suite, quick=not args.full), args.max_train, 0)
    model, meta = load_zoo_model(args.suite, "plain")
    model.eval()
    detectors = list(SHARED) if args.detectors is None else [d for d in SHARED if d in args.detectors.split(",")]
    ood_names = list(suite.ood)
    score_sets = ["id", *ood_names]
    sets = {"train": suite.id_train, "val": suite.id_val, "id": suite.id_test, **suite.ood}
    sizes = {k: len(v) for k, v in sets.items()}
    log(f"suite {args.suite}{'' if args.full else ' (quick)'}: {sizes}; model {meta['zoo']} ({meta['arch']}); "
        f"{len(detectors)} shared detectors; {args.threads} thread(s), batch {args.batch_size}")

    work = Path(tempfile.mkdtemp(prefix="oodforge-vs-ptood-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        # ---- 1. oodforge, whole benchmark: empty feature cache, one pass per dataset, every detector
        log("\n[1/3] oodforge whole benchmark (run_bench, empty feature cache) ...")
        cache = work / "feature-cache"
        t0 = time.perf_counter()
        res = run_bench(suite, [BenchJob(model=model, methods=detectors)], out=None, device="cpu", cache_dir=cache,
                        batch_size=args.batch_size, progress=False, log=None)
        of_whole_total = time.perf_counter() - t0
        of_whole = {d: res["timings"][d] for d in detectors}
        log(f"  {of_whole_total:.1f} s")

        # the same features, from the cache just filled (maps for the scored sets: rankfeat read them)
        feats = {k: extract_features(model, ds, "cpu", args.batch_size, k in score_sets, cache, progress=False)
                 for k, ds in sets.items()}
        write_inputs(work, model, sets, feats, score_sets, detectors)

        # ---- 2. oodforge, detector maths alone
        log(f"\n[2/3] oodforge detector maths on cached features (median of {args.repeats}) ...")
        of_maths, of_maths_scores = {}, {}
        for d in detectors:
            if d in NEEDS_IMAGES_PT:
                continue
            med, all_t, sc = oodforge_maths(d, model, feats, score_sets, args.repeats, 0)
            of_maths[d] = {"median": med, "all": all_t}
            of_maths_scores[d] = sc
            log(f"  oodforge maths     {d:<12} {med:8.4f} s")

        # ---- 3. pytorch-ood, both parts, in its venv
        log("\n[3/3] pytorch-ood (subprocess in its venv): whole benchmark, then detector maths ...")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        env.pop("PYTHONPATH", None)
        cmd = [str(py), str(WORKER), "--data", str(work), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
        if r.returncode != 0:
            log(f"pytorch-ood worker failed (exit {r.returncode}); see its output above")
            return 1
        pt = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"  worker ran {time.perf_counter() - t0:.1f} s")

        def pt_scores(part, d):
            return {s: np.load(work / "ptood_scores" / part / f"{d}__{s}.npy") for s in score_sets}

        # ---- table
        rows = []
        for d in detectors:
            of_auc = aurocs({s: res["_scores"][f"{d}/{s}"] for s in score_sets}, ood_names, higher_is_ood=False)
            pt_auc = aurocs(pt_scores("whole", d), ood_names, higher_is_ood=True)
            row = {"detector": d, "pytorch_ood": SHARED[d],
                   "whole": {"oodforge_s": of_whole[d], "pytorch_ood_s": pt["whole"][d],
                             "ratio": pt["whole"][d] / max(of_whole[d], 1e-9),
                             "auroc_max_abs_diff": max(abs(of_auc[o] - pt_auc[o]) for o in ood_names),
                             "auroc_oodforge_mean": float(np.mean(list(of_auc.values()))),
                             "auroc_pytorch_ood_mean": float(np.mean(list(pt_auc.values())))}}
            if d in of_maths and d in pt["maths"]:
                of_m = aurocs(of_maths_scores[d], ood_names, higher_is_ood=False)
                pt_m = aurocs(pt_scores("maths", d), ood_names, higher_is_ood=True)
                row["maths"] = {"oodforge_s": of_maths[d]["median"], "pytorch_ood_s": pt["maths"][d]["median"],
                                "ratio": pt["maths"][d]["median"] / max(of_maths[d]["median"], 1e-9),
                                "oodforge_all_s": of_maths[d]["all"], "pytorch_ood_all_s": pt["maths"][d]["all"],
                                "auroc_max_abs_diff": max(abs(of_m[o] - pt_m[o]) for o in ood_names)}
            rows.append(row)

        pt_whole_total = sum(pt["whole"].values())
        maths_rows = [r for r in rows if "maths" in r]
        of_maths_total = sum(r["maths"]["oodforge_s"] for r in maths_rows)
        pt_maths_total = sum(r["maths"]["pytorch_ood_s"] for r in maths_rows)
        agree = [r for r in maths_rows if r["maths"]["auroc_max_abs_diff"] <= 1e-3]
        ratios = {
            "whole": pt_whole_total / of_whole_total,
            "whole_without_odin": ((pt_whole_total - pt["whole"].get("odin", 0.0))
                                   / (of_whole_total - of_whole.get("odin", 0.0))),
            "maths": pt_maths_total / of_maths_total,
            "maths_agreeing_only": (sum(r["maths"]["pytorch_ood_s"] for r in agree)
                                    / max(sum(r["maths"]["oodforge_s"] for r in agree), 1e-9)),
            "maths_median_of_per_detector": statistics.median(r["maths"]["ratio"] for r in maths_rows),
        }
        totals = {"whole": {"oodforge_s": of_whole_total, "pytorch_ood_s": pt_whole_total,
                            "oodforge_odin_s": of_whole.get("odin"),
                            "pytorch_ood_odin_s": pt["whole"].get("odin")},
                  "maths": {"oodforge_s": of_maths_total, "pytorch_ood_s": pt_maths_total,
                            "detectors": len(maths_rows), "agreeing_within_1e-3": len(agree)}}

        log("\nper detector: seconds (pytorch-ood / oodforge = ratio, > 1: oodforge faster); "
            "dAUROC = largest |AUROC difference| over the OOD sets")
        hdr = (f"{'detector':<12} {'pytorch-ood':<18} | {'whole: oodf':>11} {'ptood':>8} {'ratio':>7} {'dAUROC':>8} "
               f"| {'maths: oodf':>11} {'ptood':>8} {'ratio':>7} {'dAUROC':>8}")
        log(hdr)
        log("-" * len(hdr))
        for r in rows:
            w = r["whole"]
            line = (f"{r['detector']:<12} {r['pytorch_ood']:<18} | {w['oodforge_s']:11.3f} {w['pytorch_ood_s']:8.3f} "
                    f"{w['ratio']:7.1f} {w['auroc_max_abs_diff']:8.1e} |")
            if "maths" in r:
                m = r["maths"]
                line += (f" {m['oodforge_s']:11.4f} {m['pytorch_ood_s']:8.4f} {m['ratio']:7.2f} "
                         f"{m['auroc_max_abs_diff']:8.1e}")
            else:
                line += "   (needs images on pytorch-ood's side: whole benchmark only)"
            log(line)
        log("-" * len(hdr))
        log("oodforge's per-detector whole-benchmark seconds include the feature pass of every set the detector was "
            "the first to need (msp: train + OOD sets); the ID test and validation passes come before the first "
            "detector and are only in the total")
        log(f"\nwhole benchmark: oodforge {of_whole_total:.1f} s, pytorch-ood {pt_whole_total:.1f} s -> "
            f"{ratios['whole']:.2f}x (goal >= 5x); without odin: {ratios['whole_without_odin']:.2f}x")
        log(f"detector maths alone ({len(maths_rows)} detectors): oodforge {of_maths_total:.3f} s, "
            f"pytorch-ood {pt_maths_total:.3f} s -> {ratios['maths']:.2f}x (goal >= 2x); "
            f"over the {len(agree)} that agree to 1e-3 AUROC: {ratios['maths_agreeing_only']:.2f}x; "
            f"median per-detector ratio {ratios['maths_median_of_per_detector']:.2f}x")

        import sklearn

        result = {
            "command": " ".join(["python", *map(shlex.quote, [str(Path(sys.argv[0])), *sys.argv[1:]])])
            if argv is None else "bench_vs_pytorch_ood.main(" + repr(argv) + ")",
            "ratios": ratios, "totals": totals, "detectors": rows,
            "setup": {"suite": args.suite, "quick": not args.full, "max_train": args.max_train, "sizes": sizes,
                      "model": meta["zoo"], "arch": meta["arch"], "threads": args.threads,
                      "batch_size": args.batch_size, "repeats": args.repeats,
                      "id_accuracy": res["id_accuracy"]},
            "versions": {"oodforge": oodforge.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "sklearn": sklearn.__version__, "python": platform.python_version(),
                         "pytorch_ood_venv": {k: pt[k] for k in ("pytorch_ood", "torch", "numpy", "python")},
                         "platform": platform.platform(), "cpus": os.cpu_count()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        log(f"\nwrote {args.out}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
