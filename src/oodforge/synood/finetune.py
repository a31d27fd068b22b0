"""SynOOD fine-tuning on frozen CLIP features (Secs. 3.4-3.5, Eqs. 11-14).

Both stages work on CLIP image features computed once per image set (the encoders stay frozen), so
they are cheap: a few epochs over ``[N, D]`` tensors.

* Pairing (Sec. 3.4): every synthetic outlier is paired with the negative label CLIP finds most similar
  to it (the reference code's ``ood_label_mining``: argmax over the mined negative labels). The paired
  labels form the subset ``Y*^-`` of ``M'`` labels.
* Projection (Eqs. 11-12): ``I_i = delta(F(x_i))`` with ``delta(f) = f + ReLU(LN(W f + b))`` (the reference
  code's residual projection), trained with the CLIP loss -- cross-entropy of ``sim(I_i, T_j) / tau`` over
  the ID class features and ``Y*^-`` -- on the selected ID images (target: their class) and the outliers
  (target: their paired negative label). Adam, lr 1e-3, weight decay 1e-5, batch 128, 3 epochs.
* Label features (Eqs. 13-14): the CLIP text features ``T*^neg`` of ``Y*^-`` (about half of the negative
  labels in the paper) become parameters, trained so that each outlier's frozen image feature
  ``I_i = F(x_i^syn)`` matches its paired label: cross-entropy of ``sim(I_i, T_j^neg) / tau`` over the
  ``M'`` learnable labels. SGD, lr 2e-3 (momentum 0.9, weight decay 1e-5 as in the reference code),
  batch 128, 5 epochs. The remaining negative labels stay fixed.

Which stages run, and on which features, is the ``variant`` (:data:`VARIANTS`):

* ``"table1"`` (default) -- the paper's configuration (Table 1, Table 4's last row, Table 5's best
  row: 97.01 AUROC / 14.27 FPR95): the projection is trained (Eq. 12) *and* the label features are
  trained (Eq. 14) separately, the latter on the frozen, **unprojected** features ``F(x^syn)`` (Eq. 13;
  Sec. 3.5: "We do not use the fine-tuned CLIP image encoder" for this stage). The projection is part
  of the fine-tuned image encoder and is used at scoring.
* ``"projected-labels"`` -- Table 5's other step-by-step row (96.49 / 16.18): the label features are
  trained on the projected features ``delta(F(x^syn))``; projection used at scoring.
* ``"labels-only"`` -- no projection, label features trained on ``F(x^syn)`` (a Table 4 ablation row).
* ``"projection-only"`` -- the projection, label features left at their CLIP values (a Table 4 row).
* ``"no-finetune"`` -- nothing trained: NegLabel's score (Table 4's first row, 94.21 / 25.40).

Table 5 does **not** say that scoring without the projection is best: its "Fine-Tuning with
Projection" column is about the *label-feature fine-tuning phase* ("one that incorporates the pre-trained
projection layer during the label feature fine-tuning phase, and another that excludes it"); the best
row excludes it *in that phase* and is the same 97.01 / 14.27 system as Tables 1 and 4, which uses the
projection (Table 4: best "when both the image encoder fine-tuning and negative label fine-tuning are
jointly applied"; Sec. 4.1: "adds less than 1% additional parameters" -- the projection). Table 5's
"Joint" strategy (both trained together) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VariantSpec:
    """What a SynOOD ``variant`` trains: the projection (Eq. 12; then also used at scoring) and the label
    features (Eq. 14) on ``"raw"`` image features ``F(x)`` or on ``"projected"`` ones ``delta(F(x))``."""

    projection: bool
    labels_on: str | None  # "raw", "projected" or None (label features not fine-tuned)
    paper: str


#: SynOOD's configurations, by ``variant`` name (``finetune_synood`` and the ``synood`` detector)
VARIANTS: dict[str, VariantSpec] = {
    "table1": VariantSpec(True, "raw", "Tables 1/4/5 (97.01 / 14.27): projection (Eq. 12, used at scoring) and "
                                       "label features trained separately on the unprojected features (Eq. 14)"),
    "labels-only": VariantSpec(False, "raw", "Table 4 ablation: label features only (Eq. 14), no projection"),
    "projected-labels": VariantSpec(True, "projected", "Table 5 (96.49 / 16.18): label features trained on the "
                                                       "projected features"),
    "projection-only": VariantSpec(True, None, "Table 4 ablation: projection only (Eq. 12), CLIP label features"),
    "no-finetune": VariantSpec(False, None, "Table 4 first row (94.21 / 25.40): nothing trained, NegLabel's score"),
}
DEFAULT_VARIANT = "table1"


def resolve_variant(variant: str, owner: str = "synood") -> str:
    """Check ``variant``; raises ``ValueError`` naming the option and its valid values."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"{owner}: variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    return variant


