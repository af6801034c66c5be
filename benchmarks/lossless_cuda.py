"""GPU decode benchmark of the lossless codec: our numba CUDA decoder against a plain device copy.

DFloat11 (Zhang et al. 2025) reports its CUDA decoder in the ~200 GB/s class (bf16 output bytes per second).
This script measures ours on the machine it runs on, side by side with device-to-device copies of the same bf16
bytes (the memory-bound ceiling for producing those weights: numba's cudaMemcpy, which measured ~4x slower than
torch's copy kernel on an H200, and torch's copy where torch sees the GPU; "vs copy" uses the faster), on two
weight sets:

* ``minilm``: the real all-MiniLM-L6-v2 weights in bf16 (the tensors the ``dfloat11`` pass codes), read from
  an ``.npz`` of bit patterns that ``--export-minilm`` writes on a machine with the zoo (the GPU machine has no
  model hub);
* ``llama7b-block``: one Llama-2-7B-shaped transformer block (q, k, v, o 4096x4096; gate, up 11008x4096;
  down 4096x11008; 202M weights, 405 MB in bf16) of *synthetic* weights: N(0, 0.02^2) scaled per row by a
  log-normal factor, cast to bf16. Real LLM weights are not available offline; the bits per weight of this
  set are printed so the reader can compare with the real sets.

For every kernel configuration (plain or shared-memory staged output, sub-lane size, threads per block) every
tensor of a set is decoded back to back into preallocated outputs, as a model's forward would, timed with CUDA
events (min / median of ``--repeats``); each configuration's output is checked bit-exactly against the input
first. The sub-lane index (built once per tensor when a module first runs) is timed apart. The same encoded
sets are also decoded with the numba CPU kernel on all the machine's cores, for scale.

    python benchmarks/lossless_cuda.py --export-minilm .gpucarry/minilm_bf16.npz     # here, once
    python benchmarks/lossless_cuda.py --minilm .gpucarry/minilm_bf16.npz --out DIR  # on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PLAIN = [(256, 128), (64, 256), (32, 256)]
STAGED = [(64, 256), (32, 128), (32, 256), (32, 512), (16, 256), (16, 512)]
LLAMA_BLOCK = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
               ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]


def export_minilm(path: Path) -> None:
    """Write the bf16 bit patterns of MiniLM's coded weights (needs the zoo, i.e. this project's machine)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lossless import load_weights

    words = load_weights("minilm")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"w{i:03d}": w for i, w in enumerate(words)})
    print(f"wrote {len(words)} tensors, {sum(w.size for w in words) / 1e6:.1f}M weights to {path}")


