"""bitsandbytes as the weight-only backend in torch: int8 (LLM.int8 row-wise absmax) and NF4 (QLoRA).

Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (NeurIPS 2022),
vector-wise absmax int8 weights; Dettmers et al., "QLoRA" (NeurIPS 2023), 4-bit NormalFloat with block-wise
absmax (block 64).

The pass ``bnb`` replaces every ``nn.Linear`` and GPT-2 ``Conv1D`` (a causal LM's output head only with
``lm_head: true``, as transformers' bitsandbytes integration leaves it) (and, by default, every ``nn.Conv2d``: bitsandbytes has no
conv module, so the conv weight is quantized with the same functional kernels) by :class:`BnbWeightOnly`,
which stores bitsandbytes' own quantized tensors (int8 codes + row scales, or packed NF4 + block absmax) as
plain buffers and dequantizes them with ``bitsandbytes.functional`` in its forward. Activations stay in
floating point. bitsandbytes 0.50.2's CPU backend runs ``quantize_4bit`` / ``dequantize_4bit`` /
``int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` (and its ``Linear8bitLt`` / ``Linear4bit`` modules)
on CPU; checked in ``tests/test_diffusion_ptq.py``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..model import ModelHandle, is_conv1d
from ..modules import register_module, set_submodule
from ..passes import Context, Pass, PassConfig, register_pass


def _bnb_functional() -> Any:
    import bitsandbytes.functional as bf

    return bf


@register_module
class BnbWeightOnly(nn.Module):
    """A Linear or Conv2d whose weight is held by bitsandbytes (``mode`` ``int8`` or ``nf4``).

    Buffers: ``int8``: ``qweight [out, in*k*k]`` int8 and ``row_scale [out]`` (absmax per row);
    ``nf4``: ``qweight`` (two 4-bit codes per byte, bitsandbytes layout) and ``absmax [blocks]``.
    ``bias`` keeps the original name. ``conv`` holds stride / padding / dilation / groups for convolutions.
    """

    def __init__(self, mode: str, weight_shape: list[int], has_bias: bool, blocksize: int = 64,
                 conv: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.mode, self.weight_shape, self.blocksize = mode, [int(s) for s in weight_shape], int(blocksize)
        self.conv = conv
        numel = math.prod(self.weight_shape)
        if mode == "int8":
            self.register_buffer("qweight", torch.zeros(self.weight_shape[0], numel // self.weight_shape[0], dtype=torch.int8))
            self.register_buffer("row_scale", torch.ones(self.weight_shape[0]))
        elif mode == "nf4":
            self.register_buffer("qweight", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8))
            self.register_buffer("absmax", torch.ones(-(-numel // self.blocksize)))
        else:
            raise ValueError(f"unknown bitsandbytes mode {mode!r}")
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0]), requires_grad=False) if has_bias else None
        self._deq: torch.Tensor | None = None

    def module_config(self) -> dict[str, Any]:
        return {"mode": self.mode, "weight_shape": self.weight_shape, "has_bias": self.bias is not None,
                "blocksize": self.blocksize, "conv": self.conv}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "BnbWeightOnly":
        return cls(**cfg)

    @classmethod
    def from_float(cls, mod: nn.Module, mode: str, blocksize: int = 64) -> "BnbWeightOnly":
        conv = None
        if isinstance(mod, nn.Conv2d):
            conv = {"stride": list(mod.stride), "padding": list(mod.padding) if not isinstance(mod.padding, str) else mod.padding,
                    "dilation": list(mod.dilation), "groups": mod.groups}
        w = mod.weight.detach().float()
        if is_conv1d(mod):  # GPT-2's Conv1D stores [in, out]: quantize the [out, in] matrix
            w = w.t().contiguous()
        q = cls(mode, list(w.shape), mod.bias is not None, blocksize, conv)
        bf = _bnb_functional()
        if mode == "int8":
            codes, scale, _ = bf.int8_vectorwise_quant(w.reshape(w.shape[0], -1))
            q.qweight.copy_(codes)
            q.row_scale.copy_(scale.float())
        else:
            packed, state = bf.quantize_4bit(w.reshape(-1).contiguous(), blocksize=blocksize, quant_type="nf4")
            q.qweight.copy_(packed.reshape(q.qweight.shape))
            q.absmax.copy_(state.absmax.float())
        if mod.bias is not None:
            q.bias.data.copy_(mod.bias.detach().float())
        return q

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight, reconstructed by bitsandbytes' dequantization kernels."""
        if self._deq is None:
            bf = _bnb_functional()
            if self.mode == "int8":
                w = bf.int8_vectorwise_dequant(self.qweight, self.row_scale)
            else:
                numel = math.prod(self.weight_shape)
                state = bf.QuantState(absmax=self.absmax, shape=torch.Size([numel]), code=bf.get_4bit_type("nf4", device=self.absmax.device),
                                      blocksize=self.blocksize, quant_type="nf4", dtype=torch.float32)
                w = bf.dequantize_4bit(self.qweight, state)
            self._deq = w.float().reshape(self.weight_shape)
        return self._deq

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._deq = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.conv is None:
            return F.linear(x, w, b)
        c = self.conv
        pad = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
        return F.conv2d(x, w, b, tuple(c["stride"]), pad, tuple(c["dilation"]), c["groups"])


@register_pass
class BitsAndBytes(Pass):
    """``bnb``: bitsandbytes int8 or NF4 weight-only quantization of every Linear (and Conv2d)."""

    name = "bnb"

    class Config(PassConfig):
        mode: Literal["int8", "nf4"] = "nf4"
        blocksize: int = Field(64, ge=32, le=4096, description="NF4 block size")
        include_conv: bool = True
        min_numel: int = Field(0, ge=0, description="leave layers with fewer weights in float")
        lm_head: bool = Field(False, description="also quantize a causal LM's output head (transformers' "
                                                 "bitsandbytes integration keeps it in full precision)")

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        model, part = self.apply_unit(model, ctx, None, 0)
        self.record_units([part], ctx)
        return model

    units_independent = True

    def streams(self) -> bool:
        return True  # each layer is quantized from its own weight

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        cfg = self.config
        types = (nn.Linear, nn.Conv2d) if cfg.include_conv else (nn.Linear,)
        get_head = getattr(unit.module, "get_output_embeddings", None)  # a streamed block has no head
        head = get_head() if unit.kind == "causal-lm" and callable(get_head) and not cfg.lm_head else None
        names = [n for n, m in unit.module.named_modules()
                 if (type(m) in types or is_conv1d(m)) and m is not head and m.weight.numel() >= cfg.min_numel
                 and (cfg.mode == "int8" or m.weight.numel() % 2 == 0)]
        for n in ctx.progress(names, desc=f"bitsandbytes {cfg.mode}"):
            set_submodule(unit.module, n, BnbWeightOnly.from_float(unit.module.get_submodule(n), cfg.mode, cfg.blocksize))
        return unit, {"layers": len(names)}

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        cfg = self.config
        ctx.record(self.name, mode=cfg.mode, layers=sum(p["layers"] for p in parts), blocksize=cfg.blocksize)
