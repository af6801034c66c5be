"""The float operation behind a compressed weight: what a replacement for ``nn.Conv2d`` needs to remember
(stride, padding, dilation, groups, padding mode) and how it runs, written once for every compressed
convolution (PTQ layers, packed GPTQ / RTN weights, sparse weights)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dOp:
    """Mixin: ``_op(x, w, b)`` is the ``F.conv2d`` of the replaced layer; its options round-trip through
    :meth:`conv_config` (JSON-able) and :meth:`conv_options` (read from an ``nn.Conv2d``)."""

    def set_conv(self, stride: Any = (1, 1), padding: Any = (0, 0), dilation: Any = (1, 1), groups: int = 1,
                 padding_mode: str = "zeros") -> None:
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.groups, self.padding_mode = int(groups), padding_mode

    def conv_config(self) -> dict[str, Any]:
        return {"stride": list(self.stride), "dilation": list(self.dilation),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "groups": self.groups, "padding_mode": self.padding_mode}

    @staticmethod
    def conv_options(mod: nn.Conv2d) -> dict[str, Any]:
        return {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups,
                "padding_mode": mod.padding_mode}

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, [p for p in reversed(self.padding) for _ in range(2)], mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def float_layer(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` with this operation and the given weight / bias (for exporters)."""
        out_c, in_per_group, kh, kw = weight.shape
        conv = nn.Conv2d(in_per_group * self.groups, out_c, (kh, kw), self.stride, self.padding, self.dilation,
                         self.groups, bias is not None, self.padding_mode)
        conv.weight.data = weight
        if bias is not None:
            conv.bias.data = bias
        return conv.requires_grad_(False)


class LinearOp:
    """Mixin: ``_op(x, w, b)`` is ``F.linear``; :meth:`float_layer` builds the plain ``nn.Linear``."""

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def float_layer(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        """The plain ``nn.Linear`` with the given weight / bias (for exporters)."""
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        lin.weight.data = weight
        if bias is not None:
            lin.bias.data = bias
        return lin.requires_grad_(False)


def op_for(layer: nn.Module) -> type:
    """:class:`LinearOp` for an ``nn.Linear``, :class:`Conv2dOp` for an ``nn.Conv2d``."""
    if isinstance(layer, nn.Linear):
        return LinearOp
    if isinstance(layer, nn.Conv2d):
        return Conv2dOp
    raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")


class StoredWeightLayer(nn.Module):
    """Base of the compressed replacements of a Linear / Conv2d whose weight is rebuilt from stored tensors
    (packed codes, sparse values): ``forward(x) = op(x, W, b)`` with ``W = rebuild_weight()`` computed once and
    cached (dropped on load and on device / dtype moves), and :meth:`decompressed` giving the plain layer.
    Subclasses mix in :class:`LinearOp` or :class:`Conv2dOp` first (a convolution's options come as keyword
    arguments) and define :meth:`rebuild_weight` and :meth:`layer_config` (the constructor arguments but the
    convolution's). ``bias`` is kept as stored, under the replaced layer's state-dict name."""

    def __init__(self, weight_shape: tuple[int, ...], has_bias: bool, **conv: Any) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("bias", torch.zeros(self.weight_shape[0]) if has_bias else None)
        self._weight: torch.Tensor | None = None
        if isinstance(self, Conv2dOp):
            self.set_conv(**conv)
        elif conv:
            raise TypeError(f"{type(self).__name__} takes no convolution options {sorted(conv)}")

    def layer_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def module_config(self) -> dict[str, Any]:
        return {**self.layer_config(), **(self.conv_config() if isinstance(self, Conv2dOp) else {})}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "StoredWeightLayer":
        return cls(**cfg)

    def rebuild_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stored_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in the replaced layer's shape (cached)."""
        if self._weight is None:
            self._weight = self.rebuild_weight().reshape(self.weight_shape)
        return self._weight

    @property
    def weight(self) -> torch.Tensor:
        """The rebuilt weight (read-only: changing it changes nothing stored), for code that reads ``.weight``."""
        return self.stored_weight()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._weight = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "StoredWeightLayer":
        self._weight = None
        return super()._apply(fn, *args, **kwargs)

    def _copy_bias(self, layer: nn.Module) -> None:
        if self.bias is not None:
            self.bias = layer.bias.detach().clone()

    @classmethod
    def replacing(cls, layer: nn.Module, linear: type, conv: type, **cfg: Any) -> "StoredWeightLayer":
        """An empty ``linear`` or ``conv`` subclass sized for ``layer`` (``nn.Linear`` / ``nn.Conv2d``), with
        ``cfg`` and the layer's convolution options; the caller fills its tensors."""
        op = op_for(layer)
        extra = Conv2dOp.conv_options(layer) if op is Conv2dOp else {}
        mod = (linear if op is LinearOp else conv)(tuple(layer.weight.shape), layer.bias is not None, **cfg, **extra)
        mod._copy_bias(layer)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._op(x, self.stored_weight().to(x.dtype), b)

    def decompressed(self) -> nn.Module:
        """The plain ``nn.Linear`` / ``nn.Conv2d`` computing the same function (for exporters)."""
        return self.float_layer(self.stored_weight().clone(), None if self.bias is None else self.bias.clone())
