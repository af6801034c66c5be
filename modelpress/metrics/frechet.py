"""Metrics in the feature space of a network the user names, for any image model:

* ``frechet``: Fréchet distance of the samples to real images (Heusel et al., 2017, Sec. 4; FID is this with
  Inception-v3 pool features);
* ``feature_distance``: fidelity to the full-precision model in that feature space — the compressed and the
  reference model sample from the same seeds and prompts (as ``psnr`` / ``ssim``,
  :func:`modelpress.metrics.fidelity.sample_pairs`), and each pair's features are compared: ``1 - cos(f(x), f(y))``
  averaged over pairs (0 for identical images; the relative L2 distance ``|f(x) - f(y)| / |f(y)|`` is in the
  details). A perceptual counterpart of PSNR: it measures whether the compressed model draws *the same* image
  in the network's eyes, where ``frechet`` only measures whether it draws images of the same distribution.

``options.features`` names the feature network: a transformers vision checkpoint directory (safetensors; e.g. a
``CLIPVisionModel``, ``ViTModel``, ``Dinov2Model``, ``ResNetModel``), whose features are its pooled output
(``image_embeds`` of a projection model, else ``pooler_output``, else the mean of the last hidden state over
tokens / pixels), or ``digits-classifier`` (the zoo's digits features, as the ``fd`` metric). Images are resized
(bilinear, antialiased) to the network's ``image_size`` and normalised with its ``preprocessor_config.json``
(``image_mean`` / ``image_std``) when it has one, else fed in ``[-1, 1]``.

The real images are ``evaluate[i].dataset``'s (an image folder, or JSON Lines with ``image``; with ``prompt``
too, the first ``samples`` prompts are what a text-to-image model samples). Generated samples are drawn as the
fidelity metrics draw them (:func:`modelpress.metrics.fidelity.images`: the model's own sampler, the same seed
for reference and compressed, decoded through the VAE). The distance is biased upwards at small sample counts:
compare models at the same count only (in ``details``).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model import ModelHandle
from . import EvalContext, MetricResult, register_metric
from .diffusion import GRID_IMAGES, feature_stats, frechet_distance
from .fidelity import DEFAULT_SAMPLES, images, sample_pairs

DIGITS = "digits-classifier"


@lru_cache(maxsize=2)
def _vision_model(path: str) -> tuple[Any, dict[str, Any]]:
    import transformers

    p = Path(path)
    if not (p / "config.json").exists():
        raise UserError("options.features: not a transformers checkpoint directory (no config.json), and not "
                        f"{DIGITS!r}", path)
    try:
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"options.features: cannot load the feature network ({str(exc).splitlines()[0]})",
                        path) from None
    pre = json.loads((p / "preprocessor_config.json").read_text()) if (p / "preprocessor_config.json").exists() else {}
    return model, pre


def _image_size(model: Any, pre: dict[str, Any]) -> tuple[int, int] | None:
    size = pre.get("crop_size") or pre.get("size") or getattr(model.config, "image_size", None)
    if isinstance(size, dict):
        size = (size.get("height") or size.get("shortest_edge"), size.get("width") or size.get("shortest_edge"))
    if isinstance(size, int):
        size = (size, size)
    return tuple(int(s) for s in size) if size else None


@torch.no_grad()
def network_features(path: str, unit_images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Features ``[N, D]`` of images ``[N, C, H, W]`` in ``[0, 1]`` (see the module docstring)."""
    if path == DIGITS:
        from ..zoo.digits import IMAGE_SIZE, classifier_features

        x = unit_images.mean(1, keepdim=True) if unit_images.shape[1] != 1 else unit_images
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return classifier_features(x * 2 - 1)
    model, pre = _vision_model(path)
    channels = int(getattr(model.config, "num_channels", 3))
    x = unit_images.float()
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    size = _image_size(model, pre)
    if size and tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if "image_mean" in pre:
        mean = torch.tensor(pre["image_mean"]).view(1, -1, 1, 1)
        std = torch.tensor(pre["image_std"]).view(1, -1, 1, 1)
        x = (x - mean) / std
    else:
        x = x * 2 - 1
    out = []
    for i in range(0, len(x), batch_size):
        o = model(pixel_values=x[i:i + batch_size])
        for name in ("image_embeds", "pooler_output"):
            v = getattr(o, name, None)
            if v is not None:
                out.append(v.reshape(v.shape[0], -1))
                break
        else:
            h = o.last_hidden_state
            out.append(h.mean(1) if h.dim() == 3 else h.flatten(2).mean(2))
    return torch.cat(out).float()


def feature_network(ctx: EvalContext, metric: str) -> str:
    """``options.features`` of the metric's entry (a one-line error when it is missing)."""
    features = ctx.options.get("features")
    if not features:
        raise UserError(f"{metric} needs options.features: a transformers vision checkpoint directory or {DIGITS!r}")
    return str(features)


def pair_distances(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair of feature rows ``[N, D]``: cosine distance ``1 - cos(a, b)`` and relative L2 ``|a - b| / |b|``."""
    a, b = a.double(), b.double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    rel = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)
    return (1 - cos).clamp_min(0).float(), rel.float()


@register_metric("frechet", ("unet", "unet-cond"), "Fréchet distance of samples to the dataset's real images in "
                 "the feature space of the network named by options.features")
def frechet_metric(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    features = feature_network(ctx, "frechet")
    data = ctx.dataset
    if data is None:
        raise UserError("frechet needs real images: set evaluate[i].dataset (an image folder, or JSON Lines with "
                        "'image')")
    data.require("image", "frechet")
    n = int(ctx.samples or DEFAULT_SAMPLES)
    first = data.first(n)
    prompts = None
    if handle.kind == "unet-cond":
        data.require("prompt", "frechet on a text-to-image model")
        prompts = first.prompts
    gen = images(model, handle, ctx, prompts)
    # every real image of a file dataset; a generated one (prompt-image pairs drawn on demand) gives the n drawn
    real_images = (data.all() if data.size is not None else first).images
    real = ((real_images.float() + 1) / 2).clamp(0, 1)
    value = frechet_distance(*feature_stats(network_features(str(features), gen)),
                             *feature_stats(network_features(str(features), real)))
    details = {"n": len(gen), "real_n": len(real), "seed": ctx.seed, "features": str(features),
               "real": data.name}
    return MetricResult(value, higher_is_better=False, details=details, images=gen[:GRID_IMAGES])


@register_metric("feature_distance", ("unet", "unet-cond"), "cosine distance between the features of the samples "
                 "and of the full-precision model's samples from the same seeds and prompts, in the network named "
                 "by options.features", relative=True)
def feature_distance_metric(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    features = feature_network(ctx, "feature_distance")
    got, ref, details = sample_pairs(model, handle, ctx)
    cos, rel = pair_distances(network_features(features, got), network_features(features, ref))
    details.update(features=features, max=float(cos.max()), relative_l2=float(rel.mean()))
    return MetricResult(float(cos.mean()), higher_is_better=False, details=details, images=got[:GRID_IMAGES])
