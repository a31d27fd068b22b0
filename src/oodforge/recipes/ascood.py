"""ASCOOD: virtual outliers made from ID images by disturbing the pixels an attribution map marks as ID-relevant,
trained towards uniform predictions on z-score standardised features (Regmi, "Image-based Outlier Synthesis
With Training Data", arXiv 2411.10794, 2025; OpenOOD v1.5's ``ASCOODTrainer``).

Per training batch ``(x, y)`` (OpenOOD ``openood/trainers/ascood_trainer.py``, the authors' repository
``sudarshanregmi/ASCOOD`` has the same trainer):

1. **Attribution** (``get_grad``): the gradient of the true-class logit with respect to the (normalised)
   input, the network in eval mode (batch-norm running statistics), through the training-time forward::

       g = d f_y(x) / d x_norm

   oodforge's models normalise inside (``x_norm = (x - mean) / std``), so ``g`` is the gradient with respect
   to the ``[0, 1]`` image times ``std`` (the chain rule): the same numbers the reference computes.
2. **Outlier** from the pixels that raise the true-class logit most (the "invariant", ID-relevant ones), a
   share ``p`` of them:

   * ``shuffle`` (``shuffle_ood``, the CIFAR-10 script's choice): each pixel's score is ``sum_c exp(g_c)``;
     the ``int(p H W)`` pixels with the highest scores exchange their values (all channels together) by one
     random permutation per image; every other pixel is kept;
   * ``gradient`` (``gradient_ood``, the config's default): the ``int(p C H W)`` entries with the largest
     ``|g|`` move along the gradient, ``x_norm + alpha g``, i.e. ``x + alpha g std`` on the ``[0, 1]`` image.
     ``alpha`` falls linearly from ``alpha_max`` at the first epoch towards ``alpha_min``:
     ``alpha = (alpha_max - alpha_min)(1 - epoch / epochs) + alpha_min``.

3. **Loss**, one forward pass over ``[x; x_ood]`` (training mode), logits of the standardised feature
   (``ASCOODNet``: ``z(h) = (h - mean(h)) / (std(h) + 1e-6)``, mean and unbiased std over the feature
   dimension, then ``W sigma z(h) + b``)::

       L = CE(f(x), y) + w * KL(U || softmax(f(x_ood)))          (KLDivLoss, reduction "batchmean")

   with ``U`` uniform over the ``M`` classes: ``KL = mean_n [ -log M - (1/M) sum_k log p_nk ]``.

Defaults, and where each comes from (OpenOOD commit 3c35632, the authors' repository f351789):

* ``sigma = 0.5``, ``w = 1``: ``configs/pipelines/train/train_ascood.yml`` (both repositories);
* ``op = "shuffle"``, ``p = 0.15``: ``scripts/ood/ascood/cifar10_train_ascood.sh`` (both repositories; the
  config's own defaults are ``gradient`` and ``0.1``; the released CIFAR-10 checkpoints the test script and the
  authors' ``openoodv1.5_results`` read are named ``p0.2``);
* ``alpha_max = alpha_min = 10`` (a constant ``alpha``, ``gradient`` only): OpenOOD's ``train_ascood.yml``
  (the authors' config has 300 -> 30);
* the ID term's cross entropy, the KL to the uniform distribution (OpenOOD's ``kl_div: True``; its
  alternative, a logistic regression on the energy, is not implemented), the attribution in eval mode on the
  true-class *logit* (the softmax probability is commented out in the reference).

The reference trains from scratch with SGD lr 0.1 (Nesterov, momentum 0.9, weight decay 5e-4, cosine, 100
epochs) and evaluates with the ``scale`` postprocessor; oodforge fine-tunes the zoo's plain classifier with the
recipes' fine-tuning default (lr 0.01 cosine, ``workflows.RECIPE_FINETUNE``). At test time oodforge's network is
the plain one (``W h + b`` on the raw feature), as for T2FNorm; OpenOOD evaluates through ``ASCOODNet``, whose
test-time logits are those of the standardised feature. See docs/recipes.md, "Differences from the reference".

:func:`ascood_outliers` is the outlier maker on its own (uint8 images in, uint8 images out), and
:func:`forge_ascood` writes its outliers into an :class:`~oodforge.outliers.store.OutlierStore`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..data.base import ArrayDataset
from ..models.train import Objective, StepLoss
from ..outliers.store import OutlierStore, outlier_seed

PAPER = "Regmi, Image-based Outlier Synthesis With Training Data (ASCOOD), arXiv 2411.10794, 2025"
OPS = ("shuffle", "gradient")
SIGMA = 0.5
SHARE = 0.15
WEIGHT = 1.0
ALPHA = 10.0


def z_std(h: torch.Tensor) -> torch.Tensor:
    """``(h - mean(h)) / (std(h) + 1e-6)`` over the last dimension (unbiased std), as ``ascood_net.z_std``."""
    return (h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + 1e-6)


def ascood_logits(model, x: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """Training-time logits of ASCOOD: the head on ``sigma * z(h)`` (``ASCOODNet.forward``)."""
    return model.head(z_std(model.pool(model.feature_map(x))) * sigma)


def input_attribution(model, x: torch.Tensor, y: torch.Tensor, sigma: float | None = SIGMA) -> torch.Tensor:
    """``d f_y / d x_norm`` per image, the model in eval mode (restored after); ``sigma=None``: the plain forward.

    ``x`` are ``[0, 1]`` images; the gradient is taken with respect to them and multiplied by the model's ``std``
    (the gradient with respect to the normalised input the reference differentiates). No parameter gradient is
    accumulated."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            logits = model(xg) if sigma is None else ascood_logits(model, xg, sigma)
            score = logits[torch.arange(len(y), device=logits.device), y].sum()
            (grad,) = torch.autograd.grad(score, xg)
    finally:
        model.train(was_training)
    std = getattr(model, "std", None)
    return grad * std if isinstance(std, torch.Tensor) else grad


