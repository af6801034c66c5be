"""The report: metrics of the compressed model next to the reference's, sizes, exports, and pictures.

``report.json``::

    {"metrics": {NAME: {"reference": x, "compressed": y, "higher_is_better": b, "details": {...}}},
     "size_bytes": {"reference": a, "compressed": b, "by_codec": {...}},
     "exports": {FORMAT: {"path": ..., "size_bytes": ..., "max_abs_err": ..., "metrics": {...}}}}

plus ``report.md`` and PNGs: ``metrics.png`` (a bar chart per metric: reference, compressed, exports),
``size.png``, and for diffusion models ``samples_<metric>.png`` (reference vs compressed from the same seeds).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from .. import console
from ..artifact import MANIFEST, WEIGHTS, tensors_sha256
from ..devices import on_device
from ..model import ModelHandle, cast_weights, example_inputs, state_bytes
from ..sources import load_dataset
from . import EvalContext, MetricResult, evaluate, get_metric


def _size_section(staging: Path, manifest: dict[str, Any], reference: ModelHandle) -> dict[str, Any]:
    """Sizes against the model as the user gave it: its checkpoint's bytes on disk (in its own dtype)
    when it came from files, else its tensors' bytes in memory."""
    by_codec: dict[str, int] = {}
    for info in manifest["tensors"].values():
        by_codec[info["codec"]] = by_codec.get(info["codec"], 0) + int(info["bytes"])
    ckpt = reference.extras.get("checkpoint")
    if ckpt:
        ref, label = int(ckpt["bytes"]), f"input checkpoint ({ckpt['dtype']}, on disk)"
    else:
        ref, label = state_bytes(reference.module), "input model (in memory)"
    out = {"reference": ref, "reference_label": label, "reference_in_memory": state_bytes(reference.module),
           "compressed": (staging / WEIGHTS).stat().st_size, "by_codec": by_codec}
    if manifest["from_base"]:
        out["note"] = "compressed excludes the base model's tensors, which are loaded from the base"
    return out


def _run_metrics(model: torch.nn.Module, handle: ModelHandle, reference: ModelHandle, specs: list[Any],
                 seed: int, show_progress: bool, datasets: dict[str, Any]) -> dict[str, MetricResult]:
    """``specs`` on ``model``; ``datasets``: the opened datasets the specs name (by name)."""
    out = {}
    for spec in specs:
        if spec.metric == "size":
            continue
        ctx = EvalContext(seed=seed, samples=spec.samples, options=dict(spec.options), reference=reference,
                          show_progress=show_progress, dataset=datasets.get(spec.dataset))
        out.update(evaluate(model, handle, [spec.metric], ctx))
    return out


def _max_abs_err(a: torch.nn.Module, b: torch.nn.Module, handle: ModelHandle) -> float:
    """Largest output difference of ``a`` and ``b`` on the same example inputs (canonical calls feed each
    model in its own dtype)."""
    inputs = example_inputs(handle, batch=2)
    with torch.no_grad():
        return float((a(*inputs).float() - b(*inputs).float()).abs().max())


def _cast_step(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The log of the pass that cast the model's floats before coding them losslessly (dfloat11's
    ``cast_from``): the report then shows the cast and the coding as two steps."""
    for entry in manifest.get("passes", {}).values():
        if entry.get("cast_from") and entry.get("dtype"):
            return entry
    return None


def decodes_to(model: torch.nn.Module, other: torch.nn.Module) -> int:
    """How many tensors ``model``, its compressed modules decoded (:func:`~modelpress.modules.materialize`),
    shares bit for bit with ``other`` (same names, dtypes, shapes and bytes: :func:`~modelpress.artifact.
    tensors_sha256`): all of ``other``'s tensors when they decode to the same state, else 0."""
    from ..modules import materialize

    state = other.state_dict()
    return len(state) if tensors_sha256(materialize(model).state_dict()) == tensors_sha256(state) else 0


def _export_notes(manifest: dict[str, Any]) -> list[str]:
    from ..passes import get_pass

    return [f"{name}: {get_pass(name).export_note}" for name in manifest.get("passes", {})
            if get_pass(name).export_note]


