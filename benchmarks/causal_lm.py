"""Every LLM method on the zoo's causal LMs, side by side with the peers, in one run.

On ``pydocs-lm`` (1.0M-parameter Llama, bf16) and its fine-tunes ``pydocs-lm-net`` (large delta, 10.7% of the
weight norm) and ``pydocs-lm-conc`` (small delta, 0.84%), all through the Python API (``modelpress.compress``
with recipe-shaped pass configs, the configs of ``recipes/zoo-lm/``) and scored by the library's own metrics:

* **lossless**: ``dfloat11`` bits/weight (all side data) beside ZipNN and zstd-3 / zstd-19 on the same bf16
  weight matrices (the tied embedding once), the order-0 exponent bound, bytes of the artifact's
  ``model.safetensors`` on disk, and whether the logits equal the bf16 model's bit for bit;
* **deltas** (each fine-tune): BitDelta (alpha = mean |delta|, and with scale distillation), Delta-CoMe at
  1 bit/param (default groups, and groups scaled to the model's width), DARE p = 0.9 / 0.99, DAREx-q p = 0.99
  (unlabelled q), and what reverting the embedding to the base costs: delta bytes (linear layers, and all
  stored tensors) against the fp16 delta, perplexity on the fine-tune's own area test split against the
  fine-tune's, token KL / top-1 agreement against the fine-tune;
* **EvoPress** (``pydocs-lm``): bits at 3 on average (GPTQ levels 2..8) against uniform 3 bits and the DP
  baseline; sparsity 50% (SparseGPT levels) against uniform 50%; 1 of 4 blocks dropped against ShortGPT and
  DP;
* **quantization peers** (``pydocs-lm``, the 28 linear layers of the blocks; the tied embedding / head stays
  bf16 in every row): RTN and GPTQ int4 / int3 (group 128, packed; EvoPress' uniform level and the ``gptq``
  pass, block by block, sequential or not), bitsandbytes NF4 / int8 (``bnb`` pass),
  torchao int8 weight-only, and the EvoPress 3-bit mix; HQQ and optimum-quanto are not installed here;
* **multiple choice**: ``choice_accuracy`` of the three zoo LMs on ``pydocs-choice/test``.

Perplexity, token KL and top-1 agreement are the ``perplexity`` / ``token_kl`` / ``top1_agreement`` metrics
(windows of 128 tokens; ``--tokens`` first tokens of ``pydocs-10/test`` for the base-model rows, the whole area
test split for the delta rows). Evaluation is deterministic (fixed windows); the seeds cover what is random: the
calibration draw, DARE's masks, EvoPress' search. Each seeded row runs ``--seeds`` times: the tables give the
median and the best. Bytes on disk are exact.

    python benchmarks/causal_lm.py                 # everything, 3 seeds: benchmarks/results/causal_lm.{json,md}
    python benchmarks/causal_lm.py --quick         # 1 seed, fewer tokens / steps / generations (a smoke run)
    python benchmarks/causal_lm.py --sections lossless peers
    python benchmarks/causal_lm.py --sections evopress --seeds 0 --only "50% sparse: EvoPress" --out part-x
    python benchmarks/causal_lm.py --merge benchmarks/results/part-*.json --out causal_lm   # one table

Sections (and rows, ``--only``) can run in separate processes and be merged; ``--merge`` also takes the
``.rows.jsonl`` that every run appends each row to as it is measured (a run stopped early keeps its rows).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modelpress  # noqa: E402
from modelpress import zoo  # noqa: E402
from modelpress.codecs.delta import delta_size_report  # noqa: E402
from modelpress.metrics import EvalContext, evaluate  # noqa: E402
from modelpress.model import ModelHandle  # noqa: E402
from modelpress.sources import load_dataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECIPES = ROOT / "recipes" / "zoo-lm"
BASE = "pydocs-lm"
FINETUNES = {"pydocs-lm-net": "large", "pydocs-lm-conc": "small"}


# ---------------------------------------------------------------------------------------------------
# Scoring


def recipe_passes(name: str, **override: Any) -> list[dict]:
    """The passes of ``recipes/zoo-lm/<name>.yaml``, each updated with ``override``."""
    import yaml

    return [{**p, **override} for p in yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["passes"]]


def score(handle: ModelHandle, ref: ModelHandle, dataset: str, tokens: int | None) -> dict[str, float]:
    """perplexity, token KL and top-1 agreement against ``ref`` (the library's metrics)."""
    data = load_dataset(dataset)
    out = {}
    for metric in ("perplexity", "token_kl", "top1_agreement"):
        ctx = EvalContext(dataset=data, samples=tokens, reference=ref, show_progress=False,
                          options={"batch_size": 16})
        out[metric] = evaluate(handle.canonical(), handle, [metric], ctx)[metric].value
    return out


def artifact_bytes(result: modelpress.Compressed) -> int:
    """Bytes of the saved artifact's ``model.safetensors``."""
    with tempfile.TemporaryDirectory(prefix="causal-lm-bench-") as d:
        result.save(Path(d) / "a")
        return (Path(d) / "a" / "model.safetensors").stat().st_size


def checkpoint_bytes(name: str) -> int:
    from modelpress.zoo import lm

    return (lm.find(name) / "model.safetensors").stat().st_size


def run(label: str, model: str, passes: list[dict], seed: int, ref: ModelHandle, dataset: str,
        tokens: int | None, base: str | None = None, calibration: Any = None,
        sizes: Callable[[modelpress.Compressed], dict] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = modelpress.compress(model, passes, base=base, calibration=calibration, seed=seed, keep_reference=False)
    secs = time.perf_counter() - t0
    row = {"method": label, "seed": seed, "seconds": round(secs, 1), **score(res.handle, ref, dataset, tokens),
           "artifact_bytes": artifact_bytes(res)}
    if sizes is not None:
        row.update(sizes(res))
    row["log"] = {k: {kk: vv for kk, vv in v.items() if kk in LOG_KEYS} for k, v in res.log.items()}
    if ROW_LOG:  # every row as soon as it is measured (a long run that dies keeps what it measured)
        with open(ROW_LOG[0], "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    print(f"  {label:48s} seed={seed} ppl={row['perplexity']:.3f} kl={row['token_kl']:.4f} "
          f"top1={row['top1_agreement']:.4f} bytes={row['artifact_bytes']:,} ({secs:.0f} s)", flush=True)
    return row


ROW_LOG: list[Path] = []
LOG_KEYS = {"bits_per_weight", "exponent_bound_bits_per_weight", "coded_bytes", "dense_bytes", "level_map",
            "achieved_budget", "searched_layers_bytes", "searched_layers_fp16_bytes", "q", "search_seconds",
            "fitness_history", "final_loss", "initial_loss"}


def seeded(rows: list[dict], key: str, better: str = "min") -> tuple[float, float]:
    """(median, best) of ``key`` over a method's seeds."""
    vals = [r[key] for r in rows]
    return statistics.median(vals), (min(vals) if better == "min" else max(vals))


# ---------------------------------------------------------------------------------------------------
# Lossless


def lossless_section(args: argparse.Namespace) -> dict[str, Any]:
    import zstandard
    from zipnn import ZipNN

    from modelpress.codecs.lossless import tensor_words

    out: dict[str, Any] = {}
    for name in [BASE, *FINETUNES]:
        handle = zoo.load(name)
        seen, words = set(), []
        for m in handle.module.modules():  # the matrices dfloat11 codes; a tied head is the embedding: once
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and id(w) not in seen:
                seen.add(id(w))
                words.append(tensor_words(w.detach())[0].copy())
        n = sum(w.size for w in words)
        zipnn = ZipNN(bytearray_dtype="bfloat16", threads=1, input_format="byte")
        row: dict[str, Any] = {"model": name, "weights": n,
                               "zipnn": sum(len(zipnn.compress(bytearray(w.tobytes()))) for w in words) * 8 / n}
        for level in (3, 19):
            z = zstandard.ZstdCompressor(level=level)
            row[f"zstd-{level}"] = sum(len(z.compress(w.tobytes())) for w in words) * 8 / n
        for label, cfg in (("dfloat11", {}), ("dfloat11 k=0", {"mantissa_bits": 0})):
            res = modelpress.compress(name, recipe_passes("dfloat11", **cfg), keep_reference=False)
            log = res.log["dfloat11"]
            assert log["modules"] and sum(v["elements"] for v in log["per_module"].values()) == n, "not every matrix"
            row[label] = log["bits_per_weight"]
            row[f"{label} bound"] = log["exponent_bound_bits_per_weight"]
            row[f"{label} artifact_bytes"] = artifact_bytes(res)
            if label == "dfloat11":
                ids = torch.randint(0, 2048, (4, 128), generator=torch.Generator().manual_seed(0))
                mask = torch.ones_like(ids)
                with torch.no_grad():
                    row["logits_bit_identical"] = bool(torch.equal(res.handle.canonical()(ids, mask),
                                                                   handle.canonical()(ids, mask)))
        row["checkpoint_bytes"] = checkpoint_bytes(name)
        print(f"  {name}: dfloat11 {row['dfloat11']:.3f} (k=0 {row['dfloat11 k=0']:.3f}) zipnn {row['zipnn']:.3f} "
              f"zstd-19 {row['zstd-19']:.3f} bits/weight; bit-identical {row['logits_bit_identical']}", flush=True)
        out[name] = row
    return out


def lossless_md(res: dict[str, Any]) -> list[str]:
    lines = ["## Lossless: dfloat11 beside ZipNN and zstd (bf16 weight matrices, tied embedding once)", "",
             "| model | weights | order-0 bound | dfloat11 (k=2, default) | dfloat11 k=0 (DF11's symbol) | ZipNN | "
             "zstd-19 | zstd-3 | checkpoint bytes | dfloat11 artifact bytes | logits bit-identical |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res.values():
        lines.append(f"| {r['model']} | {r['weights']:,} | {r['dfloat11 k=0 bound']:.3f} | **{r['dfloat11']:.3f}** | "
                     f"{r['dfloat11 k=0']:.3f} | {r['zipnn']:.3f} | {r['zstd-19']:.3f} | {r['zstd-3']:.3f} | "
                     f"{r['checkpoint_bytes']:,} | {r['dfloat11 artifact_bytes']:,} | {r['logits_bit_identical']} |")
    lines += ["", "Bits per weight, all side data included (the bound: exponent entropy + the raw sign and "
              "mantissa bits). Artifact bytes: the whole `model.safetensors` (norms and the coded tables "
              "included).", ""]
    return lines


# ---------------------------------------------------------------------------------------------------
# Deltas


def delta_methods(args: argparse.Namespace) -> list[tuple[str, list[dict], bool]]:
    """(label, passes, seeded) of the delta rows (recipes/zoo-lm/). Every method keeps the fine-tune's (tied)
    embedding and norms, as BitDelta does by default on a causal LM, so that the rows differ only in how the
    28 linear deltas are stored (delta_come / dare / darex revert embeddings to the base by default: the last
    row shows what that costs)."""
    return [
        ("BitDelta, alpha = mean abs(delta), no distillation", recipe_passes("bitdelta", steps=0), False),
        (f"BitDelta + scale distillation ({args.steps} steps x 4 x 128 tokens)",
         recipe_passes("bitdelta", steps=args.steps), True),
        ("Delta-CoMe 1 bit/param (GPTQ)", recipe_passes("delta_come"), True),
        ("Delta-CoMe 1 bit/param, groups scaled to width 128 (3 bits: 1 vector, 2 bits: fill)",
         recipe_passes("delta_come", groups=[{"bits": 3, "count": 1}, {"bits": 2, "count": -1}]), True),
        ("DARE p=0.9", recipe_passes("dare"), True),
        ("DARE p=0.99", recipe_passes("dare", p=0.99), True),
        ("DAREx-q p=0.99 (unlabelled q)", recipe_passes("darex"), True),
        ("Delta-CoMe 1 bit/param, embeddings reverted to the base (its default)",
         recipe_passes("delta_come", embeddings="base"), True),
        ("BitDelta, no distillation, embeddings reverted to the base", recipe_passes("bitdelta", steps=0,
                                                                              embeddings="base"), False),
    ]


def delta_section(args: argparse.Namespace) -> dict[str, Any]:
    from modelpress.zoo.lm import delta_relative_norm

    base = zoo.load(BASE)
    out: dict[str, Any] = {}
    for ft_name, size in FINETUNES.items():
        ft = zoo.load(ft_name)
        test = zoo.get(ft_name).datasets["evaluation"]
        print(f"[{ft_name}] ({size} delta) on {test}", flush=True)
        rows = [{"method": "fine-tune (bf16)", "seed": None, **score(ft, ft, test, None)},
                {"method": "base (no delta)", "seed": None, **score(base, ft, test, None)}]
        if args.only:
            rows = []

        def sizes(res: modelpress.Compressed) -> dict[str, Any]:
            rep = delta_size_report(res.model, base.module)
            return {"delta_bytes": rep["total_bytes"], "fp16_delta_bytes": rep["total_fp16_bytes"],
                    "linear_delta_bytes": rep["linear_delta_bytes"], "linear_fp16_bytes": rep["linear_fp16_bytes"],
                    "linear_bits_per_param": 16 * rep["linear_delta_bytes"] / rep["linear_fp16_bytes"]}

        for label, passes, is_seeded in delta_methods(args):
            if args.only and args.only not in label:
                continue
            for seed in (args.seeds if is_seeded else args.seeds[:1]):
                rows.append(run(label, ft_name, passes, seed, ft, test, None, base=BASE, sizes=sizes))
        out[ft_name] = {"size": size, "dataset": test, "delta_relative_norm": delta_relative_norm(ft.module, base.module),
                        "rows": rows}
    return out


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    return groups


def _cell(rows: list[dict], key: str, fmt: str, better: str = "min") -> str:
    med, best = seeded(rows, key, better)
    return f"{med:{fmt}}" if len(rows) == 1 else f"{med:{fmt}} ({best:{fmt}})"


def delta_md(res: dict[str, Any]) -> list[str]:
    lines = ["## Delta compression on the two fine-tunes", ""]
    for ft_name, sec in res.items():
        ft_ppl = next((r["perplexity"] for r in sec["rows"] if r["method"] == "fine-tune (bf16)"), None)
        lines += [f"### {ft_name}: {sec['size']} delta (||delta|| / ||base|| = {sec['delta_relative_norm']:.4f}), "
                  f"scored on {sec['dataset']}", "",
                  "| method | seeds | perplexity: median (best) | vs fine-tune | token KL vs ft | top-1 agr. | "
                  "linear delta bits/param | linear delta vs fp16 | all stored delta bytes | vs fp16 delta | "
                  "artifact bytes | time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, rows in _group(sec["rows"]).items():
            med = seeded(rows, "perplexity")[0]
            if "delta_bytes" in rows[0]:
                r = rows[0]  # sizes do not depend on the seed
                size = (f"{r['linear_bits_per_param']:.3f} | {r['linear_fp16_bytes'] / r['linear_delta_bytes']:.1f}x | "
                        f"{r['delta_bytes']:,} | {r['fp16_delta_bytes'] / r['delta_bytes']:.1f}x | "
                        f"{r['artifact_bytes']:,} | {statistics.median(x['seconds'] for x in rows):.0f}")
            else:
                size = " | | | | | "
            lines.append(f"| {method} | {len(rows) if rows[0]['seed'] is not None else ''} | "
                         f"{_cell(rows, 'perplexity', '.3f')} | {f'{100 * (med / ft_ppl - 1):+.2f}%' if ft_ppl else ''} | "
                         f"{_cell(rows, 'token_kl', '.4f')} | {_cell(rows, 'top1_agreement', '.4f', 'max')} | {size} |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------
# EvoPress and the quantization peers


def evo(family: str, budget: float, strategy: str, args: argparse.Namespace, **extra: Any) -> list[dict]:
    """The ``recipes/zoo-lm/evopress_<family>.yaml`` pass at ``budget`` with ``strategy`` (the baselines
    ignore the search settings)."""
    return recipe_passes(f"evopress_{family}", budget=budget, strategy=strategy, generations=args.generations,
                         calibration_samples=args.pool, **extra)


def evopress_rows(args: argparse.Namespace) -> list[tuple[str, str, list[dict], bool]]:
    """(group, label, passes, seeded)."""
    return [
        ("3 bits", "uniform 3 bits (GPTQ int3 g128)", evo("bits", 3, "uniform", args), True),
        ("3 bits", "DP on summed per-layer KL (GPTQ levels)", evo("bits", 3, "dp", args), True),
        ("3 bits", "EvoPress (GPTQ levels 2..8)", evo("bits", 3, "evolution", args), True),
        ("50% sparse", "uniform 50% (SparseGPT)", evo("sparsity", 0.5, "uniform", args), True),
        ("50% sparse", "DP on summed per-layer KL (SparseGPT levels)", evo("sparsity", 0.5, "dp", args), True),
        ("50% sparse", "EvoPress (SparseGPT levels 0..90%)", evo("sparsity", 0.5, "evolution", args), True),
        ("1 of 4 blocks dropped", "ShortGPT block influence", evo("drop", 1, "cosine", args), True),
        ("1 of 4 blocks dropped", "DP on summed per-block KL", evo("drop", 1, "dp", args), True),
        ("1 of 4 blocks dropped", "EvoPress", evo("drop", 1, "evolution", args), True),
    ]


def peer_rows(args: argparse.Namespace) -> list[tuple[str, str, list[dict], bool]]:
    return [
        ("4 bits", "RTN int4 g128 (modelpress, packed)", evo("bits", 4, "uniform", args, method="rtn"), False),
        ("4 bits", "GPTQ int4 g128 (modelpress, packed)", evo("bits", 4, "uniform", args), True),
        ("4 bits", "GPTQ int4 g128 (type: gptq, sequential)", recipe_passes("gptq"), True),
        ("4 bits", "GPTQ int4 g128 (type: gptq, sequential: false)", recipe_passes("gptq", sequential=False), True),
        ("4 bits", "RTN int4 g128 (type: gptq, method: rtn)", recipe_passes("gptq", method="rtn"), False),
        ("4 bits", "bitsandbytes NF4 (block 64)", recipe_passes("bnb_nf4"), False),
        ("3 bits", "RTN int3 g128 (modelpress, packed)", evo("bits", 3, "uniform", args, method="rtn"), False),
        ("3 bits", "GPTQ int3 g128 (modelpress, packed)", evo("bits", 3, "uniform", args), True),
        ("3 bits", "GPTQ int3 g128 (type: gptq, sequential)", recipe_passes("gptq", bits=3), True),
        ("3 bits", "GPTQ int3 g128 (type: gptq, sequential: false)", recipe_passes("gptq", bits=3, sequential=False),
         True),
        ("8 bits", "bitsandbytes int8 (LLM.int8 row absmax)", recipe_passes("bnb_nf4", mode="int8"), False),
    ]


def torchao_int8(ref: ModelHandle, args: argparse.Namespace) -> dict[str, Any]:
    """torchao's int8 weight-only (``Int8WeightOnlyConfig``) on the same 28 linear layers; torchao's tensor
    subclass has no safetensors form, so its bytes are those of its tensors (int8 data, scales, zero points)
    plus the model's other tensors in bf16."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(ref.module)
    t0 = time.perf_counter()
    quantize_(m, Int8WeightOnlyConfig(), filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn != "lm_head")
    secs = time.perf_counter() - t0
    total, seen = 0, set()
    for t in m.state_dict().values():
        parts = [getattr(t, k) for k in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        for p in parts:
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    h = ref.replace_module(m)
    row = {"method": "torchao int8 weight-only", "seed": None, "seconds": round(secs, 1),
           **score(h, ref, "pydocs-10/test", args.tokens), "artifact_bytes": total,
           "bytes_note": "tensor bytes (no safetensors form)"}
    print(f"  torchao int8 weight-only ppl={row['perplexity']:.3f} bytes={total:,}", flush=True)
    return row


def base_sections(args: argparse.Namespace, which: set[str]) -> dict[str, Any]:
    ref = zoo.load(BASE)
    out: dict[str, Any] = {"reference": {"method": "bf16 pydocs-lm (reference)", "seed": None,
                                         **score(ref, ref, "pydocs-10/test", args.tokens),
                                         "artifact_bytes": checkpoint_bytes(BASE)}}
    for section, rows_of in (("evopress", evopress_rows), ("peers", peer_rows)):
        if section not in which:
            continue
        print(f"[{section}] on {BASE}", flush=True)
        rows = []
        for group, label, passes, is_seeded in rows_of(args):
            if args.only and args.only not in f"{group}: {label}":
                continue
            for seed in (args.seeds if is_seeded else args.seeds[:1]):
                r = run(label, BASE, passes, seed, ref, "pydocs-10/test", args.tokens)
                r["group"] = group
                rows.append(r)
        if section == "peers":
            tao = torchao_int8(ref, args)
            tao["group"] = "8 bits"
            rows.append(tao)
        out[section] = rows
    return out


def choice_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``choice_accuracy`` of the zoo LMs (uncompressed) on every pydocs-choice/test question."""
    rows = []
    for name in [BASE, *FINETUNES]:
        h = zoo.load(name)
        ctx = EvalContext(dataset=load_dataset("pydocs-choice/test"), show_progress=False, options={"batch_size": 64})
        res = evaluate(h.canonical(), h, ["choice_accuracy"], ctx)["choice_accuracy"]
        rows.append({"method": name, "choice_acc": res.value, "choice_acc_norm": res.details["acc_norm"],
                     "questions": res.details["questions"]})
        print(f"  {name}: choice acc {res.value:.3f} (acc_norm {res.details['acc_norm']:.3f})", flush=True)
    return rows


def choice_md(rows: list[dict[str, Any]]) -> list[str]:
    n = rows[0]["questions"]
    return ([f"## Multiple choice: pydocs-choice/test ({n} questions, 4 choices, chance 0.25)", "",
             "| model | acc | acc_norm |", "|---|---:|---:|"]
            + [f"| {r['method']} | {r['choice_acc']:.3f} | {r['choice_acc_norm']:.3f} |" for r in rows]
            + ["", f"Standard error about {100 * (0.3 * 0.7 / n) ** 0.5:.1f} points: the task tells a working model "
               "from chance, not compression methods apart (they are not scored on it).", ""])


def base_md(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    ref = res["reference"]
    lines = []
    for section, title in (("evopress", "EvoPress against its baselines on pydocs-lm"),
                           ("peers", "Quantization peers on pydocs-lm (the blocks' 28 linear layers; embedding / "
                                     "head bf16 everywhere)")):
        if section not in res:
            continue
        lines += [f"## {title}", "",
                  "| budget | method | seeds | perplexity: median (best) | token KL | top-1 agr. | bytes on disk | "
                  "time (s) |", "|---|---|---:|---:|---:|---:|---:|---:|",
                  f"| 16 bits | {ref['method']} | | {ref['perplexity']:.3f} | 0 | 1 | {ref['artifact_bytes']:,} | |"]
        section_rows = list(res[section])
        if section == "peers":  # EvoPress' mix at the same 3-bit average, from the EvoPress section
            section_rows += [r for r in res.get("evopress", []) if r["group"] == "3 bits" and "EvoPress" in r["method"]]
            section_rows.sort(key=lambda r: ["4 bits", "3 bits", "8 bits"].index(r["group"]))
        for method, rows in _group(section_rows).items():
            seeds = len(rows) if rows[0]["seed"] is not None else ""
            note = " (tensor bytes)" if rows[0].get("bytes_note") else ""
            lines.append(f"| {rows[0]['group']} | {method} | {seeds} | {_cell(rows, 'perplexity', '.3f')} | "
                         f"{_cell(rows, 'token_kl', '.4f')} | {_cell(rows, 'top1_agreement', '.4f', 'max')} | "
                         f"{rows[0]['artifact_bytes']:,}{note} | {statistics.median(r['seconds'] for r in rows):.0f} |")
        if section == "peers":
            lines.append("| 4 / 8 bits | HQQ, optimum-quanto int4 / int8 | | not installed on these machines "
                         "(not measured) | | | | |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------


def rows_part(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A result part from the ``.rows.jsonl`` of an EvoPress / peers run that was stopped before its end: the
    rows it measured, each put back in its section and budget group by its label."""
    where = {label: (section, group) for section, rows_of in (("evopress", evopress_rows), ("peers", peer_rows))
             for group, label, _, _ in rows_of(args)}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base: dict[str, list] = {}
    for r in rows:
        section, r["group"] = where[r["method"]]
        base.setdefault(section, []).append(r)
    settings = {**vars(args), "sections": [f"{k} (stopped early: {len(v)} rows)" for k, v in base.items()],
                "seeds": sorted({r["seed"] for r in rows})}
    return {"settings": settings, "seconds": sum(r["seconds"] for r in rows), "base": base}


def merge(parts: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """One result from the JSON files of runs of separate sections (or seeds), or the ``.rows.jsonl`` of a run
    stopped early: row lists are concatenated."""
    out: dict[str, Any] = {}
    for p in parts:
        part = rows_part(p, args) if p.name.endswith(".rows.jsonl") else json.loads(p.read_text())
        out.setdefault("parts", []).append({"file": p.name, "settings": part["settings"], "seconds": part["seconds"]})
        for key in ("lossless", "choice"):
            if key in part:
                out[key] = part[key]
        for ft_name, sec in part.get("delta", {}).items():
            have = out.setdefault("delta", {}).setdefault(ft_name, {**sec, "rows": []})
            have["rows"].extend(sec["rows"])
        for key, rows in part.get("base", {}).items():
            base = out.setdefault("base", {})
            if key == "reference":
                base[key] = {**base.get(key, {}), **rows}
            else:
                base.setdefault(key, []).extend(rows)
    return out


def render(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    parts = results.get("parts") or [{"settings": results["settings"], "seconds": results["seconds"]}]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["# Causal LMs: every method on the zoo LM, side by side with the peers", "",
             "Made by `python benchmarks/causal_lm.py` (one process per section below, merged with `--merge`):", ""]
    for p in parts:
        st = p["settings"]
        only = f" (rows matching '{st['only']}')" if st.get("only") else ""
        lines.append(f"* sections {', '.join(st['sections'])}{only}: seeds {st['seeds']}, {st['tokens']:,} tokens of "
                     f"pydocs-10/test for the base-model rows, BitDelta {st['steps']} steps, EvoPress "
                     f"{st['generations']} generations on a pool of {st['pool']}, {st['threads']} torch thread(s): "
                     f"{p['seconds']:.0f} s")
    lines += ["", f"Machine: {os.cpu_count()} cores shared with other engineers' work (load average {load} at the "
              "end): times are inflated and only comparable within a table. Where a row ran over several seeds: "
              "median (best).", ""]
    if "lossless" in results:
        lines += lossless_md(results["lossless"])
    if "delta" in results:
        lines += delta_md(results["delta"])
    if "base" in results:
        lines += base_md(results["base"], args)
    if "choice" in results:
        lines += choice_md(results["choice"])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["lossless", "delta", "evopress", "peers", "choice"],
                    choices=["lossless", "delta", "evopress", "peers", "choice"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tokens", type=int, default=16384, help="pydocs-10/test tokens scored for base-model rows")
    ap.add_argument("--steps", type=int, default=200, help="BitDelta scale-distillation steps")
    ap.add_argument("--generations", type=int, default=20, help="EvoPress generations")
    ap.add_argument("--pool", type=int, default=128, help="EvoPress calibration pool (documents, 128 tokens)")
    ap.add_argument("--only", default="", help="only the rows whose label (EvoPress / peers: 'budget: label') contains this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="causal_lm")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="JSON results of separate runs to merge into --out (runs nothing)")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.tokens, args.steps, args.generations, args.pool = args.seeds[:1], 4096, 20, 4, 64
    RESULTS.mkdir(exist_ok=True)
    if args.merge:
        results = merge(args.merge, args)
    else:
        torch.set_num_threads(args.threads)
        np.random.seed(0)
        ROW_LOG.append(RESULTS / f"{args.out}.rows.jsonl")
        t0 = time.perf_counter()
        which = set(args.sections)
        results = {"settings": dict(vars(args)), "torch": torch.__version__, "modelpress": modelpress.__version__}
        if "lossless" in which:
            results["lossless"] = lossless_section(args)
        if "delta" in which:
            results["delta"] = delta_section(args)
        if which & {"evopress", "peers"}:
            results["base"] = base_sections(args, which)
        if "choice" in which:
            results["choice"] = choice_section(args)
        results["seconds"] = round(time.perf_counter() - t0, 1)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1, default=str))
    lines = render(results, args)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