def shuffle_top_pixels(x: torch.Tensor, attribution: torch.Tensor, share: float,
                       rngs: list[np.random.Generator]) -> torch.Tensor:
    """The ``int(share H W)`` pixels with the highest ``sum_c exp(g_c)`` of each image permuted among themselves
    (all channels together; one random permutation per image from ``rngs[i]``); other pixels kept."""
    b, c, h, w = x.shape
    n = int(h * w * share)
    flat = x.detach().contiguous().reshape(b, c, h * w).clone()
    if n < 1:
        return flat.reshape(b, c, h, w)
    # log sum_c exp(g_c): the reference's ranking, without its overflow for large gradients
    score = torch.logsumexp(attribution.detach().float(), dim=1).reshape(b, h * w)
    top = torch.topk(score, n, dim=1).indices  # [b, n]
    perm = torch.from_numpy(np.stack([r.permutation(n) for r in rngs])).to(top.device)
    src = torch.gather(top, 1, perm)  # pixel top[i, j] takes the value of pixel top[i, perm[i, j]]
    idx_c = lambda t: t.unsqueeze(1).expand(-1, c, -1)  # noqa: E731
    flat.scatter_(2, idx_c(top), torch.gather(flat, 2, idx_c(src)))
    return flat.reshape(b, c, h, w)


def gradient_top_pixels(x: torch.Tensor, attribution: torch.Tensor, share: float, alpha: float,
                        std: torch.Tensor | None = None) -> torch.Tensor:
    """The ``int(share C H W)`` entries of largest ``|g|`` moved by ``alpha g`` in normalised units (times the
    model's ``std`` on the ``[0, 1]`` image); the rest kept. Not clipped (the reference does not clip)."""
    b = x.shape[0]
    n = int(x[0].numel() * share)
    g = attribution.detach().reshape(b, -1)
    mask = torch.zeros_like(g)
    if n >= 1:
        mask.scatter_(1, torch.topk(g.abs(), n, dim=1).indices, 1.0)
    step = (alpha * g * mask).reshape(x.shape)
    return (x.detach() + (step * std if std is not None else step)).contiguous()


