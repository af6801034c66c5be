"""ExecuTorch: a ``.pte`` program lowered to the XNNPACK delegate, 8-bit through its PT2E quantizer.

``torch.export`` traces the canonical module; ``quantize: int8`` first runs PyTorch 2 Export quantization
with ExecuTorch's ``XNNPACKQuantizer`` (symmetric per-channel int8 weights; activations int8 with
calibrated static ranges, or computed per batch with ``activations: dynamic``); a model that carries its
own calibrated quantizers (the PTQ passes) is refused with a clear error: XNNPACK's quantized convolution /
linear assume what its own quantizer produces, symmetric per-channel weights (weight zero points are ignored)
and a quantize node on every output; a PTQ graph has asymmetric weights and outputs that feed GroupNorm and
residual adds unquantized, and lowering it gave wrong outputs (max abs error 5 on digits-ddpm). Keeping int8
weights behind a run-time dequantize kept the convolutions out of XNNPACK (the portable convolution then
crashed), and float weights with Q/DQ activations made a file larger than the fp32 one. Such models export
exactly to ONNX / ORT (QDQ), and the float model goes to ``.pte`` with ``quantize: int8``.
``to_edge_transform_and_lower`` hands every subgraph XNNPACK supports to it; the rest runs on ExecuTorch's
portable kernels. The sidecar JSON records how many
operators were delegated and which were not.

A causal LM with ``kv_cache: true`` becomes a static-cache program (:func:`~modelpress.exporters.kv.static_cache_program`):
``(input_ids, cache_position) -> logits`` for one sequence, the cache kept in the program's mutable buffers
between calls, so :meth:`~modelpress.exporters.runtime.ExecuTorchModule.generate` runs one token per call.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..model import ModelHandle
from . import ExportSpec, register_exporter
from .common import (INPUT_NAMES, TEXT_KINDS, as_list, atomic_path, export_error, export_program, trace_inputs, traceable,
                     write_info)
from .kv import static_cache_program
from ..quant.layers import PTE_REFUSAL
from .qdq import has_calibrated_quant


#: upper bounds of the dynamic dims of a .pte: ExecuTorch plans activation memory for the largest shape
#: (MiniLM at 4096 x 512 does not fit); larger batches are fed in chunks by the runtime wrapper
PTE_CAPS = {"batch": 64, "seq": 128}

#: Linear / Conv2d weights with fewer elements stay in float: below this the per-channel scales and the
#: extra quantize / dequantize operators cost more bytes than int8 saves (a BERT with hidden size 16 came out
#: 5 % larger than fp32 with every layer quantized)
MIN_QUANT_ELEMENTS = 4096


#: modules kept in float whatever their size: the sinusoidal timestep embedding multiplies t (up to ~1000) by
#: frequencies before sin / cos, and int8 on that product destroys the embedding (digits-ddpm sampled noise,
#: FD 139 instead of 13.5)
FLOAT_MODULE_TYPES = ("Timesteps", "TimestepTap")


def small_layers(module: nn.Module, min_elements: int = MIN_QUANT_ELEMENTS) -> list[str]:
    """Qualified names of the Linear / Conv2d layers of ``module`` too small to be worth quantizing."""
    return [name for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() < min_elements]


def float_modules(module: nn.Module) -> list[str]:
    """Qualified names of the modules the int8 quantizer must leave in float (:data:`FLOAT_MODULE_TYPES`)."""
    return [name for name, m in module.named_modules() if type(m).__name__ in FLOAT_MODULE_TYPES]


def pt2e_quantize(wrapper: nn.Module, inputs: tuple[torch.Tensor, ...], batches: list[tuple[torch.Tensor, ...]],
                  dynamic: bool, handle: ModelHandle, dynamic_dims: bool, keep_float: list[str]) -> nn.Module:
    """XNNPACK PT2E int8: annotate (all but the modules named in ``keep_float``), calibrate on ``batches``
    (static activations), convert."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import get_module_name_filter

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                is_dynamic=dynamic))
    skip = [get_module_name_filter(name) for name in keep_float]
    quantizer.set_filter_function(lambda node: not any(f(node) for f in skip))
    graph = export_program(wrapper, inputs, handle, dynamic_dims, PTE_CAPS)[0].module()
    prepared = prepare_pt2e(graph, quantizer)
    for batch in ([inputs] if dynamic else batches):
        prepared(*batch)
    return convert_pt2e(prepared)


