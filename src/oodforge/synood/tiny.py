"""Tiny randomly-initialised foundation models, built from configs and saved with ``save_pretrained``.

No CLIP, Stable Diffusion or VLM weights can be downloaded on our machines, so the tests (and a CPU
smoke run of the SynOOD commands) build miniature models the way transformers and diffusers test
themselves: real classes (``CLIPModel``, ``StableDiffusionInpaintPipeline``, ``LlavaForConditionalGeneration``)
with a few thousand parameters, and tokenizers made from vocabulary files written here. Loading them
back with ``from_pretrained`` exercises exactly the code path a real model takes; their outputs are
meaningless (random weights), their shapes and plumbing are not.

* :func:`build_tiny_clip` -- CLIP (ViT 32 px, patch 8) + ``CLIPProcessor`` with a character-level
  byte-BPE vocabulary (``vocab.json`` + ``merges.txt``), so distinct words get distinct features;
* :func:`build_tiny_inpaint_pipeline` -- Stable-Diffusion inpainting (9-channel UNet, VAE, CLIP text
  encoder, PNDM scheduler), 32 px images;
* :func:`build_tiny_vlm` -- LLaVA (CLIP vision tower + Llama decoder) + ``LlavaProcessor`` with a
  character-level tokenizer and a chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_ASCII = [chr(c) for c in range(33, 127)]
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _quiet_processor_warnings() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def write_clip_bpe_vocab(folder: str | os.PathLike) -> Path:
    """Write a character-level CLIP BPE vocabulary (``vocab.json``, empty ``merges.txt``) into ``folder``.

    Every printable ASCII character is a token, with and without CLIP's end-of-word marker ``</w>``;
    with no merges each word is spelled out character by character.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _ASCII:
        vocab.setdefault(c, len(vocab))
    for c in _ASCII:
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def tiny_clip_tokenizer(folder: str | os.PathLike):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_bpe_vocab(folder)), model_max_length=77)


def _image_processor(size: int):
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor as Proc
    return Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_tiny_clip(path: str | os.PathLike, seed: int = 0, image_size: int = 32, dim: int = 32,
                    projection_dim: int = 16) -> Path:
    """Save a random tiny ``CLIPModel`` + ``CLIPProcessor`` into ``path``; returns ``path``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    _quiet_processor_warnings()
    path = Path(path)
    tok = tiny_clip_tokenizer(path / "_vocab")
    tc = CLIPTextConfig(vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vc = CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=dim, intermediate_size=2 * dim,
                          num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path)
    CLIPProcessor(image_processor=_image_processor(image_size), tokenizer=tok).save_pretrained(path)
    return path


def build_tiny_inpaint_pipeline(path: str | os.PathLike, seed: int = 0, sample_size: int = 32) -> Path:
    """Save a random tiny ``StableDiffusionInpaintPipeline`` (9-channel UNet) into ``path``; returns ``path``."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_processor_warnings()
    path = Path(path)
    tok = tiny_clip_tokenizer(path / "_vocab")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size // 2, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=sample_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_tiny_vlm(path: str | os.PathLike, seed: int = 0, image_size: int = 16) -> Path:
    """Save a random tiny LLaVA (``AutoModelForImageTextToText``) + ``LlavaProcessor`` into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    _quiet_processor_warnings()
    path = Path(path)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + [" "] + _ASCII)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", additional_special_tokens=["<image>"], model_max_length=512)
    patch = 8
    processor = LlavaProcessor(image_processor=_image_processor(image_size), tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    vc = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


__all__ = ["build_tiny_clip", "build_tiny_inpaint_pipeline", "build_tiny_vlm", "write_clip_bpe_vocab",
           "tiny_clip_tokenizer"]
