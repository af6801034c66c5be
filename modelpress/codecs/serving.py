"""Serving many BitDelta fine-tunes of one base in one batched forward.

BitDelta (Liu et al., 2024), Sec. 3.3 / Fig. 4: requests for different fine-tunes share one batch. Each
linear layer computes the base product ``X W_base^T`` once for the whole batch and adds, for the rows of
request ``i``, ``alpha_i * X_i sign_i^T`` (packed signs, :mod:`modelpress.kernels.sign_gemv`) plus its
bias. Other modules whose tensors differ between the fine-tunes (kept norms, a classification head) are
run per tenant on that tenant's rows; modules that are identical (the reverted embeddings, the base
parts) are shared.

Every module of the model must be batch-first (true of transformers encoders and classifiers);
``forward`` takes ``tenant_ids`` ``[B]`` and the model's usual keyword inputs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .bitdelta import BitDeltaLinear
from .delta import replace_module


class _Route:
    """The tenant of each batch row, shared by all multi-tenant modules of one model."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        assert self.ids is not None, "set the tenant ids before the forward"
        return [(int(t), torch.nonzero(self.ids == t).flatten()) for t in torch.unique(self.ids)]


class MultiTenantBitDeltaLinear(nn.Module):
    """One base weight, ``K`` packed sign matrices, alphas and biases."""

    def __init__(self, layers: list[BitDeltaLinear], route: _Route, use_kernel: bool = True) -> None:
        super().__init__()
        first = layers[0]
        for other in layers[1:]:
            if not torch.equal(other.weight, first.weight):
                raise UserError("the fine-tunes do not share one base (a base weight differs)")
        self.in_features, self.out_features = first.in_features, first.out_features
        self.register_buffer("weight", first.base_weight_oi().detach().clone())
        self.register_buffer("signs", torch.stack([l.signs for l in layers]))
        self.register_buffer("alphas", torch.stack([l.alpha.detach().reshape(()) for l in layers]))
        has_bias = first.bias is not None
        self.register_buffer("biases", torch.stack([l.bias for l in layers]) if has_bias else None)
        self._route = route
        self.use_kernel = use_kernel
        self._signs_f: torch.Tensor | None = None

    def _delta(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.use_kernel:
            from ..kernels.sign_gemv import sign_matmul

            y = sign_matmul(x.detach().float().cpu().numpy(), self.signs[t].numpy(), self.in_features)
            return torch.from_numpy(y).to(x.dtype)
        if self._signs_f is None:
            from ..quant.primitives import unpack_signs

            self._signs_f = torch.stack([unpack_signs(s, self.in_features) for s in self.signs])
        return F.linear(x, self._signs_f[t].to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype))  # the base product, once for the whole batch
        for t, rows in self._route.groups():
            xt = x[rows].reshape(-1, self.in_features)
            d = self.alphas[t].to(x.dtype) * self._delta(xt, t)
            if self.biases is not None:
                d = d + self.biases[t].to(x.dtype)
            y[rows] += d.reshape(len(rows), *x.shape[1:-1], self.out_features)
        return y


class PerTenantModule(nn.Module):
    """A module whose tensors differ between tenants: each tenant's copy runs on that tenant's rows."""

    def __init__(self, copies: list[nn.Module], route: _Route) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)
        self._route = route

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n = len(self._route.ids)
        if x.shape[0] == 1 and n > 1:
            x = x.expand(n, *x.shape[1:])
        out = None
        for t, rows in self._route.groups():
            y = self.copies[t](x[rows], *args, **kwargs)
            if out is None:
                out = y.new_zeros((n, *y.shape[1:]))
            out[rows] = y
        return out


def _leaf_state(mod: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
            if v is not None}


class MultiTenantModel(nn.Module):
    """A batched model over ``K`` BitDelta-compressed fine-tunes of one base.

    ``forward(tenant_ids, **inputs)`` runs row ``b`` of the batch as fine-tune ``tenant_ids[b]``.
    """

    def __init__(self, models: list[nn.Module], use_kernel: bool = False) -> None:
        super().__init__()
        if not models:
            raise UserError("no fine-tunes to serve")
        self.route = _Route()
        self.model = copy.deepcopy(models[0]).eval()
        self.tenants = len(models)
        mods = [dict(m.named_modules()) for m in models]
        done: list[str] = []
        for name, mod in list(self.model.named_modules()):
            if not name:
                continue
            if any(name.startswith(p + ".") for p in done):
                continue
            if isinstance(mod, BitDeltaLinear):
                layers = [m.get(name) for m in mods]
                if not all(isinstance(l, BitDeltaLinear) for l in layers):
                    raise UserError(f"layer {name} is BitDelta-compressed in some fine-tunes only")
                replace_module(self.model, name, MultiTenantBitDeltaLinear(layers, self.route, use_kernel))
                done.append(name)
                continue
            state = _leaf_state(mod)
            if not state:
                continue
            same = all(set(_leaf_state(m[name])) == set(state) and
                       all(torch.equal(_leaf_state(m[name])[k], v) for k, v in state.items()) for m in mods[1:])
            if not same:
                replace_module(self.model, name, PerTenantModule([copy.deepcopy(m[name]) for m in mods], self.route))
                done.append(name)

    def forward(self, tenant_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if tenant_ids.min() < 0 or tenant_ids.max() >= self.tenants:
            raise UserError(f"tenant ids must be in 0..{self.tenants - 1}")
        self.route.ids = tenant_ids
        try:
            return self.model(*args, **kwargs)
        finally:
            self.route.ids = None
