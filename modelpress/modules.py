"""Compressed modules: how a pass's replacement for an ``nn.Linear`` / ``nn.Conv2d`` survives save and load.

A pass swaps modules of the model for compressed ones (packed integer weights, sign bits plus a scale,
entropy-coded bytes, ...). Each such class is registered here and implements two methods:

* ``module_config() -> dict``: JSON-able constructor arguments (shapes, bit widths, flags);
* ``from_module_config(cfg) -> module`` (classmethod): an instance with correctly shaped, empty buffers.

The artifact stores the module path, class name and config in its manifest and every tensor in
safetensors; loading rebuilds the original architecture, swaps in empty compressed modules and loads the
tensors. No pickle, no code in the checkpoint. A module may define ``after_load()`` to rebuild derived,
unsaved state (lookup tables, caches) once its tensors are in place. A module registered at the path ``""``
replaces the whole model (e.g. APTP's router plus per-code sub-networks).
"""
from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from .errors import UserError
from .registry import Registry


class CompressedModule(Protocol):
    def module_config(self) -> dict[str, Any]: ...

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> nn.Module: ...


def _discover() -> None:
    from .passes import pass_registry

    pass_registry()  # importing the method packages registers their modules


MODULES: Registry[type[nn.Module]] = Registry("module type", _discover)


def register_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator for compressed module types that artifacts may contain."""
    for method in ("module_config", "from_module_config"):
        if not hasattr(cls, method):
            raise TypeError(f"{cls.__name__} lacks {method}()")
    return MODULES.add(cls.__name__, cls)


def module_class(name: str) -> type[nn.Module]:
    if name not in MODULES:
        raise UserError(f"the artifact uses module type {name!r}, which this modelpress version does not know")
    return MODULES.get(name)


def compressed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every registered compressed module in ``model``, outermost first; modules
    nested inside another compressed module are part of their parent and are not listed."""
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if MODULES.all().get(type(mod).__name__) is type(mod):
            if not any(name.startswith(p + ".") for p, _ in found):
                found.append((name, mod))
    return found


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def materialize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every compressed module that can be rebuilt as a plain torch layer
    (it defines ``decompressed() -> nn.Module``: lossless-coded, delta, packed weight-only quantized and sparse
    layers) is replaced by it.

    Exporters use it: an ONNX / ExecuTorch graph of such an artifact is the rebuilt model. The PTQ passes'
    quantized layers define no ``decompressed`` and stay, so their integer scales reach the export."""
    import copy

    out = copy.deepcopy(model)
    for path, mod in [(p, m) for p, m in out.named_modules() if callable(getattr(m, "decompressed", None))]:
        set_submodule(out, path, mod.decompressed())
    return out
