"""The recipe: a YAML file parsed into pydantic models, every problem reported before any work starts.

Top-level keys::

    model:        zoo name or checkpoint path, or {source: ..., kind: ..., config: ..., prompt_encoder: ...}
    base:         the base model of a delta recipe (same forms as model)
    seed:         integer, default 0
    calibration:  {dataset: NAME_OR_PATH, samples: N, seq_len: L, batch_size: B}   (unset: each pass's default;
                  dataset unset: the zoo model's own data; ``random`` only when said)
    passes:       [{type: <pass name>, ...that pass's options}, ...]
    export:       [{format: onnx|ort|pte, ...options}, ...]   (a bare string is {format: <it>})
    evaluate:     [<metric name> | {metric: <name>, samples: N, dataset: NAME_OR_PATH, options: {...}}, ...]
    output:       the artifact directory, default runs/<recipe file stem>
    stream:       true | false | auto (default): compress a causal LM one decoder block at a time
    device:       auto (default: a CUDA GPU when present) | cpu | cuda

Errors read ``<file>: <field path>: <what is wrong>``, e.g.
``recipes/x.yaml: passes[1].weight_bits: must be between 2 and 8, got 12``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError
from .model import KINDS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """``prompt_encoder``: the registered text encoder whose token embeddings condition a ``unet-cond`` model
    (``minilm-tokens``: MiniLM's last hidden states, 16 tokens, as the zoo's digits-t2i).

    Overrides of what a diffusers pipeline directory says (:mod:`modelpress.diffusers_pipeline`; an error for
    any other model): ``scheduler`` (a diffusers scheduler class built from the pipeline's scheduler config,
    e.g. ``DDIMScheduler``, or a path to a ``scheduler_config.json``), ``guidance_scale`` (classifier-free
    guidance, default 7.5), ``sample_size`` (the UNet's sample / latent size, an int or ``[H, W]``)."""

    source: str = Field(min_length=1)
    kind: Literal["encoder", "classifier", "causal-lm", "unet", "unet-cond"] | None = None
    config: str | None = None
    prompt_encoder: str | None = None
    scheduler: str | None = Field(None, min_length=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    sample_size: int | list[int] | None = None

    @field_validator("sample_size")
    @classmethod
    def _size(cls, v: Any) -> Any:
        sizes = [v] if isinstance(v, int) else (v or [])
        if v is not None and (not 1 <= len(sizes) <= 2 or any(not 1 <= s <= 4096 for s in sizes)):
            raise ValueError("an int or [height, width], each between 1 and 4096")
        return v


class CalibrationConfig(_Strict):
    """Unset values leave each pass its own default (the paper's setting)."""

    dataset: str | None = Field(None, min_length=1)
    samples: int | None = Field(None, ge=1, le=1_000_000)
    batch_size: int | None = Field(None, ge=1, le=4096)
    seq_len: int | None = Field(None, ge=1, le=1_000_000)


class MetricSpec(_Strict):
    metric: str
    samples: int | None = Field(None, ge=1, le=1_000_000)
    dataset: str | None = Field(None, min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Strict):
    model: ModelSpec
    base: ModelSpec | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    passes: list[Any] = Field(default_factory=list)
    export: list[Any] = Field(default_factory=list)
    evaluate: list[MetricSpec] = Field(default_factory=list)
    output: str | None = None
    #: compress one decoder block at a time (causal-lm checkpoints; passes that work layer by layer): true,
    #: false, or auto (when the in-memory path would not fit in the memory available; modelpress.stream)
    stream: bool | Literal["auto"] = "auto"
    #: where passes, calibration and evaluation run: auto (a CUDA GPU when there is one), cpu or cuda
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("model", "base", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @field_validator("evaluate", mode="before")
    @classmethod
    def _metric_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"metric": m} if isinstance(m, str) else m for m in v]
        return v


class LoadedRecipe(BaseModel):
    """A validated recipe plus the passes and export entries parsed into their own config classes."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    path: Path | None
    recipe: Recipe
    passes: list[tuple[str, Any]]  # (pass name, its Config instance)
    exports: list[Any]  # modelpress.exporters.ExportSpec instances
    raw: dict[str, Any]
    #: the datasets the recipe names, opened and checked once when it was loaded (by resolved name)
    datasets: dict[str, Any] = Field(default_factory=dict)

    @property
    def output(self) -> Path:
        if self.recipe.output:
            return Path(self.recipe.output)
        stem = self.path.stem if self.path else "recipe"
        return Path("runs") / stem


# ---------------------------------------------------------------------------------------------------
# Error messages

def _loc_to_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _bounds(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, Any]:
    """The ge/le (or gt/lt) bounds of the field at ``loc``, for 'must be between' messages."""
    cls: Any = model_cls
    field = None
    for part in loc:
        if isinstance(part, int) or cls is None or not hasattr(cls, "model_fields"):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None, None
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    lo = hi = None
    for m in getattr(field, "metadata", []) if field else []:
        lo = getattr(m, "ge", getattr(m, "gt", lo))
        hi = getattr(m, "le", getattr(m, "lt", hi))
    return lo, hi


def _describe(err: dict[str, Any], model_cls: type[BaseModel]) -> str:
    kind, inp, ctx = err["type"], err.get("input"), err.get("ctx", {})
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        lo, hi = _bounds(model_cls, tuple(err["loc"]))
        if lo is not None and hi is not None:
            return f"must be between {lo} and {hi}, got {inp!r}"
        bound = next(iter(ctx.values()))
        word = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}[kind]
        return f"must be {word} {bound}, got {inp!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {inp!r}"
    msg = err["msg"]
    msg = msg[len("Input should be "):] if msg.startswith("Input should be ") else msg[0].lower() + msg[1:]
    return f"must be {msg}, got {inp!r}" if not msg.startswith("must") else f"{msg}, got {inp!r}"


def validation_error(where: str | None, exc: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> UserError:
    """Turn the first pydantic error into ``UserError('<field path>: <what>', where)``."""
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
    field = _loc_to_path(loc, prefix)
    return UserError(f"{field}: {_describe(err, model_cls)}" if field else _describe(err, model_cls), where)


# ---------------------------------------------------------------------------------------------------
# Loading

def _read_yaml(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a recipe file (one recipe per ``---``-separated document)."""
    if not path.exists():
        raise UserError("no such recipe file", str(path))
    if path.is_dir():
        raise UserError("is a directory, not a recipe file", str(path))
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{line}malformed YAML ({problem})", str(path)) from None
    if not docs:
        raise UserError("the recipe file is empty", str(path))
    for i, data in enumerate(docs):
        if not isinstance(data, dict):
            where = str(path) if len(docs) == 1 else f"{path} (document {i + 1})"
            raise UserError("a recipe must be a mapping of keys (model, passes, ...)", where)
    return docs


def _check_model_source(spec: ModelSpec, field: str, where: str, recipe_dir: Path | None) -> ModelSpec:
    from . import zoo

    if zoo.is_zoo_name(spec.source):
        return spec
    p = Path(spec.source)
    if not p.exists() and recipe_dir is not None and (recipe_dir / p).exists():
        p = recipe_dir / p
    if not p.exists():
        raise UserError(f"{field}: no zoo model or file named {spec.source!r} (zoo: "
                        f"{', '.join(sorted(zoo.entries()))})", where)
    return spec.model_copy(update={"source": str(p)})


def model_kind(spec: ModelSpec, where: str) -> str:
    """The kind of the recipe's model, known before it is loaded: the zoo entry's, or read from the
    checkpoint's config (a forced ``model.kind`` that does not fit the model class is a one-line error)."""
    from . import zoo
    from .model import checkpoint_kind

    if zoo.is_zoo_name(spec.source):
        kind = zoo.get(spec.source).kind
        if spec.kind and spec.kind != kind:
            raise UserError(f"model.kind: zoo model {spec.source!r} is a {kind} model, not {spec.kind}", where)
        return kind
    from .diffusers_pipeline import INDEX, is_pipeline_dir

    source = Path(spec.source)
    if is_pipeline_dir(source) and (source / INDEX).exists():
        source = source / "unet"  # the pipeline's kind is its UNet's (load_pipeline checks the rest)
    try:
        return checkpoint_kind(source, spec.kind, spec.config)
    except UserError as exc:
        if spec.kind is None:
            raise
        raise UserError(f"model.kind: {exc}", where) from None


def parse_passes(passes: Any, where: str | None = None) -> list[tuple[str, Any]]:
    """``(name, config)`` pairs from recipe-shaped dicts (``{"type": ..., options}``) or ``(name, config)``
    pairs; every entry validated against its pass's ``Config`` (errors name ``passes[i].option``)."""
    from .passes import PassConfig, get_pass

    out = []
    for i, entry in enumerate(passes):
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], PassConfig):
            out.append((get_pass(entry[0]).name, entry[1]))
            continue
        if not isinstance(entry, dict) or "type" not in entry:
            raise UserError(f"passes[{i}]: must be a mapping with a 'type' key", where)
        try:
            cls = get_pass(str(entry["type"]))
        except UserError as exc:
            raise UserError(f"passes[{i}].type: {exc.message}", where) from None
        try:
            config = cls.Config.model_validate({k: v for k, v in entry.items() if k != "type"})
        except ValidationError as exc:
            raise validation_error(where, exc, cls.Config, prefix=f"passes[{i}]") from None
        out.append((cls.name, config))
    return out


