"""PTQ4DM: post-training quantization of diffusion models (Shang, Yuan, Xie, Wu, Yan, CVPR 2023).

What the pass does, following the paper and the authors' scripts:

* per-channel weight and per-tensor activation quantization of every Conv2d / Linear (W8A8 in the paper);
* the calibration set from Normally Distributed Time-step Calibration (Sec. 4.2): ``t ~ N(0.4 T, 0.4 T)``
  per sample and ``x_t`` from the full-precision DDIM sampler (:mod:`.calibration`, ``sampler: ndtc``);
* ranges searched to minimise ``mean |x - q(x)|^p`` with ``p = 2.4`` (Sec. 4.3; ``metric`` switches to the
  ablation's ``mse`` / ``cosine`` / ``kl`` / ``minmax``);
* the authors' scripts then run a short weight-rounding reconstruction (QDrop/BRECQ-style, 100
  iterations, first and last layer at 8 bits); ``recon_iters`` keeps that (AdaRound + block
  reconstruction from :mod:`.reconstruction`; QDrop's random activation dropping is not reproduced).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..passes import register_pass
from .ptq import DiffusionPTQConfig, MinMaxPTQ


@register_pass
class PTQ4DM(MinMaxPTQ):
    """``ptq4dm``: NDTC calibration + Lp (p = 2.4) range search (+ short block reconstruction).

    The same stages as the min-max baseline; what differs is the configuration (sampler, range metric,
    reconstruction iterations)."""

    name = "ptq4dm"
    kinds = ("unet", "unet-cond")

    class Config(DiffusionPTQConfig):
        sampler: Literal["ndtc", "every_k", "uniform", "single_t"] = "ndtc"
        metric: Literal["lp", "mse", "cosine", "kl", "minmax"] = "lp"
        recon_iters: int = Field(100, ge=0, le=100_000, description="AdaRound iterations per block (0 = none)")
