"""Exact OOD-detection metrics: AUROC, AUPR-In, AUPR-Out and FPR at 95 % TPR.

Conventions (the same everywhere in oodforge, see ``docs/architecture.md``):

* a detector score is **higher for in-distribution** images;
* **ID is the positive class**: an image is *accepted* as ID when its score is ``>= t``;
* ties are handled exactly: all images sharing one score value are accepted or rejected
  together, i.e. the ROC / PR curves have one point per *distinct* score value. The numbers
  therefore equal scikit-learn's ``roc_auc_score`` and ``average_precision_score`` (step-wise AP,
  no interpolation) to floating-point rounding, also with heavily tied (e.g. integer) scores.

Every metric is derived from one counting pass (:func:`_count`): the ID and OOD scores are each
sorted once (``O(N log N)``), collapsed into distinct values with multiplicities, merged, and
cumulated, giving the number of ID and OOD images scoring ``>=`` each distinct value. All four
metrics of :func:`evaluate` share that pass.

Why the definitions are spelled out: libraries disagree. Some compute FPR95 at the first ROC
point whose TPR *exceeds* 0.95, some interpolate the ROC curve, some treat OOD as the positive
class (then "FPR" is the fraction of ID rejected), and some break ties by sample order. Here
FPR95 follows ODIN / Energy / SHIFT / SynOOD's evaluation code with exact tie handling (see
:func:`fpr_at_tpr`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["evaluate", "auroc", "fpr_at_tpr", "aupr_in", "aupr_out", "roc_curve", "METRIC_NAMES"]

METRIC_NAMES = ("auroc", "fpr95", "aupr_in", "aupr_out")


@dataclass(frozen=True)
class _Counts:
    """Cumulative counts at each distinct score value ``thresholds[k]`` (strictly decreasing).

    ``tp[k]`` = number of ID scores ``>= thresholds[k]``, ``fp[k]`` = number of OOD scores
    ``>= thresholds[k]``; ``n_id`` / ``n_ood`` are the totals (``tp[-1] == n_id``).
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_id: int
    n_ood: int


def _validate(x, what: str) -> np.ndarray:
    try:
        a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"{what}: cannot convert to a numpy array ({e})") from e
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{what}: expected numeric scores, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of scores (one per image), got shape {a.shape}; "
                         "flatten it or pass one score per image")
    if a.size == 0:
        raise ValueError(f"{what}: no scores given (empty array); every metric needs at least one ID and "
                         "one OOD score")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{what}: {bad} score(s) are NaN or infinite; fix the detector output "
                         "(e.g. clamp logits or use a log-space formula) before computing metrics")
    return a


