"""The SSOD model: a classifier with a second, binary ID/OOD head (Pei, ICLR 2024, Sec. 2.3).

:class:`SSODModel` wraps any :class:`~oodforge.models.base.Classifier` whose ``feature_map``
yields a ``[N, C, H, W]`` map ``X = h(x)`` and adds ``ood_head`` (``f_ood``, ``nn.Linear(C, 2)``):

* classification (Eq. 11): ``y_hat = f_cls(GAP(X))`` -- the backbone's own head, unchanged;
* confidence map (Sec. 2.3): ``f_cls`` applied, with the same weights, to every position of ``X``
  -> ``[N, M, H, W]`` logits whose softmax feeds the sampler of Eq. 12;
* OOD map (Eq. 13): ``f_ood`` applied to every position -> ``[N, 2, H, W]`` logits (training);
* OOD factor (Eq. 15): ``P(x in S_ID | x) = softmax(f_ood(GAP(X)))[:, 1]``.

Eq. 13 trains ``f_ood`` with a 2-way cross entropy (``y_hat_ood in R^{2 x H x W}``) and Eq. 15
reads it with a sigmoid; both hold at once with two logits ``(z_ood, z_id)`` because
``softmax(z)[1] = sigmoid(z_id - z_ood)``. Class index 1 is "ID", 0 is "OOD", as in Eq. 12.

Because both heads are linear, ``f(GAP(X)) = GAP(f(X))``: the pooled logits are the spatial mean
of the confidence/OOD maps. The model still *is* a Classifier (``feature_map``/``normalize``/
``head``/``pool`` delegate to the backbone), so every post-hoc detector runs on it unchanged, and
the ``ssod`` detector reads ``ood_head(FeatureSet.penultimate)`` without another forward pass.

``input_size`` (optional ``(H, W)``) bilinearly resizes inputs inside :meth:`feature_map`, the
way the paper resizes 32 px CIFAR images to 224 px "to get bigger feature maps" (App. A.3). It
is a persistent buffer, as is ``image_size`` (the size of the training images), so both survive
a ``state_dict`` round trip through ``build_model("ssod:<backbone>")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import Classifier, ExtraHeadModel


@dataclass
class SSODOutput:
    """Everything one SSOD training forward pass produces (Eqs. 11, 13, 15)."""

    logits: torch.Tensor  # [N, M]   f_cls(GAP(X)), Eq. 11
    penultimate: torch.Tensor  # [N, C]   GAP(X)
    feature_map: torch.Tensor  # [N, C, H, W]  X
    cls_map: torch.Tensor  # [N, M, H, W]  f_cls applied per position (confidence-map logits)
    ood_map: torch.Tensor  # [N, 2, H, W]  f_ood applied per position, Eq. 13
    ood_logits: torch.Tensor  # [N, 2]   f_ood(GAP(X)), Eq. 15


def apply_per_position(linear: nn.Linear, fmap: torch.Tensor) -> torch.Tensor:
    """Apply a linear head to every spatial position: ``[N, C, H, W]`` -> ``[N, out, H, W]``.

    This is ``f(X^{C x H x W})`` of Sec. 2.3 (the head "without pooling operation").
    """
    if fmap.ndim != 4:
        raise ValueError(f"expected a feature map [N, C, H, W], got shape {tuple(fmap.shape)}")
    if fmap.shape[1] != linear.in_features:
        raise ValueError(f"feature map has {fmap.shape[1]} channels but the head expects {linear.in_features}")
    out = torch.einsum("nchw,oc->nohw", fmap, linear.weight)
    if linear.bias is not None:
        out = out + linear.bias.view(1, -1, 1, 1)
    return out


def _as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be an int or (height, width) of positive ints, got {size!r}")
    return size  # type: ignore[return-value]


class SSODModel(ExtraHeadModel):
    """A backbone :class:`Classifier` plus the binary OOD head of SSOD (Eqs. 11-15).

    Args:
        backbone: any Classifier whose ``feature_map`` returns ``[N, C, H, W]`` and whose ``head``
            is ``nn.Linear(C, M)``; it keeps its own normalisation and head (``f_cls``).
        input_size: optional ``(H, W)`` (or one int) to which inputs are resized inside the model
            before the backbone (App. A.3 resizes 32 px images to 224 px); ``None`` = as given.
        ood_bias: whether ``f_ood`` has a bias term.

    The constructor takes just the backbone so that ``build_model("ssod:<arch>", ...)`` can wrap
    any backbone; ``input_size`` and ``image_size`` are buffers restored by ``load_state_dict``.
    """

    def __init__(
        self,
        backbone: Classifier,
        input_size: int | Sequence[int] | None = None,
        ood_bias: bool = True,
    ) -> None:
        self._wrap(backbone, "ssod")  # normalisation and class head stay the backbone's (f_cls of Eq. 11)
        self.ood_head = nn.Linear(backbone.feature_dim, 2, bias=ood_bias)
        self.register_buffer("input_size_", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("image_size_", torch.zeros(2, dtype=torch.int64))
        self.set_input_size(input_size)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``X = h(x)``: optional resize to ``input_size``, then the backbone's feature map."""
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return super().feature_map(x)

    # --- sizes ----------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int] | None:
        """The ``(H, W)`` inputs are resized to inside the model, or ``None``."""
        h, w = (int(v) for v in self.input_size_.tolist())
        return (h, w) if h > 0 else None

    def set_input_size(self, size: int | Sequence[int] | None) -> None:
        s = _as_size(size)
        self.input_size_.copy_(torch.tensor(s if s is not None else (0, 0), dtype=torch.int64))

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of the images the model was trained on (set by ``train_ssod``), or ``None``."""
        h, w = (int(v) for v in self.image_size_.tolist())
        return (h, w) if h > 0 else None

    def set_image_size(self, size: int | Sequence[int] | None) -> None:
        s = _as_size(size)
        self.image_size_.copy_(torch.tensor(s if s is not None else (0, 0), dtype=torch.int64))

    # --- SSOD outputs ---------------------------------------------------------------------
    def forward_ssod(self, x: torch.Tensor) -> SSODOutput:
        """One pass giving the pooled logits (Eq. 11), both per-position maps (Sec. 2.3, Eq. 13)
        and the pooled OOD logits (Eq. 15)."""
        fmap = self.feature_map(x)
        pen = self.pool(fmap)
        return SSODOutput(
            logits=self.head(pen),
            penultimate=pen,
            feature_map=fmap,
            cls_map=apply_per_position(self.head, fmap),
            ood_map=apply_per_position(self.ood_head, fmap),
            ood_logits=self.ood_head(pen),
        )

    def confidence_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the per-position classification logits, ``[N, M, H, W]`` (Sec. 2.3)."""
        return apply_per_position(self.head, self.feature_map(x)).softmax(dim=1)

    def ood_logits(self, penultimate: torch.Tensor) -> torch.Tensor:
        """``f_ood(GAP(X))`` from a pooled feature ``[N, C]`` -> ``[N, 2]`` (index 1 = ID)."""
        return self.ood_head(penultimate)

    def id_probability(self, penultimate: torch.Tensor) -> torch.Tensor:
        """The OOD factor ``P(x in S_ID | x)`` of Eq. 15 from pooled features ``[N, C]``, computed in the
        features' dtype and on their device (the detector passes float64 CPU features)."""
        w, b = self.ood_head.weight, self.ood_head.bias
        z = F.linear(penultimate, w.to(penultimate), None if b is None else b.to(penultimate))
        return z.softmax(dim=1)[:, 1]

    @torch.no_grad()
    def ood_score(self, x: torch.Tensor) -> torch.Tensor:
        """``P(x in S_ID | x)`` (Eq. 15) for a batch of ``[0, 1]`` images; higher = more ID."""
        return self.id_probability(self.pool(self.feature_map(x)))

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, image_size={self.image_size}"
