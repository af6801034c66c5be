"""A draw of examples as a model's canonical inputs (see :mod:`modelpress.model` for the kinds).

* ``encoder`` / ``classifier`` / ``causal-lm``: the texts, tokenized with the model's own tokenizer (the one
  beside its checkpoint, ``extras["tokenizer_dir"]``), padded to ``seq_len`` tokens (on the right; a
  tokenizer without a pad token, like GPT-2's or Llama's, pads with its end-of-sequence token and the
  attention mask marks the real tokens);
* ``unet``: the images, resized to the model's sample size and forward-noised,
  ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` at uniform random training timesteps ``t`` of the model's own
  schedule (DDPM, Ho et al. 2020, eq. 4);
* ``unet-cond``: the same plus the prompts' embeddings from the model's prompt encoder
  (``extras["prompt_encoder"]``, registered with :func:`modelpress.data.register_prompt_encoder`, or the
  text encoder of the diffusers pipeline it came from);
* a diffusers pipeline's UNet given data without images (a prompts file): states of its own sampler's
  trajectories (:func:`sampled_inputs`).

The ``random`` dataset gives seeded random canonical inputs (:func:`modelpress.model.example_inputs`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from ..diffusers_pipeline import encode_images, is_latent, pixel_size
from ..errors import UserError
from ..model import TEXT_KINDS, ModelHandle, example_inputs, max_positions, sample_shape
from ..sampling import alphas_cumprod, model_timesteps, sample, sampler_of, scheduler_config
from . import Dataset, Examples, prompt_encoder


@lru_cache(maxsize=8)
def _tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model's tokenizer ({str(exc).splitlines()[0]})", directory) from None


def tokenizer_for(handle: ModelHandle) -> Any:
    """The tokenizer saved beside the model's checkpoint."""
    directory = handle.extras.get("tokenizer_dir")
    if not directory:
        raise UserError("text data needs the model's tokenizer: put tokenizer.json (and tokenizer_config.json) "
                        "beside its config.json", handle.source)
    return _tokenizer(str(directory))


