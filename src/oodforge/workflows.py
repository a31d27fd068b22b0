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
from .models.train import CrossEntropy, TrainConfig, run_training, seed_everything

#: the post-hoc baseline, the default method list of ``bench`` (``--methods posthoc``): every post-hoc detector
#: cheap enough to run by default (`oodforge detectors` lists them all)
POST_HOC = ["msp", "maxlogit", "energy", "odin", "mahalanobis", "react", "dice", "knn", "vim", "gradnorm",
            "entropy", "tempscale", "gen", "klm", "ash", "scale", "rankfeat", "vra", "rmds", "nnguide", "she",
            "fdbd", "nci",
            # issue 24, the ones under ~1 s on the quick suites (gmm, iodin, adascale_a / _l are not: docs/detectors.md)
            "doctor", "optfs", "neco", "nusa", "kpca", "residual", "gem", "mahalanobispp", "ssd", "relation",
            "caref", "cadref", "openmax"]
#: the 10 of the first release (cheaper; the SSOD / OE backbones are compared with these minus ODIN)
CLASSIC = POST_HOC[:10]
#: the fused candidates (issue 28): every pair of these scores fused by ID-validation percentiles
#: (:mod:`oodforge.detectors.fusion`, its default rule ``min``), so that a near-type and a far-type score can be
#: combined into the one detector a user ships. On the plain classifier they are post-hoc fusions, the baseline
#: side (OpenOOD's CombOOD is such an entry). Fixed in session 8 before any fused number was computed, after
#: session 7's per-group test tables (logit scores leading near, feature scores far) had been read: the logit
#: scores (msp, energy, react) and the feature scores (knn, vim, mahalanobis) of POST_HOC that fit in seconds,
#: every pair (docs/protocol.md). Within a job the parts are fitted and scored once (detectors.fusion.FittedParts),
#: so the 15 cost little more than their parts.
FUSION_PARTS = ("msp", "energy", "react", "knn", "vim", "mahalanobis")
FUSIONS = [f"fusion:a={a},b={b}" for i, a in enumerate(FUSION_PARTS) for b in FUSION_PARTS[i + 1:]]


def cache_root() -> Path:
    return Path(os.environ.get("OODFORGE_CACHE", Path.home() / ".cache" / "oodforge"))


TRAIN_METHODS = ("plain", "ssod", "oe")  # and the recipes of oodforge.recipes (recipes.is_recipe)
#: a recipe fine-tuned from a checkpoint (``init_from``): SGD (Nesterov) lr 0.01 cosine, the learning rate of
#: the zoo's OE fine-tune (OE_RECIPE), picked on validation data; MixOE: its authors' fine-tuning recipe (lr 1e-3,
#: weight decay 1e-5, train_mixoe.py); from scratch a recipe takes the plain recipe
RECIPE_FINETUNE = {"optimizer": "sgd", "lr": 0.01, "schedule": "cosine", "weight_decay": 5e-4}
MIXOE_FINETUNE = {"optimizer": "sgd", "lr": 1e-3, "schedule": "cosine", "weight_decay": 1e-5}
#: the outlier-exposure recipe the protocol picked on validation data (docs/protocol.md): the zoo's OE
#: models and the demo's in-place fine-tuning use it
OE_RECIPE = {"oe_loss": "energy", "lr": 0.01, "epochs": 1}


