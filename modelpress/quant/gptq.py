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

The pass ``type: gptq`` (:class:`GPTQPass`) quantizes a causal LM's decoder blocks with it, block by block as the
paper's Sec. 4 and its reference implementation do: the calibration texts' hidden states are carried from block
to block (:class:`~modelpress.activations.BlockActivations`), each block's linear layers get their input Hessians
from them, and, in ``sequential`` mode (the default), block ``k + 1`` is calibrated on the outputs of block ``k``
*as quantized*. The same code runs in memory and streamed (:mod:`modelpress.stream`): the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

from .. import distributed
from ..data.capture import HessianAccumulator, layer_matrix
from ..model import ModelHandle, find_blocks, is_conv1d, output_head_path
from ..modules import set_submodule
from ..passes import Context, Pass, PassConfig, UnitCalibration, register_pass
from .primitives import dequantize, dequantize_groups, group_grids, group_slices, quant_grid, quantize

__all__ = ["QuantResult", "gptq_quantize", "rtn_quantize", "hessian_from_inputs", "GPTQPass"]


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


def _group_columns(cols: int, group_size: int | None) -> int:
    """Columns per quantization group: ``group_size``, or the whole row (``None``, <= 0, or at least ``cols``)."""
    return cols if group_size is None or group_size <= 0 or group_size >= cols else int(group_size)


def _check(W: torch.Tensor, bits: int, group_size: int | None) -> int:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return _group_columns(W.shape[1], group_size)


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


# ---------------------------------------------------------------------------------------------------
# The pass: weight-only GPTQ (or RTN) of a causal LM, block by block

#: GPTQ's Hessian ``H = 2 X^T X / n`` (Sec. 3)
GPTQ_HESSIAN_SCALE = 2.0