def perturb(model, x: torch.Tensor, y: torch.Tensor, share: float = SHARE, op: str = "shuffle",
            alpha: float = ALPHA, sigma: float | None = SIGMA, rngs: list[np.random.Generator] | None = None
            ) -> torch.Tensor:
    """ASCOOD's outliers of the ``[0, 1]`` images ``x`` (float, not clipped): attribution, then ``op``."""
    g = input_attribution(model, x, y, sigma)
    if op == "shuffle":
        return shuffle_top_pixels(x, g, share, rngs or [np.random.default_rng(0) for _ in range(len(x))])
    std = getattr(model, "std", None)
    return gradient_top_pixels(x, g, share, alpha, std if isinstance(std, torch.Tensor) else None)


def ascood_outliers(model, images: torch.Tensor, labels: torch.Tensor, share: float = SHARE, op: str = "shuffle",
                    alpha: float = ALPHA, sigma: float | None = None, seed: int = 0,
                    seeds: list[int] | None = None) -> torch.Tensor:
    """ASCOOD outliers of uint8 images ``[N, C, H, W]`` with their labels, as uint8 (clipped, rounded).

    ``sigma=None`` takes the attribution through the model's own (plain) forward, ``sigma`` a value through
    ASCOOD's standardised-feature forward. ``seeds`` (one per image) fix each image's permutation independently
    of the batch it is in; default ``seed + i``."""
    check_options(share, op, alpha, alpha, 1.0, sigma if sigma is not None else 1.0)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(images))]
    device = next(model.parameters()).device  # the attribution runs where the model is (``synth ascood --device``)
    x = images.to(device).float().div(255.0)
    out = perturb(model, x, labels.to(device).long(), share, op, alpha, sigma,
                  [np.random.default_rng(s) for s in seeds])
    return out.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()


