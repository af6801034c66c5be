"""Packed weight-only quantized layers: :class:`PackedLinear` / :class:`PackedConv2d`.

The storage of a GPTQ / RTN result (Frantar et al., "GPTQ", ICLR 2023, Sec. 4: min-max grids per row and per
group of ``group_size`` consecutive input columns, unsigned ``b``-bit codes): the weight, viewed as
``[out, cols]`` (a convolution's ``[out, in/groups * kh * kw]``), is kept as

* ``qweight``: the codes as one bit stream (:func:`~modelpress.quant.primitives.pack_codes`, ``b`` bits each);
* ``scales``: float32 ``[out, G]``, ``G = ceil(cols / group_size)``;
* ``zeros``: uint8 ``[out, G]`` (asymmetric grids only; a symmetric grid's zero point is ``2^(b-1)``);
* ``bias``: as the replaced layer's.

``W = (codes - zeros[:, c // group_size]) * scales[:, c // group_size]``, computed in float32 and held in
``dtype`` (float32, or float16 where the weights were scored in float16, as EvoPress' level database does).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..modules import register_module
from .coded import EntropyCodedCodes
from .layer_ops import Conv2dOp, LinearOp, StoredWeightLayer
from .primitives import dequantize_groups, pack_codes, packed_bytes, symmetric_zero, unpack_codes

DTYPES = ("float32", "float16", "bfloat16")


class PackedWeight(EntropyCodedCodes, StoredWeightLayer):
    """Shared body of :class:`PackedLinear` and :class:`PackedConv2d` (see the module docstring); ``qweight`` may
    be stored entropy coded (:class:`~modelpress.quant.coded.EntropyCodedCodes`)."""

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, bits: int, group_size: int, sym: bool,
                 dtype: str = "float32", **conv: Any) -> None:
        super().__init__(weight_shape, has_bias, **conv)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.bits, self.sym, self.dtype = int(bits), bool(sym), dtype
        self.rows, self.cols = self.weight_shape[0], math.prod(self.weight_shape[1:])
        self.group_size = self.cols if group_size <= 0 else min(int(group_size), self.cols)
        groups = math.ceil(self.cols / self.group_size)
        self.register_buffer("qweight", torch.zeros(packed_bytes(self.rows * self.cols, self.bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(self.rows, groups))
        self.register_buffer("zeros", None if self.sym else torch.zeros(self.rows, groups, dtype=torch.uint8))

    def layer_config(self) -> dict[str, Any]:
        return {"weight_shape": list(self.weight_shape), "has_bias": self.bias is not None, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym, "dtype": self.dtype}

    def store(self, res: Any) -> None:
        """Take the codes, scales and zero points of a GPTQ / RTN result (a
        :class:`~modelpress.quant.gptq.QuantResult`, not imported here: it imports this module) for this weight."""
        if tuple(res.codes.shape) != (self.rows, self.cols) or res.bits != self.bits or res.group_size != self.group_size:
            raise ValueError(f"a {res.bits}-bit result of shape {tuple(res.codes.shape)}, group {res.group_size} does "
                             f"not fit a {self.bits}-bit [{self.rows}, {self.cols}] weight with group {self.group_size}")
        self.qweight = pack_codes(res.codes, self.bits)
        self.scales = res.scales.float().clone()
        if not self.sym:
            self.zeros = res.zeros.round().to(torch.uint8)
        self._weight = None

    def code_buffers(self) -> dict[str, tuple[int, int]]:
        return {"qweight": (self.bits, self.rows * self.cols)}

    def codes(self) -> torch.Tensor:
        """The unsigned codes ``[out, cols]`` (uint8)."""
        return unpack_codes(self.qweight, self.bits, self.rows * self.cols).view(self.rows, self.cols).to(torch.uint8)

    def zero_points(self) -> torch.Tensor:
        """Zero points ``[out, G]`` (uint8); ``2^(b-1)`` everywhere for a symmetric grid."""
        if self.sym:
            return torch.full_like(self.scales, symmetric_zero(self.bits)).to(torch.uint8)
        return self.zeros

    def rebuild_weight(self) -> torch.Tensor:
        return dequantize_groups(self.codes(), self.scales, self.zero_points(), self.group_size).to(getattr(torch, self.dtype))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, in the replaced layer's shape, in ``dtype``."""
        return self.stored_weight()

    def export_parameters(self) -> dict[str, Any]:
        """What an integer exporter needs: ``codes`` uint8 ``[out, cols]``, ``scales`` float32 ``[out, G]``,
        ``zero_points`` uint8 ``[out, G]`` with ``W[r, c] = (codes[r, c] - zero_points[r, g]) * scales[r, g]``,
        ``g = c // group_size``, reshaped to ``weight_shape``; plus ``bits``, ``group_size``, ``symmetric``,
        ``dtype`` (of the dequantized weight) and ``bias``."""
        return {"codes": self.codes(), "scales": self.scales.clone(), "zero_points": self.zero_points().clone(),
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.sym, "dtype": self.dtype,
                "weight_shape": list(self.weight_shape),
                "bias": None if self.bias is None else self.bias.detach().clone()}

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, bits={self.bits}, group_size={self.group_size}, sym={self.sym}"


@register_module
class PackedLinear(LinearOp, PackedWeight):
    """A weight-only quantized ``nn.Linear`` (see :class:`PackedWeight`)."""


@register_module
class PackedConv2d(Conv2dOp, PackedWeight):
    """A weight-only quantized ``nn.Conv2d`` (see :class:`PackedWeight`); stride, padding... as the original."""


def packed_from_result(res: Any, layer: nn.Module, sym: bool, dtype: torch.dtype = torch.float32) -> PackedWeight:
    """The :class:`PackedLinear` / :class:`PackedConv2d` replacing ``layer`` with the GPTQ / RTN result ``res``
    of its weight (``sym``: whether the result's grid was symmetric)."""
    mod = PackedWeight.replacing(layer, PackedLinear, PackedConv2d, bits=res.bits, group_size=res.group_size,
                                 sym=sym, dtype=str(dtype).replace("torch.", ""))
    mod.store(res)
    return mod.to(layer.weight.device)


__all__ = ["PackedWeight", "PackedLinear", "PackedConv2d", "packed_from_result"]
