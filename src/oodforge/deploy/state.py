"""A fitted detector's state as flat tensors plus a JSON manifest: no pickle, no code on load.

Every fitted attribute (name ending in ``_``) of a detector is one of:

* a tensor, an ndarray or a number (Python / NumPy scalar, bool) -> a tensor in
  ``detector.safetensors`` under its dotted key (``det_a_.means_``); the manifest records the kind
  and Python type so it comes back as exactly what it was;
* ``None``, a string, or a list / tuple of numbers -> the manifest (lists also as a tensor);
* the classifier itself (``model_``) -> a reference, re-attached on load;
* the fitting device (``device_``) -> replaced by the loading device;
* another detector (``fusion``'s ``det_a_`` / ``det_b_``) -> recursively, name + params + state;
* an ``nn.Module`` whose class is listed in :data:`MODULE_BUILDERS` (SHIFT's rejection MLP) -> its
  state dict as tensors, rebuilt from the tensor shapes;
* a faiss flat index (``knn``'s ``index_``) -> its vectors, rebuilt with ``IndexFlatL2``.

Anything else cannot be written: :func:`detector_state` raises :class:`UnsupportedDetectorError`
(a ``ValueError``) naming the attribute and listing the detectors that can be.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..detectors import REGISTRY, Detector, available, create

#: the registered detectors that export (each tested in tests/test_deploy.py); others fail with a clear error. Not
#: here: ``mcm`` / ``neglabel`` (they score with a CLIP model beside the classifier, which a guard does not hold) and
#: ``synood`` (SynOOD's CLIP pipeline)
SERIALISABLE = ("adascale_a", "adascale_l", "ash", "cadref", "caref", "dice", "doctor", "energy", "entropy", "fdbd",
                "fusion", "gem", "gen", "gmm", "gradnorm", "iodin", "klm", "knn", "kpca", "mahalanobis",
                "mahalanobispp", "maxlogit", "msp", "nci", "neco", "nnguide", "nusa", "odin", "openmax", "optfs",
                "rankfeat", "react", "relation", "residual", "rmds", "rotpred", "scale", "she", "shift", "ssd", "ssod",
                "ssod-combined", "tempscale", "vim", "vra")


class UnsupportedDetectorError(ValueError):
    """A detector whose fitted state cannot be written without pickle."""


def _rejection_mlp(state: dict[str, torch.Tensor]) -> nn.Module:
    from ..synth.rejection import RejectionMLP

    w = state["fc1.weight"]
    return RejectionMLP(int(w.shape[1]), int(w.shape[0]))


#: ``"module.Class"`` -> builds an empty module of the right shape from its state dict
MODULE_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor]], nn.Module]] = {
    "oodforge.synth.rejection.RejectionMLP": _rejection_mlp,
}


def serialisable_detectors() -> list[str]:
    return [n for n in available() if n in SERIALISABLE]


def _unsupported(det_name: str, what: str) -> UnsupportedDetectorError:
    return UnsupportedDetectorError(
        f"detector {det_name!r} cannot be exported: {what}. Detectors that can: "
        f"{', '.join(serialisable_detectors())}")


def _json_value(v):
    if isinstance(v, (np.bool_, np.integer, np.floating)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def detector_params(det: Detector) -> dict:
    """The constructor parameters of ``det`` (``Detector.get_params``), checked by rebuilding it."""
    try:
        params = {k: _json_value(v) for k, v in det.get_params().items()}
    except AttributeError as e:
        raise _unsupported(det.name, str(e)) from None
    probe = create(det.name, **params)
    mine = {k: v for k, v in vars(det).items() if not k.endswith("_")}
    theirs = {k: v for k, v in vars(probe).items() if not k.endswith("_")}
    if set(mine) != set(theirs) or any(_json_value(mine[k]) != _json_value(theirs[k]) for k in mine):
        raise _unsupported(det.name, "rebuilding it from its constructor parameters does not give the same "
                           "hyperparameters")
    return params


def _is_scalar(v) -> bool:
    return isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)) and not isinstance(v, torch.Tensor)


def detector_state(det: Detector, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(manifest, tensors)`` of a fitted detector. ``model`` is the guarded classifier (stored elsewhere)."""
    if det.name not in SERIALISABLE:
        raise _unsupported(det.name, "it is not one of the detectors whose state oodforge knows how to store")
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"name": det.name, "params": detector_params(det),
                "state": _attrs_state(det, model, "", tensors)}
    return manifest, tensors


