"""ONNX export: torch.onnx (dynamo) for any kind, optimum-onnx for transformers models, and integer graphs.

Quantized ONNX comes from one of three places, always as real integer tensors in the file:

1. **The model's own calibrated quantizers** (the PTQ passes' :class:`~modelpress.quant.layers.QuantLinear` /
   ``QuantConv2d`` / ``ActQuantizer``): each is swapped for a module written in PyTorch's
   ``quantized_decomposed`` ops, which torch.onnx translates to ``QuantizeLinear`` / ``DequantizeLinear``.
   Weights become int8 initializers with per-output-channel scale and zero point (axis 0), activations
   a Q/DQ pair with the calibrated per-tensor scale: the QDQ format, which ONNX Runtime fuses into integer
   kernels (QLinearConv, MatMulIntegerToFloat...). The graph reproduces the torch module's fake
   quantization exactly up to float rounding; split (concatenated skip) ranges become two Q/DQ pairs and
   per-timestep ranges a per-sample scale gathered from the timestep input.
2. **ONNX Runtime's quantizer** for float models (``quantize: int8``): static QDQ with calibration data
   (MinMax ranges over ``calibration_batches`` canonical batches), or dynamic quantization (int8 weights,
   per-batch activation scales: ``MatMulInteger`` / ``DynamicQuantizeLinear``), the usual choice for
   transformer encoders on CPU.
3. **Weight-only** (``int8-weight`` / ``int4-weight``): ``MatMulNBits`` (blockwise symmetric, ``block_size``
   weights per scale) for every MatMul with a constant weight and ``GatherBlockQuantized``-free embedding
   tables kept float; Conv weights become int8 + ``DequantizeLinear`` for ``int8-weight``.

Every written file is opened once with ONNX Runtime before it is renamed into place, so an operator the
runtime lacks is reported at export time, naming the node's module.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..model import ModelHandle
from . import ExportSpec, register_exporter
from .common import (INPUT_NAMES, OUTPUT_NAMES, TEXT_KINDS, as_list, export_error, export_program, scratch_dir,
                     shared_float_graph, trace_inputs, traceable, write_info)
from .kv import KVCacheLM, cache_layout, kv_dynamic_shapes, kv_input_names, kv_output_names, kv_trace_inputs
from .qdq import has_calibrated_quant, qdq_module
from .runtime import GraphFeeds


@register_exporter("onnx")
def export_onnx(handle: ModelHandle, spec: ExportSpec, out_dir: Path, calibration: Any = None) -> Path:
    """Write ``<stem>.onnx`` (and its ``.json`` sidecar) into ``out_dir``."""
    final = out_dir / f"{spec.file_stem()}.onnx"
    with scratch_dir(out_dir) as tmp:
        path, info = build_onnx(handle, spec, tmp, calibration)
        check_runtime(path, handle)
        os.replace(path, final)
    info["size_bytes"] = final.stat().st_size
    write_info(final, info)
    return final


def build_onnx(handle: ModelHandle, spec: ExportSpec, tmp: Path, calibration: Any = None) -> tuple[Path, dict[str, Any]]:
    """Export (and quantize) into the scratch directory ``tmp``; returns the file and what was done."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {"format": "onnx", "kind": handle.kind, "spec": spec.model_dump(),
                            "input_names": list(INPUT_NAMES[handle.kind])}
    float_path = tmp / "float.onnx"
    calibrated = has_calibrated_quant(handle.module)
    kv = info["kv_cache"] = spec.uses_kv_cache(handle.kind)

    def build(path: Path) -> dict[str, Any]:
        if spec.exporter == "optimum":
            if calibrated:
                raise UserError("exporter: optimum cannot express the model's quantized modules; use exporter: "
                                "dynamo", handle.architecture.get("class"))
            export_optimum(handle, path, spec.opset, kv)
            return {}
        module = qdq_module(handle.module) if calibrated else handle.module
        if kv:
            export_kv_dynamo(handle, module, path, spec.opset)
            return {}
        return {"dynamic_bounds": export_dynamo(handle, module, path, spec.opset, spec.dynamic)}

    # onnx, ort and int8 onnx of one model in one run (common.shared_exports) translate it once
    info.update(shared_float_graph(handle.module, (spec.exporter, spec.opset, spec.dynamic, kv), float_path, build))
    info["float_size_bytes"] = float_path.stat().st_size
    info["input_names"] = graph_feeds(float_path).all
    path = float_path
    if calibrated:
        info["quantization"] = "qdq from the model's calibrated quantizers"
        if spec.quantize not in ("none", "int8"):
            info["note"] = f"quantize: {spec.quantize} ignored: the model is already quantized by its passes"
    elif spec.quantize == "int8":
        path = ort_quantize_int8(float_path, tmp, handle, spec, calibration, info)
    elif spec.quantize in ("int8-weight", "int4-weight"):
        path = weight_only(float_path, tmp, bits=8 if spec.quantize == "int8-weight" else 4,
                           block_size=spec.block_size, info=info)
    info["op_counts"] = op_counts(path)
    info["export_seconds"] = round(time.perf_counter() - t0, 2)
    return path, info


