"""modelpress: model compression from a recipe file to a compressed checkpoint, exports and a report.

Python entry points::

    modelpress.run_recipe("recipes/quickstart.yaml")   # the whole pipeline, returns the artifact dir
    modelpress.load("runs/quickstart")                 # the compressed model as a runnable torch module
"""
from __future__ import annotations

from ._version import __version__


def load(path, base=None):  # noqa: ANN001, ANN201 - thin re-export with lazy import
    """The compressed model of the artifact at ``path`` as a runnable torch module (see
    :func:`modelpress.artifact.load`)."""
    from .artifact import load as _load

    return _load(path, base)


def run_recipe(path, **kwargs):  # noqa: ANN001, ANN201
    """Validate and run the recipe at ``path`` (see :func:`modelpress.pipeline.run_recipe`)."""
    from .pipeline import run_recipe as _run

    return _run(path, **kwargs)
