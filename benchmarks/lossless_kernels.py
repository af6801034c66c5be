"""Fused decode + matmul and row-wise embedding lookup on the CPU (issue 22), and fp8 sizes.

For each ``nn.Linear`` weight shape ``(out, in)`` (Llama-shaped: 4096x4096 attention, 11008x4096 Llama-2 MLP,
14336x4096 Llama-3 MLP, 128256x4096 Llama-3 head; synthetic bf16 weights, N(0, 0.02^2) with a log-normal
per-row scale, since no LLM is available offline) and batch 1, 4, 16, 64, at 1 and 2 threads:

* ``fused``: ``LosslessLinear.forward`` on the fused kernel (what a model runs: activation cast, numba on torch's
  thread count, output cast), against ``dense``: torch's bf16 ``F.linear`` on the uncoded weight, interleaved in
  every repeat so both see the same machine load; min and median of ``--repeats``; the ratio fused / dense, by
  wall-clock time and by process CPU time (all threads; not inflated by time preempted on a shared machine);
  bytes each reads (fused: the coded weight + activations; dense: the bf16 weight + activations);
* how the output differs from ``F.linear`` (summation order): the share of bit-identical outputs and the largest
  difference over the output rms; and for 4096x4096
  at batch 1 and 4 bit-equality with ``entropy.linear_reference`` (the fused kernels' defined order);
* each with the weights coded with each of ``--symbols``: the default symbol (``2``: sign, exponent, two mantissa
  bits; the smallest), the sign-and-exponent symbol (``0``: ~0.06 bits/weight larger, four codes per table
  lookup) and DFloat11's own layout (``0-raw-sign``: the exponent alone is coded, sign and mantissa stored as one
  raw byte, format version 6; the same size as ``0``, shorter codes); ``K-raw-sign`` for other ``K``;
* the fused / dense threshold: ``fused`` against ``decode`` (decode the whole weight, then ``F.linear``: the
  module's path above ``fused_max_rows``) on 4096x4096 at batch 1..256;
* embedding: 32 token ids from a 32000x4096 bf16 table: ``LosslessEmbedding`` (decodes only the rows' lanes)
  against decoding the whole table, and torch's dense lookup;
* fp8: bits/weight of all-MiniLM-L6-v2's coded weights cast to float8_e4m3fn / float8_e5m2 (and float16):
  ours, ZipNN (``zipnn``), zstd-3, all side data included; every round trip checked bit for bit;
* sizes: bits/weight of all-MiniLM-L6-v2's coded weights in bf16 with each of ``--symbols`` (round trips checked).

    python benchmarks/lossless_kernels.py [--repeats 5] [--no-head] [--parts linear embedding sizes] [--out DIR]
        [--symbols 2 0 0-raw-sign] [--shapes 4096x4096] [--batches 1 4] [--stem lossless_kernels]

Writes ``<stem>.md`` and ``<stem>.json`` in ``--out`` (with ``--parts``, only those parts are measured again and
the others kept from the existing json). The batch-1 check of issue 22 (under 4 minutes):

    python benchmarks/lossless_kernels.py --parts linear sizes --shapes 4096x4096 --batches 1 4 \
        --symbols 2 0 0-raw-sign --repeats 15 --stem lossless_batch1
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any OpenMP runtime starts (see entropy_cpu)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from modelpress.codecs.lossless import (EMBEDDING_LANE_WEIGHTS, LosslessEmbedding, LosslessLinear,  # noqa: E402
                                          encode_tensor, tensor_words)
from modelpress.kernels import entropy as E  # noqa: E402
from modelpress.kernels import entropy_cpu as C  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096)]
HEAD = (128256, 4096)
BATCHES = [1, 4, 16, 64]
THRESHOLD_BATCHES = [1, 4, 16, 64, 256]


def synthetic_weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    """bf16 N(0, 0.02^2) with a log-normal per-row scale, made in chunks of rows (the head is 525M weights)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(out_f, in_f, dtype=torch.bfloat16)
    for a in range(0, out_f, 8192):
        b = min(out_f, a + 8192)
        scale = torch.exp(torch.randn(b - a, 1, generator=g) * 0.3) * 0.02
        w[a:b] = (torch.randn(b - a, in_f, generator=g) * scale).to(torch.bfloat16)
    return w


