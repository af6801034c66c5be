"""Stacking benchmark: every quantized or delta pass on the zoo, without and with lossless coding on top.

For each zoo model and each pass that stores integer codes or a delta, the pass runs once (the recipe's
settings, one seed); its result is saved as an artifact, then the ``dfloat11`` pass runs on that result (what
``passes: [<pass>, {type: dfloat11}]`` does: the first pass's output is identical) and is saved too. The
table gives, per row:

* artifact bytes (``model.safetensors``) without and with lossless coding, and the saving;
* the integer codes: how many, their packed bytes in bits per code, our coded bits per code on disk (side data
  included), the order-0 entropy of the codes (the bound of any code-by-code coder), and zstd-19 / ZipNN on
  the *same packed bytes* (ZipNN takes them as uint32 words: it has no 8-bit integer mode);
* for delta passes, what else the artifact stores (BitDelta's sign bits: their byte entropy says why they are
  left raw);
* load time (``load_artifact``, median of 3, base given) of both artifacts, and whether the two models'
  outputs are bit-identical on a probe batch; accuracy (minilm-docs) / FD (digits-ddpm) of both.

Usage::

    python benchmarks/stacking.py                        # all sections -> benchmarks/results/stacking.md
    python benchmarks/stacking.py --sections codes       # minilm-docs RTN int4 / int8 codes only
    python benchmarks/stacking.py --sections deltas digits --fd-samples 500
    python benchmarks/stacking.py --merge stacking-codes stacking-deltas   # combine runs made with --out
    python benchmarks/stacking.py --sections digits --only tfmq --calibration-samples 32 --recon-iters 10 \
        --fd-samples 100 --keep-first runs/stacking-first   # scaled down for a loaded machine, first pass kept

Sections: ``codes`` (minilm-docs: the shared packed format through EvoPress's uniform RTN levels, int4 / int8
per channel and int4 in groups of 128), ``deltas`` (minilm-docs over minilm: bitdelta, delta_come, dare,
darex with their recipes' settings), ``digits`` (digits-ddpm: ptq W8A8 and W4A8 min-max, tfmq W4A8 with
recipes/tfmq_w4a8.yaml's settings).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modelpress  # noqa: E402
from modelpress.artifact import WEIGHTS, load_artifact  # noqa: E402
from modelpress.kernels import entropy as E  # noqa: E402
from modelpress.metrics import EvalContext  # noqa: E402
from modelpress.metrics import evaluate as run_metric  # noqa: E402
from modelpress.model import ModelHandle, example_inputs  # noqa: E402
from modelpress.quant.coded import SUFFIX as E_SUFFIX  # noqa: E402
from modelpress.quant.coded import EntropyCodedCodes, code_histogram, group_codes  # noqa: E402
from modelpress.kernels.bitpack import unpack_codes  # noqa: E402
from modelpress.recipe import load_recipe  # noqa: E402
from modelpress.sources import load_model  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
#: the codes of GPTQ's grid rounded to nearest (RTN), per channel or in groups, stored in the shared packed
#: format (PackedLinear, what GPTQ / RTN / EvoPress's bit levels store): (bits, group size, symmetric)
CODE_RUNS = {"int4 per channel (RTN, sym)": (4, 0, True), "int8 per channel (RTN, sym)": (8, 0, True),
             "int4 groups of 128 (RTN, sym)": (4, 128, True)}


def recipe_passes(name: str) -> list[dict[str, Any]]:
    """The passes of ``recipes/<name>.yaml`` as the recipe gives them."""
    return load_recipe(ROOT / "recipes" / f"{name}.yaml").raw["passes"]


# ---------------------------------------------------------------------------------------------------
# Measurements

def code_streams(handle: ModelHandle) -> list[tuple[torch.Tensor, int, int]]:
    """``(packed stream, bits, codes)`` of every integer code stream the model's compressed modules hold."""
    out = []
    for m in handle.module.modules():
        if isinstance(m, EntropyCodedCodes):
            out += [(getattr(m, name), bits, n) for name, (bits, n) in m.code_buffers().items()]
    return out


