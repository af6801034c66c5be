"""EvoPress' level database: every searchable unit of a model compressed at every level, stored once.

Sieberling, Kuznedelev, Kurtic, Alistarh, 2024, "EvoPress: Towards Optimal Dynamic Model Compression via
Evolutionary Search" (Sec. 3): the search never compresses anything itself; it picks, per layer, one of a
set of precomputed variants ("levels") and swaps them in. This module builds and serves those variants.

Families (``LevelSpec.family``) and the unit each level applies to:

* ``sparsity``: unstructured sparsity levels (e.g. 0%, 10%, ..., 90%) of every Linear (and, for UNets,
  Conv2d) layer, made by magnitude pruning or SparseGPT (:mod:`modelpress.prune.sparsegpt`);
* ``bits``: bit widths 2..8 of the same layers, by round-to-nearest or GPTQ (:mod:`modelpress.quant.gptq`),
  asymmetric per-row grids in groups of ``group_size`` input columns. The database stores the *dequantized*
  weights (fp16), which the search swaps in, and beside them the level's packed codes, scales and zero points,
  from which the final model's :class:`~modelpress.quant.packed.PackedLinear` layers are made;
* ``drop``: whole repeated blocks (the transformer layers of a BERT encoder) kept or replaced by the identity.

On disk a database is a directory with ``index.json`` (what was built, from which weights) and one
safetensors file per (layer, level): ``<layer path>/<level key>.safetensors`` holding one tensor
``weight`` (plus ``codes``, ``scales``, ``zeros`` for bit widths). Files are read only when a level is first used (then kept in a bounded in-memory cache), and a
:class:`LevelSwitcher` swaps only the layers whose level changed. Dropping needs no files.

Levels are indexed ``0..L-1`` from the most compressed to the least (``2 bits .. 8 bits``, ``90% .. 0%``
sparse, ``dropped, kept``); the *size* of a level (bits per weight, density, kept) grows with the index.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import typing
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import UserError
from ..model import find_blocks, is_conv1d, is_transformers
from ..modules import register_module, set_submodule
from ..prune.sparse import sparse_from_dense
from ..quant.gptq import QuantResult
from ..quant.packed import packed_from_result
from ..quant.primitives import pack_codes, unpack_codes

FAMILIES = ("sparsity", "bits", "drop")
#: the compression methods of each family; the first is the default
METHODS: dict[str, tuple[str, ...]] = {"sparsity": ("sparsegpt", "magnitude"), "bits": ("gptq", "rtn"),
                                       "drop": ("identity",)}
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "sparsity": tuple(round(0.1 * i, 1) for i in range(10)),
    "bits": (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0),
    "drop": (1.0, 0.0),
}
DB_FORMAT = 1


@dataclass(frozen=True)
class LevelSpec:
    """What a database holds. ``values`` are the user's level values (sparsity fractions, bit widths, or
    1 = dropped / 0 = kept), ordered from the most compressed to the least."""

    family: str
    method: str
    values: tuple[float, ...]
    group_size: int = 128
    sym: bool = False

    @staticmethod
    def make(family: str, method: str = "auto", levels: Iterable[float] | None = None, group_size: int = 128,
             sym: bool = False) -> "LevelSpec":
        if family not in FAMILIES:
            raise UserError(f"unknown level family {family!r}; choose one of {', '.join(FAMILIES)}")
        method = METHODS[family][0] if method == "auto" else method
        if method not in METHODS[family]:
            raise UserError(f"method {method!r} does not make {family} levels; choose one of "
                            f"{', '.join(METHODS[family])}")
        vals = sorted(set(float(v) for v in (levels if levels is not None else DEFAULT_LEVELS[family])))
        if len(vals) < 2:
            raise UserError("a level family needs at least two levels", "levels")
        if family == "sparsity":
            if vals[0] < 0 or vals[-1] >= 1:
                raise UserError("sparsity levels must lie in [0, 1)", "levels")
            vals = vals[::-1]  # most compressed first
        elif family == "bits":
            if any(v != int(v) or not 1 <= v <= 8 for v in vals):
                raise UserError("bit-width levels must be integers in 1..8", "levels")
        else:
            if vals != [0.0, 1.0]:
                raise UserError("drop levels are always [0, 1] (kept, dropped)", "levels")
            vals = [1.0, 0.0]
        return LevelSpec(family, method, tuple(vals), int(group_size), bool(sym))

    @property
    def sizes(self) -> tuple[float, ...]:
        """The budget each level costs per unit of weight: bits per weight, density, or kept (0/1)."""
        if self.family == "bits":
            return self.values
        return tuple(1.0 - v for v in self.values)

    def key(self, idx: int) -> str:
        v = self.values[idx]
        return f"b{int(v)}" if self.family == "bits" else f"s{v:.4f}" if self.family == "sparsity" else f"d{int(v)}"

    def index_of(self, value: float) -> int:
        for i, v in enumerate(self.values):
            if abs(v - float(value)) < 1e-9:
                return i
        raise UserError(f"level {value} is not one of the {self.family} levels {list(self.values)}")

    @property
    def evenly_spaced(self) -> bool:
        steps = [b - a for a, b in zip(self.sizes, self.sizes[1:])]
        return all(abs(s - steps[0]) < 1e-9 for s in steps)


# ---------------------------------------------------------------------------------------------------
# Which modules are searched


def find_layers(module: nn.Module) -> list[str]:
    """The layers searched by the sparsity and bits families.

    Transformers: every ``nn.Linear`` inside the repeated blocks (the 36 linear layers of a 6-layer BERT;
    embeddings, pooler and head stay dense). Other models (UNets): every ``nn.Linear`` and ungrouped
    ``nn.Conv2d`` except the first and last convolution (``conv_in``, ``conv_out``).
    """
    if is_transformers(module):
        root = find_blocks(module)
        blocks = module.get_submodule(root)
        conv1d = [n for n, m in blocks.named_modules() if is_conv1d(m)]
        if conv1d:
            raise UserError(f"{type(module).__name__} keeps its linear layers as GPT-2-style Conv1D "
                            f"({root}.{conv1d[0]}, ...), which the sparsity and bits families do not search; "
                            "use family: drop")
        return [f"{root}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    skip = {"conv_in", "conv_out"}
    return [n for n, m in module.named_modules()
            if n not in skip and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))]


def search_units(module: nn.Module, family: str) -> tuple[list[str], list[int]]:
    """``(unit paths, budget weights)``: layers weighted by parameter count, or blocks weighted 1."""
    if family == "drop":
        try:
            root = find_blocks(module)
        except UserError as exc:
            raise UserError(f"{exc}: none to drop; use the sparsity or bits family") from None
        return [f"{root}.{i}" for i in range(len(module.get_submodule(root)))], \
            [1] * len(module.get_submodule(root))
    names = find_layers(module)
    if not names:
        raise UserError(f"{type(module).__name__} has no Linear or Conv2d layers to compress")
    return names, [module.get_submodule(n).weight.numel() for n in names]


# ---------------------------------------------------------------------------------------------------
# Dropped blocks


@register_module
class DroppedBlock(nn.Module):
    """A repeated block removed from the model: returns its hidden-state input unchanged (as the one-item
    tuple transformer layers return, when ``returns_tuple``). Holds no tensors."""

    def __init__(self, returns_tuple: bool = True, attention_type: str | None = None) -> None:
        super().__init__()
        self.returns_tuple = bool(returns_tuple)
        if attention_type is not None:  # read by the decoder loop of Qwen2 / Mistral-style models
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.returns_tuple else hidden_states

    def module_config(self) -> dict[str, Any]:
        return {"returns_tuple": self.returns_tuple, "attention_type": getattr(self, "attention_type", None)}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "DroppedBlock":
        return cls(bool(cfg.get("returns_tuple", True)), cfg.get("attention_type"))

    @classmethod
    def replacing(cls, block: nn.Module) -> "DroppedBlock":
        """The dropped stand-in of ``block``: its return convention and the attributes its model reads."""
        return cls(_returns_tuple(block), getattr(block, "attention_type", None))


def _returns_tuple(block: nn.Module) -> bool:
    """Whether the block returns a tuple (BERT's and GPT-2's layers) or the hidden states alone (the decoder
    layers of Llama, Qwen2, Mistral in transformers >= 4.54), read from its ``forward``'s return annotation."""
    if not type(block).__module__.startswith("transformers"):
        return False
    try:
        ret = typing.get_type_hints(type(block).forward).get("return")
    except Exception:  # annotations naming types the module does not import
        ret = inspect.signature(type(block).forward).return_annotation
    return not (ret is torch.Tensor or ret in ("torch.Tensor", "Tensor"))


