"""The field's no-outlier training recipes, on oodforge's one training loop (``models/train.py``).

A recipe is a training method name, as ``TrainPlan.method`` / ``oodforge train --method`` take it:
one loss, optionally composed with the PixMix augmentation by ``+``:

=================  ==========================================================================  ==============
method             what trains                                                                 module
=================  ==========================================================================  ==============
``logitnorm``      cross entropy on logits / (tau ||logits||), tau = 0.04 (Wei et al. 2022)     ``logitnorm``
``t2fnorm``        head on features / (tau ||features||) in training, plain at test, tau = 0.1   ``logitnorm``
``rotpred``        + a 4-way rotation head, weight 1; detector ``rotpred`` (Hendrycks 2019)     ``rotpred``
``mixoe``          + soft cross entropy on ID / outlier mixes, mixup, beta 5 (Zhang et al. 2023) ``mixoe``
``pixmix``         plain cross entropy on PixMix-ed images, k 4, beta 3 (Hendrycks et al. 2022)  ``pixmix``
``ascood``         + w KL(U || p) on ID images with their most ID-relevant pixels shuffled,     ``ascood``
                   z-scored features x sigma 0.5, p 0.15, w 1 (Regmi 2025)
``<loss>+pixmix``  any of the losses on PixMix-ed images (``rotpred+pixmix``, ``logitnorm+pixmix``)
=================  ==========================================================================  ==============

The recipe's hyperparameters are ``TrainPlan.recipe_options`` (``--recipe-option KEY=VALUE``): the
keys of :data:`OPTIONS`, defaults from the papers; :func:`resolve_options` fills them in and refuses
unknown keys or keys of another recipe, before any data is loaded. A checkpoint records the method
and the resolved options in its plan, so ``bench`` labels its detectors ``<detector>@<method>``
(``energy@logitnorm``, ``rotpred@rotpred+pixmix``).

RotPred's model is ``RotPredModel`` (architecture ``"rotpred:<backbone>"``, an
``oodforge.model_wrappers`` entry point); its detector lives in :mod:`oodforge.recipes.detector` (an
``oodforge.detectors`` entry point). PixMix and MixOE mix in procedural fractal pictures
(:mod:`oodforge.recipes.fractals`), generated from a seed and cached in the folder the caller gives.
"""

from __future__ import annotations

from pathlib import Path

LOSSES = ("plain", "logitnorm", "t2fnorm", "rotpred", "mixoe", "ascood")
AUGMENTATIONS = ("pixmix",)

#: every option: the recipe parts it belongs to and its default (``None`` = depends on the part)
OPTIONS: dict[str, tuple[tuple[str, ...], object]] = {
    "tau": (("logitnorm", "t2fnorm"), None),  # 0.04 for logitnorm, 0.1 for t2fnorm
    "rot_lambda": (("rotpred",), 1.0),
    "mixoe_op": (("mixoe",), "mixup"),
    "mixoe_alpha": (("mixoe",), None),  # 1.0 for mixup, 2.0 for cutmix
    "mixoe_beta": (("mixoe",), 5.0),
    "mixoe_source": (("mixoe",), "outliers"),
    "ascood_sigma": (("ascood",), 0.5),
    "ascood_p": (("ascood",), 0.15),
    "ascood_op": (("ascood",), "shuffle"),
    "ascood_w": (("ascood",), 1.0),
    "ascood_alpha_max": (("ascood",), 10.0),
    "ascood_alpha_min": (("ascood",), 10.0),
    "pixmix_k": (("pixmix",), 4),
    "pixmix_beta": (("pixmix",), 3.0),
    "pixmix_severity": (("pixmix",), 3),
    "pixmix_all_ops": (("pixmix",), False),
    "n_pictures": (("pixmix", "mixoe"), 1000),
    "pictures_seed": (("pixmix", "mixoe"), 0),
}


def parse_recipe(method: str) -> tuple[str, tuple[str, ...]]:
    """``"rotpred+pixmix"`` -> ``("rotpred", ("pixmix",))``; ``"pixmix"`` -> ``("plain", ("pixmix",))``."""
    parts = [p.strip() for p in method.split("+")]
    losses = [p for p in parts if p in LOSSES]
    augs = tuple(p for p in parts if p in AUGMENTATIONS)
    unknown = [p for p in parts if p not in LOSSES and p not in AUGMENTATIONS]
    if unknown or len(losses) > 1 or len(set(augs)) != len(augs) or not parts:
        raise ValueError(f"unknown training recipe {method!r}: one of {', '.join(LOSSES[1:])}, optionally "
                         f"'+pixmix' (or 'pixmix' alone)")
    return (losses[0] if losses else "plain"), augs


def is_recipe(method: str) -> bool:
    """Whether ``method`` names a recipe of this package (``plain`` alone is not one)."""
    try:
        loss, augs = parse_recipe(method)
    except ValueError:
        return False
    return loss != "plain" or bool(augs)


def wrapper_prefix(method: str) -> str | None:
    """The model wrapper a recipe trains (``"rotpred"`` -> architecture ``"rotpred:<backbone>"``)."""
    return "rotpred" if parse_recipe(method)[0] == "rotpred" else None


def uses_pictures(method: str, options: dict) -> bool:
    """Whether the recipe needs the fractal pictures (PixMix; MixOE without an outlier store)."""
    return "pixmix" in parse_recipe(method)[1] or options.get("mixoe_outliers") == "fractals"


