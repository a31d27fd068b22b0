"""Command functions for ``oodforge export`` and ``oodforge predict``.

Plain typer-annotated functions: :mod:`oodforge.cli` registers them (one CLI, no standalone copy).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..models.cli import FEATURES, HEAD, MEAN, MODEL, STD, WEIGHTS, check_model_options


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def export(
    suite: str = typer.Option(..., "--suite", help="Suite the classifier was trained on: fashion, fashion6, scenes or a suite file (*.toml) "
                              "(its ID train split fits the detector, its ID validation split calibrates the threshold)."),
    method: Optional[str] = typer.Option(None, "--method", help="One detector, with parameters as in `oodforge "
                                         "bench` (e.g. 'knn:k=10', 'shift'); or give --from-run."),
    from_run: Optional[Path] = typer.Option(None, "--from-run", help="A `oodforge bench` output folder: ship the "
                                            "detector its report.md recommends, the protocol's pick on validation "
                                            "data (docs/protocol.md); fills --method, and --checkpoint / --outliers "
                                            "when not given."),
    out: Path = typer.Option(..., "--out", help="Export folder to write, e.g. guard.oodf: new, empty or an earlier "
                             "export (whose guard files are replaced; a folder with other files is refused)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Classifier checkpoint folder (from "
                                              "`oodforge train`). Default: the one `oodforge bench` uses (zoo / cache)."),
    outliers: Optional[Path] = typer.Option(None, "--outliers", help="Outlier store (from `oodforge synth`) for "
                                            "detectors trained on synthetic outliers (shift)."),
    target: float = typer.Option(0.95, "--target", help="Target ID acceptance rate 1 - alpha: by default the "
                                 "split-conformal threshold on the ID validation images, which rejects an "
                                 "exchangeable ID image with probability <= alpha (docs/deploy.md)."),
    confidence: Optional[float] = typer.Option(None, "--confidence", help="PAC threshold instead: the ID rejection "
                                               "rate is <= 1 - target with this probability (1 - delta, e.g. 0.99) "
                                               "over the calibration draw; needs enough ID validation images."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write guard.onnx (classifier + detector as one graph; "
                              "logit/penultimate/head-based detectors, mahalanobis, vim and shift only)."),
    quick: bool = typer.Option(False, "--quick", help="The suite's quick subsets (as `oodforge bench --quick`)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with the Fashion-MNIST IDX files."),
    seed: int = typer.Option(0, "--seed", help="Suite and detector seed (as in `oodforge bench`)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ... (ONNX export needs cpu)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per forward pass."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    user_model: Optional[str] = MODEL,
    weights: Optional[Path] = WEIGHTS,
    head: str = HEAD,
    features: str = FEATURES,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
) -> None:
    """Fit one detector, calibrate its threshold on ID validation data and write a guarded classifier."""
    from ..bench import normalise_method
    from ..checks import check_device, check_out_dir
    from ..data.suites import SUITES, is_suite, load_suite
    from ..models.features import default_cache_dir
    from ..workflows import TrainPlan, get_model
    from .guard import GuardedClassifier

    if method is None or from_run is not None:
        method, checkpoint, outliers = shipped_method(from_run, method, checkpoint, outliers)
    check_device(device)
    if onnx:
        _check_onnx_installed()
    check_out_dir(out)
    if not is_suite(suite):
        raise typer.BadParameter(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)} or give a suite file "
                                 "(*.toml)", param_hint="--suite")
    method = normalise_method(method)  # "knn: k=5" is "knn:k=5"
    _check_export_method(method, outliers, onnx)
    check_model_options(user_model, checkpoint, weights, mean, std)
    if not 0 < target < 1:
        raise typer.BadParameter(f"must be in (0, 1), got {target}", param_hint="--target")
    if confidence is not None and not 0 < confidence < 1:
        raise typer.BadParameter(f"must be in (0, 1), got {confidence}", param_hint="--confidence")
    s = load_suite(suite, data_root=data_root, seed=seed, quick=quick)
    _check_calibration_size(s, target, confidence)
    if user_model is not None:
        from ..checks import check_suite_fits_model
        from ..models.cli import user_model_from_options

        model, info = user_model_from_options(user_model, weights, head, features, mean, std, s.id_train.image_shape)
        check_suite_fits_model(s, model, info, f"--model {user_model}")
    else:
        model, info = get_model(s, TrainPlan(epochs=3 if quick else 4, seed=seed), checkpoint, device, log=typer.echo)
    store = None
    if outliers is not None:
        from ..outliers.store import OutlierStore

        store = OutlierStore(outliers).load()
    t0 = time.time()
    guard = GuardedClassifier.fit(model, s, method, outliers=store, target=target, device=device,
                                  batch_size=batch_size, cache_dir=None if no_cache else default_cache_dir(),
                                  seed=seed, progress=sys.stderr.isatty(), confidence=confidence)
    guard.provenance.update({"checkpoint": info.get("checkpoint"), "zoo": info.get("zoo"), "quick": quick,
                             **{k: info[k] for k in ("user_model", "weights") if k in info},
                             "outlier_store": str(outliers) if outliers else None,
                             "command": "oodforge export " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["export"]
                                                                      else sys.argv[1:])})
    if onnx and device != "cpu":
        guard.model.cpu()
        guard.device = "cpu"
    guard.save(out, onnx=onnx)
    _echo_rates(method, guard, target, time.time() - t0)
    typer.echo(f"wrote {out}" + (" (with guard.onnx)" if onnx else ""))


def _check_calibration_size(s, target: float, confidence: Optional[float]) -> None:
    """The rule needs enough ID validation images to reject anything (checked before a model is trained)."""
    from .conformal import min_calibration_size

    n = 0 if s.id_val is None else len(s.id_val)
    need = min_calibration_size(1 - target, None if confidence is None else 1 - confidence)
    if n < need:
        rule = (f"the PAC threshold (--confidence {confidence})" if confidence is not None
                else "the split-conformal threshold")
        _fail(f"--target {target}: the suite's ID validation split has {n} images, {rule} needs at least {need} "
              "to guarantee the target (docs/deploy.md, 'Guarantees'); lower --target"
              + (" or --confidence" if confidence is not None else "") + " or use a larger suite (not --quick)")


def _check_onnx_installed() -> None:
    """``--onnx`` needs the ``onnx`` package: checked before any data is loaded or model trained."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        _fail("--onnx needs the onnx package, which is not installed: pip install onnx (or export without --onnx)")


