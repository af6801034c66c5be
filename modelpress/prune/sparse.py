"""Unstructured-sparse layers stored compressed: :class:`SparseLinear` / :class:`SparseConv2d`.

A pruned weight (SparseGPT, Frantar & Alistarh, ICML 2023; magnitude pruning) keeps its non-zero values in
row-major order (``values``, float16 by default) and one bit per weight saying which are kept (``mask``, the
1-bit case of :func:`~modelpress.quant.primitives.pack_codes`): ``16 (1 - s) + 1`` bits per weight at
sparsity ``s`` instead of 16 for the dense fp16 tensor. The forward rebuilds the dense weight once (cached).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..modules import register_module
from ..quant.layer_ops import Conv2dOp, LinearOp, StoredWeightLayer
from ..quant.primitives import pack_codes, packed_bytes, unpack_codes


class SparseWeight(StoredWeightLayer):
    """Shared body of :class:`SparseLinear` and :class:`SparseConv2d` (see the module docstring)."""

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, nnz: int, dtype: str = "float16",
                 **conv: Any) -> None:
        super().__init__(weight_shape, has_bias, **conv)
        self.nnz, self.dtype = int(nnz), dtype
        self.numel = math.prod(self.weight_shape)
        self.register_buffer("values", torch.zeros(self.nnz, dtype=getattr(torch, dtype)))
        self.register_buffer("mask", torch.zeros(packed_bytes(self.numel, 1), dtype=torch.uint8))

    def layer_config(self) -> dict[str, Any]:
        return {"weight_shape": list(self.weight_shape), "has_bias": self.bias is not None, "nnz": self.nnz,
                "dtype": self.dtype}

    def kept(self) -> torch.Tensor:
        """The boolean mask of kept weights, in the weight's shape."""
        return unpack_codes(self.mask, 1, self.numel).view(self.weight_shape).bool()

    def rebuild_weight(self) -> torch.Tensor:
        w = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        w[self.kept().reshape(-1)] = self.values
        return w

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (zeros where pruned), in the replaced layer's shape, in ``dtype``."""
        return self.stored_weight()

    def export_parameters(self) -> dict[str, Any]:
        """``values`` (the kept weights, row-major), ``mask`` (bool, the weight's shape), ``bias``."""
        return {"values": self.values.clone(), "mask": self.kept(), "dtype": self.dtype,
                "weight_shape": list(self.weight_shape), "bias": None if self.bias is None else self.bias.clone()}

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, density={self.nnz / max(1, self.numel):.3f}"


@register_module
class SparseLinear(LinearOp, SparseWeight):
    """A sparse ``nn.Linear`` (see :class:`SparseWeight`)."""


@register_module
class SparseConv2d(Conv2dOp, SparseWeight):
    """A sparse ``nn.Conv2d`` (see :class:`SparseWeight`); stride, padding... as the original."""


def sparse_from_dense(layer: nn.Module, weight: torch.Tensor) -> SparseWeight:
    """The :class:`SparseLinear` / :class:`SparseConv2d` replacing ``layer`` with the pruned ``weight`` (its
    zeros are the pruned entries; values are kept in ``weight``'s dtype, float16 or float32)."""
    w = weight.detach().reshape(-1)
    keep = w != 0
    mod = SparseWeight.replacing(layer, SparseLinear, SparseConv2d, nnz=int(keep.sum()),
                                 dtype=str(w.dtype).replace("torch.", ""))
    mod.values = w[keep].clone()
    mod.mask = pack_codes(keep, 1)
    return mod.to(layer.weight.device)


__all__ = ["SparseWeight", "SparseLinear", "SparseConv2d", "sparse_from_dense"]
