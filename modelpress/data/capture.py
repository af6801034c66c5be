"""Layer-input statistics captured with forward hooks: the input Hessians of GPTQ, SparseGPT and Delta-CoMe.

For a layer ``y = W x`` and calibration inputs ``X`` (rows = tokens or image patches), the layer-wise
reconstruction problem ``min ||W X - W' X||^2`` has the Hessian ``H = 2 X X^T`` (GPTQ, Frantar et al. 2023,
Sec. 3; SparseGPT, Frantar & Alistarh 2023, eq. 1). Here it is averaged over the rows seen,
``H = scale / n * sum_i x_i x_i^T`` (``scale = 2`` for GPTQ / SparseGPT, ``1`` for Delta-CoMe's
``X^T X / n``), accumulated in float64. Convolution inputs are unfolded into patches; rows of padding tokens
are left out when the batch carries an attention mask.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..model import TEXT_KINDS, ModelHandle, is_conv1d


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear, GPT-2 ``Conv1D`` or Conv2d as a ``[out, in * kh * kw]`` matrix (a view when
    possible)."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w.reshape(w.shape[0], -1)


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of the layer's input matrix ``X^T`` (``[n, in_features]``); convolutions are unfolded."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # [B, in*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianAccumulator:
    """``H = scale / n * sum_i x_i x_i^T`` over the input rows seen so far (float64 sums, divided at the end)."""

    def __init__(self, columns: int, scale: float = 2.0) -> None:
        self.sum = torch.zeros(columns, columns, dtype=torch.float64)
        self.n = 0
        self.scale = scale

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)
        self.sum += rows.T @ rows
        self.n += rows.shape[0]

    @property
    def H(self) -> torch.Tensor:  # noqa: N802 - the paper's name
        return self.sum * (self.scale / max(1, self.n))


class _Hooks:
    """The accumulators of a :func:`hessian_hooks` block, and the token mask of the batch being run."""

    def __init__(self) -> None:
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.token_mask: torch.Tensor | None = None

    def hessians(self) -> dict[str, torch.Tensor]:
        return {k: a.H for k, a in self.accumulators.items()}


@contextmanager
def hessian_hooks(model: nn.Module, names: Iterable[str], scale: float = 2.0) -> Iterator[_Hooks]:
    """Within the block, every forward through the modules ``names`` (Linear or Conv2d) adds its input rows
    to that module's accumulator; rows where ``hooks.token_mask`` (``[B, L]``, set by the caller) is 0 are
    skipped."""
    hooks = _Hooks()
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        acc = hooks.accumulators[name] = HessianAccumulator(layer_matrix(mod).shape[1], scale)

        def hook(m: nn.Module, args: tuple, _out: Any, acc: HessianAccumulator = acc) -> None:
            x, mask = args[0], hooks.token_mask
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]
            acc.add(layer_input_rows(m, x))

        handles.append(mod.register_forward_hook(hook))
    try:
        yield hooks
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_hessians(model: nn.Module, names: list[str], run: Callable[[], None],
                     scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Input Hessians (float64, ``[in, in]``) of the layers ``names``; ``run()`` feeds the calibration data."""
    with hessian_hooks(model, names, scale) as hooks:
        run()
    return hooks.hessians()


@torch.no_grad()
def model_hessians(handle: ModelHandle, names: list[str], batches: Iterable[tuple[torch.Tensor, ...]],
                   scale: float = 2.0, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Input Hessians of the layers ``names`` of ``module`` (default: the handle's) over canonical input
    ``batches``; padding tokens of text batches are left out.

    With several ranks (:mod:`modelpress.distributed`) the calibration is split by data: rank ``r`` runs the
    batches ``r, r + W, ...`` and the float64 sums and row counts are added over the ranks in rank order
    (:func:`~modelpress.distributed.sum_in_rank_order`). Every rank gets the same Hessians; they equal one
    process's up to the order of float64 additions (relative differences ~1e-16, ``tests/test_distributed.py``),
    not bit for bit."""
    module = handle.module if module is None else module
    canon = handle.replace_module(module).canonical()
    size = distributed.world_size() if distributed.active() else 1
    me = distributed.rank() % size  # 0 inside distributed.alone(): a rank working by itself takes every batch
    with hessian_hooks(module, names, scale) as hooks:
        for i, batch in enumerate(batches):
            if i % size != me:
                continue
            hooks.token_mask = batch[1] if handle.kind in TEXT_KINDS else None
            canon(*batch)
    add_over_ranks(hooks)
    return hooks.hessians()


def add_over_ranks(hooks: _Hooks) -> None:
    """With several ranks, each having seen its share of the calibration data: every accumulator's float64 sum
    and row count added over the ranks in rank order (:func:`~modelpress.distributed.sum_in_rank_order`: every
    rank gets the same bits). Nothing in one process."""
    if not distributed.active():
        return
    for acc in hooks.accumulators.values():
        acc.sum = distributed.sum_in_rank_order(acc.sum)
        acc.n = int(distributed.sum_in_rank_order(torch.tensor([acc.n], dtype=torch.float64)).item())
