"""DARE and DAREx-q: drop most delta parameters, rescale the survivors.

* **DARE** — Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch" (ICML 2024), Sec. 3: every delta entry is dropped with probability
  ``p`` and the survivors are rescaled by ``1 / (1 - p)`` so the expected output of each layer is
  unchanged.
* **DAREx-q** — Deng, Zhao, Vakilian, Chen, Li, Thrampoulidis, "DARE the Extreme: Revisiting
  Delta-Parameter Pruning for Fine-Tuned Models" (ICLR 2025), Sec. 4.1: at high ``p`` the factor
  ``1/(1-p)`` blows up the variance of the output change; rescale by ``1/q`` with ``q`` in ``(1-p, 1]``
  instead, chosen

  - ``labelled``: globally, the ``q`` of a grid that maximises a labelled validation metric;
  - ``unlabelled``: globally, the ``q`` that minimises the mean absolute change of the last layer's output
    against the fine-tune on unlabelled calibration text (the paper's Fig. 1 proxy);
  - ``analytic``: per layer, in closed form from the statistics of ``c_ij = delta_ij x_j``. With
    ``h = sum_j c_j`` and a Bernoulli(1-p) mask ``m``, ``E[(sum_j m_j c_j / q - h)^2] =
    p(1-p)/q^2 * sum_j c_j^2 + ((1-p)/q - 1)^2 h^2`` (the variance and squared mean of the pruned
    output, the two terms the paper's Theorem 3.1 bounds), minimised at
    ``q* = (1 - p) + p * sum_j c_j^2 / h^2``. Summed over output units and tokens:
    ``q = (1-p) + p * tr(Delta^2 diag(X^T X)) / tr(Delta X^T X Delta^T)``, clipped to ``[1-p, 1]``.
    The paper's own per-layer rule could not be read offline; this is our derivation from the
    same mean/variance decomposition (docs/delta.md).

* Importance-based pruning of deltas (DAREx Sec. 5): ``magnitude`` keeps the largest ``|delta|``,
  ``importance`` keeps the largest ``|delta_ij| * ||x_j||`` (WANDA's score on the delta), both without
  the random mask; the paper recommends them when deltas are large.

Storage: for the random mask only the seed and the kept values (fp16) are stored — the mask is
regenerated from a ``torch.Generator`` seeded with the stored seed (deterministic for a given torch
version). Deterministic masks (magnitude / importance) store the kept positions as int32 indices or as
a packed 1-bit mask, whichever is smaller.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field

from ..data.inputs import labelled_text
from ..errors import UserError
from ..model import ModelHandle
from ..modules import register_module
from ..passes import Context, Pass, UnitCalibration, in_model_order, register_pass
from ..quant.primitives import pack_signs, unpack_signs
from ..sources import load_dataset
from .delta import (INPUT_HESSIAN_SCALE, DeltaConfig, DeltaLayer, DeltaLinear, calibration_batches,
                    collect_input_hessians, handle_other_tensors, match_linear_layers, model_outputs, output_change,
                    replace_module, require_base)

PruneMethod = Literal["random", "magnitude", "importance"]


def random_keep_mask(seed: int, numel: int, p: float) -> torch.Tensor:
    """The DARE mask: ``True`` where an entry survives (probability ``1 - p``), regenerated from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(numel, generator=g) >= p


