"""Runs a recipe: load -> passes -> save artifact -> export -> evaluate -> report.

Data flows one way. Everything is written into a staging directory that replaces ``output`` only when the
whole run succeeded (see :func:`modelpress.artifact.atomic_directory`).
"""
from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import console
from .artifact import atomic_directory, load_artifact, read_manifest, tensors_sha256, write_artifact, WEIGHTS
from .errors import UserError
from .model import ModelHandle
from .passes import CalibrationSpec, Context, get_pass, seeded
from .recipe import LoadedRecipe, ModelSpec, load_recipes, parse_recipe
from .sources import load_dataset, load_model

#: the artifact's copy of what other libraries printed during the run
LOG = "log.txt"


def _input_record(spec: ModelSpec, handle: ModelHandle) -> dict[str, Any]:
    return {"source": spec.source, "kind": handle.kind, "sha256": tensors_sha256(handle.module.state_dict())}


def check_metric_data(recipe: Any, model: ModelHandle) -> None:
    """Before any work: the accuracy datasets' labels are classes the classifier has (one-line error)."""
    from .data.inputs import class_indices

    for i, spec in enumerate(recipe.evaluate):
        if spec.dataset and spec.metric == "accuracy" and model.kind == "classifier":
            data = load_dataset(spec.dataset)
            data.require("label", f"evaluate[{i}] (accuracy)")
            class_indices(model, data.all().labels, data.name)


def compress(loaded: LoadedRecipe, staging: Path, show_progress: bool = True) -> tuple[ModelHandle, ModelHandle, ModelHandle | None, Context]:
    """Load the model (and base), run the passes and write the artifact into ``staging``.

    Returns the compressed handle, the untouched reference, the base (or ``None``) and the context."""
    r = loaded.recipe
    model = load_model(r.model)
    base = load_model(r.base) if r.base else None
    check_metric_data(r, model)
    reference = model.replace_module(copy.deepcopy(model.module))
    inputs = {"model": _input_record(r.model, model)}
    if base is not None:
        inputs["base"] = _input_record(r.base, base)
    cal = r.calibration
    data = load_dataset(cal.dataset, model, "calibration", loaded.path.parent if loaded.path else None)
    if data is not None:
        inputs["calibration"] = {"dataset": data.name, "random": data.is_random}
    with tempfile.TemporaryDirectory(prefix="modelpress-") as scratch:
        ctx = Context(seed=r.seed, calibration=CalibrationSpec(cal.samples, cal.batch_size, cal.dataset, cal.seq_len),
                      data=data, base=base, scratch=Path(scratch), show_progress=show_progress)
        bar = console.progress(loaded.passes, desc="passes", disable=not show_progress or not loaded.passes)
        for i, (name, config) in enumerate(bar):
            bar.set_postfix_str(name)
            cls = get_pass(name)
            if cls.kinds and model.kind not in cls.kinds:
                raise UserError(f"passes[{i}]: pass {name!r} works on {', '.join(cls.kinds)} models, not "
                                f"{model.kind} ({r.model.source})", str(loaded.path))
            t0 = time.perf_counter()
            with seeded(r.seed + i), torch.random.fork_rng():
                model = cls(config).apply(model, ctx)
            ctx.record(name, seconds=round(time.perf_counter() - t0, 3), config=config.model_dump(mode="json"))
    write_artifact(staging, model, recipe=loaded.raw, pass_log=ctx.log, base=base, inputs=inputs)
    if loaded.path is not None and loaded.path.exists():
        (staging / "recipe.yaml").write_text(loaded.path.read_text())
    else:
        (staging / "recipe.yaml").write_text(yaml.safe_dump(loaded.raw, sort_keys=False))
    return model, reference, base, ctx


def run(loaded: LoadedRecipe, *, export: bool = True, evaluate: bool = True, show_progress: bool = True,
        output: Path | None = None, log: Path | None = None) -> Path:
    """Run the whole recipe; returns the artifact directory. ``log``: a file with what other libraries
    printed during the run (the command line's), kept in the artifact as ``log.txt``."""
    from .evaluate.report import build_report

    out = Path(output) if output else loaded.output
    with atomic_directory(out) as staging:
        model, reference, base, ctx = compress(loaded, staging, show_progress)
        if export or evaluate:
            # Evaluate what a user gets back: the artifact as loaded, not the in-memory module.
            artifact_model = load_artifact(staging, base=base)
            build_report(staging, loaded, artifact_model, reference,
                         exports=loaded.exports if export else [], metrics=loaded.recipe.evaluate if evaluate else [],
                         show_progress=show_progress, log_name=LOG if log is not None else None, base=base)
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
    from .evaluate.report import build_report

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
