"""The ``modelpress`` command: a thin shell over the Python API.

Exit status: 0 on success, 2 for a problem with the input (bad recipe, missing or corrupt file, mismatched
checkpoint; reported as one line, no traceback), 1 for a bug (its traceback on the terminal and in the log),
130 when interrupted. Nothing is half written: artifacts are staged and renamed into place.

The terminal shows only modelpress's own lines: what other libraries print (Python warnings, their logging,
native libraries' messages) goes to a log file that each artifact keeps as ``log.txt``
(:mod:`modelpress.console`); ``--verbose`` shows it on the terminal instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from . import console, distributed
from .errors import UserError

EPILOG = """examples:
  modelpress run recipes/quickstart.yaml          compress, export, evaluate; writes runs/quickstart/
  modelpress inspect runs/quickstart              sizes per codec, passes, metrics
  modelpress export runs/quickstart --to onnx     add an ONNX export to an artifact
  modelpress zoo list                             the embedded models

Recipes are YAML; see README.md ("Recipe format") and recipes/ for ready ones."""


NPROC_HELP = ("run on N local worker processes started by torch.distributed's launcher (gloo on the CPU, nccl "
              "for device: cuda): dfloat11 codes its weights shared across the ranks (streamed: cast, dfloat11 and "
              "bitdelta share the blocks), EvoPress evaluates its offspring in parallel, gptq and Delta-CoMe split "
              "their calibration data and their layers (streamed too); only rank 0 prints and writes, and the "
              "artifact is the same as with one process. "
              "Across machines: torchrun ... -m modelpress.cli run RECIPE (docs/scale.md)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelpress", description="Compress models from a recipe file: a compressed "
                                "checkpoint, ONNX / .ort / .pte exports, and an accuracy report next to the original's.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"modelpress {__import__('modelpress').__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show other libraries' warnings and messages on the "
                   "terminal (by default they go to the artifact's log.txt)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: load, compress, save, export, evaluate, report",
                         description="Run every stage of RECIPE and write the artifact directory (its `output:`, "
                         "default runs/<recipe name>): model.safetensors, modelpress.json, exports/, report.md/json, "
                         "PNG charts. The directory is replaced only if the whole run succeeds.")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("-o", "--output", help="artifact directory (overrides the recipe's output:)")
    run.add_argument("--no-export", action="store_true", help="skip the recipe's export: entries")
    run.add_argument("--no-evaluate", action="store_true", help="skip the recipe's evaluate: entries")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.add_argument("--nproc", type=int, default=1, metavar="N", help=NPROC_HELP)

    comp = sub.add_parser("compress", help="run only the recipe's passes and save the artifact",
                          description="Load the model, apply the recipe's passes and save the artifact; no export, "
                          "no evaluation (run `modelpress evaluate ARTIFACT` later).")
    comp.add_argument("recipe", help="recipe YAML file")
    comp.add_argument("-o", "--output", help="artifact directory (overrides the recipe's output:)")
    comp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    comp.add_argument("--nproc", type=int, default=1, metavar="N", help=NPROC_HELP)

    exp = sub.add_parser("export", help="export an artifact's model to ONNX, ONNX Runtime mobile (.ort) or ExecuTorch (.pte)",
                         description="Export the artifact's (rebuilt) model into ARTIFACT/exports/ and print the file path.")
    exp.add_argument("artifact", help="artifact directory written by `modelpress run` or `compress`")
    exp.add_argument("--to", required=True, choices=["onnx", "ort", "pte"], help="target format")
    exp.add_argument("--quantize", default="none", help="none (default), int8, int8-weight or int4-weight")

    ev = sub.add_parser("evaluate", help="evaluate an artifact (or run a recipe's evaluation) against the reference",
                        description="With an ARTIFACT directory: re-run its recipe's metrics (or --metric ones) on the "
                        "compressed model and on the reference, and rewrite its report (an artifact compressed streamed "
                        "is evaluated streamed, one decoder block at a time, when its metrics allow). With a RECIPE "
                        "file: same as `modelpress run RECIPE --no-export`.")
    ev.add_argument("target", help="artifact directory or recipe YAML file")
    ev.add_argument("--metric", action="append", help="metric name (repeatable); default: the recipe's evaluate: list")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    ins = sub.add_parser("inspect", help="show an artifact's sizes per codec, passes and metrics, or a checkpoint's tensors",
                         description="Print what an artifact holds (sizes per codec, the passes and their choices, "
                         "metrics), or the tensors of a .safetensors file / checkpoint directory.")
    ins.add_argument("path", help="artifact directory, checkpoint directory or .safetensors file")
    ins.add_argument("--json", action="store_true", help="print the manifest summary as JSON")

    zoo = sub.add_parser("zoo", help="list or build the embedded models", description="The embedded zoo: real models "
                         "and data built offline. Models are built on first use and cached in $MODELPRESS_CACHE "
                         "(default ~/.cache/modelpress).")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    zsub.add_parser("list", help="list the zoo's models")
    zb = zsub.add_parser("build", help="(re)build a zoo model into the cache")
    zb.add_argument("name", help="zoo model name (see `modelpress zoo list`)")
    zb.add_argument("--force", action="store_true", help="rebuild even if cached or committed")
    return p


def _cmd_run(args: argparse.Namespace, export: bool, evaluate: bool) -> None:
    from .pipeline import run
    from .recipe import load_recipes

    recipes = load_recipes(args.recipe)  # all validated before any work starts
    if args.output and len(recipes) > 1:
        raise UserError("--output needs a single-recipe file", args.recipe)
    for i, loaded in enumerate(recipes):
        if len(recipes) > 1 and distributed.is_main():
            names = ", ".join(name for name, _ in loaded.passes) or "no passes"
            console.say(f"[{i + 1}/{len(recipes)}] {loaded.recipe.model.source}: {names}")
        out = run(loaded, export=export, evaluate=evaluate, show_progress=not args.quiet,
                  output=Path(args.output) if args.output else None, log=getattr(args, "log_path", None))
        if not distributed.is_main():
            continue
        for line in summary_lines(out):
            console.say(line, result=True)


def summary_lines(artifact: Path) -> list[str]:
    """What a run achieved, in a few lines: size against the input checkpoint, each metric reference ->
    compressed (and per export), where the report is."""
    report_path = artifact / "report.json"
    lines = [f"artifact: {artifact}"]
    if not report_path.exists():
        return lines
    report = json.loads(report_path.read_text())
    size = report["size_bytes"]
    ref, comp = size["reference"], size["compressed"]
    ratio = f"{ref / comp:.2f}x smaller" if comp <= ref else f"{comp / ref:.2f}x larger"
    what = size.get("reference_label", "reference")
    lines.append(f"  size: {_human(comp)} vs {_human(ref)} {what} ({ratio})")
    cast = report.get("cast")
    if cast:
        same = "bit-identical" if cast["coded_max_abs_err_vs_cast"] == 0 else "NOT bit-identical"
        lines.append(f"    = cast {cast['from']} -> {cast['to']} (lossy, {_human(cast['bytes'])}) then lossless coding "
                     f"({cast['bytes'] / comp:.2f}x smaller than the cast model, outputs {same})")
    delta = report.get("delta")
    if delta:
        lines.append(f"    the delta alone: {_human(delta['total_bytes'])} vs {_human(delta['total_fp16_bytes'])} as an "
                     f"fp16 delta ({delta['total_ratio']:.1f}x smaller)")
    for name, m in report["metrics"].items():
        arrow = "higher is better" if m["higher_is_better"] else "lower is better"
        per_export = "".join(f", {fmt}: {_num(e['metrics'][name])}" for fmt, e in report["exports"].items()
                             if name in e["metrics"])
        lines.append(f"  {name}: {_num(m['reference'])} -> {_num(m['compressed'])}{per_export} ({arrow})")
    for fmt, e in report["exports"].items():
        lines.append(f"  export {fmt}: {e['path']} ({_human(e['size_bytes'])})")
    if (artifact / "report.md").exists():
        lines.append(f"  report: {artifact / 'report.md'}")
    return lines


def _num(v: float) -> str:
    return f"{v:.4g}"


def _cmd_export(args: argparse.Namespace) -> None:
    from .artifact import load_artifact, read_manifest
    from .exporters import ExportSpec, export_model

    read_manifest(args.artifact)
    handle = load_artifact(args.artifact)
    try:
        spec = ExportSpec(format=args.to, quantize=args.quantize)
    except Exception as exc:  # pydantic.ValidationError
        raise UserError(f"--quantize: {str(exc).splitlines()[-1].strip()}") from None
    out_dir = Path(args.artifact) / "exports"
    out_dir.mkdir(exist_ok=True)
    path = export_model(handle, spec, out_dir)
    console.say(str(path), result=True)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    target = Path(args.target)
    if target.is_file():
        args.output = None
        _cmd_run(args, export=False, evaluate=True)
        return
    from .pipeline import evaluate_artifact

    out = evaluate_artifact(target, metrics=args.metric, show_progress=not args.quiet)
    for line in summary_lines(out):
        console.say(line, result=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _cmd_inspect(args: argparse.Namespace) -> None:
    p = Path(args.path)
    if p.is_dir() and (p / "modelpress.json").exists():
        from .artifact import read_manifest

        m = read_manifest(p)
        by_codec: dict[str, list[int]] = {}
        for info in m["tensors"].values():
            c = by_codec.setdefault(info["codec"], [0, 0])
            c[0] += 1
            c[1] += int(info["bytes"])
        report = json.loads((p / "report.json").read_text()) if (p / "report.json").exists() else {}
        summary = {"kind": m["kind"], "source": m["source"], "passes": list(m["passes"]),
                   "codecs": {k: {"tensors": v[0], "bytes": v[1]} for k, v in by_codec.items()},
                   "from_base": len(m["from_base"]), "inputs": m["inputs"], "metrics": report.get("metrics", {}),
                   "exports": {k: e["path"] for k, e in report.get("exports", {}).items()}}
        if args.json:
            console.say(json.dumps(summary, indent=1, default=str), result=True)
            return
        console.say(f"artifact {p}  ({m['kind']} model from {m['source']}, format v{m['format_version']})", result=True)
        passes = ", ".join(f"{k} ({v.get('seconds', '?')} s)" for k, v in m["passes"].items()) or "(none)"
        console.say(f"passes:  {passes}", result=True)
        console.say("codecs:", result=True)
        for codec, (n, b) in sorted(by_codec.items(), key=lambda kv: -kv[1][1]):
            console.say(f"  {codec:<28} {n:>5} tensors  {_human(b):>10}", result=True)
        if m["from_base"]:
            console.say(f"  (+ {len(m['from_base'])} tensors taken from the base {m['inputs'].get('base', {}).get('source')})", result=True)
        for name, r in report.get("metrics", {}).items():
            console.say(f"metric {name}: reference {r['reference']:.4g}  compressed {r['compressed']:.4g}", result=True)
        for name, e in report.get("exports", {}).items():
            console.say(f"export {name}: {e['path']} ({_human(e['size_bytes'])}, max abs err {e['max_abs_err']:.3g})", result=True)
        return
    from .model import load_state_dict_file

    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not p.exists():
        raise UserError("no such file or directory", str(p))
    if not files:
        raise UserError("no .safetensors files here", str(p))
    total = 0
    for f in files:
        for k, t in load_state_dict_file(f).items():
            total += t.numel() * t.element_size()
            console.say(f"{k:<70} {str(t.dtype).replace('torch.', ''):>9} {tuple(t.shape)}", result=True)
    console.say(f"total {_human(total)}", result=True)


def _cmd_zoo(args: argparse.Namespace) -> None:
    from . import zoo

    if args.zoo_command == "list":
        for name, e in sorted(zoo.entries().items()):
            console.say(f"{name:<20} {e.kind:<11} {e.description}", result=True)
        return
    entry = zoo.get(args.name)
    console.say(entry.build(args.force), result=True)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; map a user's mistake to exit 2, an interrupt to 130, a bug to 1 (with traceback)."""
    try:
        if args.command == "run":
            _cmd_run(args, export=not args.no_export, evaluate=not args.no_evaluate)
        elif args.command == "compress":
            _cmd_run(args, export=False, evaluate=False)
        elif args.command == "export":
            _cmd_export(args)
        elif args.command == "evaluate":
            _cmd_evaluate(args)
        elif args.command == "inspect":
            _cmd_inspect(args)
        elif args.command == "zoo":
            _cmd_zoo(args)
    except UserError as exc:
        _report(f"modelpress: error: {exc}")
        return 2
    except distributed.PeerFailed as exc:  # the rank that failed reports its own error
        if os.environ.get(ERRORS_ENV):
            Path(os.environ[ERRORS_ENV], f"rank{os.environ['RANK']}.peer").write_text(str(exc))
        else:
            console.say(f"modelpress: error: {exc}", always=True)
        return 1
    except KeyboardInterrupt:
        console.say("modelpress: interrupted; nothing was written")
        return 130
    except Exception:  # a bug: keep its traceback, on the terminal and in the log
        args.bug = True
        text = traceback.format_exc()
        console.say(text.rstrip("\n"), always=True)
        if console.terminal() is not sys.stderr:
            sys.stderr.write(text)
        return 1
    distributed.shutdown()
    return 0


