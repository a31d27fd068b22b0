"""SynOOD near-boundary outlier generation (Sec. 3.3, Eqs. 4-10) into an outlier store.

For an ID image ``x_in`` with VLM contexts ``p_con`` (:mod:`.contexts`), Stable-Diffusion inpainting
regenerates the whole image (full-image mask ``M = 1``, the reference code's choice) from the prompt
``"A photo only remain {contexts}."`` at ``strength`` 0.6 with 20 steps:

* Eq. 4: ``z_T = sqrt(abar_T) z_in + sqrt(1 - abar_T) eps`` (``z_in`` = VAE encoding of ``x_in``,
  ``T`` = the first timestep kept by ``strength``);
* Eqs. 5-6: the pipeline denoises ``z_T`` to ``z_0 = gamma(z_T, T, P, M)`` and the VAE decodes
  ``x_syn = h(z_0)``;
* Eq. 7: the energy loss ``L^O = m_out - S(x_syn)`` of a classifier ``g`` (:mod:`.energy`);
* Eqs. 9-10 (skip gradient, Chen et al. 2023): the Jacobian of the denoising chain is skipped,
  ``grad_eps L ~= rho * dL/dz_0`` (back-propagated through ``h`` and ``g`` only), and the initial noise
  is updated ``eps := eps - r * rho * dL/dz_0`` with ``r * rho = 10``, for 3 iterations.

The image regenerated from the last noise is the outlier. Outliers and their records go to an
:class:`~oodforge.outliers.store.OutlierStore` shard by shard, so a killed run resumes without losing or
duplicating an outlier; ``shard="i/m"`` splits the work over machines (merge with ``oodforge synth
merge``). Every outlier's initial noise is seeded by ``(seed, source_index, k)``, so a resumed or
sharded run produces the same outliers as one uninterrupted run.

Section 3.4's selection of the most informative ID images (highest JPEG bytes per pixel per class)
is :func:`select_complex_images`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import ArrayDataset
from ..hub import ModelUnavailableError, load_sd_inpaint_pipeline
from .clip_model import resolve_device
from .contexts import context_prompt
from .energy import adapt_images, energy_loss, energy_score, logit_fn

SD_OPTION_HELP = ("a Stable-Diffusion inpainting pipeline: pass --sd-model with a hub id such as "
                  "stabilityai/stable-diffusion-2-inpainting or a local folder saved with save_pretrained")


# --- Section 3.4: the most complex ID images ----------------------------------------------------
def jpeg_bytes_per_pixel(images: torch.Tensor | np.ndarray, quality: int = 95) -> np.ndarray:
    """JPEG file size (bytes, ``cv2.imencode``) divided by the pixel count, per uint8 ``[N, C, H, W]`` image."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {arr.dtype} {arr.shape}")
    out = np.empty(arr.shape[0])
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    for i, img in enumerate(arr):
        hwc = img[0] if img.shape[0] == 1 else cv2.cvtColor(np.ascontiguousarray(img.transpose(1, 2, 0)),
                                                            cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(hwc), params)
        if not ok:
            raise RuntimeError("cv2.imencode failed to encode an image as JPEG")
        out[i] = buf.size / (img.shape[1] * img.shape[2])
    return out