CPU_TIMES: list[list[float]] = []


def times(fns: list[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Run every function once to warm up, then ``repeats`` rounds with the functions interleaved. Returns the
    wall-clock times; the process CPU times of the same calls (all threads; time spent preempted by other jobs
    on a shared machine does not count) are left in ``CPU_TIMES``."""
    for f in fns:
        f()
    out: list[list[float]] = [[] for _ in fns]
    CPU_TIMES[:] = [[] for _ in fns]
    for _ in range(repeats):
        for f, t, c in zip(fns, out, CPU_TIMES):
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
            c.append(time.process_time() - c0)
    return out


def ms(t: list[float]) -> dict[str, float]:
    return {"min_ms": round(min(t) * 1e3, 3), "median_ms": round(statistics.median(t) * 1e3, 3)}


def difference(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How the fused output differs from torch's: the share of outputs with identical bits, and the largest
    difference over the outputs' rms (a difference in ulps is meaningless for outputs near zero, where the
    sum of 4096 products cancels)."""
    yf, rf = y.float(), ref.float()
    return {"identical_share": round(float((y.view(torch.int16) == ref.view(torch.int16)).float().mean()), 4),
            "max_diff_over_rms": float(f"{float((yf - rf).abs().max() / rf.pow(2).mean().sqrt()):.3g}")}


def parse_symbol(spec: str) -> tuple[int, bool]:
    """``"2"`` -> (2, False): mantissa bits in the symbol; ``"0-raw-sign"`` -> (0, True): the sign stored raw."""
    k, _, rest = spec.partition("-")
    if not k.isdigit() or rest not in ("", "raw-sign"):
        raise SystemExit(f"bad symbol {spec!r}: use K or K-raw-sign")
    return int(k), rest == "raw-sign"


def bench_linear(shape: tuple[int, int], batches: list[int], repeats: int, seed: int,
                 symbol: str = "2") -> list[dict[str, Any]]:
    out_f, in_f = shape
    mantissa_bits, raw_sign = parse_symbol(symbol)
    w = synthetic_weight(out_f, in_f, seed)
    lin = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    lin.weight.data = w
    enc, _ = encode_tensor(w, mantissa_bits=mantissa_bits, raw_sign=raw_sign)
    m = LosslessLinear.from_linear(lin, enc)
    m.fused_max_rows = 1 << 30
    m.plan()  # validation (crc of every block) happens once, at first use
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in batches:
            x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(batch)).to(torch.bfloat16)
            with torch.no_grad():
                t_fused, t_dense = times([lambda: m(x), lambda: F.linear(x, w)], repeats)
                c_fused, c_dense = CPU_TIMES
                y, ref = m(x), F.linear(x, w)
            act = batch * (in_f + out_f) * 2
            row = {"shape": f"{out_f}x{in_f}", "mantissa_bits": mantissa_bits, "symbol": symbol,
                   "bits_per_weight": round(enc.nbytes * 8 / w.numel(), 3), "batch": batch, "threads": threads,
                   "fused": ms(t_fused), "dense": ms(t_dense),
                   "ratio_min": round(min(t_fused) / min(t_dense), 2),
                   "ratio_median": round(statistics.median(t_fused) / statistics.median(t_dense), 2),
                   "fused_cpu": ms(c_fused), "dense_cpu": ms(c_dense),
                   "cpu_ratio_min": round(min(c_fused) / min(c_dense), 2),
                   "cpu_ratio_median": round(statistics.median(c_fused) / statistics.median(c_dense), 2),
                   "fused_bytes": enc.nbytes + act, "dense_bytes": w.numel() * 2 + act,
                   **difference(y, ref)}
            if shape == (4096, 4096) and batch in (1, 4) and threads == 1:
                exact = E.linear_reference(w.float().numpy(), x.float().numpy())
                row["equals_reference"] = bool(torch.equal(y, torch.from_numpy(exact).to(torch.bfloat16)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_threshold(repeats: int, seed: int) -> list[dict[str, Any]]:
    """fused against decode + dense F.linear (the module's large-batch path) on 4096x4096, 2 threads."""
    w = synthetic_weight(4096, 4096, seed)
    lin = nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16)
    lin.weight.data = w
    m = LosslessLinear.from_linear(lin, encode_tensor(w)[0])
    torch.set_num_threads(2)
    rows = []
    for batch in THRESHOLD_BATCHES:
        x = torch.randn(batch, 4096).to(torch.bfloat16)
        with torch.no_grad():
            t_fused, t_decode = times([lambda: (setattr(m, "fused_max_rows", 1 << 30), m(x)),
                                       lambda: (setattr(m, "fused_max_rows", 0), m(x))], repeats)
            c_fused, c_decode = CPU_TIMES
        row = {"batch": batch, "fused": ms(t_fused), "decode_then_dense": ms(t_decode),
               "fused_over_decode_min": round(min(t_fused) / min(t_decode), 2),
               "fused_cpu": ms(c_fused), "decode_then_dense_cpu": ms(c_decode),
               "cpu_fused_over_decode_min": round(min(c_fused) / min(c_decode), 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_embedding(repeats: int, seed: int) -> list[dict[str, Any]]:
    table = synthetic_weight(32000, 4096, seed)
    emb = nn.Embedding(32000, 4096, dtype=torch.bfloat16)
    emb.weight.data = table
    m = LosslessEmbedding.from_embedding(emb, encode_tensor(table, lane_weights=EMBEDDING_LANE_WEIGHTS)[0])  # as the pass
    m.plan()
    ids = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(seed))
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            t_rows, t_full, t_dense = times([lambda: m(ids), lambda: m.decoded_weight(), lambda: emb(ids)], repeats)
            assert torch.equal(m(ids), emb(ids))
        row = {"threads": threads, "rows": ms(t_rows), "decode_table": ms(t_full), "dense_lookup": ms(t_dense),
               "speedup_min": round(min(t_full) / min(t_rows), 1),
               "speedup_median": round(statistics.median(t_full) / statistics.median(t_rows), 1),
               "lanes_decoded": int(np.unique(ids.numpy() * 4096 // m.plan().lane_size).size),
               "lane_size": m.plan().lane_size}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def minilm_weights() -> list[torch.Tensor]:
    """float32 weights of all-MiniLM-L6-v2 that the ``dfloat11`` pass codes (>= 4096 elements)."""
    from modelpress import zoo

    module = zoo.load("minilm").module
    return [m.weight.detach().float() for m in module.modules()
            if type(m) in (nn.Linear, nn.Embedding) and m.weight.numel() >= 4096]


def bench_fp8() -> list[dict[str, Any]]:
    import zstandard
    from zipnn import ZipNN

    weights = minilm_weights()
    n = sum(w.numel() for w in weights)
    rows = []
    for dtype in ("float8_e4m3fn", "float8_e5m2", "float16", "bfloat16"):
        ts = [w.to(getattr(torch, dtype)) for w in weights]
        ours = zipnn = zstd = 0
        bound = 0.0
        z = ZipNN(input_format="torch", threads=1)
        for t in ts:
            enc, b = encode_tensor(t)
            bound += b * t.numel()
            words, _ = tensor_words(t)
            assert np.array_equal(C.decode(enc), words)
            ours += enc.nbytes
            c = z.compress(t.clone())
            back = z.decompress(c)
            assert back.dtype == t.dtype and torch.equal(back.reshape(-1).view(torch.uint8),
                                                         t.reshape(-1).view(torch.uint8))
            zipnn += len(c)
            zstd += len(zstandard.ZstdCompressor(level=3).compress(words.tobytes()))
        rows.append({"dtype": dtype, "weights": n, "bits": E.DTYPES[dtype][1],
                     "ours": round(ours * 8 / n, 3), "zipnn": round(zipnn * 8 / n, 3),
                     "zstd3": round(zstd * 8 / n, 3), "exponent_bound": round(bound / n, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_sizes(symbols: list[str]) -> list[dict[str, Any]]:
    """bits/weight of minilm's coded weights in bf16 with each symbol (every round trip checked)."""
    weights = [w.to(torch.bfloat16) for w in minilm_weights()]
    n = sum(w.numel() for w in weights)
    rows = []
    for symbol in symbols:
        k, raw_sign = parse_symbol(symbol)
        total = 0
        for t in weights:
            enc, _ = encode_tensor(t, mantissa_bits=k, raw_sign=raw_sign)
            assert np.array_equal(C.decode(enc), tensor_words(t)[0])
            total += enc.nbytes
        rows.append({"symbol": symbol, "weights": n, "bits_per_weight": round(total * 8 / n, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _section(title: str, *columns: str) -> list[str]:
    """A markdown section's heading and its table's header rows."""
    return ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Fused lossless kernels (CPU)", "", "Runs: " + "; ".join(res["runs"]), "",
             "## Linear: fused decode + matmul vs torch bf16 F.linear (ms, min / median; ratio = fused / dense)", "",
             "| weight (out x in) | symbol (bits/weight) | batch | threads | fused | dense bf16 F.linear | "
             "ratio min | ratio median | CPU ms fused / dense (min) | CPU-time ratio min / median | fused reads MB | "
             "dense reads MB | outputs bit-identical to dense | max diff / rms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("linear", []):
        symbol = r.get("symbol", r.get("mantissa_bits", 2))
        lines.append(f"| {r['shape']} | {symbol} ({r.get('bits_per_weight', '')}) | {r['batch']} | "
                     f"{r['threads']} | {r['fused']['min_ms']:.1f} / "
                     f"{r['fused']['median_ms']:.1f} | {r['dense']['min_ms']:.1f} / {r['dense']['median_ms']:.1f} | "
                     f"{r['ratio_min']} | {r['ratio_median']} | "
                     + (f"{r['fused_cpu']['min_ms']:.1f} / {r['dense_cpu']['min_ms']:.1f} | "
                        f"{r['cpu_ratio_min']} / {r['cpu_ratio_median']} | " if "fused_cpu" in r else "| | ")
                     + f"{r['fused_bytes'] / 1e6:.1f} | "
                     f"{r['dense_bytes'] / 1e6:.1f} | {r['identical_share']:.2%} | {r['max_diff_over_rms']} |")
    for r in res.get("linear", []):
        if "equals_reference" in r:
            lines += ["", f"4096x4096, symbol {r.get('symbol', r.get('mantissa_bits', 2))}, batch {r['batch']}: "
                          "fused output "
                          f"equals `entropy.linear_reference`: {r['equals_reference']}"]
    if res.get("threshold"):
        lines += _section("Threshold: fused vs decode + dense F.linear (4096x4096, 2 threads, ms min / median)",
                          "batch", "fused", "decode then dense", "fused / decode (min)", "CPU ms fused / decode (min)",
                          "CPU-time fused / decode (min)")
        for r in res.get("threshold", []):
            lines.append(f"| {r['batch']} | {r['fused']['min_ms']:.1f} / {r['fused']['median_ms']:.1f} | "
                         f"{r['decode_then_dense']['min_ms']:.1f} / {r['decode_then_dense']['median_ms']:.1f} | "
                         f"{r['fused_over_decode_min']} | "
                         + (f"{r['fused_cpu']['min_ms']:.1f} / {r['decode_then_dense_cpu']['min_ms']:.1f} | "
                            f"{r['cpu_fused_over_decode_min']} |" if "fused_cpu" in r else "| |"))
    if res.get("embedding"):
        lines += _section("Embedding: 32 tokens from a 32000x4096 bf16 table (ms, min / median)", "threads",
                          "row lookup", "decode whole table", "dense torch lookup", "speedup min", "speedup median",
                          "lanes decoded (lane size)")
        for r in res.get("embedding", []):
            lines.append(f"| {r['threads']} | {r['rows']['min_ms']:.2f} / {r['rows']['median_ms']:.2f} | "
                         f"{r['decode_table']['min_ms']:.1f} / {r['decode_table']['median_ms']:.1f} | "
                         f"{r['dense_lookup']['min_ms']:.3f} / {r['dense_lookup']['median_ms']:.3f} | "
                         f"{r['speedup_min']}x | {r['speedup_median']}x | {r['lanes_decoded']} ({r['lane_size']}) |")
    if res.get("fp8"):
        lines += _section("Bits per weight: all-MiniLM-L6-v2 coded weights cast to each dtype (side data included)",
                          "dtype", "weights", "ours", "ZipNN", "zstd-3", "order-0 exponent bound")
        for r in res.get("fp8", []):
            lines.append(f"| {r['dtype']} | {r['weights'] / 1e6:.2f}M | {r['ours']} | {r['zipnn']} | {r['zstd3']} | "
                         f"{r['exponent_bound']} |")
    if res.get("sizes"):
        lines += _section("Bits per weight of each symbol: all-MiniLM-L6-v2 coded weights in bf16", "symbol",
                          "weights", "bits/weight")
        lines += [f"| {r['symbol']} | {r['weights'] / 1e6:.2f}M | {r['bits_per_weight']} |" for r in res["sizes"]]
    return "\n".join(lines) + "\n"


def cpu_features() -> str:
    """The CPU flags that decide who wins: native bf16 dot products (torch's dense path) and BMI2 (ours)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "flags unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bmi2"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--head-repeats", type=int, default=3)
    ap.add_argument("--no-head", action="store_true", help="skip the 128256x4096 head (1 GB bf16)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--parts", nargs="+", default=["linear", "threshold", "embedding", "fp8"])
    ap.add_argument("--symbols", nargs="+", default=["2", "0", "0-raw-sign"],
                    help="symbols of the linear and sizes parts: 2 (the default, smallest), 0 (sign and exponent: "
                         "~3.7-bit codes) and 0-raw-sign (exponent only, sign stored raw: DFloat11's layout, "
                         "~2.7-bit codes, fastest)")
    ap.add_argument("--shapes", nargs="+", default=None, help="weight shapes OUTxIN (default: the Llama shapes)")
    ap.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    ap.add_argument("--stem", default="lossless_kernels", help="name of the json and md files written")
    args = ap.parse_args()
    load = os.getloadavg()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    old = args.out / f"{args.stem}.json"
    res: dict[str, Any] = json.loads(old.read_text()) if old.exists() else {}
    if "linear" in args.parts:
        res["linear"] = []
        for i, shape in enumerate(shapes):
            for symbol in args.symbols:
                res["linear"] += bench_linear(shape, args.batches, args.repeats, i, symbol)
        if not args.no_head and not args.shapes:
            for symbol in args.symbols:
                res["linear"] += bench_linear(HEAD, args.batches, args.head_repeats, 9, symbol)
    if "threshold" in args.parts:
        res["threshold"] = bench_threshold(args.repeats, seed=11)
    if "embedding" in args.parts:
        res["embedding"] = bench_embedding(args.repeats, seed=12)
    if "fp8" in args.parts:
        res["fp8"] = bench_fp8()
    if "sizes" in args.parts:
        res["sizes"] = bench_sizes(args.symbols)
    res.setdefault("runs", []).append(f"parts {' '.join(args.parts)}: " + (f"{platform.processor() or platform.machine()} ({cpu_features()}), {os.cpu_count()} cores "
                      f"(load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); torch "
                      f"{torch.__version__}, numba {numba.__version__} ({numba.threading_layer()}), "
                      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {args.repeats} repeats "
                      f"({args.head_repeats} for the head)"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
    (args.out / f"{args.stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