@dataclass
class TrainPlan:
    """How a classifier is trained: architecture, loss (``method``) and recipe.

    ``None`` fields take the method's default: plain = SGD (Nesterov) with a one-cycle schedule at
    lr 0.05 (a pretrained fine-tune, ``arch`` ``"efficientnet_lite0-finetune"``: lr 0.01, weight decay
    5e-5; a linear probe, ``"...-probe"``, trains only its head with the plain recipe); SSOD from
    scratch = AdamW 1e-3 cosine (``ssod.CPU_DEFAULT``); SSOD from a plain
    checkpoint (``init_from``) = AdamW 1e-4 cosine (``ssod.CPU_FINETUNE``, the paper's lr);
    outlier exposure (``oe``, needs ``init_from`` and ``outliers``) = SGD (Nesterov) lr 1e-3
    cosine, the OE paper's fine-tuning recipe (Hendrycks et al. 2019, App. A).
    """

    arch: str = "small_resnet"
    epochs: int = 4
    lr: float | None = None
    batch_size: int = 128
    seed: int = 0
    method: str = "plain"  # or "ssod"
    optimizer: str | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    flip: bool = True
    alpha: float = 1.0
    gamma: float = 0.95
    balance: str = "loss"
    input_size: int | None = None
    warmup_epochs: int = 0
    init_from: str | None = None
    outliers: str | None = None  # oe: outlier store folder
    oe_loss: str = "oe"  # oe: "oe" (uniform CE) or "energy" (energy-bounded hinge)
    oe_lambda: float | None = None
    m_in: float | None = None
    m_out: float | None = None
    recipe_options: dict | None = None  # a recipe's (oodforge.recipes) options; None = the papers' defaults

    @classmethod
    def from_record(cls, info: dict, **changes) -> TrainPlan:
        """The plan a checkpoint was trained with (its ``meta.json`` ``plan``, e.g. a zoo entry's recorded command)
        with ``changes``: the same recipe on another seed, or (``method=...``) another loss on the same budget. A
        change of method drops the recorded recipe options, which belong to the recorded method."""
        fields = set(cls.__dataclass_fields__)
        recorded = {k: v for k, v in info["plan"].items() if k in fields}
        if "method" in changes and changes["method"] != recorded.get("method"):
            recorded["recipe_options"] = None
        return cls(**{**recorded, **changes})

    def key(self, suite: Suite) -> str:
        fields = {k: v for k, v in self.__dict__.items() if not (k == "recipe_options" and v is None)}
        blob = json.dumps({**fields, "train": suite.id_train.identity, "shape": suite.image_shape},
                          sort_keys=True)
        return f"{suite.name}-{self.method}-{self.arch}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def train_config(self) -> TrainConfig:
        """The loop settings: explicit fields win over the method's defaults."""
        from . import recipes

        is_recipe = recipes.is_recipe(self.method)
        if self.method not in TRAIN_METHODS and not is_recipe:
            raise ValueError(f"unknown training method {self.method!r}: use one of {', '.join(TRAIN_METHODS)}, "
                             f"or a recipe: {', '.join(recipes.LOSSES[1:])}, optionally '+pixmix'")
        if self.recipe_options and not is_recipe:
            raise ValueError(f"recipe options are for the recipes of oodforge.recipes, not method {self.method!r}")
        if is_recipe:
            self.resolved_options()  # refuse unknown or foreign options before any data is loaded
        if is_recipe and self.init_from:
            mixoe = recipes.parse_recipe(self.method)[0] == "mixoe"
            defaults = dict(MIXOE_FINETUNE if mixoe else RECIPE_FINETUNE)
        elif self.method == "ssod":
            from .ssod.train import CPU_DEFAULT, CPU_FINETUNE

            base = CPU_FINETUNE if self.init_from else CPU_DEFAULT
            defaults = {k: base[k] for k in ("optimizer", "lr", "schedule", "weight_decay")}
        elif self.method == "oe":
            if not self.init_from or not self.outliers:
                raise ValueError("outlier exposure fine-tunes a trained classifier on forged outliers: give "
                                 "--init-from CHECKPOINT and --outliers STORE")
            defaults = {"optimizer": "sgd", "lr": 1e-3, "schedule": "cosine", "weight_decay": 5e-4}
        elif self.arch.endswith("-finetune"):
            # a pretrained network (models.pretrained): a peak lr of 0.05 wipes out what ImageNet taught it
            defaults = {"optimizer": "sgd", "lr": 0.01, "schedule": "onecycle", "weight_decay": 5e-5}
        else:
            defaults = {"optimizer": "sgd", "lr": 0.05, "schedule": "onecycle", "weight_decay": 5e-4}
        chosen = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, flip=self.flip,
                           **chosen).validate()

    def objective(self, image_shape: tuple[int, int, int] | None = None):
        from . import recipes

        if recipes.is_recipe(self.method):
            if image_shape is None:
                raise ValueError(f"recipe {self.method!r} needs the training images' shape")
            outliers = None
            if self.outliers:
                from .outliers.store import OutlierStore

                outliers = OutlierStore(self.outliers).load()
            return recipes.build_objective(self.method, self.resolved_options(), image_shape, seed=self.seed,
                                           outliers=outliers, pictures_dir=cache_root() / "pictures")
        if self.method == "ssod":
            from .ssod.train import SSODObjective

            return SSODObjective(alpha=self.alpha, gamma=self.gamma, balance=self.balance,
                                 input_size=self.input_size, warmup_epochs=self.warmup_epochs, seed=self.seed)
        if self.method == "oe":
            from .oe import OutlierExposure
            from .outliers.store import OutlierStore

            return OutlierExposure(OutlierStore(self.outliers).load(), loss=self.oe_loss, lam=self.oe_lambda,
                                   m_in=self.m_in, m_out=self.m_out, seed=self.seed)
        return CrossEntropy()

    def resolved_options(self) -> dict | None:
        """A recipe's options with the papers' defaults filled in (recorded in the checkpoint's plan)."""
        from . import recipes

        if not recipes.is_recipe(self.method):
            return None
        return recipes.resolve_options(self.method, self.recipe_options, bool(self.outliers))

    def arch_to_build(self) -> str:
        """The architecture the method trains: ``ssod:<arch>`` / ``rotpred:<arch>`` wrap the backbone."""
        from . import recipes

        if self.method == "ssod":
            return f"ssod:{self.arch}"
        prefix = recipes.wrapper_prefix(self.method) if recipes.is_recipe(self.method) else None
        return f"{prefix}:{self.arch}" if prefix else self.arch


