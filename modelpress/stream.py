"""Streamed compression: a causal LM checkpoint compressed one decoder block at a time, never whole in memory.

Issue 20 ("Beyond one machine's memory"); the peers do the same: llm-compressor's sequential pipeline onloads one
decoder layer at a time. For passes that work layer by layer (``cast``, ``dfloat11``, ``bitdelta`` with
``steps: 0``, ``dare``, ``bnb``, ``gptq``, ``delta_come``: each declares it with :meth:`~modelpress.passes.Pass.streams`):

1. The checkpoint (and, for a delta, the base) is opened lazily (:class:`~modelpress.shards.ShardedCheckpoint`:
   headers only, every shard and tensor checked before any work) and the model is built with its parameters on
   the ``meta`` device (structure, no weights; :func:`parameters_on_meta`).
2. The model is cut into *units*: each decoder block (the items of the longest ``nn.ModuleList`` of repeated
   blocks, ``model.layers`` of a Llama), held under its full path (``model.layers.7.mlp...``), and last the
   model without its blocks (embeddings, final norm, ``lm_head``, tied weights together).
3. Per unit: its tensors are read from the shards (for a delta, the base's same unit too), every pass runs on it
   (:meth:`~modelpress.passes.Pass.apply_unit`), its artifact tensors are appended to the weights spool
   (:class:`~modelpress.artifact.WeightsSpool`) and the unit is freed. A pass that calibrates on activations
   (``gptq``, Delta-CoMe's GPTQ; :meth:`~modelpress.passes.Pass.calibrates_on_activations`) gets the unit's input
   Hessians from the calibration batches propagated block by block (:mod:`modelpress.activations`): through the
   input model's blocks, or, for ``gptq``'s sequential mode, through each block as the pass compressed it.
4. At the end the passes record what they did over all units, in the whole model's order
   (:meth:`~modelpress.passes.Pass.record_units`), the spool becomes ``model.safetensors`` and the manifest is
   written: the same bytes as the in-memory path for the same recipe and seed (``tests/test_stream.py``). All of
   it happens inside the run's staging directory, renamed into place only when the whole run succeeded.

Peak memory: about one unit of the fine-tune plus one of the base, plus what a pass makes of it, plus a fixed
overhead (Python, torch, the meta model), plus for a pass on activations the calibration activations;
docs/scale.md has the measurements. The input's sha256 (kept in the manifest, as the in-memory path does) is
computed by reading the tensors once more, one at a time.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import console, distributed
from .activations import BlockActivations
from .artifact import (WEIGHTS, WEIGHTS_METADATA, WeightsSpool, artifact_state, build_manifest, hash_tensor,
                       module_entries, tensor_entry, write_manifest)
from .data import Dataset
from .devices import memory_available, release_free_memory
from .errors import UserError
from .model import (ModelHandle, align_prefix, build_checkpoint_module, check_kind, checkpoint_paths, find_blocks,
                    checkpoint_record, describe_architecture, guess_kind, read_architecture, tokenizer_extras)
from .modules import module_class, set_submodule
from .passes import CalibrationSpec, Context, Pass, UnitCalibration, get_pass, seeded
from .shards import ShardedCheckpoint

#: what the recipe's ``stream:`` takes
StreamOption = Any  # bool | "auto"


@dataclass
class Unit:
    """A part of the model compressed at once: a module holding some submodules under their full paths;
    ``block_path``: the path of the decoder block it holds (``None``: the model without its blocks)."""

    label: str
    module: nn.Module
    block_path: str | None = None


def _nested(path: str, leaf: str, block: nn.Module) -> nn.Module:
    """A bare module holding ``block`` at ``path.leaf`` (so its state-dict names are the whole model's)."""
    root = parent = nn.Module()
    for part in [p for p in path.split(".") if p]:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, block)
    return root