def build_report(staging: Path, loaded: Any, model: ModelHandle, reference: ModelHandle, *, exports: list[Any],
                 metrics: list[Any], show_progress: bool = True, keep_exports: bool = False,
                 log_name: str | None = None, base: ModelHandle | None = None,
                 device: torch.device | None = None,
                 results: tuple[dict[str, MetricResult], dict[str, MetricResult]] | None = None) -> dict[str, Any]:
    """Export, evaluate and write report.json / report.md / PNGs into ``staging`` (``log_name``: the file
    beside it that holds other libraries' console output, linked from the report). ``device``: where the torch
    models run during the metrics (:func:`modelpress.devices.on_device`; exports run on the CPU).
    ``results``: the reference's and the compressed model's metrics, already computed without the models in
    memory (:mod:`modelpress.stream_eval`; ``model`` and ``reference`` are then their structures on the meta
    device, and the sections that need the weights, the cast step's and the delta's sizes, are left out)."""
    seed = loaded.recipe.seed
    # opened once: the recipe's own (read when it was loaded), else now; every metric run below shares them
    named = {s.dataset for s in metrics if getattr(s, "dataset", None)} | {loaded.recipe.calibration.dataset}
    named.discard(None)
    datasets = {n: loaded.datasets.get(n) or load_dataset(n) for n in named}
    manifest = json.loads((staging / MANIFEST).read_text())
    report: dict[str, Any] = {"metrics": {}, "size_bytes": _size_section(staging, manifest, reference), "exports": {}}
    if keep_exports and (staging / "report.json").exists():
        report["exports"] = json.loads((staging / "report.json").read_text()).get("exports", {})

    steps = console.progress(total=2 * len(metrics) + len(exports), desc="evaluate",
                             disable=not show_progress or not (metrics or exports))
    if results is not None:
        ref_results, cmp_results = results
        report["evaluation"] = "streamed"
        steps.update(2 * len(metrics))
    else:
        with on_device(device if metrics else None, reference.module, model.module):
            ref_results = _run_metrics(reference.canonical(), reference, reference, metrics, seed, show_progress,
                                       datasets)
            steps.update(len(metrics))
            cmp_results = _run_metrics(model.canonical(), model, reference, metrics, seed, show_progress, datasets)
            steps.update(len(metrics))
    for name, res in cmp_results.items():
        report["metrics"][name] = {"reference": ref_results[name].value, "compressed": res.value,
                                   "higher_is_better": res.higher_is_better, "details": res.details,
                                   "reference_details": ref_results[name].details}
    cast = _cast_step(manifest) if results is None else None
    if cast:  # the lossy cast and the lossless coding, measured apart
        cast_model = reference.replace_module(cast_weights(copy.deepcopy(reference.module), getattr(torch, cast["dtype"])))
        # Coded weights that decode bit for bit to the cast's, run by the same dense ops (no fused kernel),
        # give the cast model's outputs: its metrics are the ones just measured (one run, not two; on a CPU
        # without bf16 arithmetic that run is the report's longest).
        identical = 0 if cast.get("fused_rows") else decodes_to(model.module, cast_model.module)
        if identical:
            cast_results = cmp_results
        else:
            with on_device(device if metrics else None, reference.module, cast_model.module):
                cast_results = _run_metrics(cast_model.canonical(), cast_model, reference, metrics, seed,
                                            show_progress, datasets)
        report["cast"] = {"from": "/".join(cast["cast_from"]), "to": cast["dtype"], "bytes": state_bytes(cast_model.module),
                          "metrics": {n: r.value for n, r in cast_results.items()},
                          "decoded_tensors_identical": identical,
                          "coded_max_abs_err_vs_cast": _max_abs_err(model.canonical(), cast_model.canonical(), model)}
    notes = _export_notes(manifest)
    if notes and exports:
        report["export_notes"] = notes
    if base is not None:  # a delta: its size against the fp16 delta, not only against the whole model
        from ..codecs.delta import delta_size_report

        report["delta"] = delta_size_report(model.module, base.module)

    if exports:
        from ..exporters import export_model, exported_info, load_exported
        from ..exporters.common import shared_exports

        export_dir = staging / "exports"
        export_dir.mkdir(exist_ok=True)
        torch_model = model.canonical()
        # the recipe's calibration data, else the model's own (exporters.common.default_calibration)
        calibration = datasets.get(loaded.recipe.calibration.dataset)
        with shared_exports():  # the formats share one export-ready module and one float ONNX graph
            for spec in exports:
                path = export_model(model, spec, export_dir, calibration)
                runtime = load_exported(path, model)
                key = spec.format if spec.format not in report["exports"] else f"{spec.format}-{len(report['exports'])}"
                entry: dict[str, Any] = {"path": str(path.relative_to(staging)), "size_bytes": path.stat().st_size,
                                         "spec": spec.model_dump(mode="json"),
                                         "kv_cache": bool(exported_info(path).get("kv_cache")),
                                         "max_abs_err": _max_abs_err(torch_model, runtime, model)}
                export_results = _run_metrics(runtime, model, reference, metrics, seed, show_progress, datasets)
                entry["metrics"] = {n: r.value for n, r in export_results.items()}
                report["exports"][key] = entry
                for n, r in export_results.items():
                    cmp_results[f"{n}@{key}"] = r
                steps.update(1)
    steps.close()

    (staging / "report.json").write_text(json.dumps(report, indent=1, default=float))
    _plots(staging, report, ref_results, cmp_results)
    (staging / "report.md").write_text(_markdown(loaded, report, staging, manifest, log_name))
    return report


