"""Calibration activations propagated through a causal LM one decoder block at a time (streamed calibration).

GPTQ (Frantar et al. 2023, Sec. 4, "the model is quantized block by block": the inputs of block ``k + 1`` are
the outputs of block ``k`` on the calibration data) and llm-compressor's sequential pipeline never hold the
model: they keep the calibration batches' hidden states between blocks. :class:`BlockActivations` does the
same for :mod:`modelpress.stream`, for every pass that calibrates on activations
(:meth:`~modelpress.passes.Pass.unit_calibration`):

1. **Block 0's inputs** are made by the model's own forward: the model without its blocks (embeddings, final
   norm, head; its rotary embedding's ``inv_freq`` computed on the CPU when the structure was built) runs each
   calibration batch with its blocks replaced by a *catcher* that records what block 0 receives and stops the
   forward: the hidden states, the position ids, the rotary ``(cos, sin)``, the causal + padding mask, the
   (empty) key-value cache.
2. **Block k**: :meth:`BlockActivations.through_block` runs every batch, in batch order, through the block
   with forward hooks accumulating its layers' input Hessians (:func:`modelpress.data.capture.hessian_hooks`,
   the padding tokens left out), and keeps the block's outputs as block ``k + 1``'s inputs. Each batch gets a
   fresh copy of the empty cache, as the in-memory forward gives each block an empty cache layer.
3. **The model without its blocks** (:meth:`BlockActivations.through_rest`): the forward runs once more with
   the blocks replaced by a module that returns the last block's outputs, so the hooks see the head's inputs
   (and those of any layer before the blocks). :meth:`BlockActivations.outputs_of_rest` keeps that forward's
   outputs instead: the logits of the whole model, for the streamed evaluation (:mod:`modelpress.stream_eval`;
   the blocks propagated without hooks, :meth:`BlockActivations.propagate`).

Each layer's float64 sum is added batch by batch in batch order from the same inputs as in the whole model's
forward (:func:`modelpress.data.capture.model_hessians`), so the Hessians are the in-memory path's bit for bit
(``tests/test_stream.py``). The blocks propagate their own outputs before the pass changes them: the
activations are the input model's, as the in-memory passes that collect every Hessian first (Delta-CoMe) see
them. Memory: every batch's hidden states (samples x tokens x hidden size, in the model's dtype) and the
arguments the model gives every block (rotary ``cos`` / ``sin``, the mask) live between blocks; docs/scale.md.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from . import distributed
from .data.capture import add_over_ranks, hessian_hooks
from .errors import UserError
from .model import TEXT_KINDS, ModelHandle, find_blocks
from .modules import set_submodule
from .quant.spool import map_leaves


class _Caught(Exception):
    """Raised by :class:`_Catcher` to stop the model's forward at block 0."""


class _Catcher(nn.Module):
    """Stands for the blocks: records the arguments of the first block's call and stops the forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.args, self.kwargs = args, kwargs
        raise _Caught


class _Replay(nn.Module):
    """Stands for the blocks: returns the last block's outputs of the batch being run, as a block returns them."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@dataclass
