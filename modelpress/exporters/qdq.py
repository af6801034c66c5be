"""Calibrated quantizers -> QuantizeLinear / DequantizeLinear.

The PTQ passes leave :class:`~modelpress.quant.layers.QuantLinear` / ``QuantConv2d`` layers (integer weight
codes, per-channel scale / zero point) and :class:`~modelpress.quant.act.ActQuantizer` modules (calibrated
per-tensor activation ranges) in the model; their forward is float fake quantization. For export each is
swapped for a module written with PyTorch's ``quantized_decomposed`` operators, whose ONNX translation is
``QuantizeLinear`` / ``DequantizeLinear`` (ONNX and ORT only: ExecuTorch's XNNPACK int8 kernels cannot run
these graphs, see :mod:`modelpress.exporters.pte`). Semantics are ONNX's: ``x_q = clamp(round(x / s) + z)``, ``x = (x_q - z) * s``.

* weights: an int8 constant holding the codes (fewer-bit codes lie inside the int8 range) and a
  ``dequantize_per_channel`` on axis 0;
* activations: ``quantize_per_tensor`` + ``dequantize_per_tensor`` with the calibrated scale; a code range
  narrower than int8 (symmetric, or fewer than 8 bits) clamps the float input to it first, since ONNX
  QuantizeLinear saturates at the full int8 range;
* split ranges (Q-Diffusion's concatenated skip input): one Q/DQ pair per channel group;
* per-timestep ranges (TFMQ-DM's FSC): the scale of each sample is gathered from the calibrated timestep
  table at run time and applied as a per-axis (axis 0 = batch) Q/DQ.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..modules import set_submodule
from ..quant.primitives import int_range


def _decomposed() -> Any:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


def _quant_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    from ..quant.act import ActQuantizer
    from ..quant.layers import QUANT_LAYERS

    return QUANT_LAYERS, (ActQuantizer,)


def has_calibrated_quant(module: nn.Module) -> bool:
    """Whether ``module`` contains quantized layers or activation quantizers from the PTQ passes."""
    layers, acts = _quant_classes()
    kinds = layers + acts
    return bool(kinds) and any(isinstance(m, kinds) for m in module.modules())


class QDQAct(nn.Module):
    """An :class:`ActQuantizer` as Q/DQ operators (per tensor, split, or per timestep)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.bits, self.symmetric = int(act.bits), bool(act.symmetric)
        self.split, self.channel_dim = int(act.split), int(act.channel_dim)
        self.n_timesteps = int(act.n_timesteps)
        self.enabled = bool(getattr(act, "enabled", True))
        self.register_buffer("scale", act.scale.detach().float().clone())
        self.register_buffer("zero_point", act.zero_point.detach().to(torch.int64).clone())
        if self.n_timesteps:
            self.register_buffer("timesteps", act.timesteps.detach().clone())
        self.qmin, self.qmax = int_range(self.bits, self.symmetric)
        # python constants for the per-tensor case (ONNX initializers of Q / DQ)
        self._const = [(float(self.scale[0, g]), int(self.zero_point[0, g])) for g in range(self.scale.shape[1])]

    def _per_tensor(self, x: torch.Tensor, g: int) -> torch.Tensor:
        qd = _decomposed()
        s, z = self._const[g]
        if (self.qmin, self.qmax) != (-128, 127):
            x = torch.clamp(x, (self.qmin - z) * s, (self.qmax - z) * s)
        q = qd.quantize_per_tensor(x, s, z, self.qmin, self.qmax, torch.int8)
        return qd.dequantize_per_tensor(q, s, z, self.qmin, self.qmax, torch.int8)

    def _per_timestep(self, x: torch.Tensor, g: int) -> torch.Tensor:
        from ..quant.timesteps import timestep_rows

        qd = _decomposed()
        rows = timestep_rows(self.timesteps, x.shape[0])
        s, z = self.scale[rows, g], self.zero_point[rows, g]
        q = qd.quantize_per_channel(x, s, z, 0, self.qmin, self.qmax, torch.int8)
        return qd.dequantize_per_channel(q, s, z, 0, self.qmin, self.qmax, torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        parts = [x] if not self.split else list(torch.split(x, [self.split, x.shape[self.channel_dim] - self.split],
                                                            dim=self.channel_dim))
        fn = self._per_timestep if self.n_timesteps else self._per_tensor
        out = [fn(p, g) for g, p in enumerate(parts)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=self.channel_dim)


class QDQLayer(nn.Module):
    """A ``QuantLinear`` / ``QuantConv2d``: int8 weight codes + DequantizeLinear, input through :class:`QDQAct`."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        p = layer.export_qparams()
        self.register_buffer("codes", p["weight_codes"].to(torch.int8).contiguous())
        self.register_buffer("w_scale", p["weight_scale"].float().contiguous())
        self.register_buffer("w_zero_point", p["weight_zero_point"].to(torch.int64).contiguous())
        self.bias = None if p["bias"] is None else nn.Parameter(p["bias"].float(), requires_grad=False)
        self.qmin, self.qmax = int_range(int(p["weight_bits"]), bool(p["weight_symmetric"]))
        self.act = QDQAct(layer.act) if getattr(layer, "act", None) is not None else None
        self.__dict__["_op"] = layer._op  # the original's conv / linear call (stride, padding...), not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = _decomposed().dequantize_per_channel(self.codes, self.w_scale, self.w_zero_point, 0, self.qmin,
                                                 self.qmax, torch.int8)
        return self._op(x, w, self.bias)


def qdq_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose quantized layers and activation quantizers are Q/DQ modules."""
    layers, acts = _quant_classes()
    out = copy.deepcopy(module)
    found = [(name, m) for name, m in out.named_modules() if isinstance(m, layers + acts)]
    # layers first: their own act quantizer is converted inside QDQLayer
    inside = {f"{name}.act" for name, m in found if isinstance(m, layers)}
    for name, m in found:
        if isinstance(m, layers):
            set_submodule(out, name, QDQLayer(m))
        elif name not in inside:
            set_submodule(out, name, QDQAct(m))
    return out.eval()


__all__ = ["has_calibrated_quant", "qdq_module", "QDQAct", "QDQLayer"]
