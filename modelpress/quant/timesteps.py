"""The current timesteps of a UNet forward, published by :class:`TimestepTap` (the UNet's sinusoidal timestep
projection) so that per-timestep quantizers (TFMQ-DM's finite set of calibrated timesteps, Huang et al., CVPR
2024, Sec. 4.2) and cached temporal features can look up their row."""
from __future__ import annotations

import contextvars
from typing import Any

import torch
from torch import nn

from ..modules import register_module

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