def _runs(x_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct values (ascending) of a sorted array and how often each occurs (linear time);
    the counts are ``None`` when every value occurs once."""
    new = np.empty(x_sorted.size, dtype=bool)
    new[0] = True
    np.not_equal(x_sorted[1:], x_sorted[:-1], out=new[1:])
    if new.all():  # no ties on this side (continuous scores): skip the gather
        return x_sorted, None
    starts = np.flatnonzero(new)
    return x_sorted[starts], np.diff(np.append(starts, x_sorted.size))


def _count(id_scores, ood_scores) -> _Counts:
    """The single sorting/counting pass every metric is computed from.

    Each side is sorted once and collapsed into (distinct value, multiplicity) runs; the two run
    lists are merged with a stable sort (linear for two sorted runs, and tiny when scores are
    heavily tied); a value present on both sides is combined into one threshold; cumulative
    sums from the top give the number of ID / OOD scores ``>=`` every distinct value.
    """
    ids = np.sort(_validate(id_scores, "id_scores"))
    ood = np.sort(_validate(ood_scores, "ood_scores"))
    va, ca = _runs(ids)
    vb, cb = _runs(ood)
    values = np.concatenate((va, vb))
    order = np.argsort(values, kind="stable")
    values = values[order]
    from_id = order < va.size
    if ca is None and cb is None:
        c_id, c_ood = from_id.astype(np.int64), (~from_id).astype(np.int64)
    else:
        ca = np.ones(va.size, dtype=np.int64) if ca is None else ca
        cb = np.ones(vb.size, dtype=np.int64) if cb is None else cb
        c_id = np.concatenate((ca, np.zeros(cb.size, dtype=ca.dtype)))[order]
        c_ood = np.concatenate((np.zeros(ca.size, dtype=cb.dtype), cb))[order]
    starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
    if starts.size < values.size:  # some values occur on both sides: one threshold each
        c_id, c_ood = np.add.reduceat(c_id, starts), np.add.reduceat(c_ood, starts)
        values = values[starts]
    tp = np.cumsum(c_id[::-1], dtype=np.int64)  # thresholds decreasing: number of ID scores >= value
    fp = np.cumsum(c_ood[::-1], dtype=np.int64)
    return _Counts(values[::-1], tp, fp, int(ids.size), int(ood.size))


# --- metrics from counts --------------------------------------------------------------------

def _auroc(c: _Counts) -> float:
    # Trapezoid over the ROC points (0,0), (fp_k/N, tp_k/P), ...: each step between consecutive
    # distinct values adds dfp * (tp_prev + tp_k) / 2. Accumulated in exact integers (2*P*N fits
    # int64 for up to ~3e9 images per side), then divided once.
    tp_prev = np.concatenate(([0], c.tp[:-1]))
    dfp = np.diff(c.fp, prepend=0)
    twice_area = int(np.dot(dfp, tp_prev + c.tp))
    return twice_area / (2.0 * c.n_id * c.n_ood)


def _aupr_in(c: _Counts) -> float:
    # Average precision with ID positive: sum_k (R_k - R_{k-1}) * P_k over distinct thresholds.
    dtp = np.diff(c.tp, prepend=0)
    precision = c.tp / (c.tp + c.fp)
    return float(np.dot(dtp, precision) / c.n_id)


def _aupr_out(c: _Counts) -> float:
    # OOD positive and score -s: accepting "s <= v_k" for each distinct value v_k. With
    # tp_{k-1}, fp_{k-1} the counts at the next *larger* value (0 before the first),
    # #OOD(s <= v_k) = N - fp_{k-1}, #ID(s <= v_k) = P - tp_{k-1}, and the recall gain at v_k is
    # the number of OOD scores equal to v_k.
    tp_prev = np.concatenate(([0], c.tp[:-1]))
    fp_prev = np.concatenate(([0], c.fp[:-1]))
    dfp = c.fp - fp_prev
    pos = c.n_ood - fp_prev
    precision = pos / (pos + (c.n_id - tp_prev))
    return float(np.dot(dfp, precision) / c.n_ood)


def _fpr_at_tpr(c: _Counts, tpr: float) -> float:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    # The largest threshold t with #ID(score >= t) / P >= tpr is a distinct score value; tp is
    # non-decreasing along decreasing values, so it is the first index reaching the target.
    k = int(np.argmax(c.tp / c.n_id >= tpr))  # tp[-1] / P == 1 >= tpr, so an index exists
    return float(c.fp[k] / c.n_ood)


# --- public API -----------------------------------------------------------------------------

def evaluate(id_scores, ood_scores, tpr: float = 0.95) -> dict[str, float]:
    """AUROC, FPR@95 %TPR, AUPR-In and AUPR-Out from one sorting pass.

    Args:
        id_scores: 1-D scores of in-distribution test images (higher = more ID).
        ood_scores: 1-D scores of OOD test images.
        tpr: the TPR of the ``fpr95`` entry (kept under that key name).

    Returns:
        ``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` as Python floats in ``[0, 1]``; see
        :func:`auroc`, :func:`fpr_at_tpr`, :func:`aupr_in`, :func:`aupr_out` for the exact
        definitions (ID = positive class, ties accepted together).

    Raises:
        ValueError: empty inputs, NaN/inf scores, or inputs that are not 1-D.
    """
    c = _count(id_scores, ood_scores)
    return {"auroc": _auroc(c), "fpr95": _fpr_at_tpr(c, tpr), "aupr_in": _aupr_in(c),
            "aupr_out": _aupr_out(c)}


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, ID positive; equals ``sklearn.metrics.roc_auc_score``.

    It is the probability that a random ID image scores higher than a random OOD image, ties
    counting one half: ``P(s_id > s_ood) + 0.5 * P(s_id == s_ood)``. Equivalently the trapezoid
    area under the ROC curve with one point per distinct score value (tied scores move TPR and FPR
    together, giving a diagonal segment). 1 = perfect, 0.5 = chance, 0 = reversed.
    """
    return _auroc(_count(id_scores, ood_scores))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """False-positive rate (fraction of OOD accepted as ID) at the threshold keeping ``tpr`` of ID.

    Definition used (ODIN / Energy / SHIFT / SynOOD convention, exact ties): let
    ``t*`` be the **largest** threshold ``t`` such that the fraction of ID scores ``>= t`` is
    ``>= tpr``; the result is the fraction of OOD scores ``>= t*``. An image is accepted when
    its score is ``>= t``, so all images tied at ``t*`` are accepted together (no random or
    order-dependent tie breaking, no interpolation between ROC points). With the sklearn ROC
    curve ``fpr, tpr_, _ = roc_curve(y, s, drop_intermediate=False)`` this is
    ``fpr[argmax(tpr_ >= tpr)]``. Lower is better; ``tpr=0.95`` gives FPR95.
    """
    return _fpr_at_tpr(_count(id_scores, ood_scores), tpr)


def aupr_in(id_scores, ood_scores) -> float:
    """Area under the precision-recall curve with **ID as the positive class** (scores as given).

    Computed as average precision ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score values in
    decreasing order (step-wise, no interpolation), which equals
    ``sklearn.metrics.average_precision_score(y_id, scores)``. Chance level = fraction of ID.
    """
    return _aupr_in(_count(id_scores, ood_scores))


def aupr_out(id_scores, ood_scores) -> float:
    """Area under the precision-recall curve with **OOD as the positive class** and negated scores.

    Equals ``sklearn.metrics.average_precision_score(y_ood, -scores)``: thresholds run from the
    lowest score upwards, tied scores are again taken together. Chance level = fraction of OOD.
    """
    return _aupr_out(_count(id_scores, ood_scores))


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve (ID positive) for plotting: ``(fpr, tpr, thresholds)``.

    One point per distinct score value, thresholds decreasing, preceded by ``(0, 0)`` at
    threshold ``+inf``; point ``k`` is the fraction of OOD / ID scores ``>= thresholds[k]``.
    Matches ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    c = _count(id_scores, ood_scores)
    fpr = np.concatenate(([0.0], c.fp / c.n_ood))
    tpr = np.concatenate(([0.0], c.tp / c.n_id))
    thr = np.concatenate(([np.inf], c.thresholds))
    return fpr, tpr, thr