def _check_export_method(method: str, outliers: Optional[Path], onnx: bool) -> None:
    """``--method``: a method spec (not a result key) of a detector that can be saved (and, with ``--onnx``,
    exported to ONNX), with ``--outliers`` when it trains on them; checked before any data is loaded."""
    from ..bench import parse_method
    from ..detectors import create
    from ..keys import split_key
    from .onnx import check_exportable
    from .state import SERIALISABLE, serialisable_detectors

    spec, source, label = split_key(method)
    if source is not None or label:  # a key copied from results.json / report.md (oodforge.keys)
        parts = ([f"[{source}] names the outlier store: give it with --outliers"] if source is not None else []) + \
                ([f"@{label} names the backbone: give it with --checkpoint"] if label else [])
        _fail(f"--method {method!r} is a result key; give the method spec {spec!r} ({'; '.join(parts)})")
    try:
        name, params = parse_method(method)
        det = create(name, **params)
    except (ValueError, KeyError, TypeError) as e:
        _fail(f"--method {method!r}: {e.args[0] if e.args else e}")
    if det.name not in SERIALISABLE:
        _fail(f"detector {det.name!r} cannot be exported; detectors that can: {', '.join(serialisable_detectors())}")
    if det.needs_outliers and outliers is None:
        _fail(f"method {method!r} trains on synthetic outliers: give --outliers DIR (made by `oodforge synth shift`)")
    if onnx:
        try:
            check_exportable(det)
        except ValueError as e:
            _fail(str(e))


def _echo_rates(method: str, guard, target: float, seconds: float) -> None:
    """The calibrated threshold and what it accepts: ID validation (the target), ID test, each OOD set."""
    r = guard.rates
    typer.echo(f"{method}: threshold {guard.threshold:.6g} accepts {100 * r['id_val_acceptance']:.1f} % of ID val "
               f"(target {100 * target:.1f} %), {100 * r['id_test_acceptance']:.1f} % of ID test "
               f"({seconds:.1f} s)")
    if guard.calibration:
        typer.echo(f"  guarantee: {guard.calibration['guarantee']}")
    for name_, fpr in r["ood_fpr"].items():
        typer.echo(f"  FPR on {name_:<18} {100 * fpr:6.2f} %  (accepted as ID)")


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively (symbolic links followed) for every extension the
    image-folder loaders read (:func:`oodforge.data.loaders.image_files`), so predict serves what bench reads."""
    from ..data.loaders import image_files

    return image_files(paths)


def _read_batch(files: list[Path], guard, strict: bool, skipped: list, mismatched: list):
    """The readable ``files`` and their float images, read by the guard's image pipeline (the one its
    calibration images went through); an unreadable file is reported on one line and skipped (``strict``: the
    run fails on it). ``mismatched`` collects files whose own channel count differs from the guard's."""
    import torch

    from ..data.images import DEFAULT_PIPELINE
    from ..data.loaders import load_image_file

    c, h, w = guard.image_shape
    kept, images = [], []
    for f in files:
        info: dict = {}
        try:
            images.append(load_image_file(f, c, (h, w), getattr(guard, "pipeline", DEFAULT_PIPELINE), info))
        except (ValueError, FileNotFoundError) as e:
            if strict:
                _fail(f"{e} (without --strict, unreadable files are skipped)")
            skipped.append(f)
            typer.secho(f"skipped: {e}", fg=typer.colors.YELLOW, err=True)
            continue
        kept.append(f)
        if info["channels"] != c:
            mismatched.append(f)
    return kept, (torch.stack(images) if images else None)


