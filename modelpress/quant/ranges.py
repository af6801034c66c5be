"""Clipping-range search for the signed quantizers: PTQ4DM (Shang et al., CVPR 2023, Sec. 4.3) chooses each
range to minimise the Lp error ``mean |x - q(x)|^p`` with ``p = 2.4``; its ablation's MSE / cosine / KL / min-max
metrics are here too."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .primitives import qparams_from_range, quantize

Metric = Literal["lp", "mse", "cosine", "kl", "minmax"]
METRICS: tuple[str, ...] = ("lp", "mse", "cosine", "kl", "minmax")


def range_error(x: torch.Tensor, xq: torch.Tensor, metric: str, p: float = 2.4, bins: int = 128) -> torch.Tensor:
    """Per-row error between ``x`` and its quantized ``xq`` (both ``[R, N]``); lower is better.

    ``lp``: mean ``|x - q(x)|^p`` (PTQ4DM, p = 2.4); ``mse``: p = 2; ``cosine``: ``1 - cos(x, q(x))``;
    ``kl``: KL divergence of the value histogram of ``q(x)`` from that of ``x`` (``bins`` bins over each row's
    range, additive smoothing).
    """
    if metric == "lp":
        return (x - xq).abs().pow(p).mean(dim=1)
    if metric == "mse":
        return (x - xq).pow(2).mean(dim=1)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(x, xq, dim=1, eps=1e-12)
    if metric == "kl":
        lo = x.min(dim=1, keepdim=True).values
        span = (x.max(dim=1, keepdim=True).values - lo).clamp_min(1e-12)

        def hist(v: torch.Tensor) -> torch.Tensor:
            idx = ((v - lo) / span * bins).floor().clamp(0, bins - 1).long()
            h = torch.zeros(v.shape[0], bins, dtype=v.dtype, device=v.device).scatter_add_(1, idx, torch.ones_like(v))
            return (h + 1e-3) / (h + 1e-3).sum(dim=1, keepdim=True)

        pd, qd = hist(x), hist(xq)
        return (pd * (pd / qd).log()).sum(dim=1)
    raise ValueError(f"unknown range metric {metric!r}")


def search_qparams(x: torch.Tensor, bits: int, symmetric: bool, metric: str = "lp", p: float = 2.4,
                   grid: int = 100, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``x`` (``[R, N]``) minimising :func:`range_error`.

    Candidates shrink the row's ``[min, max]`` by ``1 - i/grid`` for ``i < 0.8 * grid`` (the clipping grid of
    BRECQ / Q-Diffusion / PTQ4DM); ``minmax`` keeps the full range. ``lo`` / ``hi`` override the observed
    extremes (a running min / max when ``x`` is a subsample).
    """
    x = x.float()
    lo = x.min(dim=1).values if lo is None else lo.float()
    hi = x.max(dim=1).values if hi is None else hi.float()
    if metric == "minmax":
        return qparams_from_range(lo, hi, bits, symmetric)
    ratios = 1.0 - torch.arange(int(0.8 * grid), dtype=torch.float32, device=x.device) / grid
    chunk = max(1, min(len(ratios), (1 << 23) // max(1, x.numel())))
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = qparams_from_range(lo, hi, bits, symmetric)
    for c0 in range(0, len(ratios), chunk):
        r = ratios[c0:c0 + chunk, None]  # [K, 1]: all candidates of the chunk at once
        s, z = qparams_from_range(lo[None] * r, hi[None] * r, bits, symmetric)  # [K, R]
        xq = (quantize(x[None], s[..., None], z[..., None], bits, symmetric) - z[..., None]) * s[..., None]
        err = range_error(x.expand(len(r), *x.shape).reshape(-1, x.shape[1]), xq.reshape(-1, x.shape[1]),
                          metric, p).reshape(len(r), -1)  # [K, R]
        k = err.argmin(dim=0)  # first minimum: the widest range among ties
        cols = torch.arange(x.shape[0], device=x.device)
        e, sk, zk = err[k, cols], s[k, cols], z[k, cols]
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, sk, best_s)
        best_z = torch.where(better, zk, best_z)
    return best_s, best_z