# ---------------------------------------------------------------------------------------------------
# Pictures

def _plots(staging: Path, report: dict[str, Any], ref: dict[str, MetricResult], cmp: dict[str, MetricResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["metrics"])
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
        for ax, name in zip(axes[0], names):
            labels = ["reference", "compressed"] + [f for f, e in report["exports"].items() if name in e["metrics"]]
            values = [report["metrics"][name]["reference"], report["metrics"][name]["compressed"]] + \
                     [e["metrics"][name] for e in report["exports"].values() if name in e["metrics"]]
            ax.bar(range(len(values)), values, color=["#888888", "#2a7ab9"] + ["#e08a2c"] * (len(values) - 2))
            ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
            arrow = "higher is better" if report["metrics"][name]["higher_is_better"] else "lower is better"
            ax.set_title(f"{name}\n({arrow})", fontsize=9)
        fig.tight_layout()
        fig.savefig(staging / "metrics.png", dpi=110)
        plt.close(fig)

    size = report["size_bytes"]
    labels = ["reference", "compressed"] + list(report["exports"])
    values = [size["reference"], size["compressed"]] + [e["size_bytes"] for e in report["exports"].values()]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(values), 3.0))
    ax.bar(range(len(values)), [v / 2**20 for v in values], color=["#888888", "#2a7ab9"] + ["#e08a2c"] * (len(values) - 2))
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("size", fontsize=9)
    fig.tight_layout()
    fig.savefig(staging / "size.png", dpi=110)
    plt.close(fig)

    for name, r in ref.items():
        if r.images is not None and name in cmp and cmp[name].images is not None:
            _sample_grid(staging / f"samples_{name}.png", r.images, cmp[name].images, plt)