def _order(module: nn.Module) -> dict[str, int]:
    """Every module path and state-dict name of ``module`` -> its position (state-dict order)."""
    order: dict[str, int] = {}
    for name, mod in module.named_modules():
        order.setdefault(name, len(order))
        for leaf in [*mod._parameters, *mod._buffers]:
            order.setdefault(f"{name}.{leaf}" if name else leaf, len(order))
    return order


def cut_units(skeleton: nn.Module, blocks_path: str) -> list[Unit]:
    """``skeleton`` (a model on the meta device) cut into copies of each decoder block (the items of the
    ``nn.ModuleList`` at ``blocks_path``, each under its full path), then the model without its blocks."""
    blocks = skeleton.get_submodule(blocks_path)
    out = [Unit(f"{blocks_path}.{i}", _nested(blocks_path, str(i), copy.deepcopy(b)), f"{blocks_path}.{i}")
           for i, b in enumerate(blocks)]
    set_submodule(skeleton, blocks_path, nn.ModuleList())
    try:
        rest = copy.deepcopy(skeleton)
    finally:
        set_submodule(skeleton, blocks_path, blocks)
    return out + [Unit("embeddings and head", rest)]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside the block get their parameters on the meta device (no memory, no initialisation)
    and their buffers where the constructors make them. Unlike building under ``torch.device("meta")``, the
    buffers in no checkpoint (non-persistent: a rotary embedding's ``inv_freq``, GPT-2's causal mask) are real,
    as the model's forward needs them (:mod:`modelpress.activations`). A parameter already on meta is
    registered as it is, so that tied weights stay one object."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class LazyModel:
    """A causal-LM checkpoint opened without reading its weights: its shards' headers (checked), the model
    built with its parameters on the meta device, and where each state-dict tensor is stored (a tied name: its
    stored twin)."""

    def __init__(self, source: str, kind: str | None = None, config: str | None = None, what: str = "model") -> None:
        p = Path(source)
        files, cfg_path = checkpoint_paths(p, config)
        self.checkpoint = ShardedCheckpoint.open(p) if p.is_dir() else ShardedCheckpoint(files)
        arch = read_architecture(cfg_path)
        if kind is not None:
            check_kind(arch, kind, str(p))
        self.kind = kind or guess_kind(arch)
        if self.kind != "causal-lm":
            raise UserError(f"streamed compression takes causal-lm checkpoints; the {what} is a "
                            f"{self.kind or arch['class']} model (set stream: false)", str(p))
        with parameters_on_meta():  # buffers made by the constructors (rotary inv_freq), on the CPU
            self.skeleton = build_checkpoint_module(arch, cfg_path)
        self.source, self.path = str(p), p
        self.architecture = describe_architecture(self.skeleton)
        self.extras = tokenizer_extras(p, arch)
        self.stored = self._stored_names()
        self.order = _order(self.skeleton)
        self.blocks_path = self._blocks_path()

    # -- opening

    def _stored_names(self) -> dict[str, str]:
        """State-dict name -> the checkpoint tensor holding it; the checks of
        :func:`modelpress.model.load_weights_into`, made on the headers (one-line errors naming the file)."""
        own = self.skeleton.state_dict(keep_vars=True)
        aligned = align_prefix(self.skeleton, {n: n for n in self.checkpoint.tensors})
        non_persistent = {name for name, _ in self.skeleton.named_buffers()} - set(own)
        aligned = {k: v for k, v in aligned.items() if k not in non_persistent}
        first: dict[int, str] = {}
        groups: dict[str, list[str]] = {}
        for name, t in own.items():  # tied names are one Parameter object, also on the meta device
            groups.setdefault(first.setdefault(id(t), name), []).append(name)
        stored: dict[str, str] = {}
        for names in groups.values():
            found = next((aligned[n] for n in names if n in aligned), None)
            if found is None:
                raise UserError(f"weights do not match the config: tensor {names[0]!r} is in no weight file",
                                self.source)
            for n in names:
                stored[n] = aligned.get(n, found)
        unexpected = sorted(set(aligned) - set(own))
        if unexpected:
            info = self.checkpoint.tensors[aligned[unexpected[0]]]
            raise UserError(f"weights do not match the config: {len(unexpected)} unexpected tensors, e.g. "
                            f"{unexpected[0]!r}", str(info.file))
        for name, t in own.items():
            info = self.checkpoint.tensors[stored[name]]
            if info.shape != tuple(t.shape):
                raise UserError(f"weights do not match the config: {stored[name]} has shape {info.shape}, the "
                                f"config needs {tuple(t.shape)}", str(info.file))
            if info.dtype.is_floating_point != t.is_floating_point():
                raise UserError(f"weights do not match the config: {stored[name]} is {info.dtype}, the model "
                                f"needs {t.dtype}", str(info.file))
        return stored

    def _blocks_path(self) -> str:
        try:
            return find_blocks(self.skeleton)
        except UserError:
            raise UserError(f"a {type(self.skeleton).__name__} has no stack of repeated decoder blocks to stream "
                            "(set stream: false)", self.source) from None

    # -- units

    def units(self) -> list[Unit]:
        """Each decoder block, then the model without its blocks (embeddings, final norm, head)."""
        return cut_units(self.skeleton, self.blocks_path)

    def materialize(self, module: nn.Module) -> nn.Module:
        """Give ``module`` (a unit on the meta device) its weights from the shards, in the stored dtypes; tied
        names get one shared parameter, as :func:`modelpress.model.load_weights_into` leaves them."""
        own = module.state_dict(keep_vars=True)
        tensors = self.checkpoint.read(sorted({self.stored[n] for n in own}))
        made: dict[int, torch.Tensor] = {}
        for name, t in own.items():
            value = made.get(id(t))
            if value is None:
                value = tensors[self.stored[name]]
                if isinstance(t, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=t.requires_grad)
                made[id(t)] = value
            path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(path)
            if leaf in owner._parameters:
                owner._parameters[leaf] = value
            else:
                owner._buffers[leaf] = value
        return module.eval()

    def handle(self, module: nn.Module) -> ModelHandle:
        return ModelHandle(module, self.kind, self.source, self.architecture, dict(self.extras))

    def sha256(self) -> str:
        """:func:`modelpress.artifact.tensors_sha256` of the loaded model's state dict, one tensor in memory."""
        h = hashlib.sha256()
        for name in sorted(self.stored):
            hash_tensor(h, name, self.checkpoint.read([self.stored[name]])[self.stored[name]])
        return h.hexdigest()

    def stored_skeleton(self) -> nn.Module:
        """A copy of the model on the meta device with each tensor in its stored dtype: the sizes of the model
        loaded, without its weights (the report's reference of a streamed evaluation)."""
        module = copy.deepcopy(self.skeleton)
        for name, t in module.state_dict(keep_vars=True).items():
            t.data = torch.empty(t.shape, dtype=self.checkpoint.tensors[self.stored[name]].dtype, device="meta")
        return module

    def checkpoint_record(self) -> dict[str, Any]:
        """:func:`modelpress.model.checkpoint_record` of the checkpoint, from its headers."""
        state = {n: torch.empty(i.shape, dtype=i.dtype, device="meta") for n, i in self.checkpoint.tensors.items()}
        return checkpoint_record(self.checkpoint.files, state)

    def input_record(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256()}


