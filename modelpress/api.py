"""The Python API: ``compress``, ``evaluate`` and ``export`` over models, artifacts and their results.

::

    import modelpress

    result = modelpress.compress("minilm-docs", [{"type": "bitdelta", "steps": 50}], base="minilm",
                                 calibration={"dataset": "train.jsonl", "samples": 64})
    result.model                       # a runnable torch module
    result.save("runs/my-bitdelta")    # the artifact (load it back with modelpress.load)
    modelpress.evaluate(result, [{"metric": "accuracy", "dataset": "test.jsonl"}])
    modelpress.export(result, ["onnx"], "exports/")

``model`` and ``base`` are a zoo name, a checkpoint path, an ``nn.Module`` (a transformers or diffusers model;
``kind=`` when it cannot be guessed) or a :class:`~modelpress.model.ModelHandle`. ``passes`` are recipe-shaped
dicts (``{"type": "bitdelta", "steps": 50}``) or ``(name, config)`` pairs, validated exactly as a recipe's.

One rule for passes: a pass may change the model it is given in place. :func:`compress` keeps the one
untouched copy the evaluation needs (``keep_reference``); passes that need the input beside the model they
change (a distillation teacher, reconstruction targets) get that copy through
:meth:`~modelpress.passes.Context.original`. The recipe runner (:mod:`modelpress.pipeline`) uses these functions.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from pydantic import ValidationError
from torch import nn

from . import console, distributed
from .artifact import atomic_directory, tensors_sha256, write_artifact
from .data import Dataset
from .devices import on_device, resolve_device
from .errors import UserError
from .model import ModelHandle, describe_architecture, guess_kind
from .passes import CalibrationSpec, Context, get_pass, seeded
from .recipe import check_passes_fit, parse_passes
from .sources import load_dataset, load_model

ModelLike = Any  # str | Path | nn.Module | ModelHandle


@dataclass
class Compressed:
    """What :func:`compress` returns: the compressed model, the untouched input (``reference``, ``None``
    without ``keep_reference``), the base of a delta, each pass's record and the provenance of the inputs."""

    handle: ModelHandle
    reference: ModelHandle | None
    base: ModelHandle | None
    log: dict[str, Any]
    recipe: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    data: Dataset | None = None

    @property
    def model(self) -> nn.Module:
        """The compressed model as a runnable torch module."""
        return self.handle.module

    def save(self, directory: str | Path, recipe_text: str | None = None) -> Path:
        """Write the artifact to ``directory`` (replaced only when the write succeeds); load it back with
        :func:`modelpress.load`. ``recipe_text``: the recipe file as written, kept as ``recipe.yaml``."""
        import yaml

        out = Path(directory)
        with atomic_directory(out) as staging:
            self.write(staging)
            (staging / "recipe.yaml").write_text(recipe_text or yaml.safe_dump(self.recipe, sort_keys=False))
        return out

    def write(self, staging: Path) -> None:
        """Write the model and its manifest into an existing (staging) directory."""
        write_artifact(staging, self.handle, recipe=self.recipe, pass_log=self.log, base=self.base,
                       inputs=self.inputs)


def as_handle(model: ModelLike, kind: str | None = None, what: str = "model") -> ModelHandle:
    """A :class:`ModelHandle` for a zoo name, a checkpoint path, a torch module or a handle."""
    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model)) if kind is None else load_model(_Spec(str(model), kind))
    if isinstance(model, nn.Module):
        arch = describe_architecture(model)
        kind = kind or guess_kind(arch)
        if kind is None:
            raise UserError(f"cannot tell the kind of a {arch['class']}; pass kind=", what)
        extras: dict[str, Any] = {}
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if path and Path(path, "tokenizer.json").exists():
            extras["tokenizer_dir"] = str(path)
        return ModelHandle(model.eval(), kind, f"<{arch['class']}>", arch, extras)
    raise UserError(f"{what} must be a zoo name, a checkpoint path, a torch module or a ModelHandle, "
                    f"got {type(model).__name__}")


@dataclass
class _Spec:
    source: str
    kind: str | None
    config: str | None = None


