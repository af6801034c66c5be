"""Materialise a gate setting as a physically smaller UNet (APTP, Ganjdanesh et al., 2025, Sec. 3.4).

After the router is trained, each architecture code is a 0/1 vector over the units of
:mod:`modelpress.prune.gates`. Slicing copies the UNet and removes the gated-off channels from the weights:

* ResNet unit: rows of ``conv1`` and ``time_emb_proj``, the affine parameters of the dropped GroupNorm groups
  of ``norm2`` (``num_groups`` shrinks with them), input channels of ``conv2``;
* attention heads: rows of ``to_q``/``to_k``/``to_v``, columns of ``to_out[0]``, ``heads`` shrinks;
* feed-forward groups: rows of the GEGLU/GELU projection (both halves for GEGLU), columns of the output layer.

Because whole GroupNorm groups, whole heads and whole hidden channels are dropped, the sliced UNet computes
exactly what the gated one computes (up to float rounding); ``tests/test_aptp.py`` checks it.
At least one group of every width unit is always kept; a transformer block whose block gate is off is
replaced by :class:`SkippedBlock` (identity), and the width units inside it are not sliced.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..modules import set_submodule
from .gates import GateUnit, _ff_layers


def _sliced_weight(old: nn.Linear | nn.Conv2d, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``old``'s weight keeping output channels ``rows`` and input channels ``cols`` (``None``: all)."""
    w = old.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    return w


def _fill(new: nn.Module, w: torch.Tensor, old: nn.Module, rows: torch.Tensor | None) -> nn.Module:
    """Copy the sliced weight ``w`` and ``old``'s bias (its ``rows``) into the freshly built ``new``."""
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach() if rows is None else old.bias.detach()[rows])
    return new


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = _sliced_weight(old, rows, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    return _fill(new, w, old, rows)


def _conv(old: nn.Conv2d, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Conv2d:
    w = _sliced_weight(old, rows, cols)
    new = nn.Conv2d(w.shape[1] * old.groups, w.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=w.device, dtype=w.dtype)
    return _fill(new, w, old, rows)


def _groupnorm(old: nn.GroupNorm, rows: torch.Tensor, groups: int) -> nn.GroupNorm:
    new = nn.GroupNorm(groups, len(rows), eps=old.eps, affine=old.affine)
    if old.affine:
        with torch.no_grad():
            new.weight.copy_(old.weight.detach()[rows])
            new.bias.copy_(old.bias.detach()[rows])
    return new.to(old.weight.device if old.affine else "cpu")


class SkippedBlock(nn.Module):
    """Stands in for a removed transformer block (``Transformer2DModel``): returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, return_dict: bool = True, **kwargs: object):  # noqa: ANN201
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=hidden_states)
        return (hidden_states,)


def kept_groups(gates: torch.Tensor, units: Sequence[GateUnit]) -> list[list[int]]:
    """Per unit, the indices of the groups whose gate is on (>= 0.5); never empty for width units (the
    largest gate value is kept when all are off); ``[]`` for a removed block."""
    out: list[list[int]] = []
    start = 0
    for u in units:
        g = gates[start:start + u.n_groups]
        keep = torch.nonzero(g >= 0.5).flatten().tolist()
        out.append(keep if keep or u.kind == "block" else [int(g.argmax())])
        start += u.n_groups
    return out


def _channels(keep: list[int], size: int) -> torch.Tensor:
    return torch.tensor([k * size + j for k in keep for j in range(size)], dtype=torch.long)


def slice_unit(unet: nn.Module, unit: GateUnit, keep: list[int]) -> None:
    """Slice one unit of ``unet`` in place so that only the groups ``keep`` remain."""
    mod = unet.get_submodule(unit.path)
    idx = _channels(keep, unit.group_size)
    if unit.kind == "resnet":
        mod.conv1 = _conv(mod.conv1, rows=idx)
        if getattr(mod, "time_emb_proj", None) is not None:
            mod.time_emb_proj = _linear(mod.time_emb_proj, rows=idx)
        mod.norm2 = _groupnorm(mod.norm2, idx, len(keep))
        mod.conv2 = _conv(mod.conv2, cols=idx)
        mod.out_channels = mod.conv2.out_channels
    elif unit.kind == "heads":
        mod.to_q = _linear(mod.to_q, rows=idx)
        mod.to_k = _linear(mod.to_k, rows=idx)
        mod.to_v = _linear(mod.to_v, rows=idx)
        mod.to_out[0] = _linear(mod.to_out[0], cols=idx)
        mod.heads = len(keep)
        mod.inner_dim = len(idx)
        if hasattr(mod, "inner_kv_dim"):
            mod.inner_kv_dim = len(idx)
    elif unit.kind == "ff":
        proj, out, gated = _ff_layers(mod)
        hidden = out.in_features
        rows = torch.cat([idx, idx + hidden]) if gated else idx
        mod.net[0].proj = _linear(proj, rows=rows)
        mod.net[len(mod.net) - 1] = _linear(out, cols=idx)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def slice_unet(unet: nn.Module, units: Sequence[GateUnit], keep: Sequence[list[int]] | torch.Tensor,
               copy_first: bool = True) -> nn.Module:
    """A UNet with only the kept groups of every unit. ``keep`` is per-unit group indices or a 0/1 gate
    vector over all units. The input UNet is left untouched unless ``copy_first`` is False."""
    if isinstance(keep, torch.Tensor):
        keep = kept_groups(keep, units)
    out = copy.deepcopy(unet) if copy_first else unet
    removed = [u.path for u, k in zip(units, keep) if u.kind == "block" and not k]
    for unit, k in zip(units, keep):
        if any(unit.path == r or unit.path.startswith(r + ".") for r in removed):
            if unit.path in removed:
                set_submodule(out, unit.path, SkippedBlock())
            continue
        if unit.kind != "block":
            slice_unit(out, unit, list(k))
    return out