def tokenize(handle: ModelHandle, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``texts`` padded / truncated to ``seq_len`` tokens (at most the
    model's :func:`~modelpress.model.max_positions`)."""
    longest = max_positions(handle)
    seq_len = min(seq_len, longest) if longest else seq_len
    tok = tokenizer_for(handle)
    options: dict[str, Any] = {}
    if tok.pad_token is None:  # GPT-2, Llama: pad with end-of-sequence, the attention mask marks real tokens
        if tok.eos_token is None:
            raise UserError("the model's tokenizer has neither a pad token nor an end-of-sequence token to pad "
                            "with", str(handle.extras.get("tokenizer_dir")))
        tok.pad_token = tok.eos_token
    if handle.kind == "causal-lm":
        options["padding_side"] = "right"  # the canonical call of a causal LM: real tokens first
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt",
              **options)
    return enc["input_ids"], enc["attention_mask"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real (unmasked) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def encode_prompts(handle: ModelHandle, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """``encoder_hidden_states [N, L, D]`` of ``prompts`` from the model's prompt encoder: a registered one
    (``extras["prompt_encoder"]``: the zoo's MiniLM, or a recipe's ``model.prompt_encoder``), else the text
    encoder of the diffusers pipeline the model came from."""
    name = handle.extras.get("prompt_encoder")
    pipeline = handle.extras.get("pipeline") or {}
    if not name and pipeline.get("text_encoder"):
        from ..diffusers_pipeline import encode_prompts as pipeline_encode

        def encode(chunk: list[str]) -> torch.Tensor:
            return pipeline_encode(pipeline, chunk)
    elif not name:
        raise UserError("prompts need the model's text encoder: this unet-cond model names none "
                        "(extras['prompt_encoder'])", handle.source)
    else:
        encode = prompt_encoder(str(name))
    return torch.cat([encode(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]).float()


def fit_images(handle: ModelHandle, images: torch.Tensor, where: str) -> torch.Tensor:
    """``images`` resized (bilinear, antialiased) to the model's sample size; one channel repeated, or RGB
    averaged to gray, when the channel counts differ in that way. A latent diffusers pipeline's images are
    resized to the VAE's pixel size and encoded to latents (:func:`modelpress.diffusers_pipeline.encode_images`)."""
    c, h, w = sample_shape(handle)
    if is_latent(handle):
        c, (h, w) = 3, pixel_size(handle, (h, w))
    if images.shape[1] != c:
        if images.shape[1] == 1:
            images = images.expand(-1, c, -1, -1)
        elif c == 1:
            images = images.mean(1, keepdim=True)
        else:
            raise UserError(f"images have {images.shape[1]} channels, the model takes {c}", where)
    if tuple(images.shape[2:]) != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    if is_latent(handle):
        return encode_images(handle, images).contiguous()
    return images.contiguous()


def noised(handle: ModelHandle, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, t)``: ``x0`` forward-noised at uniform random training timesteps (DDPM eq. 4)."""
    ab = alphas_cumprod(scheduler_config(handle)).float()
    t = torch.randint(0, len(ab), (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = ab[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t


def model_inputs(handle: ModelHandle, dataset: Dataset, n: int, generator: torch.Generator | int,
                 seq_len: int = 64) -> tuple[tuple[torch.Tensor, ...], Examples]:
    """``n`` examples of ``dataset`` drawn with ``generator`` (or a seed) as the model's canonical inputs
    (stacked), and the examples themselves."""
    g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    if dataset.is_random:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        return example_inputs(handle, batch=n, seq_len=seq_len, seed=seed), Examples(ids=list(range(n)))
    if handle.kind in TEXT_KINDS:
        dataset.require("text", f"a {handle.kind} model")
        ex = dataset.draw(n, g)
        return tokenize(handle, ex.texts, seq_len), ex
    if handle.kind in ("unet", "unet-cond") and sampler_of(handle) == "pipeline" and "image" not in dataset.fields:
        return sampled_inputs(handle, dataset, n, g)
    if handle.kind in ("unet", "unet-cond"):
        dataset.require("image", f"calibrating a {handle.kind} model on its data")
        if handle.kind == "unet-cond":
            dataset.require("prompt", "a unet-cond model")
        ex = dataset.draw(n, g)
        xt, t = noised(handle, fit_images(handle, ex.images, dataset.name), g)
        if handle.kind == "unet":
            return (xt, t), ex
        return (xt, t, encode_prompts(handle, ex.prompts)), ex
    raise UserError(f"no data inputs for a {handle.kind} model")


#: scheduler steps of the trajectories :func:`sampled_inputs` draws states from
TRAJECTORY_STEPS = 25


@torch.no_grad()
def sampled_inputs(handle: ModelHandle, dataset: Dataset, n: int, g: torch.Generator,
                   steps: int = TRAJECTORY_STEPS) -> tuple[tuple[torch.Tensor, ...], Examples]:
    """Inputs of a diffusers pipeline's UNet from its own sampler, for data without images (a prompts file):
    ``n`` trajectories of the pipeline's scheduler in ``steps`` steps (classifier-free guided with the
    pipeline's guidance scale, one drawn prompt each), one state of each at a uniformly drawn step; every
    other row carries the empty prompt, since guided sampling calls the UNet on both. The states are what the
    UNet meets when it samples (latents for a latent pipeline), never forward-noised data."""
    ex = dataset.draw(n, g)
    cond = uncond = None
    if handle.kind == "unet-cond":
        dataset.require("prompt", "a text-conditioned pipeline")
        cond, uncond = encode_prompts(handle, ex.prompts), encode_prompts(handle, [""])
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    sched = scheduler_config(handle)
    visited = model_timesteps(sched, steps, "pipeline")
    step = torch.randint(0, len(visited), (n,), generator=g)
    _, traj = sample(handle.canonical().eval(), sched, n, sampler="pipeline", steps=steps, seed=seed, cond=cond,
                     uncond=uncond, guidance_scale=float(handle.extras.get("guidance_scale", 1.0)),
                     return_trajectory=True, sample_shape=sample_shape(handle), batch_size=64)
    x = torch.stack([traj[int(s)][1][i] for i, s in enumerate(step)])
    t = torch.tensor([visited[int(s)] for s in step], dtype=torch.int64)
    if cond is None:
        return (x, t), ex
    c = cond.clone()
    c[1::2] = uncond[0]
    return (x, t, c), ex


def batched(inputs: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Stacked canonical inputs split into batches of ``batch_size`` rows."""
    n = len(inputs[0])
    return [tuple(x[s:s + batch_size] for x in inputs) for s in range(0, n, batch_size)]


def labelled_text(handle: ModelHandle, dataset: Dataset, n: int | None, seq_len: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of the first ``n`` examples (all when ``None``) of a labelled
    text dataset, labels mapped to the classifier's class indices (class names through its ``label2id``)."""
    dataset.require("text", "a text metric")
    dataset.require("label", "accuracy")
    ex = dataset.first(n)
    ids, mask = tokenize(handle, ex.texts, seq_len)
    return ids, mask, class_indices(handle, ex.labels, dataset.name)


def class_indices(handle: ModelHandle, labels: list[int | str], where: str) -> torch.Tensor:
    """Labels as the classifier's class indices; a label it does not have is a one-line error."""
    cfg = handle.architecture.get("config", {})
    n_classes = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 0)
    label2id = {str(k): int(v) for k, v in (cfg.get("label2id") or {}).items()}
    out = []
    for i, lab in enumerate(labels):
        if isinstance(lab, str):
            if lab not in label2id:
                raise UserError(f"example {i + 1}: label {lab!r} is not a class of the model (classes: "
                                f"{', '.join(sorted(label2id)) or 'none named'})", where)
            lab = label2id[lab]
        if n_classes and not 0 <= lab < n_classes:
            raise UserError(f"example {i + 1}: label {lab} is out of range for a model with {n_classes} classes",
                            where)
        out.append(lab)
    return torch.tensor(out, dtype=torch.long)
