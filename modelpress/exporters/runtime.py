"""Exported files run in their own runtimes, behind the kind's canonical torch signature.

:class:`OnnxRuntimeModule` runs ``.onnx`` and ``.ort`` files with onnxruntime (CPU execution provider);
:class:`ExecuTorchModule` runs ``.pte`` programs with ``executorch.runtime``. Both take the same positional
inputs as ``handle.canonical()`` and return a ``torch.Tensor``, so every metric scores them unchanged.

A file exported with fixed shapes (``dynamic: false``) is fed by padding and chunking: a batch is cut into
chunks of the exported batch size (the last padded by repeating its final row), and text shorter than the
exported length is padded with masked tokens (which change no unmasked position's output).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .common import TEXT_KINDS


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
        self.names = [i.name for i in inputs if i.name != "token_type_ids"]
        self.extra = {"token_type_ids": self.names[0]} if any(i.name == "token_type_ids" for i in inputs) else {}
        self.output = self.session.get_outputs()[0].name
        shape = inputs[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.seq = shape[1] if kind in TEXT_KINDS and isinstance(shape[1], int) else None

    def _run(self, args: list[torch.Tensor]) -> torch.Tensor:
        feeds = {}
        for name, a in zip(self.names, args):
            arr = a.detach().cpu().numpy()
            feeds[name] = arr.astype(np.int64) if arr.dtype.kind in "iub" else arr.astype(np.float32)
        for name, like in self.extra.items():
            feeds[name] = np.zeros_like(feeds[like])
        return torch.from_numpy(self.session.run([self.output], feeds)[0])

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

    def _run(self, args: list[torch.Tensor]) -> torch.Tensor:
        inputs = [a.detach().cpu().contiguous().to(torch.int64 if not a.is_floating_point() else torch.float32)
                  for a in args]
        out = self.method.execute(inputs)
        return out[0].clone()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.n_inputs is not None and len(args) != self.n_inputs:
            raise UserError(f"the exported {self.kind} takes {self.n_inputs} inputs, got {len(args)}", str(self.path))
        if self.max_seq is not None and args[0].shape[1] > self.max_seq:
            raise UserError(f"the exported program takes at most {self.max_seq} tokens, got {args[0].shape[1]}",
                            str(self.path))
        return run_fitted(self._run, args, self.kind, self.batch, self.seq)
