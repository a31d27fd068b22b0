"""The ``synood`` detector: NegLabel scoring (Eq. 2) with SynOOD's fine-tuned negative-label features.

Fitting (Secs. 3.4-3.5):

1. CLIP text features of the ID classes and NegMining of WordNet negative labels, as NegLabel;
2. CLIP image features (computed once per image set and cached) of the ID training images -- the
   ``per_class`` most complex ones per class when set (JPEG bytes per pixel, Sec. 3.4) -- and of the
   synthetic outliers (``FitContext.outliers.images``, e.g. a SynOOD outlier store);
3. :func:`~oodforge.synood.finetune.finetune_synood`: pair outliers with negative labels, optionally
   train the projection (Eq. 12), train the paired labels' features (Eq. 14).

Scoring is Eq. 2 with NegLabel's grouping over the fine-tuned negative features; image features go
through the projection only with ``use_projection=True`` (Table 5: best without).
"""

from __future__ import annotations

import numpy as np
import torch

from ..detectors.base import FitContext, register
from ..models.featureset import FeatureSet
from .clip_detectors import NegLabel, class_names_from, images_of, neglabel_score
from .finetune import finetune_synood
from .generate import select_complex_images


@register
class SynOOD(NegLabel):
    """CLIP + NegLabel with negative-label features (and optionally a projection) fine-tuned on synthetic outliers."""

    name = "synood"
    paper = "Li et al., Synthesizing Near-Boundary OOD Samples for Out-of-Distribution Detection, 2025"
    needs_inputs = True
    needs_outliers = True

    def __init__(self, clip_model: str | None = None, wordnet_dir: str | None = None, num_neg: int = 10000,
                 percentile: float = 0.95, tau: float = 0.01, ngroup: int = 100, first_lemma_only: bool = True,
                 per_class: int | None = None, use_projection: bool = False, finetune_labels: bool = True,
                 max_learnable_fraction: float = 0.5, proj_epochs: int = 3, proj_lr: float = 1e-3,
                 label_epochs: int = 5, label_lr: float = 2e-3, batch_size: int = 128, clip_batch_size: int = 64,
                 cache_dir: str | None = None, progress: bool = False):
        self.clip_model = clip_model
        self.wordnet_dir = wordnet_dir
        self.num_neg = num_neg
        self.percentile = percentile
        self.tau = tau
        self.ngroup = ngroup
        self.first_lemma_only = first_lemma_only
        self.per_class = per_class
        self.use_projection = use_projection
        self.finetune_labels = finetune_labels
        self.max_learnable_fraction = max_learnable_fraction
        self.proj_epochs = proj_epochs
        self.proj_lr = proj_lr
        self.label_epochs = label_epochs
        self.label_lr = label_lr
        self.batch_size = batch_size
        self.clip_batch_size = clip_batch_size
        self.cache_dir = cache_dir
        self.progress = progress

    def _fit(self, ctx: FitContext) -> None:
        class_names_from(ctx, self.name)  # fail before any model loading when class names are missing
        train_images = images_of(ctx.train, self.name)
        if ctx.outliers is None or ctx.outliers.images is None:
            raise ValueError("detector 'synood' trains on the synthetic outliers' pixels: attach them as "
                             "FitContext.outliers.images (an ArrayDataset, e.g. OutlierStore(...).load())")
        mined = self._mine_negatives(ctx)  # NegLabel's step 1: ID prompts + NegMining
        clip = self.clip_
        self.neg_words_ = mined.words
        if self.per_class is not None:
            train_images = train_images.subset(select_complex_images(train_images, int(self.per_class)))
        id_feats = clip.image_features(train_images, self.clip_batch_size, self.progress, "CLIP ID images")
        out_feats = clip.image_features(ctx.outliers.images, self.clip_batch_size, self.progress, "CLIP outliers")
        res = finetune_synood(id_feats, train_images.labels, out_feats, self.pos_feats_, mined.feats,
                              neg_norms=mined.norms,
                              use_projection=self.use_projection, finetune_labels=self.finetune_labels,
                              max_learnable_fraction=self.max_learnable_fraction, tau=self.tau,
                              proj_epochs=self.proj_epochs, proj_lr=self.proj_lr, label_epochs=self.label_epochs,
                              label_lr=self.label_lr, batch_size=self.batch_size, seed=ctx.seed, device=ctx.device,
                              progress=self.progress)
        self.neg_feats_ = res.neg_feats
        self.projection_ = res.projection
        self.learnable_ = res.subset
        self.history_ = res.history
        self.seed_ = ctx.seed

    def image_features(self, images) -> torch.Tensor:
        f = self.clip_.image_features(images, self.clip_batch_size, self.progress)
        if self.use_projection and self.projection_ is not None:
            with torch.no_grad():
                f = self.projection_(f)
        return f

    def _score(self, feats: FeatureSet) -> np.ndarray | torch.Tensor:
        img = self.image_features(images_of(feats, self.name))
        return neglabel_score(img, self.pos_feats_, self.neg_feats_, self.tau, self.ngroup, self.seed_)


__all__ = ["SynOOD"]
