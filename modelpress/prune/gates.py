"""Prunable gates over a diffusers ``UNet2DConditionModel`` and a MACs counter for any gate setting.

APTP (Ganjdanesh et al., 2025, "Not All Prompts Are Made Equal: Prompt-based Pruning of Text-to-Image
Diffusion Models", Sec. 3.2) prunes the UNet's width along three structured axes, each a *unit* of gates:

* ``resnet``: the inner channels of every ``ResnetBlock2D`` (output of ``conv1``, ``time_emb_proj`` and
  ``norm2``; input of ``conv2``), one gate per GroupNorm group of ``norm2``, so that dropping a gate
  removes whole GroupNorm groups and the statistics of the kept groups do not change;
* ``heads``: the heads of every cross/self ``Attention`` (rows of ``to_q``/``to_k``/``to_v``, columns of
  ``to_out[0]``), one gate per head;
* ``ff``: the hidden width of every ``FeedForward`` (GEGLU/GELU projection rows, output-layer columns), one
  gate per group of ``hidden / ff_groups`` channels;
* ``block`` (optional, off by default): one gate per whole transformer block (``Transformer2DModel``: its
  output becomes ``x + g (block(x) - x)``, so a gate of 0 removes the block; the depth gates of the paper).

Units are found by module type and structure, never by name, so any ``UNet2DConditionModel`` works.
A gate multiplies the unit's hidden features right before the layer that consumes them (``conv2``,
``to_out[0]``, ``net[-1]``), via forward pre-hooks; a gate of 0 then has exactly the effect of removing the
channels (see :mod:`modelpress.prune.slicing`). Gates may differ per sample (shape ``[B, n_gates]``),
which is what the router's training needs.

MACs: a prunable unit's MACs are linear in the fraction of its gates that are on (the consuming layer's
input width and the producing layers' output width shrink together), so
``MACs(g) = fixed + sum_u macs_u * mean(g_u)``, exact for 0/1 gates and differentiable for soft ones
(the resource term of APTP's loss, eq. 6).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..model import canonical_module

UNIT_KINDS = ("resnet", "heads", "ff")
ALL_UNIT_KINDS = UNIT_KINDS + ("block",)


@dataclass(frozen=True)
class GateUnit:
    """One prunable unit: ``n_groups`` gates of ``group_size`` channels in the module at ``path``."""

    path: str
    kind: str
    n_groups: int
    group_size: int
    macs: float = 0.0  # per-sample MACs of the unit's prunable part at full width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is(module: nn.Module, cls_name: str) -> bool:
    return type(module).__name__ == cls_name


def _plain_attention(attn: nn.Module) -> bool:
    """Attention modules whose heads can be sliced: separate q/k/v projections, no extra K/V or norms."""
    if not all(hasattr(attn, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
        return False
    if getattr(attn, "add_k_proj", None) is not None or getattr(attn, "norm_q", None) is not None:
        return False
    if getattr(attn, "norm_cross", None) is not None or getattr(attn, "group_norm", None) is not None:
        return False
    if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "residual_connection", False):
        return False
    return isinstance(attn.to_out[0], nn.Linear) and attn.to_q.out_features % attn.heads == 0


def _ff_layers(ff: nn.Module) -> tuple[nn.Linear, nn.Linear, bool] | None:
    """``(projection, output, gated)`` of a diffusers FeedForward (GEGLU: gated=True), or None."""
    net = getattr(ff, "net", None)
    if net is None or len(net) < 2:
        return None
    act, out = net[0], net[-1]
    proj = getattr(act, "proj", None)
    if not isinstance(proj, nn.Linear) or not isinstance(out, nn.Linear):
        return None
    if _is(act, "GEGLU"):
        return proj, out, True
    if _is(act, "GELU") or _is(act, "ApproximateGELU"):
        return proj, out, False
    return None


def find_units(unet: nn.Module, kinds: Sequence[str] = UNIT_KINDS, ff_groups: int = 8) -> list[GateUnit]:
    """Every prunable unit of ``unet`` (in module order), found by module type and structure."""
    units: list[GateUnit] = []
    for path, mod in unet.named_modules():
        if "block" in kinds and _is(mod, "Transformer2DModel") and hasattr(mod, "transformer_blocks"):
            units.append(GateUnit(path, "block", 1, 0))
        if "resnet" in kinds and _is(mod, "ResnetBlock2D"):
            groups = mod.norm2.num_groups
            if mod.conv1.out_channels != mod.norm2.num_channels or \
                    getattr(mod, "time_embedding_norm", "default") != "default":
                continue  # scale-shift time conditioning is not sliced
            units.append(GateUnit(path, "resnet", groups, mod.conv1.out_channels // groups))
        elif "heads" in kinds and _is(mod, "Attention") and _plain_attention(mod):
            units.append(GateUnit(path, "heads", mod.heads, mod.to_q.out_features // mod.heads))
        elif "ff" in kinds and _is(mod, "FeedForward"):
            layers = _ff_layers(mod)
            if layers is None:
                continue
            hidden = layers[1].in_features
            g = ff_groups if hidden % ff_groups == 0 else 1
            units.append(GateUnit(path, "ff", g, hidden // g))
    return units


def _consumer(unet: nn.Module, unit: GateUnit) -> nn.Module:
    """The layer whose *input* carries the unit's gated features."""
    mod = unet.get_submodule(unit.path)
    if unit.kind == "resnet":
        return mod.conv2
    if unit.kind == "heads":
        return mod.to_out[0]
    return mod.net[-1]