def check_passes_fit(passes: list[tuple[str, Any]], kind: str | None, has_base: bool, where: str | None,
                     base_hint: str, model_name: str = "") -> None:
    """Each pass takes models of ``kind`` (unchecked when ``None``) and has the base it needs (delta passes);
    a one-line error naming ``passes[i]`` otherwise (``base_hint``: how to give the base, ``model_name``:
    appended to a kind mismatch)."""
    from .passes import get_pass

    for i, (name, _) in enumerate(passes):
        cls = get_pass(name)
        if cls.needs_base and not has_base:
            raise UserError(f"passes[{i}]: pass {name!r} compresses a fine-tune against its base: {base_hint}", where)
        if cls.kinds and kind and kind not in cls.kinds:
            raise UserError(f"passes[{i}]: pass {name!r} works on {', '.join(cls.kinds)} models, not {kind}"
                            f"{model_name}", where)
    check_pass_order(passes, where)


def check_pass_order(passes: list[tuple[str, Any]], where: str | None) -> None:
    """Passes stack only as they declare: after the first pass that compresses the model (``compresses``),
    every pass must take compressed models (``follows_compression``) with the options given
    (``refuses_after_compression``); a one-line error naming ``passes[i]`` and the earlier pass otherwise."""
    from .passes import get_pass

    first: tuple[int, str] | None = None
    for i, (name, config) in enumerate(passes):
        cls = get_pass(name)
        if first is not None:
            j, earlier = first
            if not cls.follows_compression:
                raise UserError(f"passes[{i}]: pass {name!r} cannot follow {earlier!r} (passes[{j}]): it works on "
                                f"the model's plain layers, which {earlier!r} has replaced; run it first or "
                                "drop one", where)
            why = cls.refuses_after_compression(config)
            if why:
                raise UserError(f"passes[{i}]: pass {name!r} after {earlier!r} (passes[{j}]): {why}", where)
        if cls.compresses and first is None:
            first = (i, name)