def check_same_layout(model: LazyModel, base: LazyModel) -> None:
    """A delta streams block by block only against a base of the same layout: every tensor of the fine-tune's
    blocks has the same name and shape in the base (one-line error naming the base's file and the tensor)."""
    for name, stored in model.stored.items():
        if not name.startswith(model.blocks_path + "."):
            continue
        mine = model.checkpoint.tensors[stored].shape
        theirs = base.stored.get(name)
        if theirs is None:
            raise UserError(f"the base has no tensor {name!r} (the fine-tune's, shape {list(mine)})", base.source)
        info = base.checkpoint.tensors[theirs]
        if info.shape != mine:
            raise UserError(f"the base's {theirs} has shape {list(info.shape)}, the fine-tune's {list(mine)} "
                            f"({model.checkpoint.tensors[stored].file.name})", str(info.file))


# ---------------------------------------------------------------------------------------------------
# Choosing the path


def why_not_streamed(model: Any, base: Any, passes: list[tuple[str, Any]]) -> str | None:
    """Why this recipe's model and passes cannot be compressed block by block (``None``: they can)."""
    from . import zoo

    for spec in [model] + ([base] if base is not None else []):
        if zoo.is_zoo_name(spec.source):
            return f"{spec.source!r} is a zoo model (streaming reads causal-lm checkpoint directories)"
        p = Path(spec.source)
        try:
            arch = read_architecture(checkpoint_paths(p, spec.config)[1])
        except UserError:
            return None  # the stream's own open gives the one-line error
        if (spec.kind or guess_kind(arch)) != "causal-lm":
            return f"{spec.source} is not a causal-lm checkpoint"
    for i, (name, config) in enumerate(passes):
        p = get_pass(name)(config)
        if not p.streams():
            return (f"pass {name!r} with these options needs the whole model (it calibrates, searches or "
                    "distils on the model's outputs)")
        if p.calibrates_on_activations() and i > 0:
            return (f"pass {name!r} calibrates on the activations of the model as given: streamed, it has to be "
                    "the recipe's first pass")
    if not passes:
        return "the recipe has no passes"
    return None


