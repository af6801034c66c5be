"""Causal-LM exports side by side: the zoo LM in torch, ONNX (with and without a KV cache, int8, int4) and .pte.

For ``pydocs-lm`` (bf16 checkpoint) and each export, in one process at one thread:

* bytes of the file (torch rows: the state dict in memory);
* perplexity on the model's own test split (``modelpress.metrics.causal``, windows of 128, the first
  ``--tokens`` tokens), run through the export's own runtime;
* greedy generation vs torch: ``--prompts`` prompts (the first 16 tokens of the first test documents) x
  ``--new-tokens`` tokens; tokens equal to torch fp32's (the weights the files hold; bf16 -> fp32 is exact) and
  to torch bf16's, and prompts whose whole continuation matches. The torch reference runs the whole sequence
  per token (no cache);
* generation speed: one prompt, ``--speed-tokens`` new tokens, timed in interleaved rounds (every model once
  per round, so load on a shared machine hits all alike): tokens/s best and median over ``--repeats``. Torch
  generates with transformers' ``generate`` (its KV cache), ONNX KV-cache graphs feed their cache back, the
  ``.pte`` static-cache program keeps its cache inside, the no-cache exports rerun the whole sequence per token;
* the canonical full-window call (8 x 128 tokens, what perplexity runs): latency min / median.

    python benchmarks/export_lm.py --repeats 5 --tag export_lm

Writes ``benchmarks/results/<tag>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from modelpress import zoo
from modelpress.data.inputs import tokenizer_for
from modelpress.exporters import ExportSpec, export_model, exported_info, load_exported
from modelpress.exporters.kv import greedy_tokens
from modelpress.metrics import EvalContext, evaluate
from modelpress.model import example_inputs, state_bytes
from modelpress.zoo.lm import area_texts

RESULTS = Path(__file__).resolve().parent / "results"

SPECS: list[dict[str, Any]] = [
    {"format": "onnx", "kv_cache": False},
    {"format": "onnx"},
    {"format": "onnx", "quantize": "int8"},
    {"format": "onnx", "quantize": "int4-weight", "block_size": 32},
    {"format": "onnx", "quantize": "int4-weight", "block_size": 128},
    {"format": "ort"},
    {"format": "pte"},
    {"format": "pte", "kv_cache": True},
]


def label(spec: ExportSpec, info: dict[str, Any]) -> str:
    parts = [spec.format, "kv" if info.get("kv_cache") else "no-kv"]
    if spec.quantize != "none":
        parts.append(spec.quantize + (f"-b{spec.block_size}" if "weight" in spec.quantize else ""))
    return "/".join(parts)


def prompts(handle: Any, n: int, length: int = 16) -> torch.Tensor:
    """The first ``length`` tokens of the first ``n`` test documents that have as many."""
    tok = tokenizer_for(handle)
    rows = []
    for text in area_texts("test"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    return torch.tensor(rows)


def hf_generate(module: torch.nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """transformers' greedy ``generate`` with its KV cache, not stopping at end-of-sequence (``min_new_tokens``
    would forbid that token instead, changing the continuation)."""
    module.generation_config.eos_token_id = None

    def run(prompt: torch.Tensor, n: int) -> torch.Tensor:
        with torch.no_grad():
            out = module.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
        return out[:, prompt.shape[1]:]
    return run


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    handle = zoo.load("pydocs-lm")
    fp32 = handle.replace_module(copy.deepcopy(handle.module).float())
    ctx = EvalContext(seed=0, samples=args.tokens, reference=handle, show_progress=False)
    batch = prompts(handle, args.prompts)
    want = {"fp32": greedy_tokens(fp32.canonical(), batch, args.new_tokens),
            "bf16": greedy_tokens(handle.canonical(), batch, args.new_tokens)}
    rows: list[dict[str, Any]] = []
    scorers: dict[str, Callable[..., torch.Tensor]] = {}
    generators: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {}
    for key, h in (("torch bf16", handle), ("torch fp32", fp32)):
        module = copy.deepcopy(h.module)
        scorers[key] = h.canonical()
        generators[key] = hf_generate(module)
        rows.append({"export": key, "size_bytes": state_bytes(module), "quantization": "-"})
    for raw in SPECS:
        spec = ExportSpec(**raw)
        t0 = time.perf_counter()
        path = export_model(handle, spec, out_dir)
        info = exported_info(path)
        rt = load_exported(path, handle, threads=1)
        key = label(spec, info)
        scorers[key] = rt
        generators[key] = rt.generate if hasattr(rt, "generate") else (lambda p, n, rt=rt: greedy_tokens(rt, p, n))
        rows.append({"export": key, "file": path.name, "size_bytes": path.stat().st_size,
                     "export_seconds": round(time.perf_counter() - t0, 1),
                     "quantization": info.get("quantization", "none")})
        print(f"{key}: {path.stat().st_size:,} bytes, {rows[-1]['export_seconds']} s", flush=True)
    for row in rows:
        key = row["export"]
        row["perplexity"] = evaluate(scorers[key], handle, ["perplexity"], ctx)["perplexity"].value
        got = generators[key](batch, args.new_tokens)
        for ref, tokens in want.items():
            row[f"tokens_match_{ref}"] = int((got == tokens).sum())
            row[f"prompts_match_{ref}"] = int((got == tokens).all(dim=1).sum())
        print(f"{key}: perplexity {row['perplexity']:.4f}, greedy = fp32 on {row['tokens_match_fp32']} / "
              f"{got.numel()} tokens", flush=True)
    one = batch[:1]
    speed = interleaved({k: (lambda g=g: g(one, args.speed_tokens)) for k, g in generators.items()}, args.repeats)
    window = example_inputs(handle, batch=8, seq_len=128, seed=7)
    with torch.no_grad():
        score = interleaved({k: (lambda s=s: s(*window)) for k, s in scorers.items()}, args.repeats)
    for row in rows:
        t = speed[row["export"]]
        row["tokens_per_s_min"] = args.speed_tokens / max(t)  # the slowest round
        row["tokens_per_s_median"] = args.speed_tokens / statistics.median(t)
        row["tokens_per_s_best"] = args.speed_tokens / min(t)
        w = score[row["export"]]
        row["window_ms_min"], row["window_ms_median"] = 1000 * min(w), 1000 * statistics.median(w)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = next(r for r in rows if r["export"] == "onnx/no-kv")
    n = args.prompts * args.new_tokens
    lines = [f"# pydocs-lm exports: perplexity, greedy generation, bytes, speed (tag {args.tag})", "",
             f"1 thread everywhere; shared 2-core machine, interleaved rounds ({args.repeats}); perplexity on the "
             f"first {args.tokens} test tokens (windows of 128); greedy: {args.prompts} prompts x {args.new_tokens} "
             f"new tokens; speed: 1 prompt of 16 tokens + {args.speed_tokens} new tokens.", "",
             "| export | bytes | perplexity | greedy = torch fp32 (tokens, prompts) | greedy = torch bf16 | "
             "gen tokens/s best / median | vs onnx/no-kv (median) | window 8x128 ms min / median |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['export']}` | {r['size_bytes']:,} | {r['perplexity']:.4f} | "
                     f"{r['tokens_match_fp32']}/{n}, {r['prompts_match_fp32']}/{args.prompts} | "
                     f"{r['tokens_match_bf16']}/{n}, {r['prompts_match_bf16']}/{args.prompts} | "
                     f"{r['tokens_per_s_best']:.0f} / {r['tokens_per_s_median']:.0f} | "
                     f"{r['tokens_per_s_median'] / base['tokens_per_s_median']:.2f}x | "
                     f"{r['window_ms_min']:.1f} / {r['window_ms_median']:.1f} |")
    lines += ["", "Quantization per export:", ""]
    lines += [f"- `{r['export']}`: {r['quantization']}" for r in rows if r.get("file")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="test tokens for perplexity")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tag", default="export_lm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        rows = run(args, Path(d))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
