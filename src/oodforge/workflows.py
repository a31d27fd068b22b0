"""The jobs the CLI and the demo run: get a classifier (train or reuse), forge outliers, benchmark.

Trained models and forged outlier stores are cached under ``$OODFORGE_CACHE`` (default
``~/.cache/oodforge``), keyed by everything that determines them (suite, training-set identity,
architecture, schedule, seed), so a second run reuses them and a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .data.base import ArrayDataset, Suite
from .models.backbones import build_model
from .models.base import Classifier
from .models.checkpoint import load_checkpoint, save_checkpoint

POST_HOC = ["msp", "maxlogit", "energy", "odin", "mahalanobis", "react", "dice", "knn", "vim", "gradnorm"]


def cache_root() -> Path:
    return Path(os.environ.get("OODFORGE_CACHE", Path.home() / ".cache" / "oodforge"))


@dataclass
class TrainPlan:
    """How the default classifier is trained (the CPU defaults; measured in the README)."""

    arch: str = "small_resnet"
    epochs: int = 4
    lr: float = 0.05
    batch_size: int = 128
    seed: int = 0
    method: str = "plain"  # or "ssod"
    alpha: float = 1.0
    gamma: float = 0.95
    input_size: int | None = None

    def key(self, suite: Suite) -> str:
        blob = json.dumps({**self.__dict__, "train": suite.id_train.identity, "shape": suite.image_shape},
                          sort_keys=True)
        return f"{suite.name}-{self.method}-{self.arch}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def normalisation(suite: Suite) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the ID training images (stored in the model)."""
    x = suite.id_train.images[:5000].float().div(255.0)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return tuple(mean), tuple(std)


def train_model(suite: Suite, plan: TrainPlan, device: str = "cpu", progress: bool = True) -> tuple[Classifier, dict]:
    """Train a classifier (plain cross-entropy, or SSOD's joint objective) on ``suite.id_train``."""
    mean, std = normalisation(suite)
    arch = f"ssod:{plan.arch}" if plan.method == "ssod" else plan.arch
    model = build_model(arch, suite.num_classes, suite.image_shape[0], mean, std)
    t0 = time.time()
    if plan.method == "ssod":
        from .ssod.train import train_ssod

        history = train_ssod(model, suite.id_train, epochs=plan.epochs, batch_size=plan.batch_size, seed=plan.seed,
                             device=device, alpha=plan.alpha, gamma=plan.gamma, input_size=plan.input_size,
                             progress=progress)
    elif plan.method == "plain":
        from .models.train import train_classifier

        history = train_classifier(model, suite.id_train, epochs=plan.epochs, lr=plan.lr,
                                   batch_size=plan.batch_size, seed=plan.seed, device=device, progress=progress)
    else:
        raise ValueError(f"unknown training method {plan.method!r}: use 'plain' or 'ssod'")
    meta = {"class_names": suite.class_names, "suite": suite.name, "train_set": suite.id_train.identity,
            "plan": plan.__dict__, "train_seconds": round(time.time() - t0, 1),
            "history": {k: v for k, v in history.items() if isinstance(v, (list, int, float, str))}}
    return model.eval(), meta


def get_model(suite: Suite, plan: TrainPlan, checkpoint: str | Path | None = None, device: str = "cpu",
              progress: bool = True, log=print) -> tuple[Classifier, dict]:
    """Load ``checkpoint`` when given; otherwise reuse or train (and cache) the model ``plan`` describes."""
    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, device)
        if meta["num_classes"] != suite.num_classes or meta["in_channels"] != suite.image_shape[0]:
            raise ValueError(f"checkpoint {checkpoint} has {meta['num_classes']} classes / {meta['in_channels']} "
                             f"channels but suite {suite.name!r} has {suite.num_classes} / {suite.image_shape[0]}")
        return model, {**meta, "checkpoint": str(checkpoint)}
    folder = cache_root() / "models" / plan.key(suite)
    if (folder / "model.safetensors").is_file():
        model, meta = load_checkpoint(folder, device)
        if log:
            log(f"reusing {plan.method} classifier {folder}")
        return model, {**meta, "checkpoint": str(folder)}
    if log:
        log(f"training the {plan.method} {plan.arch} on {suite.name} ({len(suite.id_train)} images, "
            f"{plan.epochs} epochs)")
    model, meta = train_model(suite, plan, device, progress)
    save_checkpoint(model, folder, meta)
    if log:
        log(f"  trained in {meta['train_seconds']} s, saved to {folder}")
    return model, {**meta, "checkpoint": str(folder)}


def forge_cpu_outliers(suite: Suite, model: Classifier, k: int = 1, limit: int | None = None, seed: int = 0,
                       masker: str = "layercam", inpainter: str = "telea", device: str = "cpu",
                       progress: bool = True, log=print) -> tuple[ArrayDataset, Path, dict]:
    """SHIFT outliers from the ID training set with a swappable masker + inpainter (cached, resumable).

    Returns the outliers, the store folder and ``{"images_per_second", "seconds", "n"}`` for this call.
    """
    from .models.checkpoint import weights_hash
    from .synth.shift import forge_shift, make_inpainter, make_masker

    key = hashlib.sha256(f"{suite.id_train.identity}|{weights_hash(model)}|{masker}|{inpainter}|{k}|{limit}|{seed}"
                         .encode()).hexdigest()[:12]
    folder = cache_root() / "outliers" / f"{suite.name}-{masker}-{inpainter}-k{k}-{key}"
    t0 = time.time()
    store = forge_shift(suite.id_train, folder, make_masker(masker, model=model), make_inpainter(inpainter), k=k,
                        seed=seed, limit=limit, device=device, class_names=suite.class_names, progress=progress)
    outliers = store.load()
    dt = time.time() - t0
    if log:
        log(f"{len(outliers)} SHIFT outliers ({masker} + {inpainter}, K={k}) in {folder} ({dt:.1f} s)")
    return outliers, folder, {"seconds": round(dt, 2), "n": len(outliers),
                              "images_per_second": round(len(outliers) / max(dt, 1e-9), 1)}
