"""Metrics, from a registry, usable in a recipe's ``evaluate:`` list and from Python.

A metric is a function ``fn(model, handle, ctx) -> MetricResult``:

* ``model`` is a callable with the kind's canonical signature (see :mod:`modelpress.model`): the torch
  model wrapped by ``handle.canonical()``, or an exported model running in its own runtime;
* ``handle`` gives the kind and extras (zoo name, tokenizer directory, scheduler);
* ``ctx`` gives the seed, sample count and the reference (uncompressed) model.

Every metric runs on the reference and on the compressed model in the same run, with the same seed.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import Dataset
from ..errors import UserError
from ..model import ModelHandle
from ..registry import Registry


@dataclass
class EvalContext:
    seed: int = 0
    samples: int | None = None  # metric-specific default when None
    options: dict[str, Any] = field(default_factory=dict)
    reference: ModelHandle | None = None
    show_progress: bool = True
    #: the metric's data (``evaluate[i].dataset``); ``None``: the zoo model's own evaluation data
    dataset: Dataset | None = None


@dataclass
class MetricResult:
    value: float
    higher_is_better: bool
    #: anything worth keeping in report.json (sample counts, seeds, per-class numbers)
    details: dict[str, Any] = field(default_factory=dict)
    #: generated images [N, C, H, W] in [0, 1], for sample grids in the report
    images: torch.Tensor | None = None


MetricFn = Callable[[nn.Module, ModelHandle, EvalContext], MetricResult]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    kinds: tuple[str, ...]
    description: str
    #: compares against the reference's own outputs (its reference value is trivially 0 or 1)
    relative: bool = False

    def misfit(self, kind: str) -> str | None:
        """Why the metric cannot score a model of ``kind`` (``None`` when it can)."""
        if self.kinds and kind not in self.kinds:
            return f"metric {self.name!r} applies to {', '.join(self.kinds)} models, not {kind}"
        return None


def _discover() -> None:
    """Import the metric modules (their metrics register themselves)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "report":
            importlib.import_module(f"{__name__}.{info.name}")


METRICS: Registry[Metric] = Registry("metric", _discover)


def register_metric(name: str, kinds: tuple[str, ...], description: str, relative: bool = False) -> Callable[[MetricFn], MetricFn]:
    """Decorator: make ``fn`` available as ``evaluate: [name]`` in recipes for models of ``kinds``."""

    def wrap(fn: MetricFn) -> MetricFn:
        METRICS.add(name, Metric(name, fn, kinds, description, relative))
        return fn

    return wrap


def metric_registry() -> dict[str, Metric]:
    return METRICS.all()


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def evaluate(model: nn.Module, handle: ModelHandle, names: list[str], ctx: EvalContext) -> dict[str, MetricResult]:
    """Run the metrics ``names`` on ``model`` (canonical callable) and return their results."""
    out: dict[str, MetricResult] = {}
    for name in names:
        metric = get_metric(name)
        misfit = metric.misfit(handle.kind)
        if misfit:
            raise UserError(misfit)
        with torch.no_grad():
            out[name] = metric.fn(model, handle, ctx)
    return out


def artifact_dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