# ---------------------------------------------------------------------------------------------------
# Building the variants


def quantize_levels(W: torch.Tensor, spec: LevelSpec, H: torch.Tensor | None,
                    indices: list[int] | None = None) -> list[QuantResult]:
    """GPTQ / RTN results of layer weight ``W`` (any shape; treated as ``[out, -1]``) at the bit-width levels
    ``indices`` of ``spec`` (all levels by default)."""
    from ..quant.gptq import gptq_quantize, rtn_quantize

    indices = list(range(len(spec.values))) if indices is None else indices
    M = W.detach().reshape(W.shape[0], -1).float()
    if spec.method == "gptq":
        return [gptq_quantize(M, H, int(spec.values[i]), spec.group_size, spec.sym) for i in indices]
    return [rtn_quantize(M, int(spec.values[i]), spec.group_size, spec.sym) for i in indices]


def compress_levels(W: torch.Tensor, spec: LevelSpec, H: torch.Tensor | None,
                    indices: list[int] | None = None) -> list[torch.Tensor]:
    """Layer weight ``W`` at the levels ``indices`` of ``spec`` (all levels by default)."""
    from ..prune.sparsegpt import magnitude_prune, sparsegpt_prune_levels

    if spec.family == "bits":
        return [r.dequant.reshape(W.shape) for r in quantize_levels(W, spec, H, indices)]
    indices = list(range(len(spec.values))) if indices is None else indices
    M = W.detach().reshape(W.shape[0], -1).float()
    vals = [spec.values[i] for i in indices]
    if spec.method == "sparsegpt":
        outs = sparsegpt_prune_levels(M, H, vals)
    else:
        outs = [magnitude_prune(M, v) for v in vals]
    return [o.reshape(W.shape) for o in outs]


