"""The pass x kind x export matrix (tests/test_matrix.py), timed, with its counts of working and refused cells.

Runs the matrix's CI tier (every kind x every registered pass, each with its ONNX export and every metric that
applies) and, with ``--slow``, the slow tier too (int8 ONNX, .ort and .pte of every (kind, pass)), in one pytest
process; writes the cells, the refusals and the seconds per (kind, pass) as markdown and JSON.

    python benchmarks/matrix.py --out benchmarks/results/matrix.md            # CI tier
    python benchmarks/matrix.py --slow --out benchmarks/results/matrix-all.md # both tiers
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_matrix(slow: bool, select: str | None) -> tuple[dict, float, int]:
    """Run the matrix in pytest; ``(its JSON record, wall seconds, pytest's exit status)``."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "matrix.json"
        env = {**os.environ, "MODELPRESS_MATRIX_JSON": str(record)}
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_matrix.py"), "-q", "-p", "no:cacheprovider",
               "-m", "slow or not slow" if slow else "not slow"]
        if select:
            cmd += ["-k", select]
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        wall = time.perf_counter() - t0
        return json.loads(record.read_text()) if record.exists() else {"cells": [], "seconds": []}, wall, code


def markdown(record: dict, wall: float, code: int, command: str) -> str:
    cells = record["cells"]
    works = [c for c in cells if c["result"] == "works"]
    by_kind = Counter(c["kind"] for c in works)
    lines = ["# Pass x kind x export matrix\n", f"`{command}` (pytest exit status {code}; 0: no cell crashed)\n",
             f"- cells: {len(cells)}; work end to end: {len(works)}; refused when the recipe is read: "
             f"{len(cells) - len(works)}",
             f"- wall time: {wall:.0f} s (pytest, fixtures included); working cells per kind: "
             + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())), "",
             "| kind | pass | format | result |", "|---|---|---|---|"]
    lines += [f"| {c['kind']} | {c['pass']} | {c['format']} | {c['result'].replace('|', '/')} |" for c in cells]
    lines += ["", "| kind | pass | seconds (compress, save, load, exports, report) |", "|---|---|---|"]
    lines += [f"| {s['kind']} | {s['pass']} | {s['seconds']} |" for s in record["seconds"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow", action="store_true", help="also the slow tier (int8 ONNX, .ort, .pte)")
    ap.add_argument("-k", dest="select", help="pytest -k selection (e.g. 'encoder')")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "matrix.md")
    args = ap.parse_args()
    record, wall, code = run_matrix(args.slow, args.select)
    command = "python benchmarks/matrix.py" + (" --slow" if args.slow else "") + \
              (f" -k '{args.select}'" if args.select else "")
    args.out.write_text(markdown(record, wall, code, command))
    args.out.with_suffix(".json").write_text(json.dumps({**record, "wall_seconds": round(wall, 1), "exit": code},
                                                        indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
