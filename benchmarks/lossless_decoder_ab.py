"""A/B of the CPU fused decode + GEMV kernel against an earlier commit's, in one process (issue 22).

The earlier ``modelpress/kernels/entropy.py`` and ``entropy_cpu.py`` are read from ``--ref`` with ``git show`` into
a temporary package, so both kernels (and torch's bf16 ``F.linear``, the baseline) run interleaved on the same
weights, activations and machine load. Every configuration first checks that both kernels give bit-identical
outputs. Times are per-thread CPU times (``time.thread_time``; one numba and one torch thread), so time spent
preempted by other jobs on a shared machine does not count; min and median of ``--repeats``.

    python benchmarks/lossless_decoder_ab.py [--ref 9b330fb] [--repeats 11] [--symbols 2 0 0-raw-sign]

(``--symbols`` as in ``lossless_kernels.py``; ``K-raw-sign`` needs a ``--ref`` that reads format version 6.)

Writes ``lossless_decoder_ab.md`` and ``.json`` in ``--out``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any OpenMP runtime starts (see entropy_cpu)

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modelpress.codecs.lossless import encode_tensor  # noqa: E402
from modelpress.kernels import entropy as E  # noqa: E402
from modelpress.kernels import entropy_cpu as C  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lossless_kernels import cpu_features, parse_symbol, synthetic_weight  # noqa: E402


def reference_kernels(ref: str, root: Path) -> tuple:
    """The ``entropy`` and ``entropy_cpu`` modules of commit ``ref``, imported as package ``mp_ref_kernels``."""
    pkg = root / "mp_ref_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("entropy", "entropy_cpu"):
        src = subprocess.run(["git", "show", f"{ref}:modelpress/kernels/{name}.py"], check=True, capture_output=True,
                             text=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("from ..errors import", "from modelpress.errors import"))
    sys.path.insert(0, str(root))
    return importlib.import_module("mp_ref_kernels.entropy"), importlib.import_module("mp_ref_kernels.entropy_cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="9b330fb", help="the commit whose kernels are the A side")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--symbols", nargs="+", default=["2", "0"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        RE, RC = reference_kernels(args.ref, Path(tmp))
        w = synthetic_weight(4096, 4096, 0)
        rows = []
        for symbol in args.symbols:
            k, raw_sign = parse_symbol(symbol)
            enc, _ = encode_tensor(w, mantissa_bits=k, raw_sign=raw_sign)
            plan = E.validate(enc)
            ref_plan = RE.validate(RE.Encoded(*[a.copy() for a in enc.arrays().values()]))
            for batch in args.batches:
                x = torch.randn(batch, 4096, generator=torch.Generator().manual_seed(batch)).to(torch.bfloat16)
                xf = x.float().numpy()
                y_new, y_ref = C.fused_linear(plan, xf), RC.fused_linear(ref_plan, xf)
                assert np.array_equal(y_new, y_ref), "kernels disagree"
                fns = {"new": lambda: C.fused_linear(plan, xf), "ref": lambda: RC.fused_linear(ref_plan, xf),
                       "dense": lambda: F.linear(x, w)}
                for f in fns.values():
                    f()
                ts: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, f in fns.items():
                        t0 = time.thread_time()
                        f()
                        ts[name].append(time.thread_time() - t0)
                row = {"mantissa_bits": k, "symbol": symbol, "bits_per_weight": round(enc.nbytes * 8 / w.numel(), 3), "batch": batch,
                       **{f"{n}_ms": {"min": round(min(t) * 1e3, 2), "median": round(statistics.median(t) * 1e3, 2)}
                          for n, t in ts.items()},
                       "new_over_ref_min": round(min(ts["new"]) / min(ts["ref"]), 3),
                       "new_over_dense_min": round(min(ts["new"]) / min(ts["dense"]), 2),
                       "new_over_dense_median": round(statistics.median(ts["new"]) / statistics.median(ts["dense"]), 2),
                       "ref_over_dense_min": round(min(ts["ref"]) / min(ts["dense"]), 2),
                       "identical_outputs": True}
                rows.append(row)
                print(json.dumps(row), flush=True)
    run = (f"ref {args.ref}; {cpu_features()}; load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at "
           f"the end; torch {torch.__version__}, numba {numba.__version__}; {args.repeats} repeats, 1 thread, CPU time")
    lines = ["# Fused decode + GEMV: this kernel against an earlier commit's (4096x4096 bf16, 1 thread)", "",
             f"Run: {run}", "",
             "| symbol (bits/weight) | batch | new ms min / med | ref ms min / med | dense F.linear ms min / med | "
             "new / ref (min) | new / dense min / med | ref / dense (min) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['symbol']} ({r['bits_per_weight']}) | {r['batch']} | "
                     f"{r['new_ms']['min']} / {r['new_ms']['median']} | {r['ref_ms']['min']} / {r['ref_ms']['median']} | "
                     f"{r['dense_ms']['min']} / {r['dense_ms']['median']} | {r['new_over_ref_min']} | "
                     f"{r['new_over_dense_min']} / {r['new_over_dense_median']} | {r['ref_over_dense_min']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lossless_decoder_ab.json").write_text(json.dumps({"run": run, "rows": rows}, indent=1))
    (args.out / "lossless_decoder_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
