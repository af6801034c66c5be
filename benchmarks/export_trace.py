"""One ``torch.export`` trace per dynamic-shape export instead of two (exporters.common.export_program).

Named dims (``Dim("batch", max=4096)``) fail on a model that guards a dim (diffusers' upsampler branches on
``batch >= 64``) and were traced a second time with torch's suggested bounds; dim hints
(``Dim.DYNAMIC(max=4096)``) let torch narrow the range in the one trace. This script times both on the same
module in one process, alternating (CPU seconds of this process, ``time.process_time``, one thread), and checks
that both give the same bounds and the same outputs on a batch inside them.

    python benchmarks/export_trace.py --repeats 3 --out benchmarks/results/export_trace.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

from modelpress.exporters.common import dim_bounds, export_program, trace_inputs, traceable
from modelpress.model import TEXT_KINDS
from modelpress.sources import load_model

_SUGGESTED = re.compile(r"(\w+) = Dim\('(\w+)'(?:, min=(\d+))?(?:, max=(\d+))?\)")


def named_dims(handle, bounds):
    batch = torch.export.Dim("batch", min=bounds["batch"][0], max=bounds["batch"][1])
    if handle.kind in TEXT_KINDS:
        seq = torch.export.Dim("seq", min=bounds["seq"][0], max=bounds["seq"][1])
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
    return tuple({0: batch} for _ in range(len(trace_inputs(handle))))


def export_named_with_retry(module, inputs, handle):
    """The previous export_program: named dims, and a second trace with torch's suggested bounds on a guard."""
    bounds = dim_bounds(handle)
    try:
        return torch.export.export(module, inputs, dynamic_shapes=named_dims(handle, bounds), strict=False), bounds, 1
    except Exception as exc:
        fixes = _SUGGESTED.findall(str(exc)) if "Constraints violated" in str(exc) else []
        if not fixes:
            raise
        for _, name, lo, hi in fixes:
            bounds[name] = (int(lo) if lo else bounds[name][0], int(hi) if hi else bounds[name][1])
    return torch.export.export(module, inputs, dynamic_shapes=named_dims(handle, bounds), strict=False), bounds, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["digits-ddpm", "digits-t2i"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_trace.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        handle = load_model(name)
        wrapper, inputs = traceable(handle), trace_inputs(handle)
        times: dict[str, list[float]] = {"named + retry": [], "hint": []}
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.process_time()
                old, old_bounds, traces = export_named_with_retry(wrapper, inputs, handle)
                times["named + retry"].append(time.process_time() - t0)
                t0 = time.process_time()
                new, new_bounds = export_program(wrapper, inputs, handle, True)
                times["hint"].append(time.process_time() - t0)
            probe = trace_inputs(handle, batch=5)
            same = torch.equal(old.module()(*probe), new.module()(*probe))
        rows.append({"model": name, "kind": handle.kind, "traces_before": traces,
                     "bounds_before": old_bounds, "bounds_after": {k: list(v) for k, v in new_bounds.items()},
                     "same_outputs_batch5": same,
                     **{f"{k}_s": [round(x, 2) for x in v] for k, v in times.items()}})
        print(json.dumps(rows[-1]))
    lines = ["# One torch.export trace per dynamic export", "",
             f"`python benchmarks/export_trace.py --repeats {args.repeats}`: CPU seconds of one process "
             "(`time.process_time`, 1 thread), the two ways alternated on the same module; load average at the end "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: compare the columns, not "
             "absolute times).", "",
             "| model | traces before | before: min / median s | after (1 trace): min / median s | ratio of medians "
             "| bounds before | bounds after | same outputs (batch 5) |", "|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        b, a = r["named + retry_s"], r["hint_s"]
        lines.append(f"| {r['model']} | {r['traces_before']} | {min(b):.2f} / {statistics.median(b):.2f} | "
                     f"{min(a):.2f} / {statistics.median(a):.2f} | {statistics.median(b) / statistics.median(a):.2f}x "
                     f"| {r['bounds_before']} | {r['bounds_after']} | {r['same_outputs_batch5']} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
