"""Confidence intervals for AUROC / FPR95 and for the AUROC difference of two detectors.

**Percentile bootstrap, ID and OOD resampled separately** (:func:`bootstrap_intervals`; Efron & Tibshirani
1993, ch. 13): each replicate draws ``n_id`` ID scores and ``n_ood`` OOD scores with replacement, so both
sample sizes stay fixed (a stratified bootstrap: the test sets were drawn separately). The interval at
``level`` is the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the replicates.

Vectorised: a resample is a vector of multiplicities ``w`` (how often each original score is drawn), so
every replicate reuses one sort of the original scores. With ``W`` (replicates x ID) and ``V``
(replicates x OOD) multiplicities and OOD scores sorted ascending, ``CV = cumsum(V)`` gives for every ID
score the weight of OOD scores below it (``CV[left]``) and at most it (``CV[right]``), so

    AUROC_b = sum_i W_bi (CV_b[left_i] + CV_b[right_i]) / (2 n_id n_ood)          (ties count one half)

and FPR95_b is the weighted share of OOD scores ``>=`` the largest ID score whose weighted ID share
``>=`` it reaches 0.95 (:func:`oodforge.metrics.fpr_at_tpr`'s definition). Each replicate equals
:func:`oodforge.metrics.evaluate` on the explicitly resampled arrays (tested to 1e-12); 1,000 replicates
of 5,000 + 5,000 scores take about 0.3 s on one core (docs/deploy.md, "Intervals").

**Paired comparison** (:func:`paired_auroc_difference`): two detectors scored on the *same* images are
resampled with the *same* multiplicities, so the interval of ``AUROC_a - AUROC_b`` reflects only the
disagreement between the detectors, not the luck of the test set both share. The two-sided p-value of
"no difference" is ``min(1, 2 min((1 + #{d_b <= 0}), (1 + #{d_b >= 0})) / (B + 1))``, so the interval at
level 0.95 excludes zero roughly when ``p < 0.05``. ``method="delong"`` gives DeLong et al. (1988)'s
asymptotic test instead (structural components with midranks, Sun & Xu 2014's fast algorithm).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .metrics import _validate

__all__ = ["AurocDifference", "bootstrap_counts", "bootstrap_intervals", "paired_auroc_difference",
           "weighted_auroc_fpr"]

_BLOCK = 128  # replicates per vectorised block (bounds memory at ~ _BLOCK x n floats)


def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` int32 multiplicities: row ``b`` counts how often each of ``n`` items resample ``b`` draws."""
    idx = rng.integers(0, n, size=(n_boot, n))
    idx += (np.arange(n_boot, dtype=idx.dtype) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.int32)


class _Prepared:
    """One sort of the original scores, shared by every replicate."""

    def __init__(self, id_scores, ood_scores, tpr: float):
        self.id = _validate(id_scores, "id_scores")
        self.ood = _validate(ood_scores, "ood_scores")
        self.ood_order = np.argsort(self.ood, kind="stable")
        o = self.ood[self.ood_order]
        self.left = np.searchsorted(o, self.id, side="left")  # OOD scores < each ID score
        self.right = np.searchsorted(o, self.id, side="right")  # OOD scores <= each ID score
        self.id_order = np.argsort(-self.id, kind="stable")
        self.id_desc = self.id[self.id_order]
        self.fpr_pos = np.searchsorted(o, self.id_desc, side="left")  # OOD scores < each candidate threshold
        self.tpr = float(tpr)
        # the smallest integer weight c with c / n_id >= tpr (the same float comparison as the definition)
        self.min_kept = int(np.argmax(np.arange(self.id.size + 1) / self.id.size >= self.tpr)) \
            if self.tpr <= 1 else self.id.size + 1


