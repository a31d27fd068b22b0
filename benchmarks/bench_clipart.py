"""The ``clipart`` benchmark: a small ResNet from scratch vs an ImageNet EfficientNet-Lite0 as a linear probe vs
fine-tuned, each with every post-hoc detector, timed per stage on the CPU it runs on.

    nohup .venv/bin/python benchmarks/bench_clipart.py --out benchmarks/results/clipart.json \\
        > benchmarks/results/clipart.log 2>&1 &

What it does, in order (``--quick``: the quick suite, a smoke test of this script):

1. **Throughput**: forward-pass and training-step images/s on random images (batch 16, about 2 s each) of
   EfficientNet-Lite0 fine-tuned at 64, 128 and 224 px, and of the probe and the small ResNet at 64 px: the
   numbers behind the suite's 64 px (``docs/datasets.md``).
2. **Suite**: ``load_suite("clipart")`` (7 ID classes, 3x64x64; near OOD = held-out categories, far OOD =
   textures, noise).
3. **Models**, each trained on ``id_train`` by the one training loop (``workflows.train_model``), batch 32:
   ``small_resnet`` from scratch with oodforge's default recipe (SGD Nesterov, one-cycle, lr 0.05), 20 epochs;
   ``efficientnet_lite0-probe`` (lr 0.02 or 0.1, 10 epochs) and ``efficientnet_lite0-finetune`` (lr 0.003 or
   0.01, weight decay 5e-5, 10 epochs): what fits the budget on 2 shared cores (about 25 minutes). Where there are
   candidates, the one with the best **ID validation** accuracy is kept (ties: the first); no OOD set is
   read to choose anything.
4. **Detectors**: the features of every set are extracted once per model into a fresh cache (timed: the
   feature-extraction stage), then ``bench.run_bench`` (once per detector, so that one refusing a model is
   recorded and the rest still run) with every post-hoc detector (``workflows.POST_HOC``)
   fits on ID train and scores ID test and the OOD sets; fitting and scoring are timed per detector by
   wrapping ``Detector.fit`` / ``Detector.score`` (timing only: the calls and results are unchanged).

5. **SHIFT** (``--no-shift`` skips it): per model, one outlier per ID training image forged with the CPU
   forger (Layer-CAM masks from that model + Telea inpainting, ``workflows.forge_cpu_outliers``, the same
   as ``oodforge synth shift --masker layercam --inpainter telea``), then the ``shift`` rejection network
   fitted on ID train vs those outliers (``run_bench`` with the store); times: forging, the outliers'
   features, fitting, scoring.

Writes ``OUT`` (JSON: every detector's metrics per OOD set and per group, times per stage, the
throughput table, the validation sweep, the environment) and ``OUT`` with ``.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from oodforge.bench import BenchJob, run_bench
from oodforge.data.suites import load_suite
from oodforge.detectors.base import Detector
from oodforge.models.backbones import build_model
from oodforge.models.features import extract_features
from oodforge.models.pretrained import trainable_parameters
from oodforge.models.train import accuracy
from oodforge.report import group_mean
from oodforge.workflows import POST_HOC, TrainPlan, train_model

#: model label -> (arch, candidate plans' overrides, epochs); batch 32 for all
MODELS = {
    "small_resnet (scratch)": ("small_resnet", [{}], 20),
    "lite0 probe": ("efficientnet_lite0-probe", [{"lr": 0.02}, {"lr": 0.1}], 10),
    "lite0 fine-tune": ("efficientnet_lite0-finetune", [{"lr": 0.003}, {"lr": 0.01}], 10),
}
BATCH = 32
SIZES = (64, 128, 224)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def throughput(seconds: float = 3.0) -> list[dict]:
    """Images/s of a forward pass (eval, no grad) and of a training step (SGD on cross-entropy), batch 16."""
    rows = []
    for arch in ("efficientnet_lite0-finetune", "efficientnet_lite0-probe", "small_resnet"):
        for size in SIZES:
            if arch != "efficientnet_lite0-finetune" and size > 64:
                continue  # the probe's forward pass is the fine-tune's; the small ResNet's suites are 28-64 px
            torch.manual_seed(0)
            m = build_model(arch, 7, 3)
            x, y = torch.rand(16, 3, size, size), torch.randint(0, 7, (16,))
            m.eval()
            with torch.no_grad():
                m(x[:4])
                t, n = time.time(), 0
                while time.time() - t < seconds or n == 0:
                    m(x)
                    n += len(x)
                fwd = n / (time.time() - t)
            m.train()
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
            t, n = time.time(), 0
            while time.time() - t < seconds or n == 0:
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                n += len(x)
            rows.append({"arch": arch, "size": size, "forward_images_per_s": round(fwd, 1),
                         "train_images_per_s": round(n / (time.time() - t), 1)})
            log(f"throughput {arch} {size}px: forward {fwd:.1f}, train step {rows[-1]['train_images_per_s']} img/s")
    return rows


class StageTimer:
    """Wall time of every ``Detector.fit`` / ``Detector.score`` call, per detector name."""

    def __init__(self) -> None:
        self.fit: dict[str, float] = {}
        self.score: dict[str, float] = {}
        self._orig = (Detector.fit, Detector.score)

    def __enter__(self) -> StageTimer:
        orig_fit, orig_score = self._orig
        timer = self

        def fit(det, ctx):
            t = time.time()
            try:
                return orig_fit(det, ctx)
            finally:
                timer.fit[det.name] = timer.fit.get(det.name, 0.0) + time.time() - t

        def score(det, feats):
            t = time.time()
            try:
                return orig_score(det, feats)
            finally:
                timer.score[det.name] = timer.score.get(det.name, 0.0) + time.time() - t

        Detector.fit, Detector.score = fit, score
        return self

    def __exit__(self, *exc) -> None:
        Detector.fit, Detector.score = self._orig


def train_and_select(suite, label: str, arch: str, candidates: list[dict], epochs: int) -> tuple:
    """Train every candidate on ID train; keep the best ID-validation accuracy. Returns model, info."""
    sweep, best = [], None
    for over in candidates:
        plan = TrainPlan(arch=arch, epochs=epochs, batch_size=BATCH, seed=0, **over)
        config = plan.train_config()
        t = time.time()
        model, meta = train_model(suite, plan, progress=False, log=None)
        seconds = time.time() - t
        val = accuracy(model, suite.id_val)
        sweep.append({"lr": config.lr, "optimizer": config.optimizer, "schedule": config.schedule,
                      "weight_decay": config.weight_decay, "epochs": config.epochs, "batch_size": BATCH,
                      "train_seconds": round(seconds, 1), "id_val_accuracy": round(val, 4),
                      "final_train_loss": round(meta["history"]["loss"][-1], 4)})
        log(f"{label}: lr {config.lr} -> ID val accuracy {100 * val:.2f} % ({seconds:.0f} s)")
        if best is None or val > best[0]:
            best = (val, model, sweep[-1])
    _, model, chosen = best
    info = {"arch": arch, "sweep": sweep, "chosen": chosen, "trainable_parameters": trainable_parameters(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds_total": round(sum(s["train_seconds"] for s in sweep), 1)}
    return model, info


def run_shift(suite, model, cache: Path) -> dict:
    """SHIFT on ``model``: forge outliers from ID train (Layer-CAM + Telea, the CPU forger), then fit the
    rejection network on ID train vs those outliers and score ID test and the OOD sets (``run_bench``)."""
    from oodforge.workflows import forge_cpu_outliers

    t = time.time()
    outliers, folder, _ = forge_cpu_outliers(suite, model, k=1, masker="layercam", inpainter="telea",
                                             progress=False, log=None)
    forge_seconds = time.time() - t
    t = time.time()
    extract_features(model, outliers, batch_size=128, feature_map=False, cache_dir=cache, progress=False)
    extract_seconds = time.time() - t
    with StageTimer() as timer:
        res = run_bench(suite, [BenchJob(model, ["shift"], outliers=outliers)], None, cache_dir=cache, seed=0,
                        batch_size=128, progress=False, log=None)
    key = next(iter(res["methods"]))
    near, far = group_mean(res, key, "near"), group_mean(res, key, "far")
    out = {"key": key, "outliers": len(outliers), "store": str(folder), "near_auroc": near[0], "near_fpr95": near[1],
           "far_auroc": far[0], "far_fpr95": far[1],
           "per_set": {s: {k: round(v, 5) for k, v in r.items()} for s, r in res["methods"][key].items()},
           "forge_seconds": round(forge_seconds, 1), "extract_seconds": round(extract_seconds, 1),
           "fit_seconds": round(timer.fit.get("shift", 0.0), 2), "score_seconds": round(timer.score.get("shift", 0.0), 2)}
    log(f"  shift: near AUROC {100 * near[0]:.2f}, far {100 * far[0]:.2f} (forging {forge_seconds:.0f} s, "
        f"fit {out['fit_seconds']} s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/clipart.json")
    ap.add_argument("--quick", action="store_true", help="the quick suite: a smoke test of this script")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-shift", action="store_true", help="skip the SHIFT stage (forging + rejection network)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on 2 cores shared with "
                    "other jobs, 2 threads ran EfficientNet-Lite0 5x slower than 1, waiting on each other)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    result: dict = {"command": "python benchmarks/bench_clipart.py --out " + str(out) + (" --quick" if args.quick else ""),
                    "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_start": os.getloadavg(), "models": {}}
    if not args.no_throughput:
        result["throughput"] = throughput(1.0 if args.quick else 2.0)
    t = time.time()
    suite = load_suite("clipart", quick=args.quick)
    result["suite"] = {"seconds": round(time.time() - t, 1), "classes": suite.class_names,
                       "image_shape": list(suite.image_shape), "groups": suite.groups,
                       "sizes": {"id_train": len(suite.id_train), "id_val": len(suite.id_val),
                                 "id_test": len(suite.id_test), **{k: len(v) for k, v in suite.ood.items()}}}
    log(f"suite clipart: {result['suite']['sizes']}")
    cache = Path(tempfile.mkdtemp(prefix="bench-clipart-features-"))
    try:
        for label, (arch, candidates, epochs) in MODELS.items():
            model, info = train_and_select(suite, label, arch, candidates, epochs)
            sets = {"id_train": suite.id_train, "id_val": suite.id_val, "id_test": suite.id_test, **suite.ood}
            t = time.time()
            for ds in sets.values():
                extract_features(model, ds, batch_size=128, feature_map=True, cache_dir=cache, progress=False)
            n_images = sum(len(d) for d in sets.values())
            info["extract_seconds"] = round(time.time() - t, 1)
            info["extract_images_per_s"] = round(n_images / max(time.time() - t, 1e-9), 1)
            log(f"{label}: features of {n_images} images in {info['extract_seconds']} s")
            t = time.time()
            detectors, failed = {}, {}
            with StageTimer() as timer:
                for m in POST_HOC:  # one run_bench per detector (features come from the cache): a detector
                    try:            # that refuses this model is recorded, the others still run
                        res = run_bench(suite, [BenchJob(model, [m])], None, cache_dir=cache, seed=0,
                                        batch_size=128, progress=False, log=None)
                    except ValueError as e:
                        failed[m] = str(e)
                        log(f"{label}: {m} refused: {e}")
                        continue
                    near, far = group_mean(res, m, "near"), group_mean(res, m, "far")
                    detectors[m] = {"near_auroc": near[0], "near_fpr95": near[1], "far_auroc": far[0],
                                    "far_fpr95": far[1],
                                    "per_set": {s: {k: round(v, 5) for k, v in r.items()}
                                                for s, r in res["methods"][m].items()},
                                    "fit_seconds": round(timer.fit.get(m, 0.0), 3),
                                    "score_seconds": round(timer.score.get(m, 0.0), 3)}
            info["bench_seconds"] = round(time.time() - t, 1)
            info["id_test_accuracy"] = res["id_accuracy"]
            info["id_val_accuracy"] = res["models"]["plain"].get("id_val_accuracy")
            info["detectors"], info["failed"] = detectors, failed
            if not args.no_shift:
                info["shift"] = run_shift(suite, model, cache)
            info["fit_seconds_total"] = round(sum(d["fit_seconds"] for d in detectors.values()), 1)
            info["score_seconds_total"] = round(sum(d["score_seconds"] for d in detectors.values()), 1)
            best = max(detectors, key=lambda k: detectors[k]["near_auroc"])
            log(f"{label}: ID test accuracy {100 * info['id_test_accuracy']:.2f} %; best near AUROC {best} "
                f"{100 * detectors[best]['near_auroc']:.2f}; fit {info['fit_seconds_total']} s, "
                f"score {info['score_seconds_total']} s")
            result["models"][label] = info
            del model
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result["shift"] = ("not run (--no-shift)" if args.no_shift else
                       "Layer-CAM masks + Telea inpainting, K=1, one outlier per ID training image "
                       "(workflows.forge_cpu_outliers = `oodforge synth shift --masker layercam --inpainter telea`), "
                       "rejection network on the penultimate features (the detector's defaults)")
    result["total_seconds"] = round(time.time() - t_all, 1)
    result["load_average_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {out} and {out.with_suffix('.md')} ({result['total_seconds']} s)")


def markdown(r: dict) -> str:
    """The tables of ``r``: models (accuracy, times), every detector per model, throughput."""
    lines = [f"# clipart benchmark\n\n`{r['command']}`: {r['total_seconds']:.0f} s on {r['cpus']} CPU cores "
             f"(torch threads {r['torch_threads']}; load average {r['load_average_start'][0]:.1f} at the start, "
             f"{r['load_average_end'][0]:.1f} at the end).\n",
             f"Suite: {r['suite']['sizes']}, images {r['suite']['image_shape']}, classes {r['suite']['classes']}.\n",
             "## Models\n",
             "| model | trained params | chosen (ID val) | ID val acc | ID test acc | train s (all candidates) "
             "| features s (img/s) | fit s | score s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, m in r["models"].items():
        c = m["chosen"]
        sweep = ", ".join(f"lr {s['lr']}: {100 * s['id_val_accuracy']:.1f} %" for s in m["sweep"])
        lines.append(f"| {label} | {m['trainable_parameters']:,} | lr {c['lr']}, {c['epochs']} ep ({sweep}) | "
                     f"{100 * m['id_val_accuracy']:.2f} | {100 * m['id_test_accuracy']:.2f} | "
                     f"{c['train_seconds']:.0f} ({m['train_seconds_total']:.0f}) | {m['extract_seconds']:.0f} "
                     f"({m['extract_images_per_s']:.0f}) | {m['fit_seconds_total']:.1f} | {m['score_seconds_total']:.1f} |")
    lines += ["", "## Detectors: near (held-out categories) and far (mean of textures, noise) AUROC / FPR95 %\n",
              "| detector | " + " | ".join(f"{lb} near | {lb} far" for lb in r["models"]) + " |",
              "|---|" + "---|---|" * len(r["models"])]
    names = list(dict.fromkeys(d for m in r["models"].values() for d in [*m["detectors"], *m.get("failed", {})]))

    def pair(x) -> list[str]:
        if x is None:
            return ["refused", "refused"]
        return [f"{100 * x['near_auroc']:.1f} / {100 * x['near_fpr95']:.1f}",
                f"{100 * x['far_auroc']:.1f} / {100 * x['far_fpr95']:.1f}"]

    for d in names:
        lines.append(f"| {d} | " + " | ".join(c for m in r["models"].values() for c in pair(m["detectors"].get(d)))
                     + " |")
    shift_rows = [(lb, m["shift"]) for lb, m in r["models"].items() if m.get("shift")]
    if shift_rows:
        lines.append("| **shift** (Layer-CAM + Telea) | " + " | ".join(
            c for m in r["models"].values() for c in (pair(m["shift"]) if m.get("shift") else ["-", "-"])) + " |")
        lines += ["", "SHIFT times (s): " + "; ".join(
            f"{lb}: forging {x['forge_seconds']:.0f} ({x['outliers']} outliers), outlier features "
            f"{x['extract_seconds']:.0f}, fit {x['fit_seconds']:.1f}, score {x['score_seconds']:.1f}"
            for lb, x in shift_rows)]
    lines += ["", "## Detector times (s): fit / score (all scored sets)\n",
              "| detector | " + " | ".join(r["models"]) + " |", "|---|" + "---|" * len(r["models"])]
    for d in names:
        lines.append(f"| {d} | " + " | ".join(
            f"{m['detectors'][d]['fit_seconds']:.2f} / {m['detectors'][d]['score_seconds']:.2f}"
            if d in m["detectors"] else "refused" for m in r["models"].values()) + " |")
    if r.get("throughput"):
        lines += ["", "## Throughput (random images, batch 16): forward / training step, images/s\n",
                  "| arch | " + " | ".join(f"{s} px" for s in SIZES) + " |", "|---|" + "---|" * len(SIZES)]
        for arch in dict.fromkeys(t["arch"] for t in r["throughput"]):
            row = {t["size"]: t for t in r["throughput"] if t["arch"] == arch}
            lines.append(f"| {arch} | " + " | ".join(
                f"{row[s]['forward_images_per_s']:.1f} / {row[s]['train_images_per_s']:.1f}" if s in row else "-"
                for s in SIZES) + " |")
    lines += ["", f"shift: {r['shift']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
