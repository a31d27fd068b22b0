"""Tiny randomly-initialised foundation-model components for the synthesis tests (nothing is downloaded).

Built from configs the way transformers' and diffusers' own tests build theirs, written with
``save_pretrained`` to a folder, so the tests exercise the real from-a-folder loading path:

* a CLIP BPE tokenizer with a character-level vocabulary written here (``vocab`` + ``merges``);
* CLIPSeg (``CLIPSegForImageSegmentation`` + ``CLIPSegProcessor``) with 2-layer 32-wide towers, 32 px input;
* a Stable-Diffusion inpainting pipeline: ``UNet2DConditionModel`` with 9 input channels (4 latent +
  4 masked-image latent + 1 mask), ``AutoencoderKL``, ``CLIPTextModel``, PNDM scheduler.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "-/,.":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = [("o", "f</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def save_tiny_clipseg(folder: str | Path, image_size: int = 32) -> Path:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor
    from transformers.models.vit.image_processing_vit import ViTImageProcessor

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32, reduce_dim=16, extract_layers=[1], decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    model = CLIPSegForImageSegmentation(cfg).eval()
    proc = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": image_size, "width": image_size},
                                                              image_mean=[0.48, 0.46, 0.41],
                                                              image_std=[0.27, 0.26, 0.28]),
                            tokenizer=tok)
    folder = Path(folder)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def save_tiny_sd_inpaint(folder: str | Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                        intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=len(tok) + 8, max_position_embeddings=77))
    pipe = StableDiffusionInpaintPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                                          scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