# ---------------------------------------------------------------------------------------------------
# Float export

def export_dynamo(handle: ModelHandle, module: nn.Module, path: Path, opset: int, dynamic: bool
                  ) -> dict[str, tuple[int, int]] | None:
    """``torch.export`` the canonical module, then translate it with ``torch.onnx.export(dynamo=True)``."""
    wrapper = traceable(handle, module)
    inputs = trace_inputs(handle)
    program = None
    try:
        program, bounds = export_program(wrapper, inputs, handle, dynamic)
        translate(program, inputs, list(INPUT_NAMES[handle.kind]), [OUTPUT_NAMES[handle.kind]], path, opset)
    except UserError:
        raise
    except Exception as exc:
        raise export_error(exc, "ONNX", handle, program) from None
    return bounds


def export_kv_dynamo(handle: ModelHandle, module: nn.Module, path: Path, opset: int) -> None:
    """The KV-cache graph of a causal LM (:class:`~modelpress.exporters.kv.KVCacheLM`), variable batch, new
    tokens and cached tokens, via ``torch.export`` and ``torch.onnx.export(dynamo=True)``."""
    layout = cache_layout(module)
    wrapper = KVCacheLM(module, len(layout)).eval()
    inputs = kv_trace_inputs(handle, layout)
    program = None
    try:
        program = torch.export.export(wrapper, inputs, dynamic_shapes=kv_dynamic_shapes(handle, len(layout)),
                                      strict=False)
        translate(program, inputs, kv_input_names(len(layout)), kv_output_names(len(layout)), path, opset)
    except UserError:
        raise
    except Exception as exc:
        raise export_error(exc, "ONNX (KV cache)", handle, program) from None


def translate(program: Any, inputs: tuple[Any, ...], input_names: list[str], output_names: list[str], path: Path,
              opset: int) -> None:
    """An exported program to an ONNX file (one file, debug metadata stripped): torch.onnx's translation with
    its torchlib registry built once per process (:func:`torchlib_registry`), else ``torch.onnx.export``."""
    registry = torchlib_registry(opset)
    if registry is None:
        onnx_program = torch.onnx.export(program, inputs, dynamo=True, input_names=input_names,
                                         output_names=output_names, opset_version=opset, optimize=True,
                                         verbose=False, report=False)
    else:
        from torch.onnx._internal.exporter import _core

        # what torch.onnx.export does with an ExportedProgram (torch/onnx/_internal/exporter/_compat.py,
        # export_compat: no dynamic_shapes to convert, no custom table), handing it the registry it would rebuild
        onnx_program = _core.export(program, inputs, None, registry=registry, dynamic_shapes={},
                                    input_names=input_names, output_names=output_names, profile=False, report=False,
                                    verify=False, dump_exported_program=False, artifacts_dir=".", verbose=False,
                                    optimize=True, opset_version=opset)
    onnx_program.save(str(path), external_data=False)
    strip_debug_metadata(path)


@functools.cache
def _torchlib_opset() -> int | None:
    """The opset of torch.onnx's torchlib functions, or ``None`` when the private entry point
    :func:`translate` hands a registry to (``_core.export(..., registry=)``) is not there: ``torch.onnx.export``
    is then used as is. ``tests/test_export.py`` checks it is there on the pinned torch."""
    import inspect

    try:
        from torch.onnx._internal.exporter import _constants, _core, _registration
    except ImportError:
        return None
    if "registry" not in inspect.signature(_core.export).parameters or \
            not hasattr(_registration.ONNXRegistry, "from_torchlib"):
        return None
    return int(_constants.TORCHLIB_OPSET)


def torchlib_registry(opset: int) -> Any | None:
    """torch.onnx's table of ATen -> ONNX Script functions for an export at ``opset``, built once per process
    (``None`` when torch has no entry point that takes it). ``torch.onnx.export`` rebuilds it on every call
    (``ONNXRegistry.from_torchlib`` at ``max(opset, torchlib's opset)``: about 0.7 CPU s, a quarter of translating
    a 2-layer BERT); the translation only reads it (``get_decomps`` to dispatch a node, ``functions`` for the
    decomposition table)."""
    lib = _torchlib_opset()
    return None if lib is None else _registry_at(max(opset, lib))


