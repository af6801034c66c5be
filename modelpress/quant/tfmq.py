"""TFMQ-DM: Temporal Feature Maintenance Quantization for diffusion models, and its extension.

Huang, Gong, Liu, Xu, Yang, Liu, "TFMQ-DM: Temporal Feature Maintenance Quantization for Diffusion
Models", CVPR 2024; extension: Huang et al., "Temporal Feature Matters: A Framework for Diffusion Model
Quantization" (arXiv 2407.19547).

* Temporal Information Block (TIB): the modules whose output depends on the timestep only — the
  time-embedding MLP and every residual block's time-embedding projection. Found by structure
  (:func:`modelpress.quant.surgery.temporal_layers`: layers whose input is unchanged when the sample and the
  prompt change but t does not), never by names.
* TIAR (Temporal Information Aware Reconstruction): the TIB's outputs (all temporal features, i.e. the
  outputs of the projections) are reconstructed directly — AdaRound over the TIB layers with the loss
  ``sum_l ||f_l(t) - f^q_l(t)||^2`` over the finite timestep set, with no x_t involved. The rest of the
  network then gets the usual BRECQ block reconstruction with the TIB left as TIAR made it.
* FSC (Finite Set Calibration): t comes from the finite set of the sampler's timesteps, so every
  activation quantizer inside the TIB keeps one range per timestep (looked up at run time).
* Cache-based maintenance (extension): the temporal features are pre-computed for every timestep of the
  set, quantized (``a_bits``, one range per timestep) and stored in a lookup table
  (:class:`CachedTemporalFeature`) that replaces the projection at inference.
* Disturbance-aware selection (extension): per projection, the one of {TIB-based, cache-based} with the
  lower temporal-feature error (relative MSE over the timestep set) is kept.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

from ..model import ModelHandle
from ..modules import register_module, set_submodule
from ..passes import Context, Pass, register_pass
from . import surgery
from .primitives import pack_signed_codes, packed_bytes, quantize, unpack_signed_codes
from .ranges import search_qparams
from .surgery import _Stop
from .timesteps import set_current_timesteps, timestep_rows
from .ptq import (NO_PTE, DiffusionPTQConfig, QState, calibrate_activations, finish, init_weight_ranges,
                  on_run_device, prepare, reconstruct_blocks)
from .reconstruction import ReconSettings, adaround_optimize


@register_module
class CachedTemporalFeature(nn.Module):
    """A time-embedding projection replaced by its quantized outputs for each timestep of the finite set
    (TFMQ-DM extension, cache-based maintenance). Buffers: ``timesteps [S]``, packed ``codes`` of
    ``[S, features]``, ``scale [S]``, ``zero_point [S]`` (int8). The input is ignored; the row is chosen by
    the current timestep (nearest calibrated one outside the set)."""

    def __init__(self, n_timesteps: int, features: int, bits: int = 8) -> None:
        super().__init__()
        self.n_timesteps, self.features, self.bits = int(n_timesteps), int(features), int(bits)
        self.register_buffer("timesteps", torch.zeros(self.n_timesteps, dtype=torch.int64))
        self.register_buffer("codes", torch.zeros(packed_bytes(self.n_timesteps * self.features, self.bits),
                                                  dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(self.n_timesteps))
        self.register_buffer("zero_point", torch.zeros(self.n_timesteps, dtype=torch.int8))
        self._table: torch.Tensor | None = None

    def module_config(self) -> dict[str, Any]:
        return {"n_timesteps": self.n_timesteps, "features": self.features, "bits": self.bits}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "CachedTemporalFeature":
        return cls(**cfg)

    @classmethod
    def from_features(cls, timesteps: torch.Tensor, feats: torch.Tensor, bits: int, metric: str = "lp",
                      p: float = 2.4) -> "CachedTemporalFeature":
        """Quantize ``feats [S, D]`` (one row per timestep), one asymmetric range per row."""
        m = cls(feats.shape[0], feats.shape[1], bits)
        s, z = search_qparams(feats.float(), bits, False, metric, p)
        codes = quantize(feats.float(), s[:, None], z[:, None], bits, False).to(torch.int8)
        m.timesteps.copy_(timesteps)
        m.codes.copy_(pack_signed_codes(codes, bits))
        m.scale.copy_(s)
        m.zero_point.copy_(z.to(torch.int8))
        return m

    def table(self) -> torch.Tensor:
        """The dequantized feature table ``[S, D]``."""
        if self._table is None:
            c = unpack_signed_codes(self.codes, self.bits, self.n_timesteps * self.features).reshape(self.n_timesteps, -1)
            self._table = (c.float() - self.zero_point.float()[:, None]) * self.scale[:, None]
        return self._table

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._table = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "CachedTemporalFeature":
        self._table = None  # rebuilt from the moved / cast buffers
        return super()._apply(fn, *args, **kwargs)

    def export_qparams(self) -> dict[str, Any]:
        """The lookup table: int8 ``codes [S, D]``, per-timestep ``scale`` / ``zero_point``, ``timesteps``."""
        c = unpack_signed_codes(self.codes, self.bits, self.n_timesteps * self.features).reshape(self.n_timesteps, -1)
        return {"codes": c, "scale": self.scale.clone(), "zero_point": self.zero_point.clone(),
                "timesteps": self.timesteps.clone(), "bits": self.bits, "has_act_quant": False}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table()[timestep_rows(self.timesteps, x.shape[0])].to(x.dtype)


def tib_outputs(model: nn.Module, tib: list[str]) -> list[str]:
    """The TIB layers whose outputs leave the TIB: the projections inside residual blocks (the
    time-embedding MLP feeds them). Without residual blocks, every TIB layer counts as an output."""
    named = dict(model.named_modules())
    inside = [n for n in tib if any(surgery.is_resnet(named[p]) for p in _ancestors(n))]
    return inside or list(tib)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def temporal_features(model_fn: Callable[..., Any], model: nn.Module, names: list[str], batch: tuple[torch.Tensor, ...],
                      grad: bool = False) -> dict[str, torch.Tensor]:
    """Outputs of the ``names`` layers for ``batch`` (the forward stops once all of them ran)."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def post(_m: nn.Module, _i: Any, out: torch.Tensor, n: str = n) -> None:
            got[n] = out if grad else out.detach()
            if len(got) == len(names):
                raise _Stop
        handles.append(model.get_submodule(n).register_forward_hook(post))
    try:
        with torch.set_grad_enabled(grad):
            model_fn(*batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def feature_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative squared error of the temporal features, averaged over timesteps."""
    return float(((a - b).pow(2).sum(1) / b.pow(2).sum(1).clamp_min(1e-12)).mean())


def tiar(st: QState, ctx: Context, outputs: list[str]) -> dict[str, Any]:
    """TIAR: AdaRound over the TIB layers so that all temporal features match the full-precision ones on
    every timestep of the finite set (x_t plays no part)."""
    batch = st.tib_batch()
    target = temporal_features(st.fp_fn(), st.fp, outputs, batch)
    layers = [st.layers[n] for n in st.tib]
    settings = ReconSettings(iters=st.cfg.recon_iters, lr=st.cfg.recon_lr, reg_weight=st.cfg.recon_reg)
    q_fn = st.q_fn()

    def loss_fn(_it: int) -> torch.Tensor:
        got = temporal_features(q_fn, st.q, outputs, batch, grad=True)
        return sum((got[n] - target[n]).pow(2).mean() for n in outputs)

    stats = adaround_optimize(layers, loss_fn, settings, ctx.progress, "TIAR")
    set_current_timesteps(None)
    return stats


def maintain(st: QState, outputs: list[str], mode: str) -> dict[str, Any]:
    """Cache-based maintenance and disturbance-aware selection (``mode`` ``cache`` / ``select``);
    ``tib`` only measures the temporal-feature errors."""
    batch = st.tib_batch()
    ts = batch[1]
    fp = temporal_features(st.fp_fn(), st.fp, outputs, batch)
    qd = temporal_features(st.q_fn(), st.q, outputs, batch)
    bits = st.cfg.a_bits or 8
    choice: dict[str, Any] = {}
    for n in outputs:
        cache = CachedTemporalFeature.from_features(ts, fp[n], bits, st.cfg.metric if st.cfg.metric != "kl" else "lp",
                                                    st.cfg.p).to(fp[n].device)
        err_tib, err_cache = feature_error(qd[n], fp[n]), feature_error(cache.table(), fp[n])
        use_cache = mode == "cache" or (mode == "select" and err_cache < err_tib)
        if use_cache:
            set_submodule(st.q, n, cache)
            st.layers.pop(n, None)
        choice[n] = {"tib_error": err_tib, "cache_error": err_cache, "kept": "cache" if use_cache else "tib"}
    return choice


@register_pass
class TFMQ(Pass):
    """``tfmq``: Q-Diffusion core (time-step-aware calibration, split skips, BRECQ + AdaRound) with the
    temporal information block maintained by TIAR + FSC, by a feature cache, or per module by
    disturbance-aware selection between the two."""

    name = "tfmq"
    refuses_export = NO_PTE
    kinds = ("unet", "unet-cond")

    class Config(DiffusionPTQConfig):
        sampler: Literal["ndtc", "every_k", "uniform", "single_t"] = "every_k"
        metric: Literal["lp", "mse", "cosine", "kl", "minmax"] = "lp"
        recon_iters: int = Field(200, ge=0, le=100_000, description="AdaRound iterations per block (0 = none)")
        tiar: bool = True
        fsc: bool = True
        maintenance: Literal["tib", "cache", "select"] = "select"

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        cfg = self.config
        st = prepare(model, ctx, cfg, self.name, fsc=cfg.fsc)
        with on_run_device(st, ctx):
            init_weight_ranges(st)
            calibrate_activations(st)
            outputs = tib_outputs(st.q, st.tib)
            st.log["tib_outputs"] = outputs
            if cfg.tiar and cfg.recon_iters > 0 and st.tib:
                st.log["tiar"] = tiar(st, ctx, outputs)
            # with TIAR the TIB keeps its own rounding; without it, the TIB is reconstructed inside its blocks
            reconstruct_blocks(st, ctx, exclude=set(st.tib) if cfg.tiar else set())
            st.log["maintenance"] = maintain(st, outputs, cfg.maintenance)
        return finish(st, ctx, self.name)
