"""Metrics of the diffusion kinds: Fréchet distance (``fd``) and prompt agreement (``prompt_agreement``).

``fd`` is the Fréchet distance between Gaussians fitted to features of generated samples and of held-out real
digits (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Sec. 4: ``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``). The features are the
128-d penultimate layer of the zoo's digits classifier (:mod:`modelpress.zoo.digits`), not Inception: the
numbers are comparable between models of this project at the same sample count, not with published FIDs.
FD is biased upwards at small sample counts, so reference and compressed models are always compared at the
same count and seed (recorded in ``details``).

``prompt_agreement`` is the fraction of ``digits-t2i`` samples whose classifier digit equals the digit named by
their prompt (eval-split prompt templates, never seen in training); chance is 0.1.

Options (``EvalContext.options``): ``steps`` (DDIM steps, default 25), ``guidance_scale`` (default
:data:`GUIDANCE_SCALE`), ``eta`` (default 0), ``prompt_split`` (``"eval"``, the default, or ``"train"``: prompts
written with the training templates, to tell unseen wording from seen).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UserError
from ..model import ModelHandle, sample_shape
from . import EvalContext, MetricResult, register_metric

DEFAULT_SAMPLES = 256
DEFAULT_STEPS = 25
GUIDANCE_SCALE = 2.0
GRID_IMAGES = 64


# ---------------------------------------------------------------------------------------------------
# Fréchet distance

def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, float64) of ``features`` ``[N, D]``."""
    f = np.asarray(features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features,
                   dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` in float64 (Heusel et al., 2017).

    ``sqrtm`` of the product of two PSD matrices is real in exact arithmetic; numerical noise can make it
    complex or singular, in which case ``eps * I`` is added to both covariances and small imaginary parts
    are dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fd_between(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Fréchet distance between two image sets ``[N,1,16,16]`` in [-1, 1], in the digits classifier's features."""
    from ..zoo.digits import classifier_features

    return frechet_distance(*feature_stats(classifier_features(images_a)), *feature_stats(classifier_features(images_b)))


@lru_cache(maxsize=1)
def _real_stats() -> tuple[np.ndarray, np.ndarray, int]:
    from ..zoo.digits import classifier_features, digits_data

    real, _ = digits_data("heldout")
    mu, sigma = feature_stats(classifier_features(real))
    return mu, sigma, len(real)


# ---------------------------------------------------------------------------------------------------
# Generation (shared by both metrics; one run's samples are reused by the second metric on the same model)

_SAMPLE_CACHE: list[tuple[Any, tuple, dict[str, Any]]] = []


def _sample_shape(handle: ModelHandle) -> tuple[int, int, int]:
    shape = sample_shape(handle)
    if shape != (1, 16, 16):
        raise UserError(f"the digits metrics need a model of 1x16x16 samples, this one makes {shape}")
    return shape


def _scheduler(handle: ModelHandle, ctx: EvalContext) -> dict[str, Any]:
    for h in (handle, ctx.reference):
        if h is not None and h.extras.get("scheduler"):
            return dict(h.extras["scheduler"])
    from ..zoo.digits import SCHEDULER_CONFIG

    return dict(SCHEDULER_CONFIG)


def generate(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext) -> dict[str, Any]:
    """Samples of ``model`` for the digits metrics: ``{"samples", "labels", "prompts", "details"}``.

    ``unet``: ``n`` unconditional samples; ``unet-cond``: one sample per prompt of the ``prompt_split``
    option (default ``"eval"``: templates never seen in training; ``"train"``: the training templates), from
    :func:`modelpress.zoo.digits.digit_prompts` with ``ctx.seed``, guided with ``guidance_scale``.
    The seed of the initial noise is ``ctx.seed``.
    """
    from ..sampling import ddim_sample

    n = int(ctx.samples or DEFAULT_SAMPLES)
    steps = int(ctx.options.get("steps", DEFAULT_STEPS))
    w = float(ctx.options.get("guidance_scale", GUIDANCE_SCALE))
    eta = float(ctx.options.get("eta", 0.0))
    split = str(ctx.options.get("prompt_split", "eval"))
    key = (handle.kind, n, steps, w, eta, split, ctx.seed, _fingerprint(model))
    for m, k, out in _SAMPLE_CACHE:
        if m is model and k == key:
            return out
    details: dict[str, Any] = {"n": n, "seed": ctx.seed, "steps": steps, "eta": eta, "sampler": "ddim"}
    progress = bool(ctx.show_progress)
    prompts, labels = None, None
    if handle.kind == "unet-cond":
        from ..zoo.digits import digit_prompts, empty_prompt_embedding, printed_fraction
        from ..zoo.text import encode_prompts

        prompts, labels = digit_prompts(n, ctx.seed, split, printed_fraction(handle))
        cond = torch.cat([encode_prompts(prompts[i:i + 256]) for i in range(0, n, 256)])
        samples = ddim_sample(model, _scheduler(handle, ctx), n, steps=steps, seed=ctx.seed, cond=cond,
                              uncond=empty_prompt_embedding(), guidance_scale=w, eta=eta, progress=progress,
                              sample_shape=_sample_shape(handle))
        details.update(guidance_scale=w, prompt_split=split, prompts=prompts[:GRID_IMAGES])
        if hasattr(handle.module, "routing_mix"):  # prompt-routed pruning: where these prompts went
            details["routing"] = handle.module.routing_mix(cond)
    else:
        samples = ddim_sample(model, _scheduler(handle, ctx), n, steps=steps, seed=ctx.seed, eta=eta,
                              progress=progress, sample_shape=_sample_shape(handle))
    out = {"samples": samples, "labels": labels, "prompts": prompts, "details": details}
    _SAMPLE_CACHE.append((model, key, out))
    del _SAMPLE_CACHE[:-2]
    return out


def _fingerprint(model: Any) -> tuple:
    """Identity of the model's current weights: tensor ids and in-place version counters (a torch module
    modified in place, or with modules swapped, after a metric ran is not served stale samples)."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple((id(t), t._version) for t in [*model.parameters(), *model.buffers()])


def _grid_images(samples: torch.Tensor) -> torch.Tensor:
    from ..sampling import to_unit_range

    return to_unit_range(samples[:GRID_IMAGES])


# ---------------------------------------------------------------------------------------------------
# The metrics

@register_metric("fd", ("unet", "unet-cond"),
                 "Fréchet distance of DDIM samples to held-out real digits in the digits classifier's features")
def fd_metric(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    gen = generate(model, handle, ctx)
    from ..zoo.digits import PRINTED, classifier_features

    samples = gen["samples"]
    if gen["labels"] is not None:  # printed-digit prompts ask for one fixed glyph, not real handwriting
        samples = samples[gen["labels"] < PRINTED]
    mu_r, sigma_r, n_real = _real_stats()
    value = frechet_distance(*feature_stats(classifier_features(samples)), mu_r, sigma_r)
    details = dict(gen["details"])
    details.update(real="digits heldout split", real_n=n_real, features="digits-classifier penultimate (128-d)",
                   samples_compared=len(samples))
    return MetricResult(value, higher_is_better=False, details=details, images=_grid_images(gen["samples"]))


@register_metric("prompt_agreement", ("unet-cond",),
                 "fraction of samples whose classifier digit equals the digit named by their prompt")
def prompt_agreement_metric(model: Callable[..., torch.Tensor], handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    gen = generate(model, handle, ctx)
    from ..zoo.digits import PRINTED, classify

    pred = classify(gen["samples"])
    digit, printed = gen["labels"] % PRINTED, gen["labels"] >= PRINTED
    hits = (pred == digit)
    per_digit = {str(d): float(hits[digit == d].float().mean()) for d in range(10) if bool((digit == d).any())}
    details = dict(gen["details"])
    details.update(per_digit=per_digit, chance=0.1)
    if printed.any():
        details.update(handwritten=float(hits[~printed].float().mean()), printed=float(hits[printed].float().mean()))
    return MetricResult(float(hits.float().mean()), higher_is_better=True, details=details,
                        images=_grid_images(gen["samples"]))