def _block_metrics(p: _Prepared, W: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_id, n_ood = p.id.size, p.ood.size
    # integer arithmetic throughout (counts and their sums stay far below 2**31 per row, the dot products below
    # 2**53): the same numbers as float64 sums of the same integers, with half the memory traffic
    CV = np.zeros((V.shape[0], n_ood + 1), dtype=np.int32)
    np.cumsum(V[:, p.ood_order], axis=1, out=CV[:, 1:])
    pair = CV[:, p.left] + CV[:, p.right]  # twice the weight of OOD below each ID score (ties: half)
    auroc = np.einsum("bi,bi->b", W, pair, dtype=np.int64).astype(np.float64) / (2.0 * n_id * n_ood)
    cum_id = np.cumsum(W[:, p.id_order], axis=1, dtype=np.int32)
    # first (largest) ID score keeping tpr of the ID weight: cum_id / n_id >= tpr <=> cum_id >= p.min_kept
    k = np.argmax(cum_id >= p.min_kept, axis=1)
    below = np.take_along_axis(CV, p.fpr_pos[k][:, None], axis=1)[:, 0]
    fpr = (n_ood - below) / n_ood
    return auroc, fpr


def weighted_auroc_fpr(id_scores, ood_scores, W: np.ndarray, V: np.ndarray,
                       tpr: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and FPR at ``tpr`` for every row of multiplicities ``W`` (ID) and ``V`` (OOD)."""
    p = _Prepared(id_scores, ood_scores, tpr)
    W, V = np.atleast_2d(W), np.atleast_2d(V)
    if W.shape[1] != p.id.size or V.shape[1] != p.ood.size or W.shape[0] != V.shape[0]:
        raise ValueError(f"multiplicities: expected (B, {p.id.size}) and (B, {p.ood.size}), got {W.shape} and {V.shape}")
    parts = [_block_metrics(p, W[i:i + _BLOCK], V[i:i + _BLOCK]) for i in range(0, W.shape[0], _BLOCK)]
    return np.concatenate([a for a, _ in parts]), np.concatenate([f for _, f in parts])


#: resamples are kept for reuse up to this many bytes of counts: every (method, OOD set) of a report draws the
#: same multiplicities (the stream depends only on the sizes, ``n_boot`` and the seed), so they are drawn once
_COUNTS_BYTES = 96 * 2**20


@functools.lru_cache(maxsize=2)
def _cached_counts(n_id: int, n_ood: int, n_boot: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    return tuple(_draw_counts(n_id, n_ood, n_boot, seed))


def _draw_counts(n_id: int, n_ood: int, n_boot: int, seed: int):
    """``(W, V)`` blocks of multiplicities, ID then OOD per block of ``_BLOCK`` replicates (one seeded stream)."""
    rng = np.random.default_rng(seed)
    for i in range(0, n_boot, _BLOCK):  # counts drawn block by block: same stream for any block size
        b = min(_BLOCK, n_boot - i)
        W, V = bootstrap_counts(n_id, b, rng), bootstrap_counts(n_ood, b, rng)
        W.flags.writeable = V.flags.writeable = False
        yield W, V


def _replicates(id_scores, ood_scores, n_boot: int, seed: int, tpr: float) -> tuple[np.ndarray, np.ndarray]:
    p = _Prepared(id_scores, ood_scores, tpr)
    small = 4 * n_boot * (p.id.size + p.ood.size) <= _COUNTS_BYTES
    blocks = (_cached_counts if small else _draw_counts)(p.id.size, p.ood.size, n_boot, seed)
    parts = [_block_metrics(p, W, V) for W, V in blocks]
    return np.concatenate([a for a, _ in parts]), np.concatenate([f for _, f in parts])


def _check(n_boot: int, level: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap_intervals(id_scores, ood_scores, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                        tpr: float = 0.95) -> dict[str, list[float]]:
    """Percentile-bootstrap intervals ``{"auroc": [lo, hi], "fpr95": [lo, hi]}`` (ID and OOD resampled apart)."""
    _check(n_boot, level)
    auroc, fpr = _replicates(id_scores, ood_scores, int(n_boot), seed, tpr)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {"auroc": [float(v) for v in np.percentile(auroc, q)], "fpr95": [float(v) for v in np.percentile(fpr, q)]}


class AurocDifference(NamedTuple):
    """``AUROC_a - AUROC_b`` on the same images, its interval at ``level`` and the p-value of no difference."""

    difference: float
    low: float
    high: float
    p_value: float
    method: str
    level: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero: a win (or a loss) that is more than the test set's noise."""
        return self.low > 0 or self.high < 0


def _paired_inputs(id_a, ood_a, id_b, ood_b):
    arrays = [_validate(x, w) for x, w in ((id_a, "id_a"), (ood_a, "ood_a"), (id_b, "id_b"), (ood_b, "ood_b"))]
    if arrays[0].size != arrays[2].size or arrays[1].size != arrays[3].size:
        raise ValueError("paired comparison: both detectors must score the same images (id_a / id_b and ood_a / "
                         f"ood_b of equal length), got {arrays[0].size} / {arrays[2].size} ID and "
                         f"{arrays[1].size} / {arrays[3].size} OOD scores")
    return arrays


def paired_auroc_difference(id_a, ood_a, id_b, ood_b, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                            method: str = "bootstrap") -> AurocDifference:
    """``AUROC(a) - AUROC(b)`` for two detectors' scores of the same ID and OOD images (same order).

    ``method="bootstrap"``: paired percentile bootstrap (the same resampled images for both detectors,
    ID and OOD apart); ``"delong"``: DeLong's asymptotic normal test. Returns an :class:`AurocDifference`.
    """
    from .metrics import auroc

    _check(n_boot, level)
    ia, oa, ib, ob = _paired_inputs(id_a, ood_a, id_b, ood_b)
    diff = auroc(ia, oa) - auroc(ib, ob)
    if method == "delong":
        return _delong(ia, oa, ib, ob, diff, level)
    if method != "bootstrap":
        raise ValueError(f"unknown method {method!r}; choose 'bootstrap' or 'delong'")
    pa, pb = _Prepared(ia, oa, 0.95), _Prepared(ib, ob, 0.95)
    rng = np.random.default_rng(seed)
    d = []
    for i in range(0, int(n_boot), _BLOCK):
        b = min(_BLOCK, int(n_boot) - i)
        W, V = bootstrap_counts(ia.size, b, rng), bootstrap_counts(oa.size, b, rng)
        d.append(_block_metrics(pa, W, V)[0] - _block_metrics(pb, W, V)[0])
    d = np.concatenate(d)
    lo, hi = np.percentile(d, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    p = min(1.0, 2.0 * min(1 + np.sum(d <= 0), 1 + np.sum(d >= 0)) / (d.size + 1))
    return AurocDifference(float(diff), float(lo), float(hi), float(p), "bootstrap", float(level))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (``scipy.stats.rankdata``'s default)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.concatenate(([True], xs[1:] != xs[:-1])))
    ends = np.append(starts[1:], xs.size)
    mid = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(mid, ends - starts)
    return ranks


def _delong(ia, oa, ib, ob, diff: float, level: float) -> AurocDifference:
    """DeLong et al. 1988 with midranks (Sun & Xu 2014): var(AUC_a - AUC_b) = c' (S10 / m + S01 / n) c."""
    from statistics import NormalDist

    m, n = ia.size, oa.size
    v10, v01 = [], []
    for x, y in ((ia, oa), (ib, ob)):
        tz = _midranks(np.concatenate((x, y)))  # midranks: ties count one half
        tx, ty = _midranks(x), _midranks(y)
        v10.append((tz[:m] - tx) / n)  # per ID image: share of OOD below it
        v01.append(1.0 - (tz[m:] - ty) / m)  # per OOD image: share of ID above it
    s10 = np.cov(np.vstack(v10)) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack(v01)) if n > 1 else np.zeros((2, 2))
    c = np.array([1.0, -1.0])
    var = float(c @ (s10 / m + s01 / n) @ c)
    z = NormalDist().inv_cdf((1 + level) / 2)
    if var <= 0:  # identical rankings: no variance, the difference is exactly zero
        return AurocDifference(diff, diff, diff, 1.0 if diff == 0 else 0.0, "delong", float(level))
    se = var ** 0.5
    p = float(2 * NormalDist().cdf(-abs(diff) / se))
    return AurocDifference(diff, diff - z * se, diff + z * se, p, "delong", float(level))