def in_memory_bytes(model: Any, base: Any, passes: list[tuple[str, Any]] = ()) -> int:
    """What the in-memory path holds at its peak, estimated from the checkpoints' bytes on disk: 4x the model's
    (the model, its untouched reference copy, the compressed model and its serialized weights) plus 2x the base's
    (the base and the copies of its weights the delta layers take). benchmarks/scale.py measured 3.9x for
    dfloat11 (0.5B) and 4x + 2x for BitDelta (docs/scale.md). A pass that calibrates on activations and
    holds every matrix's float64 input Hessian at once (Delta-CoMe; not ``gptq``, which goes block by block) adds
    them (:func:`hessians_bytes`)."""
    checkpoint = ShardedCheckpoint.open(Path(model.source))
    total = 4 * checkpoint.bytes_on_disk()
    if base is not None:
        total += 2 * ShardedCheckpoint.open(Path(base.source)).bytes_on_disk()
    if any(p.calibrates_on_activations() and p.holds_every_hessian
           for p in (get_pass(name)(config) for name, config in passes)):
        total += hessians_bytes(checkpoint)
    return total


def hessians_bytes(checkpoint: ShardedCheckpoint) -> int:
    """Bytes of a float64 ``[in, in]`` input Hessian for every matrix of the checkpoint (each 2-D tensor
    ``[out, in]``; an embedding table counts as one too: an overestimate by its hidden size squared). A 7B
    Llama's: about 57 GB."""
    return sum(8 * info.shape[1] ** 2 for info in checkpoint.tensors.values() if len(info.shape) == 2)


def use_streaming(option: StreamOption, model: Any, base: Any, passes: list[tuple[str, Any]], where: str) -> bool:
    """``stream: true`` (a one-line error when it cannot be), ``false``, or ``auto``: stream when it can and the
    in-memory path would not fit in the memory available now (:func:`in_memory_bytes`)."""
    if option is False:
        return False
    if option is True:
        reason = why_not_streamed(model, base, passes)
        if reason:
            raise UserError(f"stream: true, but {reason}", where)
        return True
    try:
        return why_not_streamed(model, base, passes) is None and in_memory_bytes(model, base, passes) > memory_available()
    except (UserError, OSError):  # an unreadable checkpoint: the in-memory loader reports it, as it always has
        return False


# ---------------------------------------------------------------------------------------------------
# The streamed run


def shares_units(passes: list[tuple[str, Any]]) -> bool:
    """Whether the ranks of this run (:mod:`modelpress.distributed`) compress the units together: only when every
    pass's units are independent (:attr:`~modelpress.passes.Pass.units_independent`) and none calibrates on
    activations (they propagate through the blocks in order). Otherwise rank 0 compresses every unit alone and the
    other ranks have nothing to do. ``False`` in one process."""
    return distributed.active() and all(p.units_independent and not p.calibrates_on_activations()
                                        for p in (get_pass(name)(config) for name, config in passes))


