"""SynOOD (Li et al., 2025): near-boundary synthetic outliers and CLIP fine-tuning, plus the zero-shot
CLIP detectors it builds on (MCM, NegLabel).

Modules (imported lazily: the foundation-model ones need transformers / diffusers):

* :mod:`.wordnet` -- WordNet nouns/adjectives read offline (NegLabel's candidate negative labels);
* :mod:`.clip_model` -- a frozen CLIP feature extractor with per-image-set caching;
* :mod:`.clip_detectors` -- the ``mcm`` and ``neglabel`` detectors (Eq. 2, NegMining, grouping);
* :mod:`.contexts` -- VLM context labels of ID images (Eq. 3), resumable JSONL;
* :mod:`.energy` -- the energy loss of Eq. 7;
* :mod:`.generate` -- energy-guided regeneration with SD inpainting (Eqs. 4-10) into an outlier store,
  and the JPEG-complexity selection of ID images (Sec. 3.4);
* :mod:`.refine` -- boundary refinement of any generator's outliers (bounded energy-guided perturbation);
* :mod:`.finetune` / :mod:`.detector` -- projection (Eq. 12) and negative-label features (Eq. 14), the
  ``synood`` detector (``variant``: the paper's Table 1 configuration by default, or an ablation);
* :mod:`.cli` -- ``oodforge contexts`` and ``oodforge synth synood``;
* :mod:`.tiny` -- tiny random CLIP / SD-inpainting / LLaVA models built from configs (tests, CPU smoke runs).
"""