def _warn_inputs(files: list[Path], skipped: list[Path], mismatched: list[Path], channels: int) -> None:
    """One line each: how many files were skipped, and how many have another channel count than the guard's
    calibration images (grey images given to a colour guard, or colour to a grey one)."""
    if len(skipped) == len(files):
        _fail(f"none of the {len(files)} images could be read (see the lines above)")
    if skipped:
        typer.secho(f"warning: skipped {len(skipped)} unreadable file(s) of {len(files)} (--strict fails instead)",
                    fg=typer.colors.YELLOW, err=True)
    if mismatched:
        kind = "grey" if channels == 1 else "colour (RGB)"
        typer.secho(f"warning: {len(mismatched)} of {len(files) - len(skipped)} images (e.g. {mismatched[0]}) are "
                    f"{'colour' if channels == 1 else 'grey'}, but the guard was calibrated on {kind} images; they "
                    "were converted, and its threshold may not hold for them", fg=typer.colors.YELLOW, err=True)


def predict(
    guard: Annotated[Path, typer.Argument(help="Export folder written by `oodforge export` (e.g. guard.oodf).")],
    images: Annotated[list[Path], typer.Argument(help="PNG / JPEG files or folders (searched recursively).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line (last line: the summary).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, ...")] = "cpu",
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable file instead of "
                                         "listing and skipping it.")] = False,
    fdr: Annotated[Optional[float], typer.Option("--fdr", help="Also flag images as OOD with Benjamini-Hochberg on "
                                                 "their conformal p-values, controlling the false discovery rate "
                                                 "(share of ID images among the flagged) at this level, e.g. 0.1; "
                                                 "the output comes after all images are scored.")] = None,
) -> None:
    """Classify images or abstain: one line per image (file, class, confidence, ID score, p-value, decision)."""
    import numpy as np

    from ..progress import progress_bar
    from .conformal import benjamini_hochberg
    from .guard import GuardedClassifier

    if batch_size < 1:
        raise typer.BadParameter(f"must be >= 1, got {batch_size}", param_hint="--batch-size")
    from ..checks import check_device

    check_device(device)
    if fdr is not None and not 0 < fdr < 1:
        raise typer.BadParameter(f"must be in (0, 1), got {fdr}", param_hint="--fdr")
    try:
        g = GuardedClassifier.load(guard, device)
        files = collect_images(list(images))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if not files:
        from ..data.loaders import IMAGE_EXTENSIONS

        _fail(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in " + ", ".join(map(str, images)))
    skipped: list[Path] = []
    mismatched: list[Path] = []
    has_p = g.calibration_scores is not None
    if fdr is not None and not has_p:
        _fail(f"--fdr needs conformal p-values, but {guard} holds no calibration scores (exported by an older "
              "oodforge): re-export it with `oodforge export`")
    c, h, w = g.image_shape
    t0 = time.time()
    rows: list[dict] = []  # with --fdr: every row, printed once all p-values are known
    n_acc = 0
    bar = progress_bar(total=len(files), unit="img", desc="predict", file=sys.stderr, disable=not sys.stderr.isatty())
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        kept, x = _read_batch(chunk, g, strict, skipped, mismatched)
        bar.update(len(chunk) - len(kept))  # the skipped ones
        chunk = kept
        if x is None:
            continue
        p = g.predict(x, batch_size=batch_size)
        pv = g.p_values(p.id_score) if has_p else [None] * len(chunk)
        for j, f in enumerate(chunk):
            ok = bool(p.accepted[j])
            n_acc += ok
            row = {"file": str(f), "class": g.class_names[int(p.classes[j])], "class_index": int(p.classes[j]),
                   "confidence": float(p.confidence[j]), "id_score": float(p.id_score[j]),
                   "p_value": None if pv[j] is None else float(pv[j]), "accepted": ok}
            if fdr is not None:
                rows.append(row)
                continue
            if not bar.disable:
                bar.clear()
            typer.echo(_predict_line(row, as_json))
        bar.update(len(chunk))
    bar.close()
    _warn_inputs(files, skipped, mismatched, c)
    n_flag = None
    if fdr is not None:
        flags = benjamini_hochberg(np.array([r["p_value"] for r in rows]), fdr)
        n_flag = int(flags.sum())
        for row, flag in zip(rows, flags):
            typer.echo(_predict_line({**row, "ood_fdr": bool(flag)}, as_json))
    n = len(files) - len(skipped)
    dt = time.time() - t0
    cal = g.calibration or {}
    if as_json:
        summary = {"images": n, "accepted": n_acc, "abstained": n - n_acc, "threshold": g.threshold,
                   "target_acceptance": g.target, "rule": cal.get("rule"),
                   "rejection_bound": cal.get("rejection_bound"), "guarantee": cal.get("guarantee"),
                   "seconds": round(dt, 3)}
        if fdr is not None:
            summary.update({"fdr": fdr, "flagged_ood": n_flag})
        typer.echo(json.dumps({"summary": summary}))
    else:
        bound = f"; the guard {cal['guarantee']}" if cal.get("guarantee") else ""
        flagged = f"; BH at FDR {fdr:g} flags {n_flag} as OOD" if fdr is not None else ""
        typer.echo(f"# {n} images: {n_acc} accepted, {n - n_acc} abstained ({100 * (n - n_acc) / n:.1f} %) at "
                   f"threshold {g.threshold:.8g} ({g.detector.name}; target ID acceptance "
                   f"{100 * (g.target or 0):.1f} %{bound}){flagged}; {n / max(dt, 1e-9):.0f} images/s")
    warning = exchangeability_warning(n - n_acc, n, cal)
    if warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)