def _attrs_state(det: Detector, model: nn.Module, prefix: str, tensors: dict) -> dict:
    out = {}
    for attr, v in vars(det).items():
        if not attr.endswith("_"):
            continue
        key = prefix + attr
        out[attr] = _one(det, attr, v, model, key, tensors)
    return out


def _one(det: Detector, attr: str, v, model: nn.Module, key: str, tensors: dict) -> dict:
    if v is model:
        return {"kind": "classifier"}
    if attr == "device_":
        return {"kind": "device", "type": "torch.device" if isinstance(v, torch.device) else "str"}
    if v is None:
        return {"kind": "none"}
    if isinstance(v, str):
        return {"kind": "str", "value": v}
    if isinstance(v, torch.Tensor):
        tensors[key] = v.detach().cpu().contiguous()
        return {"kind": "tensor"}
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            raise _unsupported(det.name, f"attribute {key!r} is an object array")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(v))
        return {"kind": "ndarray"}
    if _is_scalar(v):
        tensors[key] = torch.tensor(v.item() if isinstance(v, np.generic) else v,
                                    dtype=torch.float64 if isinstance(v, (float, np.floating)) else None)
        typ = f"numpy.{np.asarray(v).dtype.name}" if isinstance(v, np.generic) else type(v).__name__
        return {"kind": "number", "type": typ}
    if isinstance(v, (list, tuple)):
        rows = list(v)
        if all(_is_scalar(x) for x in rows):
            tensors[key] = torch.tensor([float(x) for x in rows], dtype=torch.float64).reshape(len(rows))
            return {"kind": "seq", "outer": type(v).__name__, "inner": None}
        if rows and all(isinstance(x, (list, tuple)) and all(_is_scalar(y) for y in x) for x in rows) \
                and len({len(x) for x in rows}) == 1 and len({type(x) for x in rows}) == 1:
            tensors[key] = torch.tensor([[float(y) for y in x] for x in rows], dtype=torch.float64)
            return {"kind": "seq", "outer": type(v).__name__, "inner": type(rows[0]).__name__}
        if rows and all(isinstance(x, Detector) for x in rows):  # ``ssd``'s one fitted Mahalanobis per cluster
            return {"kind": "detectors", "outer": type(v).__name__,
                    "items": [_one(det, attr, x, model, f"{key}.{i}", tensors) for i, x in enumerate(rows)]}
        raise _unsupported(det.name, f"attribute {key!r} is a list of non-numbers")
    if isinstance(v, Detector):
        sub_tensors: dict[str, torch.Tensor] = {}
        sub = {"kind": "detector", "name": v.name, "params": detector_params(v),
               "state": _attrs_state(v, model, key + ".", sub_tensors)}
        if v.name not in SERIALISABLE:
            raise _unsupported(v.name, f"it is nested in {det.name!r} as {key!r}")
        tensors.update(sub_tensors)
        return sub
    if isinstance(v, nn.Module):
        cls = f"{type(v).__module__}.{type(v).__qualname__}"
        if cls not in MODULE_BUILDERS:
            raise _unsupported(det.name, f"attribute {key!r} is a {cls} (modules known: "
                               f"{', '.join(MODULE_BUILDERS)}; a reference to the guarded classifier is fine)")
        for k, t in v.state_dict().items():
            tensors[f"{key}.{k}"] = t.detach().cpu().contiguous()
        return {"kind": "module", "class": cls, "training": bool(v.training)}
    if type(v).__module__.startswith("faiss") and hasattr(v, "reconstruct_n") and type(v).__name__ == "IndexFlatL2":
        tensors[key] = torch.from_numpy(np.ascontiguousarray(v.reconstruct_n(0, v.ntotal)))
        return {"kind": "faiss_flat_l2"}
    raise _unsupported(det.name, f"attribute {key!r} is a {type(v).__module__}.{type(v).__name__}")


