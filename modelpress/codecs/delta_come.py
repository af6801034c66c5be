"""Delta-CoMe: mixed-precision low-rank delta compression.

Ping, Wang, Zhou, Liu, Han, Sun, Lin, Wang, "Delta-CoMe: Training-Free Delta-Compression with
Mixed-Precision for Large Language Models" (NeurIPS 2024). The delta of a linear layer is factored by
SVD, ``Delta = U diag(S) V^T`` (Sec. 3). Singular values decay with a long tail, so the singular vectors
are split by singular value into groups of decreasing bit width — in the paper's 7B setting 2 vectors at
8 bits, 32 at 3 bits, the following ones at 2 bits, the rest dropped — so the whole delta costs about
1 bit per parameter, the same budget as BitDelta (Sec. 3.2, Table 1). Each group is quantized with GPTQ:
first the right factor with the Hessian of the layer's inputs, then the left factor with the Hessian of
the (already quantized) right factor's outputs (Sec. 3.3), group size 128.

Choices here (documented in docs/delta.md):

* ``S`` is folded into the right factor, ``R = diag(S) V^T`` ([r, in]); rows of ``R`` then carry their
  singular value and each gets its own quantization grid, while ``U`` has unit columns. GPTQ quantizes
  ``R_g`` with ``H_x = X^T X`` and then ``U_g`` with ``H_z = R_g^q H_x R_g^q^T``.
* Group sizes are given per bit width; the last group with ``count: -1`` fills the remaining budget.
  The budget counts *every stored bit*: packed codes, fp16 scales and uint8 zero points. The paper's
  (2, 32, rest) for 4096-wide matrices is scaled by 384/4096 for MiniLM's 384-wide matrices to the
  default (8 bits: 2, 3 bits: 4, 2 bits: fill).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .. import distributed
from ..errors import UserError
from ..model import ModelHandle
from ..modules import register_module
from ..passes import Context, Pass, UnitCalibration, in_model_order, register_pass
from ..quant.coded import EntropyCodedCodes
from ..quant.gptq import QuantResult, gptq_quantize, rtn_quantize
from ..quant.primitives import dequantize_groups, pack_codes, packed_bytes, symmetric_zero, unpack_codes
from .delta import (INPUT_HESSIAN_SCALE, DeltaConfig, DeltaLayer, DeltaLinear, calibration_batches,
                    collect_input_hessians, handle_other_tensors, match_linear_layers, replace_module, require_base)


class PrecisionGroup(BaseModel):
    """``count`` singular vectors at ``bits`` bits; ``count: -1`` fills the remaining budget."""

    model_config = ConfigDict(extra="forbid")
    bits: int = Field(ge=1, le=8)
    count: int = Field(ge=-1, le=100_000)


DEFAULT_GROUPS = [PrecisionGroup(bits=8, count=2), PrecisionGroup(bits=3, count=4), PrecisionGroup(bits=2, count=-1)]


def _groups_of(n: int, gs: int) -> int:
    return math.ceil(n / gs) if gs > 0 else 1


def group_bits(rank: int, bits: int, out_features: int, in_features: int, group_size: int, sym: bool) -> int:
    """Stored bits of ``rank`` singular vectors at ``bits`` bits: codes of ``U_g`` [out, rank] and
    ``R_g`` [rank, in], plus one fp16 scale (and a uint8 zero unless ``sym``) per row and quantization group."""
    if rank <= 0:
        return 0
    per_scale = 16 + (0 if sym else 8)
    codes = 8 * (packed_bytes(out_features * rank, bits) + packed_bytes(rank * in_features, bits))
    scales = per_scale * (out_features * _groups_of(rank, min(group_size, rank) if group_size > 0 else rank)
                          + rank * _groups_of(in_features, group_size))
    return codes + scales


def allocate_ranks(groups: list[PrecisionGroup], out_features: int, in_features: int, budget_bits: float,
                   group_size: int, sym: bool) -> list[tuple[int, int]]:
    """``[(bits, rank)]`` per group: fixed counts first (clipped to the rank and the budget), then the fill
    group gets as many vectors as the budget of ``budget_bits * out * in`` bits allows."""
    max_rank = min(out_features, in_features)
    budget = budget_bits * out_features * in_features
    used, left = 0, max_rank
    out: list[tuple[int, int]] = []
    for g in groups:
        if g.count == -1:
            r = 0
            while r < left and used + group_bits(r + 1, g.bits, out_features, in_features, group_size, sym) <= budget:
                r += 1
        else:
            r = min(g.count, left)
            while r > 0 and used + group_bits(r, g.bits, out_features, in_features, group_size, sym) > budget:
                r -= 1
        used += group_bits(r, g.bits, out_features, in_features, group_size, sym)
        left -= r
        out.append((g.bits, r))
    return out


@register_module
class DeltaCoMeLinear(EntropyCodedCodes, DeltaLinear):
    """``y = x W_base^T + (x R^T) U^T + b`` with ``U``, ``R`` stored per precision group as packed codes
    (optionally entropy coded, :class:`~modelpress.quant.coded.EntropyCodedCodes`), fp16 scales and uint8 zero
    points (``groups`` = ``[(bits, rank), ...]``)."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, transposed: bool,
                 groups: list[tuple[int, int]], group_size: int, sym: bool) -> None:
        super().__init__(in_features, out_features, has_bias, transposed)
        self.groups = [(int(b), int(r)) for b, r in groups]
        self.group_size, self.sym = int(group_size), bool(sym)
        #: the buffers holding the quantized factors, in registration order
        self.factor_buffers: list[str] = []
        for i, (bits, r) in enumerate(self.groups):
            if r == 0:
                continue
            for side, rows, cols in (("r", r, in_features), ("u", out_features, r)):
                gs = self._gs(cols)
                ng = _groups_of(cols, gs)
                self.register_buffer(f"{side}{i}_codes", torch.zeros(packed_bytes(rows * cols, bits), dtype=torch.uint8))
                self.register_buffer(f"{side}{i}_scales", torch.zeros(rows, ng, dtype=torch.float16))
                self.factor_buffers += [f"{side}{i}_codes", f"{side}{i}_scales"]
                if not sym:
                    self.register_buffer(f"{side}{i}_zeros", torch.zeros(rows, ng, dtype=torch.uint8))
                    self.factor_buffers.append(f"{side}{i}_zeros")

    def factor_bytes(self) -> torch.Tensor:
        """The quantized factors (every :attr:`factor_buffers` tensor) as one byte tensor, to send to other ranks."""
        return torch.cat([getattr(self, n).reshape(-1).view(torch.uint8) for n in self.factor_buffers])

    def load_factor_bytes(self, data: torch.Tensor) -> None:
        """The inverse of :meth:`factor_bytes` on a module of the same configuration."""
        start = 0
        for n in self.factor_buffers:
            t = getattr(self, n)
            size = t.numel() * t.element_size()
            t.copy_(data[start:start + size].view(t.dtype).view(t.shape))
            start += size
        self._cache.clear()

    def _gs(self, cols: int) -> int:
        return cols if self.group_size <= 0 else min(self.group_size, cols)

    def module_config(self) -> dict[str, Any]:
        return {**self._base_config(), "groups": [list(g) for g in self.groups], "group_size": self.group_size,
                "sym": self.sym}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "DeltaCoMeLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["has_bias"], cfg["transposed"],
                   [tuple(g) for g in cfg["groups"]], cfg["group_size"], cfg["sym"])

    def code_buffers(self) -> dict[str, tuple[int, int]]:
        """Every group's packed codes of ``R`` ([r, in]) and ``U`` ([out, r])."""
        out = {}
        for i, (bits, r) in enumerate(self.groups):
            if r:
                out[f"r{i}_codes"] = (bits, r * self.in_features)
                out[f"u{i}_codes"] = (bits, self.out_features * r)
        return out

    def _store(self, side: str, i: int, res: QuantResult) -> None:
        getattr(self, f"{side}{i}_codes").copy_(pack_codes(res.codes, res.bits))
        getattr(self, f"{side}{i}_scales").copy_(res.scales.to(torch.float16))
        if not self.sym:
            getattr(self, f"{side}{i}_zeros").copy_(res.zeros.round().to(torch.uint8))

    def _load(self, side: str, i: int, bits: int, rows: int, cols: int) -> torch.Tensor:
        codes = unpack_codes(getattr(self, f"{side}{i}_codes"), bits, rows * cols).reshape(rows, cols).float()
        scales = getattr(self, f"{side}{i}_scales").float()
        zeros = torch.full_like(scales, symmetric_zero(bits)) if self.sym else getattr(self, f"{side}{i}_zeros").float()
        return dequantize_groups(codes, scales, zeros, self._gs(cols))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``(U [out, r], R [r, in])`` over all groups (cached until the next load)."""
        if "U" not in self._cache:
            us, rs = [], []
            for i, (bits, r) in enumerate(self.groups):
                if r == 0:
                    continue
                rs.append(self._load("r", i, bits, r, self.in_features))
                us.append(self._load("u", i, bits, self.out_features, r))
            if us:
                self._cache["U"], self._cache["R"] = torch.cat(us, 1), torch.cat(rs, 0)
            else:
                self._cache["U"] = torch.zeros(self.out_features, 0)
                self._cache["R"] = torch.zeros(0, self.in_features)
        return self._cache["U"], self._cache["R"]

    def delta_weight(self) -> torch.Tensor:
        U, R = self.factors()
        return U @ R

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        U, R = self.factors()
        return F.linear(F.linear(x, R.to(x.dtype)), U.to(x.dtype))


def empty_delta_come(layer: DeltaLayer, groups: list[PrecisionGroup], budget_bits: float, group_size: int,
                     sym: bool) -> DeltaCoMeLinear:
    """The layer's :class:`DeltaCoMeLinear` with its ranks allocated and its base taken, factors not yet stored."""
    out_f, in_f = layer.delta.shape
    alloc = allocate_ranks(groups, out_f, in_f, budget_bits, group_size, sym)
    mod = DeltaCoMeLinear(in_f, out_f, layer.module.bias is not None, layer.transposed, alloc, group_size, sym)
    mod._init_from(layer)
    return mod


