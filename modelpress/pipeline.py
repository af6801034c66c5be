"""Runs a recipe: load -> passes -> save artifact -> export -> evaluate -> report.

Data flows one way. Everything is written into a staging directory that replaces ``output`` only when the
whole run succeeded (see :func:`modelpress.artifact.atomic_directory`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import yaml

from . import api, distributed
from .api import Compressed
from .artifact import atomic_directory, discard_staging, load_artifact, read_manifest, WEIGHTS
from .devices import resolve_device
from .model import ModelHandle
from .recipe import LoadedRecipe, load_recipes, parse_recipe
from .sources import load_model

#: the artifact's copy of what other libraries printed during the run
LOG = "log.txt"


def check_metric_data(loaded: LoadedRecipe, model: ModelHandle) -> None:
    """Before any work: the accuracy datasets' labels are classes the classifier has (one-line error)."""
    from .data.inputs import class_indices

    for i, spec in enumerate(loaded.recipe.evaluate):
        if spec.dataset and spec.metric == "accuracy" and model.kind == "classifier":
            data = loaded.datasets[spec.dataset]
            data.require("label", f"evaluate[{i}] (accuracy)")
            class_indices(model, data.all().labels, data.name)


def _calibration(loaded: LoadedRecipe) -> dict[str, Any]:
    """The recipe's ``calibration:`` block with its dataset resolved (it was read and checked at parse time)."""
    c = loaded.recipe.calibration
    calibration = c.model_dump(exclude_none=True)
    if c.dataset:
        calibration["dataset"] = loaded.datasets[c.dataset]
    return calibration


def compress(loaded: LoadedRecipe, staging: Path, show_progress: bool = True) -> Compressed:
    """Load the model (and base), run the passes (:func:`modelpress.api.compress`) and write the artifact
    into ``staging``; returns the result (its ``reference`` is the untouched input model)."""
    r = loaded.recipe
    model = load_model(r.model)
    check_metric_data(loaded, model)
    with distributed.results_on_main():  # rank 0 alone writes, evaluates and exports
        result = api.compress(model, loaded.passes, base=load_model(r.base) if r.base else None,
                              calibration=_calibration(loaded), seed=r.seed, device=r.device,
                              show_progress=show_progress, where=str(loaded.path) if loaded.path else None)
    result.recipe = loaded.raw
    result.write(staging)
    _write_recipe(loaded, staging)
    return result


def compress_streamed(loaded: LoadedRecipe, staging: Path | None, show_progress: bool = True) -> None:
    """The passes run over the model one decoder block at a time (:mod:`modelpress.stream`); the artifact is
    written into ``staging``, the same bytes as :func:`compress` writes (``None``: a rank other than 0, which
    compresses its share of the blocks and writes nothing)."""
    from .passes import CalibrationSpec
    from .stream import compress_streamed as stream

    r = loaded.recipe
    resolve_device(r.device, str(loaded.path or "recipe"))  # the streamed passes code on the CPU
    c = r.calibration
    stream(r.model, loaded.passes, staging, base=r.base, seed=r.seed,
           calibration=CalibrationSpec(c.samples, c.batch_size, c.dataset, c.seq_len),
           data=loaded.datasets.get(c.dataset) if c.dataset else None, recipe=loaded.raw,
           show_progress=show_progress)
    if staging is not None:
        _write_recipe(loaded, staging)


def evaluates_streamed(loaded: LoadedRecipe) -> bool:
    """A streamed run's metrics are all ones :mod:`modelpress.stream_eval` computes block by block."""
    from .stream_eval import STREAMED_METRICS

    metrics = loaded.recipe.evaluate
    return bool(metrics) and all(spec.metric in STREAMED_METRICS for spec in metrics)


