"""AdaRound and BRECQ block reconstruction (the Q-Diffusion core), plus the capture utilities they need.

* AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020):
  each weight is rounded down plus a learned ``h(V) in [0, 1]`` (``h = clip(sigmoid(V) * 1.2 - 0.1, 0, 1)``,
  Eq. 23), trained to minimise the output reconstruction error plus
  ``lambda * sum(1 - |2 h(V) - 1|^beta)`` (Eq. 24), with ``beta`` annealed from 20 to 2 after a warm-up
  (20 % of the iterations) without the regulariser; finally ``h`` is rounded to {0, 1}.
* BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction",
  ICLR 2021): the reconstruction target is a whole block's output (residual block, transformer block,
  attention), blocks are handled in execution order, each fed with the inputs produced by the
  already-quantized network before it, against the full-precision network's block output (MSE, as in
  Q-Diffusion's diffusion setting). Layers outside any block are reconstructed alone.

:func:`adaround_optimize` takes any loss closure, so TFMQ-DM's TIAR (reconstructing the temporal
information block's outputs) reuses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .act import ActQuantizer
from .layers import _QuantLayer, adaround_h
from .spool import Spool, map_leaves, take_rows
from .surgery import _Stop, act_quantizers
from .timesteps import set_current_timesteps


@dataclass
class ReconSettings:
    """Reconstruction hyper-parameters (paper values in brackets): iterations [20k in Q-Diffusion / BRECQ,
    100 in the PTQ4DM scripts], batch [32], Adam learning rate of V [1e-3], rounding-loss weight lambda
    [0.01], beta annealed 20 -> 2, warm-up fraction [0.2]; ``act_lr``: Adam learning rate of the
    activation quantizers' log step sizes inside the unit (0: ranges stay as calibrated); ``qdrop``: the
    probability with which each activation inside the unit skips its quantization while the rounding is
    learned (QDrop, Wei et al. ICLR 2022 [0.5]; 0: off, as in BRECQ / Q-Diffusion); ``storage``: where a
    unit's captured inputs and targets are kept (``auto`` / ``memory`` / ``disk``, :mod:`.spool`), ``spool_dir``:
    the folder the disk files go in (None: the system's temporary folder)."""

    iters: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    act_lr: float = 0.0
    qdrop: float = 0.0
    storage: str = "memory"
    spool_dir: Path | str | None = None


def rounding_regularizer(layers: list[_QuantLayer], beta: float) -> torch.Tensor:
    """AdaRound's ``sum(1 - |2 h(V) - 1|^beta)`` over every layer's rounding variables (Eq. 24)."""
    return sum((1 - (2 * adaround_h(l.round_logits) - 1).abs().pow(beta)).sum() for l in layers)


def adaround_optimize(layers: list[_QuantLayer], loss_fn: Callable[[int], torch.Tensor], cfg: ReconSettings,
                      progress: Callable[..., Any] | None = None, desc: str = "AdaRound",
                      act_quants: list[ActQuantizer] = ()) -> dict[str, float]:
    """Learn the rounding of ``layers`` (and, with ``cfg.act_lr``, the step sizes of ``act_quants``) to
    minimise ``loss_fn(it)`` (the reconstruction error on the ``it``-th minibatch) + the rounding
    regulariser; leaves every layer on hard (0/1) rounding and every step size fixed."""
    params = [l.init_adaround() for l in layers]
    if not params or cfg.iters <= 0:
        for l in layers:
            l.soft_round = False
        return {"iters": 0}
    groups = [{"params": params, "lr": cfg.lr}]
    steps = [a.learn_step_size() for a in act_quants] if cfg.act_lr > 0 else []
    if steps:
        groups.append({"params": steps, "lr": cfg.act_lr})
    opt = torch.optim.Adam(groups)
    warm = int(cfg.warmup * cfg.iters)
    it_range = range(cfg.iters)
    bar = progress(it_range, total=cfg.iters, desc=desc) if progress else it_range
    first = last = float("nan")
    with torch.enable_grad():
        for it in bar:
            rec = loss_fn(it)
            if it < warm:
                reg = torch.zeros(())
            else:
                frac = (it - warm) / max(1, cfg.iters - warm)
                beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - frac)
                reg = cfg.reg_weight * rounding_regularizer(layers, beta)
            opt.zero_grad(set_to_none=True)
            (rec + reg).backward()
            opt.step()
            if it == 0:
                first = float(rec.detach())
            last = float(rec.detach())
    for l in layers:
        l.soft_round = False
        l.round_logits = l.round_logits.detach()
    moved = max((float(u.detach().abs().max()) for u in steps), default=0.0)
    for a in act_quants:
        a.fix_step_size()
    out = {"iters": cfg.iters, "rec_loss_first": first, "rec_loss_last": last}
    if steps:
        out["act_step_max_log_change"] = round(moved, 4)
    return out