def calibration_spec(calibration: Any) -> tuple[CalibrationSpec, Dataset | None]:
    """The calibration settings and the dataset they name: a dict like a recipe's ``calibration:`` block (its
    ``dataset`` a name, a path or an opened :class:`~modelpress.data.Dataset`), a dataset name or path, or a
    :class:`~modelpress.data.Dataset`."""
    if calibration is None:
        return CalibrationSpec(), None
    if isinstance(calibration, (str, Path, Dataset)):
        calibration = {"dataset": calibration}
    if isinstance(calibration, CalibrationSpec):
        calibration = {k: v for k, v in calibration.__dict__.items() if v is not None}
    calibration = dict(calibration)
    opened = calibration.get("dataset")
    if isinstance(opened, Dataset):
        calibration["dataset"] = opened.name
    elif opened is not None:
        calibration["dataset"] = str(opened)
        opened = None
    from .recipe import CalibrationConfig, validation_error

    try:
        cfg = CalibrationConfig.model_validate(calibration)
    except ValidationError as exc:
        raise validation_error("calibration", exc, CalibrationConfig) from None
    spec = CalibrationSpec(cfg.samples, cfg.batch_size, cfg.dataset, cfg.seq_len)
    return spec, ((opened or load_dataset(cfg.dataset)) if cfg.dataset else None)


def _input_record(handle: ModelHandle) -> dict[str, Any]:
    """The input's source, kind and sha256 for the manifest (the hash left out on a rank other than 0 whose
    result nobody uses: :func:`modelpress.distributed.results_on_main`)."""
    hashed = distributed.is_main() or not distributed.results_on_main_only()
    return {"source": handle.source, "kind": handle.kind,
            "sha256": tensors_sha256(handle.module.state_dict()) if hashed else None}


def compress(model: ModelLike, passes: Iterable[Any] = (), *, base: ModelLike | None = None,
             calibration: Any = None, seed: int = 0, kind: str | None = None, keep_reference: bool = True,
             show_progress: bool = False, where: str | None = None, device: str | torch.device = "auto"
             ) -> Compressed:
    """Run ``passes`` on ``model`` (see the module docstring) and return the :class:`Compressed` result.

    ``calibration``: ``{"dataset": ..., "samples": ..., "seq_len": ..., "batch_size": ...}`` (unset values
    leave each pass its paper default; no dataset: the zoo model's own data), a dataset name / path, or a
    :class:`~modelpress.data.Dataset`. ``seed`` covers the whole run (each pass ``i`` runs under
    ``seed + i``; calibration draws and searches derive from it). The input model is changed in place
    unless it was loaded here; ``keep_reference`` keeps an untouched copy for evaluation. ``where`` prefixes
    error messages (the recipe runner gives the recipe file). ``device``: ``auto`` (a CUDA GPU when there is
    one), ``cpu`` or ``cuda`` (a one-line error without a GPU): where passes that run the model compute; the
    result is on the CPU either way."""
    parsed = parse_passes(passes, where)
    run_on = resolve_device(device, where or "device")
    handle = as_handle(model, kind)
    base_handle = as_handle(base, what="base") if base is not None else None
    spec, data = calibration_spec(calibration)
    check_passes_fit(parsed, handle.kind, base_handle is not None, where, base_hint="give base=",
                     model_name=f" ({handle.source})")
    if data is None:
        data = load_dataset(None, handle, "calibration")
    inputs = {"model": _input_record(handle)}
    if base_handle is not None:
        inputs["base"] = _input_record(base_handle)
    if data is not None:
        inputs["calibration"] = {"dataset": data.name, "random": data.is_random}
    reference = handle.replace_module(copy.deepcopy(handle.module)) if keep_reference and parsed else \
        (handle if keep_reference else None)
    with tempfile.TemporaryDirectory(prefix="modelpress-") as scratch:
        ctx = Context(seed=seed, calibration=spec, data=data, base=base_handle, scratch=Path(scratch),
                      show_progress=show_progress, reference=reference, device=run_on, passes_total=len(parsed))
        bar = console.progress(parsed, desc="passes", disable=not show_progress or not parsed)
        for i, (name, config) in enumerate(bar):
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            with seeded(seed + i), torch.random.fork_rng():
                handle = get_pass(name)(config).apply(handle, ctx)
            ctx.passes_done += 1
            ctx.record(name, seconds=round(time.perf_counter() - t0, 3), config=config.model_dump(mode="json"))
    recipe = {"model": inputs["model"]["source"], **({"base": base_handle.source} if base_handle else {}),
              "seed": seed, "calibration": {k: v for k, v in spec.__dict__.items() if v is not None},
              "passes": [{"type": n, **c.model_dump(mode="json", exclude_unset=True)} for n, c in parsed]}
    return Compressed(handle, reference, base_handle, ctx.log, recipe, inputs, data)


