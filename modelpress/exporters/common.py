"""What every exporter shares: input names and shapes per kind, the traced wrapper, calibration batches,
atomic file writing, the work one run's exports of a model share (:func:`shared_exports`), and turning exporter
failures into one-line errors that name the module and op."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import UserError
from ..data import Dataset
from ..data.inputs import batched, model_inputs
from ..model import TEXT_KINDS, ModelHandle, example_inputs, max_positions
from ..sources import load_dataset

#: canonical input names per kind, in positional order (the same names in every exported file)
INPUT_NAMES: dict[str, tuple[str, ...]] = {
    "encoder": ("input_ids", "attention_mask"),
    "classifier": ("input_ids", "attention_mask"),
    "unet": ("sample", "timestep"),
    "unet-cond": ("sample", "timestep", "encoder_hidden_states"),
    "causal-lm": ("input_ids", "attention_mask"),  # no KV cache: a whole window per call (scoring, prefill)
}
OUTPUT_NAMES: dict[str, str] = {"encoder": "last_hidden_state", "classifier": "logits", "unet": "noise",
                                "unet-cond": "noise", "causal-lm": "logits"}
#: integer inputs (everything else is float32)
INT_INPUTS = {"input_ids", "attention_mask", "timestep", "token_type_ids"}
#: the sequence length exported text models are traced (and, with fixed shapes, padded) at
TEXT_SEQ_LEN = 64


class _Two(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner(a, b)


class _Three(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.inner(a, b, c)


def traceable(handle: ModelHandle, module: nn.Module | None = None) -> nn.Module:
    """The canonical module (of ``module`` if given) with fixed positional arguments, as exporters need."""
    canonical = handle.canonical() if module is None else handle.replace_module(module).canonical()
    wrapper = _Two(canonical) if len(INPUT_NAMES[handle.kind]) == 2 else _Three(canonical)
    return wrapper.eval()


def text_seq_len(handle: ModelHandle) -> int:
    """:data:`TEXT_SEQ_LEN`, capped at the model's :func:`~modelpress.model.max_positions`."""
    longest = max_positions(handle)
    return min(TEXT_SEQ_LEN, longest) if longest else TEXT_SEQ_LEN


