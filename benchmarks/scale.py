"""Streamed vs in-memory compression of synthetic Llama-shaped bf16 checkpoints: wall time and peak memory.

Checkpoints: transformers' ``LlamaConfig`` shapes (names and shapes from a ``LlamaForCausalLM`` built on the meta
device), bf16, untied embeddings, written tensor by tensor into ~1 GB safetensors shards with a
``model.safetensors.index.json`` (the builder holds one shard at most; the values are cut from a pool of 64M random
numbers drawn once, :class:`RandomPool`, since drawing 13.5G values afresh takes too long here). Weights are random with a realistic
spread: a Gaussian scale mixture (``z1 * exp(z2 / 2)``, heavier tails than a Gaussian, like trained LLM weights)
scaled to a per-tensor standard deviation drawn from [0.01, 0.04] (Llama-2-7B's linear layers lie in about that range), norms around 1; the
"fine-tune" is the base plus a Gaussian delta of 5% of each tensor's spread (the size of BitDelta's deltas
relative to their weights). Each size gets a base and a fine-tune (the fine-tune alone when only ``dfloat11`` runs:
the same bytes, half the disk).

Each measurement is one ``modelpress compress RECIPE`` in a child process; wall time, CPU time (user + system) and
the child's peak resident set (``/usr/bin/time``'s maximum resident set size) are recorded. ``dfloat11`` runs on the
fine-tune, ``bitdelta`` (``steps: 0``, no distillation) and ``delta_come`` (GPTQ on the input Hessians of its
default calibration, 64 random token sequences of 64 tokens in batches of 8: streamed, the activations propagate
block by block) on the fine-tune against its base, ``gptq`` at 3 bits (group 128; 128 random token sequences of
128 tokens, each block calibrated on the quantized blocks before it) on the fine-tune;
``stream: true`` vs ``stream: false``. The
artifacts are compared byte for byte where both paths ran. In-memory runs are skipped where they could not fit
(``--max-in-memory-gb``: the estimate of :func:`modelpress.stream.in_memory_bytes`).

    python benchmarks/scale.py --sizes 0.1B 0.5B                          # -> benchmarks/results/scale.{md,json,png}
    python benchmarks/scale.py --sizes 7B-4L --out /tmp/scale-7b4l.md     # (ran beside the first: its own file)
    python benchmarks/scale.py --sizes --merge /tmp/scale-7b4l.json       # adds those rows, renders md and png
    python benchmarks/scale.py --sizes 7B --streamed-only                 # the full 7B pair (27 GB)
    python benchmarks/scale.py --sizes 0.1B 0.5B 1.5B --methods dfloat11 --out /tmp/a.md   # dfloat11 only, then
    python benchmarks/scale.py --sizes --merge /tmp/a.json                # its rows replace those of the same runs
    OMP_NUM_THREADS=1 python benchmarks/scale.py --sizes 0.1B --methods delta_come   # Delta-CoMe rows
    OMP_NUM_THREADS=1 python benchmarks/scale.py --sizes 0.1B 0.5B --methods gptq    # GPTQ-3bit rows
    python benchmarks/scale.py --sizes 0.1B --nproc-section --repeats 3   # 1 vs 2 ranks -> results/scale_nproc.{md,jsonl}
    python benchmarks/scale.py --sizes 0.1B --nproc-section --nproc-cases gptq --append   # GPTQ-3bit rows
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: hidden, intermediate, layers, heads, kv heads (vocabulary 32000, as Llama-2)
SIZES = {
    "0.1B": (768, 2048, 12, 12, 12),
    "0.5B": (1024, 2816, 24, 16, 16),
    "1.5B": (2048, 5632, 24, 16, 16),
    "3B": (2560, 6912, 32, 20, 20),
    "7B": (4096, 11008, 32, 32, 32),  # Llama-2-7B's shapes
    # Llama-2-7B's embeddings, head and blocks, 4 / 8 of its 32 blocks: the streamed path's units are those of
    # the 7B (its peak does not depend on the number of blocks), the checkpoints build in minutes here
    "7B-4L": (4096, 11008, 4, 32, 32),
    "7B-8L": (4096, 11008, 8, 32, 32),
}
SHARD_BYTES = 1 << 30


def llama_config(size: str):
    import transformers

    hidden, inter, layers, heads, kv = SIZES[size]
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                    max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
                                    architectures=["LlamaForCausalLM"])


#: elements in each pool of random values that the tensors are cut from (see :class:`RandomPool`)
POOL = 1 << 26


class RandomPool:
    """Random values drawn once (``POOL`` of them, float32) and cut into tensors at random offsets: drawing every
    weight of a 7B pair afresh takes over an hour on two shared cores, cutting takes seconds. Each tensor is a
    contiguous run of the pool (wrapping around) times its own scale, so tensors differ and the spread of every
    tensor is the pool's."""

    def __init__(self, values: torch.Tensor, g: torch.Generator) -> None:
        self.values, self.g = values, g

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        start = int(torch.randint(0, POOL, (), generator=self.g))
        reps = -(-(start + n) // POOL)
        flat = self.values.repeat(reps)[start:start + n] if reps > 1 else self.values[start:start + n]
        return flat.reshape(shape)


def pools(g: torch.Generator) -> tuple[RandomPool, RandomPool]:
    """The weights' pool: a log-normal scale mixture of Gaussians (``z1 * exp(z2 / 2)``: heavier tails than a
    Gaussian, as trained weights have), unit spread; the deltas' pool: Gaussian."""
    w = torch.randn(POOL, generator=g).mul_(torch.randn(POOL, generator=g).mul_(0.5).exp_()).div_(math.exp(0.25))
    return RandomPool(w, g), RandomPool(torch.randn(POOL, generator=g), g)


def synthetic_tensor(name: str, shape: tuple[int, ...], weights: RandomPool) -> torch.Tensor:
    """A bf16 weight with a realistic spread (see the module docstring); norms around 1."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * weights.take(shape)).to(torch.bfloat16)
    std = 0.01 + 0.03 * float(torch.rand((), generator=weights.g))
    return (weights.take(shape) * std).to(torch.bfloat16)


def build_pair(size: str, root: Path, seed: int = 0, with_base: bool = True) -> tuple[Path, Path]:
    """``root/<size>-base`` and ``root/<size>-ft``, written tensor by tensor in ~1 GB shards (cached);
    ``with_base=False``: the fine-tune alone (the same bytes; half the disk, for dfloat11 only)."""
    from safetensors.torch import save_file
    import transformers

    base_dir, ft_dir = root / f"{size}-base", root / f"{size}-ft"
    dirs = (base_dir, ft_dir) if with_base else (ft_dir,)
    if all((d / "done").exists() for d in dirs):
        return base_dir, ft_dir
    cfg = llama_config(size)
    with torch.device("meta"):
        shapes = [(k, tuple(v.shape)) for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cfg.to_json_file(str(d / "config.json"))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if used and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    weights, deltas = pools(torch.Generator().manual_seed(seed))
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        base_state, ft_state = {}, {}
        for name, shape in shard:
            w = synthetic_tensor(name, shape, weights)
            spread = 0.05 if not name.endswith("norm.weight") else 0.0025
            base_state[name] = w
            ft_state[name] = (deltas.take(shape) * (spread * (float(w[:64].float().std()) if w.dim() > 1 else 1.0))
                              ).add_(w.float()).to(torch.bfloat16)
            weight_map[name] = fname
        if with_base:
            save_file(base_state, str(base_dir / fname), metadata={"format": "pt"})
        save_file(ft_state, str(ft_dir / fname), metadata={"format": "pt"})
        del base_state, ft_state
    total = sum(2 * int(torch.Size(s).numel()) for _, s in shapes)
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}, indent=1))
        (d / "done").write_text("")
    return base_dir, ft_dir


def largest_block_bytes(size: str) -> int:
    """bf16 bytes of one decoder block, and of the embeddings + head unit (the largest unit of the stream)."""
    hidden, inter, _, heads, kv = SIZES[size]
    head_dim = hidden // heads
    block = hidden * hidden * 2 + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    rest = 2 * 32000 * hidden + hidden
    return 2 * max(block, rest)


def measure(recipe: Path, log: Path) -> dict[str, float]:
    """Run ``modelpress compress RECIPE`` in a child; its wall time and peak resident memory.

    The child is started by ``/usr/bin/time``, a small process: a child forked straight from this one would
    inherit this process's resident high-water mark (Linux keeps ``ru_maxrss`` across ``exec``), and this one
    holds torch and the random pools."""
    return measure_command(["-m", "modelpress.cli", "compress", str(recipe), "--quiet"], log)


def measure_command(args: list[str], log: Path) -> dict[str, float]:
    """Run ``python ARGS`` in a child started by ``/usr/bin/time`` (see :func:`measure`), its output in ``log``;
    its wall time, CPU time and peak resident memory."""
    cmd = ["/usr/bin/time", "-f", "%M %e %U %S", "-o", str(log.with_suffix(".time")), sys.executable, *args]
    recipe = " ".join(args)
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    if code != 0:
        raise SystemExit(f"{recipe} failed ({code}); see {log}")
    kb, wall, user, system = log.with_suffix(".time").read_text().split()[-4:]
    return {"seconds": round(float(wall), 1), "cpu_seconds": round(float(user) + float(system), 1),
            "peak_rss_gb": round(int(kb) * 1024 / 1e9, 3)}


#: each method's recipe: passes, and whether it compresses a delta against the base
METHODS = {
    "dfloat11": ([{"type": "dfloat11"}], False),
    "bitdelta": ([{"type": "bitdelta", "steps": 0}], True),
    "delta_come": ([{"type": "delta_come"}], True),
    "gptq": ([{"type": "gptq", "bits": 3}], False),
}


def run_case(size: str, method: str, stream: bool, base: Path, ft: Path, work: Path) -> dict:
    out = work / f"out-{size}-{method}-{'stream' if stream else 'mem'}"
    passes, delta = METHODS[method]
    recipe = {"model": str(ft), "passes": passes, "stream": stream, "output": str(out)}
    if delta:
        recipe["base"] = str(base)
    if method in ("delta_come", "gptq"):  # the synthetic checkpoints have no tokenizer
        recipe["calibration"] = {"dataset": "random"}
    path = work / f"{out.name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    row = {"size": size, "method": method, "path": "streamed" if stream else "in memory",
           **measure(path, work / f"{out.name}.log")}
    row["artifact_gb"] = round((out / "model.safetensors").stat().st_size / 1e9, 3)
    return row


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Streamed vs in-memory compression (benchmarks/scale.py)", "",
             f"Rows of several runs (each kept in `scale.json` until its size and method run again; docs/scale.md "
             f"lists the commands); this file written by `{command}`. Machine: 2 CPU cores shared with other jobs "
             "(1-minute load average per row), 24 GiB RAM, no GPU. Peak RSS: the `modelpress compress` child's maximum "
             "resident set size (`/usr/bin/time -f %M`); CPU s: its user + system time (empty for rows measured "
             "before that column).", "",
             "| size | params | checkpoint GB (bf16) | largest unit GB | method | path | wall s | CPU s | peak RSS GB | artifact GB | same bytes | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_gb']:.2f} | {r['largest_unit_gb']:.2f} | "
                     f"{r['method']} | {r['path']} | {r['seconds']} | {r.get('cpu_seconds', '')} | {r['peak_rss_gb']:.2f} | "
                     f"{r['artifact_gb']:.3f} | {r.get('same_bytes', '')} | {r.get('load', '')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in METHODS:
        for path, style in (("in memory", "--o"), ("streamed", "-s")):
            pts = sorted((r["params"] / 1e9, r["peak_rss_gb"]) for r in rows if r["method"] == method and r["path"] == path)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{method}, {path}")
    ram = 24 * 2**30 / 1e9
    ax.axhline(ram, color="grey", lw=0.8)
    ax.text(min(r["params"] for r in rows) / 1e9, ram - 1.2, "this machine's RAM (24 GiB)", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model parameters (billions, Llama-shaped, bf16)")
    ax.set_ylabel("peak resident memory (GB)")
    ax.set_title("modelpress compress: peak memory vs model size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["0.1B", "0.5B", "1.5B"], choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=["dfloat11", "bitdelta"], choices=list(METHODS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/modelpress-scale"))
    ap.add_argument("--streamed-only", action="store_true", help="skip the in-memory runs")
    ap.add_argument("--max-in-memory-gb", type=float, default=18.0,
                    help="skip in-memory runs whose estimated peak exceeds this")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints after the run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.md")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="rows of other runs' .json files to add (a size / method / path measured again replaces them)")
    ap.add_argument("--nproc-section", action="store_true",
                    help="instead: 1 vs 2 ranks for dfloat11 (the first of --sizes) and the EvoPress search")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each setup in --nproc-section")
    ap.add_argument("--append", action="store_true",
                    help="--nproc-section: add to the runs in results/scale_nproc.jsonl (default: start afresh)")
    ap.add_argument("--nproc-cases", nargs="+", default=["dfloat11", "evopress"], choices=["dfloat11", "evopress", "gptq", "delta_come"])
    args = ap.parse_args()
    if args.nproc_section:
        args.work.mkdir(parents=True, exist_ok=True)
        out = ROOT / "benchmarks/results/scale_nproc.md"
        log = out.with_suffix(".jsonl")  # every run; the table summarises all of them
        if not args.append:
            log.unlink(missing_ok=True)
        distributed_runs(args.work, args.sizes[0], args.nproc_cases, args.repeats, log)
        rows = distributed_rows(log)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        out.write_text(distributed_markdown(rows, "python benchmarks/scale.py " + " ".join(sys.argv[1:])))
        return
    from modelpress.stream import in_memory_bytes
    from modelpress.recipe import ModelSpec

    args.work.mkdir(parents=True, exist_ok=True)
    results_json = args.out.with_suffix(".json")
    rows = json.loads(results_json.read_text()) if results_json.exists() else []
    for extra in args.merge:
        new = json.loads(extra.read_text())
        keys = {(r["size"], r["method"], r["path"]) for r in new}
        rows = [r for r in rows if (r["size"], r["method"], r["path"]) not in keys] + new
    for size in args.sizes:
        t0 = time.perf_counter()
        base, ft = build_pair(size, args.work, with_base="bitdelta" in args.methods)
        print(f"{size}: checkpoints built in {time.perf_counter() - t0:.0f} s", flush=True)
        params = sum(int(torch.Size(v["shape"]).numel()) for v in _headers(ft))
        ckpt_gb = sum(f.stat().st_size for f in ft.glob("*.safetensors")) / 1e9
        for method in args.methods:
            rows = [r for r in rows if not (r["size"] == size and r["method"] == method)]
            delta = METHODS[method][1]
            estimate = in_memory_bytes(ModelSpec(source=str(ft)), ModelSpec(source=str(base)) if delta else None)
            paths = [True] if args.streamed_only or estimate / 1e9 > args.max_in_memory_gb else [True, False]
            outs = {}
            for stream in paths:
                row = run_case(size, method, stream, base, ft, args.work)
                row.update(params=params, checkpoint_gb=round(ckpt_gb, 3),
                           largest_unit_gb=round(largest_block_bytes(size) * (2 if delta else 1) / 1e9, 3),
                           load=round(os.getloadavg()[0], 1))
                outs[stream] = args.work / f"out-{size}-{method}-{'stream' if stream else 'mem'}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            if len(outs) == 2:
                same = _same_file(outs[True] / "model.safetensors", outs[False] / "model.safetensors")
                for r in rows[-2:]:
                    r["same_bytes"] = "yes" if same else "NO"
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)
            results_json.write_text(json.dumps(rows, indent=1))
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(ft, ignore_errors=True)
    rows.sort(key=lambda r: (r["method"], r["params"], r["path"]))
    results_json.write_text(json.dumps(rows, indent=1))
    args.out.write_text(markdown(rows, "python benchmarks/scale.py " + " ".join(sys.argv[1:])))
    plot(rows, args.out.with_suffix(".png"))


# ---------------------------------------------------------------------------------------------------
# 1 vs 2 ranks (``--nproc``)

#: a small EvoPress search (recipes/evopress_minilm.yaml's levels and budget; 4 generations of 8 offspring, two
#: selection stages, RTN levels so that the level database builds in seconds) on the zoo's minilm encoder (fitness: relative MSE of the last hidden state); the search is
#: the same work whatever made the levels
EVOPRESS = {"type": "evopress", "family": "bits", "method": "rtn", "levels": [2, 3, 4, 5, 6, 7, 8], "budget": 3.0,
            "generations": 4, "offspring": 8, "survivors": [2, 1], "stage_samples": [8, 32], "max_length": 32,
            "calibration_samples": 128, "baseline_samples": 16, "batch_size": 32}
#: (label, ranks, threads per rank)
SETUPS = [("1 rank, 1 thread", 1, 1), ("1 rank, 2 threads", 1, 2), ("2 ranks, 1 thread each", 2, 1)]


def run_ranks(recipe: Path, out: Path, ranks: int, threads: int) -> dict:
    """``modelpress compress RECIPE --nproc RANKS`` with THREADS torch / numba threads per rank: its wall time,
    its CPU time (user + sys of the command and every worker it started), the pass's own seconds from the
    manifest (dfloat11: ``seconds``, the encode; EvoPress: ``search_seconds``) and the artifact's sha256."""
    import hashlib
    import resource

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": "2"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "modelpress.cli", "compress", str(recipe), "-q", "-o", str(out),
                           "--nproc", str(ranks)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} --nproc {ranks} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    manifest = json.loads((out / "modelpress.json").read_text())
    entry = next(iter(manifest["passes"].values()))
    h = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    level_map = entry.get("level_map")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "pass_s": entry.get("search_seconds", entry.get("seconds")), "sha256": h,
            "level_map": hashlib.sha256(json.dumps(level_map, sort_keys=True).encode()).hexdigest()[:12]
            if level_map else None}


