"""Zero-shot CLIP detectors: MCM and NegLabel (the detector SynOOD builds on, SynOOD Eq. 2).

* **MCM** (Ming et al., NeurIPS 2022): ``S(x) = max_i softmax_i(cos(x, t_i) / T)`` over the ID class
  prompts ``"a photo of a {class}."``, with the paper's default temperature ``T = 1`` applied to the
  raw cosine similarities (no CLIP logit scale).
* **NegLabel** (Jiang et al., ICLR 2024; SynOOD Eq. 2): ``S(x) = sum_ID e^{cos/tau} / (sum_ID e^{cos/tau}
  + sum_NEG e^{cos/tau})`` where the negative labels are WordNet nouns and adjectives far from the ID
  labels in CLIP text space (NegMining, :func:`mine_negative_labels`), with ``tau = 0.01`` (CLIP's
  logit scale 100) and NegLabel's grouping strategy (:func:`neglabel_score`).

Both read the pixels (``needs_inputs = True``): ``FeatureSet.images`` (an ArrayDataset of [0, 1]
images, grayscale repeated to RGB) and the suite's class names from ``FitContext.extra["class_names"]``.
The CLIP model comes from the ``clip_model`` parameter or ``FitContext.extra["clip_model"]`` (CLI
``--clip-model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..detectors.base import Detector, FitContext, register
from ..models.featureset import FeatureSet
from .clip_model import ClipFeatures, load_clip
from .wordnet import load_wordnet

MCM_TEMPLATE = "a photo of a {}."
# NegLabel's reference configuration uses the template "the nice {}" for ID labels and negative
# nouns, and "This is a {} photo" for negative adjectives.
NEGLABEL_POS_TEMPLATE = "the nice {}"
NEGLABEL_NOUN_TEMPLATE = "the nice {}"
NEGLABEL_ADJ_TEMPLATE = "This is a {} photo"


def class_names_from(ctx: FitContext, detector: str) -> list[str]:
    names = (ctx.extra or {}).get("class_names")
    if not names:
        raise ValueError(f"detector {detector!r} needs the ID class names: pass them as FitContext.extra"
                         "['class_names'] (the benchmark does this from the suite)")
    return [str(n).replace("_", " ") for n in names]


def clip_from(params_model: str | None, ctx: FitContext, detector: str, cache_dir=None) -> ClipFeatures:
    name = params_model if params_model is not None else (ctx.extra or {}).get("clip_model")
    return load_clip(name, ctx.device, cache_dir=cache_dir if cache_dir is not None else
                     (ctx.extra or {}).get("clip_cache_dir"), what=f"detector {detector!r}")


def images_of(feats: FeatureSet, detector: str):
    if feats.images is None:
        raise ValueError(f"detector {detector!r} needs the input images: attach them as FeatureSet.images")
    return feats.images


# --- scores ------------------------------------------------------------------------------------
def mcm_score(image_feats: torch.Tensor, pos_feats: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MCM: the maximum softmax over cosine similarities to the ID prompts, divided by ``temperature``."""
    sim = image_feats.float() @ pos_feats.float().T
    return torch.softmax(sim / temperature, dim=1).max(dim=1).values


def neglabel_score(image_feats: torch.Tensor, pos_feats: torch.Tensor, neg_feats: torch.Tensor,
                   tau: float = 0.01, ngroup: int = 100, seed: int = 0) -> torch.Tensor:
    """SynOOD Eq. 2 / NegLabel score with NegLabel's grouping strategy.

    ``S(x) = sum_{i in ID} exp(cos_i / tau) / (sum_{i in ID} exp(cos_i / tau) + sum_{j in NEG} exp(cos_j / tau))``.
    Grouping (NegLabel Sec. 3.3): the negative labels are randomly permuted (``seed``) and split into
    ``ngroup`` equal groups (the remainder ``M mod ngroup`` is dropped, as in the reference code); the
    score is the mean of the Eq. 2 score computed against each group. ``ngroup = 1`` is plain Eq. 2.
    """
    sim_pos = image_feats.float() @ pos_feats.float().T / tau
    m = neg_feats.shape[0]
    if m == 0:
        return torch.ones(image_feats.shape[0])
    sim_neg = image_feats.float() @ neg_feats.float().T / tau
    ngroup = max(1, min(int(ngroup), m))
    if ngroup > 1:
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(m, generator=g)
        size = m // ngroup
        sim_neg = sim_neg[:, perm[: size * ngroup]].reshape(sim_neg.shape[0], ngroup, size)
    else:
        sim_neg = sim_neg[:, None, :]
    lse_pos = torch.logsumexp(sim_pos, dim=1, keepdim=True)  # [N, 1]
    lse_neg = torch.logsumexp(sim_neg, dim=2)  # [N, G]
    # sum_ID / (sum_ID + sum_NEG) = sigmoid(lse_pos - lse_neg), numerically stable
    return torch.sigmoid(lse_pos - lse_neg).mean(dim=1)


