"""The self-supervised ID/OOD patch sampler of SSOD (Pei, ICLR 2024, Eq. 12).

The classification head applied to every position of the last feature map gives a confidence
map; its softmax on the *target* class at position ``i`` decides the OOD label of that position:

    y_i = 0 (OOD)      if conf_i <  1 - gamma
    y_i = 1 (ID)       if conf_i >= gamma
    y_i = ignored      otherwise (1 - gamma <= conf_i < gamma)

The inequalities are those of Eq. 12 (strict ``<`` on the OOD side). The labels are computed
under ``torch.no_grad`` from detached logits: the sampler only *reads* the classification head,
no gradient flows from it into ``f_cls`` (the OOD loss trains the backbone and ``f_ood`` only).
"""

from __future__ import annotations

import torch

ID_LABEL = 1
OOD_LABEL = 0
IGNORE = -1


def check_gamma(gamma: float) -> float:
    """Validate the confidence threshold: ``0.5 <= gamma <= 1`` keeps the ID and OOD bands apart."""
    gamma = float(gamma)
    if not 0.5 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0.5, 1] (Eq. 12 uses 0.95), got {gamma}; below 0.5 the ID band "
                         "(conf >= gamma) and the OOD band (conf < 1 - gamma) overlap")
    return gamma


@torch.no_grad()
def target_confidence(cls_map: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax confidence on each image's target class at every position.

    Args:
        cls_map: per-position classification logits ``[N, M, H, W]`` (``f_cls(X)``, Sec. 2.3).
        targets: ``[N]`` class indices (the ground truth in training; the prediction if unknown).

    Returns:
        ``[N, H, W]`` float target-confidence map ``y_hat^{H x W}``.
    """
    if cls_map.ndim != 4:
        raise ValueError(f"cls_map must be [N, M, H, W] logits, got shape {tuple(cls_map.shape)}")
    n, m = cls_map.shape[:2]
    targets = torch.as_tensor(targets, device=cls_map.device).long()
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
    if n and (targets.min() < 0 or targets.max() >= m):
        raise ValueError(f"targets must be class indices in [0, {m}); got values in "
                         f"[{int(targets.min())}, {int(targets.max())}] (unlabelled images need a predicted class)")
    probs = cls_map.detach().float().softmax(dim=1)
    idx = targets.view(n, 1, 1, 1).expand(n, 1, *cls_map.shape[2:])
    return probs.gather(1, idx).squeeze(1)


@torch.no_grad()
def sample_labels_from_confidence(conf: torch.Tensor, gamma: float = 0.95) -> torch.Tensor:
    """Eq. 12 on a target-confidence map ``[N, H, W]`` -> int64 labels (1 ID, 0 OOD, -1 ignored)."""
    gamma = check_gamma(gamma)
    labels = torch.full(conf.shape, IGNORE, dtype=torch.int64, device=conf.device)
    labels[conf < 1.0 - gamma] = OOD_LABEL
    labels[conf >= gamma] = ID_LABEL
    return labels


@torch.no_grad()
def sample_positions(cls_map: torch.Tensor, targets: torch.Tensor, gamma: float = 0.95) -> torch.Tensor:
    """The SSOD sampler (Eq. 12): per-position OOD labels from the classification confidence map.

    Args:
        cls_map: ``[N, M, H, W]`` per-position classification logits; detached here.
        targets: ``[N]`` target classes.
        gamma: confidence threshold (paper: 0.95).

    Returns:
        ``[N, H, W]`` int64: ``1`` = ID sample, ``0`` = OOD sample (background), ``-1`` = ignored.
    """
    return sample_labels_from_confidence(target_confidence(cls_map, targets), gamma)
