"""Export a model to the formats it ships in, and load the exported file back as a torch callable.

Three formats, one entry point (:func:`export_model`) and one loader (:func:`load_exported`):

* ``onnx`` -- ``torch.onnx.export(dynamo=True)`` of the kind's canonical module, or optimum-onnx for
  transformers models (``exporter: optimum``); int8 as a real QDQ graph (QuantizeLinear /
  DequantizeLinear around integer weights) that ONNX Runtime runs with integer kernels, weight-only
  int8 / int4 as ``MatMulNBits`` (see :mod:`modelpress.exporters.onnx`);
* ``ort`` -- the ONNX Runtime mobile format, converted from the ONNX export (:mod:`modelpress.exporters.ort`);
* ``pte`` -- an ExecuTorch program lowered to the XNNPACK delegate, 8-bit through the XNNPACK PT2E
  quantizer (:mod:`modelpress.exporters.pte`).

Every exported file takes the kind's canonical positional inputs (:mod:`modelpress.model`) and is run in
its own runtime by :func:`load_exported`, so the same metrics score the torch model and its exports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import UserError
from ..model import ModelHandle
from ..registry import Registry

Calibration = Iterable[tuple[torch.Tensor, ...]]


class ExportSpec(BaseModel):
    """One entry of a recipe's ``export:`` list, e.g. ``{format: onnx, quantize: int8, opset: 18}``."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["onnx", "ort", "pte"]
    #: ``int8``: weights and activations in int8 (static, calibrated scales, unless ``activations: dynamic``);
    #: ``int8-weight`` / ``int4-weight``: integer weights, float activations (onnx / ort only)
    quantize: Literal["none", "int8", "int8-weight", "int4-weight"] = "none"
    #: ONNX opset (onnx / ort)
    opset: int = Field(18, ge=17, le=21)
    #: ``dynamo``: torch.onnx for any model; ``optimum``: optimum-onnx, transformers models only
    exporter: Literal["dynamo", "optimum"] = "dynamo"
    #: int8 activation scales: ``static`` (calibrated, QDQ graph), ``dynamic`` (computed per batch at run
    #: time), ``auto`` (calibrated scales of the model's quantized modules if it has them, else dynamic for
    #: text models and static for UNets)
    activations: Literal["auto", "static", "dynamic"] = "auto"
    #: calibration batches for static int8 when the model carries no calibrated scales of its own
    calibration_batches: int = Field(8, ge=1, le=512)
    #: weights per quantization block of ``int4-weight`` / ``int8-weight`` (MatMulNBits)
    block_size: int = Field(32, ge=16, le=256)
    #: export a variable batch size (and sequence length for text); off gives fixed shapes, which the
    #: runtime wrapper fills by padding and chunking
    dynamic: bool = True
    #: causal LMs: the KV-cache graph (past keys / values in, present ones out), which generates token by token
    #: and, with an empty cache, is the canonical call. Unset: on for onnx / ort (variable shapes), off for pte
    #: (its KV-cache program has a static cache of one sequence; ``kv_cache: true`` asks for it)
    kv_cache: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ExportSpec":
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, not {self.block_size}")
        if self.format == "pte" and self.exporter == "optimum":
            raise ValueError("exporter: optimum writes ONNX; use format: onnx or ort")
        if self.format == "pte" and self.quantize in ("int8-weight", "int4-weight"):
            raise ValueError(f"quantize: {self.quantize} is not available for pte (the XNNPACK delegate has no "
                             "weight-only kernels); use quantize: int8 with activations: dynamic")
        if self.kv_cache and self.format == "pte" and self.quantize != "none":
            raise ValueError("kv_cache: true for pte is float only (the static-cache program is not quantized); "
                             "drop quantize or kv_cache")
        if self.kv_cache and not self.dynamic:
            raise ValueError("kv_cache: true needs variable shapes (the cache grows); drop dynamic: false")
        return self

    def uses_kv_cache(self, kind: str) -> bool:
        """Whether a ``kind`` model is exported as the KV-cache graph (:mod:`modelpress.exporters.kv`)."""
        if kind != "causal-lm" or not self.dynamic:
            return False
        return bool(self.kv_cache) if self.format == "pte" else self.kv_cache is not False

    def refusal(self, kind: str) -> str | None:
        """Why this export cannot carry a model of ``kind`` (``None`` when it can): the exporters take the kinds
        whose canonical inputs they name (:data:`modelpress.exporters.common.INPUT_NAMES`)."""
        from .common import INPUT_NAMES

        if self.kv_cache and kind != "causal-lm":
            return f"kv_cache: true exports causal LMs, not a {kind} model"
        if kind in INPUT_NAMES:
            return None
        return f"{self.format} export of a {kind} model is not built yet; export {', '.join(INPUT_NAMES)} models"

    def file_stem(self) -> str:
        """``model``, ``model-int8``, ``model-int8-dynamic``, ``model-optimum``... distinct per option set."""
        parts = ["model"]
        if self.exporter == "optimum":
            parts.append("optimum")
        if self.quantize != "none":
            parts.append(self.quantize)
            if self.quantize == "int8" and self.activations != "auto":
                parts.append(self.activations)
        if not self.dynamic:
            parts.append("static-shape")
        if self.kv_cache is False:
            parts.append("no-kv")
        if self.kv_cache and self.format == "pte":
            parts.append("kv")
        return "-".join(parts)