def recipe_forgers(method: str, options: dict | None) -> list[str]:
    """The held-out forgers (:mod:`oodforge.outliers.heldout`) whose kind of outlier recipe ``method`` trains on,
    for ``models.<label>.forgers`` (``protocol.trained_forgers``): a pick must not read a forger the backbone saw.

    * MixOE with ``mixoe_source=classes`` mixes ID images of two classes: the ``mix`` forger's outliers.
    * ASCOOD's outliers are *neither*: an ID image with the 10-20 % of its pixels that the attribution ranks
      most ID-relevant permuted among themselves (or nudged along the gradient); the image's layout and its
      other pixels stay. ``jigsaw`` permutes every 4x4 tile of the whole image (local texture kept, global
      shape lost), ``mix`` blends two images. Neither is what ASCOOD trains on, so it records nothing.
    * The other recipes train on no outlier made from ID images (MixOE's default fractals, PixMix's mixing
      with fractals are not the held-out forgers' kinds either).
    """
    loss, _ = parse_recipe(method)
    if loss == "mixoe" and (options or {}).get("mixoe_source") == "classes":
        return ["mix"]
    return []


def resolve_options(method: str, options: dict | None, has_outliers: bool = False) -> dict:
    """The recipe's options with the papers' defaults filled in; refuses keys that do not belong to it."""
    loss, augs = parse_recipe(method)
    parts = {loss, *augs}
    options = dict(options or {})
    for key in options:
        if key not in OPTIONS:
            raise ValueError(f"unknown recipe option {key!r}; the options are {', '.join(OPTIONS)}")
        if not parts & set(OPTIONS[key][0]):
            raise ValueError(f"recipe option {key!r} belongs to {' / '.join(OPTIONS[key][0])}, not to {method!r}")
    out = {k: options.get(k, default) for k, (owners, default) in OPTIONS.items() if parts & set(owners)}
    if "tau" in out and out["tau"] is None:
        from .logitnorm import LOGITNORM_TAU, T2FNORM_TAU

        out["tau"] = LOGITNORM_TAU if loss == "logitnorm" else T2FNORM_TAU
    if loss == "mixoe":
        from .mixoe import DEFAULT_ALPHA, MIX_OPS

        if out["mixoe_op"] not in MIX_OPS:
            raise ValueError(f"recipe option mixoe_op must be one of {', '.join(MIX_OPS)}, got {out['mixoe_op']!r}")
        if out["mixoe_alpha"] is None:
            out["mixoe_alpha"] = DEFAULT_ALPHA[out["mixoe_op"]]
        if out["mixoe_source"] not in ("outliers", "classes"):
            raise ValueError(f"recipe option mixoe_source must be 'outliers' or 'classes', got "
                             f"{out['mixoe_source']!r}")
        out["mixoe_outliers"] = "store" if has_outliers else ("fractals" if out["mixoe_source"] == "outliers"
                                                              else None)
    if loss == "ascood":
        from .ascood import check_options

        check_options(out["ascood_p"], out["ascood_op"], out["ascood_alpha_max"], out["ascood_alpha_min"],
                      out["ascood_w"], out["ascood_sigma"])
    if "n_pictures" in out and int(out["n_pictures"]) < 1:
        raise ValueError(f"recipe option n_pictures must be >= 1, got {out['n_pictures']}")
    return out


def build_objective(method: str, options: dict, image_shape: tuple[int, int, int], seed: int = 0,
                    outliers=None, pictures_dir: str | Path | None = None):
    """The :class:`~oodforge.models.train.Objective` of recipe ``method`` with resolved ``options``.

    ``outliers`` (an ArrayDataset, e.g. a loaded outlier store) replaces the fractal pictures as
    MixOE's outliers; ``pictures_dir`` caches the fractals.
    """
    from ..models.train import Augmented, CrossEntropy

    loss, augs = parse_recipe(method)
    pictures = None
    if uses_pictures(method, options):
        from .fractals import fractal_pictures

        pictures = fractal_pictures(int(options["n_pictures"]), image_shape, int(options["pictures_seed"]),
                                    pictures_dir)
    if loss == "logitnorm":
        from .logitnorm import LogitNorm

        objective = LogitNorm(options["tau"])
    elif loss == "t2fnorm":
        from .logitnorm import T2FNorm

        objective = T2FNorm(options["tau"])
    elif loss == "rotpred":
        from .rotpred import RotPred

        objective = RotPred(options["rot_lambda"])
    elif loss == "mixoe":
        from .mixoe import MixOE

        objective = MixOE(outliers if outliers is not None else pictures, op=options["mixoe_op"],
                          alpha=options["mixoe_alpha"], beta=options["mixoe_beta"], source=options["mixoe_source"],
                          seed=seed)
    elif loss == "ascood":
        from .ascood import ASCOOD

        objective = ASCOOD(sigma=options["ascood_sigma"], share=options["ascood_p"], op=options["ascood_op"],
                           w=options["ascood_w"], alpha_max=options["ascood_alpha_max"],
                           alpha_min=options["ascood_alpha_min"], seed=seed)
    else:
        objective = CrossEntropy()
    if "pixmix" in augs:
        from .pixmix import PixMix

        objective = Augmented(objective, PixMix(pictures, k=options["pixmix_k"], beta=options["pixmix_beta"],
                                                severity=options["pixmix_severity"],
                                                all_ops=bool(options["pixmix_all_ops"]), seed=seed))
    return objective
