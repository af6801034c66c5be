"""Causal LMs with a KV cache: the graph that generates token by token, and greedy generation through it.

A causal LM's canonical call scores a whole window, ``(input_ids, attention_mask) -> logits``. Generating
with it recomputes every earlier position at each new token. The KV-cache graph takes the keys and values of
the positions seen so far and returns them extended by the new ones, so each step runs only the new tokens:

    inputs:  input_ids [B, S], attention_mask [B, P + S],
             past_key_values.{i}.key / .value [B, kv_heads, P, head_dim]   (P = 0 on the first call)
    outputs: logits [B, S, V], present.{i}.key / .value [B, kv_heads, P + S, head_dim]

The names are optimum-onnx's (its ``text-generation-with-past`` graphs, which also take ``position_ids``,
run through the same wrapper). Positions are ``P, P + 1, ...``, as transformers computes them when no
``position_ids`` are given, so with an empty cache the graph's logits are the canonical call's (right
padding, as everywhere in modelpress). :func:`greedy_tokens` is the torch reference generation (the
canonical call over the whole sequence at every step, no cache), which an export's cached generation
must match token for token.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..model import ModelHandle, example_inputs, max_positions

PAST_PREFIX = "past_key_values."


def cache_layout(module: nn.Module) -> list[tuple[int, int]]:
    """``(kv_heads, head_dim)`` of each layer's cache, read off one short forward (so any transformers causal
    LM -- grouped-query Llama / Qwen2, GPT-2 -- is described by what it actually caches)."""
    with torch.no_grad():
        cache = module(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True).past_key_values
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in cache.layers]


def kv_input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [f"{PAST_PREFIX}{i}.{t}" for i in range(layers) for t in ("key", "value")]


def kv_output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{t}" for i in range(layers) for t in ("key", "value")]


class KVCacheLM(nn.Module):
    """``(input_ids, attention_mask, past_0_key, past_0_value, ...) -> (logits, present_0_key, ...)`` over a
    transformers causal LM: the flat past tensors are put into a ``DynamicCache`` for the model's forward."""

    def __init__(self, inner: nn.Module, layers: int) -> None:
        super().__init__()
        self.inner, self.layers = inner, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_trace_inputs(handle: ModelHandle, layout: list[tuple[int, int]], batch: int = 2, seq: int = 3,
                    past: int = 5) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Example inputs for tracing :class:`KVCacheLM`: ``seq`` new tokens after ``past`` cached ones (both more
    than 1, so that torch.export keeps the dims symbolic)."""
    ids = example_inputs(handle, batch=batch, seq_len=seq)[0]
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    cache = tuple(torch.randn(batch, heads, past, dim, generator=g) for heads, dim in layout for _ in range(2))
    return ids, mask, cache


def kv_dynamic_shapes(handle: ModelHandle, layers: int) -> tuple[Any, ...]:
    """Variable batch, new tokens and cached tokens (0 allowed: the first call); the mask's length is theirs
    summed (torch.export derives it from the model's own guards)."""
    from torch.export import Dim

    longest = max_positions(handle) or 2048
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("sequence_length", min=1, max=longest)
    past = Dim("past_sequence_length", min=0, max=longest)
    return {0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, tuple({0: batch, 2: past} for _ in range(2 * layers))


#: cache length of a ``.pte`` with a KV cache (a static cache, its memory planned ahead), capped by the model's
#: positions: the longest prompt + continuation, and the longest window it scores
PTE_CACHE_LEN = 256


def static_cache_program(handle: ModelHandle, module: nn.Module) -> tuple[Any, int]:
    """The ExecuTorch KV-cache program of a causal LM: transformers' ``TorchExportableModuleWithStaticCache``
    (one sequence; the cache is a mutable buffer of :data:`PTE_CACHE_LEN` positions that the program writes at
    ``cache_position``), ``(input_ids [1, S], cache_position [S]) -> logits [1, S, V]``, exported by
    ``torch.export`` in strict mode (non-strict tracing of the cache updates fails to decompose in torch 2.13).
    Returns the program and the cache length."""
    from torch.export import Dim
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    length = min(PTE_CACHE_LEN, max_positions(handle) or PTE_CACHE_LEN)
    module.requires_grad_(False)
    module.generation_config = GenerationConfig(use_cache=True, cache_implementation="static", max_length=length,
                                                cache_config={"batch_size": 1, "max_cache_len": length})
    wrapper = TorchExportableModuleWithStaticCache(module, batch_size=1, max_cache_len=length)
    seq = Dim("sequence_length", min=1, max=length)
    inputs = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "cache_position": torch.arange(4)}
    program = torch.export.export(wrapper, (), inputs, dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}},
                                  strict=True)
    return program, length


def greedy_tokens(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prompt: torch.Tensor,
                  new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``prompt`` ``[B, P]`` by a canonical call (no cache: the whole sequence is run
    at every step); returns the ``[B, new_tokens]`` chosen ids. End-of-sequence does not stop it, so runs
    compare over a fixed length."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = logits_fn(ids, torch.ones_like(ids))
            ids = torch.cat([ids, logits[:, -1].float().argmax(-1, keepdim=True).to(ids.dtype)], dim=1)
    return ids[:, prompt.shape[1]:]


__all__ = ["KVCacheLM", "cache_layout", "kv_input_names", "kv_output_names", "kv_trace_inputs",
           "kv_dynamic_shapes", "greedy_tokens", "static_cache_program", "PAST_PREFIX", "PTE_CACHE_LEN"]