def distributed_runs(work: Path, size: str, cases: list[str], repeats: int, log: Path) -> None:
    """dfloat11 (in memory) of the ``size`` fine-tune, the EvoPress search (:data:`EVOPRESS`) and/or GPTQ 3-bit
    streamed on the ``size`` fine-tune and/or Delta-CoMe streamed on the ``size`` pair (every rank reads every
    block; calibration split by data, the layers' solves by layer), each under
    :data:`SETUPS`, ``repeats`` times interleaved (so that other jobs' load falls on every setup alike); one JSON
    line per run appended to ``log``."""
    import yaml

    recipes = {"dfloat11": (f"dfloat11 {size}", lambda: {"model": str(build_pair(size, work)[1]),
                                                           "passes": [{"type": "dfloat11"}], "stream": False}),
               "evopress": ("evopress minilm", lambda: {"model": "minilm", "seed": 0, "passes": [EVOPRESS]}),
               "gptq": (f"gptq 3-bit {size}, streamed", lambda: {"model": str(build_pair(size, work, with_base=False)[1]),
                                                             "calibration": {"dataset": "random"},
                                                             "passes": METHODS["gptq"][0], "stream": True}),
               "delta_come": (f"delta_come {size} pair, streamed", lambda: {
                   "model": str(build_pair(size, work)[1]), "base": str(build_pair(size, work)[0]),
                   "calibration": {"dataset": "random"}, "passes": METHODS["delta_come"][0], "stream": True})}
    for key in cases:
        case, make = recipes[key]
        path = work / f"nproc-{key}.yaml"
        path.write_text(yaml.safe_dump(make(), sort_keys=False))
        run_ranks(path, work / "nproc-warmup", 1, 2)  # fills the level database and numba's cache
        for _ in range(repeats):
            for label, ranks, threads in SETUPS:
                r = {"case": case, "setup": label, **run_ranks(path, work / f"nproc-out-{ranks}-{threads}", ranks,
                                                               threads), "load": round(os.getloadavg()[0], 1)}
                with open(log, "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(json.dumps(r), flush=True)


def distributed_rows(log: Path) -> list[dict]:
    """Min and median per case and setup over the runs in ``log``; whether every run of a case wrote the same
    artifact (sha256 of model.safetensors)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        runs.setdefault((r["case"], r["setup"]), []).append(r)
    rows = []
    for (case, label), rs in runs.items():
        walls, passes = sorted(r["wall_s"] for r in rs), sorted(r["pass_s"] for r in rs)
        cpus = sorted(r["cpu_s"] for r in rs if "cpu_s" in r)  # not recorded by the first runs in the log
        rows.append({"case": case, "setup": label, "repeats": len(rs), "wall_min": walls[0],
                     "wall_median": walls[len(walls) // 2], "pass_min": passes[0], "pass_median": passes[len(passes) // 2],
                     "cpu_min": cpus[0] if cpus else None, "cpu_median": cpus[len(cpus) // 2] if cpus else None,
                     "same_artifact": len({x["sha256"] for (c, _), xs in runs.items() if c == case for x in xs}) == 1,
                     "load": _range([r["load"] for r in rs if "load" in r])})
    return rows


def _range(values: list[float]) -> str:
    return "-".join(f"{v:g}" for v in sorted({min(values), max(values)})) if values else "not recorded"


def distributed_markdown(rows: list[dict], command: str) -> str:
    lines = ["# 1 vs 2 ranks (benchmarks/scale.py --nproc-section)", "",
             f"Command: `{command}`. Machine: {os.cpu_count()} CPU cores; the 1-minute load average after each run "
             "(range over the row's runs) is in the last column: other jobs on the machine inflate wall times; the "
             "setups ran interleaved, repeat by repeat. *pass s*: the pass's own time from the manifest (dfloat11: "
             "the encode, `seconds`; EvoPress: the search, `search_seconds`; GPTQ streamed: `seconds`, the blocks' "
             "propagation, Hessians and solves summed over the units; Delta-CoMe streamed: the same); *wall s*: the whole "
             "`modelpress compress` command (Python start-up, loading, hashing the input, writing); *CPU s*: user + "
             "sys time of that command and every worker it started (what the setup costs the machine, which "
             "other jobs' load does not inflate as it inflates wall times). "
             "*same artifact*: every run of the case, all setups, wrote the same model.safetensors (sha256).", "",
             "| case | setup | repeats | pass s min | pass s median | speed-up vs 1 rank 1 thread (min / median pass) | "
             "wall s min | wall s median | CPU s min | CPU s median | same artifact | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next(x for x in rows if x["case"] == r["case"] and x["setup"] == SETUPS[0][0])
        lines.append(f"| {r['case']} | {r['setup']} | {r['repeats']} | {r['pass_min']} | {r['pass_median']} | "
                     f"{ref['pass_min'] / r['pass_min']:.2f}x / {ref['pass_median'] / r['pass_median']:.2f}x | {r['wall_min']} | {r['wall_median']} | "
                     f"{r.get('cpu_min')} | {r.get('cpu_median')} | {'yes' if r['same_artifact'] else 'NO'} | {r['load']} |")
    return "\n".join(lines) + "\n"


def _headers(d: Path) -> list[dict]:
    from modelpress.shards import ShardedCheckpoint

    ck = ShardedCheckpoint.open(d)
    return [{"shape": list(t.shape)} for t in ck.tensors.values()]


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    main()