def _number(what: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


def check_options(share: float, op: str, alpha_max: float, alpha_min: float, w: float, sigma: float,
                  names: dict[str, str] | None = None) -> None:
    """Refuse bad ASCOOD options, naming each as ``names`` says (default: the recipe option, ``recipe option
    ascood_p``; ``oodforge synth ascood`` passes its flags, ``{"ascood_p": "--p", ...}``)."""
    def name(key: str) -> str:
        return (names or {}).get(key, f"recipe option {key}")

    if op not in OPS:
        raise ValueError(f"{name('ascood_op')} must be one of {', '.join(OPS)}, got {op!r}")
    if not 0 < _number(name("ascood_p"), share) <= 1:
        raise ValueError(f"{name('ascood_p')} (the share of pixels perturbed) must be in (0, 1], got {share}")
    if not _number(name("ascood_sigma"), sigma) > 0:
        raise ValueError(f"{name('ascood_sigma')} must be > 0, got {sigma}")
    if not _number(name("ascood_w"), w) >= 0:
        raise ValueError(f"{name('ascood_w')} must be >= 0, got {w}")
    for key, value in (("ascood_alpha_max", alpha_max), ("ascood_alpha_min", alpha_min)):
        if not _number(name(key), value) >= 0:
            raise ValueError(f"{name(key)} must be >= 0, got {value}")


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """``KL(U || softmax(logits))`` averaged over the batch (``nn.KLDivLoss(reduction="batchmean")``)."""
    m = logits.shape[1]
    return (-np.log(m) - logits.log_softmax(dim=1).mean(dim=1)).mean()


class ASCOOD(Objective):
    """ID cross entropy plus ``w`` times ``KL(U || p)`` on attribution-shuffled ID images, on standardised
    features (Regmi 2025; OpenOOD's ``ASCOODTrainer``). See the module docstring for the steps and defaults."""

    name = "ascood"

    def __init__(self, sigma: float = SIGMA, share: float = SHARE, op: str = "shuffle", w: float = WEIGHT,
                 alpha_max: float = ALPHA, alpha_min: float = ALPHA, seed: int = 0):
        check_options(share, op, alpha_max, alpha_min, w, sigma)
        self.sigma, self.share, self.op, self.w = float(sigma), float(share), op, float(w)
        self.alpha_max, self.alpha_min, self.seed = float(alpha_max), float(alpha_min), seed
        self.alpha, self.epochs = self.alpha_max, 1
        self.rng = np.random.default_rng([seed, 23])

    def bind(self, model, dataset, config) -> None:
        if not all(hasattr(model, a) for a in ("feature_map", "pool", "head")):
            raise TypeError(f"ASCOOD standardises the penultimate feature; {type(model).__name__} is not an "
                            "oodforge Classifier (feature_map / pool / head)")
        self.epochs = int(config.epochs)

    def start_epoch(self, epoch: int) -> None:
        progress = epoch / max(self.epochs, 1)
        self.alpha = (self.alpha_max - self.alpha_min) * (1 - progress) + self.alpha_min

    def loss(self, model, x, y, augment) -> StepLoss:
        rngs = [np.random.default_rng(s) for s in self.rng.integers(2**63, size=len(x))]
        x_ood = perturb(model, x, y, self.share, self.op, self.alpha, self.sigma, rngs)
        both = torch.cat([x, x_ood.to(x.dtype)])
        if x.is_contiguous(memory_format=torch.channels_last):
            both = both.contiguous(memory_format=torch.channels_last)
        logits = ascood_logits(model, both, self.sigma)  # one pass, as the reference
        id_logits = logits[:len(x)]
        cls = F.cross_entropy(id_logits, y)
        ood = uniform_kl(logits[len(x):])
        return StepLoss(cls + self.w * ood, id_logits, {"cls_loss": cls.item(), "ood_loss": ood.item()})

    def describe(self) -> dict:
        return {"objective": self.name, "sigma": self.sigma, "p": self.share, "op": self.op, "w": self.w,
                "alpha_max": self.alpha_max, "alpha_min": self.alpha_min, "paper": PAPER}

    def state_dict(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = json.loads(state["rng"])


def forge_ascood(dataset: ArrayDataset, out_dir: str | Path, model, share: float = SHARE, op: str = "shuffle",
                 alpha: float = ALPHA, sigma: float | None = None, seed: int = 0, limit: int | None = None,
                 batch_size: int = 64) -> OutlierStore:
    """One ASCOOD outlier per image of ``dataset`` (the first ``limit``) into the store at ``out_dir``, with
    ``model``'s attribution; resumable (done keys are skipped), each image's permutation seeded by its index."""
    from ..models.checkpoint import weights_hash

    check_options(share, op, alpha, alpha, 1.0, sigma if sigma is not None else 1.0)
    config = {"method": "ascood", "paper": PAPER, "dataset": dataset.identity, "num_sources": len(dataset),
              "image_shape": list(dataset.image_shape), "class_names": dataset.class_names,
              "model": weights_hash(model), "op": op, "p": float(share), "alpha": float(alpha),
              "sigma": sigma, "seed": int(seed)}
    store = OutlierStore(out_dir, config)
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    with store.writer():
        todo = [i for i in range(n) if (i, 0) not in store.done_keys()]
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            seeds = [outlier_seed(seed, i, 0) for i in idx]
            images = ascood_outliers(model, dataset.images[idx], dataset.labels[idx], share, op, alpha, sigma,
                                     seeds=seeds)
            store.add_shard(images.numpy(), [{"source_index": i, "k": 0, "seed": s, "label": int(dataset.labels[i])}
                                             for i, s in zip(idx, seeds)])
    return store
