"""The export folder ``NAME.oodf/`` of a guarded classifier (format version 1).

=============================  ======================================================================
file                           content
=============================  ======================================================================
``model.safetensors``          the classifier's state dict (normalisation buffers included)
``detector.safetensors``       the detector's fitted state, flattened with dotted keys
                               (``det_a_.means_``, ``net_.fc1.weight``); see :mod:`.state`
``calibration.safetensors``    the sorted ID-validation scores the threshold was set on (``scores``,
                               float64), for conformal p-values; absent in older exports (no p-values)
``guard.json``                 format + version, detector name / params / state layout, threshold,
                               target, calibration rule and guarantee, achieved rates, model
                               architecture, preprocessing, class names, provenance, the sha256 of
                               every other file and of itself
``guard.onnx``                 optional: classifier + detector as one ONNX graph (see :mod:`.onnx`)
=============================  ======================================================================

``guard.json``'s own checksum (``manifest_sha256``) is the sha256 of the canonical JSON
(sorted keys, no spaces) of the document without that field. :func:`read_guard` checks the
format, the version and every checksum before reading a tensor, and raises one
:class:`GuardFileError` (a ``ValueError``) naming the file for anything wrong. Nothing is
unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.images import DEFAULT_PIPELINE

FORMAT = "oodforge-guard"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MODEL_FILE, DETECTOR_FILE, MANIFEST_FILE, ONNX_FILE = "model.safetensors", "detector.safetensors", "guard.json", \
    "guard.onnx"
CALIBRATION_FILE = "calibration.safetensors"  # optional within format version 1 (older exports lack it)


class GuardFileError(ValueError):
    """An export folder that is corrupt, was modified after export, or has an unknown format version."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def manifest_checksum(doc: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in doc.items() if k != "manifest_sha256"})).hexdigest()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def save_guard(guard, path: str | Path, onnx: bool = False) -> Path:
    """Write ``guard`` into the folder ``path``: a new folder appears whole (written aside, then renamed); into an
    existing folder, which must be empty or oodforge's (:mod:`oodforge.outdir`), the guard's files are moved one
    by one (``guard.json`` last, so a killed export leaves a folder its checksums refuse) and no other file is
    touched: oodforge never deletes what it did not write."""
    from .. import __version__
    from ..models.checkpoint import model_meta
    from ..outdir import MARKER, is_ours
    from .state import detector_state

    out = Path(path)
    det_manifest, det_tensors = detector_state(guard.detector, guard.model)  # raises early when unsupported
    model_doc = {**model_meta(guard.model), **_user_model_meta(guard.model)}  # likewise, a model it cannot rebuild
    if onnx:
        from .onnx import check_exportable

        check_exportable(guard.detector)
    if out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise ValueError(f"{out} already holds files oodforge did not write; export into a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(_model_state(guard.model), str(tmp / MODEL_FILE))
        save_file(det_tensors, str(tmp / DETECTOR_FILE), metadata={"format": FORMAT})
        files = [MODEL_FILE, DETECTOR_FILE]
        if getattr(guard, "calibration_scores", None) is not None:
            save_file({"scores": torch.from_numpy(np.ascontiguousarray(guard.calibration_scores, np.float64))},
                      str(tmp / CALIBRATION_FILE), metadata={"format": FORMAT})
            files.append(CALIBRATION_FILE)
        onnx_info = None
        if onnx:
            from .onnx import export_onnx

            export_onnx(guard, tmp / ONNX_FILE)
            files.append(ONNX_FILE)
            c, h, w = guard.image_shape
            onnx_info = {"file": ONNX_FILE, "input": {"name": "images", "dtype": "float32", "shape": ["N", c, h, w],
                                                      "range": [0, 1]},
                         "outputs": {"logits": "float32 [N, num_classes]",
                                     "id_score": "float64 [N], accept when >= threshold"}}
        c, h, w = guard.image_shape
        doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "detector": det_manifest,
            "threshold": guard.threshold, "target_acceptance": guard.target,
            "accept_rule": "id_score >= threshold",
            "calibration": getattr(guard, "calibration", None),
            "rates": guard.rates,
            "model": model_doc,
            "preprocessing": {"image_size": [h, w], "channels": c, "layout": "NCHW", "dtype": "float32",
                              "range": [0.0, 1.0], "normalisation": "inside the model (model.mean / model.std)",
                              "resize": "area when shrinking, linear when enlarging (oodforge.data.images)",
                              "pipeline": getattr(guard, "pipeline", DEFAULT_PIPELINE).to_dict(),
                              "channel_conversion": "gray" if c == 1 else "RGB"},
            "class_names": guard.class_names,
            "provenance": {**guard.provenance, "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "exporter": f"oodforge {__version__}", "torch": torch.__version__},
            "onnx": onnx_info,
            "files": {f: sha256_file(tmp / f) for f in files},
        }
        doc = _jsonable(doc)
        doc["manifest_sha256"] = manifest_checksum(doc)
        (tmp / MANIFEST_FILE).write_text(json.dumps(doc, indent=2, allow_nan=False))
        _usual_permissions(tmp)
        if not out.exists():
            (tmp / MARKER).write_text('{"written_by": "oodforge export"}\n')
            os.replace(tmp, out)
        else:  # our files only, guard.json last; a guard.onnx of an earlier export goes when this one has none
            for f in [*files, MANIFEST_FILE]:
                os.replace(tmp / f, out / f)
            if ONNX_FILE not in files:
                (out / ONNX_FILE).unlink(missing_ok=True)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _model_state(model) -> dict:
    """The weights to save: a user's wrapped model saves its own module's state dict (the names its
    ``load_state_dict`` expects; the wrapper's view would hold the head twice)."""
    from ..models.wrap import WrappedClassifier

    module = model.module if isinstance(model, WrappedClassifier) else model
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _user_model_meta(model) -> dict:
    """For a user's model (``oodforge export --model``): how to build it again before loading the weights."""
    from ..models.wrap import WrappedClassifier

    return {"user_model": model.rebuild_spec()} if isinstance(model, WrappedClassifier) else {}


def _build_user_model(spec: dict, state: dict):
    """Import the user's factory named in the manifest (their code must be importable where the guard is
    loaded), build the module, load the saved weights and wrap it as at export time."""
    from ..models.wrap import load_user_model

    model = load_user_model(spec["factory"], None, spec["head"], spec["features"], tuple(spec["mean"]),
                            tuple(spec["std"]), tuple(spec["input_size"]))
    model.module.load_state_dict(state, strict=True)
    return model


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder: give the export the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def read_manifest(path: str | Path) -> dict:
    """``guard.json`` of an export folder, after checking format, version and every checksum."""
    folder = Path(path)
    if folder.is_file() and folder.name == MANIFEST_FILE:
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a guarded-classifier export folder (made by `oodforge export`)")
    mfile = folder / MANIFEST_FILE
    if not mfile.is_file():
        raise GuardFileError(f"{mfile} is missing: {folder} is not a complete guarded-classifier export")
    try:
        doc = json.loads(mfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GuardFileError(f"{mfile} is corrupt: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise GuardFileError(f"{mfile} is not an oodforge guard manifest (format {found!r}, expected {FORMAT!r})")
    version = doc.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise GuardFileError(f"{mfile} has format version {version!r}; this oodforge reads version(s) "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade oodforge or re-export")
    if doc.get("manifest_sha256") != manifest_checksum(doc):
        raise GuardFileError(f"{mfile} was modified after export: its checksum (manifest_sha256) does not match "
                             "its content; re-export the guarded classifier")
    files = doc.get("files") or {}
    for required in (MODEL_FILE, DETECTOR_FILE):
        if required not in files:
            raise GuardFileError(f"{mfile} lists no checksum for {required}")
    for name, digest in files.items():
        f = folder / name
        if not f.is_file():
            raise GuardFileError(f"{f} is missing (listed in {mfile})")
        if sha256_file(f) != digest:
            raise GuardFileError(f"{f} is corrupt or was modified after export: its sha256 does not match "
                                 f"{MANIFEST_FILE}; re-export the guarded classifier")
    return doc


def read_guard(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, object, dict, Path, np.ndarray | None]:
    """The verified parts of an export folder: ``(model, fitted detector, guard.json document, folder,
    calibration scores or None)``.

    :meth:`oodforge.deploy.guard.GuardedClassifier.load` assembles them (this module stays below it).
    """
    from ..models.backbones import build_model
    from .state import restore_detector

    doc = read_manifest(path)
    folder = Path(path)
    if folder.name == MANIFEST_FILE:
        folder = folder.parent
    meta = doc["model"]
    try:
        if "user_model" in meta:
            model, result = _build_user_model(meta["user_model"], load_file(str(folder / MODEL_FILE))), None
        else:
            model = build_model(meta["arch"], meta["num_classes"], meta["in_channels"], meta.get("mean"),
                                meta.get("std"))
            result = model.load_state_dict(load_file(str(folder / MODEL_FILE)), strict=False)
    except Exception as e:  # any failure here: the file does not fit the manifest
        raise GuardFileError(f"{folder / MODEL_FILE} cannot be loaded as a {meta.get('arch')!r} model: {e}") from None
    if result is not None and (result.missing_keys or result.unexpected_keys):
        raise GuardFileError(f"{folder / MODEL_FILE} does not match architecture {meta['arch']!r}: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model = model.to(device).eval()
    try:
        tensors = load_file(str(folder / DETECTOR_FILE))
        detector = restore_detector(doc["detector"], tensors, model, device)
    except ImportError:
        raise
    except Exception as e:
        raise GuardFileError(f"{folder / DETECTOR_FILE} cannot be restored as detector "
                             f"{doc['detector'].get('name')!r}: {type(e).__name__}: {e}") from None
    cal = None
    if CALIBRATION_FILE in doc["files"]:
        try:
            cal = load_file(str(folder / CALIBRATION_FILE))["scores"].numpy()
        except Exception as e:
            raise GuardFileError(f"{folder / CALIBRATION_FILE} cannot be read as calibration scores: {e}") from None
    return model, detector, doc, folder, cal