def in_lockstep(passes: list[tuple[str, Any]]) -> bool:
    """Whether the ranks of this run work on every unit together: a pass calibrates on activations and splits
    that work between the ranks (:attr:`~modelpress.passes.Pass.splits_calibration`: GPTQ's calibration by data,
    its solves by layer). Every rank then reads each unit; rank 0 writes the artifact. ``False`` in one process."""
    return distributed.active() and any(p.calibrates_on_activations() and p.splits_calibration
                                        for p in (get_pass(name)(config) for name, config in passes))


def compress_streamed(model: Any, passes: list[tuple[str, Any]], staging: Path | None, *, base: Any = None,
                      seed: int = 0, calibration: CalibrationSpec | None = None, data: Dataset | None = None,
                      recipe: dict[str, Any] | None = None, show_progress: bool = False) -> dict[str, Any] | None:
    """Compress ``model`` (a recipe's model spec: ``source``, ``kind``, ``config``) with ``passes`` block by block
    into the staging directory ``staging`` (see the module docstring); returns the manifest.

    With several ranks (:mod:`modelpress.distributed`) and passes whose units are independent
    (:attr:`~modelpress.passes.Pass.units_independent`), the units are compressed in rounds of one per rank and
    gathered on rank 0, which appends them in the model's order: the same bytes as one process. Rank 0 is
    called with the staging directory and returns the manifest; the other ranks with ``None`` and return
    ``None``. With passes that number their layers across units (DARE's per-layer seeds) rank 0 compresses
    every unit alone."""
    ft = LazyModel(model.source, model.kind, model.config)
    lazy_base = LazyModel(base.source, base.kind, base.config, "base") if base is not None else None
    if lazy_base is not None:
        check_same_layout(ft, lazy_base)
    objs: list[Pass] = [get_pass(name)(config) for name, config in passes]
    ctx = Context(seed=seed, calibration=calibration or CalibrationSpec(), data=data, show_progress=False)
    units = ft.units()
    base_units = lazy_base.units() if lazy_base is not None else [None] * len(units)
    shared = shares_units(passes)
    if staging is None:  # a rank other than 0
        if shared:
            for start in range(0, len(units), distributed.world_size()):
                i = start + distributed.rank()
                distributed.gather_to_main(
                    _compress_unit(ft, lazy_base, units[i], base_units[i], objs, ctx, seed) if i < len(units) else None)
        elif in_lockstep(passes):
            _run_units(ft, lazy_base, units, base_units, objs, ctx, None, seed, False)
        return None
    inputs = {"model": ft.input_record()}
    if lazy_base is not None:
        inputs["base"] = lazy_base.input_record()
    if data is not None:
        inputs["calibration"] = {"dataset": data.name, "random": data.is_random}
    spool = WeightsSpool(Path(staging) / WEIGHTS)
    try:
        record = _run_units(ft, lazy_base, units, base_units, objs, ctx, spool, seed, show_progress, shared)
        manifest = _manifest(ft, passes, objs, ctx, record, recipe, inputs)
        spool.finish(WEIGHTS_METADATA)
    except BaseException:
        spool.close()
        raise
    write_manifest(staging, manifest)
    return manifest


@dataclass
class _Written:
    parts: list[list[dict[str, Any]]]
    seconds: list[float]
    modules: list[dict[str, Any]]
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    aliases: dict[str, str]
    from_base: dict[str, str]
    largest_unit_bytes: int
    activation_bytes: int = 0


