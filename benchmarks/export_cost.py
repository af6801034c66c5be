"""What an export costs, before and after two changes, each A/B alternated in one process (CPU seconds of this
process, ``time.process_time``, one thread: load-independent up to cache effects):

1. **registry**: the ONNX translation of a ready ``torch.export`` program with torch.onnx's torchlib registry built
   once per process (:func:`modelpress.exporters.onnx.torchlib_registry`) against ``torch.onnx.export``, which
   rebuilds it on every call. Same exported program; the files are compared byte for byte.
2. **shared**: one run's ``export: [onnx, ort, {format: onnx, quantize: int8}]``, each format exported on its own
   (three torch.export traces and translations) against inside
   :func:`~modelpress.exporters.common.shared_exports` (one). The ONNX files are compared byte for byte, the
   .ort files by their outputs (two conversions of one graph differ in bytes).

The models are the matrix's tiny ones (``tests/test_matrix.py``): a 2-layer BERT encoder and the 1x16x16 UNet,
plus the zoo's digits-ddpm when it is cached.

    python benchmarks/export_cost.py --repeats 3 --out benchmarks/results/export_cost.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import modelpress.exporters.onnx as onnx_exporter
from modelpress.exporters import ExportSpec, export_model, load_exported
from modelpress.exporters.common import (INPUT_NAMES, OUTPUT_NAMES, export_program, shared_exports, trace_inputs,
                                         traceable)
from modelpress.model import ModelHandle, describe_architecture, example_inputs


def tiny_models() -> dict[str, ModelHandle]:
    """The matrix's tiny BERT encoder and UNet (same configurations as tests/test_matrix.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_matrix import _bert, _unet

    torch.manual_seed(0)
    out = {}
    for kind, module in (("encoder", _bert("encoder")), ("unet", _unet("unet"))):
        out[f"matrix {kind}"] = ModelHandle(module, kind, kind, describe_architecture(module))
    return out


def translate_public(program: Any, inputs: tuple, handle: ModelHandle, path: Path, opset: int) -> None:
    """:func:`~modelpress.exporters.onnx.translate` with no cached registry: ``torch.onnx.export`` as is."""
    saved = onnx_exporter.torchlib_registry
    onnx_exporter.torchlib_registry = lambda opset: None
    try:
        onnx_exporter.translate(program, inputs, list(INPUT_NAMES[handle.kind]), [OUTPUT_NAMES[handle.kind]], path,
                                opset)
    finally:
        onnx_exporter.torchlib_registry = saved


def translate_cached(program: Any, inputs: tuple, handle: ModelHandle, path: Path, opset: int) -> None:
    onnx_exporter.translate(program, inputs, list(INPUT_NAMES[handle.kind]), [OUTPUT_NAMES[handle.kind]], path, opset)


def registry_rows(handles: dict[str, ModelHandle], repeats: int, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name, handle in handles.items():
        stem = name.replace(" ", "-")
        wrapper, inputs = traceable(handle), trace_inputs(handle)
        with torch.no_grad():
            program, _ = export_program(wrapper, inputs, handle, True)
            times: dict[str, list[float]] = {"before": [], "after": []}
            same = True
            for i in range(repeats):
                for label, fn in (("before", translate_public), ("after", translate_cached)):
                    t0 = time.process_time()
                    fn(program, inputs, handle, tmp / f"{stem}-{label}-{i}.onnx", 18)
                    times[label].append(time.process_time() - t0)
                same &= (tmp / f"{stem}-before-{i}.onnx").read_bytes() == (tmp / f"{stem}-after-{i}.onnx").read_bytes()
        rows.append({"model": name, "identical": same, **{f"{k}_s": [round(x, 2) for x in v] for k, v in times.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


#: one run's formats (the matrix's slow tier exports these three for every (kind, pass))
FORMATS = [{"format": "onnx"}, {"format": "ort"}, {"format": "onnx", "quantize": "int8", "calibration_batches": 1}]


def shared_rows(handles: dict[str, ModelHandle], repeats: int, tmp: Path) -> list[dict[str, Any]]:
    from modelpress.data import random_dataset

    rows = []
    for name, handle in handles.items():
        stem = name.replace(" ", "-")
        times: dict[str, list[float]] = {"before": [], "after": []}
        same = True
        data = random_dataset()
        for i in range(repeats):
            paths = {}
            for label in ("before", "after"):
                out = tmp / f"{stem}-{label}-{i}"
                t0 = time.process_time()
                with shared_exports() if label == "after" else contextlib.nullcontext():
                    paths[label] = [export_model(handle, ExportSpec(**f), out, data) for f in FORMATS]
                times[label].append(time.process_time() - t0)
            (onnx_b, ort_b, int8_b), (onnx_a, ort_a, int8_a) = paths["before"], paths["after"]
            probe = example_inputs(handle, batch=3, seed=3)
            same &= (onnx_b.read_bytes() == onnx_a.read_bytes() and int8_b.read_bytes() == int8_a.read_bytes()
                     and torch.equal(load_exported(ort_b, handle)(*probe), load_exported(ort_a, handle)(*probe)))
        rows.append({"model": name, "identical": same, **{f"{k}_s": [round(x, 2) for x in v] for k, v in times.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]], before: str, after: str, same: str) -> list[str]:
    lines = [f"| model | {before}: min / median s | {after}: min / median s | saved (medians) | {same} |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        b, a = r["before_s"], r["after_s"]
        lines.append(f"| {r['model']} | {min(b):.2f} / {statistics.median(b):.2f} | {min(a):.2f} / "
                     f"{statistics.median(a):.2f} | {statistics.median(b) - statistics.median(a):.2f} s "
                     f"({1 - statistics.median(a) / statistics.median(b):.0%}) | {r['identical']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zoo", nargs="*", default=["digits-ddpm"], help="zoo models to add (skipped if not cached)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_cost.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    assert onnx_exporter.torchlib_registry(18) is not None, "no cached-registry entry point on this torch"
    handles = tiny_models()
    for name in args.zoo:
        from modelpress.sources import load_model

        try:
            handles[name] = load_model(name)
        except Exception as exc:  # not in the local cache: the run is offline
            print(f"skipping {name}: {exc}")
    tmp = Path(tempfile.mkdtemp(prefix="export-cost-"))
    load = [os.getloadavg()[0]]
    registry = registry_rows(handles, args.repeats, tmp)
    shared = shared_rows(handles, args.repeats, tmp)
    load.append(os.getloadavg()[0])
    lines = ["# What an export costs: the torchlib registry once per process, one run's formats sharing one graph", "",
             f"`python benchmarks/export_cost.py --repeats {args.repeats}`: CPU seconds of one process "
             "(`time.process_time`, 1 thread), before and after alternated on the same model; load average "
             f"{load[0]:.1f} at the start, {load[1]:.1f} at the end on {os.cpu_count()} cores. The first repeat of "
             "the first model carries one-time costs for both (imports, the first registry build).", "",
             "## 1. Translating one ready torch.export program to ONNX (optimizer on, file written)", "",
             *table(registry, "torch.onnx.export", "registry built once", "same bytes"), "",
             "## 2. One run's `export: [onnx, ort, onnx int8]` (registry built once in both)", "",
             *table(shared, "each format on its own", "shared_exports", "same ONNX bytes, same .ort outputs")]
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"registry": registry, "shared": shared}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