# ---------------------------------------------------------------------------------------------------
# MACs

def _attn_shapes(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """``(batch, query tokens, key tokens)`` of an Attention call."""
    hs = args[0] if args else kwargs["hidden_states"]
    enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    b = hs.shape[0]
    nq = hs.shape[1] if hs.ndim == 3 else int(torch.tensor(hs.shape[2:]).prod())
    nk = nq if enc is None else (enc.shape[1] if enc.ndim == 3 else int(torch.tensor(enc.shape[2:]).prod()))
    return b, nq, nk


@torch.no_grad()
def count_macs(module: nn.Module, *inputs: Any, per_module: bool = False, **kwargs: Any) -> Any:
    """Multiply-accumulates of one forward of ``module`` per sample: every ``nn.Conv2d`` and ``nn.Linear``
    plus the two attention matmuls (``QK^T`` and ``AV``) of every diffusers ``Attention``.

    With ``per_module`` also returns ``{path: MACs}`` (attention matmuls under ``<path>.matmul``)."""
    found: dict[str, float] = {}
    names = {m: n for n, m in module.named_modules()}
    batch = [1]

    def conv_hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
        cin = m.in_channels // m.groups if isinstance(m, nn.Conv2d) else m.in_features
        found[names[m]] = found.get(names[m], 0.0) + out.numel() * cin * k / batch[0]

    def attn_hook(m: nn.Module, args: tuple, kw: dict) -> None:
        b, nq, nk = _attn_shapes(m, args, kw)
        inner = m.to_q.out_features
        found[names[m] + ".matmul"] = found.get(names[m] + ".matmul", 0.0) + 2.0 * nq * nk * inner

    handles = []
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(conv_hook))
        elif _is(m, "Attention") and hasattr(m, "to_q"):
            handles.append(m.register_forward_pre_hook(attn_hook, with_kwargs=True))
    try:
        first = inputs[0] if inputs else next(iter(kwargs.values()))
        batch[0] = first.shape[0]
        module(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    total = float(sum(found.values()))
    return (total, found) if per_module else total


def unit_macs(unit: GateUnit, per_module: dict[str, float]) -> float:
    """The MACs of ``unit`` that scale with its kept fraction, from a :func:`count_macs` breakdown."""
    p = unit.path
    if unit.kind == "resnet":
        names = [f"{p}.conv1", f"{p}.conv2", f"{p}.time_emb_proj"]
    elif unit.kind == "heads":
        names = [f"{p}.to_q", f"{p}.to_k", f"{p}.to_v", f"{p}.to_out.0", f"{p}.matmul"]
    elif unit.kind == "block":
        names = [k for k in per_module if k.startswith(p + ".")]  # nested width units are subtracted later
    else:
        names = [k for k in per_module if k.startswith(f"{p}.net.")]  # the projection and the output layer
    return float(sum(per_module.get(n, 0.0) for n in names))


# ---------------------------------------------------------------------------------------------------
# The gated UNet

def width_template(units: Sequence[GateUnit]) -> torch.Tensor:
    """Per-gate weight ``1/sqrt(n_groups)`` so that every unit counts equally in a cosine similarity of
    architecture vectors (the width normalisation of APTP's code assignment)."""
    return torch.cat([torch.full((u.n_groups,), u.n_groups ** -0.5) for u in units])


class GatedUNet(nn.Module):
    """A UNet with per-sample structured gates (APTP Sec. 3.2) and an exact MACs model.

    ``set_gates(g)`` with ``g`` of shape ``[n_gates]`` or ``[B, n_gates]`` (values in [0, 1], ``None`` for the
    full model) applies to the following forwards. The wrapped UNet's own weights are untouched.
    """

    def __init__(self, unet: nn.Module, example: tuple[torch.Tensor, ...], kinds: Sequence[str] = UNIT_KINDS,
                 ff_groups: int = 8) -> None:
        super().__init__()
        self.unet = unet
        units = find_units(unet, kinds, ff_groups)
        if not units:
            raise ValueError("no prunable ResNet, attention or feed-forward units found in this UNet")
        total, per = count_macs(canonical_module(unet, "unet-cond"), *example, per_module=True)
        per = {k[len("inner."):] if k.startswith("inner.") else k: v for k, v in per.items()}
        units = [GateUnit(u.path, u.kind, u.n_groups, u.group_size, unit_macs(u, per)) for u in units]
        #: for each unit, the index of the block unit that contains it (or -1)
        self.parent = [next((j for j, b in enumerate(units) if b.kind == "block" and u.path.startswith(b.path + ".")),
                            -1) for u in units]
        own = [u.macs - sum(v.macs for v, p in zip(units, self.parent) if p == i) if u.kind == "block" else u.macs
               for i, u in enumerate(units)]
        self.units = [GateUnit(u.path, u.kind, u.n_groups, u.group_size, m) for u, m in zip(units, own)]
        self.total_macs = total
        self.fixed_macs = total - sum(u.macs for u in self.units)
        sizes = [u.n_groups for u in self.units]
        self.offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()
        self.n_gates = self.offsets[-1]
        self._gates: torch.Tensor | None = None
        self._handles = [unet.get_submodule(u.path).register_forward_hook(self._block_hook(i), with_kwargs=True)
                         if u.kind == "block" else _consumer(unet, u).register_forward_pre_hook(self._hook(i))
                         for i, u in enumerate(self.units)]

    # -- gates ------------------------------------------------------------------------------------
    def set_gates(self, gates: torch.Tensor | None) -> None:
        if gates is not None and gates.shape[-1] != self.n_gates:
            raise ValueError(f"expected {self.n_gates} gates, got {gates.shape[-1]}")
        self._gates = gates

    def unit_slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i + 1])

    def _hook(self, i: int):  # noqa: ANN202 - a closure for register_forward_pre_hook
        unit = self.units[i]

        def hook(_m: nn.Module, args: tuple) -> tuple | None:
            if self._gates is None:
                return None
            x = args[0]
            g = self._gates[..., self.unit_slice(i)].to(x.dtype)
            g = g.repeat_interleave(unit.group_size, dim=-1)
            if g.ndim == 1:
                g = g.unsqueeze(0)
            if g.shape[0] not in (1, x.shape[0]):  # e.g. a CFG batch [uncond; cond] of 2B rows
                g = g.repeat(x.shape[0] // g.shape[0], 1)
            shape = (g.shape[0], -1, 1, 1) if unit.kind == "resnet" else (g.shape[0], 1, -1)
            return (x * g.reshape(shape),) + tuple(args[1:])

        return hook

    def _block_hook(self, i: int):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if self._gates is None:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out.sample
            g = self._gates[..., self.offsets[i]].to(y.dtype).reshape(-1, *([1] * (y.ndim - 1)))
            if g.shape[0] not in (1, y.shape[0]):
                g = g.repeat(y.shape[0] // g.shape[0], *([1] * (y.ndim - 1)))
            new = x + g * (y - x)
            if isinstance(out, tuple):
                return (new,) + tuple(out[1:])
            out.sample = new
            return out

        return hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- MACs -------------------------------------------------------------------------------------
    def unit_macs_vector(self) -> torch.Tensor:
        """Per-gate MACs weight: ``macs_u / n_groups_u`` for each gate of unit ``u``."""
        return torch.cat([torch.full((u.n_groups,), u.macs / u.n_groups) for u in self.units])

    def macs(self, gates: torch.Tensor | None) -> torch.Tensor:
        """Per-sample MACs of the gate setting ``gates`` (``[n]`` or ``[B, n]``; differentiable). A unit inside
        a gated block counts only when its block is on: ``macs_u * mean(g_u) * g_block``."""
        if gates is None:
            return torch.tensor(self.total_macs)
        w = self.unit_macs_vector().to(gates.dtype)
        if all(p < 0 for p in self.parent):
            return self.fixed_macs + gates @ w
        total = torch.full(gates.shape[:-1], self.fixed_macs, dtype=gates.dtype)
        for i, u in enumerate(self.units):
            part = gates[..., self.unit_slice(i)] @ w[self.unit_slice(i)]
            if self.parent[i] >= 0:
                part = part * gates[..., self.offsets[self.parent[i]]]
            total = total + part
        return total

    def macs_ratio(self, gates: torch.Tensor | None) -> torch.Tensor:
        return self.macs(gates) / self.total_macs

    def template(self) -> torch.Tensor:
        """:func:`width_template` of this UNet's units."""
        return width_template(self.units)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                gates: torch.Tensor | None = None) -> torch.Tensor:
        if gates is not None:
            self.set_gates(gates)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        finally:
            if gates is not None:
                self._gates = None


def units_from_dicts(items: Iterable[dict[str, Any]]) -> list[GateUnit]:
    return [GateUnit(**d) for d in items]
