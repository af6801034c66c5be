"""Runs a recipe: load -> passes -> save artifact -> export -> evaluate -> report.

Data flows one way. Everything is written into a staging directory that replaces ``output`` only when the
whole run succeeded (see :func:`modelpress.artifact.atomic_directory`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from . import api
from .api import Compressed
from .artifact import atomic_directory, load_artifact, read_manifest, WEIGHTS
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


def compress(loaded: LoadedRecipe, staging: Path, show_progress: bool = True) -> Compressed:
    """Load the model (and base), run the passes (:func:`modelpress.api.compress`) and write the artifact
    into ``staging``; returns the result (its ``reference`` is the untouched input model)."""
    r = loaded.recipe
    model = load_model(r.model)
    check_metric_data(loaded, model)
    # the recipe's dataset was resolved (beside the recipe), read and checked when the recipe was parsed
    calibration = r.calibration.model_dump(exclude_none=True)
    if r.calibration.dataset:
        calibration["dataset"] = loaded.datasets[r.calibration.dataset]
    result = api.compress(model, loaded.passes, base=load_model(r.base) if r.base else None,
                          calibration=calibration, seed=r.seed, device=r.device,
                          show_progress=show_progress, where=str(loaded.path) if loaded.path else None)
    result.recipe = loaded.raw
    result.write(staging)
    _write_recipe(loaded, staging)
    return result


def compress_streamed(loaded: LoadedRecipe, staging: Path, show_progress: bool = True) -> None:
    """The passes run over the model one decoder block at a time (:mod:`modelpress.stream`); the artifact is
    written into ``staging``, the same bytes as :func:`compress` writes."""
    from .passes import CalibrationSpec
    from .stream import compress_streamed as stream

    r = loaded.recipe
    resolve_device(r.device, str(loaded.path or "recipe"))  # the streamed passes code on the CPU
    c = r.calibration
    stream(r.model, loaded.passes, staging, base=r.base, seed=r.seed,
           calibration=CalibrationSpec(c.samples, c.batch_size, c.dataset, c.seq_len),
           data=loaded.datasets.get(c.dataset) if c.dataset else None, recipe=loaded.raw,
           show_progress=show_progress)
    _write_recipe(loaded, staging)


def _write_recipe(loaded: LoadedRecipe, staging: Path) -> None:
    if loaded.path is not None and loaded.path.exists():
        (staging / "recipe.yaml").write_text(loaded.path.read_text())
    else:
        (staging / "recipe.yaml").write_text(yaml.safe_dump(loaded.raw, sort_keys=False))


def streams(loaded: LoadedRecipe) -> bool:
    """Whether the recipe runs streamed (its ``stream:`` option; see :func:`modelpress.stream.use_streaming`)."""
    from .stream import use_streaming

    r = loaded.recipe
    return use_streaming(r.stream, r.model, r.base, loaded.passes, str(loaded.path or "recipe"))


def run(loaded: LoadedRecipe, *, export: bool = True, evaluate: bool = True, show_progress: bool = True,
        output: Path | None = None, log: Path | None = None) -> Path:
    """Run the whole recipe; returns the artifact directory. ``log``: a file with what other libraries
    printed during the run (the command line's), kept in the artifact as ``log.txt``."""
    from .metrics.report import build_report

    out = Path(output) if output else loaded.output
    with atomic_directory(out) as staging:
        if streams(loaded):
            compress_streamed(loaded, staging, show_progress)
            # the report compares with the input model, loaded whole (evaluation does not stream yet)
            wanted = (export and loaded.exports) or (evaluate and loaded.recipe.evaluate)
            reference = load_model(loaded.recipe.model) if wanted else None
            base = load_model(loaded.recipe.base) if wanted and loaded.recipe.base else None
            export, evaluate = bool(wanted) and export, bool(wanted) and evaluate
        else:
            result = compress(loaded, staging, show_progress)
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
    """(Re-)evaluate an artifact against the reference model named in its manifest; rewrites its report."""
    from .metrics.report import build_report

    p = Path(path)
    manifest = read_manifest(p)
    loaded = parse_recipe(manifest["recipe"], str(p / "recipe.yaml"))
    if metrics:
        loaded.recipe.evaluate = parse_recipe({**manifest["recipe"], "evaluate": metrics}, str(p / "recipe.yaml")).recipe.evaluate
    reference = load_model(loaded.recipe.model)
    with atomic_directory(p) as staging:
        for f in p.iterdir():
            target = staging / f.name
            if f.is_dir():
                shutil.copytree(f, target)
            else:
                target.write_bytes(f.read_bytes())
        model = load_artifact(staging)
        build_report(staging, loaded, model, reference, exports=[], metrics=loaded.recipe.evaluate,
                     show_progress=show_progress, keep_exports=True)
    return p


__all__ = ["run", "run_recipe", "compress", "evaluate_artifact", "load_model", "WEIGHTS"]