def delegation_summary(edge_program: Any) -> dict[str, Any]:
    """Delegated subgraphs and the operators left to portable kernels."""
    graph = edge_program.graph_module.graph
    delegated, portable = 0, {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "executorch_call_delegate" in name:
            delegated += 1
        elif "getitem" not in name:
            portable[name] = portable.get(name, 0) + 1
    return {"xnnpack_subgraphs": delegated, "portable_ops": dict(sorted(portable.items()))}


@register_exporter("pte")
def export_pte(handle: ModelHandle, spec: ExportSpec, out_dir: Path, calibration: Any = None) -> Path:
    """Write ``<stem>.pte`` (and its ``.json`` sidecar) into ``out_dir``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    # out-variants of the quantized_decomposed Q / DQ operators, for any the XNNPACK partitioner leaves out
    import executorch.kernels.quantized  # noqa: F401

    t0 = time.perf_counter()
    final = out_dir / f"{spec.file_stem()}.pte"
    # XNNPACK's convolution subgraphs of the diffusers UNets do not resize with the batch at run time
    # ("Error resizing tensor at input 0"), so UNets get a fixed batch of 8 that the wrapper chunks into
    dynamic = spec.dynamic and handle.kind in TEXT_KINDS
    inputs = trace_inputs(handle, batch=2 if dynamic else 8)
    info: dict[str, Any] = {"format": "pte", "kind": handle.kind, "spec": spec.model_dump(), "dynamic": dynamic,
                            "input_names": list(INPUT_NAMES[handle.kind]),
                            "input_shapes": [list(x.shape) for x in inputs]}
    if has_calibrated_quant(handle.module):
        raise UserError(f"cannot export to ExecuTorch: {PTE_REFUSAL}", handle.architecture.get("class"))
    wrapper = traceable(handle)
    program = None
    try:
        if spec.uses_kv_cache(handle.kind):
            program, length = static_cache_program(handle, handle.module)
            info.update(kv_cache=True, max_cache_len=length, input_names=["input_ids", "cache_position"],
                        input_shapes=[[1, length], [length]], dynamic_bounds={"batch": [1, 1], "seq": [1, length]})
        elif spec.quantize == "int8":
            mode = "dynamic" if spec.activations == "dynamic" else "static"
            batches = as_list(calibration, handle, spec.calibration_batches) if mode == "static" else []
            skipped = small_layers(wrapper) + float_modules(wrapper)
            wrapper = pt2e_quantize(wrapper, inputs, batches, mode == "dynamic", handle, dynamic, skipped)
            info["quantization"] = (f"XNNPACK PT2E int8: per-channel symmetric weights, {mode} activations"
                                    + (f" calibrated on {len(batches)} batches" if batches else ""))
            info["float_layers"] = {"reason": f"weights under {MIN_QUANT_ELEMENTS} elements, or timestep embedding",
                                    "names": [re.sub(r"^(inner\.)+", "", n) for n in skipped]}
        if program is None:
            program, info["dynamic_bounds"] = export_program(wrapper, inputs, handle, dynamic, PTE_CAPS)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        info.update(delegation_summary(edge.exported_program()))
        et_program = edge.to_executorch()
    except UserError:
        raise
    except Exception as exc:
        raise export_error(exc, "ExecuTorch", handle, program) from None
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            et_program.write_to_file(f)
    info["size_bytes"] = final.stat().st_size
    info["export_seconds"] = round(time.perf_counter() - t0, 2)
    write_info(final, info)
    return final
