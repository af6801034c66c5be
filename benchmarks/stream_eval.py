"""Streamed vs in-memory perplexity of synthetic Llama-shaped bf16 checkpoints and their artifacts: peak memory.

The checkpoints are benchmarks/scale.py's (:func:`scale.build_pair`, the fine-tune alone) with a word-level
tokenizer of 2000 made-up words added; the text is 2000 such words per line, drawn with a fixed seed. Each
measurement is one child process (started by ``/usr/bin/time``, :func:`scale.measure_command`) that evaluates
``perplexity`` (``options.window`` 128, ``batch_size`` 8) either in memory (:func:`modelpress.model.load_checkpoint`
/ :func:`modelpress.artifact.load_artifact`, then the metric) or streamed (:mod:`modelpress.stream_eval`: one
decoder block at a time). Recorded: the perplexity (the two paths must agree to the bit), wall and CPU seconds
(wall time on the shared 2-core machine is load-dependent; peak RSS is not) and peak resident memory. The
artifact is ``dfloat11`` of the checkpoint, compressed streamed once beforehand (not measured here).

    python benchmarks/stream_eval.py --sizes 0.1B 0.5B --windows 16    # -> benchmarks/results/stream_eval.{md,json}
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import SIZES, build_pair, largest_block_bytes, measure_command  # noqa: E402

WORDS = [f"w{i}" for i in range(2000)]


def add_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over :data:`WORDS` (ids below the checkpoints' 32000), beside the config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


def write_text(path: Path, lines: int) -> Path:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(2000)) for _ in range(lines)))
    return path


def child(mode: str, what: str, path: str, text: str, samples: int) -> None:
    """One measurement (in the child): print the perplexity as JSON."""
    import torch

    from modelpress.metrics import EvalContext, evaluate
    from modelpress.sources import load_dataset

    ctx = EvalContext(dataset=load_dataset(text), samples=samples, options={"window": 128, "batch_size": 8})
    if mode == "streamed":
        from modelpress.stream import LazyModel
        from modelpress.stream_eval import LazyArtifact, streamed_perplexity

        lazy = LazyModel(path) if what == "checkpoint" else LazyArtifact(path)
        with torch.no_grad():
            value = streamed_perplexity(lazy, ctx).value
    else:
        from modelpress.artifact import load_artifact
        from modelpress.model import load_checkpoint

        handle = load_checkpoint(Path(path)) if what == "checkpoint" else load_artifact(path)
        value = evaluate(handle.canonical(), handle, ["perplexity"], ctx)["perplexity"].value
    print(json.dumps({"perplexity": value}))


def compress_dfloat11(ft: Path, work: Path, size: str) -> Path:
    import yaml

    out = work / f"eval-{size}-dfloat11"
    if not (out / "modelpress.json").exists():
        recipe = work / f"eval-{size}-dfloat11.yaml"
        recipe.write_text(yaml.safe_dump({"model": str(ft), "passes": [{"type": "dfloat11"}], "stream": True,
                                          "output": str(out)}))
        measure_command(["-m", "modelpress.cli", "compress", str(recipe), "--quiet"], work / "compress.log")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["0.1B", "0.5B"], choices=list(SIZES))
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 128 tokens")
    ap.add_argument("--work", type=Path, default=Path("/tmp/modelpress-scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stream_eval.md")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "WHAT", "PATH", "TEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    samples = args.windows * 128
    if args.child:
        child(*args.child, samples)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    text = write_text(args.work / "eval.txt", 1 + samples // 2000)
    rows = []
    for size in args.sizes:
        _, ft = build_pair(size, args.work, with_base=False)
        add_tokenizer(ft)
        targets = {"checkpoint": ft, "dfloat11 artifact": compress_dfloat11(ft, args.work, size)}
        for what, path in targets.items():
            values = {}
            for mode in ("in memory", "streamed"):
                log = args.work / f"eval-{size}-{what.split()[0]}-{mode.split()[0]}.log"
                row = {"size": size, "model": what, "path": mode, "windows": args.windows,
                       "largest_unit_gb": round(largest_block_bytes(size) / 1e9, 3),
                       **measure_command([__file__, "--windows", str(args.windows), "--child", mode.split()[0],
                                          what.split()[0], str(path), str(text)], log)}
                row["perplexity"] = values[mode] = json.loads(log.read_text().strip().splitlines()[-1])["perplexity"]
                rows.append(row)
                print(row, flush=True)
            rows[-1]["same_value"] = rows[-2]["same_value"] = values["in memory"] == values["streamed"]
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.write_text(markdown(rows, " ".join(["python benchmarks/stream_eval.py", *sys.argv[1:]])))


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Streamed vs in-memory perplexity (benchmarks/stream_eval.py)", "", f"`{command}`", "",
             "Peak RSS of one child process per row (`/usr/bin/time`); wall seconds depend on the shared machine's "
             "load, CPU seconds and peak RSS do not. `same value`: the two paths' perplexities are equal to the bit.",
             "", "| size | model | path | windows x 128 tokens | largest unit GB (bf16) | wall s | CPU s | peak RSS GB "
             "| perplexity | same value |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['model']} | {r['path']} | {r['windows']} | {r['largest_unit_gb']} | "
                     f"{r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_gb']} | {r['perplexity']:.6g} | "
                     f"{'yes' if r['same_value'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