def normalisation(suite: Suite) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the ID training images (stored in the model)."""
    x = suite.id_train.images[:5000].float().div(255.0)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return tuple(mean), tuple(std)


def initialise_from(model: Classifier, checkpoint: str | Path) -> dict:
    """Copy a trained checkpoint's weights into ``model`` (before fine-tuning).

    Same architecture: every weight. A plain checkpoint into a wrapped model (SSOD, RotPred): the
    backbone (the extra head starts fresh), which is how the zoo's SSOD models start. Returns the
    source's metadata.
    """
    from .models.checkpoint import weights_hash

    src, meta = load_checkpoint(checkpoint)
    if src.num_classes != model.num_classes or src.in_channels != model.in_channels:
        raise ValueError(f"--init-from {checkpoint}: it has {src.num_classes} classes / {src.in_channels} channels, "
                         f"the model to train has {model.num_classes} / {model.in_channels}")
    target = model
    wrapped = ":" in getattr(model, "arch", "") and hasattr(model, "backbone")
    if getattr(model, "arch", "") != meta["arch"] and wrapped:
        target = model.backbone  # type: ignore[attr-defined]
    if getattr(target, "arch", "") != meta["arch"]:
        raise ValueError(f"--init-from {checkpoint} holds a {meta['arch']!r} model; the model to train is "
                         f"{getattr(model, 'arch', type(model).__name__)!r}: choose a checkpoint of that backbone")
    target.load_state_dict(src.state_dict())
    return {"checkpoint": str(checkpoint), "arch": meta["arch"], "weights_hash": weights_hash(src),
            "id_test_accuracy": meta.get("id_test_accuracy")}


def plan_forgers(plan: TrainPlan, options: dict) -> list[str]:
    """The held-out forgers whose kind of outlier a training with ``plan`` sees: the recipe's own
    (``recipes.recipe_forgers``: MixOE on class mixes) and its ``--outliers`` store's (a jigsaw or class-mix store,
    :func:`oodforge.outliers.procedural.store_forgers`), each once."""
    from . import recipes
    from .outliers.procedural import store_forgers
    from .outliers.store import OutlierStore

    seen = recipes.recipe_forgers(plan.method, options) if recipes.is_recipe(plan.method) else []
    if plan.outliers:
        seen += store_forgers(OutlierStore(plan.outliers).config)
    return list(dict.fromkeys(seen))


def train_model(suite: Suite, plan: TrainPlan, device: str = "cpu", progress: bool = True,
                state_dir: str | Path | None = None, log=None, model: Classifier | None = None) -> tuple[Classifier, dict]:
    """Train a classifier on ``suite.id_train`` with ``plan`` in the one training loop.

    ``model``: a user's own network (``train --model``, :mod:`oodforge.models.wrap`), trained as the caller built
    and loaded it (``plan.init_from`` then only records where its weights came from); default: ``plan``'s.

    The seed is set before the model is built, so the same plan gives bit-identical weights on the
    same machine and thread count. ``state_dir`` makes the run resumable per epoch.
    """
    config, objective = plan.train_config(), plan.objective(suite.id_train.image_shape)
    mean, std = normalisation(suite)
    arch = plan.arch_to_build()
    seed_everything(plan.seed)
    own = model is not None
    if not own:
        model = build_model(arch, suite.num_classes, suite.image_shape[0], mean, std)
    init = initialise_from(model, plan.init_from) if plan.init_from and not own else None
    t0 = time.time()
    history = run_training(model, suite.id_train, objective, config, device=device, progress=progress,
                           state_dir=state_dir, log=log)
    options = plan.resolved_options()
    meta = {"class_names": suite.class_names, "suite": suite.name, "train_set": suite.id_train.identity,
            "input_shape": list(suite.id_train.image_shape),
            "plan": {**plan.__dict__, "recipe_options": options},
            # the held-out forgers whose kind of outlier this training saw (protocol.trained_forgers reads it)
            "forgers": plan_forgers(plan, options),
            "train_seconds": round(time.time() - t0, 1), "init_from": init,
            "history": {k: v for k, v in history.items() if isinstance(v, (list, int, float, str, dict))}}
    return model.eval(), meta


#: the backbone the demo and the zoo use per suite (default ``small_resnet``): clip-art is a user's kind of
#: problem (real colour drawings, 1,499 training images), where an ImageNet-pretrained network fine-tuned is what
#: one would ship (benchmarks/bench_clipart.py chose it on ID validation: 77.1 % against 67.5 % for small_resnet)
SUITE_ARCH = {"clipart": "efficientnet_lite0-finetune"}
#: the training batch of those backbones (benchmarks/bench_clipart.py's setting, chosen on ID validation)
SUITE_BATCH = {"clipart": 32}


def suite_backbone(suite_name: str) -> dict:
    """The suite's backbone and batch size (:data:`SUITE_ARCH`, :data:`SUITE_BATCH`), as ``TrainPlan`` fields."""
    return {"arch": SUITE_ARCH.get(suite_name, "small_resnet"), "batch_size": SUITE_BATCH.get(suite_name, 128)}