def peer_bits(data: bytes, n_codes: int) -> dict[str, str]:
    """zstd-19 and ZipNN (uint32 words, byte grouping + Huffman) on ``data``, in bits per code."""
    import zstandard

    out = {"zstd-19": f"{len(zstandard.ZstdCompressor(level=19).compress(data)) * 8 / n_codes:.3f}"}
    try:
        from zipnn import ZipNN

        padded = data + bytes(-len(data) % 4)
        z = ZipNN(bytearray_dtype="uint32", input_format="byte", threads=1)
        out["zipnn"] = f"{len(z.compress(bytearray(padded))) * 8 / n_codes:.3f}"
    except Exception as exc:  # noqa: BLE001 - report what the peer could not do
        out["zipnn"] = f"n/a ({type(exc).__name__})"
    return out


def codes_summary(handle: ModelHandle) -> dict[str, Any]:
    """Bits per code packed, the order-0 entropy of the codes (per stream, weighted), and the peers."""
    streams = code_streams(handle)
    n = sum(c for _, _, c in streams)
    if not n:
        return {"codes": 0}
    entropy = sum(E.order0_entropy_bits(code_histogram(unpack_codes(p.detach().cpu().numpy(), b, c))) * c
                  for p, b, c in streams) / n
    packed = b"".join(p.detach().cpu().numpy().tobytes() for p, _, _ in streams)
    return {"codes": n, "packed_bits": f"{len(packed) * 8 / n:.3f}", "entropy_bits": f"{entropy:.3f}",
            **peer_bits(packed, n)}


def sign_summary(handle: ModelHandle) -> dict[str, Any]:
    """BitDelta's packed sign bits: bytes and the order-0 entropy of their bytes (8 signs per symbol)."""
    signs = [m.signs for m in handle.module.modules() if hasattr(m, "signs") and isinstance(m.signs, torch.Tensor)]
    if not signs:
        return {}
    data = np.concatenate([s.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1) for s in signs])
    return {"sign_bytes": int(data.size),
            "sign_byte_entropy_bits": round(E.order0_entropy_bits(np.bincount(data, minlength=256)), 4)}


def codes_per_symbol(log: dict[str, Any]) -> str:
    """How the coded streams were coded: ``"1: 3, 2: 10"`` = 3 streams as single codes, 10 as pairs."""
    counts: dict[int, int] = {}
    for per in log.get("per_module", {}).get("codes", {}).values():
        for s in per.values():
            if s["coded"]:
                counts[s["codes_per_symbol"]] = counts.get(s["codes_per_symbol"], 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "-"


def load_seconds(directory: Path, base: ModelHandle | None, repeats: int = 3) -> tuple[float, ModelHandle]:
    times, handle = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        handle = load_artifact(directory, base=base)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), handle


def probe_equal(a: ModelHandle, b: ModelHandle) -> bool:
    x = example_inputs(a, batch=4, seq_len=32, seed=1)
    with torch.no_grad():
        return bool(torch.equal(a.canonical()(*x), b.canonical()(*x)))


def metric(handle: ModelHandle, name: str, samples: int | None) -> float:
    ctx = EvalContext(seed=0, samples=samples, show_progress=False)
    return float(run_metric(handle.canonical(), handle, [name], ctx)[name].value)


def rtn_packed(model: str, bits: int, group_size: int, sym: bool) -> ModelHandle:
    """``model`` with every linear layer of its encoder replaced by a :class:`PackedLinear` of its RTN codes."""
    from modelpress.modules import set_submodule
    from modelpress.quant.gptq import rtn_quantize
    from modelpress.quant.packed import packed_from_result

    handle = load_model(model)
    for name, m in list(handle.module.named_modules()):
        if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}":
            set_submodule(handle.module, name, packed_from_result(rtn_quantize(m.weight.detach(), bits, group_size,
                                                                                sym), m, sym))
    return handle