# --- NegMining ---------------------------------------------------------------------------------
def mine_negative_labels(pos_feats: torch.Tensor, cand_feats: torch.Tensor, num: int,
                         percentile: float = 0.95, batch_size: int = 4096) -> torch.Tensor:
    """NegMining (NegLabel Eq. 5): indices of the ``num`` candidates farthest from the ID labels.

    The distance of candidate ``i`` is the ``eta``-percentile of its negative cosine similarities to
    the ID label features, ``d_i = percentile_eta({-cos(c_i, y_k)}_k)`` with ``eta = 0.05``; equivalently
    minus the ``percentile`` (= 1 - eta = 0.95) quantile of its similarities. The ``num`` candidates with
    the largest distance are returned, farthest first.
    """
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile must be in [0, 1] (NegLabel uses 0.95), got {percentile}")
    q = []
    for i in range(0, cand_feats.shape[0], batch_size):
        sim = cand_feats[i:i + batch_size].float() @ pos_feats.float().T
        q.append(torch.quantile(sim, percentile, dim=1))
    q = torch.cat(q) if q else torch.zeros(0)
    order = torch.argsort(q, stable=True)  # smallest high-percentile similarity = largest distance
    return order[: max(0, min(int(num), len(order)))]


@dataclass
class MinedLabels:
    """Negative labels mined by NegMining: words, their prompts, L2-normalised CLIP text features, and the
    norms of the raw text-encoder outputs (SynOOD's label fine-tuning starts from the raw features)."""

    words: list[str]
    prompts: list[str]
    feats: torch.Tensor
    norms: torch.Tensor


def mine_from_lexicon(clip: ClipFeatures, pos_feats: torch.Tensor, lexicon: dict[str, list[str]],
                      class_names: list[str], num: int = 10000, percentile: float = 0.95,
                      progress: bool = False) -> MinedLabels:
    """Mine ``num`` negative labels from a ``{"noun": [...], "adj": [...]}`` lexicon with CLIP.

    ID class names are removed from the candidates. As in NegLabel's reference code, nouns and
    adjectives are mined separately, each keeping the same fraction ``num / #candidates`` of its part of
    speech. Returns the labels in the order nouns (farthest first), then adjectives.
    """
    id_names = {c.lower() for c in class_names}
    templates = {"noun": NEGLABEL_NOUN_TEMPLATE, "adj": NEGLABEL_ADJ_TEMPLATE}
    cands = {pos: [w for w in lexicon.get(pos, []) if w.lower() not in id_names] for pos in templates}
    total = sum(len(v) for v in cands.values())
    if total == 0:
        raise ValueError("the WordNet lexicon has no candidate negative labels (empty data.noun/data.adj?)")
    frac = min(1.0, num / total)
    words, prompts, feats, norms = [], [], [], []
    for pos, tmpl in templates.items():
        if not cands[pos]:
            continue
        p = [tmpl.format(w) for w in cands[pos]]
        raw = clip.encode_text(p, progress=progress, desc=f"CLIP text ({pos}s)", normalize=False)
        f = torch.nn.functional.normalize(raw, dim=-1)
        keep = mine_negative_labels(pos_feats, f, int(round(frac * len(p))), percentile)
        words += [cands[pos][i] for i in keep.tolist()]
        prompts += [p[i] for i in keep.tolist()]
        feats.append(f[keep])
        norms.append(raw[keep].norm(dim=-1))
    return MinedLabels(words, prompts, torch.cat(feats) if feats else torch.zeros(0, pos_feats.shape[1]),
                       torch.cat(norms) if norms else torch.zeros(0))