def trace_inputs(handle: ModelHandle, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Example canonical inputs for tracing (text at :data:`TEXT_SEQ_LEN` tokens, or the model's
    ``max_position_embeddings`` when that is fewer)."""
    if handle.kind in TEXT_KINDS:
        return example_inputs(handle, batch=batch, seq_len=text_seq_len(handle))
    return example_inputs(handle, batch=batch)


def dim_bounds(handle: ModelHandle, caps: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """Default ``(min, max)`` of the dynamic dims: the batch, and the token axis of text inputs (up to the
    model's ``max_position_embeddings``), each capped by ``caps`` (ExecuTorch plans memory for the max)."""
    caps = caps or {}
    bounds = {"batch": (1, min(4096, caps.get("batch", 4096)))}
    if handle.kind in TEXT_KINDS:
        max_len = max_positions(handle) or 512
        bounds["seq"] = (2, min(max_len, caps.get("seq", max_len)))
    return bounds


def dynamic_shapes(handle: ModelHandle, dynamic: bool, bounds: dict[str, tuple[int, int]] | None = None
                   ) -> tuple[dict[int, Any], ...] | None:
    """``torch.export`` dynamic dims for the kind's inputs (``None`` for fixed shapes): hints
    (``Dim.DYNAMIC`` with the ``bounds``), which torch narrows where the model guards a dim, in one trace."""
    if not dynamic:
        return None
    bounds = bounds or dim_bounds(handle)
    batch = torch.export.Dim.DYNAMIC(min=bounds["batch"][0], max=bounds["batch"][1])
    if handle.kind in TEXT_KINDS:
        seq = torch.export.Dim.DYNAMIC(min=bounds["seq"][0], max=bounds["seq"][1])
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
    return tuple({0: batch} for _ in INPUT_NAMES[handle.kind])


def program_bounds(program: Any, bounds: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The ``bounds`` as ``program`` accepts them: each dim of the first input (batch, then the token axis of
    text) narrowed to the range torch kept for its symbol. Sizes 0 and 1 are specialized apart in torch's
    ranges (a symbol's range starts at 2), so a range starting at 2 keeps the requested minimum."""
    first = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in
                 program.graph_signature.user_inputs)
    out = dict(bounds)
    for axis, name in enumerate(bounds):
        size = first.meta["val"].shape[axis]
        vr = program.range_constraints.get(getattr(getattr(size, "node", None), "expr", None))
        if vr is None:
            continue
        lo = bounds[name][0] if int(vr.lower) <= 2 else int(vr.lower)
        hi = bounds[name][1] if not vr.upper.is_finite else min(bounds[name][1], int(vr.upper))
        out[name] = (lo, hi)
    return out


def export_program(module: nn.Module, inputs: tuple[torch.Tensor, ...], handle: ModelHandle, dynamic: bool,
                   caps: dict[str, int] | None = None) -> tuple[Any, dict[str, tuple[int, int]] | None]:
    """``torch.export.export`` (non-strict) with dynamic dims, in one trace: when a model guards a dim
    (diffusers' upsampler branches on ``batch >= 64``, which only changes memory layout), torch narrows the
    hinted range (named dims failed there and took a second trace with torch's suggested bounds). The bounds
    the program accepts are returned (``None`` for fixed shapes)."""
    if not dynamic:
        return torch.export.export(module, inputs, strict=False), None
    bounds = dim_bounds(handle, caps)
    program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes(handle, True, bounds), strict=False)
    return program, program_bounds(program, bounds)


# ---------------------------------------------------------------------------------------------------
# Calibration data

def default_calibration(handle: ModelHandle, batches: int, batch_size: int = 8,
                        dataset: Dataset | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches when the caller gives none, from ``dataset`` (the recipe's calibration data; the
    zoo model's own when ``None``): text models get its texts (seed 0, :data:`TEXT_SEQ_LEN` tokens); UNets
    the states of the model's own DDIM-25 trajectories (Q-Diffusion's calibration: random ``x ~ N(0, 1)``
    at random ``t`` is not what a UNet sees when it samples), prompted by its prompts for ``unet-cond``."""
    data = dataset or load_dataset(None, handle, "calibration")
    if data is None:
        raise UserError("static int8 export calibrates on data: set calibration.dataset in the recipe "
                        "(or 'random')")
    n = batches * batch_size
    if handle.kind in TEXT_KINDS or data.is_random:
        return batched(model_inputs(handle, data, n, 0, text_seq_len(handle))[0], batch_size)
    from ..passes import Context
    from ..quant.calibration import build_calibration_set

    calib = build_calibration_set(handle, Context(seed=0, data=data, show_progress=False), "export", "every_k",
                                  n, steps=25)
    return calib.batches(batch_size)[:batches]


def as_list(calibration: Any, handle: ModelHandle, batches: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``batches`` calibration tuples: the caller's, or drawn from the caller's dataset, or
    :func:`default_calibration`'s."""
    if calibration is None or isinstance(calibration, Dataset):
        return default_calibration(handle, batches, dataset=calibration)
    out = []
    for item in calibration:
        out.append(tuple(item))
        if len(out) >= batches:
            break
    if not out:
        raise UserError("the calibration data given for export is empty")
    return out


# ---------------------------------------------------------------------------------------------------
# Files

@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final``; renamed to ``final`` when the block succeeds, removed otherwise."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A temporary directory inside ``parent`` (same file system, so results can be renamed out)."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as d:
        yield Path(d)


def write_info(path: Path, info: dict[str, Any]) -> None:
    """The sidecar ``<file>.json``: export options and what was quantized (read by :func:`exported_info`)."""
    side = Path(path).with_suffix(Path(path).suffix + ".json")
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(info, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------
# Work shared by one run's exports

class _Shared:
    """The state of one :func:`shared_exports` block. Entries keep the module they were made from, so its
    ``id`` cannot be reused by another module while the block lasts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        #: id(model's module) -> (that module, its export-ready copy)
        self.modules: dict[int, tuple[nn.Module, nn.Module]] = {}
        #: (id(export-ready module), options) -> (that module, (kept float graph, what its build recorded))
        self.graphs: dict[tuple[Any, ...], tuple[nn.Module, tuple[Path, dict[str, Any]]]] = {}


_SHARED: ContextVar[_Shared | None] = ContextVar("modelpress_shared_exports", default=None)


@contextmanager
def shared_exports() -> Iterator[None]:
    """Within the block, exports of the same model share their work: the export-ready copy of the module
    (:func:`shared_module`) and each float ONNX graph (:func:`shared_float_graph`), so ``export: [onnx, ort,
    {format: onnx, quantize: int8}]`` traces and translates the model once, not three times. The kept graphs
    live in a temporary directory removed when the block ends. Models must not change inside the block."""
    if _SHARED.get() is not None:  # nested: the outer block shares
        yield
        return
    with tempfile.TemporaryDirectory(prefix="modelpress-exports-") as d:
        token = _SHARED.set(_Shared(Path(d)))
        try:
            yield
        finally:
            _SHARED.reset(token)


def _once(table: dict[Any, tuple[nn.Module, Any]], key: Any, owner: nn.Module, make: Callable[[], Any]) -> Any:
    """``table[key]``'s value if it was made for ``owner`` (the same object, not a new one at a reused id), else
    ``make()``, remembered."""
    hit = table.get(key)
    if hit is None or hit[0] is not owner:
        hit = table[key] = (owner, make())
    return hit[1]


def shared_module(module: nn.Module, prepare: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``prepare(module)``, made once per module inside :func:`shared_exports` (every call outside it)."""
    shared = _SHARED.get()
    if shared is None:
        return prepare(module)
    return _once(shared.modules, id(module), module, lambda: prepare(module))


def shared_float_graph(module: nn.Module, options: tuple[Any, ...], path: Path,
                       build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Write the float ONNX graph of ``module`` exported with ``options`` to ``path`` with ``build(path)``, which
    returns what it records for the sidecar; inside :func:`shared_exports`, a graph an earlier export of the same
    module with the same options built is copied instead (with its record)."""
    shared = _SHARED.get()
    if shared is None:
        return build(path)
    built = []

    def build_and_keep() -> tuple[Path, dict[str, Any]]:
        record = build(path)
        kept = shared.root / f"graph-{len(shared.graphs)}.onnx"
        shutil.copyfile(path, kept)
        built.append(kept)
        return kept, dict(record)

    kept, record = _once(shared.graphs, (id(module), options), module, build_and_keep)
    if not built:
        shutil.copyfile(kept, path)
    return dict(record)


# ---------------------------------------------------------------------------------------------------
# Errors

_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),
    re.compile(r"\b(aten::[\w.]+)"),
    re.compile(r"\b((?:aten|quantized_decomposed|[a-z_]+)\.[a-z_0-9]+\.(?:default|Tensor|int|Scalar|out))\b"),
    re.compile(r"(?:operator|op|kernel)[^\w]+([a-z_][\w]*::[\w.]+)"),
    re.compile(r"'([a-z_][\w]*::[\w.]+)'"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failing_op(text: str) -> str | None:
    """The operator an exporter or runtime complains about, read from its message."""
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            return ".".join(g for g in m.groups() if g) if m.lastindex and m.lastindex > 1 else m.group(1)
    return None


def module_of_op(program: Any, op: str | None) -> str | None:
    """The innermost module (``path (Class)``) whose forward calls ``op`` in an exported program's graph."""
    if program is None or not op:
        return None
    short = op.replace("::", ".").split(".")
    graph = program.graph_module.graph if hasattr(program, "graph_module") else program.graph
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target).replace("::", ".")
        if all(part in target for part in short[:2]):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                path = re.sub(r"^L\['self'\]\.?|^self\.?", "", str(path)).replace("inner.inner.", "")
                cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>")
                return f"{path or '<root>'} ({cls_name})"
    return None


def user_frame(text: str) -> str | None:
    """The last ``File ..., line N, in fn`` of traced user code an export error quotes."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    frames = [f for f in frames if "/torch/" not in f[0]]
    if not frames:
        return None
    file, line, fn = frames[-1]
    return f"{Path(file).name}:{line} in {fn}"


def export_error(exc: BaseException, fmt: str, handle: ModelHandle, program: Any = None) -> UserError:
    """A one-line :class:`UserError` for an export failure: what failed, the op and the module."""
    text = _ANSI.sub("", f"{type(exc).__name__}: {exc}")
    first = next((ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()), type(exc).__name__)
    if len(first) > 240:
        first = first[:240] + "..."
    dims = re.search(r"Constraints violated \(([^)]*)\)|specialized|dynamic shape|Dim\(", text)
    op = failing_op(text)
    where = module_of_op(program, op) or user_frame(text) or handle.architecture.get("class", handle.kind)
    if dims and "Constraints violated" in text:
        return UserError(f"cannot export to {fmt} with a variable {dims.group(1) or 'shape'} "
                         f"({first}); set `dynamic: false` in the export entry", where)
    if op:
        detail = "" if first.startswith("Failed to convert") else f" ({first})"
        return UserError(f"cannot export to {fmt}: operator {op} is not supported by the exporter or its runtime"
                         f"{detail}", where)
    return UserError(f"cannot export to {fmt}: {first}", where)
