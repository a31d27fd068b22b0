"""Command functions for ``oodforge synth shift``, ``jigsaw``, ``mix``, ``ascood`` and ``merge``.

Plain typer-annotated functions: :mod:`oodforge.cli` registers them (one CLI, no standalone copy).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..models.cli import FEATURES, HEAD, MEAN, MODEL, STD, WEIGHTS, check_model_options
from ..recipes.ascood import ALPHA as ASCOOD_ALPHA
from ..recipes.ascood import SHARE as ASCOOD_SHARE


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def synth_shift(
    data: str = typer.Option(..., "--data", help="ID training data: a suite name (fashion, fashion6, scenes), "
                             "a suite file (*.toml) or a path (image folder, .npz, CIFAR batches, ...)."),
    out: Path = typer.Option(..., "--out", help="Outlier store folder (created, or resumed when it exists)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="When --data is a path: resize its images "
                                             "to this size (shorter side, then centre crop); suites keep theirs."),
    masker: str = typer.Option("clipseg", "--masker", help="clipseg (SHIFT) | layercam | gradcam (KIRBY; need "
                               "--checkpoint or --model)."),
    inpainter: str = typer.Option("sd", "--inpainter", help="sd (SHIFT) | telea | ns | zero."),
    k: int = typer.Option(1, "--k", help="Outliers per ID image (K; the paper uses 1 and 8)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N ID images."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random step: outlier (i, k) gets its own seed derived from it; also the suite's seed "
                      "(quick subsets)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Do only work shard i of m ('i/m', i from 0); "
                                        "merge the shard stores with `oodforge synth merge`."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ... (fp16 only on CUDA)."),
    batch_size: int = typer.Option(32, "--batch-size", help="ID images masked and inpainted per step."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Classifier checkpoint (for layercam / "
                                              "gradcam masks)."),
    clipseg_model: str = typer.Option("CIDAS/clipseg-rd64-refined", "--clipseg-model",
                                      help="CLIPSeg hub id or local folder (model + processor, save_pretrained)."),
    inpaint_model: str = typer.Option("stabilityai/stable-diffusion-2-inpainting", "--inpaint-model",
                                      help="Stable-Diffusion inpainting hub id or local pipeline folder."),
    threshold: float = typer.Option(0.2, "--threshold", help="Mask threshold lambda on the saliency (Eq. 2/3)."),
    dilate: float = typer.Option(0.0, "--dilate", help="Dilate masks by this fraction of the image side "
                                 "(reference code: 25 px at 512 = 0.05)."),
    min_coverage: float = typer.Option(0.0, "--min-coverage", help="Skip images whose mask covers less than this "
                                       "fraction (reference code: 0.02)."),
    max_coverage: float = typer.Option(1.0, "--max-coverage", help="Where the mask covers more than this fraction, "
                                       "keep only the most salient fraction (1 = off, the paper)."),
    split: str = typer.Option("train", "--split", help="With a suite as --data: forge from its train images, or "
                              "from val (held-out forged outliers for model selection, docs/protocol.md)."),
    steps: int = typer.Option(50, "--steps", help="SD inference steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="SD classifier-free guidance scale."),
    size: int = typer.Option(512, "--size", help="SD working resolution (images are resized up, then back)."),
    sd_batch_size: int = typer.Option(8, "--sd-batch-size", help="Images per SD pipeline call."),
    radius: int = typer.Option(3, "--radius", help="Inpainting radius in pixels for telea / ns."),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="Comma-separated class names (default: "
                                              "the dataset's)."),
    shard_size: int = typer.Option(512, "--shard-size", help="Outliers per committed store shard."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder with the Fashion-MNIST files."),
    quick: bool = typer.Option(False, "--quick", help="Use the suite's small quick split."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a PNG grid of ID images and outliers."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    user_model: Optional[str] = MODEL,
    weights: Optional[Path] = WEIGHTS,
    head: str = HEAD,
    features: str = FEATURES,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
) -> None:
    """Forge SHIFT outliers (mask the ID object, inpaint the background) into a resumable outlier store."""
    from ..checks import check_positive
    from ..data.suites import load_source_data
    from ..hub import ModelUnavailableError
    from ..outliers.store import StoreError
    from .shift import forge_shift

    _check_shift_options(out, device, k, limit, batch_size, shard_size, steps, size, shard, masker, inpainter)
    check_positive(image_size, "--image-size")
    check_model_options(user_model, checkpoint, weights, mean, std)
    if masker != "clipseg" and checkpoint is None and user_model is None:
        _fail(f"--masker {masker} computes class activation maps of your classifier: pass --checkpoint DIR, or "
              "your own with --model package.module:factory")
    dataset = load_source_data(data, data_root, seed, quick, split, image_size)
    names = [s.strip() for s in class_names.split(",")] if class_names else dataset.class_names
    classifier = _classifier(dataset, data, checkpoint, (user_model, weights, head, features, mean, std), device) \
        if masker != "clipseg" else None
    m = _masker(masker, classifier, user_model, clipseg_model,
                dict(threshold=threshold, dilate=dilate, min_coverage=min_coverage, max_coverage=max_coverage,
                     device=device))
    inp = _inpainter(inpainter, inpaint_model, steps, guidance, size, sd_batch_size, radius, device)
    t0 = time.time()
    try:
        store = forge_shift(dataset, out, m, inp, k=k, seed=seed, limit=limit, shard=shard, device=device,
                            batch_size=batch_size, class_names=names, progress=progress, shard_size=shard_size)
    except (ModelUnavailableError, StoreError) as e:
        _fail(str(e))
    dt = time.time() - t0
    n, n_skip = len(store), len(store.skipped())
    typer.echo(f"{n} outliers in {out} ({n_skip} skipped for low mask coverage); this run: {dt:.1f} s")
    if grid is not None:
        from .grid import save_outlier_grid

        typer.echo(f"grid: {save_outlier_grid(dataset, store.load(), grid)}")


def _check_shift_options(out: Path, device: str, k: int, limit: Optional[int], batch_size: int, shard_size: int,
                         steps: int, size: int, shard: Optional[str], masker: str, inpainter: str) -> None:
    """The options that need no data or model, checked before anything is loaded (bad input fails first)."""
    from ..checks import check_device, check_out_dir, check_positive
    from ..outliers.store import parse_shard_spec
    from .inpaint import INPAINTERS
    from .masks import MASKERS

    check_out_dir(out)
    check_device(device)
    for value, option in ((k, "--k"), (limit, "--limit"), (batch_size, "--batch-size"), (shard_size, "--shard-size"),
                          (steps, "--steps"), (size, "--size")):
        check_positive(value, option)
    if shard is not None:
        parse_shard_spec(shard)
    if masker not in MASKERS:
        _fail(f"--masker must be one of {', '.join(MASKERS)}, got {masker!r}")
    if inpainter not in INPAINTERS:
        _fail(f"--inpainter must be one of {', '.join(INPAINTERS)}, got {inpainter!r}")


def _classifier(dataset, data: str, checkpoint: Optional[Path], user: tuple, device: str):
    """The classifier whose class activation maps make the masks: ``--checkpoint`` or the user's ``--model``
    (with ``--weights/--head/--features/--mean/--std``); it must be this data's classifier, since a CAM mask
    explains its logit of each image's label. ``None`` when neither is given."""
    from ..checks import check_images_fit, check_labels, check_model_classes
    from ..models.checkpoint import load_checkpoint

    user_model, weights, head, features, mean, std = user
    if user_model is not None:
        from ..models.cli import user_model_from_options

        model, _ = user_model_from_options(user_model, weights, head, features, mean, std, dataset.image_shape)
        meta, what = {}, f"--model {user_model}"
    elif checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, device=device)
        what = f"--checkpoint {checkpoint}"
    else:
        return None
    model.to(device)
    hw = tuple(meta["input_shape"][1:]) if meta.get("input_shape") else None
    check_images_fit(dataset, model.in_channels, hw, f"--data {data}")
    check_model_classes(meta.get("class_names"), model.num_classes, dataset.class_names, f"--data {data}", what)
    check_labels(dataset, model.num_classes, f"--data {data}")
    return model


