"""The model zoo: trained plain, SSOD and OE classifiers for every embedded suite and the no-outlier recipe backbone
the demo runs on it (T2FNorm; ASCOOD on clipart: :data:`oodforge.demo.DEMO_RECIPES`), shipped in the package.

Each entry is a checkpoint folder ``<suite>-<method>/`` (``model.safetensors`` + ``meta.json``)
made by one recorded ``oodforge train ...`` command (``scripts/build_zoo.sh`` regenerates them
all). ``manifest.json`` records, per entry: the command, seed, training time, ID test and
validation accuracy, the training-set identity and the sha256 of the weights file.

``bench``, ``demo`` and the Python workflows use a zoo checkpoint when it matches the suite (the
same training-set identity: full suite, data seed 0) and say so; ``--retrain`` trains from
scratch instead. :func:`load_zoo_model` checks the weights' sha256 before loading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
MANIFEST = ZOO_DIR / "manifest.json"
#: the training methods the zoo holds models of (not every suite has every recipe)
METHODS = ("plain", "ssod", "oe", "t2fnorm", "ascood")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest() -> dict:
    """``{entry name: record}`` from ``manifest.json`` (empty when the zoo has not been built)."""
    if not MANIFEST.is_file():
        return {}
    try:
        return json.loads(MANIFEST.read_text())["entries"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{MANIFEST} is damaged ({e}); regenerate it with `python -m oodforge.zoo manifest`") from e


def entry_name(suite: str, method: str = "plain") -> str:
    return f"{suite}-{method}"


def find(suite: str, method: str = "plain", train_identity: str | None = None, arch: str | None = None) -> Path | None:
    """The zoo folder for ``(suite, method)``, or ``None`` when the zoo has none that matches.

    With ``train_identity``, the entry must have been trained on exactly that training set (a
    quick or re-split suite has another identity and gets no zoo model); with ``arch``, with that backbone.
    """
    rec = manifest().get(entry_name(suite, method))
    if rec is None:
        return None
    if arch is not None and rec.get("arch", "small_resnet").rpartition(":")[2] != arch:  # "ssod:<backbone>"
        return None
    if train_identity is not None and rec.get("train_set") != train_identity:
        return None
    folder = ZOO_DIR / entry_name(suite, method)
    return folder if (folder / "model.safetensors").is_file() else None


def verify(name: str) -> dict:
    """Check entry ``name``'s weights against the sha256 in the manifest; return its record."""
    rec = manifest().get(name)
    if rec is None:
        raise KeyError(f"the zoo has no entry {name!r}; entries: {', '.join(sorted(manifest())) or 'none'}")
    path = ZOO_DIR / name / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"zoo entry {name}: {path} is missing; regenerate with scripts/build_zoo.sh")
    digest = sha256_file(path)
    if digest != rec["sha256"]:
        raise ValueError(f"zoo entry {name}: {path} has sha256 {digest[:16]}..., the manifest records "
                         f"{rec['sha256'][:16]}...; the file was changed or damaged (regenerate it)")
    return rec


def load_zoo_model(suite: str, method: str = "plain", device: str = "cpu"):
    """Load the verified zoo classifier for ``(suite, method)``: ``(model, meta)``."""
    from ..models.checkpoint import load_checkpoint

    name = entry_name(suite, method)
    verify(name)
    model, meta = load_checkpoint(ZOO_DIR / name, device)
    return model, {**meta, "checkpoint": str(ZOO_DIR / name), "zoo": name}


#: the first this many ID test images are the tests' accuracy check of every entry (``check_accuracy``): the
#: sha256 already pins the weights, so the check is that loading and preprocessing give the recorded predictions;
#: a 10,000-image evaluation per entry cost the test suite 150 s of CPU
CHECK_IMAGES = 1000


def check_accuracy_of(model, suite) -> float:
    """Top-1 accuracy of ``model`` on the first :data:`CHECK_IMAGES` ID test images of ``suite``."""
    from ..models.train import accuracy

    n = min(CHECK_IMAGES, len(suite.id_test))
    return accuracy(model, suite.id_test.subset(list(range(n))))


def record_check_accuracies() -> dict[str, float]:
    """Measure :func:`check_accuracy_of` for every entry and store it in its ``meta.json``
    (``check_accuracy``), for :func:`write_manifest` to copy; returns ``{entry: accuracy}``."""
    from ..data.suites import load_suite
    from ..models.checkpoint import load_checkpoint

    out, suites = {}, {}
    for folder in sorted(p for p in ZOO_DIR.iterdir() if (p / "meta.json").is_file()):
        meta = json.loads((folder / "meta.json").read_text())
        suite = suites.setdefault(meta["suite"], load_suite(meta["suite"]))
        # the folder itself, not load_zoo_model: a new entry is not in the manifest (and its sha256) until
        # write_manifest runs after this
        model, _ = load_checkpoint(folder)
        meta["check_accuracy"] = {"images": min(CHECK_IMAGES, len(suite.id_test)),
                                  "accuracy": check_accuracy_of(model, suite)}
        tmp = folder / f"meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, folder / "meta.json")
        out[folder.name] = meta["check_accuracy"]["accuracy"]
    return out


def write_manifest() -> dict:
    """Rebuild ``manifest.json`` from the checkpoint folders present (their ``meta.json``)."""
    entries = {}
    for folder in sorted(p for p in ZOO_DIR.iterdir() if (p / "meta.json").is_file()):
        meta = json.loads((folder / "meta.json").read_text())
        weights = folder / "model.safetensors"
        entries[folder.name] = {
            "suite": meta.get("suite"), "method": meta.get("plan", {}).get("method"), "arch": meta.get("arch"),
            "command": meta.get("command"), "seed": meta.get("plan", {}).get("seed"),
            "epochs": meta.get("plan", {}).get("epochs"), "train_seconds": meta.get("train_seconds"),
            "id_test_accuracy": meta.get("id_test_accuracy"), "id_val_accuracy": meta.get("id_val_accuracy"),
            "train_set": meta.get("train_set"), "init_from": (meta.get("init_from") or {}).get("checkpoint"),
            "check_accuracy": meta.get("check_accuracy"),
            "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
        }
    tmp = MANIFEST.with_name(MANIFEST.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"entries": entries}, indent=1) + "\n")
    os.replace(tmp, MANIFEST)  # readers never see half a file
    return entries
