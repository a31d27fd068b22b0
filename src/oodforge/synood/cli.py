"""Command functions of SynOOD, wired into the ``oodforge`` CLI by :mod:`oodforge.cli`:

* ``oodforge contexts`` -> :func:`label_contexts`: a VLM lists the context elements of ID images
  (Eq. 3) into a resumable JSONL file;
* ``oodforge synth synood`` -> :func:`synth_synood`: energy-guided regeneration of ID images from their
  contexts (Eqs. 4-10) into a resumable, shardable outlier store.

Both select the same ID images: all of them, or with ``--per-class N`` the N most complex images of
each class (JPEG bytes per pixel, Sec. 3.4), so their outputs line up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(data: str, data_root: Optional[str], seed: int, quick: bool, size: Optional[int]):
    """``--data``: a suite name (its ID training set) or a path; ``--size`` resizes a folder of images of
    mixed sizes (shorter side, then centre crop), e.g. an ImageNet subset."""
    from ..data.suites import is_suite, load_source_data

    if size is None or is_suite(data):
        return load_source_data(data, data_root, seed, quick)
    from ..data.loaders import load_dataset

    return load_dataset(data, split="train", size=size, data_root=data_root)


def _selection(dataset, per_class: Optional[int], limit: Optional[int]):
    import numpy as np

    from .generate import select_complex_images

    idx = select_complex_images(dataset, per_class) if per_class else np.arange(len(dataset))
    return idx[:limit] if limit is not None else idx


def label_contexts(
    data: str = typer.Option(..., "--data", help="ID training data: a suite name (fashion, fashion6, scenes), "
                             "a suite file (*.toml) or a path (image folder, .npz, CIFAR batches, ...)."),
    out: Path = typer.Option(..., "--out", help="Contexts JSONL file (created, or resumed when it exists)."),
    vlm: Optional[str] = typer.Option(None, "--vlm", help="Vision-language model: hub id (llava-hf/llava-1.5-7b-hf, "
                                      "Qwen/Qwen2-VL-7B-Instruct) or local folder (model + processor)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Only the N most complex images per class "
                                            "(JPEG bytes per pixel, SynOOD Sec. 3.4; the paper uses 50)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N selected images."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Do only work shard i of m ('i/m', i from 0)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per VLM call."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Longest answer in tokens."),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="Comma-separated class names (default: "
                                              "the dataset's)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ... (fp16 only on CUDA)."),
    size: Optional[int] = typer.Option(None, "--size", help="Resize a folder of images of mixed sizes to SIZE x SIZE "
                                       "(shorter side, centre crop), e.g. 256 for an ImageNet subset."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder with the Fashion-MNIST files."),
    quick: bool = typer.Option(False, "--quick", help="Use the suite's small quick split."),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Ask a VLM for the context elements of ID images (all but the main object; SynOOD Eq. 3) into a JSONL file."""
    from ..hub import ModelUnavailableError
    from ..outliers.store import shard_indices
    from .contexts import ContextFileError, ContextLabeller
    from .contexts import label_contexts as run

    dataset = _load(data, data_root, seed, quick, size)
    names = [s.strip() for s in class_names.split(",")] if class_names else dataset.class_names
    idx = _selection(dataset, per_class, limit)
    idx = idx[shard_indices(len(idx), shard)]
    t0 = time.time()
    try:
        labeller = ContextLabeller(vlm, device=device, max_new_tokens=max_new_tokens)
        ctx = run(dataset, out, labeller, names, idx, batch_size=batch_size, progress=progress)
    except (ModelUnavailableError, ContextFileError) as e:
        _fail(str(e))
    typer.echo(f"{len(ctx)} images labelled in {out}; this run: {time.time() - t0:.1f} s")


