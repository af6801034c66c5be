"""The Pass protocol, the Context a pass gets, and the registry that maps a recipe's ``type:`` to a class.

A pass is a small object: a name, a pydantic ``Config`` (unknown keys and out-of-range values are
rejected before any work starts) and ``apply(model, ctx) -> model``. It records what it did in
``ctx.log[<its name>]``; the pipeline puts that log in the artifact's manifest.

Passes live in the method packages (``modelpress.quant``, ``compress``, ``prune``, ``search``) and are
found by importing every module there, so adding a method needs no edit here.
"""
from __future__ import annotations

import importlib
import pkgutil
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm.auto import tqdm

from . import console, distributed
from .data import Dataset
from .errors import UserError
from .model import TEXT_KINDS, ModelHandle
from .registry import Registry


class PassConfig(BaseModel):
    """Base of every pass's options: strict, so a typo in a recipe is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class CalibrationSpec:
    """The recipe's ``calibration:`` block as passes see it (``None``: the recipe does not set it, the pass's
    own default applies; see :meth:`Context.setting`)."""

    samples: int | None = None
    batch_size: int | None = None
    dataset: str | None = None
    seq_len: int | None = None


@dataclass
class Context:
    """What a pass gets besides the model.

    ``base`` is the base model of a delta recipe (``None`` otherwise). ``data`` is the calibration dataset,
    resolved once from ``calibration.dataset`` (or the zoo model's own), ``None`` when there is none.
    ``log`` collects each pass's record (choices, errors, timings) for the manifest. ``scratch`` is a
    private directory that is deleted after the run. ``device``: the recipe's ``device:``, resolved.
    """

    seed: int = 0
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    data: Dataset | None = None
    base: ModelHandle | None = None
    scratch: Path | None = None
    log: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    #: the untouched input model the pipeline keeps for evaluation (see :meth:`original`)
    reference: ModelHandle | None = None
    #: passes run so far in this context, and all the passes it runs
    passes_done: int = 0
    passes_total: int = 0
    #: where passes that compute with the model (distillation, calibration forwards) run
    #: (:func:`modelpress.devices.resolve_device`); the model is handed over and returned on the CPU
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: streamed compression: the input Hessians of the unit being compressed that the pass asked for with
    #: :meth:`Pass.unit_calibration` (layer path -> float64 ``[in, in]``), set before :meth:`Pass.apply_unit`
    unit_hessians: dict[str, torch.Tensor] = field(default_factory=dict)

    def original(self, model: ModelHandle) -> ModelHandle:
        """The model as this pass received it, for passes that need it beside the one they change in place (a
        distillation teacher, reconstruction targets): the pipeline's reference copy when this is the first
        pass, else a copy made now. Passes change the model they are given in place; this is the only copy."""
        if self.reference is not None and self.passes_done == 0:
            return self.reference
        import copy

        return model.replace_module(copy.deepcopy(model.module))

    def result_on_main_only(self) -> bool:
        """Whether, with several ranks, only rank 0 uses what this pass returns: it is the last pass and the
        run keeps its result on rank 0 alone (:func:`modelpress.distributed.results_on_main`). The pass may
        then send its shared work to rank 0 alone, and the other ranks return the model as they got it."""
        return distributed.results_on_main_only() and self.passes_done == self.passes_total - 1

    def progress(self, iterable: Any = None, total: int | None = None, desc: str = "") -> Any:
        """A progress bar for long work inside a pass (nested under the pipeline's stage bar)."""
        return console.progress(iterable, total=total, desc=desc, nested=True, disable=not self.show_progress)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A torch generator seeded from the recipe's seed (``offset`` separates independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def numpy_rng(self, offset: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed * 1_000_003 + offset)

    def record(self, pass_name: str, **entries: Any) -> None:
        self.log.setdefault(pass_name, {}).update(entries)

    def setting(self, config: "PassConfig", name: str) -> Any:
        """A calibration setting (``samples``, ``batch_size``, ``seq_len``) for a pass: the pass's own option
        when its recipe entry sets it, else the recipe's ``calibration:`` value, else the pass's default."""
        if name in config.model_fields_set:
            return getattr(config, name)
        given = getattr(self.calibration, name, None)
        return given if given is not None else getattr(config, name)

    def calibration_data(self, pass_name: str, handle: ModelHandle | None = None) -> Dataset:
        """The calibration dataset (a context made without one takes the zoo model's own, if ``handle`` is a
        zoo model); a one-line error when there is none. Random data is flagged (warning in the report,
        ``calibration.random`` in the manifest)."""
        if self.data is None and handle is not None:
            from .sources import load_dataset

            self.data = load_dataset(self.calibration.dataset, handle, "calibration")
        if self.data is None:
            raise UserError(f"pass {pass_name!r} calibrates on data: set calibration.dataset (a .txt or .jsonl "
                            "file, a folder of texts or images, a named dataset, or 'random')", "calibration")
        if self.data.is_random and "random" not in self.log.get(pass_name, {}).get("calibration", {}):
            self.warn(pass_name, "calibrated on random inputs (calibration.dataset: random): "
                                 "its quality on real data is unknown")
        return self.data

    def calibration_inputs(self, handle: ModelHandle, pass_name: str, n: int, seq_len: int = 64,
                           offset: int = 0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """``n`` calibration examples as ``handle``'s canonical inputs (stacked), drawn with the recipe seed
        plus ``offset`` (or ``generator``); what was drawn is recorded under the pass's ``calibration``."""
        from .data.inputs import model_inputs

        data = self.calibration_data(pass_name, handle)
        inputs, examples = model_inputs(handle, data, n, self.seed + offset if generator is None else generator,
                                        seq_len)
        self.record(pass_name, calibration={"dataset": data.name, "random": data.is_random, "samples": n,
                                            "seq_len": seq_len if handle.kind in TEXT_KINDS else None,
                                            "ids": examples.ids})
        return inputs

    def calibration_batches(self, handle: ModelHandle, pass_name: str, n: int, batch_size: int,
                            seq_len: int = 64, offset: int = 0) -> list[tuple[torch.Tensor, ...]]:
        """:meth:`calibration_inputs` in batches of ``batch_size`` (``n`` rounded up to whole batches)."""
        from .data.inputs import batched

        n = max(1, -(-n // batch_size)) * batch_size
        return batched(self.calibration_inputs(handle, pass_name, n, seq_len, offset), batch_size)

    def warn(self, pass_name: str, message: str) -> None:
        """Something the user should know about the result: printed now, kept in the manifest (the pass's
        ``warnings``) and listed in the report."""
        self.log.setdefault(pass_name, {}).setdefault("warnings", []).append(message)
        tqdm.write(f"warning: {pass_name}: {message}", file=console.terminal())


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch for the block (every pass runs inside one)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    yield


@dataclass
class UnitCalibration:
    """What a streamed pass that calibrates on the model's activations asks for (:meth:`Pass.unit_calibration`):
    the calibration ``batches`` (canonical inputs, in the order the in-memory pass runs them) and, for each unit,
    the input Hessians (:class:`~modelpress.data.capture.HessianAccumulator` with ``scale``) of the layers that
    ``layers(unit, base_unit)`` names. The streamed runner propagates the batches through the blocks
    (:mod:`modelpress.activations`) and hands the Hessians over in :attr:`Context.unit_hessians`: through the
    uncompressed blocks, or with ``sequential`` through each block as the pass compressed it (GPTQ, Sec. 4: block
    ``k + 1`` is calibrated on the quantized block ``k``'s outputs)."""

    batches: list[tuple[torch.Tensor, ...]]
    layers: Callable[[nn.Module, nn.Module | None], list[str]]
    scale: float = 2.0
    sequential: bool = False


class Pass:
    """Base class of every compression pass. Subclasses set ``name`` and ``Config`` and implement ``apply``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    #: whether the pass needs ``base:`` in the recipe (delta compression)
    needs_base: ClassVar[bool] = False
    #: model kinds the pass accepts; empty means any
    kinds: ClassVar[tuple[str, ...]] = ()
    #: export formats that cannot express the pass's output, with why (checked when a recipe is loaded)
    refuses_export: ClassVar[dict[str, str]] = {}
    #: what an export keeps of the pass's compression, when it keeps less than the artifact (shown in the report)
    export_note: ClassVar[str] = ""
    #: whether the pass replaces layers of the model by compressed modules (every pass but ``cast``)
    compresses: ClassVar[bool] = True
    #: whether the pass takes a model that an earlier pass compressed; a recipe putting a pass that does not
    #: after one that compresses is refused when it is read (:func:`modelpress.recipe.check_pass_order`)
    follows_compression: ClassVar[bool] = False
    #: whether the pass's output computes exactly what its input computed, bit for bit (lossless coding)
    lossless: ClassVar[bool] = False

    @classmethod
    def refuses_after_compression(cls, config: PassConfig) -> str:
        """Why this pass, with these options, cannot follow a compressing pass ("" when it can)."""
        return ""

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:  # pragma: no cover - interface
        raise NotImplementedError

    # -- streamed compression (modelpress.stream): one decoder block at a time

    #: whether the in-memory pass, when it calibrates on activations, holds every matrix's float64 input Hessian
    #: at once (Delta-CoMe; ``stream: auto`` counts them, :func:`modelpress.stream.in_memory_bytes`)
    holds_every_hessian: ClassVar[bool] = True

    #: whether a pass that calibrates on activations splits its work between several ranks (:mod:`modelpress.distributed`),
    #: in memory and streamed: the calibration batches by data (the Hessians added over the ranks in rank order)
    #: and its own work within a unit; streamed, every rank then reads every unit, in lockstep
    #: (:func:`modelpress.stream.in_lockstep`). Otherwise a streamed run on several ranks leaves the work to rank 0
    splits_calibration: ClassVar[bool] = False

    #: :meth:`apply_unit` depends on nothing but its unit (not on ``first_layer`` nor on other units), so the
    #: streamed path may compress the units on different ranks (:mod:`modelpress.distributed`)
    units_independent: ClassVar[bool] = False

    def streams(self) -> bool:
        """Whether this pass, with its options, works layer by layer, so that it can run on one block of the
        model at a time (:meth:`apply_unit`, :meth:`record_units`) with the same result: without activations,
        or with the input Hessians of each block's layers that the streamed runner computes from activations
        propagated block by block (:meth:`calibrates_on_activations`)."""
        return False

    def calibrates_on_activations(self) -> bool:
        """Whether the pass, with its options, streams on activations (:meth:`unit_calibration` gives its
        batches); the streamed runner takes one such pass, first in the recipe: its activations are the input
        model's."""
        return False

    def unit_calibration(self, model: ModelHandle, ctx: Context) -> UnitCalibration | None:
        """For a pass that streams and calibrates on activations: its calibration batches, drawn (and recorded in
        ``ctx.log``) as :meth:`apply` draws them, and which layers' input Hessians it needs per unit. Called once
        before the first unit, with the model's structure (weights on the meta device). ``None`` (the default):
        the pass needs no activations."""
        return None

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:  # pragma: no cover - interface
        """Compress one *unit* of a model: a module holding some of the model's submodules under their full
        paths (one decoder block, or the model without its blocks). ``base``: the base model's same unit (delta
        passes). ``first_layer``: the index, in the whole model, of the unit's first linear layer the pass
        compresses. A pass with a :meth:`unit_calibration` finds the unit's Hessians in ``ctx.unit_hessians``.
        Returns the unit and a record part (its ``layers``: how many linear layers the pass compressed in the
        unit); nothing goes to ``ctx.log`` until :meth:`record_units`."""
        raise NotImplementedError

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:  # pragma: no cover - interface
        """Record in ``ctx.log`` what :meth:`apply_unit` did over all units, as :meth:`apply` records it for the
        whole model. ``rank``: a module path's or state-dict name's position in the whole model, to order the
        entries as the in-memory path does (``None``: the parts are in that order already)."""
        raise NotImplementedError


def in_model_order(items: Iterable[Any], rank: Callable[[str], int] | None, key: Callable[[Any], str] = str
                   ) -> list[Any]:
    """``items`` (names, or things named by ``key``) in the whole model's order (:meth:`Pass.record_units`)."""
    items = list(items)
    return items if rank is None else sorted(items, key=lambda item: rank(key(item)))


_METHOD_PACKAGES = ("modelpress.builtin", "modelpress.quant", "modelpress.codecs", "modelpress.prune",
                    "modelpress.search")


def _discover() -> None:
    """Import every module of the method packages (their passes register themselves)."""
    for pkg_name in _METHOD_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        if hasattr(pkg, "__path__"):
            for info in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{pkg_name}.{info.name}")


PASSES: Registry[type[Pass]] = Registry("pass type", _discover)


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available as ``type: <cls.name>`` in recipes."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    return PASSES.add(cls.name, cls, replace=False)


def pass_registry() -> dict[str, type[Pass]]:
    """Every registered pass, by recipe name."""
    return PASSES.all()


def get_pass(name: str) -> type[Pass]:
    return PASSES.get(name)
