"""modelpress: model compression from a recipe file (or three Python calls) to a compressed checkpoint,
exports and a report.

Python entry points::

    result = modelpress.compress("minilm-docs", [{"type": "bitdelta"}], base="minilm")  # -> .model, .save(dir)
    modelpress.evaluate(result, ["accuracy", "logit_kl"])        # compressed vs reference, same seed
    modelpress.export(result, ["onnx"], "exports/")                 # ONNX / .ort / .pte files
    modelpress.run_recipe("recipes/quickstart.yaml")             # the whole pipeline, returns the artifact dir
    modelpress.load("runs/quickstart")                           # an artifact as a runnable torch module

Imports are lazy: ``import modelpress`` loads no torch model code until one of these is called.
"""
from __future__ import annotations

from typing import Any

from ._version import __version__


def compress(model: Any, passes: Any = (), **kwargs: Any) -> Any:
    """Run compression passes on a model (see :func:`modelpress.api.compress`)."""
    from .api import compress as _compress

    return _compress(model, passes, **kwargs)


def evaluate(model: Any, metrics: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Score a compressed model and its reference (see :func:`modelpress.api.evaluate`)."""
    from .api import evaluate as _evaluate

    return _evaluate(model, metrics, **kwargs)


def export(model: Any, formats: Any, directory: Any, **kwargs: Any) -> list:
    """Export a model or artifact to ONNX / .ort / .pte (see :func:`modelpress.api.export`)."""
    from .api import export as _export

    return _export(model, formats, directory, **kwargs)


def load(path: Any, base: Any = None) -> Any:
    """The compressed model of the artifact at ``path`` as a runnable torch module (see
    :func:`modelpress.artifact.load`)."""
    from .artifact import load as _load

    return _load(path, base)


def run_recipe(path: Any, **kwargs: Any) -> Any:
    """Validate and run the recipe at ``path`` (see :func:`modelpress.pipeline.run_recipe`)."""
    from .pipeline import run_recipe as _run

    return _run(path, **kwargs)


__all__ = ["__version__", "compress", "evaluate", "export", "load", "run_recipe"]