def compress_delta(layer: DeltaLayer, H: torch.Tensor | None, groups: list[PrecisionGroup], budget_bits: float,
                   group_size: int, sym: bool, quantizer: str, percdamp: float) -> DeltaCoMeLinear:
    """SVD the layer's delta, allocate ranks to the precision groups and quantize each group's factors."""
    mod = empty_delta_come(layer, groups, budget_bits, group_size, sym)
    alloc, in_f = mod.groups, mod.in_features
    delta = layer.delta.double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    start = 0
    for i, (bits, r) in enumerate(alloc):
        if r == 0:
            continue
        sl = slice(start, start + r)
        start += r
        R = (S[sl, None] * Vh[sl]).float()  # [r, in]
        Ug = U[:, sl].float()               # [out, r]
        if quantizer == "gptq" and H is not None:
            rq = gptq_quantize(R, H, bits, mod._gs(in_f), sym, percdamp=percdamp)
            Rq = rq.dequantize()
            Hz = (Rq.double() @ H @ Rq.double().T)
            uq = gptq_quantize(Ug, Hz, bits, mod._gs(r), sym, percdamp=percdamp)
        else:
            rq = rtn_quantize(R, bits, mod._gs(in_f), sym)
            uq = rtn_quantize(Ug, bits, mod._gs(r), sym)
        mod._store("r", i, rq)
        mod._store("u", i, uq)
    return mod