Exporter = Callable[[ModelHandle, ExportSpec, Path, "Calibration | None"], Path]
def _discover() -> None:
    from . import onnx, ort, pte  # noqa: F401  (registers the exporters)


EXPORTERS: Registry[Exporter] = Registry("export format", _discover)


def register_exporter(fmt: str) -> Callable[[Exporter], Exporter]:
    """Decorator: ``fn(handle, spec, out_dir, calibration) -> main file`` exports format ``fmt``."""

    def wrap(fn: Exporter) -> Exporter:
        return EXPORTERS.add(fmt, fn)

    return wrap


def export_model(handle: ModelHandle, spec: ExportSpec, out_dir: Path, calibration: Calibration | None = None) -> Path:
    """Export ``handle`` (its canonical module) as ``spec`` says into ``out_dir``; return the main file.

    Several exports of one model inside :func:`~modelpress.exporters.common.shared_exports` share the
    export-ready module and the float ONNX graph (``onnx``, ``ort`` and int8 ONNX trace and translate once).

    ``calibration`` is an iterable of canonical input tuples for static int8, or a dataset to draw them
    from; without it, :func:`modelpress.exporters.common.default_calibration` draws from the model's own data.
    Files are written under a temporary name and renamed, so a failed export leaves nothing behind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = EXPORTERS.get(spec.format)
    misfit = spec.refusal(handle.kind)
    if misfit:
        raise UserError(misfit)
    from .common import shared_module

    module = shared_module(handle.module, export_ready)
    with torch.no_grad():
        return exporter(handle.replace_module(module), spec, out_dir, calibration)


def export_ready(module: nn.Module) -> nn.Module:
    """A copy of ``module`` as the exporters take it: compressed layers rebuilt as plain ones (lossless / delta
    layers; :func:`~modelpress.modules.materialize`), in eval mode, in one float type."""
    from ..modules import materialize

    out = materialize(module).eval()
    floats = {p.dtype for p in out.parameters() if p.is_floating_point()}
    if torch.bfloat16 in floats or len(floats) > 1:
        # bf16 / fp16 -> fp32 is exact; the CPU runtimes lack bf16 kernels, and a graph computes in one float
        # type (layers rebuilt in fp16 inside an fp32 model: EvoPress's quantized levels)
        out = out.float()
    return out


def load_exported(path: Path, handle: ModelHandle, threads: int | None = None) -> nn.Module:
    """A module that runs the exported file in its own runtime (onnxruntime for ``.onnx`` / ``.ort``,
    ``executorch.runtime`` for ``.pte``) with the kind's canonical signature, returning a torch tensor."""
    from .runtime import OnnxRuntimeModule, ExecuTorchModule

    path = Path(path)
    if not path.is_file():
        raise UserError("no such exported file", str(path))
    if path.suffix in (".onnx", ".ort"):
        return OnnxRuntimeModule(path, handle.kind, threads=threads)
    if path.suffix == ".pte":
        return ExecuTorchModule(path, handle.kind)
    raise UserError("not an exported model (expected .onnx, .ort or .pte)", str(path))


def exported_info(path: Path) -> dict[str, Any]:
    """The sidecar JSON an exporter wrote next to ``path`` (options, quantized node counts, timings)."""
    import json

    side = Path(path).with_suffix(Path(path).suffix + ".json")
    return json.loads(side.read_text()) if side.exists() else {}


__all__ = ["ExportSpec", "export_model", "load_exported", "register_exporter", "exported_info"]