# --- detectors ---------------------------------------------------------------------------------
@register
class MCM(Detector):
    """Maximum Concept Matching: max softmax of CLIP cosine similarities to the ID prompts (T = 1)."""

    name = "mcm"
    paper = "Ming et al., Delving into OOD Detection with Vision-Language Representations, NeurIPS 2022"
    needs_inputs = True

    def __init__(self, clip_model: str | None = None, temperature: float = 1.0, template: str = MCM_TEMPLATE,
                 batch_size: int = 64, cache_dir: str | None = None, progress: bool = False):
        self.clip_model = clip_model
        self.temperature = temperature
        self.template = template
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.progress = progress

    def _fit(self, ctx: FitContext) -> None:
        names = class_names_from(ctx, self.name)
        self.clip_ = clip_from(self.clip_model, ctx, self.name, self.cache_dir)
        self.pos_feats_ = self.clip_.encode_text([self.template.format(c) for c in names])

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        img = self.clip_.image_features(images_of(feats, self.name), self.batch_size, self.progress)
        return mcm_score(img, self.pos_feats_, self.temperature)


@register
class NegLabel(Detector):
    """NegLabel: CLIP affinity to the ID labels against mined WordNet negative labels (SynOOD Eq. 2)."""

    name = "neglabel"
    paper = "Jiang et al., Negative Label Guided OOD Detection with Pretrained Vision-Language Models, ICLR 2024"
    needs_inputs = True

    def __init__(self, clip_model: str | None = None, wordnet_dir: str | None = None, num_neg: int = 10000,
                 percentile: float = 0.95, tau: float = 0.01, ngroup: int = 100, first_lemma_only: bool = True,
                 batch_size: int = 64, cache_dir: str | None = None, progress: bool = False):
        self.clip_model = clip_model
        self.wordnet_dir = wordnet_dir
        self.num_neg = num_neg
        self.percentile = percentile
        self.tau = tau
        self.ngroup = ngroup
        self.first_lemma_only = first_lemma_only
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.progress = progress

    def _fit(self, ctx: FitContext) -> None:
        mined = self._mine_negatives(ctx)
        self.neg_words_, self.neg_prompts_, self.neg_feats_ = mined.words, mined.prompts, mined.feats
        self.seed_ = ctx.seed

    def _mine_negatives(self, ctx: FitContext):
        """Load CLIP, encode the ID label prompts (``pos_feats_``) and mine the WordNet negatives.

        Shared with the ``synood`` detector, which then fine-tunes what this mines.
        """
        names = class_names_from(ctx, self.name)
        self.clip_ = clip_from(self.clip_model, ctx, self.name, self.cache_dir)
        self.pos_feats_ = self.clip_.encode_text([NEGLABEL_POS_TEMPLATE.format(c) for c in names])
        lexicon = load_wordnet(self.wordnet_dir or (ctx.extra or {}).get("wordnet_dir"), self.first_lemma_only)
        return mine_from_lexicon(self.clip_, self.pos_feats_, lexicon, names, self.num_neg, self.percentile,
                                 self.progress)

    def _score(self, feats: FeatureSet) -> torch.Tensor:
        img = self.clip_.image_features(images_of(feats, self.name), self.batch_size, self.progress)
        return neglabel_score(img, self.pos_feats_, self.neg_feats_, self.tau, self.ngroup, self.seed_)


__all__ = ["MCM", "NegLabel", "MinedLabels", "mcm_score", "neglabel_score", "mine_negative_labels", "mine_from_lexicon",
           "MCM_TEMPLATE", "NEGLABEL_POS_TEMPLATE", "NEGLABEL_NOUN_TEMPLATE", "NEGLABEL_ADJ_TEMPLATE"]