def _check_datasets(recipe: Recipe, where: str, recipe_dir: Path | None) -> dict[str, Any]:
    """Open every dataset the recipe names (files are read and checked line by line) before any work, and
    rewrite relative paths to paths from the working directory; returns them by that name, so that the run
    uses what was checked without reading the files again."""
    from .sources import load_dataset

    opened: dict[str, Any] = {}
    entries = [("calibration.dataset", recipe.calibration)] + \
              [(f"evaluate[{i}].dataset", m) for i, m in enumerate(recipe.evaluate)]
    for field, holder in entries:
        if holder.dataset is None:
            continue
        try:
            data = opened.get(holder.dataset) or load_dataset(holder.dataset, base_dir=recipe_dir)
        except UserError as exc:
            raise UserError(f"{field}: {exc}", where) from None
        holder.dataset = data.name
        opened[data.name] = data
    return opened


def parse_recipe(data: dict[str, Any], where: str = "<recipe>", recipe_dir: Path | None = None) -> LoadedRecipe:
    """Validate a recipe mapping completely: top-level schema, model paths, every pass and export entry."""
    from .passes import get_pass

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise validation_error(where, exc, Recipe) from None
    recipe = recipe.model_copy(update={"model": _check_model_source(recipe.model, "model", where, recipe_dir)})
    if recipe.base is not None:
        recipe = recipe.model_copy(update={"base": _check_model_source(recipe.base, "base", where, recipe_dir)})

    kind = model_kind(recipe.model, where)
    passes = parse_passes(recipe.passes, where)
    check_passes_fit(passes, kind, recipe.base is not None, where, base_hint="add 'base:'")
    if recipe.stream is True:
        from .stream import why_not_streamed

        reason = why_not_streamed(recipe.model, recipe.base, passes)
        if reason:
            raise UserError(f"stream: true, but {reason}", where)

    exports = []
    if recipe.export:
        from .exporters import ExportSpec

        for i, entry in enumerate(recipe.export):
            entry = {"format": entry} if isinstance(entry, str) else entry
            try:
                exports.append(ExportSpec.model_validate(entry))
            except ValidationError as exc:
                raise validation_error(where, exc, ExportSpec, prefix=f"export[{i}]") from None
            misfit = exports[-1].refusal(kind)
            if misfit:
                raise UserError(f"export[{i}]: {misfit}", where)
            for name, _ in passes:
                why = get_pass(name).refuses_export.get(exports[-1].format)
                if why:
                    raise UserError(f"export[{i}]: a model from pass {name!r} cannot be exported to "
                                    f"{exports[-1].format}: {why}", where)

    datasets = _check_datasets(recipe, where, recipe_dir)
    from .metrics import metric_registry

    metrics = metric_registry()
    for i, m in enumerate(recipe.evaluate):
        if m.metric not in metrics and m.metric != "size":
            raise UserError(f"evaluate[{i}].metric: unknown metric {m.metric!r}; available: "
                            f"{', '.join(sorted([*metrics, 'size']))}", where)
        misfit = metrics[m.metric].misfit(kind) if m.metric in metrics else None
        if misfit:
            raise UserError(f"evaluate[{i}].metric: {misfit}", where)
    return LoadedRecipe(path=Path(where) if where != "<recipe>" else None, recipe=recipe, passes=passes,
                        exports=exports, raw=data, datasets=datasets)