def level_files(W: torch.Tensor, spec: LevelSpec, H: torch.Tensor | None) -> list[dict[str, torch.Tensor]]:
    """What the database stores for every level of ``W``: the fp16 ``weight`` the search swaps in and, for
    bit widths, the packed ``codes`` (:func:`~modelpress.quant.primitives.pack_codes`), float32 ``scales`` and
    uint8 ``zeros`` of the same GPTQ / RTN call, from which :meth:`LevelDatabase.compressed_layer` rebuilds it."""
    if spec.family != "bits":
        return [{"weight": w.to(torch.float16).contiguous()} for w in compress_levels(W, spec, H)]
    return [{"weight": r.dequant.reshape(W.shape).to(torch.float16).contiguous(),
             "codes": pack_codes(r.codes, r.bits), "scales": r.scales.float().contiguous(),
             "zeros": r.zeros.round().to(torch.uint8).contiguous()} for r in quantize_levels(W, spec, H)]


def weights_fingerprint(module: nn.Module, names: list[str]) -> str:
    """sha256 over the names, shapes and bytes of the searched layers' weights."""
    h = hashlib.sha256()
    for n in names:
        w = module.get_submodule(n).weight.detach().float().contiguous().cpu()
        h.update(n.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def _index(spec: LevelSpec, names: list[str], fingerprint: str, calibration: dict[str, Any]) -> dict[str, Any]:
    index = {"format": DB_FORMAT, "spec": asdict(spec), "layers": names, "weights_sha256": fingerprint,
             "calibration": calibration if spec.method in ("gptq", "sparsegpt") else None, "dtype": "float16"}
    if spec.family == "bits":  # databases from before the packed codes were stored are rebuilt
        index["codes"] = "packed"
    return index


@dataclass
class LevelDatabase:
    """A built database directory; :meth:`weight` reads one variant lazily (bounded LRU cache)."""

    root: Path
    spec: LevelSpec
    layers: list[str]
    cache_bytes: int = 1 << 30
    _cache: "OrderedDict[tuple[str, int], torch.Tensor]" = field(default_factory=OrderedDict, repr=False)
    _cached: int = 0
    reads: int = 0

    def path(self, layer: str, idx: int) -> Path:
        return self.root / layer / f"{self.spec.key(idx)}.safetensors"

    def weight(self, layer: str, idx: int) -> torch.Tensor:
        key = (layer, idx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = self.tensors(layer, idx, ("weight",))["weight"]
        self._cache[key] = t
        self._cached += t.numel() * t.element_size()
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.numel() * old.element_size()
        return t

    def tensors(self, layer: str, idx: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The stored tensors of one variant (all, or ``names``), read from disk (not cached)."""
        from safetensors import safe_open

        with safe_open(str(self.path(layer, idx)), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in (names if names is not None else f.keys())}
        self.reads += 1
        return out

    def compressed_layer(self, layer_module: nn.Module, layer: str, idx: int) -> nn.Module:
        """The compressed replacement of ``layer_module`` at level ``idx``: a :class:`~modelpress.quant.packed.PackedLinear`
        / ``PackedConv2d`` (bit widths; its codes are the database's, dequantized in float16 as the database's
        ``weight``) or a :class:`~modelpress.prune.sparse.SparseLinear` / ``SparseConv2d`` (sparsity; the
        database's float16 weight without its zeros)."""
        if self.spec.family == "sparsity":
            return sparse_from_dense(layer_module, self.weight(layer, idx))
        t = self.tensors(layer, idx)
        rows, bits = t["scales"].shape[0], int(self.spec.values[idx])
        cols = layer_module.weight[0].numel()
        gs = cols if self.spec.group_size <= 0 else min(self.spec.group_size, cols)
        codes = unpack_codes(t["codes"], bits, rows * cols).view(rows, cols).to(torch.uint8)
        res = QuantResult(t["weight"], codes, t["scales"], t["zeros"].float(), bits, gs)
        return packed_from_result(res, layer_module, self.spec.sym, torch.float16)

    @staticmethod
    def open(root: str | Path) -> "LevelDatabase":
        root = Path(root)
        try:
            index = json.loads((root / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"not a level database ({exc})", str(root)) from None
        s = index["spec"]
        spec = LevelSpec(s["family"], s["method"], tuple(s["values"]), s["group_size"], s["sym"])
        return LevelDatabase(root, spec, list(index["layers"]))


def build_database(root: str | Path, module: nn.Module, spec: LevelSpec, layers: list[str],
                   hessians: Callable[[], Iterable[dict[str, torch.Tensor]]] | None, calibration: dict[str, Any],
                   progress: Callable[..., Any] | None = None) -> LevelDatabase:
    """Build (or reuse) the database of ``layers`` of ``module`` at every level of ``spec`` in ``root``.

    An existing database is reused when its ``index.json`` matches (same weights, spec, layers and
    calibration). ``hessians()`` is called only when a build is needed and the method needs input Hessians
    (SparseGPT, GPTQ): it yields them group by group in the order of ``layers`` (a transformer's one decoder
    block at a time, :func:`modelpress.activations.hessians_block_by_block`), and each group is dropped once its
    layers' levels are written. The directory is written under a temporary name and renamed, so an interrupted
    build leaves nothing behind.
    """
    if spec.family == "drop":
        raise ValueError("dropping needs no database")
    root = Path(root)
    index = json.loads(json.dumps(_index(spec, layers, weights_fingerprint(module, layers), calibration)))
    if (root / "index.json").exists():
        try:
            old = json.loads((root / "index.json").read_text())
        except json.JSONDecodeError:
            old = None
        if old == index:
            return LevelDatabase(root, spec, layers)
    from safetensors.torch import save_file

    needs = spec.method in ("gptq", "sparsegpt")
    if needs and hessians is None:
        raise ValueError(f"{spec.method} needs input Hessians")
    groups = iter(hessians() if needs else ())
    H: dict[str, torch.Tensor] = {}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for name in (progress(layers, desc=f"level database ({spec.method})") if progress else layers):
            while needs and name not in H:  # the next group: the previous one's Hessians are dropped
                H = next(groups, None)
                if H is None:
                    raise ValueError(f"{spec.method} needs the input Hessian of {name}")
            files = level_files(module.get_submodule(name).weight, spec, H.get(name))
            (tmp / name).mkdir(exist_ok=True)
            for idx, tensors in enumerate(files):
                save_file(tensors, str(tmp / name / f"{spec.key(idx)}.safetensors"))
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LevelDatabase(root, spec, layers)


# ---------------------------------------------------------------------------------------------------
# Switching a live model between level maps


class LevelSwitcher:
    """Holds a model whose searched units can be set to any level map; only changed units are touched.

    ``apply(levels)`` takes one level index per unit (``None`` = the original, uncompressed unit). For the
    sparsity and bits families the variant's weights are copied into the layer in place; for ``drop`` a
    block is swapped for a :class:`DroppedBlock` (and the original block object is put back to keep it).
    """

    def __init__(self, module: nn.Module, spec: LevelSpec, units: list[str], db: LevelDatabase | None) -> None:
        if spec.family != "drop" and db is None:
            raise ValueError("the sparsity and bits families need a level database")
        self.module, self.spec, self.units, self.db = module, spec, units, db
        if spec.family == "drop":
            self.originals = {u: module.get_submodule(u) for u in units}
        else:
            self.originals = {u: module.get_submodule(u).weight.detach().clone() for u in units}
        self.current: list[int | None] = [None] * len(units)
        self.swaps = 0

    @torch.no_grad()
    def _set(self, i: int, level: int | None) -> None:
        unit = self.units[i]
        if self.spec.family == "drop":
            dropped = level is not None and self.spec.values[level] == 1.0
            orig = self.originals[unit]
            set_submodule(self.module, unit, DroppedBlock.replacing(orig) if dropped else orig)
        else:
            layer = self.module.get_submodule(unit)
            src = self.originals[unit] if level is None else self.db.weight(unit, level)
            layer.weight.copy_(src.to(layer.weight.dtype).reshape(layer.weight.shape))
        self.current[i] = level
        self.swaps += 1

    def apply(self, levels: list[int | None]) -> int:
        """Set every unit to ``levels[i]``; returns how many units were swapped."""
        if len(levels) != len(self.units):
            raise ValueError(f"a level map needs {len(self.units)} entries, got {len(levels)}")
        changed = [i for i, lv in enumerate(levels) if lv != self.current[i]]
        for i in changed:
            self._set(i, levels[i])
        return len(changed)

    def apply_one(self, i: int, level: int | None) -> None:
        """Set unit ``i`` only (the others keep their levels)."""
        if self.current[i] != level:
            self._set(i, level)

    @torch.no_grad()
    def store_compressed(self, levels: list[int | None]) -> dict[str, Any]:
        """Set ``levels`` and swap every compressed layer for its stored form (:meth:`LevelDatabase.compressed_layer`:
        packed codes for bit widths, float16 values plus a bitmask for sparsity), so that the artifact holds
        what the level costs. The layers compute with exactly the weights the search scored (the database's
        float16 ``weight``): ``max_abs_diff_vs_database`` says by how much they differ (0 for RTN and sparsity;
        GPTQ's dequantization from float32 scales can differ from its float64 one by one fp16 rounding step).
        Dropped blocks are already free. The switcher cannot switch these layers afterwards."""
        self.apply(levels)
        stats = {"stored_bytes": 0, "fp16_bytes": 0, "max_abs_diff_vs_database": 0.0}
        if self.spec.family == "drop":
            return stats
        for unit, level in zip(self.units, levels):
            if level is None:
                continue
            layer = self.module.get_submodule(unit)
            new = self.db.compressed_layer(layer, unit, level)
            diff = (new.stored_weight().float() - layer.weight.float()).abs().max()
            stats["max_abs_diff_vs_database"] = max(stats["max_abs_diff_vs_database"], float(diff))
            stats["stored_bytes"] += sum(t.numel() * t.element_size() for k, t in new.state_dict().items()
                                         if k != "bias")
            stats["fp16_bytes"] += 2 * layer.weight.numel()
            set_submodule(self.module, unit, new)
        return stats