def _predict_line(row: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(row)
    p = "-" if row["p_value"] is None else f"{row['p_value']:.4g}"
    line = (f"{row['file']}\t{row['class']}\t{row['confidence']:.4f}\t{row['id_score']:.8g}\t{p}\t"
            f"{'accepted' if row['accepted'] else 'abstained'}")
    if "ood_fdr" in row:
        line += "\t" + ("flagged-ood" if row["ood_fdr"] else "-")
    return line


#: warn when a batch's rejections are this unlikely for exchangeable ID images (one-sided Beta-binomial test)
EXCHANGEABILITY_P = 1e-3


def exchangeability_warning(rejected: int, m: int, calibration: dict) -> str | None:
    """One warning line when ``rejected`` of ``m`` images is far more than exchangeable ID images give.

    Given the calibration set, each exchangeable ID image is rejected with probability
    ``R ~ Beta(k, n + 1 - k)`` (threshold = the ``k``-th smallest of ``n`` calibration scores), so the
    count is Beta-binomial; below :data:`EXCHANGEABILITY_P` the batch is not (only) exchangeable ID data.
    """
    from .conformal import batch_rejection_p_value

    k, n = calibration.get("k"), calibration.get("n")
    if not k or not n or m == 0:
        return None
    p = batch_rejection_p_value(rejected, m, k, n)
    if p >= EXCHANGEABILITY_P:
        return None
    return (f"warning: {rejected} of {m} images rejected ({100 * rejected / m:.1f} %), far more than the "
            f"{100 * k / (n + 1):.1f} % expected of ID images exchangeable with the calibration split (p = {p:.1g}): "
            "the batch holds OOD images or comes from a shifted source, where the guarantee does not hold")


def shipped_method(run: Optional[Path], method: Optional[str], checkpoint: Optional[Path],
                   outliers: Optional[Path]) -> tuple[str, Optional[Path], Optional[Path]]:
    """``(method spec, checkpoint, outlier store)`` of the detector a bench run recommends: the protocol's pick
    over every method of the run on validation numbers (:func:`oodforge.protocol.pick` with ``among="all"``,
    the same as its report.md), never the best test AUROC. Explicit ``--checkpoint`` / ``--outliers`` win."""
    import json

    from ..keys import split_key
    from ..protocol import pick

    if run is None:
        raise typer.BadParameter("give the detector to ship (e.g. --method vim), or --from-run RUN (an `oodforge "
                                 "bench` folder) to ship the protocol's pick", param_hint="--method")
    if method is not None:
        raise typer.BadParameter("give either --method or --from-run, not both", param_hint="--from-run")
    path = run / "results.json"
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"{path}: cannot read a bench run's results ({e}); give an `oodforge bench --out` "
                                 "folder", param_hint="--from-run") from None
    chosen = pick(res, among="all")
    if chosen is None:
        raise typer.BadParameter(f"{path}: the run has no validation numbers to pick on; re-run bench without "
                                 "--no-heldout-val, or give --method", param_hint="--from-run")
    spec, source, label = split_key(chosen.key)
    model = (res.get("models") or {}).get(label or "plain") or {}
    if checkpoint is None and model.get("checkpoint"):
        checkpoint = Path(model["checkpoint"])
    if outliers is None and source is not None and model.get("outlier_store"):
        outliers = Path(model["outlier_store"])
    typer.echo(f"shipping {chosen.key} from {run}: the protocol's pick, {chosen.describe()}")
    return spec, checkpoint, outliers