def _metric_specs(metrics: Iterable[Any]) -> list[Any]:
    from .recipe import MetricSpec, validation_error

    out = []
    for i, m in enumerate(metrics):
        try:
            out.append(MetricSpec.model_validate({"metric": m} if isinstance(m, str) else m))
        except ValidationError as exc:
            raise validation_error("evaluate", exc, MetricSpec, prefix=f"evaluate[{i}]") from None
    return out


def evaluate(model: Any, metrics: Iterable[Any], *, reference: ModelLike | None = None, base: ModelLike | None = None,
             seed: int = 0, show_progress: bool = False, device: str | torch.device = "auto") -> dict[str, dict[str, Any]]:
    """Score ``model`` (a :class:`Compressed`, an artifact directory, or anything :func:`compress` takes) and
    its reference with ``metrics`` (names, or ``{"metric": ..., "dataset": ..., "samples": ..., "options":
    {...}}``), same seed for both. Returns ``{metric: {"compressed", "reference", "higher_is_better",
    "details"}}``. The reference defaults to the result's kept input, or the artifact's source model. ``device``
    as in :func:`compress`: the models run there during the metrics and are back on the CPU after."""
    from .artifact import load_artifact, read_manifest

    ref: ModelHandle | None = as_handle(reference, what="reference") if reference is not None else None
    if isinstance(model, Compressed):
        handle, ref = model.handle, ref or model.reference
    elif isinstance(model, (str, Path)) and Path(model).is_dir() and (Path(model) / "modelpress.json").exists():
        handle = load_artifact(model, base=as_handle(base, what="base") if base is not None else None)
        source = read_manifest(Path(model))["recipe"].get("model", handle.source)
        if ref is None:  # the recipe's model: entry, with its overrides (a pipeline's scheduler, guidance)
            from .recipe import ModelSpec

            ref = load_model(ModelSpec.model_validate(source) if isinstance(source, dict) else str(source))
    else:
        handle = as_handle(model)
    out: dict[str, dict[str, Any]] = {}
    with on_device(resolve_device(device), handle.module, *([ref.module] if ref is not None else [])):
        for spec in _metric_specs(metrics):
            out[spec.metric] = _evaluate_one(handle, ref, spec, seed, show_progress)
    return out


def _evaluate_one(handle: ModelHandle, ref: ModelHandle | None, spec: Any, seed: int,
                  show_progress: bool) -> dict[str, Any]:
    """One metric on the model and on its reference (same seed, same data)."""
    from .metrics import EvalContext
    from .metrics import evaluate as run_metric

    data = load_dataset(spec.dataset) if spec.dataset else None

    def ctx() -> EvalContext:
        return EvalContext(seed=seed, samples=spec.samples, options=dict(spec.options), reference=ref,
                           show_progress=show_progress, dataset=data)

    got = run_metric(handle.canonical(), handle, [spec.metric], ctx())[spec.metric]
    entry = {"compressed": got.value, "higher_is_better": got.higher_is_better, "details": got.details}
    if ref is not None:
        entry["reference"] = run_metric(ref.canonical(), ref, [spec.metric], ctx())[spec.metric].value
    return entry


def export(model: Any, formats: Iterable[Any], directory: str | Path, *, calibration: Any = None) -> list[Path]:
    """Export ``model`` (a :class:`Compressed`, an artifact directory, or anything :func:`compress` takes) to
    each of ``formats`` (``"onnx"``, ``"ort"``, ``"pte"`` or ``{"format": ..., ...options}``) in
    ``directory``; returns the files. ``calibration``: a dataset (name, path or object) for static int8."""
    from .artifact import load_artifact
    from .exporters import ExportSpec, export_model
    from .exporters.common import shared_exports
    from .recipe import validation_error

    if isinstance(model, Compressed):
        handle = model.handle
    elif isinstance(model, (str, Path)) and (Path(model) / "modelpress.json").exists():
        handle = load_artifact(model)
    else:
        handle = as_handle(model)
    data = calibration_spec(calibration)[1] if calibration is not None else None
    specs = []
    for i, f in enumerate(formats):
        try:
            specs.append(ExportSpec.model_validate({"format": f} if isinstance(f, str) else f))
        except ValidationError as exc:
            raise validation_error("export", exc, ExportSpec, prefix=f"export[{i}]") from None
    with shared_exports():  # the formats share one export-ready module and one float ONNX graph
        return [export_model(handle, spec, Path(directory), data) for spec in specs]


__all__ = ["Compressed", "compress", "evaluate", "export", "as_handle"]