def select_complex_images(dataset: ArrayDataset, per_class: int, quality: int = 95) -> np.ndarray:
    """Indices of the ``per_class`` images of each class with the highest JPEG bytes per pixel (Sec. 3.4).

    SynOOD selects "the most information-rich images within each category" by the ratio of JPEG file
    size to pixel count. Returned sorted by index; ties are broken by index (stable).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    bpp = jpeg_bytes_per_pixel(dataset.images.numpy(), quality)
    labels = dataset.labels.numpy()
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = idx[np.argsort(-bpp[idx], kind="stable")]
        keep.append(order[:per_class])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


# --- the pipeline ------------------------------------------------------------------------------
def load_inpaint_pipeline(sd_model: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """``StableDiffusionInpaintPipeline.from_pretrained`` (no safety checker; fp16 only on CUDA)."""
    if sd_model is None or str(sd_model).strip() == "":
        raise ModelUnavailableError(f"SynOOD generation needs {SD_OPTION_HELP}")
    dev = resolve_device(device)
    pipe = load_sd_inpaint_pipeline(sd_model, "SynOOD generation: inpainting pipeline", "--sd-model",
                                    torch.float16 if dev.type == "cuda" else None)
    return pipe.to(dev)


class NearBoundaryGenerator:
    """Energy-guided regeneration of ID images (Eqs. 4-10) with a diffusers inpainting pipeline.

    ``classifier`` is an oodforge Classifier or any callable ``[0, 1] images -> logits``; generated RGB
    images are resized to ``classifier_size`` (and converted to gray for 1-channel classifiers) before it.
    ``step_size`` is ``r * rho`` of Eq. 10; ``iterations`` the number of noise updates (3 in the paper).
    """

    def __init__(self, pipe, classifier: Callable[[torch.Tensor], torch.Tensor], m_out: float, *,
                 classifier_size: int | tuple[int, int] | None = None, temperature: float = 1.0,
                 loss_form: str = "hinge", strength: float = 0.6, num_inference_steps: int = 20,
                 iterations: int = 3, step_size: float = 10.0, guidance_scale: float = 7.5, resolution: int = 512,
                 device: str | torch.device = "cpu"):
        if not 0.0 < strength < 1.0:
            raise ValueError(f"strength must be in (0, 1) (SynOOD uses 0.6), got {strength}")
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (Stable Diffusion's requirement), got {resolution}")
        self.pipe = pipe
        self.device = resolve_device(device)
        if isinstance(classifier, torch.nn.Module):
            classifier.eval()
        self.classifier = classifier
        self.fn = logit_fn(classifier, getattr(classifier, "in_channels", None), classifier_size)
        self.m_out = float(m_out)
        self.temperature = temperature
        self.loss_form = loss_form
        self.strength = strength
        self.num_inference_steps = num_inference_steps
        self.iterations = iterations
        self.step_size = step_size
        self.guidance_scale = guidance_scale
        self.resolution = resolution

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.vae.dtype

    def config(self) -> dict:
        return {"sd_model": getattr(self.pipe, "name_or_path", type(self.pipe).__name__), "m_out": self.m_out,
                "temperature": self.temperature, "loss_form": self.loss_form, "strength": self.strength,
                "num_inference_steps": self.num_inference_steps, "iterations": self.iterations,
                "step_size": self.step_size, "guidance_scale": self.guidance_scale, "resolution": self.resolution,
                "mask": "full", "scheduler": type(self.pipe.scheduler).__name__}

    # --- pieces of Eqs. 4-6 -------------------------------------------------------------------
    def to_pipeline_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> RGB ``[B, 3, R, R]`` in [0, 1] at the generation resolution."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        r = self.resolution
        if tuple(x.shape[-2:]) != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > r).clamp(0, 1)
        return x

    @torch.no_grad()
    def encode(self, x01: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """``z_in = f(x_in)``: VAE latents (sampled with each item's generator), scaled."""
        vae = self.pipe.vae
        x = (2 * x01 - 1).to(self.device, self.dtype)
        z = torch.cat([vae.encode(x[i:i + 1]).latent_dist.sample(generator=g) for i, g in enumerate(generators)])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """``x_syn = h(z_0)`` in [0, 1] (differentiable)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode(z0 / vae.config.scaling_factor + shift, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def start_timestep(self) -> torch.Tensor:
        sched = self.pipe.scheduler
        sched.set_timesteps(self.num_inference_steps, device=self.device)
        timesteps, n = self.pipe.get_timesteps(self.num_inference_steps, self.strength, self.device)
        if n < 1:
            raise ValueError(f"strength {self.strength} with {self.num_inference_steps} steps leaves no denoising step")
        return timesteps[:1]

    @torch.no_grad()
    def denoise(self, z_in: torch.Tensor, eps: torch.Tensor, x01: torch.Tensor, prompts: list[str],
                seeds: list[int]) -> torch.Tensor:
        """Eq. 4 then Eqs. 5-6 up to the latent: ``z_0 = gamma(z_T, T, P, M)`` with the full-image mask.

        The pipeline's own random draws (the VAE sample of the masked image, stochastic schedulers) use
        generators freshly seeded per call, so ``z_0`` depends on the noise ``eps`` only.
        """
        generators = [torch.Generator(device="cpu").manual_seed(int(s) + 1) for s in seeds]
        t0 = self.start_timestep()
        sched = self.pipe.scheduler
        z_t = sched.add_noise(z_in, eps, t0.repeat(z_in.shape[0]))
        mask = torch.ones(x01.shape[0], 1, *x01.shape[-2:], device=self.device)
        out = self.pipe(prompt=list(prompts), image=x01.to(self.device), mask_image=mask,
                        latents=(z_t / sched.init_noise_sigma).to(self.dtype), strength=self.strength,
                        num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                        height=self.resolution, width=self.resolution, generator=generators, output_type="latent",
                        return_dict=True)
        return out.images

    def loss_and_grad(self, z0: torch.Tensor, need_grad: bool = True):
        """Per-sample Eq. 7 loss and energy score of ``h(z_0)``, and ``dL/dz_0`` (the skip gradient, Eq. 9)."""
        z = z0.detach().float().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            x = self.decode(z.to(self.dtype))
            logits = self.fn(x).float()
            loss = energy_loss(logits, self.m_out, self.temperature, self.loss_form, reduction="none")
            grad = torch.autograd.grad(loss.sum(), z)[0] if need_grad else None
        return x.detach(), loss.detach().cpu(), energy_score(logits.detach(), self.temperature).cpu(), grad

    # --- Eqs. 9-10 -----------------------------------------------------------------------------
    def generate(self, images: torch.Tensor, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, dict]:
        """Regenerate ``images`` ([B, C, H, W] in [0, 1]) with energy-guided noise; returns RGB outliers
        ``[B, 3, R, R]`` in [0, 1] and ``{"loss": [iterations + 1, B], "score": [iterations + 1, B]}``
        (Eq. 7 loss and energy score of the image generated at each iteration; the last is the output's).
        """
        if not (len(images) == len(prompts) == len(seeds)):
            raise ValueError("generate: images, prompts and seeds must have the same length")
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        x01 = self.to_pipeline_images(images).to(self.device)
        z_in = self.encode(x01, gens)
        eps = torch.stack([torch.randn(z_in.shape[1:], generator=g) for g in gens]).to(self.device, z_in.dtype)
        losses, scores = [], []
        x = None
        for it in range(self.iterations + 1):
            z0 = self.denoise(z_in, eps, x01, prompts, seeds)
            last = it == self.iterations
            x, loss, score, grad = self.loss_and_grad(z0, need_grad=not last)
            losses.append(loss)
            scores.append(score)
            if not last:
                eps = eps - self.step_size * grad.to(eps.dtype)  # Eq. 10 with the skip gradient of Eq. 9
        return x.cpu(), {"loss": torch.stack(losses), "score": torch.stack(scores)}


# --- into the outlier store --------------------------------------------------------------------
def to_store_images(x: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """RGB ``[B, 3, R, R]`` in [0, 1] -> uint8 ``[B, *shape]`` (resized; gray by luminance when C = 1)."""
    c, h, w = shape
    y = adapt_images(x.float(), c, (h, w)).clamp(0, 1)
    return (y * 255).round().to(torch.uint8).numpy()


def synthesize_synood(
    dataset: ArrayDataset,
    contexts: dict[int, list[str] | str],
    generator: NearBoundaryGenerator,
    out: str | os.PathLike,
    *,
    indices: np.ndarray | list[int] | None = None,
    shard: str | None = None,
    k: int = 1,
    batch_size: int = 4,
    seed: int = 0,
    output_shape: tuple[int, int, int] | None = None,
    max_context_chars: int = 73,
    config_extra: dict | None = None,
    commit_every: int = 32,
    progress: bool = True,
):
    """Generate ``k`` SynOOD outliers per selected ID image into the outlier store ``out`` (resumable).

    ``indices`` selects the source images (default: every image that has contexts; e.g. pass
    :func:`select_complex_images`); ``shard="i/m"`` keeps this machine's part of them. Outliers are
    stored at ``output_shape`` (default: the dataset's image shape, so the classifier can score them).
    Finished outliers are committed to the store every ``commit_every`` outliers (a kill loses at most
    that much work). Returns the :class:`~oodforge.outliers.store.OutlierStore`.
    """
    from ..outliers.store import OutlierStore

    if k < 1 or batch_size < 1 or commit_every < 1:
        raise ValueError(f"k, batch_size and commit_every must be >= 1, got {k}, {batch_size}, {commit_every}")
    idx = _source_indices(dataset, contexts, indices, shard)
    shape = tuple(output_shape) if output_shape is not None else dataset.image_shape
    config = {"method": "synood", **generator.config(), "k": k, "seed": seed, "source": dataset.identity,
              "image_shape": list(shape), "class_names": dataset.class_names, "shard": shard,
              "prompt": context_prompt("{contexts}", max_context_chars), "max_context_chars": max_context_chars,
              **(config_extra or {})}
    store = OutlierStore(out, config)
    with store.writer():
        done = store.done_keys()
        todo = [(int(i), j) for i in idx for j in range(k) if (int(i), j) not in done]
        _generate_missing(dataset, contexts, generator, store, todo, shape, batch_size, seed, max_context_chars,
                          commit_every, progress)
    return store


def _source_indices(dataset: ArrayDataset, contexts: dict, indices, shard: str | None) -> np.ndarray:
    """The selected source images (default: every image with contexts) that this shard does; refuses a
    selection with images that have no contexts or indices outside the dataset, before any generation."""
    from ..outliers.store import shard_indices

    if indices is None:
        idx = np.array(sorted(i for i in contexts if 0 <= i < len(dataset)), dtype=np.int64)
    else:
        idx = np.asarray(indices, dtype=np.int64)
    missing = [int(i) for i in idx if int(i) not in contexts]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(idx)} selected images have no contexts (e.g. index "
                         f"{missing[0]}); label them first (`oodforge contexts` with the same selection) or give "
                         "a contexts JSONL that covers them")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(dataset)):
        raise ValueError(f"source indices must be in [0, {len(dataset)}), got {idx.min()}..{idx.max()}")
    return idx[shard_indices(len(idx), shard)]


def _generate_missing(dataset: ArrayDataset, contexts: dict, generator: NearBoundaryGenerator, store,
                      todo: list[tuple[int, int]], shape: tuple[int, ...], batch_size: int, seed: int,
                      max_context_chars: int, commit_every: int, progress: bool) -> None:
    """Generate the ``todo`` outliers ``(source, k)`` ``batch_size`` at a time (outlier ``(i, k)`` seeded by
    ``outlier_seed``), committing a store shard every ``commit_every`` outliers and at the end; each record
    keeps its prompt and the Eq. 7 loss / energy score after every noise update."""
    from ..outliers.store import outlier_seed
    from ..progress import progress_bar

    bar = progress_bar(total=len(todo), desc="synood", unit="img", disable=not progress)
    pending_imgs: list[np.ndarray] = []
    pending_recs: list[dict] = []

    def commit() -> None:
        if pending_recs:
            store.add_shard(np.concatenate(pending_imgs), list(pending_recs))
            pending_imgs.clear()
            pending_recs.clear()

    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        src = [i for i, _ in chunk]
        prompts = [context_prompt(contexts[i], max_context_chars) for i in src]
        seeds = [outlier_seed(seed, i, j) for i, j in chunk]
        x, info = generator.generate(dataset.images[src].float() / 255.0, prompts, seeds)
        pending_imgs.append(to_store_images(x, shape))
        pending_recs.extend(
            {"source_index": i, "k": j, "seed": s, "label": int(dataset.labels[i]), "prompt": p,
             "loss": [round(float(v), 6) for v in info["loss"][:, n]],
             "score": [round(float(v), 6) for v in info["score"][:, n]]}
            for n, ((i, j), s, p) in enumerate(zip(chunk, seeds, prompts)))
        if len(pending_recs) >= commit_every:
            commit()
        bar.update(len(chunk))
    commit()
    bar.close()


__all__ = ["NearBoundaryGenerator", "synthesize_synood", "select_complex_images", "jpeg_bytes_per_pixel",
           "load_inpaint_pipeline", "to_store_images", "SD_OPTION_HELP"]
