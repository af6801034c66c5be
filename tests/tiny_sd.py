"""Small random Stable-Diffusion-shaped diffusers pipelines, written to disk the way diffusers saves them
(``model_index.json`` + one folder per component, safetensors weights): a ``UNet2DConditionModel`` with tiny
channels, an ``AutoencoderKL``, a ``CLIPTextModel`` and a ``CLIPTokenizer`` built from a vocabulary and merges
written here, and a scheduler config (DDIM or PNDM, Stable Diffusion's betas)."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

#: Stable Diffusion 1.x's scheduler settings (scaled_linear betas, no clipping, steps_offset 1)
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


def write_clip_tokenizer(directory: Path) -> None:
    """A CLIP BPE tokenizer over lowercase letters and digits (each also as a word end) with a few merges."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits)
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "f</w>"), ("i", "n"), ("e", "r</w>")]
    tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 16, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))


def make_pipeline(directory: Path, *, latent: bool = True, scheduler: str = "DDIMScheduler",
                  text_width: int = 32, cross_width: int | None = None, channels: tuple[int, ...] = (16, 32),
                  sample_size: int = 8, seed: int = 0, text_encoder: bool = True, with_scheduler: bool = True,
                  layers_per_block: int = 1, text_layers: int = 2, vae_channels: tuple[int, ...] = (8, 16)
                  ) -> Path:
    """A random pipeline directory; ``cross_width`` other than ``text_width`` makes a broken one. Its UNet has
    Stable Diffusion's layout with ``len(channels)`` levels: cross-attention down blocks then one plain one,
    and the mirror on the way up; the VAE downsamples by ``2 ** (len(vae_channels) - 1)``."""
    import diffusers
    import transformers

    directory = Path(directory)
    torch.manual_seed(seed)
    in_ch = 4 if latent else 3
    k = len(channels)
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_ch, out_channels=in_ch, layers_per_block=layers_per_block,
        block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D",) * (k - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (k - 1), cross_attention_dim=cross_width or text_width,
        attention_head_dim=4, norm_num_groups=8)
    unet.save_pretrained(directory / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    if with_scheduler:
        sched = getattr(diffusers, scheduler).from_config(SD_SCHEDULER)
        sched.save_pretrained(directory / "scheduler")
        index["scheduler"] = ["diffusers", scheduler]
    if text_encoder:
        cfg = transformers.CLIPTextConfig(vocab_size=80, hidden_size=text_width, intermediate_size=2 * text_width,
                                          num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=16,
                                          bos_token_id=78, eos_token_id=79, pad_token_id=79)
        transformers.CLIPTextModel(cfg).eval().save_pretrained(directory / "text_encoder")
        write_clip_tokenizer(directory / "tokenizer")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    if latent:
        f = 2 ** (len(vae_channels) - 1)
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
                                      down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                                      up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1,
                                      norm_num_groups=4, sample_size=f * sample_size)
        vae.save_pretrained(directory / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_prompt_images(directory: Path, n: int = 8, size: int = 24) -> Path:
    """``directory/pairs.jsonl``: JSON Lines of prompts with their own images (coloured squares on gray,
    ``size`` x ``size`` RGB PNGs beside it), the prompt-image pairs APTP trains on."""
    import numpy as np
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    rows = []
    for i in range(n):
        name, rgb = list(colours.items())[i % 4]
        a = np.full((size, size, 3), 128, np.uint8)
        s = size / 24  # the square's place and size scale with the image
        a[int((4 + i % 3) * s):int((16 + i % 3) * s), int(6 * s):int(18 * s)] = rgb
        Image.fromarray(a).save(directory / f"{i}.png")
        rows.append(json.dumps({"prompt": f"a {name} square number {i}", "image": f"{i}.png"}))
    (directory / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    return directory / "pairs.jsonl"