@register_module
class DareLinear(DeltaLinear):
    """``y = x W_base^T + x (M * Delta / q)^T + b`` with the kept delta values stored in fp16.

    ``mask_mode == "seed"``: the mask is regenerated from the ``seed`` buffer with drop rate ``p``;
    ``"indices"``: the kept flat positions are stored in ``indices``. ``rescale`` (= 1/q) is a buffer so a
    search can change it without recompressing.
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool, transposed: bool, p: float,
                 n_kept: int, mask_mode: str) -> None:
        super().__init__(in_features, out_features, has_bias, transposed)
        self.p, self.n_kept, self.mask_mode = float(p), int(n_kept), mask_mode
        self.register_buffer("values", torch.zeros(n_kept, dtype=torch.float16))
        self.register_buffer("rescale", torch.ones(1))
        if mask_mode == "seed":
            self.register_buffer("seed", torch.zeros(1, dtype=torch.int64))
        elif mask_mode == "indices":
            self.register_buffer("indices", torch.zeros(n_kept, dtype=torch.int32))
        elif mask_mode == "bitmask":
            self.register_buffer("mask", torch.zeros(out_features, (in_features + 31) // 32, dtype=torch.int32))
        else:
            raise ValueError(f"unknown mask mode {mask_mode!r}")

    def module_config(self) -> dict[str, Any]:
        return {**self._base_config(), "p": self.p, "n_kept": self.n_kept, "mask_mode": self.mask_mode}

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "DareLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["has_bias"], cfg["transposed"], cfg["p"],
                   cfg["n_kept"], cfg["mask_mode"])

    def kept_positions(self) -> torch.Tensor:
        numel = self.in_features * self.out_features
        if self.mask_mode == "seed":
            pos = torch.nonzero(random_keep_mask(int(self.seed), numel, self.p)).flatten()
            if pos.numel() != self.n_kept:
                raise UserError("the DARE mask regenerated from the stored seed does not match the stored values "
                                "(a different torch random generator?)")
            return pos
        if self.mask_mode == "bitmask":
            return torch.nonzero(unpack_signs(self.mask, self.in_features).flatten() > 0).flatten()
        return self.indices.long()

    def sparse_delta(self) -> torch.Tensor:
        """The kept delta values in place, not rescaled, ``[out, in]`` (cached until the next load)."""
        d = self._cache.get("delta")
        if d is None:
            d = torch.zeros(self.out_features * self.in_features, device=self.values.device)
            d[self.kept_positions().to(d.device)] = self.values.float()
            d = d.reshape(self.out_features, self.in_features)
            self._cache["delta"] = d
        return d

    def delta_weight(self) -> torch.Tensor:
        return self.sparse_delta() * self.rescale.float()


def dare_layer(layer: DeltaLayer, p: float, method: PruneMethod, seed: int,
               input_norms: torch.Tensor | None) -> DareLinear:
    """Prune one layer's delta with drop rate ``p``; the rescale factor is left at 1 (set by the caller)."""
    delta = layer.delta
    numel = delta.numel()
    if method == "random":
        keep = random_keep_mask(seed, numel, p)
        pos = torch.nonzero(keep).flatten()
        mode = "seed"
    else:
        score = delta.abs()
        if method == "importance":
            if input_norms is None:
                raise UserError("darex: importance pruning needs calibration inputs")
            score = score * input_norms[None, :].float()
        k = max(1, int(round((1 - p) * numel)))
        pos = torch.topk(score.flatten(), k).indices.sort().values
        # whichever is smaller: int32 positions or a 1-bit-per-entry mask
        mode = "indices" if 4 * k < 4 * layer.out_features * math.ceil(layer.in_features / 32) else "bitmask"
    mod = DareLinear(layer.in_features, layer.out_features, layer.module.bias is not None, layer.transposed, p,
                     pos.numel(), mode)
    mod._init_from(layer)
    with torch.no_grad():
        mod.values.copy_(delta.flatten()[pos].to(torch.float16))
        if mode == "seed":
            mod.seed.fill_(seed)
        elif mode == "indices":
            mod.indices.copy_(pos.to(torch.int32))
        else:
            keep = torch.zeros(numel, dtype=torch.bool)
            keep[pos] = True
            mod.mask.copy_(pack_signs(keep.reshape(layer.out_features, layer.in_features)))
    return mod


def analytic_q(delta: torch.Tensor, H: torch.Tensor, p: float) -> float:
    """Per-layer ``q`` minimising the expected squared output change (see the module docstring)."""
    d = delta.double()
    s = float(((d * d) @ torch.diag(H)).sum())
    h2 = float(torch.einsum("oi,ij,oj->", d, H, d))
    if h2 <= 0:
        return 1.0
    return float(min(1.0, max(1.0 - p, (1.0 - p) + p * s / h2)))


def q_grid(p: float, n: int) -> list[float]:
    """``n`` values of ``q`` from ``1 - p`` to 1, geometric (the interesting range is near ``1 - p``)."""
    lo = max(1.0 - p, 1e-6)
    return [float(v) for v in np.geomspace(lo, 1.0, n)]


def set_q(model: torch.nn.Module, q: float | dict[str, float]) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, DareLinear):
            v = q[name] if isinstance(q, dict) else q
            mod.rescale.fill_(1.0 / v)