def zoo_checkpoint(suite: Suite, plan: TrainPlan) -> Path | None:
    """The zoo folder that holds the classifier ``plan`` asks for on ``suite``, or ``None``.

    The zoo serves the default recipe only (plain, SSOD, OE, T2FNorm or ASCOOD, no explicit hyperparameters, the
    backbone the entry was trained with: ``small_resnet``, or for ``clipart`` EfficientNet-Lite0 fine-tuned, see
    :data:`SUITE_ARCH`) on the full suite it was trained on (checked by training-set identity).
    """
    from . import zoo

    custom = any(getattr(plan, f) is not None for f in ("lr", "optimizer", "schedule", "weight_decay", "init_from",
                                                         "outliers", "input_size"))
    if plan.method not in zoo.METHODS or custom or plan.seed != 0:
        return None
    return zoo.find(suite.name, plan.method, suite.id_train.identity, arch=plan.arch)


def get_model(suite: Suite, plan: TrainPlan, checkpoint: str | Path | None = None, device: str = "cpu",
              progress: bool = True, log=print, use_zoo: bool = True) -> tuple[Classifier, dict]:
    """The classifier to benchmark: ``checkpoint`` when given; else the zoo's model for the suite
    (``use_zoo``, verified by sha256); else reuse or train (and cache) the model ``plan`` describes."""
    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, device)
        if meta["num_classes"] != suite.num_classes or meta["in_channels"] != suite.image_shape[0]:
            raise ValueError(f"checkpoint {checkpoint} has {meta['num_classes']} classes / {meta['in_channels']} "
                             f"channels but suite {suite.name!r} has {suite.num_classes} / {suite.image_shape[0]}")
        return model, {**meta, "checkpoint": str(checkpoint)}
    if use_zoo and zoo_checkpoint(suite, plan) is not None:
        from .zoo import load_zoo_model

        model, meta = load_zoo_model(suite.name, plan.method, device)
        if log:
            log(f"using the zoo's {plan.method} classifier for {suite.name} ({meta['checkpoint']}; "
                f"ID test accuracy {100 * meta.get('id_test_accuracy', float('nan')):.2f} %; --retrain to train anew)")
        return model, meta
    folder = cache_root() / "models" / plan.key(suite)
    if (folder / "model.safetensors").is_file():
        model, meta = load_checkpoint(folder, device)
        if log:
            log(f"reusing {plan.method} classifier {folder}")
        return model, {**meta, "checkpoint": str(folder)}
    if log:
        log(f"training the {plan.method} {plan.arch} on {suite.name} ({len(suite.id_train)} images, "
            f"{plan.epochs} epochs)")
    model, meta = train_model(suite, plan, device, progress, state_dir=folder)
    save_checkpoint(model, folder, meta)
    if log:
        log(f"  trained in {meta['train_seconds']} s, saved to {folder}")
    return model, {**meta, "checkpoint": str(folder)}