@dataclass
class _Calibrating:
    """The recipe's pass that calibrates on activations (its position ``index``), what it asked for, and the
    calibration batches' activations propagated so far (:mod:`modelpress.activations`)."""

    index: int
    spec: UnitCalibration
    activations: BlockActivations

    def hessians(self, unit: Unit, handle: ModelHandle, base: nn.Module | None) -> dict[str, torch.Tensor]:
        """The input Hessians of the unit's layers the pass names; a block's outputs become the next one's inputs."""
        layers = self.spec.layers(handle.module, base)
        if unit.block_path is not None:
            return self.activations.through_block(handle.module, unit.block_path, layers, self.spec.scale,
                                                  advance=not self.spec.sequential)
        return self.activations.through_rest(handle, layers, self.spec.scale)

    def advance(self, unit: Unit, handle: ModelHandle) -> None:
        """In sequential mode, the block as the pass compressed it gives the next block's inputs."""
        if self.spec.sequential and unit.block_path is not None:
            self.activations.propagate(handle.module.get_submodule(unit.block_path))


def _start_calibration(ft: LazyModel, rest: Unit, objs: list[Pass], ctx: Context,
                       seed: int) -> _Calibrating | None:
    """For a pass that calibrates on activations (the first, :func:`why_not_streamed`): its batches, drawn as the
    in-memory pass draws them, run up to block 0's inputs through the model without its blocks, read from the
    shards for this and dropped (``rest``: that unit on the meta device, kept as it is)."""
    for i, p in enumerate(objs):
        if p.calibrates_on_activations():
            with distributed.alone(), seeded(seed + i), torch.random.fork_rng():
                spec = p.unit_calibration(ft.handle(ft.skeleton), ctx)
                module = ft.materialize(copy.deepcopy(rest.module))
            return _Calibrating(i, spec, BlockActivations(ft.handle(module), ft.blocks_path, spec.batches,
                                                          split=p.splits_calibration))
    return None


@dataclass
class _UnitResult:
    """What one unit contributes to the artifact (what a rank sends to rank 0)."""

    state: dict[str, torch.Tensor]
    aliases: dict[str, str]
    from_base: dict[str, str]
    modules: list[dict[str, Any]]
    parts: list[dict[str, Any]]
    seconds: list[float]
    nbytes: int


def _compress_unit(ft: LazyModel, base: LazyModel | None, unit: Unit, base_unit: Unit | None, objs: list[Pass],
                   ctx: Context, seed: int, first_layer: list[int] | None = None,
                   calibrating: _Calibrating | None = None) -> _UnitResult:
    """Read one unit (and the base's), run every pass on it (the calibrating pass with the unit's Hessians),
    and return its artifact tensors and records; the unit's weights are dropped. The passes run as in one
    process (:func:`modelpress.distributed.alone`): with several ranks the unit is this rank's share, or, for a
    calibrating pass that works with the other ranks (:func:`in_lockstep`), every rank's and that pass alone
    exchanges with them. Before reading it, the memory the previous unit freed is given back to the system
    (:func:`~modelpress.devices.release_free_memory`: without it, resident memory crept up from unit to unit)."""
    release_free_memory()
    handle = ft.handle(ft.materialize(unit.module))
    base_module = base.materialize(base_unit.module) if base is not None else None
    nbytes = sum(t.numel() * t.element_size() for t in handle.module.state_dict().values())
    parts, seconds = [], []
    for i, p in enumerate(objs):
        t0 = time.perf_counter()
        calibrates = calibrating is not None and calibrating.index == i
        together = calibrates and calibrating.activations.split  # the pass works with the other ranks
        with contextlib.nullcontext() if together else distributed.alone(), seeded(seed + i), torch.random.fork_rng():
            if calibrates:
                ctx.unit_hessians = calibrating.hessians(unit, handle, base_module)
            handle, part = p.apply_unit(handle, ctx, base_module, first_layer[i] if first_layer else 0)
            ctx.unit_hessians = {}
            if calibrates:
                calibrating.advance(unit, handle)
        seconds.append(time.perf_counter() - t0)
        parts.append(part)
        if first_layer:
            first_layer[i] += int(part.get("layers", 0))
    state, aliases, from_base = artifact_state(handle.module, base_module)
    modules = module_entries(handle.module)
    unit.module = None  # materialized in place: drop the unit's weights before the next one
    if base_unit is not None:
        base_unit.module = None
    return _UnitResult(state, aliases, from_base, modules, parts, seconds, nbytes)