def load_recipes(path: str | Path) -> list[LoadedRecipe]:
    """Read and validate every recipe in the file at ``path`` before any work starts.

    A file may hold several recipes as ``---``-separated YAML documents (the quickstart runs one per method
    family); each needs its own ``output:`` (default ``runs/<file stem>-<n>``)."""
    p = Path(path)
    docs = _read_yaml(p)
    if len(docs) == 1:
        return [parse_recipe(docs[0], str(p), p.parent)]
    loaded = []
    for i, data in enumerate(docs):
        r = parse_recipe(data, f"{p} (document {i + 1})", p.parent)
        r.path = p
        if r.recipe.output is None:
            r.recipe.output = str(Path("runs") / f"{p.stem}-{i + 1}")
        loaded.append(r)
    outputs = [r.output for r in loaded]
    if len(set(outputs)) != len(outputs):
        raise UserError("two recipes in this file write the same output directory", str(p))
    return loaded


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a single-recipe file at ``path`` (raises :class:`UserError` with file and field)."""
    loaded = load_recipes(path)
    if len(loaded) != 1:
        raise UserError(f"holds {len(loaded)} recipes; expected one", str(path))
    return loaded[0]


__all__ = ["Recipe", "ModelSpec", "LoadedRecipe", "load_recipe", "load_recipes", "parse_recipe", "KINDS"]