#: source images per forging batch on the CPU variant (Layer-CAM + Telea): the outliers do not depend on it (each
#: is seeded by its index); 128 forges 1,500 fashion6 images in 8.8-11.8 s against 17.1-20.0 s at the GPU
#: pipeline's 32 (two runs each, 2 cores, session 13)
CPU_FORGE_BATCH = 128


def forge_cpu_outliers(suite: Suite, model: Classifier, k: int = 1, limit: int | None = None, seed: int = 0,
                       masker: str = "layercam", inpainter: str = "telea", device: str = "cpu",
                       progress: bool = True, log=print, split: str = "train", threshold: float = 0.2,
                       max_coverage: float = 1.0) -> tuple[ArrayDataset, Path, dict]:
    """SHIFT outliers from the ID training (or, ``split="val"``, validation) images with a swappable
    masker + inpainter (cached, resumable).

    Returns the outliers, the store folder and ``{"images_per_second", "seconds", "n"}`` for this call.
    """
    from .models.checkpoint import weights_hash
    from .synth.shift import forge_shift, make_inpainter, make_masker

    source = suite.id_val if split == "val" else suite.id_train
    if source is None:
        raise ValueError(f"suite {suite.name!r} has no {split} split to forge outliers from")
    mask_tag = f"{threshold}|{max_coverage}" if (threshold, max_coverage) != (0.2, 1.0) else ""
    key = hashlib.sha256(f"{source.identity}|{weights_hash(model)}|{masker}|{inpainter}|{k}|{limit}|{seed}{mask_tag}"
                         .encode()).hexdigest()[:12]
    folder = cache_root() / "outliers" / f"{suite.name}-{split}-{masker}-{inpainter}-k{k}-{key}"
    t0 = time.time()
    m = make_masker(masker, model=model, threshold=threshold, max_coverage=max_coverage)
    store = forge_shift(source, folder, m, make_inpainter(inpainter), k=k, seed=seed, limit=limit, device=device,
                        batch_size=CPU_FORGE_BATCH, class_names=suite.class_names, progress=progress)
    outliers = store.load()
    dt = time.time() - t0
    if log:
        log(f"{len(outliers)} SHIFT outliers ({masker} + {inpainter}, K={k}) in {folder} ({dt:.1f} s)")
    return outliers, folder, {"seconds": round(dt, 2), "n": len(outliers),
                              "images_per_second": round(len(outliers) / max(dt, 1e-9), 1)}