def _masker(masker: str, classifier, user_model: Optional[str], clipseg_model: str, mopts: dict):
    """``--masker``: CLIPSeg from ``--clipseg-model``, or a CAM masker of the classifier (see :func:`_classifier`)."""
    from .masks import make_masker

    if masker == "clipseg":
        return make_masker("clipseg", model=clipseg_model, **mopts)
    from ..models.checkpoint import weights_hash

    source = f"user:{user_model}" if user_model is not None else "checkpoint"
    return make_masker(masker, model=classifier, model_id=f"{source}:{weights_hash(classifier)}", **mopts)


def _inpainter(inpainter: str, inpaint_model: str, steps: int, guidance: float, size: int, sd_batch_size: int,
               radius: int, device: str):
    """``--inpainter``: Stable Diffusion with its options, Telea / Navier-Stokes with ``--radius``, or zero fill."""
    from .inpaint import make_inpainter

    if inpainter == "sd":
        return make_inpainter("sd", model=inpaint_model, steps=steps, guidance_scale=guidance, size=size,
                              batch_size=sd_batch_size, device=device)
    if inpainter in ("telea", "ns"):
        return make_inpainter(inpainter, radius=radius)
    return make_inpainter(inpainter)


DATA = typer.Option(..., "--data", help="ID training data: a suite name (fashion, fashion6, scenes, clipart), a suite "
                    "file (*.toml) or a path (image folder, .npz, CIFAR batches, ...).")
