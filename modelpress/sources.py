"""Where a model and its data come from: a zoo name or a checkpoint path, resolved to a
:class:`ModelHandle`; a dataset name or path, resolved to a :class:`~modelpress.data.Dataset`.

Below the artifact and the pipeline, so that both (a delta artifact loads its base; a recipe loads its model
and base) use the one resolver without importing each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from . import zoo
from .data import Dataset, open_dataset, prompt_encoder
from .errors import UserError
from .diffusers_pipeline import is_pipeline_dir, load_pipeline
from .model import ModelHandle, load_checkpoint


class ModelSource(Protocol):
    """What a recipe's ``model:`` / ``base:`` gives (:class:`modelpress.recipe.ModelSpec`)."""

    source: str
    kind: str | None
    config: str | Path | None
    prompt_encoder: str | None


def load_model(spec: ModelSource | str) -> ModelHandle:
    """Load a model named by a zoo name or a checkpoint path (with an optional kind and config)."""
    if isinstance(spec, str):
        source, kind, config, encoder = spec, None, None, None
    else:
        source, kind, config = spec.source, spec.kind, spec.config
        encoder = getattr(spec, "prompt_encoder", None)
    overrides = {k: getattr(spec, k, None) for k in PIPELINE_OVERRIDES}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if encoder:
        prompt_encoder(encoder)  # a one-line error for an unknown name
    if zoo.is_zoo_name(source):
        handle = zoo.load(source)
        if kind and kind != handle.kind:
            raise UserError(f"zoo model {source!r} is a {handle.kind} model, not {kind}")
    elif is_pipeline_dir(source):
        handle = load_pipeline(source, prompt_encoder=encoder, **overrides)
        if kind and kind != handle.kind:
            raise UserError(f"the pipeline's UNet is a {handle.kind} model, not {kind}", source)
    else:
        handle = load_checkpoint(source, kind=kind, config=config)
    if overrides and handle.extras.get("sampler") != "pipeline":
        raise UserError(f"model.{next(iter(overrides))}: only for a diffusers pipeline directory (model_index.json, "
                        "or a UNet with scheduler_config.json beside it)", source)
    if encoder:
        handle.extras["prompt_encoder"] = encoder
        if handle.kind == "unet-cond":
            check_prompt_width(handle, encoder)
    return handle


#: the recipe's ``model:`` fields that override what a diffusers pipeline directory says
PIPELINE_OVERRIDES = ("scheduler", "guidance_scale", "sample_size")


def check_prompt_width(handle: ModelHandle, encoder: str) -> None:
    """A one-line error when the named prompt encoder's embeddings are not as wide as the UNet's
    cross-attention."""
    dim = handle.architecture["config"].get("cross_attention_dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    width = prompt_encoder(encoder)([""]).shape[-1]
    if dim and int(dim) != width:
        raise UserError(f"the UNet's cross-attention takes {dim}-wide embeddings, prompt encoder {encoder!r} gives "
                        f"{width}", handle.source)


def load_dataset(ref: str | None, handle: ModelHandle | None = None, role: str = "calibration",
                 base_dir: str | Path | None = None) -> Dataset | None:
    """The dataset ``ref`` names (a zoo dataset, ``random``, a file or folder), else the zoo model's own
    dataset for ``role`` (``calibration``, ``evaluation``, ``validation``), else ``None``."""
    zoo.entries()  # the zoo modules register their datasets and prompt encoders
    if ref is None:
        ref = ((handle.extras.get("datasets") or {}).get(role)) if handle is not None else None
        if ref is None:
            return None
    return open_dataset(ref, None if base_dir is None else str(base_dir))
