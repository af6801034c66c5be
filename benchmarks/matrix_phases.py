"""pytest plugin: where a matrix cell's time goes (tests/test_matrix.py), in CPU seconds of the test process
(``time.process_time``, so other jobs on a shared machine inflate it less than wall time).

Per test, one line: the whole call and the seconds inside ``pipeline.compress`` (load + passes + write),
``export_model`` (of which ``torch.export`` and ``translate``, the translation of the exported program to ONNX:
``modelpress.exporters.onnx.translate``, which calls ``torch.onnx.export`` or, with the registry built once per
process, torch.onnx's ``_core.export``), the report's metrics (reference, compressed, exports) and its plots.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/benchmarks python -m pytest -p matrix_phases -p no:cacheprovider \\
        tests/test_matrix.py -k encoder      # lines appended to $MODELPRESS_PHASES (default matrix_phases.txt)

Run as a script, it sums such files per kind (one column per file, e.g. before and after a change):

    python benchmarks/matrix_phases.py before.txt after.txt
"""
from __future__ import annotations

import collections
import functools
import os
import re
import sys
import time
from typing import Any

import pytest

_CUR: dict[str, float] = collections.defaultdict(float)
_DEPTH: collections.Counter[str] = collections.Counter()


def _timed(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _DEPTH[label] += 1
        t0 = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            _DEPTH[label] -= 1
            if not _DEPTH[label]:
                _CUR[label] += time.process_time() - t0

    setattr(owner, name, wrapped)


def pytest_configure(config: pytest.Config) -> None:
    import torch.export

    import modelpress.exporters as exporters
    import modelpress.exporters.onnx as onnx_exporter
    import modelpress.metrics.report as report
    import modelpress.pipeline as pipeline

    _timed(torch.export, "export", "torch.export")
    _timed(onnx_exporter, "translate", "translate")
    _timed(exporters, "export_model", "export_model")
    _timed(report, "_run_metrics", "metrics")
    _timed(report, "_plots", "plots")
    _timed(pipeline, "compress", "compress")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    _CUR.clear()
    t0 = time.process_time()
    yield
    line = f"{item.name} call={time.process_time() - t0:.1f} " + " ".join(f"{k}={v:.1f}" for k, v in sorted(_CUR.items()))
    with open(os.environ.get("MODELPRESS_PHASES", "matrix_phases.txt"), "a") as f:
        f.write(line + "\n")


PHASES = ("call", "export_model", "torch.export", "translate", "compress", "metrics", "plots")
_LINE = re.compile(r"\[(?P<kind>causal-lm|unet-cond|[a-z]+)-(?P<pass>\w+)\] (?P<rest>.*)")


def per_kind(path: str) -> dict[str, dict[str, float]]:
    """Per kind: the CPU seconds of each phase summed over its tests, and ``cells`` (tests that ran a pipeline)."""
    out: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for line in open(path):
        m = _LINE.search(line)
        if not m:
            continue
        values = dict(kv.split("=") for kv in m["rest"].split())
        for k, v in values.items():
            out[m["kind"]][k] += float(v)
        out[m["kind"]]["cells"] += "export_model" in values or "compress" in values
    return out


def summary(paths: list[str]) -> str:
    """A markdown table: per kind and phase, the CPU seconds in each file."""
    tables = [per_kind(p) for p in paths]
    kinds = sorted({k for t in tables for k in t}) + ["all"]
    for t in tables:
        t["all"] = collections.defaultdict(float)
        for k in list(t):
            if k != "all":
                for phase, v in t[k].items():
                    t["all"][phase] += v
    head = " / ".join(os.path.basename(p) for p in paths)
    lines = [f"| kind (pairs run) | {' | '.join(PHASES)} |", "|---|" + "---:|" * len(PHASES),
             f"| *CPU s: {head}* |" + " |" * len(PHASES)]
    for kind in kinds:
        cells = "/".join(str(int(t[kind]["cells"])) for t in tables)
        lines.append(f"| {kind} ({cells}) | " + " | ".join(
            " / ".join(f"{t[kind][ph]:.0f}" for t in tables) for ph in PHASES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1:]))