def search_q(model: torch.nn.Module, p: float, n: int, score: Callable[[], float], ctx: Context,
             desc: str) -> tuple[float, list[tuple[float, float]]]:
    """Set every DareLinear's ``q`` to each grid value in turn; keep the one with the lowest ``score``."""
    trials = []
    for q in ctx.progress(q_grid(p, n), desc=desc):
        set_q(model, q)
        trials.append((q, float(score())))
    lowest = min(t[1] for t in trials)
    tied = [q for q, v in trials if v == lowest]
    best = tied[len(tied) // 2]  # the middle of a plateau of equal scores (accuracy ties are common)
    set_q(model, best)
    return best, trials


def labelled_validation(handle: ModelHandle, dataset: str | None, n: int | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(input_ids, attention_mask, labels)`` of the first ``n`` examples of the labelled validation data
    (``dataset``, else the zoo model's own validation split), or ``None`` when there is none."""
    data = load_dataset(dataset, handle, "validation")
    if data is None or "label" not in data.fields:
        return None
    return labelled_text(handle, data, n, int(handle.extras.get("max_length", 64)))


def _accuracy_error(handle: ModelHandle, module: torch.nn.Module,
                    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Callable[[], float]:
    canon = handle.replace_module(module).canonical()

    def err() -> float:
        with torch.no_grad():
            logits = torch.cat([canon(data[0][i:i + 64], data[1][i:i + 64]) for i in range(0, len(data[0]), 64)])
        return 1.0 - float((logits.argmax(-1) == data[2]).float().mean())

    return err


class _DareBase(Pass):
    needs_base = True

    def _compress(self, model: ModelHandle, ctx: Context, p: float, method: PruneMethod,
                  hessians: dict[str, torch.Tensor], skip: list[str], base: torch.nn.Module | None = None,
                  first_layer: int = 0, copy_base: bool = True) -> tuple[torch.nn.Module, list[DeltaLayer]]:
        """Prune every matched linear delta of ``model`` against ``base`` (default: the context's); the
        ``i``-th layer of the whole model (``first_layer`` + its index here) draws its mask from its own seed."""
        student = model.module.eval()  # changed in place
        layers = match_linear_layers(student, ctx.base.module if base is None else base, skip, copy_base)
        for i, layer in enumerate(layers, start=first_layer):
            norms = torch.sqrt(torch.diag(hessians[layer.name])) if layer.name in hessians else None
            seed = (ctx.seed * 1_000_003 + 7919 * (i + 1)) % (2**31 - 1)
            replace_module(student, layer.name, dare_layer(layer, p, method, seed, norms))
        return student, layers


@register_pass
class DarePass(_DareBase):
    """``type: dare`` — random drop with probability ``p``, survivors rescaled by ``1/(1-p)``."""

    name = "dare"

    class Config(DeltaConfig):
        p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability")

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        require_base(self.name, model, ctx)
        model, part = self._prune(model, ctx, ctx.base.module, 0, copy_base=True)
        self.record_units([part], ctx)
        return model

    def streams(self) -> bool:
        return True  # each layer's mask comes from its own seed

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: torch.nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        return self._prune(unit, ctx, base, first_layer, copy_base=False)  # the base unit is dropped after it

    def _prune(self, unit: ModelHandle, ctx: Context, base: torch.nn.Module, first_layer: int,
               copy_base: bool) -> tuple[ModelHandle, dict[str, Any]]:
        cfg = self.config
        student, layers = self._compress(unit, ctx, cfg.p, "random", {}, cfg.skip, base, first_layer, copy_base)
        other = handle_other_tensors(student, base, cfg.embeddings_for(unit.kind), cfg.norms, cfg.biases)
        set_q(student, 1.0 - cfg.p)
        return unit.replace_module(student), {"layers": len(layers), **other}

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        cfg = self.config
        ctx.record(self.name, layers=sum(p["layers"] for p in parts), p=cfg.p, q=1.0 - cfg.p,
                   reverted=in_model_order([k for p in parts for k in p["reverted"]], rank),
                   kept=in_model_order([k for p in parts for k in p["kept"]], rank))


@register_pass
class DarexPass(_DareBase):
    """``type: darex`` — DAREx-q: DARE (or magnitude / importance pruning) with a tuned rescale ``1/q``."""

    name = "darex"

    class Config(DeltaConfig):
        p: float = Field(0.99, ge=0.0, lt=1.0, description="drop probability (fraction of the delta pruned)")
        q_mode: Literal["labelled", "unlabelled", "analytic", "fixed"] = "unlabelled"
        q: float | None = Field(None, gt=0.0, le=1.0, description="the q of q_mode: fixed")
        prune: PruneMethod = "random"
        grid: int = Field(20, ge=2, le=1000, description="q values tried by the global searches")
        samples: int = Field(32, ge=1, le=100_000, description="calibration texts (search / statistics)")
        val_samples: int | None = Field(None, ge=1, le=100_000,
                                        description="labelled validation examples (default: the whole split)")
        val_dataset: str | None = Field(None, min_length=1, description="labelled validation data of q_mode "
                                        "labelled (default: the zoo model's validation split)")
        batch_size: int = Field(16, ge=1, le=1024)
        seq_len: int = Field(64, ge=4, le=4096, description="tokens per calibration text")

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        cfg = self.config
        require_base(self.name, model, ctx)
        if cfg.q_mode == "fixed" and cfg.q is None:
            raise UserError("darex: q_mode fixed needs q", "passes")
        t0 = time.time()
        batches = calibration_batches(model, ctx, self.name, ctx.setting(cfg, "samples"),
                                          ctx.setting(cfg, "batch_size"), ctx.setting(cfg, "seq_len"), offset=31)
        hessians: dict[str, torch.Tensor] = {}
        if cfg.q_mode == "analytic" or cfg.prune == "importance":
            layers0 = match_linear_layers(model.module, ctx.base.module, cfg.skip)
            hessians = collect_input_hessians(model, layers0, batches, ctx, desc="darex input statistics")
        teacher = ctx.original(model) if cfg.q_mode == "unlabelled" else None  # the fine-tune's outputs
        student, layers = self._compress(model, ctx, cfg.p, cfg.prune, hessians, cfg.skip)
        other = handle_other_tensors(student, ctx.base.module, cfg.embeddings_for(model.kind), cfg.norms, cfg.biases)
        record: dict[str, Any] = {}
        if cfg.q_mode == "fixed":
            set_q(student, float(cfg.q))
            record["q"] = cfg.q
        elif cfg.q_mode == "analytic":
            qs = {l.name: analytic_q(l.delta, hessians[l.name], cfg.p) for l in layers}
            set_q(student, qs)
            record["q"] = qs
        elif cfg.q_mode == "unlabelled":
            with torch.no_grad():
                refs = [model_outputs(teacher, teacher.module, b, "hidden") for b in batches]

            def change() -> float:
                with torch.no_grad():
                    return float(np.mean([output_change(model_outputs(model, student, b, "hidden"), r)
                                          for b, r in zip(batches, refs)]))

            best, trials = search_q(student, cfg.p, cfg.grid, change, ctx, "darex q search (unlabelled)")
            record.update(q=best, trials=trials)
        else:
            data = labelled_validation(model, cfg.val_dataset, cfg.val_samples)
            if data is None:
                raise UserError("darex: q_mode labelled needs labelled validation data: set val_dataset (a .jsonl "
                                "file with text and label) or use q_mode unlabelled or analytic", "passes")
            best, trials = search_q(student, cfg.p, cfg.grid, _accuracy_error(model, student, data), ctx,
                                    "darex q search (labelled)")
            record.update(q=best, trials=trials)
        ctx.record(self.name, layers=len(layers), p=cfg.p, prune=cfg.prune, q_mode=cfg.q_mode,
                   reverted=other["reverted"], kept=other["kept"], seconds=round(time.time() - t0, 2), **record)
        return model.replace_module(student)

    # -- streamed (modelpress.stream): with q_mode analytic every layer needs only its own input Hessian

    def streams(self) -> bool:
        return self.config.q_mode == "analytic"  # the other modes search q on the whole model's outputs

    def calibrates_on_activations(self) -> bool:
        return self.streams()

    def unit_calibration(self, model: ModelHandle, ctx: Context) -> UnitCalibration | None:
        if not self.calibrates_on_activations():
            return None
        cfg = self.config
        batches = calibration_batches(model, ctx, self.name, ctx.setting(cfg, "samples"),
                                      ctx.setting(cfg, "batch_size"), ctx.setting(cfg, "seq_len"), offset=31)
        return UnitCalibration(batches, self._hessian_layers, INPUT_HESSIAN_SCALE)

    def _hessian_layers(self, unit: torch.nn.Module, base: torch.nn.Module | None) -> list[str]:
        return [layer.name for layer in match_linear_layers(unit, base, self.config.skip, copy_base=False)]

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: torch.nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        cfg = self.config
        t0 = time.time()
        student, layers = self._compress(unit, ctx, cfg.p, cfg.prune, ctx.unit_hessians, cfg.skip, base, first_layer,
                                         copy_base=False)  # the base unit is dropped after it
        other = handle_other_tensors(student, base, cfg.embeddings_for(unit.kind), cfg.norms, cfg.biases)
        qs = {l.name: analytic_q(l.delta, ctx.unit_hessians[l.name], cfg.p) for l in layers}
        set_q(student, qs)
        return unit.replace_module(student), {"layers": len(layers), "q": qs, "seconds": time.time() - t0, **other}

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        cfg = self.config
        qs = {k: v for p in parts for k, v in p["q"].items()}
        ctx.record(self.name, layers=sum(p["layers"] for p in parts), p=cfg.p, prune=cfg.prune, q_mode=cfg.q_mode,
                   reverted=in_model_order([k for p in parts for k in p["reverted"]], rank),
                   kept=in_model_order([k for p in parts for k in p["kept"]], rank),
                   seconds=round(sum(p["seconds"] for p in parts), 2), q={k: qs[k] for k in in_model_order(qs, rank)})