def restore_detector(manifest: dict, tensors: dict[str, torch.Tensor], model: nn.Module, device: str) -> Detector:
    """Rebuild a detector from :func:`detector_state`'s output; ``model`` is re-attached where it was."""
    name = manifest["name"]
    if name not in REGISTRY and name not in available():
        raise KeyError(f"unknown detector {name!r}")
    det = create(name, **manifest.get("params", {}))
    _restore_attrs(det, manifest["state"], tensors, model, device, "")
    return det


def _restore_attrs(det: Detector, state: dict, tensors: dict, model: nn.Module, device: str, prefix: str) -> None:
    for attr, spec in state.items():
        setattr(det, attr, _restore_value(det, spec, tensors, model, device, prefix + attr))


def _restore_value(det: Detector, spec: dict, tensors: dict, model: nn.Module, device: str, key: str):
    """One attribute's value from its manifest entry ``spec`` (written by :func:`_one` under ``key``)."""
    kind = spec["kind"]
    if kind == "classifier":
        v = model
    elif kind == "device":
        v = torch.device(device) if spec.get("type") == "torch.device" else str(device)
    elif kind == "none":
        v = None
    elif kind == "str":
        v = spec["value"]
    elif kind == "tensor":
        v = tensors[key]
    elif kind == "ndarray":
        v = tensors[key].numpy()
    elif kind == "number":
        t, typ = tensors[key], spec["type"]
        if typ.startswith("numpy."):
            v = np.dtype(typ[len("numpy."):]).type(t.item())
        else:
            v = {"bool": bool, "int": int, "float": float}[typ](t.item())
    elif kind == "seq":
        rows = tensors[key].tolist()
        if spec.get("inner"):
            inner = tuple if spec["inner"] == "tuple" else list
            rows = [inner(r) for r in rows]
        v = tuple(rows) if spec["outer"] == "tuple" else rows
    elif kind == "detector":
        v = create(spec["name"], **spec.get("params", {}))
        _restore_attrs(v, spec["state"], tensors, model, device, key + ".")
    elif kind == "module":
        sub = {k[len(key) + 1:]: t for k, t in tensors.items() if k.startswith(key + ".")}
        builder = MODULE_BUILDERS.get(spec["class"])
        if builder is None:
            raise ValueError(f"detector state: unknown module class {spec['class']!r} for {key!r}")
        v = builder(sub)
        v.load_state_dict(sub, strict=True)
        v = v.to(device).train(bool(spec.get("training", False)))
    elif kind == "faiss_flat_l2":
        v = _faiss_index(det, tensors[key])
    elif kind == "detectors":
        v = [_restore_value(det, item, tensors, model, device, f"{key}.{i}") for i, item in enumerate(spec["items"])]
        v = tuple(v) if spec["outer"] == "tuple" else v
    else:
        raise ValueError(f"detector state: unknown kind {kind!r} for {key!r}")
    return v


def _faiss_index(det: Detector, vectors: torch.Tensor):
    try:
        import faiss
    except ImportError:
        if det.name == "knn":  # the torch backend computes the same exact neighbours
            warnings.warn("knn was fitted with faiss, which is not installed here: scoring with the torch backend "
                          "(same neighbours, scores may differ in the last float32 digits)", stacklevel=3)
            det.backend_ = "torch"
            det.train_ = vectors.float()  # the index's vectors become the torch backend's bank
            return None
        raise ImportError(f"detector {det.name!r} holds a faiss index: `pip install faiss-cpu`") from None
    index = faiss.IndexFlatL2(int(vectors.shape[1]))
    index.add(np.ascontiguousarray(vectors.numpy(), dtype=np.float32))
    return index