def evaluate_streamed(loaded: LoadedRecipe, staging: Path, show_progress: bool, log_name: str | None,
                      keep_exports: bool = False) -> None:
    """The report of a streamed run, its metrics computed one decoder block at a time on the input checkpoint
    and on the artifact in ``staging`` (:mod:`modelpress.stream_eval`): neither model is loaded whole.
    ``keep_exports``: a re-evaluation keeps the exports its earlier report listed."""
    from .metrics import EvalContext
    from .metrics.report import build_report
    from .sources import load_dataset
    from .stream import LazyModel
    from .stream_eval import (LazyArtifact, self_comparison, streamed_choice_accuracy, streamed_comparison,
                              streamed_perplexity)

    r = loaded.recipe
    resolve_device(r.device, str(loaded.path or "recipe"))  # the streamed evaluation runs on the CPU
    reference = LazyModel(r.model.source, r.model.kind, r.model.config)
    artifact = LazyArtifact(staging, base=r.base.source if r.base else None)
    results: tuple[dict[str, Any], dict[str, Any]] = ({}, {})

    def windows_of(spec: Any) -> tuple[Any, ...]:
        return spec.dataset, spec.samples, json.dumps(dict(spec.options), sort_keys=True)

    for spec in r.evaluate:
        if spec.metric == "size" or spec.metric in results[1]:  # size: from the files and the structures
            continue
        data = (loaded.datasets.get(spec.dataset) or load_dataset(spec.dataset)) if spec.dataset else None
        ctx = EvalContext(seed=r.seed, samples=spec.samples, options=dict(spec.options), show_progress=show_progress,
                          dataset=data)
        if spec.metric in ("perplexity", "choice_accuracy"):  # each model on its own
            metric = streamed_perplexity if spec.metric == "perplexity" else streamed_choice_accuracy
            results[0][spec.metric], results[1][spec.metric] = metric(reference, ctx), metric(artifact, ctx)
        else:  # token_kl, top1_agreement on the same windows: one pass of both models, side by side
            together = [s.metric for s in r.evaluate
                        if s.metric in ("token_kl", "top1_agreement") and windows_of(s) == windows_of(spec)]
            results[1].update(streamed_comparison(reference, artifact, ctx, together))
            results[0].update({m: self_comparison(reference, ctx, m) for m in together})
    ref_handle = reference.handle(reference.stored_skeleton())
    ref_handle.extras["checkpoint"] = reference.checkpoint_record()
    build_report(staging, loaded, artifact.handle(artifact.skeleton), ref_handle, exports=[], metrics=r.evaluate,
                 show_progress=show_progress, log_name=log_name, results=results, keep_exports=keep_exports)


def _write_recipe(loaded: LoadedRecipe, staging: Path) -> None:
    if loaded.path is not None and loaded.path.exists():
        (staging / "recipe.yaml").write_text(loaded.path.read_text())
    else:
        (staging / "recipe.yaml").write_text(yaml.safe_dump(loaded.raw, sort_keys=False))


def streams(loaded: LoadedRecipe) -> bool:
    """Whether the recipe runs streamed (its ``stream:`` option; see :func:`modelpress.stream.use_streaming`);
    with several ranks, rank 0's choice (``stream: auto`` looks at the memory available now)."""
    from .stream import use_streaming

    r = loaded.recipe
    return distributed.from_main(use_streaming(r.stream, r.model, r.base, loaded.passes, str(loaded.path or "recipe")))


def _ranks_take_part(loaded: LoadedRecipe) -> bool:
    """Whether the other ranks take part in a streamed run: its units shared between them
    (:func:`modelpress.stream.shares_units`), or every unit compressed by all of them together
    (:func:`modelpress.stream.in_lockstep`)."""
    from .stream import in_lockstep, shares_units

    return shares_units(loaded.passes) or in_lockstep(loaded.passes)


def join_workers(loaded: LoadedRecipe) -> bool:
    """Under torch.distributed's launcher (``--nproc``, torchrun): join the process group (gloo, or nccl for a
    CUDA ``device:``) and make a rank that its launcher terminates (another rank failed) remove its staging
    directory before it exits. Returns whether this run has several ranks (:mod:`modelpress.distributed`)."""
    if not distributed.launched():
        return False
    if not distributed.active():
        distributed.init_from_env(resolve_device(loaded.recipe.device, str(loaded.path or "recipe")))
        signal.signal(signal.SIGTERM, _terminated)
    return distributed.active()


def _terminated(signum: int, frame: Any) -> None:
    discard_staging()
    os._exit(128 + signum)


def _work_as_rank(loaded: LoadedRecipe) -> None:
    """A rank other than 0: the same passes with the same seed, taking part in the exchanges of the shared
    work; it writes, prints and evaluates nothing (rank 0 does)."""
    r = loaded.recipe
    if streams(loaded):
        if not _ranks_take_part(loaded):
            # rank 0 compresses every unit alone: nothing to take part in, and waiting for it at a collective
            # would fail the run after distributed.TIMEOUT (a 7B Delta-CoMe takes hours); rank 0's exit status is
            # the run's
            return
        compress_streamed(loaded, None, show_progress=False)
    else:
        with distributed.results_on_main():  # its result is dropped: the last pass may leave it unbuilt
            api.compress(load_model(r.model), loaded.passes, base=load_model(r.base) if r.base else None,
                         calibration=_calibration(loaded), seed=r.seed, device=r.device, keep_reference=False,
                         where=str(loaded.path) if loaded.path else None)
    distributed.barrier()


