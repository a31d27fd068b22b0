"""The ``oodforge`` command line (typer). Subsystems define their command functions in their own
``cli.py`` modules (``synth``, ``ssod``, ``synood``); this module only wires them together."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="oodforge: OOD detection for image classifiers without real outlier data.")
synth_app = typer.Typer(no_args_is_help=True, help="Forge synthetic outliers into an outlier store.")
app.add_typer(synth_app, name="synth")

DATA_ROOT = typer.Option(None, "--data-root", help="Folder with the Fashion-MNIST idx files "
                         "(default: /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist).")


def _load_suite(suite: str, data_root: Optional[Path], seed: int, quick: bool):
    from .data.suites import SUITES, load_suite

    if suite not in SUITES:
        raise typer.BadParameter(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}", param_hint="--suite")
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
    suite: str = typer.Option("fashion", "--suite", help="Benchmark suite: fashion, fashion6 or scenes."),
    methods: str = typer.Option(None, "--methods", help="Comma-separated detectors, optionally with parameters "
                                "(e.g. 'msp,energy,knn:k=10,shift'). Default: every post-hoc detector."),
    out: Path = typer.Option(..., "--out", help="Output folder for results.json, scores.npz, report.md, plots/."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Classifier checkpoint folder "
                                              "(from `oodforge train`). Default: train (or reuse) the default one."),
    outliers: Optional[Path] = typer.Option(None, "--outliers", help="Outlier store (from `oodforge synth`) "
                                            "for detectors trained on synthetic outliers (shift)."),
    quick: bool = typer.Option(False, "--quick", help="Small subsets and a short training: a run in well under a minute."),
    epochs: int = typer.Option(4, "--epochs", help="Epochs when the default classifier is trained."),
    data_root: Optional[Path] = DATA_ROOT,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help="CLIP hub id or local folder for the "
                                             "CLIP detectors (mcm, neglabel, synood), e.g. openai/clip-vit-base-patch16."),
    wordnet_dir: Optional[Path] = typer.Option(None, "--wordnet-dir", help="WordNet dict folder for neglabel/synood "
                                               "(default: Debian's wordnet-base, /usr/share/wordnet)."),
) -> None:
    """Benchmark detectors on a suite and write results.json, scores.npz, report.md and plots."""
    from .bench import BenchJob, run_bench, split_methods
    from .models.features import default_cache_dir
    from .report import print_table
    from .workflows import POST_HOC, TrainPlan, get_model

    method_list = split_methods(methods) if methods else list(POST_HOC)
    _check_methods(method_list, has_outliers=outliers is not None)
    s = _load_suite(suite, data_root, seed, quick)
    model, info = get_model(s, TrainPlan(epochs=3 if quick else epochs, seed=seed), checkpoint, device,
                            log=typer.echo)
    store = None
    if outliers is not None:
        from .synth.store import OutlierStore

        store = OutlierStore(outliers).load()
    job = BenchJob(model, method_list, outliers=store,
                   info={"checkpoint": info.get("checkpoint"), "outlier_store": str(outliers) if outliers else None})
    res = run_bench(s, [job], out, device=device, cache_dir=None if no_cache else default_cache_dir(), seed=seed,
                    config={"quick": quick, "methods": method_list, "argv": sys.argv[1:]}, log=typer.echo,
                    extra={k: str(v) for k, v in (("clip_model", clip_model), ("wordnet_dir", wordnet_dir)) if v})
    print_table(res)
    typer.echo(f"report: {out / 'report.md'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    suites: str = typer.Option("fashion,fashion6,scenes", "--suites", help="Comma-separated suites."),
    quick: bool = typer.Option(False, "--quick", help="Tiny subsets and 1-epoch training (a smoke run)."),
    max_train: int = typer.Option(10000, "--max-train", help="Train on at most this many ID images (stratified)."),
    epochs: int = typer.Option(4, "--epochs", help="Epochs for the plain and the SSOD classifier."),
    k: int = typer.Option(1, "--k", help="SHIFT outliers forged per training image."),
    data_root: Optional[Path] = DATA_ROOT,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Train, forge SHIFT outliers, train SSOD, and benchmark everything on the embedded suites."""
    from .demo import run_demo

    run_demo(out, tuple(s.strip() for s in suites.split(",") if s.strip()), quick=quick, data_root=data_root,
             seed=seed, device=device, max_train=max_train, epochs=epochs, ssod_epochs=epochs, k=k, log=typer.echo)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Checkpoint folder to write."),
    suite: str = typer.Option("fashion", "--suite", help="Suite whose ID training set is used."),
    method: str = typer.Option("plain", "--method", help="plain (cross-entropy) or ssod (joint OOD head)."),
    backbone: str = typer.Option("small_resnet", "--backbone",
                                 help="small_resnet, resnet18, resnet34, wrn40_2 or densenet100."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="SSOD: resize inputs to this size "
                                             "(the paper uses 224 for 32 px CIFAR images)."),
    epochs: int = typer.Option(4, "--epochs"),
    alpha: float = typer.Option(1.0, "--alpha", help="SSOD: weight of the OOD loss (Eq. 14)."),
    gamma: float = typer.Option(0.95, "--gamma", help="SSOD: sampler confidence threshold (Eq. 12)."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Train on at most this many images."),
    quick: bool = typer.Option(False, "--quick"),
    data_root: Optional[Path] = DATA_ROOT,
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Train a classifier (plain or SSOD) on a suite's ID training set and save a checkpoint."""
    from .demo import stratified_subset
    from .models.checkpoint import save_checkpoint
    from .workflows import TrainPlan, train_model

    s = stratified_subset(_load_suite(suite, data_root, seed, quick), max_train, seed)
    plan = TrainPlan(arch=backbone, epochs=epochs, seed=seed, method=method, alpha=alpha, gamma=gamma,
                     input_size=input_size)
    model, meta = train_model(s, plan, device)
    from .models.train import accuracy

    meta["id_test_accuracy"] = accuracy(model, s.id_test, device)
    save_checkpoint(model, out, meta)
    typer.echo(f"{method} {backbone}: ID test accuracy {100 * meta['id_test_accuracy']:.2f} % "
               f"({meta['train_seconds']} s); checkpoint {out}")


@app.command("detectors")
def list_detectors() -> None:
    """List the registered detectors with their papers."""
    from .detectors import REGISTRY, available

    for name in available():
        cls = REGISTRY[name]
        flags = [f for f, on in (("inputs", cls.needs_inputs), ("outliers", cls.needs_outliers)) if on]
        typer.echo(f"{name:<14} {cls.paper}" + (f"   [needs {', '.join(flags)}]" if flags else ""))


@app.command("suites")
def list_suites() -> None:
    """List the benchmark suites."""
    from .data.suites import SUITES

    for name, desc in SUITES.items():
        typer.echo(f"{name:<10} {desc}")


def _wire() -> None:
    """Register the subsystems' command functions (their heavy imports stay inside the functions)."""
    from .ssod.cli import explain
    from .synood.cli import label_contexts, synth_synood
    from .synth.cli import synth_merge, synth_shift

    synth_app.command("shift")(synth_shift)
    synth_app.command("merge")(synth_merge)
    synth_app.command("synood")(synth_synood)
    app.command("contexts")(label_contexts)
    app.command("explain")(explain)


_wire()


def main() -> None:
    from .synth.hub import ModelUnavailableError
    from .synth.store import StoreError

    try:
        app()
    except (FileNotFoundError, ValueError, KeyError, ModelUnavailableError, StoreError) as e:  # bad input: one clear line, no traceback
        if os.environ.get("OODFORGE_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