def first_pass(model: str | ModelHandle, passes: list[dict[str, Any]], base_h: ModelHandle | None,
               calibration: dict | None, out: Path, keep: Path | None) -> tuple[ModelHandle, float]:
    """Run ``passes`` and save the artifact to ``out``; returns the compressed model and the pass's seconds.
    With ``keep``, the artifact is also kept there, and when ``keep`` already holds one (from an earlier run of
    the same row) it is loaded instead of running the passes again (seconds: those of the run that made it)."""
    import shutil

    if keep is not None and (keep / WEIGHTS).exists():
        shutil.copytree(keep, out)
        return load_artifact(out, base=base_h), json.loads((keep / "first_pass.json").read_text())["pass seconds"]
    t0 = time.perf_counter()
    one = modelpress.compress(model, passes, base=base_h, calibration=calibration, keep_reference=False)
    seconds = round(time.perf_counter() - t0, 1)
    one.save(out)
    (out / "first_pass.json").write_text(json.dumps({"pass seconds": seconds}))
    if keep is not None:
        shutil.copytree(out, keep, dirs_exist_ok=True)
    return one.handle, seconds


def byte_breakdown(directory: Path, handle: ModelHandle) -> dict[str, dict[str, Any]]:
    """Where the bytes of the artifact at ``directory`` are, per kind of tensor (``handle``: the model it
    loads to, for the code streams' widths), with the order-0 bound of each kind: integer codes at the order-0
    entropy of the codes (and of pairs of codes, per code), float tensors at the exponent bound of the float
    codec (exponent entropy + the other bits raw), integer side data at the entropy of its bytes, the
    safetensors header (tensor names, shapes, offsets as JSON) as it is."""
    from safetensors import safe_open

    widths = {f"{p}.{name}" if p else name: (bits, n) for p, m in handle.module.named_modules()
              if isinstance(m, EntropyCodedCodes) for name, (bits, n) in m.code_buffers().items()}
    kinds: dict[str, dict[str, Any]] = {}

    def add(kind: str, nbytes: int, bound: float, pair_bound: float | None = None) -> None:
        k = kinds.setdefault(kind, {"tensors": 0, "bytes": 0, "bound": 0.0, "pair bound": 0.0})
        k["tensors"] += 1
        k["bytes"] += nbytes
        k["bound"] += bound
        k["pair bound"] += bound if pair_bound is None else pair_bound

    with safe_open(str(directory / WEIGHTS), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key).contiguous()
            stream = key.split(E_SUFFIX)[0] if E_SUFFIX in key else key
            if ".df11_" in f".{key}":  # a float weight the lossless pass coded
                add("float weights (coded)", t.numel() * t.element_size(), 0.0)
            elif stream in widths:
                bits, n = widths[stream]
                if E_SUFFIX in key and not key.endswith(E_SUFFIX + "stream"):
                    add("integer codes: encodings' side data", t.numel() * t.element_size(), 0.0)
                    continue
                codes = unpack_codes(handle.module.get_buffer(stream).cpu().numpy(), bits, n)
                h1 = E.order0_entropy_bits(code_histogram(codes)) * n / 8
                h2 = E.order0_entropy_bits(np.bincount(group_codes(codes, bits, 2), minlength=256)) * -(-n // 2) / 8 \
                    if 2 * bits <= 8 else h1
                add(f"integer codes ({'coded' if E_SUFFIX in key else 'packed'})", t.numel() * t.element_size(),
                    h1, h2)
            elif t.is_floating_point() and str(t.dtype)[6:] in E.DTYPES:
                words = t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().reshape(-1)
                words = words.view(E.WORD_DTYPE[t.element_size() * 8])
                leaf = key.rsplit(".", 1)[-1]
                add(f"float {leaf}" if leaf in ("bias", "weight", "w_scale") else "float other",
                    t.numel() * t.element_size(), E.exponent_entropy_bits(words, str(t.dtype)[6:]) * t.numel() / 8)
            else:
                b = t.view(torch.uint8).numpy().reshape(-1)
                add(f"{'float' if t.is_floating_point() else 'integer'} side data ({key.rsplit('.', 1)[-1]})",
                    b.size, E.order0_entropy_bits(np.bincount(b, minlength=256)) * b.size / 8)
    data = sum(k["bytes"] for k in kinds.values())
    header = (directory / WEIGHTS).stat().st_size - data
    kinds["safetensors header"] = {"tensors": 0, "bytes": header, "bound": header, "pair bound": header}
    return {k: {**v, "bound": round(v["bound"]), "pair bound": round(v["pair bound"])} for k, v in kinds.items()}


def stack_row(model: str | ModelHandle, label: str, passes: list[dict[str, Any]], work: Path, base: str | None,
              metric_name: str | None, samples: int | None, calibration: dict | None = None,
              keep: Path | None = None, name: str | None = None) -> dict[str, Any]:
    """Run ``passes`` (or reuse the artifact kept in ``keep``, :func:`first_pass`), save; run dfloat11 on the
    result, save; measure both (see the module docstring)."""
    base_h = load_model(base) if base else None
    one_handle, seconds = first_pass(model, passes, base_h, calibration, work / "one", keep)
    model = name or (model if isinstance(model, str) else model.source)
    codes = codes_summary(one_handle)
    signs = sign_summary(one_handle)
    two = modelpress.compress(one_handle.copy(), [{"type": "dfloat11"}], base=base_h, keep_reference=False)
    log = two.log["dfloat11"]
    two.save(work / "two")
    sizes = [(work / d / WEIGHTS).stat().st_size for d in ("one", "two")]
    load_one, h_one = load_seconds(work / "one", base_h)
    load_two, h_two = load_seconds(work / "two", base_h)
    row = {"model": model, "pass": label, "pass seconds": seconds,
           "artifact bytes": sizes[0], "with lossless": sizes[1],
           "saving": f"{100 * (1 - sizes[1] / sizes[0]):.1f}%",
           "codes": codes.get("codes", 0), "packed bits/code": codes.get("packed_bits", "-"),
           "coded bits/code": f"{log['bits_per_code']:.3f}" if log.get("bits_per_code") else "-",
           "entropy bits/code": codes.get("entropy_bits", "-"),
           "zstd-19 bits/code": codes.get("zstd-19", "-"), "zipnn bits/code": codes.get("zipnn", "-"),
           "streams coded": f"{log['integer_streams_coded']}/{log['integer_streams']}",
           "float weights coded": log["float_modules_coded"],
           "load s": round(load_one, 3), "load s (lossless)": round(load_two, 3),
           "outputs identical": probe_equal(h_one, h_two) and probe_equal(one_handle, h_two),
           "codes per symbol": codes_per_symbol(log),
           "warnings": log.get("warnings", []), **signs,
           "breakdown": {"without": byte_breakdown(work / "one", h_one), "with": byte_breakdown(work / "two", h_two)}}
    if metric_name:
        row[metric_name] = round(metric(h_one, metric_name, samples), 4)
        row[f"{metric_name} (lossless)"] = round(metric(h_two, metric_name, samples), 4)
    return row


# ---------------------------------------------------------------------------------------------------
# Sections

def section_codes(work: Path, model: str = "minilm-docs") -> list[tuple[str, Any]]:
    return [(label, lambda i=i, cfg=cfg, label=label: stack_row(rtn_packed(model, *cfg), label, [],
                                                                work / f"codes{i}", None, None, None, name=model))
            for i, (label, cfg) in enumerate(CODE_RUNS.items())]


def section_deltas(work: Path) -> list[tuple[str, Any]]:
    runs = {"bitdelta steps 0 (no distillation)": ("minilm-docs", [{"type": "bitdelta", "steps": 0}]),
            "delta_come (recipes/delta_come.yaml)": ("minilm-docs", recipe_passes("delta_come")),
            "dare p=0.9": ("minilm-docs", [{"type": "dare", "p": 0.9}]),
            "darex p=0.99 analytic q": ("minilm-docs-large", [{"type": "darex", "p": 0.99, "q_mode": "analytic",
                                                                "samples": 32}])}
    return [(label, lambda i=i, model=model, passes=passes, label=label: stack_row(
        model, label, passes, work / f"delta{i}", "minilm", "accuracy", None))
        for i, (label, (model, passes)) in enumerate(runs.items())]


def section_digits(work: Path, fd_samples: int, keep: Path | None, cal_samples: int | None = None,
                   recon_iters: int | None = None) -> list[tuple[str, Any]]:
    """digits-ddpm rows; ``cal_samples`` / ``recon_iters`` scale the calibration down (named in the labels)."""
    cal = {"samples": cal_samples or 256, "batch_size": 64}
    tfmq = [dict(p, **({"recon_iters": recon_iters} if recon_iters is not None else {}))
            for p in recipe_passes("tfmq_w4a8")]
    scaled = "".join([f", calibration {cal_samples} samples" if cal_samples else "",
                      f", recon_iters {recon_iters}" if recon_iters is not None else ""])
    cal_note = f" (calibration {cal_samples} samples)" if cal_samples else ""
    runs = {f"tfmq W4A8 (recipes/tfmq_w4a8.yaml{scaled})": tfmq,
            f"ptq W4A8 min-max{cal_note}": [{"type": "ptq", "w_bits": 4, "a_bits": 8, "steps": 25}],
            f"ptq W8A8 min-max{cal_note}": [{"type": "ptq", "w_bits": 8, "a_bits": 8, "steps": 25}]}
    return [(label, lambda i=i, passes=passes, label=label: stack_row(
        "digits-ddpm", label, passes, work / f"digits{i}", None, "fd" if fd_samples else None, fd_samples, cal,
        keep / f"digits{i}" if keep else None))
        for i, (label, passes) in enumerate(runs.items())]


COLUMNS = ["model", "pass", "artifact bytes", "with lossless", "saving", "codes", "packed bits/code",
           "coded bits/code", "entropy bits/code", "zstd-19 bits/code", "zipnn bits/code", "streams coded",
           "codes per symbol", "float weights coded", "load s", "load s (lossless)", "outputs identical"]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:,}" if isinstance(r.get(c), int) and not isinstance(r.get(c), bool)
                                        else str(r.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", nargs="+", default=["codes", "deltas", "digits"],
                    choices=["codes", "deltas", "digits"])
    ap.add_argument("--fd-samples", type=int, default=500, help="0: no FD")
    ap.add_argument("--only", nargs="+", default=[], metavar="LABEL",
                    help="run only the rows whose label starts with one of these (e.g. 'ptq W4A8')")
    ap.add_argument("--codes-model", default="minilm-docs",
                    help="codes: the zoo model whose encoder is quantized (default minilm-docs)")
    ap.add_argument("--calibration-samples", type=int, default=None,
                    help="digits: calibration samples (default 256, the recipe's); named in the row labels")
    ap.add_argument("--recon-iters", type=int, default=None,
                    help="digits: TFMQ's AdaRound iterations per block (default: the recipe's 200)")
    ap.add_argument("--out", default="stacking")
    ap.add_argument("--keep-first", type=Path, default=None, metavar="DIR",
                    help="keep every row's first-pass artifact in DIR/<row> and reuse one found there instead of "
                         "running the pass again (its seconds are those of the run that made it)")
    ap.add_argument("--merge", nargs="+", default=[], metavar="STEM",
                    help="run nothing: merge the results of earlier runs (--out STEM, e.g. sections run in "
                         "parallel) into --out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows: dict[str, list[dict[str, Any]]] = {}
    for stem in args.merge:
        rows.update(json.loads((OUT / f"{stem}.json").read_text()))
    write(rows, args.out)
    with tempfile.TemporaryDirectory(prefix="stacking-") as tmp:
        work = Path(tmp)
        for s in [] if args.merge else args.sections:
            runs = (section_codes(work, args.codes_model) if s == "codes" else section_deltas(work) if s == "deltas"
                    else section_digits(work, args.fd_samples, args.keep_first, args.calibration_samples,
                                        args.recon_iters))
            rows[s] = []
            runs = [(label, run) for label, run in runs if not args.only or label.startswith(tuple(args.only))]
            for label, run in runs:  # results written after every row: a long section keeps what it finished
                t0 = time.perf_counter()
                rows[s].append(run())
                print(f"{s} / {label}: {time.perf_counter() - t0:.0f} s", flush=True)
                write(rows, args.out)
            print(table(rows[s], COLUMNS), flush=True)


def breakdown_table(b: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Bytes per kind of tensor without and with lossless coding, and the order-0 bounds (single codes; pairs)."""
    lines = ["| kind | tensors | bytes | with lossless | order-0 bound | order-0 bound, pairs of codes |",
             "|---|---|---|---|---|---|"]
    kinds = list(dict.fromkeys([*b["without"], *b["with"]]))
    tot = {w: sum(v["bytes"] for v in b[w].values()) for w in ("without", "with")}
    bound = {c: sum(v[c] for v in b["without"].values()) for c in ("bound", "pair bound")}
    for k in kinds:
        a, c = b["without"].get(k), b["with"].get(k)
        lines.append(f"| {k} | {(a or c)['tensors']} | {a['bytes'] if a else 0:,} | {c['bytes'] if c else 0:,} | "
                     f"{a['bound'] if a else 0:,} | {a['pair bound'] if a else 0:,} |")
    lines.append(f"| **total** | | {tot['without']:,} | {tot['with']:,} ({100 * (1 - tot['with'] / tot['without']):.1f}% "
                 f"smaller) | {bound['bound']:,} ({100 * (1 - bound['bound'] / tot['without']):.1f}% smaller) | "
                 f"{bound['pair bound']:,} ({100 * (1 - bound['pair bound'] / tot['without']):.1f}% smaller) |")
    return "\n".join(lines)


def write(rows: dict[str, list[dict[str, Any]]], out: str) -> None:
    """Merge ``rows`` into ``benchmarks/results/<out>.json`` and render ``<out>.md`` from it."""
    json_path = OUT / f"{out}.json"
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    old.update(rows)
    json_path.write_text(json.dumps(old, indent=1))
    md = ["# Stacking: lossless coding on top of each quantized / delta pass\n",
          f"`python benchmarks/stacking.py --sections {' '.join(sorted(old))}` (2 shared CPU cores, seed 0, one run "
          "each). Bytes are `model.safetensors`; bits per code include every byte the encoding stores; "
          "zstd-19 and ZipNN compress the same packed code bytes. Load time: median of 3 `load_artifact` calls.\n"]
    for s in ("codes", "deltas", "digits"):
        if s in old:
            extra = {"deltas": ["accuracy", "accuracy (lossless)", "sign_bytes", "sign_byte_entropy_bits"],
                     "digits": ["fd", "fd (lossless)"]}.get(s, [])
            md += [f"## {s}\n", table(old[s], COLUMNS + extra), ""]
            for r in old[s]:
                for w in r.get("warnings", []):
                    md.append(f"- {r['model']} / {r['pass']}: dfloat11 {w}")
            md.append("")
            for r in old[s]:
                if "breakdown" in r:
                    md += [f"### {r['model']} / {r['pass']}: where the bytes are\n", breakdown_table(r["breakdown"]), ""]
    (OUT / f"{out}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