# ---------------------------------------------------------------------------------------------------
# Capturing a module's inputs / outputs inside a full forward


def _detach(value: Any) -> Any:
    # contiguous: conv backward on CPU crashes (torch 2.13) on some strided inputs (attention outputs)
    return map_leaves(lambda t: t.detach().contiguous(), value)


@torch.no_grad()
def capture(model_fn: Callable[..., Any], module: nn.Module, batches: list[tuple[torch.Tensor, ...]],
            what: str, storage: str = "memory", directory: Path | str | None = None) -> tuple[Spool, int]:
    """Run ``model_fn(*batch)`` for each batch and keep ``module``'s inputs (``what="input"``: the
    ``(args, kwargs)`` of its first call) or output (``"output"``), concatenated over the batches
    (``spool.result()``), in memory or spooled to files under ``directory`` (``storage``: see
    :mod:`.spool`); the forward stops right after the module (no wasted compute)."""
    sizes = [b[0].shape[0] for b in batches]
    spool = Spool(storage, sum(sizes), directory)
    calls = 0

    def keep(value: Any) -> None:
        nonlocal calls
        spool.add(_detach(value), sizes[calls])
        calls += 1
        raise _Stop

    if what == "input":
        handle = module.register_forward_pre_hook(lambda _m, args, kwargs: keep((args, kwargs)), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: keep(out))
    try:
        for i, b in enumerate(batches):
            try:
                model_fn(*b)
            except _Stop:
                pass
            if calls != i + 1:
                raise RuntimeError("the module was not called in every forward")
    except BaseException:
        spool.close()
        raise
    finally:
        handle.remove()
    return spool, sum(sizes)


def reconstruct_unit(q_unit: nn.Module, fp_unit: nn.Module, q_model_fn: Callable[..., Any],
                     fp_model_fn: Callable[..., Any], batches: list[tuple[torch.Tensor, ...]],
                     layers: list[_QuantLayer], cfg: ReconSettings, gen: torch.Generator,
                     progress: Callable[..., Any] | None = None, desc: str = "block") -> dict[str, Any]:
    """BRECQ for one unit: its inputs come from the quantized model so far, its target is the
    full-precision unit's output on full-precision inputs; AdaRound learns the rounding of ``layers``.
    The captured inputs and targets are kept as ``cfg.storage`` says (:mod:`.spool`; removed after), and
    each minibatch runs on the unit's device."""
    device = next(q_unit.parameters(), torch.empty(0)).device
    inputs, n = capture(q_model_fn, q_unit, batches, "input", cfg.storage, cfg.spool_dir)
    try:
        targets, _ = capture(fp_model_fn, fp_unit, batches, "output", cfg.storage, cfg.spool_dir)
    except BaseException:
        inputs.close()
        raise
    try:
        stats = _reconstruct_captured(q_unit, inputs.result(), targets.result(), n, batches, layers, cfg, gen,
                                      device, progress, desc)
    finally:
        inputs.close()
        targets.close()
    stats["storage"] = inputs.storage if inputs.storage == targets.storage else f"{inputs.storage}+{targets.storage}"
    stats["captured_mib"] = round((inputs.bytes + targets.bytes) / 2 ** 20, 2)
    return stats


def _reconstruct_captured(q_unit: nn.Module, inputs: Any, target: Any, n: int,
                          batches: list[tuple[torch.Tensor, ...]], layers: list[_QuantLayer], cfg: ReconSettings,
                          gen: torch.Generator, device: torch.device, progress: Callable[..., Any] | None,
                          desc: str) -> dict[str, Any]:
    args, kwargs = inputs
    if isinstance(target, (tuple, list)):
        target = target[0]
    t_all = torch.cat([b[1].reshape(-1).expand(b[0].shape[0]) for b in batches]).to(device)
    bs = min(cfg.batch_size, n)
    order = [torch.randint(0, n, (bs,), generator=gen) for _ in range(max(cfg.iters, 0))]

    def unit_error(idx: torch.Tensor) -> torch.Tensor:
        set_current_timesteps(t_all[idx.to(device)])
        out = q_unit(*take_rows(args, idx, n, device), **take_rows(kwargs, idx, n, device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return (out - take_rows(target, idx, n, device)).pow(2).mean()

    act_quants = act_quantizers(q_unit)
    for a in act_quants:
        a.drop_quantization(cfg.qdrop, gen)
    try:
        stats = adaround_optimize(layers, lambda it: unit_error(order[it]), cfg, progress, desc, act_quants)
    finally:
        for a in act_quants:
            a.drop_quantization(0.0)
    with torch.no_grad():  # error after hard rounding, on a fixed slice
        stats["rec_loss_hard"] = float(unit_error(torch.arange(min(n, 64))))
    return stats
