"""The quantization core shared by the diffusion PTQ passes (``ptq``, ``ptq4dm``, ``tfmq``).

What lives here, each written once:

* uniform affine quantizers with per-channel weights and per-tensor activations, 2-8 bits, symmetric or
  asymmetric, with integer codes in the signed range so that ONNX QDQ export is direct;
* the range search of PTQ4DM (Shang et al., CVPR 2023, Sec. 4.3): clipping ranges chosen to minimise the
  Lp error ``mean |x - q(x)|^p`` with ``p = 2.4``, plus the cosine / KL / min-max metrics of its ablation;
* :class:`QuantLinear` / :class:`QuantConv2d`: registered compressed modules storing packed integer weights
  (4-bit: two codes per byte), per-channel scale and zero point, and the activation quantizer's parameters;
  the forward computes from the stored integers (fake quantization, deterministic);
* :class:`QuantAttnProcessor`: quantized attention matmuls (Q-Diffusion, Li et al., ICCV 2023, Sec. 4.3:
  ``Q K^T`` and ``softmax(.) V`` take quantized operands);
* split quantization of the UNet's concatenated skip inputs (Q-Diffusion Sec. 4.2): the two halves of the
  concatenation get separate activation ranges;
* :class:`TimestepTap`: the UNet's sinusoidal timestep projection, which also publishes the current
  timesteps so that per-timestep ranges (TFMQ-DM's FSC) and cached temporal features can be looked up;
* discovery of quantizable layers, reconstruction blocks, concatenated skip inputs and the temporal
  information block by type and by structure (a probe forward), never by module names.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import math
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import register_module, set_submodule

Metric = Literal["lp", "mse", "cosine", "kl", "minmax"]
METRICS: tuple[str, ...] = ("lp", "mse", "cosine", "kl", "minmax")

# ---------------------------------------------------------------------------------------------------
# Integer ranges, quantize / dequantize



#: why models with these quantized layers do not go to ExecuTorch (see :mod:`modelpress.export.pte`); the PTQ
#: passes declare it, so that a recipe asking for it fails before any work
PTE_REFUSAL = ("XNNPACK's int8 kernels need symmetric weights and a quantized output on every layer, which "
               "the PTQ passes' quantized layers do not have; export the model to onnx or ort (exact int8 QDQ), "
               "or the float model to pte with quantize: int8")

def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed integer code range: narrow ``[-(2^(b-1)-1), 2^(b-1)-1]`` when symmetric (zero point 0),
    full ``[-2^(b-1), 2^(b-1)-1]`` when asymmetric (integer zero point inside the range)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map ``[lo, hi]`` (widened to contain 0) onto the code range."""
    qmin, qmax = int_range(bits, symmetric)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(1e-8)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` (float tensor holding integers)."""
    qmin, qmax = int_range(bits, symmetric)
    return torch.clamp(torch.round(x / scale) + zp, qmin, qmax)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """``s * (clamp(round(x/s) + z) - z)`` with a straight-through estimator for the rounding."""
    qmin, qmax = int_range(bits, symmetric)
    zp = zp.to(x.dtype)
    return (torch.clamp(round_ste(x / scale) + zp, qmin, qmax) - zp) * scale


# ---------------------------------------------------------------------------------------------------
# Range search (PTQ4DM Sec. 4.3 and its ablation)


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
    ratios = 1.0 - torch.arange(int(0.8 * grid), dtype=torch.float32) / grid
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
        cols = torch.arange(x.shape[0])
        e, sk, zk = err[k, cols], s[k, cols], z[k, cols]
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, sk, best_s)
        best_z = torch.where(better, zk, best_z)
    return best_s, best_z


# ---------------------------------------------------------------------------------------------------
# Bit packing: codes of b bits stored (b <= 4: several per byte) as uint8


def codes_per_byte(bits: int) -> int:
    return {2: 4, 3: 2, 4: 2}.get(bits, 1)


def packed_numel(numel: int, bits: int) -> int:
    return -(-numel // codes_per_byte(bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes (any shape) into a flat uint8 tensor, low bits first.

    Each code is offset by ``2^(b-1)`` to an unsigned value in ``[0, 2^b)``; 2-bit codes go four to a byte,
    3- and 4-bit codes two to a byte (one nibble each), 5- to 8-bit codes one per byte.
    """
    per = codes_per_byte(bits)
    u = (codes.reshape(-1).to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, torch.zeros(pad, dtype=torch.uint8, device=u.device)])
    if per == 1:
        return u
    width = 8 // per
    u = u.view(-1, per).to(torch.int32)
    shifts = torch.arange(per, device=u.device, dtype=torch.int32) * width
    return (u << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: flat int8 codes (the first ``numel``)."""
    per = codes_per_byte(bits)
    p = packed.to(torch.int32)
    if per > 1:
        width = 8 // per
        shifts = torch.arange(per, device=p.device, dtype=torch.int32) * width
        p = ((p[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)
    return (p[:numel] - 2 ** (bits - 1)).to(torch.int8)


# ---------------------------------------------------------------------------------------------------
# The current timesteps (published by TimestepTap for per-timestep lookups)

_CURRENT_T: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("modelpress_timesteps", default=None)


def current_timesteps() -> torch.Tensor | None:
    """The timesteps ``[B]`` of the UNet forward in progress (set by :class:`TimestepTap`)."""
    return _CURRENT_T.get()


def set_current_timesteps(t: torch.Tensor | None) -> None:
    """Publish the timesteps of the samples about to run (reconstruction runs blocks outside a UNet forward)."""
    _CURRENT_T.set(None if t is None else t.detach())


def timestep_rows(table: torch.Tensor, batch: int) -> torch.Tensor:
    """Row index into ``table`` (sorted calibrated timesteps) for each sample of the current forward.

    A timestep outside the calibrated finite set uses the nearest calibrated one.
    """
    t = current_timesteps()
    if t is None:
        raise RuntimeError("per-timestep quantizer used outside a UNet forward (no TimestepTap ran)")
    t = t.reshape(-1).to(table.device)
    if t.numel() != batch:
        if t.numel() == 1 or batch % t.numel() == 0:
            t = t.repeat_interleave(batch // t.numel())
        else:
            raise RuntimeError(f"{t.numel()} timesteps for a batch of {batch}")
    return (t.float()[:, None] - table.float()[None, :]).abs().argmin(dim=1)


@register_module
class TimestepTap(nn.Module):
    """Replacement of diffusers' ``Timesteps`` (the sinusoidal projection): same output, and the raw
    timesteps are published for per-timestep quantizers and temporal-feature caches (TFMQ-DM)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0) -> None:
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = int(num_channels), bool(flip_sin_to_cos)
        self.downscale_freq_shift, self.scale = float(downscale_freq_shift), float(scale)

    def module_config(self) -> dict[str, Any]:
        return {"num_channels": self.num_channels, "flip_sin_to_cos": self.flip_sin_to_cos,
                "downscale_freq_shift": self.downscale_freq_shift, "scale": self.scale}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "TimestepTap":
        return cls(**cfg)

    @classmethod
    def from_timesteps(cls, mod: nn.Module) -> "TimestepTap":
        return cls(mod.num_channels, mod.flip_sin_to_cos, mod.downscale_freq_shift, getattr(mod, "scale", 1))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        _CURRENT_T.set(timesteps.detach())
        return get_timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                      downscale_freq_shift=self.downscale_freq_shift, scale=self.scale)


# ---------------------------------------------------------------------------------------------------
# Activation quantizer


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer, optionally split along channels and/or per timestep.

    Buffers: ``scale`` and ``zero_point`` of shape ``[S, G]`` (``S`` timesteps, 1 unless per-timestep;
    ``G`` groups, 2 when split at channel ``split`` of dimension ``channel_dim``), and ``timesteps [S]``
    (the finite set of calibrated timesteps, TFMQ-DM's FSC). While ``observing``, inputs pass through
    unchanged and their running min / max plus a fixed-stride subsample are kept for :meth:`fit`.
    """

    def __init__(self, bits: int, symmetric: bool = False, split: int = 0, channel_dim: int = 1,
                 n_timesteps: int = 0) -> None:
        super().__init__()
        self.bits, self.symmetric, self.split = int(bits), bool(symmetric), int(split)
        self.channel_dim, self.n_timesteps = int(channel_dim), int(n_timesteps)
        s, g = max(1, self.n_timesteps), 2 if self.split else 1
        self.register_buffer("scale", torch.ones(s, g))
        self.register_buffer("zero_point", torch.zeros(s, g, dtype=torch.int32))
        if self.n_timesteps:
            self.register_buffer("timesteps", torch.zeros(s, dtype=torch.int64))
        self.enabled = True
        self.observing = False
        self._obs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._ext: dict[tuple[int, int], tuple[float, float]] = {}
        self._rng: torch.Generator | None = None
        self._seed = 0
        self.log_step: torch.Tensor | None = None  # learned while reconstructing (see learn_step_size)
        self._drop: tuple[float, torch.Generator] | None = None  # QDrop while reconstructing (see drop_quantization)

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "symmetric": self.symmetric, "split": self.split,
                "channel_dim": self.channel_dim, "n_timesteps": self.n_timesteps}

    def _groups(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.split:
            return [x]
        return list(torch.split(x, [self.split, x.shape[self.channel_dim] - self.split], dim=self.channel_dim))

    def _observe(self, x: torch.Tensor, max_keep: int = 16384) -> None:
        x = x.detach().float()
        if self.n_timesteps:
            t = current_timesteps()
            if t is None:
                raise RuntimeError("per-timestep calibration needs a TimestepTap in the model")
            t = t.reshape(-1)
            rows = [(int(tv), x[t == tv]) for tv in torch.unique(t).tolist()]
        else:
            rows = [(-1, x)]
        for tv, xr in rows:
            for g, part in enumerate(self._groups(xr)):
                flat = part.reshape(-1)
                key = (tv, g)
                lo, hi = float(flat.min()), float(flat.max())
                plo, phi = self._ext.get(key, (lo, hi))
                self._ext[key] = (min(lo, plo), max(hi, phi))
                self._obs.setdefault(key, []).append(self._subsample(flat, max_keep))

    def _subsample(self, flat: torch.Tensor, max_keep: int) -> torch.Tensor:
        """At most ``max_keep`` values drawn uniformly at random (seeded, so calibration is reproducible).

        A fixed stride would not do: for an ``[N, C, H, W]`` batch the stride is often a multiple of ``H * W``,
        which keeps one pixel position of every channel and makes the range search fit the image border.
        """
        if flat.numel() <= max_keep:
            return flat.clone()
        if self._rng is None:
            self._rng = torch.Generator().manual_seed(self._seed)
        return flat[torch.randint(flat.numel(), (max_keep,), generator=self._rng)]

    def seed_subsample(self, seed: int) -> None:
        """Seed the observation subsample (the run's seed, so that the calibration draw varies with it)."""
        self._seed, self._rng = int(seed), None

    def drop_quantization(self, prob: float, gen: torch.Generator | None = None) -> None:
        """QDrop (Wei et al., ICLR 2022, Sec. 3.3): while ``prob > 0``, each element of the output keeps its
        full-precision value with probability ``prob`` instead of its quantized one, so that block
        reconstruction sees a flatter loss surface; ``prob = 0`` turns it off (inference)."""
        self._drop = (float(prob), gen or torch.Generator().manual_seed(0)) if prob > 0 else None

    def fit(self, metric: str = "lp", p: float = 2.4) -> None:
        """Set scale / zero point from the observed values (:func:`search_qparams`), then stop observing."""
        if not self._ext:
            raise RuntimeError("activation quantizer fitted without observations")
        tvals = sorted({k[0] for k in self._ext})
        if self.n_timesteps:
            if len(tvals) > self.n_timesteps:
                raise RuntimeError(f"{len(tvals)} timesteps observed, table holds {self.n_timesteps}")
            tvals = tvals + [tvals[-1]] * (self.n_timesteps - len(tvals))
            self.timesteps.copy_(torch.tensor(tvals, dtype=torch.int64))
        for si, tv in enumerate(tvals):
            for g in range(self.scale.shape[1]):
                key = (tv, g)
                vals = torch.cat(self._obs[key])[None]
                lo, hi = self._ext[key]
                s, z = search_qparams(vals, self.bits, self.symmetric, metric, p,
                                      lo=torch.tensor([lo]), hi=torch.tensor([hi]))
                self.scale[si, g] = s[0]
                self.zero_point[si, g] = z[0]
        self._obs, self._ext, self._rng, self.observing = {}, {}, None, False

    def learn_step_size(self) -> torch.Tensor:
        """Start learning the step size (LSQ, Esser et al. 2020, as BRECQ / Q-Diffusion do during block
        reconstruction): returns ``u`` with ``scale * exp(u)`` the step in use; zero point fixed. The
        log parametrisation keeps the step positive and makes one learning rate fit every layer."""
        self.log_step = torch.zeros_like(self.scale, requires_grad=True)
        return self.log_step

    def fix_step_size(self) -> None:
        """Fold the learned ``exp(u)`` into ``scale`` and stop learning."""
        if self.log_step is not None:
            with torch.no_grad():
                self.scale.mul_(self.log_step.exp())
            self.log_step = None

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale / zero point broadcastable against one channel group of ``x``: ``[S', G]`` rows."""
        scale = self.scale if self.log_step is None else self.scale * self.log_step.exp()
        if self.n_timesteps:
            idx = timestep_rows(self.timesteps, x.shape[0])
            return scale[idx], self.zero_point[idx]
        return scale, self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        scale, zp = self._params(x)
        out = []
        for g, part in enumerate(self._groups(x)):
            s, z = scale[:, g], zp[:, g]
            if self.n_timesteps:  # one row per sample
                shape = [-1] + [1] * (part.dim() - 1)
                s, z = s.reshape(shape), z.reshape(shape)
            else:
                s, z = s.reshape(()), z.reshape(())
            out.append(fake_quant(part, s, z, self.bits, self.symmetric))
        xq = out[0] if len(out) == 1 else torch.cat(out, dim=self.channel_dim)
        if self._drop is not None:
            prob, gen = self._drop
            keep_fp = torch.rand(x.shape, generator=gen) < prob
            xq = torch.where(keep_fp, x, xq)
        return xq

    def export(self) -> dict[str, Any]:
        d: dict[str, Any] = {"act_bits": self.bits, "act_symmetric": self.symmetric,
                             "act_scale": self.scale.clone(), "act_zero_point": self.zero_point.to(torch.int8),
                             "act_split": self.split}
        if self.n_timesteps:
            d["act_timesteps"] = self.timesteps.clone()
        return d


# ---------------------------------------------------------------------------------------------------
# Quantized Conv2d / Linear


class _QuantLayer(nn.Module):
    """Shared body of :class:`QuantLinear` and :class:`QuantConv2d`.

    Stored (state_dict): ``qweight`` (packed codes, uint8), ``w_scale [C_out]`` (float32),
    ``w_zero_point [C_out]`` (int8), ``bias`` (float, same name as the original), and the activation
    quantizer's buffers under ``act.`` when ``act_bits > 0``.

    During calibration the float weight is kept in the Python attribute ``fp_weight`` (not saved) and the
    forward fake-quantizes it, with AdaRound's learned rounding when ``round_logits`` is set (Nagel et al.,
    ICML 2020, Eq. 22-23). :meth:`freeze` turns the result into integer codes and drops the float weight.
    """

    channel_dim = 1

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, w_bits: int, w_symmetric: bool,
                 act_bits: int = 0, act_symmetric: bool = False, act_split: int = 0, act_timesteps: int = 0) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.w_bits, self.w_symmetric = int(w_bits), bool(w_symmetric)
        self.act_bits, self.act_symmetric = int(act_bits), bool(act_symmetric)
        numel = math.prod(self.weight_shape)
        self.register_buffer("qweight", torch.zeros(packed_numel(numel, self.w_bits), dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(self.weight_shape[0]))
        self.register_buffer("w_zero_point", torch.zeros(self.weight_shape[0], dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0]), requires_grad=False) if has_bias else None
        self.act = ActQuantizer(act_bits, act_symmetric, act_split, self.channel_dim, act_timesteps) if act_bits else None
        self.fp_weight: torch.Tensor | None = None
        self.round_logits: torch.Tensor | None = None
        self.soft_round = False
        self.weight_quant = True
        self._deq: torch.Tensor | None = None

    # -- configuration / export ---------------------------------------------------------------------
    def _quant_config(self) -> dict[str, Any]:
        a = self.act.config() if self.act is not None else {}
        return {"weight_shape": list(self.weight_shape), "has_bias": self.bias is not None,
                "w_bits": self.w_bits, "w_symmetric": self.w_symmetric, "act_bits": self.act_bits,
                "act_symmetric": self.act_symmetric, "act_split": a.get("split", 0),
                "act_timesteps": a.get("n_timesteps", 0)}

    @property
    def has_act_quant(self) -> bool:
        """Whether an activation quantizer sits on this layer's input."""
        return self.act is not None

    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes, unpacked, int8, in the weight's shape."""
        if self.fp_weight is not None:
            return self._codes_from_float().to(torch.int8)
        return unpack_codes(self.qweight, self.w_bits, math.prod(self.weight_shape)).reshape(self.weight_shape)

    def export_qparams(self) -> dict[str, Any]:
        """Everything an ONNX QDQ exporter needs, in ONNX's conventions (``x = (q - zero_point) * scale``):

        ``weight_codes`` int8 tensor in the weight's shape; ``weight_scale`` float32 ``[C_out]`` and
        ``weight_zero_point`` int8 ``[C_out]`` (per output channel, axis 0); ``weight_bits``,
        ``weight_symmetric``; ``bias``; ``has_act_quant``; and when it is true ``act_scale`` /
        ``act_zero_point`` of shape ``[S, G]`` (per tensor: ``S = G = 1``; ``G = 2`` when the input is split
        at channel ``act_split``, the concatenated UNet skip; ``S`` > 1 rows indexed by ``act_timesteps``
        for per-timestep ranges), ``act_bits``, ``act_symmetric``. Codes of fewer than 8 bits lie in the
        b-bit range and fit int8 directly.
        """
        d: dict[str, Any] = {"weight_codes": self.weight_codes(), "weight_scale": self.w_scale.clone(),
                             "weight_zero_point": self.w_zero_point.clone(), "weight_bits": self.w_bits,
                             "weight_symmetric": self.w_symmetric,
                             "bias": None if self.bias is None else self.bias.detach().clone(),
                             "has_act_quant": self.has_act_quant}
        if self.act is not None:
            d.update(self.act.export())
        return d

    # -- calibration-time weight handling -----------------------------------------------------------
    def set_float_weight(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.fp_weight = w.detach().float().clone()
        if bias is not None and self.bias is not None:
            self.bias.data.copy_(bias.detach().float())

    def init_weight_qparams(self, metric: str = "lp", p: float = 2.4) -> None:
        """Per-output-channel weight ranges by :func:`search_qparams` (``minmax`` for the baseline)."""
        w2 = self.fp_weight.reshape(self.weight_shape[0], -1)
        s, z = search_qparams(w2, self.w_bits, self.w_symmetric, metric, p)
        self.w_scale.copy_(s)
        self.w_zero_point.copy_(z.to(torch.int8))
        self.round_logits = None

    def _wshape(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape([-1] + [1] * (len(self.weight_shape) - 1))

    def _codes_from_float(self) -> torch.Tensor:
        s, z = self._wshape(self.w_scale), self._wshape(self.w_zero_point.float())
        qmin, qmax = int_range(self.w_bits, self.w_symmetric)
        if self.round_logits is None:
            return torch.clamp(torch.round(self.fp_weight / s) + z, qmin, qmax)
        up = (adaround_h(self.round_logits) >= 0.5).float()
        return torch.clamp(torch.floor(self.fp_weight / s) + up + z, qmin, qmax)

    def init_adaround(self) -> torch.Tensor:
        """Create AdaRound's continuous rounding variables V with ``h(V)`` = the fractional part of ``W/s``."""
        s = self._wshape(self.w_scale)
        frac = self.fp_weight / s - torch.floor(self.fp_weight / s)
        self.round_logits = adaround_logit(frac).requires_grad_(True)
        self.soft_round = True
        return self.round_logits

    def current_weight(self) -> torch.Tensor:
        if self.fp_weight is None:
            if self._deq is None:
                codes = self.weight_codes().float()
                self._deq = (codes - self._wshape(self.w_zero_point.float())) * self._wshape(self.w_scale)
            return self._deq
        if not self.weight_quant:
            return self.fp_weight
        s, z = self._wshape(self.w_scale), self._wshape(self.w_zero_point.float())
        qmin, qmax = int_range(self.w_bits, self.w_symmetric)
        if self.round_logits is not None and self.soft_round:
            q = torch.clamp(torch.floor(self.fp_weight / s) + adaround_h(self.round_logits) + z, qmin, qmax)
        else:
            q = self._codes_from_float()
        return (q - z) * s

    def freeze(self) -> None:
        """Store the integer codes packed and drop the float weight and rounding variables."""
        if self.fp_weight is None:
            return
        codes = self._codes_from_float().to(torch.int8)
        self.qweight = pack_codes(codes, self.w_bits)
        self.fp_weight, self.round_logits, self.soft_round, self._deq = None, None, False, None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._deq = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.current_weight().to(x.dtype)
        return self._op(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@register_module
class QuantLinear(_QuantLayer):
    """Quantized ``nn.Linear`` (see :class:`_QuantLayer`)."""

    channel_dim = -1

    def module_config(self) -> dict[str, Any]:
        return self._quant_config()

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "QuantLinear":
        return cls(**cfg)

    @classmethod
    def from_float(cls, mod: nn.Linear, **quant: Any) -> "QuantLinear":
        q = cls(tuple(mod.weight.shape), mod.bias is not None, **quant)
        q.set_float_weight(mod.weight, mod.bias)
        return q.to(mod.weight.device)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)


@register_module
class QuantConv2d(_QuantLayer):
    """Quantized ``nn.Conv2d`` (see :class:`_QuantLayer`); ``groups`` / padding modes as the original."""

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, w_bits: int, w_symmetric: bool,
                 stride: tuple[int, int] = (1, 1), padding: Any = (0, 0), dilation: tuple[int, int] = (1, 1),
                 groups: int = 1, padding_mode: str = "zeros", **act: Any) -> None:
        super().__init__(weight_shape, has_bias, w_bits, w_symmetric, **act)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.groups, self.padding_mode = int(groups), padding_mode

    def module_config(self) -> dict[str, Any]:
        return {**self._quant_config(), "stride": list(self.stride), "dilation": list(self.dilation),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "groups": self.groups, "padding_mode": self.padding_mode}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "QuantConv2d":
        return cls(**cfg)

    @classmethod
    def from_float(cls, mod: nn.Conv2d, **quant: Any) -> "QuantConv2d":
        q = cls(tuple(mod.weight.shape), mod.bias is not None, stride=mod.stride, padding=mod.padding,
                dilation=mod.dilation, groups=mod.groups, padding_mode=mod.padding_mode, **quant)
        q.set_float_weight(mod.weight, mod.bias)
        return q.to(mod.weight.device)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, [p for p in reversed(self.padding) for _ in range(2)], mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


QUANT_LAYERS = (QuantLinear, QuantConv2d)

# ---------------------------------------------------------------------------------------------------
# AdaRound's rectified sigmoid (Nagel et al. 2020, Eq. 23)

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def adaround_h(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def adaround_logit(frac: torch.Tensor) -> torch.Tensor:
    """The V with ``h(V) = frac``."""
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (frac.clamp(0.01, 0.99) - ADAROUND_GAMMA) - 1)


# ---------------------------------------------------------------------------------------------------
# Quantized attention matmuls


@register_module
class QuantAttnProcessor(nn.Module):
    """An attention processor (diffusers ``Attention.processor``) whose two matmuls take quantized operands:
    ``q``, ``k`` (for ``Q K^T``), the softmax probabilities and ``v`` (for ``P V``), each with a per-tensor
    activation quantizer (Q-Diffusion Sec. 4.3). Otherwise it computes what diffusers' default processor
    computes. It is an ``nn.Module``, so diffusers keeps it as the child ``processor`` and its ranges are saved.
    """

    OPERANDS = ("q", "k", "v", "probs")

    def __init__(self, act_bits: int, act_symmetric: bool = False) -> None:
        super().__init__()
        self.act_bits, self.act_symmetric = int(act_bits), bool(act_symmetric)
        for name in self.OPERANDS:
            setattr(self, f"{name}_quant", ActQuantizer(act_bits, act_symmetric if name != "probs" else False, 0, -1))

    def module_config(self) -> dict[str, Any]:
        return {"act_bits": self.act_bits, "act_symmetric": self.act_symmetric}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "QuantAttnProcessor":
        return cls(**cfg)

    def quantizers(self) -> list[ActQuantizer]:
        return [getattr(self, f"{n}_quant") for n in self.OPERANDS]

    def export_qparams(self) -> dict[str, Any]:
        """Per-tensor activation scale / zero point / bits of each matmul operand (``q``, ``k``, ``v``, ``probs``)."""
        return {n: getattr(self, f"{n}_quant").export() for n in self.OPERANDS}

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> torch.Tensor:
        return nn.Module.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = self.q_quant(query) @ self.k_quant(key).transpose(-1, -2) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        out = self.probs_quant(probs) @ self.v_quant(value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------------
# Discovery by type and structure


@functools.lru_cache(maxsize=1)
def _diffusers_types() -> dict[str, type]:
    """diffusers' building-block classes."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import Timesteps
    from diffusers.models.resnet import ResnetBlock2D

    return {"attention": Attention, "resnet": ResnetBlock2D, "transformer": BasicTransformerBlock,
            "timesteps": Timesteps}


def _is_attention(mod: nn.Module) -> bool:
    return isinstance(mod, _diffusers_types()["attention"])


def is_resnet(mod: nn.Module) -> bool:
    """A diffusers residual block (by type)."""
    return isinstance(mod, _diffusers_types()["resnet"])


def _is_transformer_block(mod: nn.Module) -> bool:
    return isinstance(mod, _diffusers_types()["transformer"])


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` (exact float layers, by type) of ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, QUANT_LAYERS)]


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BRECQ's reconstruction units: residual blocks, transformer blocks and attention modules (outermost
    first, by type), then every quantized layer not inside one of them (layer-wise reconstruction)."""
    units: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if any(name.startswith(u + ".") for u, _ in units):
            continue
        if is_resnet(mod) or _is_transformer_block(mod) or _is_attention(mod):
            units.append((name, mod))
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS) and not any(name.startswith(u + ".") for u, _ in units):
            units.append((name, mod))
    return units


def layers_in(mod: nn.Module) -> list[_QuantLayer]:
    return [m for m in mod.modules() if isinstance(m, QUANT_LAYERS)]


def skip_concat_splits(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """Split points of the UNet's concatenated skip inputs, by structure.

    An up block is a module whose ``forward`` takes ``res_hidden_states_tuple``; each of its residual blocks
    receives ``cat([h, skip])``, where ``h`` has the channels of the block's input (first resnet, read in a
    probe forward ``run()``) or of the previous resnet's output. The returned map is ``resnet path -> channels
    of h``; the split applies to the layer that reads the raw concatenation (the residual block's shortcut).
    """
    ups: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        try:
            params = inspect.signature(mod.forward).parameters
        except (TypeError, ValueError):
            continue
        if "res_hidden_states_tuple" in params and hasattr(mod, "resnets"):
            ups[name] = mod
    entering: dict[str, int] = {}
    handles = []
    for name, mod in ups.items():
        def hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            entering.setdefault(name, int(h.shape[1]))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    run_with_hooks(run, handles)
    splits: dict[str, int] = {}
    for name, mod in ups.items():
        for i, res in enumerate(mod.resnets):
            h_ch = entering.get(name) if i == 0 else mod.resnets[i - 1].out_channels
            if h_ch is not None and 0 < h_ch < res.in_channels:
                splits[f"{name}.resnets.{i}"] = int(h_ch)
    return splits


def swap_in_quant_layers(model: nn.Module, names: Iterable[str], quant_for: Callable[[str, nn.Module], dict[str, Any]]) -> dict[str, _QuantLayer]:
    """Replace each named float layer with its quantized twin; ``quant_for(name, layer)`` gives its options."""
    out: dict[str, _QuantLayer] = {}
    for name in names:
        mod = model.get_submodule(name)
        cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
        q = cls.from_float(mod, **quant_for(name, mod))
        set_submodule(model, name, q)
        out[name] = q
    return out


def install_timestep_tap(model: nn.Module) -> list[str]:
    """Replace every diffusers ``Timesteps`` module (found by type) with a :class:`TimestepTap`."""
    names = [n for n, m in model.named_modules() if isinstance(m, _diffusers_types()["timesteps"])]
    for n in names:
        set_submodule(model, n, TimestepTap.from_timesteps(model.get_submodule(n)))
    return names


def install_attention_quant(model: nn.Module, act_bits: int, act_symmetric: bool) -> list[str]:
    """Give every diffusers ``Attention`` (found by type) a :class:`QuantAttnProcessor`; returns their paths."""
    names = []
    for n, m in model.named_modules():
        if _is_attention(m) and not isinstance(getattr(m, "processor", None), QuantAttnProcessor):
            names.append(n)
    for n in names:
        model.get_submodule(n).set_processor(QuantAttnProcessor(act_bits, act_symmetric))
    return [f"{n}.processor" if n else "processor" for n in names]


class _Stop(Exception):
    pass


def run_with_hooks(run: Callable[[], Any], handles: list[Any]) -> None:
    """Run ``run()`` without gradients, then remove the hook ``handles`` whatever happens."""
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, run: Callable[[], Any], modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of ``modules`` in the order a forward (``run()``) first calls them."""
    order: list[str] = []
    handles = []
    for name, mod in modules:
        def hook(_m: nn.Module, _i: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles.append(mod.register_forward_pre_hook(hook))
    run_with_hooks(run, handles)
    return order


def temporal_layers(model: nn.Module, run_pair: Callable[[int], Any], layers: list[tuple[str, nn.Module]]) -> list[str]:
    """TFMQ-DM's temporal information block, found by structure: the layers whose input depends on the
    timestep only. ``run_pair(i)`` runs the model with input set ``i`` in {0, 1}: different samples (and
    conditions) but the same timesteps. Layers whose input is identical in both runs form the TIB (the
    time-embedding MLP and every residual block's time-embedding projection)."""
    seen: list[dict[str, torch.Tensor]] = [{}, {}]
    for which in (0, 1):
        handles = []
        for name, mod in layers:
            def hook(_m: nn.Module, inp: Any, name: str = name, which: int = which) -> None:
                seen[which][name] = inp[0].detach().clone()
            handles.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                run_pair(which)
        finally:
            for h in handles:
                h.remove()
    out = []
    for name, _ in layers:
        a, b = seen[0].get(name), seen[1].get(name)
        if a is not None and b is not None and a.shape == b.shape and torch.equal(a, b):
            out.append(name)
    return out


def quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def freeze_all(model: nn.Module) -> None:
    """Pack every quantized layer's integer weights (drops float weights and rounding variables)."""
    for _, m in quant_modules(model):
        m.freeze()