def _as_linear(layer: nn.Module) -> nn.Module:
    """``layer`` as an ``nn.Linear`` (a GPT-2 ``Conv1D``'s ``[in, out]`` weight transposed; others as they are)."""
    if not is_conv1d(layer):
        return layer
    weight = layer.weight.detach()
    lin = nn.Linear(weight.shape[0], weight.shape[1], bias=layer.bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return lin


def quantize_matrix(layer: nn.Module, H: torch.Tensor | None, bits: int, group_size: int, sym: bool,
                    percdamp: float = 0.01, act_order: bool = False) -> QuantResult:
    """GPTQ of a Linear / GPT-2 ``Conv1D`` weight (as ``[out, in]``) with its input Hessian ``H``, or
    round-to-nearest when ``H`` is ``None``."""
    W = layer_matrix(layer).float()
    if H is None:
        return rtn_quantize(W, bits, group_size, sym)
    return gptq_quantize(W, H, bits, group_size, sym, percdamp=percdamp, act_order=act_order)


def packed_layer(layer: nn.Module, res: QuantResult, sym: bool) -> nn.Module:
    """The packed replacement (:class:`~modelpress.quant.packed.PackedLinear`) of a Linear / GPT-2 ``Conv1D``
    from the result of its weight; the rebuilt weight is kept in the layer's dtype (float32, float16 or
    bfloat16)."""
    lin = _as_linear(layer)
    dtype = lin.weight.dtype if lin.weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return res.to_module(lin, sym, dtype)


def quantize_layer(layer: nn.Module, H: torch.Tensor | None, bits: int, group_size: int, sym: bool,
                   percdamp: float = 0.01, act_order: bool = False) -> nn.Module:
    """:func:`quantize_matrix`, then :func:`packed_layer`."""
    return packed_layer(layer, quantize_matrix(layer, H, bits, group_size, sym, percdamp, act_order), sym)


def _result_bytes(res: QuantResult) -> torch.Tensor:
    """What a result's packed layer is made of (codes, scales, zero points) as one byte tensor, to send."""
    return torch.cat([res.codes.reshape(-1), res.scales.float().reshape(-1).view(torch.uint8),
                      res.zeros.float().reshape(-1).view(torch.uint8)])


def _result_from_bytes(data: torch.Tensor, rows: int, cols: int, bits: int, group_size: int) -> QuantResult:
    """The inverse of :func:`_result_bytes` for a ``[rows, cols]`` weight."""
    gs = _group_columns(cols, group_size)
    groups = math.ceil(cols / gs)
    codes, scales, zeros = data.split([rows * cols, 4 * rows * groups, 4 * rows * groups])
    codes = codes.view(rows, cols)
    scales, zeros = (t.view(torch.float32).view(rows, groups) for t in (scales, zeros))
    return QuantResult(dequantize_groups(codes, scales, zeros, gs), codes, scales, zeros, bits, gs)


@register_pass
class GPTQPass(Pass):
    """``type: gptq`` — weight-only GPTQ (Frantar et al. 2023) of every linear layer in a causal LM's decoder
    blocks, stored packed (``bits`` per weight plus a float32 scale and uint8 zero point per group)."""

    name = "gptq"
    kinds = ("causal-lm",)
    units_independent = True  # with ``method: rtn``; GPTQ calibrates on activations (never shared by ranks)
    holds_every_hessian = False  # in memory too, one block's Hessians at a time
    splits_calibration = True  # several ranks: calibration split by data, the layers' solves by layer

    class Config(PassConfig):
        bits: int = Field(4, ge=1, le=8, description="bits per weight")
        group_size: int = Field(128, ge=0, le=65536, description="quantization group along each row (0: whole row)")
        sym: bool = Field(False, description="symmetric grids (zero point 2^(bits-1)); default asymmetric min-max")
        method: Literal["gptq", "rtn"] = Field("gptq", description="gptq: second-order error feedback with the "
                                               "layers' input Hessians; rtn: round to nearest on the same grid")
        act_order: bool = Field(False, description="quantize columns by decreasing Hessian diagonal (GPTQ's "
                                                    "--act-order)")
        percdamp: float = Field(0.01, gt=0, le=1, description="dampening, a fraction of the Hessian's mean diagonal")
        sequential: bool = Field(True, description="calibrate each block on the previous blocks as quantized "
                                                   "(GPTQ Sec. 4); false: on the input model's activations")
        lm_head: bool = Field(False, description="also quantize an untied output head (GPTQ keeps it in float)")
        skip: list[str] = Field(default_factory=list, description="module-path substrings left in float")
        samples: int = Field(128, ge=1, le=100_000, description="calibration texts (GPTQ: 128)")
        batch_size: int = Field(8, ge=1, le=1024)
        seq_len: int = Field(128, ge=4, le=32768, description="tokens per calibration text (GPTQ: 2048)")

    def calibrates_on_activations(self) -> bool:
        return self.config.method == "gptq"

    def streams(self) -> bool:
        return True  # RTN needs nothing but the unit; GPTQ its layers' Hessians (unit_calibration)

    # -- in memory: the blocks one after the other, as the streamed runner does

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        from ..activations import BlockActivations

        module = model.module.eval()
        blocks_path = find_blocks(module)
        blocks = module.get_submodule(blocks_path)
        acts = BlockActivations(model, blocks_path, self._batches(model, ctx), split=True) \
            if self.calibrates_on_activations() else None
        parts = []
        for i in ctx.progress(range(len(blocks)), desc="gptq blocks"):
            path = f"{blocks_path}.{i}"
            names = self._layers(blocks[i], path)
            hessians = acts.through_block(module, path, names, GPTQ_HESSIAN_SCALE,
                                          advance=not self.config.sequential) if acts is not None else {}
            parts.append(self._quantize(module, names, hessians))
            if acts is not None and self.config.sequential:
                acts.propagate(blocks[i])
        head = self._head(module)
        hessians = acts.through_rest(model, head, GPTQ_HESSIAN_SCALE) if acts is not None else {}
        parts.append(self._quantize(module, head, hessians, self._head_warnings(module)))
        self.record_units(parts, ctx)
        return model

    def _batches(self, model: ModelHandle, ctx: Context) -> list[tuple[torch.Tensor, ...]]:
        """The calibration texts (this pass's own draw: offset 29)."""
        cfg = self.config
        return ctx.calibration_batches(model, self.name, ctx.setting(cfg, "samples"), ctx.setting(cfg, "batch_size"),
                                       ctx.setting(cfg, "seq_len"), offset=29)

    def _skipped(self, path: str) -> bool:
        return any(s and s in path for s in self.config.skip)

    def _layers(self, block: nn.Module, prefix: str = "") -> list[str]:
        """The full paths of ``block``'s Linear / ``Conv1D`` layers (``block`` at ``prefix``), less ``skip``."""
        names = [f"{prefix}.{n}".strip(".") for n, m in block.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
        return [n for n in names if not self._skipped(n)]

    def _output_head(self, module: nn.Module) -> tuple[str, bool] | None:
        """The output head's path and whether it shares its weight with the input embedding (``None``: none)."""
        path = output_head_path(module)
        if path is None:
            return None
        return path, module.get_submodule(path).weight is module.get_input_embeddings().weight

    def _head(self, module: nn.Module) -> list[str]:
        """``[the output head's path]`` with ``lm_head: true`` and a head of its own; ``[]`` otherwise."""
        found = self._output_head(module) if self.config.lm_head else None
        return [found[0]] if found is not None and not found[1] and not self._skipped(found[0]) else []

    def _head_warnings(self, module: nn.Module) -> list[str]:
        found = self._output_head(module) if self.config.lm_head else None
        if found is not None and found[1]:
            return [f"lm_head: true, but {found[0]} shares its weight with the input embedding: left in float"]
        return []

    def _results(self, module: nn.Module, names: list[str],
                 hessians: dict[str, torch.Tensor]) -> list[QuantResult]:
        """Each layer's GPTQ (with ``hessians``) or RTN result. With several ranks each layer is solved on one
        (the largest first, :func:`~modelpress.distributed.owners`) and its codes, scales and zero points sent
        to every rank: the same results as one process."""
        cfg = self.config

        def solve(name: str) -> QuantResult:
            return quantize_matrix(module.get_submodule(name), hessians.get(name), cfg.bits, cfg.group_size, cfg.sym,
                                   cfg.percdamp, cfg.act_order)

        if not distributed.active():
            return [solve(n) for n in names]
        shapes = [tuple(layer_matrix(module.get_submodule(n)).shape) for n in names]
        sent = distributed.map_tensors(lambda n: _result_bytes(solve(n)), names,
                                       [float(c * c * (r + c)) for r, c in shapes])
        return [_result_from_bytes(t, r, c, cfg.bits, cfg.group_size) for t, (r, c) in zip(sent, shapes)]

    def _quantize(self, module: nn.Module, names: list[str], hessians: dict[str, torch.Tensor],
                  warnings: list[str] = ()) -> dict[str, Any]:
        """Replace each layer ``names`` of ``module`` by its packed GPTQ (with ``hessians``) or RTN result;
        returns the record part."""
        cfg = self.config
        weights = stored = 0
        for name, res in zip(names, self._results(module, names, hessians)):
            new = packed_layer(module.get_submodule(name), res, cfg.sym)
            weights += new.rows * new.cols
            stored += sum(t.numel() * t.element_size() for k, t in new.state_dict().items() if k != "bias")
            set_submodule(module, name, new)
        return {"layers": len(names), "weights": weights, "stored_bytes": stored, "warnings": list(warnings)}

    # -- streamed (modelpress.stream): one decoder block at a time

    def unit_calibration(self, model: ModelHandle, ctx: Context) -> UnitCalibration | None:
        if not self.calibrates_on_activations():
            return None
        return UnitCalibration(self._batches(model, ctx), self._unit_layers, GPTQ_HESSIAN_SCALE, self.config.sequential)

    @staticmethod
    def _is_rest(unit: nn.Module) -> bool:
        """Whether a streamed unit is the model without its blocks (the model's own class), not a decoder block
        (held in bare modules under its path)."""
        return callable(getattr(unit, "get_output_embeddings", None))

    def _unit_layers(self, unit: nn.Module, base: nn.Module | None = None) -> list[str]:
        """A streamed unit's layers: a decoder block's, or the head of the model without its blocks."""
        return self._head(unit) if self._is_rest(unit) else self._layers(unit)

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        module = unit.module.eval()
        warnings = self._head_warnings(module) if self._is_rest(module) else []
        return unit, self._quantize(module, self._unit_layers(module), ctx.unit_hessians, warnings)

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        cfg = self.config
        for part in parts:
            for message in part["warnings"]:
                ctx.warn(self.name, message)
        weights, stored = sum(p["weights"] for p in parts), sum(p["stored_bytes"] for p in parts)
        entry = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
                 "layers": sum(p["layers"] for p in parts), "weights": weights,
                 "stored_bits_per_weight": round(8 * stored / weights, 4) if weights else None}
        if cfg.method == "gptq":
            entry.update(act_order=cfg.act_order, sequential=cfg.sequential)
        ctx.record(self.name, **entry)