class _Batch:
    """One calibration batch as the current block receives it: its hidden states, the other arguments the
    model's forward gives every block, and the mask of the real tokens (``None``: every row counts)."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None


def _is_cache(value: Any) -> bool:
    """A transformers key-value cache (``DynamicCache``...), which a block fills as it runs."""
    return type(value).__module__.startswith("transformers.cache_utils")


def _fresh(value: Any) -> Any:
    """An empty key-value cache copied for one block call (other arguments as they are)."""
    return copy.deepcopy(value) if _is_cache(value) else value


class BlockActivations:
    """The calibration batches' inputs to the next decoder block (see the module docstring)."""

    def __init__(self, rest: ModelHandle, blocks_path: str, batches: list[tuple[torch.Tensor, ...]],
                 split: bool = False) -> None:
        """Run ``batches`` (canonical inputs) through ``rest``, the model without its blocks (an empty
        ``nn.ModuleList`` at ``blocks_path``) with its weights, up to block 0's inputs; ``rest`` is not kept.
        ``split``, with several ranks (:mod:`modelpress.distributed`): the calibration is split by data, rank
        ``r`` keeping the batches ``r, r + W, ...``; the Hessians are added over the ranks in rank order (every
        rank gets the same; equal to one process's up to the order of float64 additions)."""
        self.blocks_path = blocks_path
        self.split = split and distributed.active()
        size, me = (distributed.world_size(), distributed.rank()) if self.split else (1, 0)
        self.batches = [b for i, b in enumerate(batches) if i % size == me]
        self.block_returns_tuple = False
        self.states = [self._catch(rest, batch) for batch in self.batches]

    @torch.no_grad()
    def _catch(self, rest: ModelHandle, batch: tuple[torch.Tensor, ...]) -> _Batch:
        catcher = _Catcher()
        with _blocks_replaced(rest.module, self.blocks_path, catcher):
            try:
                rest.canonical()(*batch)
            except _Caught:
                pass
        if not getattr(catcher, "args", None):  # a model class whose forward runs its blocks otherwise
            raise UserError(f"cannot propagate activations block by block: the {type(rest.module).__name__}'s forward "
                            f"does not call its blocks at {self.blocks_path} with their inputs first (set stream: "
                            "false)", rest.source)
        hidden, *args = catcher.args
        return _Batch(hidden, tuple(args), dict(catcher.kwargs), batch[1] if rest.kind in TEXT_KINDS else None)

    @torch.no_grad()
    def through_block(self, unit: nn.Module, block_path: str, layers: list[str], scale: float,
                      advance: bool = True) -> dict[str, torch.Tensor]:
        """Run every batch through the block at ``block_path`` of ``unit`` (its weights loaded, not yet changed
        by the pass), accumulating the input Hessians of ``layers`` (paths in ``unit``); with ``advance`` the
        block's outputs become the next block's inputs (GPTQ's sequential mode instead calls :meth:`propagate`
        once the block is compressed). Returns the Hessians
        (:class:`~modelpress.data.capture.HessianAccumulator` ``.H``)."""
        with hessian_hooks(unit, layers, scale) as hooks:
            self.propagate(unit.get_submodule(block_path), hooks, advance)
        if self.split:
            add_over_ranks(hooks)
        return hooks.hessians()

    @torch.no_grad()
    def propagate(self, block: nn.Module, hooks: Any = None, advance: bool = True) -> None:
        """Run every batch, in batch order, through ``block``: with ``advance`` its outputs become the next
        block's inputs (``hooks``: the Hessian hooks told each batch's token mask)."""
        for state in self.states:
            if hooks is not None:
                hooks.token_mask = state.token_mask
            out = block(state.hidden, *(_fresh(a) for a in state.args),
                        **{k: _fresh(v) for k, v in state.kwargs.items()})
            self.block_returns_tuple = isinstance(out, tuple)
            if advance:
                state.hidden = out[0] if self.block_returns_tuple else out

    def _replayed(self, rest: ModelHandle, hooks: Any = None) -> Iterator[torch.Tensor]:
        """Each batch's output of ``rest`` (the model's canonical call: logits for a causal LM), its blocks
        replaced by the last block's outputs on that batch."""
        for batch, state in zip(self.batches, self.states):
            if hooks is not None:
                hooks.token_mask = state.token_mask
            output = (state.hidden,) if self.block_returns_tuple else state.hidden
            with _blocks_replaced(rest.module, self.blocks_path, _Replay(output)):
                yield rest.canonical()(*batch)

    @torch.no_grad()
    def through_rest(self, rest: ModelHandle, layers: list[str], scale: float) -> dict[str, torch.Tensor]:
        """Run every batch through ``rest``, the model without its blocks (its weights loaded, not yet changed by
        the pass), the blocks replaced by the last block's outputs, accumulating the input Hessians of ``layers``
        (the head's, and those of any layer before the blocks)."""
        if not layers:  # a tied head is no layer of its own: nothing to run the head's forward for
            return {}
        with hessian_hooks(rest.module, layers, scale) as hooks:
            for _ in self._replayed(rest, hooks):
                pass
        if self.split:
            add_over_ranks(hooks)
        return hooks.hessians()

    @torch.no_grad()
    def outputs_of_rest(self, rest: ModelHandle) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """Every batch with the model's output on it (for a causal LM its logits), as the whole model's
        canonical call gives it: the blocks' part replayed from the last block's outputs, the rest (final norm,
        head) run by ``rest`` (streamed evaluation, :mod:`modelpress.stream_eval`)."""
        yield from zip(self.batches, self._replayed(rest))

    def nbytes(self) -> int:
        """Bytes held between blocks: every batch's hidden states and the tensors among its block arguments."""
        sizes: dict[int, int] = {}

        def count(t: torch.Tensor) -> torch.Tensor:
            sizes[id(t)] = t.numel() * t.element_size()
            return t

        map_leaves(count, [(state.hidden, state.args, state.kwargs) for state in self.states])
        return sum(sizes.values())


def hessians_block_by_block(handle: ModelHandle, names: list[str], batches: list[tuple[torch.Tensor, ...]],
                            scale: float = 2.0) -> Iterator[dict[str, torch.Tensor]]:
    """The input Hessians of the layers ``names`` (all inside the model's repeated blocks) of the model as it is,
    one block's at a time in block order: the calibration ``batches`` run through the blocks one after the other
    (:class:`BlockActivations`; padding tokens left out), so that only one block's Hessians are held at once
    (EvoPress' level database, :func:`modelpress.search.levels.build_database`)."""
    blocks_path = find_blocks(handle.module)
    acts = BlockActivations(handle, blocks_path, batches)
    for i in range(len(handle.module.get_submodule(blocks_path))):
        path = f"{blocks_path}.{i}"
        yield acts.through_block(handle.module, path, [n for n in names if n.startswith(path + ".")], scale)


@contextmanager
def _blocks_replaced(model: nn.Module, path: str, stand_in: nn.Module) -> Iterator[None]:
    """Within the block, the model's blocks (the ``nn.ModuleList`` at ``path``) are one stand-in module."""
    saved = model.get_submodule(path)
    set_submodule(model, path, nn.ModuleList([stand_in]))
    try:
        yield
    finally:
        set_submodule(model, path, saved)