@functools.cache
def _registry_at(opset: int) -> Any:
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


#: node metadata torch.onnx writes that we keep: the module scope (it names the module in error messages)
KEPT_NODE_METADATA = ("namespace",)


def strip_debug_metadata(path: Path) -> None:
    """Drop torch.onnx's per-node debug metadata (stack traces, FX node text, class hierarchy) except the
    innermost module scope: on small models it outweighs the weights (digits-ddpm: 0.8 MB of 3.7 MB in fp32, 1.3 MB
    of 2.3 MB with int8 weights)."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        # the scope is "outer: Type/.../inner.name: Type"; the innermost module is what errors name
        keep = [(p.key, p.value.split("/")[-1]) for p in node.metadata_props if p.key in KEPT_NODE_METADATA]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


_OPTIMUM_TASKS = {"classifier": "text-classification", "encoder": "feature-extraction",
                  "causal-lm": "text-generation"}


def export_optimum(handle: ModelHandle, path: Path, opset: int, kv_cache: bool = False) -> None:
    """optimum-onnx's exporter (transformers models only); its inputs keep their transformers names
    (``token_type_ids``, ``position_ids`` included), which the runtime wrapper fills. A causal LM with
    ``kv_cache`` is optimum's ``text-generation-with-past`` graph."""
    if handle.kind not in _OPTIMUM_TASKS or handle.architecture.get("library") != "transformers":
        raise UserError(f"exporter: optimum exports transformers text models, not a {handle.kind} "
                        f"({handle.architecture.get('class')}); use exporter: dynamo")
    from optimum.exporters.onnx import onnx_export_from_model

    out = path.parent / "optimum"
    task = _OPTIMUM_TASKS[handle.kind] + ("-with-past" if kv_cache else "")
    try:
        onnx_export_from_model(handle.module, output=out, task=task, opset=opset,
                               do_validation=False, no_post_process=True)
    except Exception as exc:
        raise export_error(exc, "ONNX (optimum)", handle) from None
    produced = out / "model.onnx"
    if not produced.exists():  # pragma: no cover - optimum's layout
        raise UserError("optimum wrote no model.onnx", str(out))
    import onnx

    onnx.save(onnx.load(str(produced)), str(path))  # pulls any external data back into one file
    shutil.rmtree(out)


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime quantization of float graphs

_STATIC_OPS = ["Conv", "MatMul", "Gemm", "Gather"]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over canonical input tuples."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]], feeds: GraphFeeds) -> None:
        self._feeds = [feeds(b) for b in batches]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


