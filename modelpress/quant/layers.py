"""The diffusion PTQ passes' quantized layers: :class:`QuantLinear` / :class:`QuantConv2d`, registered compressed
modules storing packed signed integer weights (one bit stream, :func:`~modelpress.quant.primitives.pack_codes`),
per-channel scale and zero point, and the activation quantizer's parameters; the forward computes from the
stored integers (fake quantization, deterministic). AdaRound's rectified sigmoid (Nagel et al., ICML 2020,
Eq. 22-23) is the learned rounding used while calibrating."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import register_module
from .act import ActQuantizer
from .coded import EntropyCodedCodes
from .layer_ops import Conv2dOp
from .primitives import int_range, pack_signed_codes, packed_bytes, unpack_signed_codes
from .ranges import search_qparams


#: why models with these quantized layers do not go to ExecuTorch (see :mod:`modelpress.exporters.pte`); the PTQ
#: passes declare it, so that a recipe asking for it fails before any work
PTE_REFUSAL = ("XNNPACK's int8 kernels need symmetric weights and a quantized output on every layer, which "
               "the PTQ passes' quantized layers do not have; export the model to onnx or ort (exact int8 QDQ), "
               "or the float model to pte with quantize: int8")

# ---------------------------------------------------------------------------------------------------
# AdaRound's rectified sigmoid (Nagel et al. 2020, Eq. 23)

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def adaround_h(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def adaround_logit(frac: torch.Tensor) -> torch.Tensor:
    """The V with ``h(V) = frac``."""
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (frac.clamp(0.01, 0.99) - ADAROUND_GAMMA) - 1)



# ---------------------------------------------------------------------------------------------------
# Quantized Conv2d / Linear


class _QuantLayer(EntropyCodedCodes, nn.Module):
    """Shared body of :class:`QuantLinear` and :class:`QuantConv2d`.

    Stored (state_dict): ``qweight`` (packed codes, uint8; or entropy coded, see
    :class:`~modelpress.quant.coded.EntropyCodedCodes`), ``w_scale [C_out]`` (float32),
    ``w_zero_point [C_out]`` (int8), ``bias`` (float, same name as the original), and the activation
    quantizer's buffers under ``act.`` when ``act_bits > 0``.

    During calibration the float weight is kept in the Python attribute ``fp_weight`` (not saved) and the
    forward fake-quantizes it, with AdaRound's learned rounding when ``round_logits`` is set (Nagel et al.,
    ICML 2020, Eq. 22-23). :meth:`freeze` turns the result into integer codes and drops the float weight.
    """

    channel_dim = 1

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, w_bits: int, w_symmetric: bool,
                 act_bits: int = 0, act_symmetric: bool = False, act_split: int = 0, act_timesteps: int = 0) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.w_bits, self.w_symmetric = int(w_bits), bool(w_symmetric)
        self.act_bits, self.act_symmetric = int(act_bits), bool(act_symmetric)
        numel = math.prod(self.weight_shape)
        self.register_buffer("qweight", torch.zeros(packed_bytes(numel, self.w_bits), dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(self.weight_shape[0]))
        self.register_buffer("w_zero_point", torch.zeros(self.weight_shape[0], dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0]), requires_grad=False) if has_bias else None
        self.act = ActQuantizer(act_bits, act_symmetric, act_split, self.channel_dim, act_timesteps) if act_bits else None
        self.fp_weight: torch.Tensor | None = None
        self.round_logits: torch.Tensor | None = None
        self.soft_round = False
        self.weight_quant = True
        self._deq: torch.Tensor | None = None

    # -- configuration / export ---------------------------------------------------------------------
    def _quant_config(self) -> dict[str, Any]:
        a = self.act.config() if self.act is not None else {}
        return {"weight_shape": list(self.weight_shape), "has_bias": self.bias is not None,
                "w_bits": self.w_bits, "w_symmetric": self.w_symmetric, "act_bits": self.act_bits,
                "act_symmetric": self.act_symmetric, "act_split": a.get("split", 0),
                "act_timesteps": a.get("n_timesteps", 0)}

    @property
    def has_act_quant(self) -> bool:
        """Whether an activation quantizer sits on this layer's input."""
        return self.act is not None

    def code_buffers(self) -> dict[str, tuple[int, int]]:
        """The packed weight codes (offset by ``2^(b-1)``, :func:`pack_signed_codes`); none while calibrating."""
        return {} if self.fp_weight is not None else {"qweight": (self.w_bits, math.prod(self.weight_shape))}

    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes, unpacked, int8, in the weight's shape."""
        if self.fp_weight is not None:
            return self._codes_from_float().to(torch.int8)
        return unpack_signed_codes(self.qweight, self.w_bits, math.prod(self.weight_shape)).reshape(self.weight_shape)

    def export_qparams(self) -> dict[str, Any]:
        """Everything an ONNX QDQ exporter needs, in ONNX's conventions (``x = (q - zero_point) * scale``):

        ``weight_codes`` int8 tensor in the weight's shape; ``weight_scale`` float32 ``[C_out]`` and
        ``weight_zero_point`` int8 ``[C_out]`` (per output channel, axis 0); ``weight_bits``,
        ``weight_symmetric``; ``bias``; ``has_act_quant``; and when it is true ``act_scale`` /
        ``act_zero_point`` of shape ``[S, G]`` (per tensor: ``S = G = 1``; ``G = 2`` when the input is split
        at channel ``act_split``, the concatenated UNet skip; ``S`` > 1 rows indexed by ``act_timesteps``
        for per-timestep ranges), ``act_bits``, ``act_symmetric``. Codes of fewer than 8 bits lie in the
        b-bit range and fit int8 directly.
        """
        d: dict[str, Any] = {"weight_codes": self.weight_codes(), "weight_scale": self.w_scale.clone(),
                             "weight_zero_point": self.w_zero_point.clone(), "weight_bits": self.w_bits,
                             "weight_symmetric": self.w_symmetric,
                             "bias": None if self.bias is None else self.bias.detach().clone(),
                             "has_act_quant": self.has_act_quant}
        if self.act is not None:
            d.update(self.act.export())
        return d

    # -- calibration-time weight handling -----------------------------------------------------------
    def set_float_weight(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.fp_weight = w.detach().float().clone()
        if bias is not None and self.bias is not None:
            self.bias.data.copy_(bias.detach().float())

    def init_weight_qparams(self, metric: str = "lp", p: float = 2.4) -> None:
        """Per-output-channel weight ranges by :func:`search_qparams` (``minmax`` for the baseline)."""
        w2 = self.fp_weight.reshape(self.weight_shape[0], -1)
        s, z = search_qparams(w2, self.w_bits, self.w_symmetric, metric, p)
        self.w_scale.copy_(s)
        self.w_zero_point.copy_(z.to(torch.int8))
        self.round_logits = None

    def _wshape(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape([-1] + [1] * (len(self.weight_shape) - 1))

    def _codes_from_float(self) -> torch.Tensor:
        s, z = self._wshape(self.w_scale), self._wshape(self.w_zero_point.float())
        qmin, qmax = int_range(self.w_bits, self.w_symmetric)
        if self.round_logits is None:
            return torch.clamp(torch.round(self.fp_weight / s) + z, qmin, qmax)
        up = (adaround_h(self.round_logits) >= 0.5).float()
        return torch.clamp(torch.floor(self.fp_weight / s) + up + z, qmin, qmax)

    def init_adaround(self) -> torch.Tensor:
        """Create AdaRound's continuous rounding variables V with ``h(V)`` = the fractional part of ``W/s``."""
        s = self._wshape(self.w_scale)
        frac = self.fp_weight / s - torch.floor(self.fp_weight / s)
        self.round_logits = adaround_logit(frac).requires_grad_(True)
        self.soft_round = True
        return self.round_logits

    def current_weight(self) -> torch.Tensor:
        if self.fp_weight is None:
            if self._deq is None:
                codes = self.weight_codes().float()
                self._deq = (codes - self._wshape(self.w_zero_point.float())) * self._wshape(self.w_scale)
            return self._deq
        if not self.weight_quant:
            return self.fp_weight
        s, z = self._wshape(self.w_scale), self._wshape(self.w_zero_point.float())
        qmin, qmax = int_range(self.w_bits, self.w_symmetric)
        if self.round_logits is not None and self.soft_round:
            q = torch.clamp(torch.floor(self.fp_weight / s) + adaround_h(self.round_logits) + z, qmin, qmax)
        else:
            q = self._codes_from_float()
        return (q - z) * s

    def freeze(self) -> None:
        """Store the integer codes packed and drop the float weight and rounding variables."""
        if self.fp_weight is None:
            return
        codes = self._codes_from_float().to(torch.int8)
        self.qweight = pack_signed_codes(codes, self.w_bits)
        self.fp_weight, self.round_logits, self.soft_round, self._deq = None, None, False, None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._deq = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "_QuantLayer":
        """``.to(device)`` also moves the calibration-time float weight and rounding variables (plain
        attributes, not buffers) to where the buffers went; their dtype stays float32."""
        super()._apply(fn, *args, **kwargs)
        device = self.w_scale.device
        if self.fp_weight is not None and self.fp_weight.device != device:
            self.fp_weight = self.fp_weight.to(device)
        if self.round_logits is not None and self.round_logits.device != device:
            self.round_logits = self.round_logits.detach().to(device)
        self._deq = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.current_weight().to(x.dtype)
        return self._op(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@register_module
class QuantLinear(_QuantLayer):
    """Quantized ``nn.Linear`` (see :class:`_QuantLayer`)."""

    channel_dim = -1

    def module_config(self) -> dict[str, Any]:
        return self._quant_config()

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "QuantLinear":
        return cls(**cfg)

    @classmethod
    def from_float(cls, mod: nn.Linear, **quant: Any) -> "QuantLinear":
        q = cls(tuple(mod.weight.shape), mod.bias is not None, **quant)
        q.set_float_weight(mod.weight, mod.bias)
        return q.to(mod.weight.device)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)


@register_module
class QuantConv2d(Conv2dOp, _QuantLayer):
    """Quantized ``nn.Conv2d`` (see :class:`_QuantLayer`); ``groups`` / padding modes as the original."""

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, w_bits: int, w_symmetric: bool,
                 stride: tuple[int, int] = (1, 1), padding: Any = (0, 0), dilation: tuple[int, int] = (1, 1),
                 groups: int = 1, padding_mode: str = "zeros", **act: Any) -> None:
        super().__init__(weight_shape, has_bias, w_bits, w_symmetric, **act)
        self.set_conv(stride, padding, dilation, groups, padding_mode)

    def module_config(self) -> dict[str, Any]:
        return {**self._quant_config(), **self.conv_config()}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "QuantConv2d":
        return cls(**cfg)

    @classmethod
    def from_float(cls, mod: nn.Conv2d, **quant: Any) -> "QuantConv2d":
        q = cls(tuple(mod.weight.shape), mod.bias is not None, **cls.conv_options(mod), **quant)
        q.set_float_weight(mod.weight, mod.bias)
        return q.to(mod.weight.device)


QUANT_LAYERS = (QuantLinear, QuantConv2d)