@register_pass
class DeltaCoMePass(Pass):
    """``type: delta_come`` — SVD + mixed-precision GPTQ of each linear layer's delta."""

    name = "delta_come"
    needs_base = True
    splits_calibration = True  # several ranks: calibration by data, the layers' SVD + GPTQ by layer

    class Config(DeltaConfig):
        groups: list[PrecisionGroup] = Field(default_factory=lambda: [g.model_copy() for g in DEFAULT_GROUPS])
        budget_bits: float = Field(1.0, gt=0, le=16, description="stored bits per delta parameter, all included")
        group_size: int = Field(128, ge=0, le=65536, description="quantization group along each row (0: whole row)")
        sym: bool = False
        quantizer: Literal["gptq", "rtn"] = "gptq"
        percdamp: float = Field(0.01, gt=0, le=1)
        samples: int = Field(64, ge=1, le=100_000, description="calibration texts for the input Hessians")
        batch_size: int = Field(8, ge=1, le=1024)
        seq_len: int = Field(64, ge=4, le=4096, description="tokens per calibration text")

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        self._check_groups()
        base = require_base(self.name, model, ctx)
        t0 = time.time()
        student = model.module.eval()  # changed in place
        layers = match_linear_layers(student, base.module, self.config.skip)
        hessians: dict[str, torch.Tensor] = {}
        if self.calibrates_on_activations():  # every Hessian from the fine-tune as given, before any layer changes
            hessians = collect_input_hessians(model.replace_module(student), layers, self._batches(model, ctx), ctx,
                                              desc="delta_come hessians")
        part = self._compress(model.replace_module(student), base.module, layers, hessians, ctx)
        part["seconds"] = time.time() - t0
        self.record_units([part], ctx)
        return model.replace_module(student)

    def _check_groups(self) -> None:
        if sum(1 for g in self.config.groups if g.count == -1) > 1:
            raise UserError("delta_come: at most one group may have count -1 (fill the budget)", "passes")

    def _batches(self, model: ModelHandle, ctx: Context) -> list[tuple[torch.Tensor, ...]]:
        """The calibration batches of the input Hessians (this pass's own draw: offset 23)."""
        cfg = self.config
        return calibration_batches(model, ctx, self.name, ctx.setting(cfg, "samples"), ctx.setting(cfg, "batch_size"),
                                   ctx.setting(cfg, "seq_len"), offset=23)

    def _compress(self, model: ModelHandle, base: torch.nn.Module, layers: list[DeltaLayer],
                  hessians: dict[str, torch.Tensor], ctx: Context) -> dict[str, Any]:
        """The other tensors by option, then every layer's delta (SVD + mixed-precision GPTQ with its Hessian,
        or RTN); returns the record part."""
        cfg = self.config
        student = model.module
        other = handle_other_tensors(student, base, cfg.embeddings_for(model.kind), cfg.norms, cfg.biases)
        alloc = {}
        for layer, mod in zip(layers, self._compressed(layers, hessians, ctx)):
            replace_module(student, layer.name, mod)
            alloc[layer.name] = mod.groups
        return {"layers": len(layers), "ranks": alloc, "reverted": other["reverted"], "kept": other["kept"]}

    def _compressed(self, layers: list[DeltaLayer], hessians: dict[str, torch.Tensor],
                    ctx: Context) -> Iterable[DeltaCoMeLinear]:
        """Each layer's compressed module, one at a time. With several ranks each layer's SVD and quantization run
        on one rank (the largest first, :func:`~modelpress.distributed.owners`) and its factors are sent to every
        rank: the same modules as one process."""
        cfg = self.config

        def solve(layer: DeltaLayer) -> DeltaCoMeLinear:
            return compress_delta(layer, hessians.get(layer.name), cfg.groups, cfg.budget_bits, cfg.group_size,
                                  cfg.sym, cfg.quantizer, cfg.percdamp)

        if not distributed.active():
            return (solve(layer) for layer in ctx.progress(layers, desc="delta_come layers"))
        costs = [float(math.prod(l.delta.shape) * min(l.delta.shape)) for l in layers]
        sent = distributed.map_tensors(lambda layer: solve(layer).factor_bytes(), layers, costs)
        mods = [empty_delta_come(layer, cfg.groups, cfg.budget_bits, cfg.group_size, cfg.sym) for layer in layers]
        for mod, data in zip(mods, sent):
            mod.load_factor_bytes(data)
        return mods

    # -- streamed (modelpress.stream): one decoder block at a time

    def streams(self) -> bool:
        return True  # RTN needs nothing but the unit; GPTQ its layers' Hessians (unit_calibration)

    def calibrates_on_activations(self) -> bool:
        return self.config.quantizer == "gptq"

    def unit_calibration(self, model: ModelHandle, ctx: Context) -> UnitCalibration | None:
        if not self.calibrates_on_activations():
            return None
        self._check_groups()
        return UnitCalibration(self._batches(model, ctx), self._hessian_layers, INPUT_HESSIAN_SCALE)

    def _hessian_layers(self, unit: torch.nn.Module, base: torch.nn.Module | None) -> list[str]:
        """The unit's layers whose deltas are compressed (those :meth:`apply_unit` will match)."""
        return [layer.name for layer in match_linear_layers(unit, base, self.config.skip, copy_base=False)]

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: torch.nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        self._check_groups()
        t0 = time.time()
        student = unit.module.eval()
        layers = match_linear_layers(student, base, self.config.skip, copy_base=False)  # the base unit is dropped after
        part = self._compress(unit, base, layers, ctx.unit_hessians, ctx)
        part["seconds"] = time.time() - t0
        return unit, part

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        ranks = {k: v for p in parts for k, v in p["ranks"].items()}
        ctx.record(self.name, layers=sum(p["layers"] for p in parts),
                   ranks={k: ranks[k] for k in in_model_order(ranks, rank)},
                   reverted=in_model_order([k for p in parts for k in p["reverted"]], rank),
                   kept=in_model_order([k for p in parts for k in p["kept"]], rank),
                   seconds=round(sum(p["seconds"] for p in parts), 2))
