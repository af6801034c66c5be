"""The ONNX translation of a ready ``torch.export`` program with torch.onnx's torchlib registry built once per
process (:func:`modelpress.exporters.onnx.torchlib_registry`) against ``torch.onnx.export``, which rebuilds it
on every call.

Both translate the same exported program of the same module, alternated in one process (CPU seconds of this
process, ``time.process_time``, one thread: load-independent up to cache effects), and the files are compared
byte for byte. The models are the matrix's tiny ones (``tests/test_matrix.py``): a 2-layer BERT encoder and the
1x16x16 UNet, plus the zoo's digits-ddpm when it is cached.

    python benchmarks/onnx_translate.py --repeats 3 --out benchmarks/results/onnx_translate.md
"""
from __future__ import annotations

import argparse
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
from modelpress.exporters.common import INPUT_NAMES, OUTPUT_NAMES, export_program, trace_inputs, traceable
from modelpress.model import ModelHandle, describe_architecture


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zoo", nargs="*", default=["digits-ddpm"], help="zoo models to add (skipped if not cached)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_translate.md")
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
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="onnx-translate-"))
    for name, handle in handles.items():
        wrapper, inputs = traceable(handle), trace_inputs(handle)
        with torch.no_grad():
            program, _ = export_program(wrapper, inputs, handle, True)
            times: dict[str, list[float]] = {"public": [], "cached": []}
            same = True
            for i in range(args.repeats):
                for label, fn in (("public", translate_public), ("cached", translate_cached)):
                    path = tmp / f"{name.replace(' ', '-')}-{label}-{i}.onnx"
                    t0 = time.process_time()
                    fn(program, inputs, handle, path, 18)
                    times[label].append(time.process_time() - t0)
                a = (tmp / f"{name.replace(' ', '-')}-public-{i}.onnx").read_bytes()
                same &= a == (tmp / f"{name.replace(' ', '-')}-cached-{i}.onnx").read_bytes()
        rows.append({"model": name, "kind": handle.kind, "identical_bytes": same,
                     **{f"{k}_s": [round(x, 2) for x in v] for k, v in times.items()}})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["# ONNX translation with the torchlib registry built once per process", "",
             f"`python benchmarks/onnx_translate.py --repeats {args.repeats}`: CPU seconds of one process "
             "(`time.process_time`, 1 thread) to translate one ready `torch.export` program to ONNX (optimizer on, "
             "file written), `torch.onnx.export` (rebuilds the registry per call) and the cached registry "
             f"alternated; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. The first "
             "repeat of the first model carries one-time costs for both (imports, the first registry build).", "",
             "| model | torch.onnx.export: min / median s | cached registry: min / median s | saved (medians) "
             "| same bytes |", "|---|---:|---:|---:|---|"]
    for r in rows:
        b, a = r["public_s"], r["cached_s"]
        lines.append(f"| {r['model']} | {min(b):.2f} / {statistics.median(b):.2f} | {min(a):.2f} / "
                     f"{statistics.median(a):.2f} | {statistics.median(b) - statistics.median(a):.2f} s "
                     f"({1 - statistics.median(a) / statistics.median(b):.0%}) | {r['identical_bytes']} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
