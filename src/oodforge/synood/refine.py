"""Boundary refinement: move any generator's outliers towards the ID/OOD boundary (SynOOD Sec. 3.3 idea).

SynOOD's generator steers its outliers by the gradient of the energy loss (Eq. 7) so that they land
near the ID/OOD boundary instead of far on the OOD side, where they teach a detector little. The
same loss can refine outliers from *any* generator -- e.g. the CPU ``layercam + telea`` SHIFT forger,
whose blurred fills are trivially far from ID -- as a bounded image-space perturbation:

    x_0 = x,   x_{s+1} = clip_{[x - eps, x + eps] ∩ [0, 1]}( x_s - alpha * sign(grad_x L^O(x_s)) ),

a few signed-gradient (PGD-style) steps on the Eq. 7 loss ``L^O = m_out - S(x)`` with the hinge form
by default, so an outlier's energy score rises towards ``m_out`` from the OOD side and stops there.
The L_inf bound ``eps`` keeps the outlier's content (the perturbation is invisible at 8/255); the
result is quantised back to uint8 without leaving the bound.

``m_out`` defaults to the 5th percentile of the ID-training energy scores: the threshold at which
95 % of ID images are accepted (the FPR95 operating point).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.base import ArrayDataset
from ..progress import progress_bar
from .energy import default_m_out, energy_loss, energy_score


def refine_outliers(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: ArrayDataset,
    eps: float = 8 / 255,
    steps: int = 5,
    m_out: float | None = None,
    *,
    id_dataset: ArrayDataset | None = None,
    m_out_percentile: float = 5.0,
    step_size: float | None = None,
    temperature: float = 1.0,
    loss_form: str = "hinge",
    random_start: bool = False,
    keep_closest: bool = True,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    return_info: bool = False,
) -> ArrayDataset | tuple[ArrayDataset, dict]:
    """Refine outliers towards the energy boundary ``m_out`` within an L_inf ball of radius ``eps``.

    ``classifier`` is an oodforge Classifier (or any callable ``[0, 1] images -> logits`` taking the
    images at their stored size and channels). ``m_out`` is the Eq. 7 threshold on the energy score;
    when ``None`` it is the ``m_out_percentile``-th percentile of the scores of ``id_dataset`` (the ID
    training set). ``step_size`` defaults to ``2.5 * eps / steps`` (Madry et al.'s PGD rule).
    ``random_start`` starts from a uniform point of the ball (seeded by ``seed``). Signed steps are coarse
    and may step over the boundary; with ``keep_closest`` (default) each outlier ends at the iterate
    (the start included) whose energy score is closest to ``m_out``.

    Returns the refined outliers (same labels, class names; a new identity) and, with
    ``return_info=True``, ``{"m_out", "score_before", "score_after", "max_abs_change"}``.
    """
    _check_refine_args(images, eps, steps)
    if isinstance(classifier, torch.nn.Module):
        classifier.eval()
    m_out = _boundary(classifier, m_out, id_dataset, m_out_percentile, temperature, batch_size, device)
    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    k_max = int(np.floor(eps * 255.0 + 1e-6))  # the largest integer change that stays within eps
    g = torch.Generator().manual_seed(int(seed))  # one stream for every batch's random start

    out = torch.empty_like(images.images)
    before, after = [], []
    for i in progress_bar(range(0, len(images), batch_size), desc="refine outliers", unit="batch", disable=not progress):
        x0 = images.float_images(i, i + batch_size).to(device)
        best, s0 = _refine_batch(classifier, x0, m_out, eps, steps, alpha, temperature, loss_form, random_start,
                                 keep_closest, g, device)
        with torch.no_grad():
            q = _quantise(best, images.images[i:i + batch_size].to(device), k_max)
            out[i:i + batch_size] = q.cpu()
            if return_info:
                if s0 is None:
                    s0 = energy_score(classifier(x0).float(), temperature)
                before.append(s0.cpu())
                after.append(energy_score(classifier(q.float() / 255.0).float(), temperature).cpu())
    tag = f"refine(eps={eps:.5g},steps={steps},alpha={alpha:.5g},m_out={m_out:.6g},T={temperature:g},{loss_form}," \
          f"rs={int(random_start)},closest={int(keep_closest)},seed={seed})"
    refined = ArrayDataset(out, images.labels.clone(), images.class_names, f"{images.identity}|{tag}")
    if not return_info:
        return refined
    return refined, _refine_info(images, out, m_out, alpha, before, after)


def _check_refine_args(images, eps: float, steps: int) -> None:
    """Refuse what is not a set of outliers or not a ball / number of steps, before any forward pass."""
    if not isinstance(images, ArrayDataset):
        raise TypeError(f"refine_outliers expects an ArrayDataset of outliers, got {type(images).__name__}")
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be >= 0, got eps={eps}, steps={steps}")


def _boundary(classifier, m_out: float | None, id_dataset: ArrayDataset | None, m_out_percentile: float,
              temperature: float, batch_size: int, device) -> float:
    """``m_out`` as given, or the ``m_out_percentile``-th percentile of the ID-training energy scores."""
    if m_out is not None:
        return m_out
    if id_dataset is None:
        raise ValueError("refine_outliers: give m_out (the energy-score boundary) or id_dataset (the ID "
                         "training set) to set it at a percentile of the ID scores")
    return default_m_out(classifier, id_dataset, m_out_percentile, temperature, batch_size, device)


def _refine_batch(classifier, x0: torch.Tensor, m_out: float, eps: float, steps: int, alpha: float,
                  temperature: float, loss_form: str, random_start: bool, keep_closest: bool, g: torch.Generator,
                  device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signed-gradient steps on the Eq. 7 loss from ``x0`` (or from a uniform point of the ball, drawn from
    ``g``), each projected back onto the ``eps``-ball around ``x0`` and [0, 1].

    Returns the iterate to keep -- with ``keep_closest`` the one (start included) whose energy score is
    closest to ``m_out``, else the last -- and the start's energy scores (``None`` when never computed).
    """
    x = x0.clone()
    best, best_gap, s0 = x0.clone(), None, None
    if random_start and eps > 0:
        with torch.no_grad():
            s0 = energy_score(classifier(x0).float(), temperature)
        best_gap = (m_out - s0).abs()
        x = (x0 + (torch.rand(x0.shape, generator=g) * 2 - 1).to(device) * eps).clamp(0, 1)
    for step in range(steps + 1):  # one forward per iterate; its logits also give the gradient step
        last = step == steps
        if last and not keep_closest:
            break
        x.requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            logits = classifier(x).float()
        with torch.no_grad():
            s = energy_score(logits.detach(), temperature)
            if s0 is None:
                s0 = s
            gap = (m_out - s).abs()
            if best_gap is None:
                best_gap = gap
            elif keep_closest:
                better = gap < best_gap
                best[better] = x.detach()[better]
                best_gap = torch.where(better, gap, best_gap)
        if last:
            break
        loss = energy_loss(logits, m_out, temperature, loss_form, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x - alpha * grad.sign()
            x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0, 1)
    return (best if keep_closest else x.detach()), s0


def _quantise(best: torch.Tensor, base_uint8: torch.Tensor, k_max: int) -> torch.Tensor:
    """Back to uint8 without leaving the ball: the change of each pixel is clamped to ``k_max`` levels."""
    base = base_uint8.to(torch.int16)
    delta = (best * 255.0).round().to(torch.int16) - base
    return (base + delta.clamp(-k_max, k_max)).clamp(0, 255).to(torch.uint8)


def _refine_info(images: ArrayDataset, out: torch.Tensor, m_out: float, alpha: float, before: list, after: list) -> dict:
    """``return_info``'s dict: the boundary, the step size, energy scores before / after, the largest change."""
    return {"m_out": float(m_out), "step_size": float(alpha),
            "score_before": torch.cat(before).numpy() if before else np.zeros(0),
            "score_after": torch.cat(after).numpy() if after else np.zeros(0),
            "max_abs_change": int((out.to(torch.int16) - images.images.to(torch.int16)).abs().max()) if len(images)
            else 0}


__all__ = ["refine_outliers"]
