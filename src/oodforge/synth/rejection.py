"""SHIFT's rejection network (Kwon, Kim et al., BMVC 2023, Sec. 4.2, Eq. 5), registered as detector ``shift``.

A binary classifier ``Ψ_θ`` on the frozen classifier's features ``g(x)``, trained on ID training
images (target 1) against synthetic outliers (target 0) with the loss of Eq. 5::

    L(x) = -log Ψ_θ(g(x))          if x ~ D_ID
    L(x) = -log(1 - Ψ_θ(g(x)))     if x ~ D~_OOD        (binary cross-entropy, Ψ_θ = sigmoid(MLP))

``Ψ_θ`` is two fully connected layers with a hidden width of 2048 (ReLU between), trained with
SGD-momentum 0.9, initial learning rate 0.01 (cosine-annealed to 0), weight decay 5e-4, 10 epochs
(Sec. 5.1). The classifier is never updated (it is not even called: the detector reads the cached
features), so ID accuracy is preserved exactly.

``input="penultimate"`` uses the pooled penultimate vector, as the paper's Eq. 5 says;
``input="feature_map"`` uses the flattened last feature map, as SHIFT's reference code does (then
the detector asks the benchmark for feature maps: ``needs_feature_map`` is an instance property).
Features are standardised with the training set's per-dimension mean and standard deviation
before the MLP (a preprocessing step the paper does not mention; it makes SGD at lr 0.01 behave the
same for any backbone's feature scale; ``standardize=False`` turns it off).

The score is ``logit Ψ_θ(g(x))`` (``score="logit"``, default: the same ranking as ``P(ID|x)`` without
float saturation ties) or ``P(ID|x)`` itself (``score="prob"``); higher = more in-distribution.

The reference code augments the synthetic outliers (flips, affine, resized crops); with frozen
features that has to happen in image space before feature extraction: see :func:`augment_outliers`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.base import ArrayDataset
from ..detectors.base import Detector, FitContext, register
from ..models.featureset import FeatureSet

INPUTS = ("penultimate", "feature_map")


def _inputs(fs: FeatureSet, kind: str, what: str) -> torch.Tensor:
    if kind == "penultimate":
        return fs.penultimate.float()
    if fs.feature_map is None:
        raise ValueError(f"shift(input='feature_map') needs the last feature maps of the {what}: extract features "
                         "with feature_map=True (the benchmark does so when detector.needs_feature_map is True)")
    return fs.feature_map.float().flatten(1)


class RejectionMLP(nn.Module):
    """``Ψ_θ``: Linear(d, hidden) -> ReLU -> Linear(hidden, 1); outputs the logit of P(ID|x)."""

    def __init__(self, in_dim: int, hidden: int = 2048) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))).squeeze(-1)


@register
class ShiftRejection(Detector):
    """SHIFT rejection network (Eq. 5) trained on ID features vs synthetic-outlier features."""

    name = "shift"
    paper = "Kwon, Kim et al., BMVC 2023 (SHIFT), rejection network Eq. 5"
    needs_outliers = True

    param_ranges = {"hidden": "[1, inf)", "epochs": "[1, inf)", "lr": "(0, inf)", "momentum": "[0, 1)",
                    "weight_decay": "[0, inf)", "batch_size": "[1, inf)"}
    param_aliases = {"score": "score_kind"}  # `score` is the method

    def __init__(self, input: str = "penultimate", hidden: int = 2048, epochs: int = 10, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                 standardize: bool = True, balance: bool = False, score: str = "logit",
                 progress: bool = False) -> None:
        if input not in INPUTS:
            raise ValueError(f"shift: input must be one of {INPUTS}, got {input!r}")
        if score not in ("logit", "prob"):
            raise ValueError(f"shift: score must be 'logit' or 'prob', got {score!r}")
        if epochs < 1 or hidden < 1 or batch_size < 1:
            raise ValueError("shift: epochs, hidden and batch_size must be >= 1")
        self.input = input
        self.hidden = int(hidden)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.standardize = bool(standardize)
        self.balance = bool(balance)
        self.score_kind = score
        self.progress = bool(progress)

    @property
    def needs_feature_map(self) -> bool:  # type: ignore[override]
        """True for ``input="feature_map"``: the benchmark must extract last feature maps for this instance."""
        return self.input == "feature_map"

    def _fit(self, ctx: FitContext) -> None:
        x_id = _inputs(ctx.train, self.input, "ID training set")
        x_ood = _inputs(ctx.outliers, self.input, "synthetic outliers")
        if len(x_id) == 0 or len(x_ood) == 0:
            raise ValueError(f"shift: need ID and outlier features, got {len(x_id)} ID and {len(x_ood)} outliers")
        if x_id.shape[1] != x_ood.shape[1]:
            raise ValueError(f"shift: ID features have {x_id.shape[1]} dims but outliers {x_ood.shape[1]}; "
                             "extract both with the same classifier")
        device = torch.device(ctx.device)
        x = torch.cat([x_id, x_ood])
        y = torch.cat([torch.ones(len(x_id)), torch.zeros(len(x_ood))])
        if self.standardize:
            self.mean_ = x.mean(0)
            self.std_ = x.std(0).clamp_min(1e-6)
        else:
            self.mean_ = torch.zeros(x.shape[1])
            self.std_ = torch.ones(x.shape[1])
        x = (x - self.mean_) / self.std_
        if self.balance:  # each class contributes half of the loss
            w = torch.where(y > 0.5, len(y) / (2.0 * len(x_id)), len(y) / (2.0 * len(x_ood)))
        else:
            w = torch.ones(len(y))
        g = torch.Generator().manual_seed(int(ctx.seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.seed))
            net = RejectionMLP(x.shape[1], self.hidden)
        net.to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        steps_per_epoch = math.ceil(len(x) / self.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs * steps_per_epoch)
        from ..progress import progress_bar

        self.history_ = []
        for _ in progress_bar(range(self.epochs), desc="shift rejection net", unit="epoch", disable=not self.progress):
            perm = torch.randperm(len(x), generator=g)
            total = 0.0
            for i in range(0, len(x), self.batch_size):
                idx = perm[i:i + self.batch_size]
                xb, yb, wb = x[idx].to(device), y[idx].to(device), w[idx].to(device)
                loss = (F.binary_cross_entropy_with_logits(net(xb), yb, reduction="none") * wb).mean()  # Eq. 5
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            self.history_.append(total / len(x))
        self.net_ = net.eval()
        self.device_ = device

    @torch.no_grad()
    def _score(self, feats: FeatureSet) -> torch.Tensor:
        x = _inputs(feats, self.input, "test set")
        if x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"shift: fitted on {self.mean_.shape[0]}-dim features, got {x.shape[1]}")
        out = []
        for i in range(0, len(x), 4096):
            xb = ((x[i:i + 4096] - self.mean_) / self.std_).to(self.device_)
            out.append(self.net_(xb).float().cpu())
        logit = torch.cat(out) if out else torch.zeros(0)
        return torch.sigmoid(logit) if self.score_kind == "prob" else logit


def augment_outliers(dataset: ArrayDataset, copies: int = 1, seed: int = 0, flip: bool = True,
                     max_rotate: float = 15.0, max_translate: float = 0.1, zoom: tuple[float, float] = (1.0, 1.25),
                     keep_original: bool = True) -> ArrayDataset:
    """Image-space augmentation of synthetic outliers (SHIFT reference code: flips, affine, resized crops).

    Returns the originals (``keep_original``) plus ``copies`` randomly transformed versions of each image:
    horizontal flip (p = 0.5), rotation in ``±max_rotate`` degrees, translation up to ``max_translate``
    of the side, zoom-in factor in ``zoom`` (a resized crop); borders are replicated. Deterministic for
    ``seed``. Extract features of the result, then pass them as ``FitContext.outliers``.
    """
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    g = torch.Generator().manual_seed(int(seed))
    x = dataset.images.float() / 255.0
    n = len(dataset)
    outs = [dataset.images] if keep_original else []
    for _ in range(copies):
        ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(max_rotate)
        sc = 1.0 / (zoom[0] + torch.rand(n, generator=g) * (zoom[1] - zoom[0]))
        t = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * max_translate)
        fl = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
        cos, sin = torch.cos(ang) * sc, torch.sin(ang) * sc
        theta = torch.stack([torch.stack([cos * fl, -sin, t[:, 0]], 1), torch.stack([sin * fl, cos, t[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        outs.append((y.clamp(0, 1) * 255.0).round().to(torch.uint8))
    if not outs:
        raise ValueError("augment_outliers: nothing to return (copies=0 and keep_original=False)")
    images = torch.cat(outs)
    labels = dataset.labels.repeat(len(outs))
    ds = ArrayDataset(images, labels, dataset.class_names,
                      f"{dataset.identity}[aug:c{copies}-s{seed}-o{int(keep_original)}]")
    src = getattr(dataset, "source_index", None)
    if src is not None:
        ds.source_index = np.tile(np.asarray(src), len(outs))
    return ds


__all__ = ["ShiftRejection", "RejectionMLP", "augment_outliers"]
