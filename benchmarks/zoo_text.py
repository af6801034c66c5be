"""Measure the text zoo: pydocs-10 statistics, the two docs fine-tunes (accuracy, build cost, delta norms)
and the cost of the text metrics. Writes a markdown table to benchmarks/results/zoo_text.md.

    python benchmarks/zoo_text.py             # cached builds (built if missing); accuracies of the build record
    python benchmarks/zoo_text.py --evaluate  # also recompute the test accuracy with the ``accuracy`` metric
    python benchmarks/zoo_text.py --rebuild   # rebuild both fine-tunes first (times the builds)

Build times: wall seconds and CPU seconds of the training loop (CPU seconds are what a build costs on free
cores; wall time on a shared machine mostly measures the other tenants).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modelpress import zoo
from modelpress.metrics import EvalContext, get_metric
from modelpress.zoo import text as zt

OUT = Path(__file__).resolve().parent / "results" / "zoo_text.md"
FINETUNES = ("minilm-docs", "minilm-docs-large")


def dataset_table() -> list[str]:
    rows = ["| class | train | val | test |", "|---|---:|---:|---:|"]
    counts = {s: torch.bincount(torch.tensor(zt.docs_dataset(s)[1]), minlength=len(zt.DOCS_LABELS))
              for s in zt.DOCS_SPLITS}
    for i, label in enumerate(zt.DOCS_LABELS):
        rows.append(f"| {label} | " + " | ".join(str(int(counts[s][i])) for s in zt.DOCS_SPLITS) + " |")
    rows.append("| **total** | " + " | ".join(str(int(counts[s].sum())) for s in zt.DOCS_SPLITS) + " |")
    return rows


def delta_stats(handle) -> dict[str, float]:
    base = zoo.load("minilm").module
    d = zt.relative_delta_norm(handle.module, base)
    attn = [v for k, v in d.items() if ".attention." in k]
    ffn = [v for k, v in d.items() if ".intermediate." in k or (".output." in k and ".attention." not in k)]
    return {"mean": statistics.fmean(d.values()), "median": statistics.median(d.values()),
            "max": max(d.values()), "attention_mean": statistics.fmean(attn), "ffn_mean": statistics.fmean(ffn),
            "layers": len(d)}


def metric_seconds(handle, n: int) -> dict[str, float]:
    """Cold wall seconds of each text metric on ``n`` test examples (outputs cache cleared first)."""
    from modelpress.metrics import text as et

    out = {}
    for name in ("accuracy", "logit_kl", "embedding_cosine"):
        et._OUTPUTS.clear()
        ctx = EvalContext(samples=n, reference=handle)
        t0 = time.perf_counter()
        value = get_metric(name).fn(handle.canonical(), handle, ctx).value
        out[name] = (time.perf_counter() - t0, value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--evaluate", action="store_true")
    ap.add_argument("--timing-samples", type=int, default=200)
    args = ap.parse_args()
    lines = [f"# Text zoo measurements (torch threads: {torch.get_num_threads()})", "",
             f"pydocs-10 sha256 `{zt.docs_fingerprint()}`", ""] + dataset_table() + [""]
    lines += ["| model | encoder lr | head lr | steps | train wall s | train CPU s | val acc | test acc "
              "| rel. delta norm mean (median, max) | attention / FFN mean |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    handles = {}
    for name in FINETUNES:
        if args.rebuild:
            zt.build_finetune(name, force=True)
        h = handles[name] = zoo.load(name)
        b, s = h.extras["build"], zt.FINETUNES[name]
        acc = get_metric("accuracy").fn(h.canonical(), h, EvalContext()).value if args.evaluate else b["test_accuracy"]
        ds = delta_stats(h)
        steps = s.epochs * -(-len(zt.docs_dataset("train")[0]) // s.batch_size)
        lines.append(f"| {name} | {s.encoder_lr:g} | {s.head_lr:g} | {steps} | {b['train_seconds']:.0f} | "
                     f"{b.get('train_cpu_seconds', float('nan')):.0f} | {b['val_accuracy']:.4f} | {acc:.4f} | "
                     f"{ds['mean']:.5f} ({ds['median']:.5f}, {ds['max']:.5f}) | "
                     f"{ds['attention_mean']:.5f} / {ds['ffn_mean']:.5f} |")
        print(lines[-1], flush=True)
    n = args.timing_samples
    lines += ["", f"| metric (minilm-docs vs itself, {n} test examples, cold) | value | wall seconds |",
              "|---|---:|---:|"]
    for name, (sec, val) in metric_seconds(handles["minilm-docs"], n).items():
        lines.append(f"| {name} | {val:.4f} | {sec:.1f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({n: h.extras["build"] for n, h in handles.items()}, indent=1))


if __name__ == "__main__":
    main()