class Projection(nn.Module):
    """The residual projection layer ``delta`` of Eq. 11: ``f + ReLU(LayerNorm(Linear(f)))``, L2-normalised.

    ``f`` is the L2-normalised CLIP image feature here; the reference code feeds the raw ``encode_image``
    output, whose larger norm weighs the identity path more (docs/synood.md, "Differences from the paper").
    """

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f + self.net(f), dim=-1)


def assign_negative_labels(outlier_feats: torch.Tensor, neg_feats: torch.Tensor, batch_size: int = 4096
                           ) -> torch.Tensor:
    """Index of the most similar negative label for each synthetic outlier (Sec. 3.4 pairing)."""
    out = []
    for i in range(0, outlier_feats.shape[0], batch_size):
        out.append((outlier_feats[i:i + batch_size].float() @ neg_feats.float().T).argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def learnable_subset(assigned: torch.Tensor, num_neg: int, max_fraction: float = 0.5) -> torch.Tensor:
    """The negative labels made learnable (``Y*^-``): those paired with outliers, at most ``max_fraction``
    of all ``num_neg`` labels (the most frequently paired ones; the paper fine-tunes ~5.5k of 11k)."""
    labels, counts = torch.unique(assigned, return_counts=True)
    cap = max(1, int(max_fraction * num_neg))
    if len(labels) > cap:
        order = torch.argsort(counts, descending=True, stable=True)
        labels = torch.sort(labels[order[:cap]]).values
    return labels


@dataclass
class FinetuneResult:
    projection: Projection | None
    neg_feats: torch.Tensor  # all negative-label features, the learnable subset replaced by its trained values
    subset: torch.Tensor  # indices (into the negative labels) of Y*^-
    history: dict = field(default_factory=dict)
    variant: str = DEFAULT_VARIANT


def _batches(n: int, batch_size: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def train_projection(id_feats: torch.Tensor, id_labels: torch.Tensor, out_feats: torch.Tensor,
                     out_targets: torch.Tensor, pos_feats: torch.Tensor, subset_feats: torch.Tensor, *,
                     epochs: int = 3, lr: float = 1e-3, weight_decay: float = 1e-5, batch_size: int = 128,
                     tau: float = 0.01, seed: int = 0, device: str | torch.device = "cpu", progress: bool = False
                     ) -> tuple[Projection, list[float]]:
    """Eqs. 11-12: train the projection on ID images (class targets) and outliers (paired-label targets).

    ``out_targets`` index into ``subset_feats`` (the ``M'`` paired negative labels). The logits of an image
    are ``sim(delta(F(x)), [T_ID; T*^neg]) / tau``. Returns the projection and the mean loss per epoch.
    """
    from ..progress import progress_bar

    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    dim = id_feats.shape[1]
    proj = Projection(dim).to(device)
    text = torch.cat([pos_feats, subset_feats]).float().to(device)
    x = torch.cat([id_feats, out_feats]).float()
    y = torch.cat([id_labels.long(), out_targets.long() + pos_feats.shape[0]])
    opt = torch.optim.Adam(proj.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for _ in progress_bar(range(epochs), desc="SynOOD projection (Eq. 12)", disable=not progress, unit="epoch"):
        total, count = 0.0, 0
        for b in _batches(len(x), batch_size, g):
            xb, yb = x[b].to(device), y[b].to(device)
            loss = F.cross_entropy(proj(xb) @ text.T / tau, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            count += len(b)
        history.append(total / max(count, 1))
    return proj.eval().requires_grad_(False), history


def train_label_features(out_feats: torch.Tensor, out_targets: torch.Tensor, init_feats: torch.Tensor, *,
                         epochs: int = 5, lr: float = 2e-3, momentum: float = 0.9, weight_decay: float = 1e-5,
                         batch_size: int = 128, tau: float = 0.01, seed: int = 0, projection: Projection | None = None,
                         device: str | torch.device = "cpu", progress: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Eqs. 13-14: learn the ``M'`` negative-label features ``init_feats`` from the outliers' image features.

    The parameters are ``init_feats`` as given (the reference code trains the raw text-encoder outputs and
    normalises them in the forward pass), so their norm sets the effective step size.

    ``out_targets`` index into ``init_feats``. The image features stay frozen: ``out_feats`` as given
    (Eq. 13, ``I_i = F(x_i^syn)``: variants ``"table1"`` and ``"labels-only"``), or passed through
    ``projection`` first (Table 5's "with projection" row: variant ``"projected-labels"``). Returns the
    L2-normalised trained features and the loss per epoch.
    """
    from ..progress import progress_bar

    g = torch.Generator().manual_seed(int(seed))
    feats = nn.Parameter(init_feats.float().clone().to(device))
    opt = torch.optim.SGD([feats], lr=lr, momentum=momentum, weight_decay=weight_decay)
    x = out_feats.float()
    if projection is not None:
        with torch.no_grad():
            projection = projection.to(device)
            x = torch.cat([projection(x[i:i + 4096].to(device)).cpu() for i in range(0, len(x), 4096)])
    history = []
    for _ in progress_bar(range(epochs), desc="SynOOD label features (Eq. 14)", disable=not progress, unit="epoch"):
        total, count = 0.0, 0
        for b in _batches(len(x), batch_size, g):
            xb, yb = x[b].to(device), out_targets[b].long().to(device)
            loss = F.cross_entropy(xb @ F.normalize(feats, dim=-1).T / tau, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            count += len(b)
        history.append(total / max(count, 1))
    return F.normalize(feats.detach(), dim=-1).cpu(), history


def finetune_synood(id_feats: torch.Tensor, id_labels: torch.Tensor, out_feats: torch.Tensor,
                    pos_feats: torch.Tensor, neg_feats: torch.Tensor, *, neg_norms: torch.Tensor | None = None,
                    variant: str = DEFAULT_VARIANT, max_learnable_fraction: float = 0.5, tau: float = 0.01,
                    proj_epochs: int = 3, proj_lr: float = 1e-3, proj_weight_decay: float = 1e-5,
                    label_epochs: int = 5, label_lr: float = 2e-3, label_momentum: float = 0.9,
                    label_weight_decay: float = 1e-5, batch_size: int = 128, seed: int = 0,
                    device: str | torch.device = "cpu", progress: bool = False) -> FinetuneResult:
    """The whole of Secs. 3.4-3.5 on precomputed, L2-normalised CLIP features (separate training, Table 5).

    Pairs the outliers with negative labels, then, as ``variant`` says (:data:`VARIANTS`; default
    ``"table1"``, the paper's configuration): trains the projection (Eq. 12) and/or the paired labels'
    features (Eq. 14) -- on the raw features ``out_feats`` for ``"table1"`` / ``"labels-only"``, on the
    projected ones for ``"projected-labels"``. The two stages are independent except in
    ``"projected-labels"``. ``neg_norms`` are the norms of the raw text-encoder outputs: as in the
    reference code, the learnable parameters are the raw (unnormalised) features, so the effective step of
    lr 2e-3 is the paper's.
    """
    variant = resolve_variant(variant, "finetune_synood")
    spec = VARIANTS[variant]
    if len(out_feats) == 0:
        raise ValueError("SynOOD fine-tuning needs synthetic outliers (an outlier store with at least one image)")
    assigned = assign_negative_labels(out_feats, neg_feats)
    subset = learnable_subset(assigned, len(neg_feats), max_learnable_fraction)
    sub_feats = neg_feats[subset]
    # outliers paired with a label outside the capped subset are re-paired within it
    targets = assign_negative_labels(out_feats, sub_feats)
    history: dict = {"num_learnable": int(len(subset)), "num_neg": int(len(neg_feats))}
    proj = None
    if spec.projection:
        proj, history["projection_loss"] = train_projection(
            id_feats, id_labels, out_feats, targets, pos_feats, sub_feats, epochs=proj_epochs, lr=proj_lr,
            weight_decay=proj_weight_decay, batch_size=batch_size, tau=tau, seed=seed, device=device,
            progress=progress)
    new_neg = neg_feats.clone().float()
    if spec.labels_on is not None:
        init = sub_feats * neg_norms[subset].unsqueeze(1) if neg_norms is not None else sub_feats
        trained, history["label_loss"] = train_label_features(
            out_feats, targets, init, epochs=label_epochs, lr=label_lr, momentum=label_momentum,
            weight_decay=label_weight_decay, batch_size=batch_size, tau=tau, seed=seed,
            projection=proj if spec.labels_on == "projected" else None, device=device, progress=progress)
        new_neg[subset] = trained
    return FinetuneResult(proj.cpu() if proj is not None else None, new_neg, subset, history, variant)

__all__ = ["Projection", "assign_negative_labels", "learnable_subset", "train_projection", "train_label_features",
           "finetune_synood", "FinetuneResult", "VARIANTS", "VariantSpec", "DEFAULT_VARIANT", "resolve_variant"]
