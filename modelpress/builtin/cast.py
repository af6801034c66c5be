"""``cast``: change the floating-point dtype of the weights (fp32 -> bf16 / fp16), the simplest pass.

It exists to exercise the framework end to end and as the first step of lossless coding of bf16 weights.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import nn

from ..model import ModelHandle, cast_weights
from ..passes import Context, Pass, PassConfig, register_pass

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@register_pass
class Cast(Pass):
    """Cast every floating-point parameter and stored buffer to ``dtype`` (:func:`~modelpress.model.cast_weights`)."""

    name = "cast"
    compresses = False

    class Config(PassConfig):
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        model, part = self.apply_unit(model, ctx, None, 0)
        self.record_units([part], ctx)
        return model

    units_independent = True

    def streams(self) -> bool:
        return True

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        n = sum(p.numel() for p in unit.module.parameters() if p.is_floating_point())
        cast_weights(unit.module, DTYPES[self.config.dtype])
        return unit, {"parameters": n}

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        ctx.record(self.name, dtype=self.config.dtype, parameters=sum(p["parameters"] for p in parts))
