"""Model surgery for the diffusion PTQ passes: discovery of quantizable layers, BRECQ reconstruction blocks,
concatenated skip inputs (Q-Diffusion Sec. 4.2) and TFMQ-DM's temporal information block by type and by
structure (a probe forward), never by module names; swapping in quantized layers, timestep taps and
quantized attention processors; forward hooks."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..modules import set_submodule
from .act import ActQuantizer
from .attention import QuantAttnProcessor
from .layers import QUANT_LAYERS, QuantConv2d, QuantLinear, _QuantLayer
from .timesteps import TimestepTap

# ---------------------------------------------------------------------------------------------------
# Discovery by type and structure


@functools.lru_cache(maxsize=1)
def _diffusers_types() -> dict[str, type]:
    """diffusers' building-block classes."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import Timesteps
    from diffusers.models.resnet import ResnetBlock2D

    return {"attention": Attention, "resnet": ResnetBlock2D, "transformer": BasicTransformerBlock,
            "timesteps": Timesteps}


def _is_attention(mod: nn.Module) -> bool:
    return isinstance(mod, _diffusers_types()["attention"])


def is_resnet(mod: nn.Module) -> bool:
    """A diffusers residual block (by type)."""
    return isinstance(mod, _diffusers_types()["resnet"])


def _is_transformer_block(mod: nn.Module) -> bool:
    return isinstance(mod, _diffusers_types()["transformer"])


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` (exact float layers, by type) of ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, QUANT_LAYERS)]


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BRECQ's reconstruction units: residual blocks, transformer blocks and attention modules (outermost
    first, by type), then every quantized layer not inside one of them (layer-wise reconstruction)."""
    units: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if any(name.startswith(u + ".") for u, _ in units):
            continue
        if is_resnet(mod) or _is_transformer_block(mod) or _is_attention(mod):
            units.append((name, mod))
    for name, mod in model.named_modules():
        if isinstance(mod, QUANT_LAYERS) and not any(name.startswith(u + ".") for u, _ in units):
            units.append((name, mod))
    return units


def layers_in(mod: nn.Module) -> list[_QuantLayer]:
    return [m for m in mod.modules() if isinstance(m, QUANT_LAYERS)]


def skip_concat_splits(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """Split points of the UNet's concatenated skip inputs, by structure.

    An up block is a module whose ``forward`` takes ``res_hidden_states_tuple``; each of its residual blocks
    receives ``cat([h, skip])``, where ``h`` has the channels of the block's input (first resnet, read in a
    probe forward ``run()``) or of the previous resnet's output. The returned map is ``resnet path -> channels
    of h``; the split applies to the layer that reads the raw concatenation (the residual block's shortcut).
    """
    ups: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        try:
            params = inspect.signature(mod.forward).parameters
        except (TypeError, ValueError):
            continue
        if "res_hidden_states_tuple" in params and hasattr(mod, "resnets"):
            ups[name] = mod
    entering: dict[str, int] = {}
    handles = []
    for name, mod in ups.items():
        def hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            entering.setdefault(name, int(h.shape[1]))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    run_with_hooks(run, handles)
    splits: dict[str, int] = {}
    for name, mod in ups.items():
        for i, res in enumerate(mod.resnets):
            h_ch = entering.get(name) if i == 0 else mod.resnets[i - 1].out_channels
            if h_ch is not None and 0 < h_ch < res.in_channels:
                splits[f"{name}.resnets.{i}"] = int(h_ch)
    return splits


def swap_in_quant_layers(model: nn.Module, names: Iterable[str], quant_for: Callable[[str, nn.Module], dict[str, Any]]) -> dict[str, _QuantLayer]:
    """Replace each named float layer with its quantized twin; ``quant_for(name, layer)`` gives its options."""
    out: dict[str, _QuantLayer] = {}
    for name in names:
        mod = model.get_submodule(name)
        cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
        q = cls.from_float(mod, **quant_for(name, mod))
        set_submodule(model, name, q)
        out[name] = q
    return out


def install_timestep_tap(model: nn.Module) -> list[str]:
    """Replace every diffusers ``Timesteps`` module (found by type) with a :class:`TimestepTap`."""
    names = [n for n, m in model.named_modules() if isinstance(m, _diffusers_types()["timesteps"])]
    for n in names:
        set_submodule(model, n, TimestepTap.from_timesteps(model.get_submodule(n)))
    return names


def install_attention_quant(model: nn.Module, act_bits: int, act_symmetric: bool) -> list[str]:
    """Give every diffusers ``Attention`` (found by type) a :class:`QuantAttnProcessor`; returns their paths."""
    names = []
    for n, m in model.named_modules():
        if _is_attention(m) and not isinstance(getattr(m, "processor", None), QuantAttnProcessor):
            names.append(n)
    for n in names:
        model.get_submodule(n).set_processor(QuantAttnProcessor(act_bits, act_symmetric))
    return [f"{n}.processor" if n else "processor" for n in names]


class _Stop(Exception):
    pass


def run_with_hooks(run: Callable[[], Any], handles: list[Any]) -> None:
    """Run ``run()`` without gradients, then remove the hook ``handles`` whatever happens."""
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, run: Callable[[], Any], modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of ``modules`` in the order a forward (``run()``) first calls them."""
    order: list[str] = []
    handles = []
    for name, mod in modules:
        def hook(_m: nn.Module, _i: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles.append(mod.register_forward_pre_hook(hook))
    run_with_hooks(run, handles)
    return order


def temporal_layers(model: nn.Module, run_pair: Callable[[int], Any], layers: list[tuple[str, nn.Module]]) -> list[str]:
    """TFMQ-DM's temporal information block, found by structure: the layers whose input depends on the
    timestep only. ``run_pair(i)`` runs the model with input set ``i`` in {0, 1}: different samples (and
    conditions) but the same timesteps. Layers whose input is identical in both runs form the TIB (the
    time-embedding MLP and every residual block's time-embedding projection)."""
    seen: list[dict[str, torch.Tensor]] = [{}, {}]
    for which in (0, 1):
        handles = []
        for name, mod in layers:
            def hook(_m: nn.Module, inp: Any, name: str = name, which: int = which) -> None:
                seen[which][name] = inp[0].detach().clone()
            handles.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                run_pair(which)
        finally:
            for h in handles:
                h.remove()
    out = []
    for name, _ in layers:
        a, b = seen[0].get(name), seen[1].get(name)
        if a is not None and b is not None and a.shape == b.shape and torch.equal(a, b):
            out.append(name)
    return out


def quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def freeze_all(model: nn.Module) -> None:
    """Pack every quantized layer's integer weights (drops float weights and rounding variables)."""
    for _, m in quant_modules(model):
        m.freeze()
