"""Result keys: how a method's key in ``results.json`` / ``scores.npz`` is formed and read back.

A key is ``<spec>[<source>]@<label>`` (docs/architecture.md, "Result keys"):

* ``spec`` -- the method as asked for (``--methods``): a detector name with its parameters,
  ``"shift"``, ``"knn:k=10"``, ``"fusion:a=shift,b=knn"``;
* ``[source]`` -- only for a method that trains on the job's forged outliers, and only when they
  were not forged the way the method's paper forges them: the forger recorded in the outlier
  store's config, ``masker+inpainter`` for a SHIFT store (``shift[layercam+telea]``: the CPU forger;
  the paper's CLIPSeg + Stable-Diffusion store keeps the plain key ``shift``), ``synood`` for a
  SynOOD store;
* ``@label`` -- the backbone the job scored with, when it is not the plain classifier
  (``energy@ssod``, ``shift[layercam+telea]@oe``). The label names the backbone only: how that
  backbone was trained (e.g. the store OE fine-tuned on) is in ``results.json``'s ``models``.

:func:`method_key` builds a key (the only place that does; :func:`oodforge.bench.run_bench` calls it),
:func:`split_key` takes one apart, so readers (report, demo summary, deploy hints, tests) never parse
keys by hand.
"""

from __future__ import annotations

#: how each outlier-trained method's paper forges its outliers (the source that gets no tag); a method
#: not listed here (e.g. ``fusion``) inherits the paper forger of the parts named in its parameters
PAPER_OUTLIER_SOURCE = {"shift": "clipseg+sd", "synood": "synood"}


def outlier_source(store_config: dict | None) -> str | None:
    """The forger of an outlier store, from its config: ``"layercam+telea"``, ``"clipseg+sd"``, ``"synood"``.

    ``None`` when unknown (outliers built in Python rather than loaded from a store).
    """
    if not store_config:
        return None
    method = store_config.get("method")
    if method == "shift":
        masker, inpainter = store_config.get("masker") or {}, store_config.get("inpainter") or {}
        return f"{masker.get('name', '?')}+{inpainter.get('name', '?')}"
    return str(method) if method else None


def _paper_source(spec: str) -> str | None:
    """The paper's outlier source of the method ``spec`` (``fusion``: that of its first part that has one)."""
    name, _, params = spec.partition(":")
    if name.strip() in PAPER_OUTLIER_SOURCE:
        return PAPER_OUTLIER_SOURCE[name.strip()]
    parts = dict(p.partition("=")[::2] for p in params.split(",") if "=" in p)
    if name.strip() == "fusion":  # the parts' defaults are those of detectors.fusion.Fusion
        for part in (parts.get("a", "shift"), parts.get("b", "knn")):
            if part.strip() in PAPER_OUTLIER_SOURCE:
                return PAPER_OUTLIER_SOURCE[part.strip()]
    return None


def method_key(spec: str, label: str = "", source: str | None = None) -> str:
    """The result key of method ``spec`` on the backbone ``label``, trained on outliers from ``source``.

    ``source`` is :func:`outlier_source` of the outliers the method trained on (``None`` when it trained
    on none); it is written into the key unless it is the method's paper's.
    """
    tag = f"[{source}]" if source is not None and source != _paper_source(spec) else ""
    return f"{spec}{tag}@{label}" if label else f"{spec}{tag}"


def split_key(key: str) -> tuple[str, str | None, str]:
    """``"shift:input=feature_map[layercam+telea]@oe"`` -> ``("shift:input=feature_map", "layercam+telea", "oe")``.

    The inverse of :func:`method_key`: the method spec (what ``--methods`` / ``--method`` accept), the
    outlier source (``None`` when the key has none) and the backbone label (``""`` for the plain one).
    """
    rest, _, label = key.partition("@")
    source = None
    if rest.endswith("]") and "[" in rest:
        rest, _, source = rest[:-1].rpartition("[")
    return rest, source, label


def detector_name(key: str) -> str:
    """The registry name of the detector behind a result key: ``"shift[layercam+telea]@oe"`` -> ``"shift"``."""
    return split_key(key)[0].split(":")[0].strip()


__all__ = ["PAPER_OUTLIER_SOURCE", "outlier_source", "method_key", "split_key", "detector_name"]