def graph_feeds(path: Path) -> GraphFeeds:
    """How to feed the graph at ``path`` from canonical inputs (its non-initializer inputs and their shapes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    return GraphFeeds([(i.name, [d.dim_value if d.HasField("dim_value") else d.dim_param
                                 for d in i.type.tensor_type.shape.dim])
                       for i in model.graph.input if i.name not in init])


def _preprocess(src: Path, dst: Path) -> Path:
    """ONNX Runtime's recommended pre-quantization pass (shape inference + graph cleanup)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the exporter's recorded intermediate shapes can disagree with ONNX shape inference after graph
    # rewrites (seen on BertForSequenceClassification's head): drop them and let inference recompute
    model = onnx.load(str(src))
    model.graph.ClearField("value_info")
    clean = dst.with_name("clean.onnx")
    onnx.save(model, str(clean))
    try:
        quant_pre_process(str(clean), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception:  # pre-processing is an optimisation; quantize the cleaned export if it fails
        return clean


def ort_quantize_int8(src: Path, tmp: Path, handle: ModelHandle, spec: ExportSpec, calibration: Any,
                      info: dict[str, Any]) -> Path:
    """W8A8 of a float graph by ONNX Runtime: static QDQ with calibration data, or dynamic."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    mode = spec.activations
    if mode == "auto":
        mode = "dynamic" if handle.kind in TEXT_KINDS else "static"
    pre = _preprocess(src, tmp / "pre.onnx")
    out = tmp / "int8.onnx"
    batches = as_list(calibration, handle, spec.calibration_batches) if mode == "static" else []

    # reduce_range (7-bit weights) for the UNets: full-range u8 x s8 products saturate the 16-bit sums of the
    # AVX2 kernels (digits-ddpm: max abs err 2.0 vs 0.7 with it, on its own trajectories); MiniLM's static
    # graph lost accuracy with it (0.698 vs 0.722 fp32 on 500 docs examples), so text keeps 8-bit weights
    def run(model: Path) -> None:
        if mode == "dynamic":
            quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gather", "Gemm"])
            return
        quantize_static(str(model), str(out), _Reader(batches, graph_feeds(model)), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=_STATIC_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=handle.kind not in TEXT_KINDS,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})

    try:
        run(pre)
    except Exception:
        if pre == src:
            raise
        run(src)  # the pre-processed graph can trip ONNX shape inference; the raw export quantizes too
        info["preprocessed"] = False
    if mode == "dynamic":
        info["quantization"] = "onnxruntime dynamic: int8 weights, per-batch uint8 activations"
    else:
        info["quantization"] = (f"onnxruntime static QDQ: per-channel int8 weights, uint8 activations calibrated "
                                f"(MinMax) on {len(batches)} batches")
        info["calibration_batches"] = len(batches)
    info["activations"] = mode
    return out


# ---------------------------------------------------------------------------------------------------
# Weight-only

def weight_only(src: Path, tmp: Path, bits: int, block_size: int, info: dict[str, Any]) -> Path:
    """``MatMulNBits`` (``bits`` = 4 or 8, blockwise symmetric) for constant-weight MatMuls; for 8 bits
    also int8 + ``DequantizeLinear`` weights for Conv / Gemm."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                       op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=cfg)
    quantizer.process()
    model = quantizer.model.model
    n_other = dequantize_linear_weights(model) if bits == 8 else 0
    out = tmp / f"int{bits}w.onnx"
    onnx.save(model, str(out))
    info["quantization"] = (f"weight-only int{bits}: MatMulNBits (block {block_size}, symmetric)"
                            + (f"; {n_other} Conv/Gemm weights int8 per-channel + DequantizeLinear" if bits == 8 else
                               "; Conv/Gemm weights stay float (ONNX Runtime has no int4 Conv)"))
    return out


def dequantize_linear_weights(model: Any) -> int:
    """Replace the float weight initializer of every Conv / Gemm(transB=1) by an int8 tensor with
    per-output-channel symmetric scales and a ``DequantizeLinear`` (axis 0). Returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes, count = [], 0
    for node in graph.node:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        w_name = node.input[1] if len(node.input) > 1 else ""
        ok = (node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b == 1)) and w_name in inits \
            and users.get(w_name) == 1
        if ok:
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            if w.ndim >= 2 and w.size >= 64:
                flat = w.reshape(w.shape[0], -1)
                scale = np.maximum(np.abs(flat).max(axis=1) / 127.0, 1e-12).astype(np.float32)
                q = np.clip(np.round(flat / scale[:, None]), -127, 127).astype(np.int8).reshape(w.shape)
                graph.initializer.remove(inits[w_name])
                graph.initializer.extend([numpy_helper.from_array(q, w_name + "_q"),
                                          numpy_helper.from_array(scale, w_name + "_scale"),
                                          numpy_helper.from_array(np.zeros_like(q, shape=scale.shape), w_name + "_zp")])
                new_nodes.append(helper.make_node("DequantizeLinear", [w_name + "_q", w_name + "_scale", w_name + "_zp"],
                                                  [w_name], name=w_name + "_dequantize", axis=0))
                count += 1
        new_nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    onnx.checker.check_model(model)
    return count


# ---------------------------------------------------------------------------------------------------
# Checks

def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each operator type the graph has (QDQ / integer ops show up here)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def node_module(path: Path, node_name: str) -> str | None:
    """The torch module a node came from (torch.onnx records it as the node's ``namespace`` metadata)."""
    import onnx

    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.name == node_name:
            meta = {p.key: p.value for p in node.metadata_props}
            scope = meta.get("namespace") or meta.get("pkg.torch.onnx.name_scopes")
            if scope:
                return scope.split("/")[-1].strip()
            return f"node {node_name} ({node.op_type})"
    return None


def check_runtime(path: Path, handle: ModelHandle) -> None:
    """Open ``path`` in ONNX Runtime; an operator it lacks becomes a :class:`UserError` naming the module."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc)
        m = re.search(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'", text)
        if m:
            where = node_module(path, m.group(3)) or m.group(3)
            raise UserError(f"ONNX Runtime has no kernel for operator {m.group(1)} (opset {m.group(2)}) "
                            "used by this module", where) from None
        first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime cannot load the exported graph: {first}",
                        handle.architecture.get("class")) from None
