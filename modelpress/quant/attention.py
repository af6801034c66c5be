"""Quantized attention matmuls (Q-Diffusion, Li et al., ICCV 2023, Sec. 4.3)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules import register_module
from .act import ActQuantizer


@register_module
class QuantAttnProcessor(nn.Module):
    """An attention processor (diffusers ``Attention.processor``) whose two matmuls take quantized operands:
    ``q``, ``k`` (for ``Q K^T``), the softmax probabilities and ``v`` (for ``P V``), each with a per-tensor
    activation quantizer (Q-Diffusion Sec. 4.3). Otherwise it computes what diffusers' default processor
    computes. It is an ``nn.Module``, so diffusers keeps it as the child ``processor`` and its ranges are saved.
    """

    OPERANDS = ("q", "k", "v", "probs")

    def __init__(self, act_bits: int, act_symmetric: bool = False) -> None:
        super().__init__()
        self.act_bits, self.act_symmetric = int(act_bits), bool(act_symmetric)
        for name in self.OPERANDS:
            setattr(self, f"{name}_quant", ActQuantizer(act_bits, act_symmetric if name != "probs" else False, 0, -1))

    def module_config(self) -> dict[str, Any]:
        return {"act_bits": self.act_bits, "act_symmetric": self.act_symmetric}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "QuantAttnProcessor":
        return cls(**cfg)

    def quantizers(self) -> list[ActQuantizer]:
        return [getattr(self, f"{n}_quant") for n in self.OPERANDS]

    def export_qparams(self) -> dict[str, Any]:
        """Per-tensor activation scale / zero point / bits of each matmul operand (``q``, ``k``, ``v``, ``probs``)."""
        return {n: getattr(self, f"{n}_quant").export() for n in self.OPERANDS}

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> torch.Tensor:
        return nn.Module.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = self.q_quant(query) @ self.k_quant(key).transpose(-1, -2) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        out = self.probs_quant(probs) @ self.v_quant(value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