def synthetic_block(scale: float, seed: int) -> list[np.ndarray]:
    """bf16 bit patterns (2-D) of a Llama-2-7B-shaped block of synthetic weights (shapes scaled by ``scale``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _, rows, cols in LLAMA_BLOCK:
        r, c = max(8, int(rows * scale)), max(8, int(cols * scale))
        row_scale = torch.exp(0.3 * torch.randn(r, 1, generator=gen))
        w = (0.02 * row_scale * torch.randn(r, c, generator=gen)).to(torch.bfloat16)
        out.append(w.view(torch.int16).numpy().view(np.uint16).copy())
    return out


def load_minilm(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in sorted(z.files)]


def timed_events(fn, repeats: int) -> list[float]:
    """Seconds of ``fn()`` measured with CUDA events, after one warm-up call."""
    from numba import cuda

    fn()
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()  # timing events by default
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(max(start.elapsed_time(end) / 1e3, 1e-9))  # the simulator reports 0
    return times


def bench_set(name: str, words: list[np.ndarray], repeats: int, cpu_repeats: int) -> dict:
    from numba import cuda

    from modelpress.kernels import entropy as E
    from modelpress.kernels import entropy_cpu as C
    from modelpress.kernels import entropy_cuda as G

    words = [w.reshape(-1) for w in words]
    n = sum(w.size for w in words)
    out_bytes = 2 * n
    t0 = time.perf_counter()
    encoded = [C.encode(w, "bfloat16") for w in words]
    enc_s = time.perf_counter() - t0
    plans = [E.validate(e, True, name) for e in encoded]
    row: dict = {"set": name, "tensors": len(words), "weights": n,
                 "bits_per_weight": 8 * sum(e.nbytes for e in encoded) / n, "encode_s_cpu": enc_s}

    # memory-bound reference: copy the same bf16 bytes device to device (cudaMemcpy), tensor by tensor
    srcs = [cuda.to_device(w) for w in words]
    dsts = [cuda.device_array_like(w) for w in words]

    def copy_all() -> None:
        for s, d in zip(srcs, dsts):
            d.copy_to_device(s)

    copy_t = timed_events(copy_all, repeats)
    row["copy"] = {"min_s": min(copy_t), "median_s": statistics.median(copy_t),
                   "gbps_min": out_bytes / min(copy_t) / 1e9, "gbps_median": out_bytes / statistics.median(copy_t) / 1e9}
    del srcs, dsts
    import torch

    if torch.cuda.is_available():  # torch's copy kernel as a second reference
        tsrc = [torch.from_numpy(w.view(np.int16)).cuda() for w in words]
        tdst = [torch.empty_like(x) for x in tsrc]
        t = timed_events(lambda: [d.copy_(x) for x, d in zip(tsrc, tdst)], repeats)
        row["copy_torch"] = {"gbps_min": out_bytes / min(t) / 1e9, "gbps_median": out_bytes / statistics.median(t) / 1e9}
        del tsrc, tdst

    outs = [cuda.device_array(w.size, dtype=np.uint16) for w in words]
    row["configs"] = []
    for staged, configs in ((False, PLAIN), (True, STAGED)):
        for sub, threads in configs:
            t0 = time.perf_counter()
            decs = [G.CudaDecoder(p, sub=sub, threads=threads, where=name, staged=staged) for p in plans]
            cuda.synchronize()
            index_s = time.perf_counter() - t0
            for d, o in zip(decs, outs):
                d.decode(o)
            exact = all(np.array_equal(o.copy_to_host(), w) for o, w in zip(outs, words))

            def decode_all() -> None:
                for d, o in zip(decs, outs):
                    d.decode(o)

            t = timed_events(decode_all, repeats)
            cfg = {"staged": staged and all(d.staged for d in decs), "sub": sub, "threads": threads,
                   "bit_exact": exact, "index_build_s": index_s,
                   "index_bits_per_weight": 8 * sum(d.sub_pos.nbytes for d in decs) / n, "min_s": min(t), "median_s": statistics.median(t),
                   "gbps_min": out_bytes / min(t) / 1e9, "gbps_median": out_bytes / statistics.median(t) / 1e9}
            cfg["vs_copy_min"] = cfg["gbps_min"] / max(row["copy"]["gbps_min"],
                                                        row.get("copy_torch", {}).get("gbps_min", 0.0))
            row["configs"].append(cfg)
            print(f"  {name}: {'staged' if cfg['staged'] else 'plain '} sub={sub:<3} threads={threads:<3} "
                  f"{cfg['gbps_min']:7.1f} GB/s min, {cfg['gbps_median']:7.1f} median, exact={exact}", flush=True)
            del decs

    import numba

    cpu_out = [np.empty(w.size, np.uint16) for w in words]
    cpu_t = []
    for _ in range(cpu_repeats + 1):
        t0 = time.perf_counter()
        for p, o in zip(plans, cpu_out):
            C.decode_plan(p, o)
        cpu_t.append(time.perf_counter() - t0)
    cpu_t = cpu_t[1:]
    row["cpu"] = {"threads": numba.get_num_threads(), "gbps_min": out_bytes / min(cpu_t) / 1e9,
                  "gbps_median": out_bytes / statistics.median(cpu_t) / 1e9,
                  "bit_exact": all(np.array_equal(o, w) for o, w in zip(cpu_out, words))}
    return row


def _timed_forward(mods: list, xs: list, device: str) -> float:
    """Seconds of one forward of every module (CUDA events on a GPU)."""
    import torch

    if device != "cuda":
        t0 = time.perf_counter()
        for m, x in zip(mods, xs):
            m(x)
        return time.perf_counter() - t0
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for m, x in zip(mods, xs):
        m(x)
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / 1e3


def module_check(words: list[np.ndarray], config: dict, repeats: int, device: str = "cuda") -> dict:
    """The model path on the GPU: each tensor as a ``LosslessLinear`` against the plain ``nn.Linear``, at batch
    1 and 64 tokens, one forward of every layer back to back, with ``config`` as the decoder's launch
    configuration. Two paths: ``lossless`` decodes the weight and calls ``F.linear`` (``fused_max_rows = 0``;
    outputs must be bit-identical to ``nn.Linear``) and ``fused`` runs the fused decode + matmul kernel (one
    thread block per row in shared memory; its output must equal the CPU fused kernel's, which equals
    ``entropy.linear_reference``, checked on the first layer)."""
    import torch

    from modelpress.kernels import entropy_cpu as C

    from modelpress.codecs.lossless import LosslessLinear, encode_tensor
    from modelpress.kernels import entropy_cuda as G

    G.DEFAULTS.update(sub=config["sub"], threads=config["threads"], staged=config["staged"])
    plain, packed = [], []
    for w in words:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        lin.weight.data = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
        enc, _ = encode_tensor(lin.weight.data)
        packed.append(LosslessLinear.from_linear(lin, enc).to(device))
        plain.append(lin.to(device))
    out: dict = {"config": config}

    def fused(on: bool) -> None:
        for m in packed:
            m.fused_max_rows = 256 if on else 0

    for tokens in (1, 64):
        xs = [torch.randn(tokens, m.in_features, device=device, dtype=torch.bfloat16) for m in plain]
        with torch.no_grad():
            fused(False)
            out[f"identical_{tokens}"] = all(torch.equal(a(x), b(x)) for a, b, x in zip(plain, packed, xs))
            fused(True)
            m0 = packed[0]
            cpu = C.fused_linear(m0.plan(), xs[0].float().cpu().numpy())
            out[f"fused_equals_cpu_{tokens}"] = bool(torch.equal(
                m0(xs[0]).cpu(), torch.from_numpy(cpu).to(torch.bfloat16))) if m0._fused_ok(xs[0], tokens) else None
            for name, mods, on in (("linear", plain, False), ("lossless", packed, False), ("fused", packed, True)):
                fused(on)
                t = []
                for _ in range(repeats + 1):
                    t.append(_timed_forward(mods, xs, device))
                out[f"{name}_{tokens}_ms_min"] = 1e3 * min(t[1:])
                out[f"{name}_{tokens}_ms_median"] = 1e3 * statistics.median(t[1:])
    print("  module check:", out, flush=True)
    return out


def markdown(result: dict) -> str:
    lines = [f"GPU: {result['gpu']}; numba {result['numba']}, torch {result['torch']}; "
             f"{result['repeats']} timed repeats (CUDA events), GB/s of bf16 output.", ""]
    for row in result["sets"]:
        c = row["copy"]
        lines += [f"**{row['set']}**: {row['tensors']} tensors, {row['weights'] / 1e6:.1f}M weights, "
                  f"{row['bits_per_weight']:.3f} bits/weight; device copy of the same bf16 bytes "
                  f"{c['gbps_min']:.0f} GB/s (min time) / {c['gbps_median']:.0f} (median)"
                  + (f", torch's copy {row['copy_torch']['gbps_min']:.0f} / {row['copy_torch']['gbps_median']:.0f}"
                     if "copy_torch" in row else "") + "; numba CPU decode on "
                  f"{row['cpu']['threads']} cores {row['cpu']['gbps_min']:.2f} GB/s.", "",
                  "| kernel | sub-lane | threads | GB/s (min time) | GB/s (median) | vs copy | index bits/weight "
                  "(GPU memory) | index build s | exact |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in row["configs"]:
            lines.append(f"| {'staged' if k['staged'] else 'plain'} | {k['sub']} | {k['threads']} | "
                         f"{k['gbps_min']:.1f} | {k['gbps_median']:.1f} | {k['vs_copy_min']:.2f}x | "
                         f"{k['index_bits_per_weight']:.2f} | "
                         f"{k['index_build_s']:.3f} | {k['bit_exact']} |")
        lines.append("")
    m = result.get("module_check")
    if m:
        c = m["config"]
        lines += [f"**Model path** (the llama7b-block tensors as `LosslessLinear`, decoder {'staged' if c['staged'] else 'plain'} "
                  f"sub-lane {c['sub']} / {c['threads']} threads, all 7 layers' forwards back to back): outputs "
                  f"bit-identical to `nn.Linear` (decode + F.linear): {m['identical_1'] and m['identical_64']}; fused "
                  f"output equal to the CPU fused kernel (first layer): {m.get('fused_equals_cpu_1')} / "
                  f"{m.get('fused_equals_cpu_64')} (1 / 64 tokens).", "",
                  "| tokens | nn.Linear ms (min / median) | decode + F.linear ms (min / median) | ratio (min) | "
                  "fused ms (min / median) | ratio (min) |", "|---|---|---|---|---|---|"]
        for tok in (1, 64):
            a, b = m[f"linear_{tok}_ms_min"], m[f"lossless_{tok}_ms_min"]
            f = m.get(f"fused_{tok}_ms_min", float("nan"))
            lines.append(f"| {tok} | {a:.3f} / {m[f'linear_{tok}_ms_median']:.3f} | {b:.3f} / "
                         f"{m[f'lossless_{tok}_ms_median']:.3f} | {b / a:.2f}x | {f:.3f} / "
                         f"{m.get(f'fused_{tok}_ms_median', float('nan')):.3f} | {f / a:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-minilm", type=Path, help="write MiniLM's bf16 weights here and stop")
    ap.add_argument("--minilm", type=Path, help=".npz written by --export-minilm")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the Llama block's shapes (tests: 0.02)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cpu-repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="device of the model-path check (cpu: dry run)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.export_minilm:
        export_minilm(args.export_minilm)
        return
    import numba
    import torch
    from numba import cuda

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        gpu = "numba CUDA simulator (correctness only, timings meaningless)"
    else:
        gpu = cuda.get_current_device().name
        gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
    result = {"gpu": gpu, "numba": numba.__version__, "torch": torch.__version__, "host": platform.node(),
              "repeats": args.repeats, "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "sets": []}
    sets = []
    if args.minilm:
        sets.append(("minilm", load_minilm(args.minilm)))
    sets.append(("llama7b-block" if args.scale == 1.0 else f"llama7b-block x{args.scale}",
                 synthetic_block(args.scale, seed=0)))
    for name, words in sets:
        print(f"{name}: {len(words)} tensors, {sum(w.size for w in words) / 1e6:.1f}M weights", flush=True)
        result["sets"].append(bench_set(name, words, args.repeats, args.cpu_repeats))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lossless_cuda.json").write_text(json.dumps(result, indent=1))
    block = result["sets"][-1]
    if not result["simulator"]:
        best = max((c for c in block["configs"] if c["bit_exact"]), key=lambda c: c["gbps_min"])
        result["module_check"] = module_check(sets[-1][1], best, args.repeats, args.device)
        (args.out / "lossless_cuda.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "lossless_cuda.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