def run(loaded: LoadedRecipe, *, export: bool = True, evaluate: bool = True, show_progress: bool = True,
        output: Path | None = None, log: Path | None = None) -> Path:
    """Run the whole recipe; returns the artifact directory. ``log``: a file with what other libraries
    printed during the run (the command line's), kept in the artifact as ``log.txt``."""
    from .metrics.report import build_report

    out = Path(output) if output else loaded.output
    if join_workers(loaded) and not distributed.is_main():
        _work_as_rank(loaded)
        return out
    show_progress = show_progress and distributed.is_main()
    with atomic_directory(out) as staging:
        if streams(loaded):
            compress_streamed(loaded, staging, show_progress)
            if _ranks_take_part(loaded):
                distributed.barrier()  # every rank's share is in (a rank that failed fails the run here)
            if evaluate and not (export and loaded.exports) and evaluates_streamed(loaded):
                evaluate_streamed(loaded, staging, show_progress, log_name=LOG if log is not None else None)
                export = evaluate = False
            # otherwise the report compares with the input model, loaded whole
            wanted = (export and loaded.exports) or (evaluate and loaded.recipe.evaluate)
            reference = load_model(loaded.recipe.model) if wanted else None
            base = load_model(loaded.recipe.base) if wanted and loaded.recipe.base else None
            export, evaluate = bool(wanted) and export, bool(wanted) and evaluate
        else:
            result = compress(loaded, staging, show_progress)
            distributed.barrier()
            reference, base = result.reference, result.base
            del result  # the compressed module in memory: what is evaluated is the artifact as loaded
        if export or evaluate:
            # Evaluate what a user gets back: the artifact as loaded, not the in-memory module.
            artifact_model = load_artifact(staging, base=base)
            build_report(staging, loaded, artifact_model, reference,
                         exports=loaded.exports if export else [], metrics=loaded.recipe.evaluate if evaluate else [],
                         show_progress=show_progress, log_name=LOG if log is not None else None, base=base,
                         device=resolve_device(loaded.recipe.device, str(loaded.path or "recipe")))
        if log is not None and log.exists():
            shutil.copyfile(log, staging / LOG)
    return out


def run_recipe(path: str | Path, **kwargs: Any) -> Path | list[Path]:
    """Validate every recipe in the file at ``path``, then run them in order; returns the artifact
    directory (a list of them for a multi-recipe file)."""
    loaded = load_recipes(path)
    outs = [run(r, **kwargs) for r in loaded]
    return outs[0] if len(outs) == 1 else outs


def evaluate_artifact(path: str | Path, *, metrics: list[str] | None = None, show_progress: bool = True) -> Path:
    """(Re-)evaluate an artifact against the reference model named in its manifest; rewrites its report. An
    artifact that was compressed streamed (its manifest's ``stream``) is evaluated streamed too when every
    metric can be (:func:`evaluates_streamed`): neither model is loaded whole, as in the run that made it."""
    from .metrics.report import build_report

    p = Path(path)
    manifest = read_manifest(p)
    loaded = parse_recipe(manifest["recipe"], str(p / "recipe.yaml"))
    if metrics:
        loaded.recipe.evaluate = parse_recipe({**manifest["recipe"], "evaluate": metrics}, str(p / "recipe.yaml")).recipe.evaluate
    streamed = bool(manifest.get("stream")) and evaluates_streamed(loaded)
    reference = None if streamed else load_model(loaded.recipe.model)
    with atomic_directory(p) as staging:
        for f in p.iterdir():
            target = staging / f.name
            if f.is_dir():
                shutil.copytree(f, target)
            else:
                target.write_bytes(f.read_bytes())
        if streamed:
            evaluate_streamed(loaded, staging, show_progress, log_name=None, keep_exports=True)
        else:
            build_report(staging, loaded, load_artifact(staging), reference, exports=[],
                         metrics=loaded.recipe.evaluate, show_progress=show_progress, keep_exports=True)
    return p


__all__ = ["run", "run_recipe", "compress", "evaluate_artifact", "load_model", "WEIGHTS"]
