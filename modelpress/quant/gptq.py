"""GPTQ: second-order weight quantization, plus round-to-nearest (RTN) with the same grid.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023). For a linear layer ``y = W x`` with calibration inputs ``X``
(``H = 2 X^T X``, Eq. 1 and the OBQ update of Eq. 2-3), the columns of ``W`` are quantized one at a
time in a fixed order; the rounding error of column ``i``, divided by ``[H^-1]_ii``, is spread over the
not-yet-quantized columns through row ``i`` of the upper Cholesky factor of ``H^-1`` (Algorithm 1:
"lazy batch" blocks of columns, Cholesky reformulation, dampening ``lambda = percdamp * mean(diag H)``).

The API is deliberately small::

    res = gptq_quantize(W, H, bits=4, group_size=128, sym=False)
    res.dequant   # float weights, same shape and dtype as W, on the quantization grid
    res.codes     # uint8 integer codes in [0, 2**bits - 1], shape of W
    res.scales    # [rows, n_groups] float32 step sizes
    res.zeros     # [rows, n_groups] float32 zero points (integers stored as floats)
    rtn_quantize(W, bits, group_size, sym)  # the same result type, without error feedback

``dequant = (codes - zeros[:, g]) * scales[:, g]`` with ``g = column // group_size``; the grid, rounding and
packing are :mod:`modelpress.quant.primitives`' (unsigned codes), and ``res.to_module(layer, sym)`` stores a
result as a packed :class:`~modelpress.quant.packed.PackedLinear` / ``PackedConv2d``.
``group_size=None`` (or >= the number of columns) means one group per row. ``bits`` is 1..8.
Everything runs in float64 on the CPU for the Cholesky steps when the matrix is small, float32 otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.capture import HessianAccumulator
from .primitives import dequantize, dequantize_groups, group_grids, group_slices, quant_grid, quantize

__all__ = ["QuantResult", "gptq_quantize", "rtn_quantize", "hessian_from_inputs"]


@dataclass
class QuantResult:
    """Output of :func:`gptq_quantize` / :func:`rtn_quantize` (see the module docstring)."""

    dequant: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """Rebuild the float weights from codes, scales and zeros (equals ``dequant``)."""
        return dequantize_groups(self.codes, self.scales, self.zeros, self.group_size)

    def to_module(self, layer: nn.Module, sym: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The packed quantized replacement of ``layer`` (an ``nn.Linear`` / ``nn.Conv2d`` whose weight, as
        ``[out, -1]``, this result quantized): see :class:`~modelpress.quant.packed.PackedLinear`."""
        from .packed import packed_from_result

        return packed_from_result(self, layer, sym, dtype)


def _quantize_col(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = quantize(w, scale, zero, bits, signed=False)
    return q, dequantize(q, scale, zero)


def _check(W: torch.Tensor, bits: int, group_size: int | None) -> int:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    cols = W.shape[1]
    return cols if group_size is None or group_size <= 0 or group_size >= cols else int(group_size)


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int | None = 128, sym: bool = False) -> QuantResult:
    """Round-to-nearest on the same per-row, per-group grid as :func:`gptq_quantize`."""
    gs = _check(W, bits, group_size)
    Wf = W.detach().float()
    rows, cols = Wf.shape
    codes = torch.empty(rows, cols)
    deq = torch.empty(rows, cols)
    scales, zeros = group_grids(Wf, bits, gs, sym)
    for g, sl in enumerate(group_slices(cols, gs)):
        codes[:, sl], deq[:, sl] = _quantize_col(Wf[:, sl], scales[:, g, None], zeros[:, g, None], bits)
    return QuantResult(deq.to(W.dtype), codes.to(torch.uint8), scales, zeros, bits, gs)


def hessian_from_inputs(X: torch.Tensor) -> torch.Tensor:
    """``H = 2 X^T X / n`` for inputs ``X`` of shape [..., in_features] (GPTQ's Hessian, averaged; the one
    accumulator of :mod:`modelpress.data.capture`)."""
    acc = HessianAccumulator(X.shape[-1], scale=2.0)
    acc.add(X.reshape(-1, X.shape[-1]))
    return acc.H


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1``, raising the damping until it is positive definite."""
    n = H.shape[0]
    damp = percdamp * torch.mean(torch.diag(H)).clamp_min(1e-12)
    eye = torch.eye(n, dtype=H.dtype)
    for _ in range(8):
        try:
            L = torch.linalg.cholesky(H + damp * eye)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            damp = damp * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after dampening")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = 128, sym: bool = False,
                  percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False) -> QuantResult:
    """Quantize ``W`` [rows, cols] with GPTQ given the input Hessian ``H`` [cols, cols] (Algorithm 1).

    Grids are per row and per ``group_size`` consecutive columns, fixed when the group's first column is
    reached (GPTQ's "static groups" off: the grid sees the error-updated weights, as in the reference).
    ``act_order`` processes columns by decreasing ``diag(H)``; groups then still follow the original column
    index (grids are computed up front from the unmodified weights in that case, so codes stay well-defined).
    Columns whose ``H_ii`` is 0 (inputs never active) are quantized to zero's grid point with no feedback.
    """
    gs = _check(W, bits, group_size)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(cols, cols)}")
    dtype = torch.float64 if rows * cols <= 4_000_000 else torch.float32
    Wf = W.detach().to(dtype).clone()
    Hd = H.detach().to(dtype).clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    perm = torch.argsort(torch.diag(Hd), descending=True) if act_order else torch.arange(cols)
    invperm = torch.argsort(perm)
    Wp = Wf[:, perm]
    Hp = Hd[perm][:, perm]
    U = _inverse_cholesky(Hp, percdamp)

    ngroups = math.ceil(cols / gs)
    scales = torch.zeros(rows, ngroups, dtype=dtype)
    zeros = torch.zeros(rows, ngroups, dtype=dtype)
    if act_order:  # fix every group's grid from the original weights
        scales[:], zeros[:] = group_grids(Wf, bits, gs, sym)
    have = torch.zeros(ngroups, dtype=torch.bool) | act_order

    Q = torch.zeros_like(Wp)
    codes = torch.zeros_like(Wp)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1 = Wp[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        for j in range(b1 - b0):
            col = int(perm[b0 + j])
            g = col // gs
            if not have[g]:
                # the group's columns, in processing order, as they stand now (updated by earlier errors)
                members = invperm[g * gs:min((g + 1) * gs, cols)]
                cur = torch.cat([W1, Wp[:, b1:]], dim=1)
                local = members - b0
                cur_cols = cur[:, local.clamp_min(0)]
                scales[:, g], zeros[:, g] = quant_grid(cur_cols, bits, sym)
                have[g] = True
            w = W1[:, j]
            q, dq = _quantize_col(w, scales[:, g], zeros[:, g], bits)
            Q[:, b0 + j], codes[:, b0 + j] = dq, q
            d = U[b0 + j, b0 + j]
            err = (w - dq) / d
            W1[:, j:] -= err[:, None] * U[b0 + j, b0 + j:b1][None, :]
            Err[:, j] = err
        Wp[:, b1:] -= Err @ U[b0:b1, b1:]
    deq = Q[:, invperm]
    codes = codes[:, invperm]
    return QuantResult(deq.to(W.dtype), codes.to(torch.uint8), scales.float(), zeros.float(), bits, gs)