def image_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """Tile ``[N, C, H, W]`` images in [0, 1] into one ``[H', W', C]`` array with 1-pixel borders."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = images[i]
    return grid.permute(1, 2, 0).clamp(0, 1)


def _sample_grid(path: Path, ref: torch.Tensor, cmp: torch.Tensor, plt: Any) -> None:
    n = min(len(ref), len(cmp), 32)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, imgs, title in ((axes[0], ref[:n], "reference"), (axes[1], cmp[:n], "compressed")):
        grid = image_grid(imgs.float().cpu())
        ax.imshow(grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{title} (same seeds)", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Markdown

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _versus(reference: int, other: int) -> str:
    if other <= reference:
        return f"{reference / max(other, 1):.2f}x smaller"
    return f"{other / max(reference, 1):.2f}x larger"


def _what_it_saves(report: dict[str, Any], manifest_passes: dict[str, Any]) -> list[str]:
    """What each method is for, in its own terms: compute per prompt for pruning, the delta against the fp16
    delta for delta methods, and why a torch number can look worse than the deployable one."""
    lines: list[str] = []
    for name in ("aptp", "static_prune"):
        log = manifest_passes.get(name)
        if log and "code_macs_ratio" in log:
            codes = ", ".join(f"code {i}: {r:.3f} ({n} training prompts)"
                              for i, (r, n) in enumerate(zip(log["code_macs_ratio"], log["train_prompt_counts"])))
            lines += [f"- **Compute** ({name}): {log['average_macs_ratio']:.3f} of the unpruned UNet's MACs per "
                      f"prompt on average, routed by prompt: {codes}. The artifact stores every code's "
                      "sub-network, so it can be larger than the input: this method saves compute, not bytes."]
            lines += _routing_on_evaluation(report)
    d = report.get("delta")
    if d:
        lines += [f"- **Delta**: {d['total_bytes']:,} bytes stored against {d['total_fp16_bytes']:,} for the fp16 "
                  f"delta of the same tensors ({d['total_ratio']:.1f}x smaller; linear layers alone "
                  f"{d['linear_ratio']:.1f}x). The size above compares the delta with the whole input model; the "
                  "base is loaded from its own checkpoint. In torch the delta runs as base product + delta "
                  "product per layer, so its latency is above the fine-tune's; merge it "
                  "(`modelpress.modules.materialize`, as the exports do) or serve many fine-tunes on one base to gain."]
    quant = [n for n in ("ptq", "ptq4dm", "tfmq") if n in manifest_passes]
    if quant and "latency" in report["metrics"]:
        lines += [f"- **Latency** ({', '.join(quant)}): the torch model emulates integer arithmetic in floats "
                  "(fake quantization: dequantize, quantize the input, then a float op), so its latency is "
                  "*above* the reference's; the exports' latency is the deployable one."]
    return ["## What the method saves", ""] + lines + [""] if lines else []


def _routing_on_evaluation(report: dict[str, Any]) -> list[str]:
    """Where the evaluation's prompts were routed (the metrics' ``routing`` details) and the compute they took."""
    lines = []
    for metric, entry in report["metrics"].items():
        mix = (entry.get("details") or {}).get("routing")
        if mix and "macs_ratio" in mix:
            counts = ", ".join(f"code {i}: {n}" for i, n in enumerate(mix["prompts_per_code"]))
            lines.append(f"- **On the evaluation prompts** ({metric}, {sum(mix['prompts_per_code'])} prompts): "
                         f"{mix['macs_ratio']:.3f} of the unpruned UNet's MACs per prompt on average; prompts per "
                         f"code: {counts}.")
    return lines


def _pass_warnings(manifest: dict[str, Any]) -> list[str]:
    """``pass: message`` for every warning a pass recorded in the manifest."""
    return [f"{name}: {w}" for name, entry in manifest.get("passes", {}).items() for w in entry.get("warnings", [])]


def _markdown(loaded: Any, report: dict[str, Any], staging: Path, manifest: dict[str, Any], log_name: str | None) -> str:
    r = loaded.recipe
    passes = ", ".join(name for name, _ in loaded.passes) or "(none)"
    lines = ["# modelpress report", "", f"- model: `{r.model.source}`" + (f" (base `{r.base.source}`)" if r.base else ""),
             f"- passes: {passes}", f"- seed: {r.seed}", ""]
    size = report["size_bytes"]
    lines += ["## Size", "", "| | bytes | vs reference |", "|---|---:|---:|",
              f"| reference: {size.get('reference_label', 'input model')} | {size['reference']:,} | 1.00x |",
              f"| compressed | {size['compressed']:,} | {_versus(size['reference'], size['compressed'])} |"]
    for name, e in report["exports"].items():
        lines.append(f"| export `{name}` | {e['size_bytes']:,} | {_versus(size['reference'], e['size_bytes'])} |")
    if size.get("note"):
        lines += ["", f"({size['note']}.)"]
    if report.get("cast"):
        c = report["cast"]
        same = "bit-identical" if c["coded_max_abs_err_vs_cast"] == 0 else f"max abs err {c['coded_max_abs_err_vs_cast']:.3g}"
        lines += ["", "Two steps: the cast is lossy, the coding is not.", "",
                  "| step | bytes | vs the step before | outputs |", "|---|---:|---:|---|",
                  f"| 1. cast {c['from']} -> {c['to']} (lossy) | {c['bytes']:,} | "
                  f"{_versus(size['reference'], c['bytes'])} | "
                  + ", ".join(f"{n} {_fmt(v)}" for n, v in c["metrics"].items()) + " |",
                  f"| 2. lossless coding | {size['compressed']:,} | {_versus(c['bytes'], size['compressed'])} | "
                  f"{same} to step 1 |"]
        if c.get("decoded_tensors_identical"):
            lines += ["", f"The coded model decodes to the cast model's {c['decoded_tensors_identical']} tensors bit for "
                      "bit and runs the same dense operations, so step 1's metrics are the compressed model's."]
    lines += ["", "Bytes by codec: " + ", ".join(f"{k} {v:,}" for k, v in size["by_codec"].items()), "", "![size](size.png)", ""]
    lines += _what_it_saves(report, manifest.get("passes", {}))
    if report["metrics"]:
        exports = list(report["exports"])
        header = ["metric", "reference", "compressed"] + [f"`{e}`" for e in exports]
        lines += ["## Metrics", "", "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for name, m in report["metrics"].items():
            better = "↑" if m["higher_is_better"] else "↓"
            cells = [f"{name} {better}", _fmt(m["reference"]), _fmt(m["compressed"])] + \
                    [_fmt(report["exports"][e]["metrics"].get(name, "")) for e in exports]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "![metrics](metrics.png)", ""]
    if report["exports"]:
        lines += ["## Exports", "", "| format | file | max abs err vs torch |", "|---|---|---:|"]
        for name, e in report["exports"].items():
            lines.append(f"| {name} | `{e['path']}` | {e['max_abs_err']:.3g} |")
        lines.append("")
        lines += [f"- {note}" for note in report.get("export_notes", [])] + [""]
    warnings = _pass_warnings(manifest)
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    for png in sorted(staging.glob("samples_*.png")):
        lines += [f"## Samples: {png.stem[len('samples_'):]}", "", f"![{png.stem}]({png.name})", ""]
    if log_name:
        lines += [f"Other libraries' warnings and messages during this run: [{log_name}]({log_name}).", ""]
    return "\n".join(lines)


__all__ = ["build_report", "image_grid", "get_metric"]
