"""Fidelity metrics for any image diffusion model: how close the compressed model's samples are to the
full-precision model's samples drawn from the same seeds and prompts (``psnr``, ``ssim``; the feature-space
``feature_distance`` is in :mod:`.frechet`, beside the feature networks).

Both models sample with the model's own sampler (the zoo's DDIM, or a diffusers pipeline's scheduler and
guidance scale, :func:`modelpress.sampling.sample`) from the same initial noise (``ctx.seed``) and the same
prompts; latent samples are decoded through the pipeline's VAE first
(:func:`modelpress.diffusers_pipeline.decode_latents`), so the images compared are what a user sees.
Images are compared in ``[0, 1]``:

* ``psnr``: ``10 log10(1 / MSE)`` per image, averaged over images (dB; identical images are capped at
  :data:`PSNR_CAP`, so the reference's own value is that cap);
* ``ssim``: the structural similarity index of Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment:
  From Error Visibility to Structural Similarity" (IEEE TIP 2004), eq. 13 with the paper's settings
  (11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, valid windows only, as the authors' reference
  implementation), per channel, averaged over windows, channels and images.

Prompts (``unet-cond``): the first ``samples`` of a seeded draw from ``evaluate[i].dataset`` (a prompts file:
one per line, or JSON Lines with ``prompt``), else the zoo model's own evaluation prompts. Options:
``steps`` (default 25), ``guidance_scale`` (default: the pipeline's, else 2.0 as the digits metrics).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..diffusers_pipeline import decode_latents
from ..errors import UserError
from ..model import ModelHandle, sample_shape
from ..sampling import sample, sampler_of, scheduler_config, to_unit_range
from . import EvalContext, MetricResult, register_metric
from .diffusion import DEFAULT_STEPS, GRID_IMAGES, GUIDANCE_SCALE, _fingerprint

DEFAULT_SAMPLES = 16
#: PSNR of identical images (dB)
PSNR_CAP = 100.0
#: Wang et al. 2004: Gaussian window size and width, and the stabilising constants
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image pair ``[N, C, H, W]`` in ``[0, 1]``, capped at :data:`PSNR_CAP`."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004, eq. 13) of each image pair ``[N, C, H, W]`` in ``[0, 1]``; the window
    shrinks to the image when the image is smaller than 11 pixels."""
    n, c, h, w = a.shape
    size = min(SSIM_WINDOW, h, w)
    win = _gaussian_window(size, SSIM_SIGMA).expand(c, 1, size, size)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def eval_prompts(handle: ModelHandle, ctx: EvalContext, n: int) -> list[str] | None:
    """The prompts both models sample from (``None`` for an unconditional UNet)."""
    if handle.kind != "unet-cond":
        return None
    data = ctx.dataset
    if data is None:
        from ..sources import load_dataset

        data = load_dataset(None, ctx.reference or handle, "evaluation")
    if data is None:
        raise UserError("image fidelity of a text-to-image model needs prompts: set evaluate[i].dataset to a "
                        "prompts file (one per line, or JSON Lines with 'prompt')")
    data.require("prompt", "image fidelity")
    return data.draw(n, ctx.seed).prompts


_IMAGE_CACHE: list[tuple[tuple, torch.Tensor]] = []


def images(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext,
           prompts: list[str] | None) -> torch.Tensor:
    """Decoded samples ``[N, C, H, W]`` in ``[0, 1]`` of ``model`` (seed ``ctx.seed``, one per prompt), sampled,
    encoded and decoded as ``handle`` says (its scheduler, guidance, shape, text encoder and VAE)."""
    from ..data.inputs import encode_prompts

    n = len(prompts) if prompts is not None else int(ctx.samples or DEFAULT_SAMPLES)
    steps = int(ctx.options.get("steps", DEFAULT_STEPS))
    w = float(ctx.options.get("guidance_scale", handle.extras.get("guidance_scale", GUIDANCE_SCALE)))
    ident = _fingerprint(model) or (id(model),)
    how = (sampler_of(handle), repr(sorted(scheduler_config(handle).items())), sample_shape(handle))
    key = (ident, how, n, steps, w, ctx.seed, tuple(prompts or ()))
    for k, out in _IMAGE_CACHE:
        if k == key:
            return out
    kwargs: dict[str, Any] = {}
    if prompts is not None:
        kwargs = {"cond": encode_prompts(handle, prompts), "uncond": encode_prompts(handle, [""]), "guidance_scale": w}
    x = sample(model, scheduler_config(handle), n, sampler=sampler_of(handle), steps=steps, seed=ctx.seed,
               sample_shape=sample_shape(handle), progress=bool(ctx.show_progress), **kwargs)
    out = to_unit_range(decode_latents(handle, x))
    _IMAGE_CACHE.append((key, out))
    del _IMAGE_CACHE[:-4]
    return out


def sample_pairs(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The model's and the reference's decoded samples ``[N, C, H, W]`` in ``[0, 1]`` (same seed, same prompts),
    and what describes them for the report."""
    if ctx.reference is None:
        raise UserError("image fidelity compares with the full-precision model: no reference model was given")
    n = int(ctx.samples or DEFAULT_SAMPLES)
    prompts = eval_prompts(handle, ctx, n)
    got = images(model, handle, ctx, prompts)
    # the reference samples exactly as the model does (its scheduler, guidance, shape, text encoder, VAE)
    ref = images(ctx.reference.canonical(), handle, ctx, prompts)
    details = {"n": len(got), "seed": ctx.seed, "steps": int(ctx.options.get("steps", DEFAULT_STEPS)),
               "sampler": scheduler_config(handle).get("_class_name", "ddim") if sampler_of(handle) != "ddim"
               else "ddim", "decoded_by_vae": bool((handle.extras.get("pipeline") or {}).get("vae")),
               "image_shape": list(got.shape[1:])}
    if prompts is not None:
        details.update(prompts=prompts[:GRID_IMAGES],
                       guidance_scale=float(ctx.options.get("guidance_scale",
                                                            handle.extras.get("guidance_scale", GUIDANCE_SCALE))))
    return got, ref, details


@register_metric("psnr", ("unet", "unet-cond"), "PSNR (dB) of samples to the full-precision model's samples "
                 "from the same seeds and prompts (decoded through the VAE when latent)", relative=True)
def psnr_metric(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    got, ref, details = sample_pairs(model, handle, ctx)
    per = psnr(got, ref)
    details.update(min=float(per.min()), cap=PSNR_CAP)
    return MetricResult(float(per.mean()), higher_is_better=True, details=details, images=got[:GRID_IMAGES])


@register_metric("ssim", ("unet", "unet-cond"), "SSIM (Wang et al. 2004) of samples to the full-precision "
                 "model's samples from the same seeds and prompts (decoded through the VAE when latent)",
                 relative=True)
def ssim_metric(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    got, ref, details = sample_pairs(model, handle, ctx)
    per = ssim(got, ref)
    details.update(min=float(per.min()))
    value = float(per.mean())
    if not math.isfinite(value):
        raise UserError("SSIM is not finite: the samples hold NaN or infinite values")
    return MetricResult(value, higher_is_better=True, details=details, images=got[:GRID_IMAGES])
