"""``cast``: change the floating-point dtype of the weights (fp32 -> bf16 / fp16), the simplest pass.

It exists to exercise the framework end to end and as the first step of lossless coding of bf16 weights.
"""
from __future__ import annotations

from typing import Literal

import torch

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
        dtype = DTYPES[self.config.dtype]
        n = sum(p.numel() for p in model.module.parameters() if p.is_floating_point())
        cast_weights(model.module, dtype)
        ctx.record(self.name, dtype=self.config.dtype, parameters=n)
        return model
