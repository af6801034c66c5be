"""BitDelta: a fine-tune's weight delta as one sign bit per weight and one scale per matrix.

Liu, Yuan, Wang, Ma, Zhang, Finkelstein, Li, "BitDelta: Your Fine-Tune May Only Be Worth One Bit"
(NeurIPS 2024). For every linear layer, ``Delta = W_ft - W_base`` is replaced by
``alpha * sign(Delta)`` (Eq. 1), ``alpha`` initialised to ``mean|Delta|``, the L2-optimal scale for a
fixed sign matrix (Eq. 2). Then *scale distillation* (Sec. 3.2, Eq. 3): only the per-matrix alphas are
trained so that the compressed model's outputs match the fine-tune's on calibration text (MSE), with
AdamW (paper: lr 1e-4, 200 steps x batch 4 x 128 tokens on C4, for 7B-70B LLMs). Embeddings, norms and the
head are not 1-bit compressed (here: by option, see :mod:`modelpress.codecs.delta`).

Causal LMs (kind ``causal-lm``): as in the paper (Sec. 3, "we keep the embedding and LM head layers in
high precision"), only the transformer blocks' linear layers are 1-bit compressed by default: the
fine-tune's input embeddings and ``lm_head`` are kept at full precision (``embeddings: keep``,
``lm_head: keep``); a tied ``lm_head`` is the embedding and follows ``embeddings``. The distillation
matches the logits at the real tokens plus the last hidden state (``target: both``).

Our scale: the MiniLM classifiers have 37 matrices and logits of a few classes, so the distillation
target is the last hidden state (all real tokens) plus the logits (``target: both``), and the default
learning rate is 1e-4 (alphas of MiniLM deltas are ~1e-3, so Adam steps of 1e-4 move them by ~10 %
per step; we measured larger rates to oscillate: see docs/delta.md).

Signs are packed 32 per int32 (:func:`~modelpress.quant.primitives.pack_signs`); the stored delta of a
``[out, in]`` matrix is ``out * ceil(in/32) * 4 + 4`` bytes, ~1/16 of its fp16 delta.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..devices import float32_arithmetic, on_device
from ..model import ModelHandle, output_head_path
from ..modules import register_module
from ..passes import Context, Pass, in_model_order, register_pass
from ..quant.primitives import pack_signs, unpack_signs
from .delta import (DeltaConfig, DeltaLayer, DeltaLinear, calibration_batches, handle_other_tensors,
                    match_linear_layers, model_outputs, output_mse, replace_module,
                    require_base)


@register_module
class BitDeltaLinear(DeltaLinear):
    """``y = x W_base^T + alpha * x sign(Delta)^T + b`` with the signs packed in ``signs`` (int32)."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True, transposed: bool = False) -> None:
        super().__init__(in_features, out_features, has_bias, transposed)
        self.register_buffer("signs", torch.zeros(out_features, (in_features + 31) // 32, dtype=torch.int32))
        self.alpha = torch.nn.Parameter(torch.zeros(1))
        #: use the numba packed-sign kernel instead of unpacking the signs (inference only)
        self.use_kernel = False

    @classmethod
    def from_delta(cls, layer: DeltaLayer) -> "BitDeltaLinear":
        delta = layer.delta
        mod = cls(layer.in_features, layer.out_features, layer.module.bias is not None, layer.transposed)
        mod._init_from(layer)
        with torch.no_grad():
            mod.signs.copy_(pack_signs(delta > 0))
            mod.alpha.fill_(float(delta.abs().mean()))
        return mod

    def module_config(self) -> dict[str, Any]:
        return self._base_config()

    @classmethod
    def from_module_config(cls, cfg: dict[str, Any]) -> "BitDeltaLinear":
        return cls(cfg["in_features"], cfg["out_features"], cfg["has_bias"], cfg["transposed"])

    def sign_matrix(self) -> torch.Tensor:
        """``sign(Delta)`` as float32 +-1 ``[out, in]`` (unpacked once, cached until the next load)."""
        s = self._cache.get("sign")
        if s is None:
            s = unpack_signs(self.signs, self.in_features).to(self.weight.device)
            self._cache["sign"] = s
        return s

    def delta_weight(self) -> torch.Tensor:
        return self.alpha.detach().float() * self.sign_matrix()

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and not torch.is_grad_enabled():
            from ..kernels.sign_gemv import sign_matmul

            flat = x.reshape(-1, self.in_features).detach().float().cpu().numpy()
            y = torch.from_numpy(sign_matmul(flat, self.signs.cpu().numpy(), self.in_features))
            return (self.alpha.float() * y).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return self.alpha.to(x.dtype) * F.linear(x, self.sign_matrix().to(x.dtype))


def compress_layers(model: torch.nn.Module, base: torch.nn.Module, skip: list[str], copy_base: bool = True) -> list[str]:
    """Replace every linear layer of ``model`` that has a base counterpart by a :class:`BitDeltaLinear`
    (``copy_base``: see :func:`~modelpress.codecs.delta.match_linear_layers`)."""
    names = []
    for layer in match_linear_layers(model, base, skip, copy_base):
        replace_module(model, layer.name, BitDeltaLinear.from_delta(layer))
        names.append(layer.name)
    return names


def scale_distillation(handle: ModelHandle, student: torch.nn.Module, teacher: torch.nn.Module,
                       batches: list[tuple[torch.Tensor, ...]], steps: int, lr: float,
                       target: Literal["output", "hidden", "both"], ctx: Context) -> list[float]:
    """Train only the alphas of ``student`` to match ``teacher``'s outputs (BitDelta Eq. 3). Returns the
    loss per step."""
    alphas = [m.alpha for m in student.modules() if isinstance(m, BitDeltaLinear)]
    for p in student.parameters():
        p.requires_grad_(False)
    for a in alphas:
        a.requires_grad_(True)
    opt = torch.optim.AdamW(alphas, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    student.eval()
    teacher.eval()
    cycle = itertools.cycle(batches)
    bar = ctx.progress(range(steps), desc="bitdelta scale distillation")
    for _ in bar:
        batch = next(cycle)
        with torch.no_grad():
            ref = model_outputs(handle, teacher, batch, target)
        loss = output_mse(model_outputs(handle, student, batch, target), ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for a in alphas:
                a.clamp_(min=0.0)
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    for a in alphas:
        a.requires_grad_(False)
    return losses


@register_pass
class BitDeltaPass(Pass):
    """``type: bitdelta`` — 1-bit delta with per-matrix scales, then scale distillation."""

    name = "bitdelta"
    needs_base = True

    class Config(DeltaConfig):
        lm_head: Literal["keep", "compress"] | None = Field(
            None, description="a causal LM's output head: keep the fine-tune's at full precision (default, "
                              "BitDelta Sec. 3) or 1-bit compress its delta like the blocks' layers")
        steps: int = Field(200, ge=0, le=100_000, description="scale-distillation steps (0: keep mean|delta|)")
        lr: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate of the alphas")
        batch_size: int = Field(4, ge=1, le=1024)
        seq_len: int = Field(64, ge=4, le=4096, description="tokens per calibration text")
        samples: int | None = Field(None, ge=1, le=1_000_000,
                                    description="distinct calibration samples (default steps * batch_size)")
        target: Literal["output", "hidden", "both"] = "both"

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        cfg = self.config
        base = require_base(self.name, model, ctx)
        t0 = time.time()
        # the fine-tune, the distillation's teacher; the model itself becomes the student
        teacher = ctx.original(model).module.eval() if cfg.steps > 0 else None
        student, part = self._compress(model, base.module)
        losses: list[float] = []
        if cfg.steps > 0:
            bs = ctx.setting(cfg, "batch_size")
            n = ctx.setting(cfg, "samples") or cfg.steps * bs
            batches = calibration_batches(model, ctx, self.name, n, bs, ctx.setting(cfg, "seq_len"), offset=11)
            # the recipe's device (both back on the CPU after); bf16 / fp16 held in float32 where half precision is
            # emulated (the stored weights come back bit for bit; the alphas are float32 throughout)
            with on_device(ctx.device, student, teacher), float32_arithmetic(ctx.device, student, teacher):
                batches = [tuple(t.to(ctx.device) for t in b) for b in batches]
                losses = scale_distillation(model, student, teacher, batches, cfg.steps, cfg.lr, cfg.target, ctx)
        part["alpha"] = {n: student.get_submodule(n).alpha.item() for n in part["alpha_init"]}
        part["losses"], part["seconds"] = losses, time.time() - t0
        self.record_units([part], ctx)
        return model.replace_module(student.eval())

    units_independent = True

    def streams(self) -> bool:
        return self.config.steps == 0  # scale distillation needs the whole model's outputs

    def apply_unit(self, unit: ModelHandle, ctx: Context, base: torch.nn.Module | None,
                   first_layer: int) -> tuple[ModelHandle, dict[str, Any]]:
        t0 = time.time()
        student, part = self._compress(unit, base, copy_base=False)  # the base unit is dropped after this one
        part.update(alpha=part["alpha_init"], losses=[], seconds=time.time() - t0)
        return unit.replace_module(student), part

    def _compress(self, model: ModelHandle, base: torch.nn.Module,
                  copy_base: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
        """1-bit deltas of ``model``'s linear layers against ``base`` (Eq. 1-2) and the other tensors by option."""
        cfg = self.config
        student = model.module.eval()
        causal = model.kind == "causal-lm"
        embeddings = cfg.embeddings_for(model.kind)
        skip = list(cfg.skip)
        head = output_head_path(student) if causal and (cfg.lm_head or "keep") == "keep" else None
        if head:
            skip.append(head)
        other = handle_other_tensors(student, base, embeddings, cfg.norms, cfg.biases)
        names = compress_layers(student, base, skip, copy_base)
        return student, {"layers": len(names), "embeddings": embeddings, "head": head, **other,
                         "alpha_init": {n: student.get_submodule(n).alpha.item() for n in names}}

    def record_units(self, parts: list[dict[str, Any]], ctx: Context,
                     rank: Callable[[str], int] | None = None) -> None:
        def merged(key: str) -> dict[str, float]:
            entries = {k: v for p in parts for k, v in p[key].items()}
            return {k: entries[k] for k in in_model_order(entries, rank)}

        losses = [x for p in parts for x in p["losses"]]
        ctx.record(self.name, layers=sum(p["layers"] for p in parts), embeddings=parts[0]["embeddings"],
                   head_kept=next((p["head"] for p in parts if p["head"]), None),
                   reverted=in_model_order([k for p in parts for k in p["reverted"]], rank),
                   kept=in_model_order([k for p in parts for k in p["kept"]], rank),
                   alpha_init=merged("alpha_init"), alpha=merged("alpha"),
                   loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                   seconds=round(sum(p["seconds"] for p in parts), 2))
