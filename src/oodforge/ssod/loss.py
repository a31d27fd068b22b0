"""The SSOD objective (Pei, ICLR 2024, Eq. 14) and its three ID/OOD balance schemes (Table 5).

    L = CE(y_hat, y) + alpha * CE(y_hat_ood, y_ood)                                 (Eq. 14)

``CE(y_hat, y)`` is the usual classification loss on the pooled logits (Eq. 11); the OOD term is a
2-way cross entropy of the per-position OOD logits (Eq. 13) against the sampler's labels (Eq. 12),
over the sampled positions only. Backgrounds give many more OOD than ID positions, so Sec. 3.3
balances the two kinds in one of three ways (``balance=``):

* ``"loss"`` -- loss-wise balance (LWB, the paper's choice): the mean CE over the ID positions and
  the mean CE over the OOD positions are computed separately and averaged. When a batch has only
  one kind, the OOD term is that kind's mean CE (the mean of the parts that exist).
* ``"weight"`` -- loss weighting (LW): the OOD positions' CE is multiplied by a fixed factor
  ``ood_weight`` (the paper gives no value; default 0.25); the weighted sum is divided by the sum
  of the weights, as ``torch.nn.functional.cross_entropy(weight=...)`` does. (A factor equal to
  the batch's ``n_ID / n_OOD`` would make this identical to LWB, so LW uses a fixed factor.)
* ``"resample"`` -- data resampling (DR): within each image, ``k = min(n_ID, n_OOD)`` positions of
  each kind are drawn at random (seeded ``generator``) and the CE is averaged over them; an image
  with only one kind contributes nothing.

With no usable position at all the OOD term is an exact zero that still belongs to the autograd
graph (no NaN from an empty mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampler import ID_LABEL, IGNORE, OOD_LABEL

BALANCE_SCHEMES = ("loss", "weight", "resample")


@dataclass
class SSODLoss:
    """The total loss of Eq. 14 and its parts (floats/ints are detached, for logging)."""

    total: torch.Tensor
    cls: torch.Tensor
    ood: torch.Tensor
    n_id: int  # ID positions sampled by Eq. 12
    n_ood: int  # OOD positions sampled by Eq. 12
    n_used_id: int  # ID positions the OOD loss actually used (differs from n_id under "resample")
    n_used_ood: int


def check_balance(balance: str) -> str:
    if balance not in BALANCE_SCHEMES:
        raise ValueError(f"balance must be one of {', '.join(BALANCE_SCHEMES)} (Table 5: loss-wise balance, "
                         f"loss weighting, data resampling), got {balance!r}")
    return balance


def _zero(like: torch.Tensor) -> torch.Tensor:
    """An exact 0 connected to ``like``'s graph, so ``backward`` works on an empty batch."""
    return like.sum() * 0.0


def resample_balanced(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Data resampling (DR): keep ``min(n_ID, n_OOD)`` random positions of each kind per image.

    Args:
        labels: ``[N, H, W]`` (or ``[N, P]``) sampler labels, 1 ID / 0 OOD / -1 ignored.
        generator: CPU ``torch.Generator`` for a reproducible draw.

    Returns:
        Labels of the same shape with the positions not drawn set to ``-1``.
    """
    n = labels.shape[0]
    flat = labels.reshape(n, -1)
    keys = torch.rand(flat.shape, generator=generator).to(flat.device)
    out = torch.full_like(flat, IGNORE)
    is_id, is_ood = flat == ID_LABEL, flat == OOD_LABEL
    k = torch.minimum(is_id.sum(1), is_ood.sum(1)).unsqueeze(1)  # [N, 1]
    for kind, mask in ((ID_LABEL, is_id), (OOD_LABEL, is_ood)):
        # rank each position among the same-kind positions of its image, in random order
        order = torch.where(mask, keys, torch.full_like(keys, 2.0)).argsort(dim=1)
        rank = order.argsort(dim=1)
        out[mask & (rank < k)] = kind
    return out.reshape(labels.shape)


def ood_loss(
    ood_map: torch.Tensor,
    ood_labels: torch.Tensor,
    balance: str = "loss",
    ood_weight: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int, int]:
    """The balanced OOD-head cross entropy ``CE(y_hat_ood, y_ood)`` of Eq. 14.

    Args:
        ood_map: ``[N, 2, H, W]`` per-position OOD logits (Eq. 13), index 1 = ID.
        ood_labels: ``[N, H, W]`` sampler labels (Eq. 12): 1 ID, 0 OOD, -1 ignored.
        balance: ``"loss"`` (LWB), ``"weight"`` (LW) or ``"resample"`` (DR), see the module doc.
        ood_weight: the LW factor on OOD positions.
        generator: random source for DR.

    Returns:
        ``(loss, n_used_id, n_used_ood)``.
    """
    check_balance(balance)
    if ood_map.ndim != 4 or ood_map.shape[1] != 2:
        raise ValueError(f"ood_map must be [N, 2, H, W] logits, got shape {tuple(ood_map.shape)}")
    if ood_labels.shape != (ood_map.shape[0], *ood_map.shape[2:]):
        raise ValueError(f"ood_labels shape {tuple(ood_labels.shape)} does not match the map {tuple(ood_map.shape)}")
    if balance == "resample":
        ood_labels = resample_balanced(ood_labels, generator)
    logits = ood_map.permute(0, 2, 3, 1).reshape(-1, 2)
    labels = ood_labels.reshape(-1).to(logits.device)
    is_id, is_ood = labels == ID_LABEL, labels == OOD_LABEL
    n_id, n_ood = int(is_id.sum()), int(is_ood.sum())
    if n_id + n_ood == 0:
        return _zero(ood_map), 0, 0
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    if balance == "loss":
        parts = [ce[m].mean() for m, k in ((is_id, n_id), (is_ood, n_ood)) if k > 0]
        loss = torch.stack(parts).mean()
    elif balance == "weight":
        if ood_weight <= 0:
            raise ValueError(f"ood_weight (loss weighting) must be > 0, got {ood_weight}")
        w = torch.where(is_ood, torch.full_like(ce, float(ood_weight)), is_id.to(ce.dtype))
        loss = (w * ce).sum() / w.sum()
    else:  # resample: plain mean over the drawn, already balanced positions
        loss = ce[is_id | is_ood].mean()
    return loss, n_id, n_ood


def ssod_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ood_map: torch.Tensor,
    ood_labels: torch.Tensor,
    alpha: float = 1.0,
    balance: str = "loss",
    ood_weight: float = 0.25,
    generator: torch.Generator | None = None,
) -> SSODLoss:
    """Eq. 14: ``CE(logits, targets) + alpha * OOD-CE`` with the chosen balance scheme (Table 5).

    Args:
        logits: ``[N, M]`` pooled classification logits (Eq. 11).
        targets: ``[N]`` ground-truth classes.
        ood_map: ``[N, 2, H, W]`` per-position OOD logits (Eq. 13).
        ood_labels: ``[N, H, W]`` labels from :func:`oodforge.ssod.sampler.sample_positions`.
        alpha: weight of the OOD term (paper: 1.0, Table 4).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    cls = F.cross_entropy(logits, targets)
    sampled = ood_labels.detach()
    n_id = int((sampled == ID_LABEL).sum())
    n_ood = int((sampled == OOD_LABEL).sum())
    ood, used_id, used_ood = ood_loss(ood_map, sampled, balance, ood_weight, generator)
    return SSODLoss(cls + alpha * ood, cls, ood, n_id, n_ood, used_id, used_ood)
