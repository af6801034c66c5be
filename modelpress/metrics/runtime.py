"""Runtime metrics: latency of the canonical forward (median of repeats)."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..model import ModelHandle, example_inputs
from . import EvalContext, MetricResult, register_metric


def time_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int = 10, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``model(*inputs)`` after ``warmup`` untimed calls."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(*inputs)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


@register_metric("latency", kinds=("encoder", "classifier", "unet", "unet-cond"),
                 description="median milliseconds of one forward on a batch of example inputs")
def latency(model: nn.Module, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    batch = int(ctx.options.get("batch", 8))
    repeats = int(ctx.samples or ctx.options.get("repeats", 10))
    times = time_forward(model, example_inputs(handle, batch=batch, seed=ctx.seed), repeats=repeats)
    return MetricResult(1000 * statistics.median(times), higher_is_better=False,
                        details={"batch": batch, "repeats": repeats, "min_ms": 1000 * min(times),
                                 "threads": torch.get_num_threads()})
