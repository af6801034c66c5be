"""ONNX Runtime mobile: the ``.ort`` (flatbuffer) format, converted from the ONNX export.

The ONNX graph (float, QDQ or weight-only, as the spec says) is built by :mod:`modelpress.exporters.onnx`,
then ``onnxruntime.tools.convert_onnx_models_to_ort`` optimizes it once ("fixed" optimization style:
the graph optimizations are baked in, so a minimal runtime needs no optimizer) and serializes it. The
converter's operator list is kept beside the file as ``<stem>.required_operators.config``: it is what a
reduced-size mobile build of ONNX Runtime is built from. The ``.ort`` file is run by the regular
onnxruntime package (:class:`~modelpress.exporters.runtime.OnnxRuntimeModule`).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..model import ModelHandle
from . import ExportSpec, register_exporter
from .common import scratch_dir, write_info
from .onnx import build_onnx, check_runtime


def convert_to_ort(onnx_path: Path, out_dir: Path) -> tuple[Path, Path | None]:
    """Convert ``onnx_path`` to ``.ort`` in ``out_dir``; returns the ``.ort`` file and its operator config."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir.mkdir(parents=True, exist_ok=True)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            convert_onnx_models_to_ort(onnx_path, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"cannot convert to the ONNX Runtime mobile format: {first}", str(onnx_path)) from None
    produced = sorted(out_dir.glob("*.ort"))
    if not produced:
        raise UserError("the ONNX Runtime converter wrote no .ort file", str(onnx_path))
    configs = sorted(out_dir.glob("*.config"))
    return produced[0], (configs[0] if configs else None)


@register_exporter("ort")
def export_ort(handle: ModelHandle, spec: ExportSpec, out_dir: Path, calibration: Any = None) -> Path:
    """Write ``<stem>.ort`` (+ ``.required_operators.config`` and a ``.json`` sidecar) into ``out_dir``."""
    final = out_dir / f"{spec.file_stem()}.ort"
    with scratch_dir(out_dir) as tmp:
        onnx_path, info = build_onnx(handle, spec, tmp, calibration)
        check_runtime(onnx_path, handle)
        info["onnx_size_bytes"] = onnx_path.stat().st_size
        model_path = tmp / "model.onnx"
        os.replace(onnx_path, model_path)
        ort_path, ops_config = convert_to_ort(model_path, tmp / "ort")
        check_runtime(ort_path, handle)
        if ops_config is not None:
            os.replace(ops_config, out_dir / f"{spec.file_stem()}.required_operators.config")
        os.replace(ort_path, final)
    info.update(format="ort", size_bytes=final.stat().st_size, optimization_style="fixed")
    write_info(final, info)
    return final