#: set by ``--nproc``: the directory where a worker leaves its one-line error for the launching process
ERRORS_ENV = "MODELPRESS_ERRORS_DIR"


def _report(line: str) -> None:
    """A one-line error: on the terminal, or (a worker started by ``--nproc``) for the launching process."""
    errors = os.environ.get(ERRORS_ENV)
    if distributed.launched():
        line = f"{line} (rank {os.environ['RANK']})"
    if errors and distributed.launched():
        Path(errors, f"rank{os.environ['RANK']}.txt").write_text(line)
    else:
        console.say(line, always=True)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``--nproc N``: check the recipe here (its errors are one line, before any worker starts), then run the
    same command on N workers through torch.distributed's launcher; one line for the first worker that failed."""
    from .recipe import load_recipes

    try:
        load_recipes(args.recipe)
    except UserError as exc:
        console.say(f"modelpress: error: {exc}")
        return 2
    with tempfile.TemporaryDirectory(prefix="modelpress-ranks-") as errors:
        os.environ[ERRORS_ENV] = errors  # the workers inherit it
        try:
            failed = distributed.launch(argv, args.nproc)
        finally:
            os.environ.pop(ERRORS_ENV, None)
        if not failed:
            return 0
        reported = sorted(Path(errors).glob("rank*.txt"), key=lambda f: int(f.stem[4:]))
        if reported:
            console.say(reported[0].read_text().strip())
            return 2
        # the rank that failed first: not one whose collective failed because of it, nor one the launcher stopped
        followers = {int(f.stem[4:]) for f in Path(errors).glob("rank*.peer")}
        culprits = sorted(r for r, c in failed.items() if r not in followers and c not in (-15, 128 + 15))
        rank = (culprits or sorted(failed))[0]
        code = failed[rank]
        how = f"was killed by signal {-code}" if code < 0 else f"failed (exit status {code})"
        console.say(f"modelpress: error: worker rank {rank} {how}; nothing was written")
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if getattr(args, "nproc", 1) < 1:
        console.say("modelpress: error: --nproc must be at least 1")
        return 2
    if getattr(args, "nproc", 1) > 1 and not distributed.launched():
        return _launch(args, argv)
    if distributed.launched() and os.environ["RANK"] != "0":
        console.mute()  # rank 0 speaks for the run
    if args.verbose:
        return _dispatch(args)
    fd, name = tempfile.mkstemp(prefix="modelpress-", suffix=".log")
    os.close(fd)
    args.log_path = Path(name)
    with console.third_party_output_to(args.log_path):
        code = _dispatch(args)
    if getattr(args, "bug", False):  # keep the log for the bug report
        console.say(f"modelpress: the full log (other libraries' output included) is in {args.log_path}")
    else:
        args.log_path.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
