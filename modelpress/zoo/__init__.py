"""The embedded model zoo: real models and datasets, built offline and reproducibly.

Each entry has a ``build`` function (deterministic given its seed) and a ``load`` function that returns a
:class:`~modelpress.model.ModelHandle`. Small weights are committed under ``zoo/weights/``; larger ones are
built on first use into the cache directory (``$MODELPRESS_CACHE``, default ``~/.cache/modelpress``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import UserError
from ..model import ModelHandle
from ..registry import Registry

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def cache_dir() -> Path:
    """Where zoo models built on first use are kept (``$MODELPRESS_CACHE``)."""
    d = Path(os.environ.get("MODELPRESS_CACHE", Path.home() / ".cache" / "modelpress"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str
    description: str
    load: Callable[[], ModelHandle]
    build: Callable[[bool], Path]  # build(force) -> directory or file written
    #: the model's own data: named datasets (:mod:`modelpress.data`) by role (``calibration``,
    #: ``evaluation``, ``validation``), used when a recipe names none
    datasets: dict[str, str] = field(default_factory=dict)


def training_step(model: torch.nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, bar: Any, clip: float | None = None) -> None:
    """One optimizer step of a zoo model's training loop: backward, gradient clipping to ``clip`` (when
    given), the optimizer and schedule steps, and the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        from torch.nn.utils import clip_grad_norm_

        clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _discover() -> None:
    # Importing the entry modules registers them.
    from . import digits, lm, text  # noqa: F401


ENTRIES: Registry[ZooEntry] = Registry("zoo model", _discover)


def register(entry: ZooEntry) -> ZooEntry:
    return ENTRIES.add(entry.name, entry)


def entries() -> dict[str, ZooEntry]:
    return ENTRIES.all()


def get(name: str) -> ZooEntry:
    return ENTRIES.get(name)


def load(name: str) -> ModelHandle:
    """Load zoo model ``name``, building and caching it first if needed."""
    entry = get(name)
    handle = entry.load()
    handle.extras.setdefault("zoo", name)
    handle.extras.setdefault("datasets", dict(entry.datasets))
    return handle


def is_zoo_name(spec: str) -> bool:
    return spec in entries()
