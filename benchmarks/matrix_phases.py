"""pytest plugin: where a matrix cell's time goes (tests/test_matrix.py), in CPU seconds of the test process
(``time.process_time``, so other jobs on a shared machine inflate it less than wall time).

Per test, one line: the whole call and the seconds inside ``pipeline.compress`` (load + passes + write),
``export_model`` (of which ``torch.export`` and ``torch.onnx.export``, the translation of the exported program
to ONNX), the report's metrics (reference, compressed, exports) and its plots.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/benchmarks python -m pytest -p matrix_phases -p no:cacheprovider \\
        tests/test_matrix.py -k encoder      # lines appended to $MODELPRESS_PHASES (default matrix_phases.txt)
"""
from __future__ import annotations

import collections
import functools
import os
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
    import torch.onnx

    import modelpress.exporters as exporters
    import modelpress.metrics.report as report
    import modelpress.pipeline as pipeline

    _timed(torch.export, "export", "torch.export")
    _timed(torch.onnx, "export", "torch.onnx.export")
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