def _run_units(ft: LazyModel, base: LazyModel | None, units: list[Unit], base_units: list[Unit | None],
               objs: list[Pass], ctx: Context, spool: WeightsSpool | None, seed: int, show_progress: bool,
               shared: bool = False) -> _Written:
    """Rank 0's (or the only process's) loop: every unit's result appended to the spool in the model's order;
    ``shared``: in rounds of one unit per rank, the others' gathered here. In lockstep (:func:`in_lockstep`) the
    other ranks run it too, with no spool: their results are dropped."""
    out = _Written([[] for _ in objs], [0.0] * len(objs), [], {}, {}, {}, 0)
    first_layer = [0] * len(objs)
    calibrating = None if shared else _start_calibration(ft, units[-1], objs, ctx, seed)
    if calibrating is not None:
        out.activation_bytes = calibrating.activations.nbytes()
    step = distributed.world_size() if shared else 1
    bar = console.progress(total=len(units), desc="stream", disable=not show_progress)
    for start in range(0, len(units), step):
        if shared:
            results = [r for r in distributed.gather_to_main(
                _compress_unit(ft, base, units[start], base_units[start], objs, ctx, seed)) if r is not None]
        else:
            results = [_compress_unit(ft, base, units[start], base_units[start], objs, ctx, seed, first_layer,
                                      calibrating)]
        while results:  # popped: no name holds a unit's artifact tensors while the next unit is compressed
            result = results.pop(0)
            if spool is not None:
                _append(out, result, spool)
            del result
            bar.update(1)
    bar.close()
    return out


def _append(out: _Written, r: _UnitResult, spool: WeightsSpool) -> None:
    out.largest_unit_bytes = max(out.largest_unit_bytes, r.nbytes)
    for i, (part, seconds) in enumerate(zip(r.parts, r.seconds)):
        out.parts[i].append(part)
        out.seconds[i] += seconds
    out.modules += r.modules
    for key, t in r.state.items():
        spool.add(key, t)
        out.tensors[key] = (t.dtype, tuple(t.shape))
    out.aliases.update(r.aliases)
    out.from_base.update(r.from_base)


def _manifest(ft: LazyModel, passes: list[tuple[str, Any]], objs: list[Pass], ctx: Context, w: _Written,
              recipe: dict[str, Any] | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """The manifest the in-memory path writes for the same run: every list in the whole model's order."""
    for (name, config), p, parts, seconds in zip(passes, objs, w.parts, w.seconds):
        p.record_units(parts, ctx, ft.order.__getitem__)
        ctx.record(name, seconds=round(seconds, 3), config=config.model_dump(mode="json"))
    # the compressed model's structure, on the meta device, gives the order of its modules and tensors
    compressed = copy.deepcopy(ft.skeleton)
    with torch.device("meta"):
        for entry in w.modules:
            set_submodule(compressed, entry["path"], module_class(entry["class"]).from_module_config(entry["config"]))
    order = _order(compressed)
    modules = sorted(w.modules, key=lambda e: order[e["path"]])
    tensors = {k: tensor_entry(k, *w.tensors[k], modules) for k in sorted(w.tensors, key=order.__getitem__)}
    manifest = build_manifest(ft.handle(compressed), modules, tensors,
                              {k: w.aliases[k] for k in sorted(w.aliases, key=order.__getitem__)},
                              {k: w.from_base[k] for k in sorted(w.from_base, key=order.__getitem__)},
                              recipe=recipe, pass_log=ctx.log, inputs=inputs)
    manifest["stream"] = {"units": len(w.parts[0]) if w.parts else 0, "largest_unit_bytes": w.largest_unit_bytes}
    if w.activation_bytes:
        manifest["stream"]["activation_bytes"] = w.activation_bytes
    return manifest
