"""Activation quantizers: per tensor, optionally split along channels (Q-Diffusion's concatenated skip inputs,
Li et al., ICCV 2023, Sec. 4.2) and / or per timestep (TFMQ-DM's FSC), with LSQ step learning and QDrop."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .primitives import fake_quant
from .ranges import search_qparams
from .timesteps import current_timesteps, timestep_rows


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
        return flat[torch.randint(flat.numel(), (max_keep,), generator=self._rng).to(flat.device)]

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
                                      lo=torch.tensor([lo], device=vals.device), hi=torch.tensor([hi], device=vals.device))
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
            keep_fp = (torch.rand(x.shape, generator=gen) < prob).to(x.device)  # the CPU generator's draw
            xq = torch.where(keep_fp, x, xq)
        return xq

    def export(self) -> dict[str, Any]:
        d: dict[str, Any] = {"act_bits": self.bits, "act_symmetric": self.symmetric,
                             "act_scale": self.scale.clone(), "act_zero_point": self.zero_point.to(torch.int8),
                             "act_split": self.split}
        if self.n_timesteps:
            d["act_timesteps"] = self.timesteps.clone()
        return d