OUT = typer.Option(..., "--out", help="Outlier store folder (created, or resumed when it exists).")
LIMIT = typer.Option(None, "--limit", help="Use only the first N ID images.")
SEED = typer.Option(0, "--seed", help="Seed: outlier i gets its own seed derived from it; also the suite's seed.")
IMAGE_SIZE = typer.Option(None, "--image-size", help="When --data is a path: resize its images to this size.")
DATA_ROOT = typer.Option(None, "--data-root", help="Folder with the Fashion-MNIST files.")
QUICK = typer.Option(False, "--quick", help="Use the suite's small quick split.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")


def _forge_procedural(kind: str, data: str, out: Path, limit, seed: int, image_size, data_root, quick: bool,
                      progress: bool, grid: int = 4) -> None:
    from ..checks import check_out_dir, check_positive
    from ..data.suites import load_source_data
    from ..outliers.procedural import forge_procedural
    from ..outliers.store import StoreError

    check_out_dir(out)
    for value, option in ((limit, "--limit"), (image_size, "--image-size"), (grid, "--grid")):
        check_positive(value, option)
    dataset = load_source_data(data, data_root, seed, quick, "train", image_size)
    t0 = time.time()
    try:
        store = forge_procedural(dataset, kind, out, seed=seed, limit=limit, grid=grid, progress=progress)
    except (StoreError, ValueError) as e:
        _fail(f"--data {data}: {e}" if isinstance(e, ValueError) else str(e))
    typer.echo(f"{len(store)} {kind} outliers in {out}; this run: {time.time() - t0:.1f} s. Train on them with "
               f"`oodforge train --method oe --outliers {out} ...`; the protocol validates that backbone only on "
               f"held-out forgers it never saw, at least two (docs/protocol.md)")


