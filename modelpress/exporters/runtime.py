"""Exported files run in their own runtimes, behind the kind's canonical torch signature.

:class:`OnnxRuntimeModule` runs ``.onnx`` and ``.ort`` files with onnxruntime (CPU execution provider);
:class:`ExecuTorchModule` runs ``.pte`` programs with ``executorch.runtime``. Both take the same positional
inputs as ``handle.canonical()`` and return a ``torch.Tensor``, so every metric scores them unchanged.

A file exported with fixed shapes (``dynamic: false``) is fed by padding and chunking: a batch is cut into
chunks of the exported batch size (the last padded by repeating its final row), and text shorter than the
exported length is padded with masked tokens (which change no unmasked position's output).

A causal LM's KV-cache graph (:mod:`modelpress.exporters.kv`) is called canonically with an empty cache, and
:meth:`OnnxRuntimeModule.generate` runs it token by token, feeding each call's ``present`` back as ``past``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .common import TEXT_KINDS
from .kv import PAST_PREFIX, greedy_tokens


def run_fitted(fn: Callable[[list[torch.Tensor]], torch.Tensor], args: Sequence[torch.Tensor], kind: str,
               batch: int | None, seq: int | None) -> torch.Tensor:
    """Call ``fn`` on ``args`` adapted to a fixed ``batch`` / text ``seq`` (``None``: any size accepted)."""
    args = list(args)
    length = args[0].shape[1] if kind in TEXT_KINDS else None
    if kind in TEXT_KINDS and seq is not None and length != seq:
        if length > seq:
            raise UserError(f"the exported model takes at most {seq} tokens, got {length}; "
                            "export with dynamic: true or a longer sequence")
        pad = seq - length
        args = [torch.nn.functional.pad(a, (0, pad), value=0) for a in args[:2]] + args[2:]
    n = args[0].shape[0]
    if batch is None or n == batch:
        out = fn(args)
    else:
        outs = []
        for start in range(0, n, batch):
            chunk = [a[start:start + batch] for a in args]
            short = batch - chunk[0].shape[0]
            if short:
                chunk = [torch.cat([c, c[-1:].expand(short, *c.shape[1:])]) for c in chunk]
            outs.append(fn(chunk)[: batch - short])
        out = torch.cat(outs)
    if kind in ("encoder", "causal-lm") and length is not None and out.shape[1] != length:  # outputs per token
        out = out[:, :length]
    return out


class GraphFeeds:
    """The feed of an ONNX graph from canonical positional inputs: the graph's other inputs are filled in --
    ``token_type_ids`` (zeros), ``position_ids`` (``P, P + 1, ...`` after ``P`` cached tokens, as
    transformers numbers them) and the ``past_key_values.*`` of a KV-cache graph (empty unless given).
    ``inputs``: the graph's ``(name, shape)`` pairs in order."""

    def __init__(self, inputs: Sequence[tuple[str, Sequence]]) -> None:
        self.all = [name for name, _ in inputs]
        self.past = {name: list(shape) for name, shape in inputs if name.startswith(PAST_PREFIX)}
        self.canonical = [n for n in self.all if n not in self.past and n not in ("token_type_ids", "position_ids")]

    def __call__(self, args: Sequence[torch.Tensor], past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        feeds = {}
        for name, a in zip(self.canonical, args):
            arr = a.detach().cpu().numpy()
            feeds[name] = arr.astype(np.int64) if arr.dtype.kind in "iub" else arr.astype(np.float32)
        ids = feeds[self.canonical[0]]
        if "token_type_ids" in self.all:
            feeds["token_type_ids"] = np.zeros_like(ids)
        cached = next(iter(past.values())).shape[2] if past else 0
        if "position_ids" in self.all:
            feeds["position_ids"] = np.broadcast_to(np.arange(cached, cached + ids.shape[1], dtype=np.int64), ids.shape).copy()
        for name, shape in self.past.items():
            feeds[name] = past[name] if past else np.zeros((ids.shape[0], shape[1], 0, shape[3]), np.float32)
        return feeds


class OnnxRuntimeModule(nn.Module):
    """An ``.onnx`` / ``.ort`` file behind the canonical signature, run by onnxruntime on CPU.

    ``threads`` sets onnxruntime's intra-op threads (default: torch's thread count, so latency compares
    like with like)."""

    def __init__(self, path: Path, kind: str, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path, self.kind = Path(path), kind
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"onnxruntime cannot load this file: {first}", str(self.path)) from None
        inputs = self.session.get_inputs()
        self.feeds = GraphFeeds([(i.name, i.shape) for i in inputs])
        self.names = self.feeds.canonical
        self.output = self.session.get_outputs()[0].name
        shape = inputs[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.seq = shape[1] if kind in TEXT_KINDS and isinstance(shape[1], int) else None

    def _run(self, args: list[torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(self.session.run([self.output], self.feeds(args))[0])

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation ``[B, new_tokens]`` of ``prompt`` ``[B, P]`` (a causal LM): through the KV cache
        when the graph has one (the prompt once, then one token per call), else the whole sequence per token."""
        if not self.feeds.past:
            return greedy_tokens(self, prompt, new_tokens)
        outputs = [o.name for o in self.session.get_outputs()]
        ids, mask, past, chosen = prompt, torch.ones_like(prompt), None, []
        for _ in range(new_tokens):
            values = dict(zip(outputs, self.session.run(outputs, self.feeds([ids, mask], past))))
            ids = torch.from_numpy(values[self.output][:, -1].argmax(-1)[:, None].astype(np.int64))
            chosen.append(ids)
            mask = torch.ones(mask.shape[0], mask.shape[1] + 1, dtype=mask.dtype)
            past = {name: values[name.replace(PAST_PREFIX, "present.")] for name in self.feeds.past}
        return torch.cat(chosen, dim=1)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if len(args) != len(self.names):
            raise UserError(f"the exported {self.kind} takes {len(self.names)} inputs ({', '.join(self.names)}), "
                            f"got {len(args)}", str(self.path))
        return run_fitted(self._run, args, self.kind, self.batch, self.seq)


class ExecuTorchModule(nn.Module):
    """A ``.pte`` program behind the canonical signature, run by ``executorch.runtime`` (XNNPACK delegate
    plus portable kernels)."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__()
        from executorch.runtime import Runtime

        from . import exported_info

        self.path, self.kind = Path(path), kind
        try:
            self.program = Runtime.get().load_program(str(self.path))
            self.method = self.program.load_method("forward")
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"executorch cannot load this program: {first}", str(self.path)) from None
        info = exported_info(self.path)
        shapes = info.get("input_shapes")
        dynamic = info.get("dynamic", True)
        bounds = info.get("dynamic_bounds") or {}
        # a dynamic program still has an upper bound on its batch (memory is planned for it): chunk above it
        self.batch = (int(bounds["batch"][1]) if dynamic and "batch" in bounds and bounds["batch"][1] < 4096
                      else None if dynamic or not shapes else int(shapes[0][0]))
        self.seq = None if dynamic or not shapes or kind not in TEXT_KINDS else int(shapes[0][1])
        self.max_seq = int(bounds["seq"][1]) if dynamic and "seq" in bounds else None
        self.n_inputs = len(shapes) if shapes else None
        self.kv_cache = bool(info.get("kv_cache"))
        if self.kv_cache:  # called canonically: (input_ids, attention_mask) as any causal LM export
            self.n_inputs, self.batch = 2, 1

    def _run(self, args: list[torch.Tensor]) -> torch.Tensor:
        if self.kv_cache:  # one sequence from position 0: later cache positions are masked, stale or not
            return self._step(args[0], 0)
        inputs = [a.detach().cpu().contiguous().to(torch.int64 if not a.is_floating_point() else torch.float32)
                  for a in args]
        out = self.method.execute(inputs)
        return out[0].clone()

    def _step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """A static-cache program on ``ids`` ``[1, S]`` at positions ``start...``: the logits ``[1, S, V]``."""
        ids = ids.detach().cpu().to(torch.int64).contiguous()
        return self.method.execute([ids, torch.arange(start, start + ids.shape[1])])[0].clone()

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation ``[B, new_tokens]`` of ``prompt`` ``[B, P]`` (a causal LM): through the static cache
        of a KV-cache program (each row: the prompt once, then one token per call), else the whole sequence per
        token."""
        if not self.kv_cache:
            return greedy_tokens(self, prompt, new_tokens)
        if self.max_seq is not None and prompt.shape[1] + new_tokens > self.max_seq:
            raise UserError(f"the exported program caches at most {self.max_seq} tokens, asked for "
                            f"{prompt.shape[1]} + {new_tokens}", str(self.path))
        rows = []
        for row in prompt:
            ids, chosen = row[None], []
            for _ in range(new_tokens):
                start = row.shape[0] + len(chosen) - ids.shape[1]
                ids = self._step(ids, start)[:, -1].argmax(-1, keepdim=True)
                chosen.append(ids)
            rows.append(torch.cat(chosen, dim=1))
        return torch.cat(rows)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.n_inputs is not None and len(args) != self.n_inputs:
            raise UserError(f"the exported {self.kind} takes {self.n_inputs} inputs, got {len(args)}", str(self.path))
        if self.max_seq is not None and args[0].shape[1] > self.max_seq:
            raise UserError(f"the exported program takes at most {self.max_seq} tokens, got {args[0].shape[1]}",
                            str(self.path))
        return run_fitted(self._run, args, self.kind, self.batch, self.seq)