def synth_synood(
    data: str = typer.Option(..., "--data", help="ID training data: a suite name (fashion, fashion6, scenes), "
                             "a suite file (*.toml) or a path (image folder, .npz, CIFAR batches, ...)."),
    contexts: Path = typer.Option(..., "--contexts", help="Contexts JSONL (from `oodforge contexts`, or your own: "
                                  '{"index": i, "contexts": [...]} per line).'),
    out: Path = typer.Option(..., "--out", help="Outlier store folder (created, or resumed when it exists)."),
    sd_model: Optional[str] = typer.Option(None, "--sd-model", help="Stable-Diffusion inpainting hub id "
                                           "(stabilityai/stable-diffusion-2-inpainting) or local pipeline folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Classifier whose energy guides the "
                                              "generation (from `oodforge train`). Default: the cached default "
                                              "classifier of the suite (trained if missing)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Only the N most complex images per class "
                                            "(Sec. 3.4); must match the selection given to `oodforge contexts`."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N selected images."),
    k: int = typer.Option(1, "--k", help="Outliers per ID image."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Do only work shard i of m ('i/m', i from 0); merge "
                                        "the shard stores with `oodforge synth merge`."),
    strength: float = typer.Option(0.6, "--strength", help="Inpainting strength (paper: 0.6)."),
    steps: int = typer.Option(20, "--steps", help="Inference steps (paper: 20)."),
    iterations: int = typer.Option(3, "--iterations", help="Noise updates by the skip gradient (Eq. 10; paper: 3)."),
    step_size: float = typer.Option(10.0, "--step-size", help="r * rho of Eqs. 9-10 (paper: 10)."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    resolution: int = typer.Option(512, "--resolution", help="Generation resolution (SD 2 inpainting: 512)."),
    m_out: Optional[float] = typer.Option(None, "--m-out", help="Energy-score boundary of Eq. 7. Default: the "
                                          "--m-out-percentile of the ID training scores."),
    m_out_percentile: float = typer.Option(5.0, "--m-out-percentile", help="Percentile of ID energy scores used "
                                           "as m_out (5 = the threshold accepting 95 % of ID)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Energy temperature tau of Eq. 7."),
    loss_form: str = typer.Option("hinge", "--loss-form", help="hinge (stop at the boundary) | linear (Eq. 7 as "
                                  "printed) | squared (authors' code)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per pipeline call."),
    commit_every: int = typer.Option(32, "--commit-every", help="Outliers per committed store shard."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ... (fp16 only on CUDA)."),
    size: Optional[int] = typer.Option(None, "--size", help="Resize a folder of images of mixed sizes to SIZE x SIZE "
                                       "(shorter side, centre crop), e.g. 256 for an ImageNet subset."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder with the Fashion-MNIST files."),
    quick: bool = typer.Option(False, "--quick", help="Use the suite's small quick split."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random step (outlier (i, k) gets its own seed)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate SynOOD near-boundary outliers (energy-guided regeneration from VLM contexts) into an outlier store."""
    from ..hub import ModelUnavailableError
    from ..models.checkpoint import weights_hash
    from ..outliers.store import StoreError
    from .contexts import ContextFileError, read_contexts
    from .energy import LOSS_FORMS, default_m_out, logit_fn
    from .generate import NearBoundaryGenerator, load_inpaint_pipeline, synthesize_synood

    if loss_form not in LOSS_FORMS:
        _fail(f"--loss-form must be one of {', '.join(LOSS_FORMS)}, got {loss_form!r}")
    dataset = _load(data, data_root, seed, quick, size)
    try:
        ctx = read_contexts(contexts)
    except (FileNotFoundError, ContextFileError) as e:
        _fail(str(e))
    model = _guiding_classifier(data, checkpoint, dataset, data_root, seed, quick, device)
    size = tuple(dataset.image_shape[1:])
    fn = logit_fn(model, model.in_channels, size)
    if m_out is None:
        m_out = default_m_out(fn, dataset, m_out_percentile, temperature, device=device)
        typer.echo(f"m_out = {m_out:.4f} (the {m_out_percentile:g}th percentile of ID-train energy scores)")
    idx = _selection(dataset, per_class, limit)
    t0 = time.time()
    try:
        pipe = load_inpaint_pipeline(sd_model, device)
        gen = NearBoundaryGenerator(pipe, model, m_out, classifier_size=size, temperature=temperature,
                                    loss_form=loss_form, strength=strength, num_inference_steps=steps,
                                    iterations=iterations, step_size=step_size, guidance_scale=guidance,
                                    resolution=resolution, device=device)
        store = synthesize_synood(dataset, ctx, gen, out, indices=idx, shard=shard, k=k, batch_size=batch_size,
                                  seed=seed, commit_every=commit_every, progress=progress,
                                  config_extra={"classifier": f"weights:{weights_hash(model)}",
                                                "per_class": per_class, "limit": limit})
    except (ModelUnavailableError, StoreError) as e:
        _fail(str(e))
    typer.echo(f"{len(store)} SynOOD outliers in {out}; this run: {time.time() - t0:.1f} s")


def _guiding_classifier(data: str, checkpoint: Optional[Path], dataset, data_root: Optional[str], seed: int,
                        quick: bool, device: str):
    """The classifier whose energy guides the generation: ``--checkpoint``, or the suite's default classifier
    (cached, trained when missing); it must take ``--data``'s channels."""
    from ..data.suites import is_suite

    if checkpoint is not None:
        from ..models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(checkpoint, device=device)
    elif is_suite(data):
        from ..data.suites import load_suite
        from ..workflows import TrainPlan, get_model

        suite = load_suite(data, data_root=data_root, seed=seed, quick=quick)
        model, _ = get_model(suite, TrainPlan(epochs=1 if quick else 4, seed=seed), None, device, log=typer.echo)
    else:
        _fail("--checkpoint is required when --data is not a suite: the classifier's energy guides the generation")
    if model.in_channels != dataset.image_shape[0]:
        _fail(f"the classifier takes {model.in_channels}-channel images but --data {data} has "
              f"{dataset.image_shape[0]} channels")
    return model