def synth_jigsaw(data: str = DATA, out: Path = OUT, grid: int = typer.Option(4, "--grid", help="Tiles per side "
                 "(the held-out forger's 4)."), limit: Optional[int] = LIMIT,
                 seed: int = SEED, image_size: Optional[int] = IMAGE_SIZE, data_root: Optional[str] = DATA_ROOT,
                 quick: bool = QUICK, progress: bool = PROGRESS) -> None:
    """Forge jigsaw outliers (each ID training image's tiles shuffled) into a resumable outlier store."""
    _forge_procedural("jigsaw", data, out, limit, seed, image_size, data_root, quick, progress, grid)


def synth_mix(data: str = DATA, out: Path = OUT, limit: Optional[int] = LIMIT, seed: int = SEED,
              image_size: Optional[int] = IMAGE_SIZE, data_root: Optional[str] = DATA_ROOT, quick: bool = QUICK,
              progress: bool = PROGRESS) -> None:
    """Forge class mixes (each ID training image averaged with one of another class) into an outlier store."""
    _forge_procedural("mix", data, out, limit, seed, image_size, data_root, quick, progress)


def synth_ascood(
    data: str = DATA, out: Path = OUT,
    checkpoint: Path = typer.Option(..., "--checkpoint", help="The classifier whose input gradients rank the pixels "
                                    "(ASCOOD's attribution): this data's."),
    p: float = typer.Option(ASCOOD_SHARE, "--p", help="Share of pixels perturbed (the authors' CIFAR-10 script: "
                            f"{ASCOOD_SHARE})."),
    op: str = typer.Option("shuffle", "--op", help="shuffle (permute the ranked pixels) | gradient (nudge them)."),
    alpha: float = typer.Option(ASCOOD_ALPHA, "--alpha", help=f"Step size of op=gradient (OpenOOD's config: "
                                f"{ASCOOD_ALPHA:g})."),
    limit: Optional[int] = LIMIT, seed: int = SEED, image_size: Optional[int] = IMAGE_SIZE,
    data_root: Optional[str] = DATA_ROOT, quick: bool = QUICK,
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    batch_size: int = typer.Option(64, "--batch-size", help="ID images per attribution step."),
) -> None:
    """Forge ASCOOD outliers (the most ID-relevant pixels of each ID image perturbed) into an outlier store."""
    from ..checks import check_device, check_out_dir, check_positive
    from ..data.suites import load_source_data
    from ..outliers.store import StoreError
    from ..recipes.ascood import check_options, forge_ascood

    check_out_dir(out)
    check_device(device)
    try:
        check_options(p, op, alpha, alpha, 1.0, 1.0,
                      names={"ascood_p": "--p", "ascood_op": "--op", "ascood_alpha_max": "--alpha",
                             "ascood_alpha_min": "--alpha"})
    except ValueError as e:
        _fail(str(e))
    for value, option in ((limit, "--limit"), (image_size, "--image-size"), (batch_size, "--batch-size")):
        check_positive(value, option)
    if not checkpoint.is_dir():
        _fail(f"--checkpoint {checkpoint}: no such checkpoint folder (a folder written by `oodforge train`)")
    dataset = load_source_data(data, data_root, seed, quick, "train", image_size)
    model = _classifier(dataset, data, checkpoint, (None, None, None, None, None, None), device)
    t0 = time.time()
    try:
        store = forge_ascood(dataset, out, model, share=p, op=op, alpha=alpha, seed=seed, limit=limit,
                             batch_size=batch_size)
    except (StoreError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"{len(store)} ascood outliers in {out}; this run: {time.time() - t0:.1f} s")


def synth_merge(
    stores: list[Path] = typer.Argument(..., help="Store folders of the work shards (`synth shift --shard i/m`)."),
    out: Path = typer.Option(..., "--out", help="Merged store folder."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Merge even if some shards are missing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Merge the outlier stores of sharded runs into one store (equal to an unsharded run)."""
    from ..outliers.store import StoreError, merge_stores

    try:
        merged = merge_stores(stores, out, allow_partial=allow_partial, progress=progress)
    except (StoreError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"{len(merged)} outliers in {out}")
