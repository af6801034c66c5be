"""Exported models in their own runtimes, side by side with the torch model they came from.

For each zoo model and each export (ONNX fp32 / int8 / weight-only, ORT mobile, ExecuTorch .pte fp32 /
int8), in one process and at one thread count:

* file size, and its ratio to the fp32 ONNX file;
* max abs error against the torch model on ``modelpress.model.example_inputs`` (batch 2);
* latency of one forward on a fixed batch (text: 8 x 64 tokens; UNets: 8 samples), timed in interleaved
  rounds (every runtime once per round, so load on the machine hits all alike): min and median;
* the model's metrics run on the export itself: test accuracy (minilm-docs), Fréchet distance (UNets).

    python benchmarks/export.py                       # minilm-docs, digits-ddpm, digits-t2i
    python benchmarks/export.py --models minilm-docs --repeats 30 --threads 1

Writes ``benchmarks/results/export.md`` (and ``.json``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modelpress import zoo
from modelpress.metrics import EvalContext, evaluate
from modelpress.exporters import ExportSpec, export_model, exported_info, load_exported
from modelpress.model import ModelHandle, example_inputs, state_bytes

RESULTS = Path(__file__).resolve().parent / "results"

SPECS: dict[str, list[dict[str, Any]]] = {
    "text": [{"format": "onnx"}, {"format": "onnx", "quantize": "int8"},
             {"format": "onnx", "quantize": "int8", "activations": "static"},
             {"format": "onnx", "quantize": "int4-weight"},
             {"format": "ort"}, {"format": "ort", "quantize": "int8"},
             {"format": "pte"}, {"format": "pte", "quantize": "int8", "activations": "dynamic"}],
    "unet": [{"format": "onnx"}, {"format": "onnx", "quantize": "int8"}, {"format": "onnx", "quantize": "int8-weight"},
             {"format": "ort"}, {"format": "ort", "quantize": "int8"},
             {"format": "pte"}, {"format": "pte", "quantize": "int8"}],
}


def timing_batch(handle: ModelHandle) -> tuple[torch.Tensor, ...]:
    if handle.kind in ("encoder", "classifier"):
        return example_inputs(handle, batch=8, seq_len=64, seed=7)
    return example_inputs(handle, batch=8, seed=7)


def interleaved_latency(models: dict[str, Any], inputs: tuple[torch.Tensor, ...], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every model, one call each per round, ``repeats`` rounds after one warm-up."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(*inputs)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(*inputs)
                times[k].append(time.perf_counter() - t0)
    return times


def metric_names(handle: ModelHandle) -> list[str]:
    return ["accuracy"] if handle.kind == "classifier" else ["fd"] if handle.kind in ("unet", "unet-cond") else []


def ptq_w8a8(handle: ModelHandle, pass_name: str) -> ModelHandle:
    """The UNet quantized by a diffusion PTQ pass at W8A8 (its calibrated scales export as QDQ)."""
    from modelpress.passes import CalibrationSpec, Context, get_pass

    P = get_pass(pass_name)
    ctx = Context(seed=0, calibration=CalibrationSpec(samples=256, batch_size=64), show_progress=False)
    return P(P.Config(w_bits=8, a_bits=8)).apply(handle.copy(), ctx)  # passes change their input


def run_model(name: str, repeats: int, threads: int, samples: int | None, out_dir: Path,
              formats: set[str], ptq_pass: str | None) -> list[dict[str, Any]]:
    handle = zoo.load(name)
    unet = handle.kind in ("unet", "unet-cond")
    specs = [(handle, "", s) for s in SPECS["unet" if unet else "text"] if s["format"] in formats]
    sources = {"": handle}
    if unet and ptq_pass:
        # the PTQ pass's own scales: exported as QDQ whatever `quantize` says, so one plain spec per format
        sources[f"{ptq_pass}-w8a8"] = ptq_w8a8(handle, ptq_pass)
        specs += [(sources[f"{ptq_pass}-w8a8"], f"{ptq_pass}-w8a8", {"format": f})
                  for f in ("onnx", "ort") if f in formats]  # pte refuses PTQ models (modelpress/exporters/pte.py)
    probe = example_inputs(handle)
    refs, rows = {}, []
    runtimes: dict[str, Any] = {}
    for tag, src in sources.items():
        key = "torch" + (f"/{tag}" if tag else "")
        runtimes[key] = src.canonical().eval()
        with torch.no_grad():
            refs[tag] = runtimes[key](*probe)
        rows.append({"model": name, "export": key, "file": "-", "size_bytes": state_bytes(src.module),
                     "max_abs_err": 0.0, "quantization": tag or "none"})
    for src, tag, raw in specs:
        spec = ExportSpec(**raw)
        t0 = time.perf_counter()
        path = export_model(src, spec, out_dir / name / (tag or "fp"))
        seconds = time.perf_counter() - t0
        rt = load_exported(path, src, threads=threads)
        with torch.no_grad():  # against the torch model it was exported from (fp32, or the fake-quant PTQ model)
            err = float((rt(*probe) - refs[tag]).abs().max())
        key = (f"{spec.format}/{tag}" if tag else f"{spec.format}/{spec.quantize}"
               + (f"/{spec.activations}" if spec.activations != "auto" else ""))
        runtimes[key] = rt
        info = exported_info(path)
        rows.append({"model": name, "export": key, "file": path.name, "size_bytes": path.stat().st_size,
                     "max_abs_err": err, "export_seconds": round(seconds, 1),
                     "quantization": info.get("quantization", "none"),
                     "xnnpack_subgraphs": info.get("xnnpack_subgraphs")})
        print(f"{name} {key}: {path.stat().st_size:,} bytes, max abs err {err:.3g}, {seconds:.0f}s", flush=True)
    times = interleaved_latency(runtimes, timing_batch(handle), repeats)
    for row in rows:
        t = times[row["export"]]
        row["latency_min_ms"], row["latency_median_ms"] = 1000 * min(t), 1000 * statistics.median(t)
    names = metric_names(handle)
    if names:
        ctx = EvalContext(seed=0, samples=samples, reference=handle, show_progress=False)
        for row in rows:
            res = evaluate(runtimes[row["export"]], handle, names, ctx)
            row.update({k: v.value for k, v in res.items()})
            print(f"{name} {row['export']}: {', '.join(f'{k} {v.value:.4f}' for k, v in res.items())}", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], threads: int, repeats: int) -> str:
    lines = [f"Threads: {threads} (torch and the runtimes alike); latency: {repeats} interleaved rounds, "
             "text batch 8 x 64 tokens, UNet batch 8. Max abs err: against the torch model the file was exported from "
             "(fp32, or the PTQ pass's fake-quant model for `*/ptq-w8a8` rows) on a batch of 2.", ""]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        metric = next((k for k in ("accuracy", "fd") if k in rs[0]), None)
        fp32 = {r["export"].split("/")[0]: r for r in rs if r["export"].endswith("/none")}
        lines += [f"### {model}", "",
                  "| export | size (bytes) | vs fp32 file | max abs err | latency min / median (ms) | "
                  "speed-up vs fp32 same format (min / median) |" + (f" {metric} |" if metric else ""),
                  "|---|---|---|---|---|---|" + ("---|" if metric else "")]
        for r in rs:
            base = fp32.get(r["export"].split("/")[0])
            size_ratio = f"{r['size_bytes'] / base['size_bytes']:.2f}" if base else "-"
            speed = (f"{base['latency_min_ms'] / r['latency_min_ms']:.2f}x / "
                     f"{base['latency_median_ms'] / r['latency_median_ms']:.2f}x") if base else "-"
            line = (f"| `{r['export']}` | {r['size_bytes']:,} | {size_ratio} | {r['max_abs_err']:.2e} | "
                    f"{r['latency_min_ms']:.1f} / {r['latency_median_ms']:.1f} | {speed} |")
            if metric:
                line += f" {r.get(metric, float('nan')):.4f} |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm-docs,digits-ddpm,digits-t2i")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=None, help="metric samples (default: each metric's own)")
    ap.add_argument("--formats", default="onnx,ort,pte")
    ap.add_argument("--tag", default="export")
    ap.add_argument("--ptq-pass", default="ptq", help="UNets: also export this PTQ pass's W8A8 model ('' = none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += run_model(name, args.repeats, args.threads, args.samples, Path(tmp), set(args.formats.split(",")),
                              args.ptq_pass or None)
            md = markdown(rows, args.threads, args.repeats)
            (RESULTS / f"{args.tag}.md").write_text(md)
            (RESULTS / f"{args.tag}.json").write_text(json.dumps(rows, indent=2))
    print(md)


if __name__ == "__main__":
    main()
