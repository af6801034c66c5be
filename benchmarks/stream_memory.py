"""Resident memory of a streamed ``dfloat11`` run, unit by unit (issue 20: is the streamed peak flat?).

Runs ``modelpress compress`` in this process on a recipe ``{model: CHECKPOINT, passes: [dfloat11], stream: true}``
while a thread samples ``/proc/self/status`` every 5 ms (``VmRSS``, ``RssAnon``, ``RssFile``); each unit of the
stream (:func:`modelpress.stream._compress_unit` then the append to the spool) is wrapped to record the resident
memory before it, its peak while it runs, and after it. ``--malloc-trim`` calls glibc's ``malloc_trim(0)`` after
every unit (a diagnostic for code without :func:`modelpress.devices.release_free_memory`: memory that it
returns was free in the allocator but not given back; ``PYTHONPATH`` chooses which modelpress runs). Peak memory does
not depend on the machine's load; the run's own peak (``VmHWM``) is printed at the end.

    python benchmarks/scale.py --sizes 1.5B --methods dfloat11 --streamed-only --keep --work /tmp/w  # a checkpoint
    python benchmarks/stream_memory.py /tmp/w/1.5B-ft --out benchmarks/results/stream_memory_1.5B.json
    MALLOC_ARENA_MAX=2 python benchmarks/stream_memory.py /tmp/w/1.5B-ft --malloc-trim
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict[str, int]:
    """The process's memory counters in bytes (``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Samples :func:`status` every ``period`` seconds; :meth:`window` returns the largest ``VmRSS`` and
    ``RssAnon`` seen since the last call."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self._peak = {"VmRSS": 0, "RssAnon": 0}
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            s = status()
            with self._lock:
                for k in self._peak:
                    self._peak[k] = max(self._peak[k], s[k])
            time.sleep(self.period)

    def window(self) -> dict[str, int]:
        s = status()
        with self._lock:
            peak = {k: max(v, s[k]) for k, v in self._peak.items()}
            self._peak = {k: s[k] for k in self._peak}
        return peak


def instrument(sampler: Sampler, rows: list[dict], trim: bool) -> None:
    """Wrap the stream's per-unit steps to record memory around each unit: before it is read (after the stream's
    own release of freed memory, if it has one), its peak until it is appended to the spool, and after that."""
    from modelpress import stream

    libc = ctypes.CDLL(None)
    compress_unit, append = stream._compress_unit_here, stream._append

    def traced_compress(ft, base, unit, *args, **kwargs):
        before = status()
        sampler.window()
        rows.append({"unit": unit.label, "rss_before": before["VmRSS"], "anon_before": before["RssAnon"]})
        return compress_unit(ft, base, unit, *args, **kwargs)

    def traced_append(out, r, spool):
        row = rows[-1]
        row.update(unit_bytes=r.nbytes, coded_bytes=sum(t.numel() * t.element_size() for t in r.state.values()))
        append(out, r, spool)
        del r  # the unit's artifact tensors: only the caller's reference is left, which ends with this call
        peak = sampler.window()
        row.update(peak_rss=peak["VmRSS"], peak_anon=peak["RssAnon"])
        if trim:
            row["anon_before_trim"] = status()["RssAnon"]
            libc.malloc_trim(0)
        after = status()
        row.update(rss_after=after["VmRSS"], anon_after=after["RssAnon"], file_after=after["RssFile"])

    stream._compress_unit_here, stream._append = traced_compress, traced_append


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--malloc-trim", action="store_true", help="malloc_trim(0) after every unit (diagnostic)")
    ap.add_argument("--out", type=Path, help="write the rows and the summary as JSON here")
    ap.add_argument("--work", type=Path, default=None, help="where the artifact is written (deleted at the end)")
    args = ap.parse_args()
    import yaml

    from modelpress.cli import main as cli

    sampler = Sampler()
    sampler.start()
    rows: list[dict] = []
    instrument(sampler, rows, args.malloc_trim)
    work = Path(tempfile.mkdtemp(dir=args.work))
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(args.checkpoint), "passes": [{"type": "dfloat11"}],
                                      "stream": True, "output": str(work / "out")}, sort_keys=False))
    start = status()
    t0 = time.process_time()
    try:
        code = cli(["compress", str(recipe), "--quiet"])
    except SystemExit as exc:
        code = exc.code
    cpu = time.process_time() - t0
    artifact = (work / "out" / "model.safetensors").stat().st_size if code in (0, None) else None
    shutil.rmtree(work, ignore_errors=True)
    sampler.stop.set()
    gb = 1e9
    print(f"{'unit':<22} {'unit GB':>8} {'coded GB':>8} {'RSS before':>10} {'peak RSS':>9} {'anon after':>10}")
    for r in rows:
        print(f"{r['unit'][-22:]:<22} {r['unit_bytes'] / gb:8.3f} {r['coded_bytes'] / gb:8.3f} "
              f"{r['rss_before'] / gb:10.3f} {r['peak_rss'] / gb:9.3f} {r['anon_after'] / gb:10.3f}")
    summary = {"checkpoint": str(args.checkpoint), "malloc_trim": args.malloc_trim,
               "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"), "exit": code, "cpu_s": round(cpu, 1),
               "rss_at_start": start["VmRSS"], "vm_hwm": status()["VmHWM"], "artifact_bytes": artifact,
               "largest_unit_bytes": max((r["unit_bytes"] for r in rows), default=0)}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "units": rows}, indent=1))
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
