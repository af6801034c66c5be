"""Post-training quantization of diffusion UNets: the shared engine and the ``ptq`` pass (min-max baseline).

The engine runs the steps every diffusion PTQ method here is made of, each a small function over a
:class:`QState`:

1. :func:`prepare` — full-precision calibration set (:mod:`.calibration`), structural discovery (layer
   execution order, temporal information block, concatenated skip inputs), swap in quantized layers,
   the timestep tap and quantized attention processors;
2. :func:`init_weight_ranges` — per-channel weight ranges (min-max or a range search, :mod:`.ranges`);
3. :func:`calibrate_activations` — per-tensor activation ranges on the calibration set (per-timestep
   ranges over the whole sampling schedule for the layers listed in ``fsc``, TFMQ-DM's FSC);
4. :func:`reconstruct_blocks` — BRECQ + AdaRound block reconstruction (:mod:`.reconstruction`);
5. :func:`finish` — pack integer weights, record the log, return the handle.

``ptq`` is the plain baseline: min-max ranges for weights and activations, no reconstruction.
``ptq4dm`` (:mod:`.ptq4dm`) and ``tfmq`` (:mod:`.tfmq`) compose the same steps differently.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..devices import on_device
from ..errors import UserError
from ..model import ModelHandle, canonical_module, sample_shape
from ..passes import Context, Pass, PassConfig, register_pass
from ..sampling import model_timesteps, sampler_of, scheduler_config
from . import surgery
from .calibration import CalibrationSet, build_calibration_set
from .layers import PTE_REFUSAL, _QuantLayer
from .reconstruction import ReconSettings, reconstruct_unit
from .surgery import run_with_hooks
from .timesteps import set_current_timesteps


#: calibration samples when neither the pass nor the recipe says
DEFAULT_SAMPLES = 64


class DiffusionPTQConfig(PassConfig):
    """Options shared by ``ptq``, ``ptq4dm`` and ``tfmq``."""

    w_bits: int = Field(8, ge=2, le=8, description="weight bits (per output channel)")
    a_bits: int = Field(8, ge=0, le=8, description="activation bits (per tensor); 0 = weight-only")
    w_symmetric: bool = False
    a_symmetric: bool = False
    metric: Literal["lp", "mse", "cosine", "kl", "minmax"] = "lp"
    p: float = Field(2.4, gt=0, le=10, description="exponent of the Lp range-search error")
    sampler: Literal["ndtc", "every_k", "uniform", "single_t"] = "every_k"
    samples: int | None = Field(None, ge=8, le=100_000,
                                description=f"calibration samples (default: recipe calibration.samples, else {DEFAULT_SAMPLES})")
    steps: int = Field(25, ge=2, le=1000, description="DDIM steps of the sampler being calibrated for (the fd metric samples with 25)")
    ndtc_mean: float = Field(0.4, ge=0, le=1, description="NDTC mean of t, fraction of T")
    ndtc_std: float = Field(0.4, gt=0, le=2, description="NDTC std of t, fraction of T")
    interval: int = Field(2, ge=1, le=1000, description="every_k: take every k-th sampler step")
    single_t: float = Field(0.5, ge=0, le=1, description="single_t: the timestep, fraction of T")
    quant_attention: bool = True
    split_skip: bool = True
    first_last_8bit: bool = True
    recon_iters: int = Field(0, ge=0, le=100_000, description="AdaRound iterations per block (0 = none)")
    recon_batch: int = Field(32, ge=1, le=4096)
    recon_lr: float = Field(1e-3, gt=0, le=1)
    recon_reg: float = Field(0.01, ge=0, le=10)
    recon_act_lr: float = Field(0.0, ge=0, le=1, description="Adam learning rate of the activation log step sizes "
                                "learned during block reconstruction (LSQ; 0 = keep the calibrated ranges)")
    recon_qdrop: float = Field(0.0, ge=0, lt=1, description="QDrop: probability that an activation inside the "
                               "block skips its quantization during reconstruction (0 = off; the QDrop paper uses 0.5)")
    recon_storage: Literal["auto", "memory", "disk"] = Field(
        "auto", description="where a block's captured inputs and full-precision outputs are kept during "
        "reconstruction: memory, or spooled to disk in the run's scratch folder and read back by minibatch "
        "(same results); auto: memory when they fit a quarter of the available memory")
    batch_size: int = Field(64, ge=1, le=4096, description="calibration forward batch")

    @model_validator(mode="after")
    def _check_bits(self) -> "DiffusionPTQConfig":
        if self.a_bits == 1:
            raise ValueError("a_bits must be 0 (weight-only) or 2..8")
        return self


@dataclass
class QState:
    """Everything the steps share."""

    handle: ModelHandle
    cfg: DiffusionPTQConfig
    fp: nn.Module
    q: nn.Module
    calib: CalibrationSet
    order: list[str]
    tib: list[str]
    splits: dict[str, int]
    layers: dict[str, _QuantLayer] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def q_fn(self) -> Callable[..., torch.Tensor]:
        return canonical_module(self.q, self.handle.kind)

    def fp_fn(self) -> Callable[..., torch.Tensor]:
        return canonical_module(self.fp, self.handle.kind)

    def batches(self) -> list[tuple[torch.Tensor, ...]]:
        return self.calib.batches(self.cfg.batch_size)

    def visited_timesteps(self) -> list[int]:
        return model_timesteps(scheduler_config(self.handle), self.cfg.steps, sampler_of(self.handle))

    def tib_batch(self) -> tuple[torch.Tensor, ...]:
        """One input row per visited timestep, with a zero sample: the TIB depends on t only."""
        ts = torch.tensor(sorted(set(self.visited_timesteps())), dtype=torch.int64)
        x = torch.zeros(len(ts), *sample_shape(self.handle))
        if self.calib.cond is None:
            return x, ts
        return x, ts, self.calib.cond[:1].expand(len(ts), *self.calib.cond.shape[1:]).clone()


def _probe_pair(calib: CalibrationSet, which: int) -> tuple[torch.Tensor, ...]:
    """Two probe inputs with the same timesteps; ``which=1`` perturbs the samples (and the prompts) with
    seeded noise, so that only what depends on t alone is unchanged between the two."""
    n = min(4, len(calib))
    x, t = calib.x[:n].clone(), calib.t[:n]
    c = None if calib.cond is None else calib.cond[:n].clone()
    if which:
        g = torch.Generator().manual_seed(1234)
        x = x + 0.5 * torch.randn(x.shape, generator=g)
        if c is not None:
            c = c + 0.5 * torch.randn(c.shape, generator=g)
    return (x, t) if c is None else (x, t, c)


def raw_input_readers(model: nn.Module, run: Callable[[], Any], parents: list[str]) -> dict[str, list[str]]:
    """For each parent module, the quantizable layers inside it that read the parent's own input unchanged
    (e.g. a residual block's shortcut convolution reads the raw concatenated skip input)."""
    named = dict(model.named_modules())
    parent_in: dict[str, torch.Tensor] = {}
    layer_in: dict[str, torch.Tensor] = {}
    handles = []
    for p in parents:
        def pre(_m: nn.Module, args: tuple, kwargs: dict, p: str = p) -> None:
            parent_in.setdefault(p, (args[0] if args else next(iter(kwargs.values()))).detach())
        handles.append(named[p].register_forward_pre_hook(pre, with_kwargs=True))
        for n, m in named[p].named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                def lpre(_m: nn.Module, inp: tuple, n: str = f"{p}.{n}") -> None:
                    layer_in.setdefault(n, inp[0].detach())
                handles.append(m.register_forward_pre_hook(lpre))
    run_with_hooks(run, handles)
    out: dict[str, list[str]] = {}
    for p in parents:
        x = parent_in.get(p)
        out[p] = [n for n, v in layer_in.items() if n.startswith(p + ".") and x is not None
                  and v.shape == x.shape and torch.equal(v, x)]
    return out


def prepare(handle: ModelHandle, ctx: Context, cfg: DiffusionPTQConfig, pass_name: str, fsc: bool = False) -> QState:
    """Step 1: calibration set, discovery and module swaps (see the module docstring)."""
    if handle.kind not in ("unet", "unet-cond"):
        raise UserError(f"diffusion PTQ needs a unet or unet-cond model, got kind {handle.kind!r}")
    t0 = time.perf_counter()
    n = cfg.samples or ctx.calibration.samples or DEFAULT_SAMPLES
    with on_device(ctx.device, handle.module):  # the full-precision trajectories
        calib = build_calibration_set(handle, ctx, pass_name, cfg.sampler, n, cfg.steps, cfg.ndtc_mean, cfg.ndtc_std,
                                      cfg.interval, cfg.single_t, batch_size=max(cfg.batch_size, 128))
    t_calib = time.perf_counter() - t0
    fp = ctx.original(handle).module.eval()  # reconstruction targets; the model itself is quantized in place
    q = handle.module.eval()
    q_fn = canonical_module(q, handle.kind)
    probe = _probe_pair(calib, 0)
    floats = surgery.quantizable_layers(q)
    order = surgery.execution_order(q, lambda: q_fn(*probe), floats)
    tib = surgery.temporal_layers(q, lambda w: q_fn(*_probe_pair(calib, w)), floats)
    splits = surgery.skip_concat_splits(q, lambda: q_fn(*probe)) if cfg.split_skip else {}
    readers = raw_input_readers(q, lambda: q_fn(*probe), list(splits))
    split_of = {layer: splits[p] for p, layers in readers.items() for layer in layers}
    image_layers = [nm for nm in order if nm not in tib]
    edge = {image_layers[0], image_layers[-1]} if cfg.first_last_8bit and image_layers else set()
    # FSC: one range per distinct timestep the sampler visits (a pipeline's PNDM visits one twice)
    n_t = len(set(model_timesteps(scheduler_config(handle), cfg.steps, sampler_of(handle)))) if fsc else 0

    def quant_for(name: str, _mod: nn.Module) -> dict[str, Any]:
        a_bits = cfg.a_bits if cfg.a_bits == 0 or name not in edge else 8
        return {"w_bits": 8 if name in edge else cfg.w_bits, "w_symmetric": cfg.w_symmetric,
                "act_bits": a_bits, "act_symmetric": cfg.a_symmetric, "act_split": split_of.get(name, 0),
                "act_timesteps": n_t if name in tib and a_bits else 0}

    layers = surgery.swap_in_quant_layers(q, order, quant_for)
    surgery.install_timestep_tap(q)
    attn = surgery.install_attention_quant(q, cfg.a_bits, cfg.a_symmetric) if cfg.quant_attention and cfg.a_bits else []
    for aq in surgery.act_quantizers(q):
        aq.enabled = False
    st = QState(handle, cfg, fp, q, calib, order, tib, splits, layers, seed=ctx.seed)
    st.t0 = t0
    st.log.update({"calibration": calib.record(), "calibration_seconds": round(t_calib, 2),
                   "quantized_layers": len(layers), "temporal_information_block": tib,
                   "skip_splits": split_of, "eight_bit_layers": sorted(edge), "quantized_attention": attn})
    return st


@contextmanager
def on_run_device(st: QState, ctx: Context) -> Iterator[None]:
    """Run the block with the quantized model and the full-precision one on the run's device (``device:``;
    a no-op on the CPU), both back on the CPU after. Calibration batches stay on the CPU: the canonical call
    moves them, and reconstruction moves each minibatch to the unit's device."""
    with on_device(ctx.device, st.q, st.fp):
        yield


def init_weight_ranges(st: QState, metric: str | None = None) -> None:
    """Step 2: per-output-channel weight ranges."""
    for layer in st.layers.values():
        layer.init_weight_qparams(metric or st.cfg.metric, st.cfg.p)


@torch.no_grad()
def calibrate_activations(st: QState, metric: str | None = None) -> None:
    """Step 3: observe every activation quantizer's input on the calibration set (quantized weights,
    full-precision activations), then fit its range; per-timestep quantizers observe one row per visited
    timestep of the sampling schedule instead (the TIB does not depend on the sample)."""
    quants = surgery.act_quantizers(st.q)
    per_t = [a for a in quants if a.n_timesteps]
    plain = [a for a in quants if not a.n_timesteps]
    for a in quants:
        a.enabled = False
        a.seed_subsample(st.seed)
    q_fn = st.q_fn()
    for a in plain:
        a.observing = True
    for b in st.batches():
        q_fn(*b)
    for a in plain:
        a.observing = False
    if per_t:
        for a in per_t:
            a.observing = True
        q_fn(*st.tib_batch())
        for a in per_t:
            a.observing = False
    for a in quants:
        a.observing = True  # fit() clears the flag
        a.fit(metric or st.cfg.metric, st.cfg.p)
        a.enabled = True


def reconstruct_blocks(st: QState, ctx: Context, exclude: set[str] | None = None) -> None:
    """Step 4: BRECQ block reconstruction with AdaRound, units in execution order (skipped when
    ``recon_iters`` is 0). Layers in ``exclude`` keep their rounding (e.g. the TIB after TIAR)."""
    cfg = st.cfg
    if cfg.recon_iters <= 0:
        return
    settings = ReconSettings(iters=cfg.recon_iters, batch_size=cfg.recon_batch, lr=cfg.recon_lr,
                             reg_weight=cfg.recon_reg, act_lr=cfg.recon_act_lr, qdrop=cfg.recon_qdrop,
                             storage=cfg.recon_storage, spool_dir=ctx.scratch)
    exclude = exclude or set()
    units = surgery.reconstruction_units(st.q)
    unit_mods = [(n, m) for n, m in units]
    order = surgery.execution_order(st.q, lambda: st.q_fn()(*st.batches()[0]), unit_mods)
    by_name = dict(units)
    names_of = {id(m): n for n, m in st.q.named_modules()}
    gen = ctx.generator(offset=777)
    stats: dict[str, Any] = {}
    for name in ctx.progress(order, desc="block reconstruction"):
        unit = by_name[name]
        layers = [l for l in surgery.layers_in(unit) if names_of[id(l)] not in exclude]
        if not layers:
            continue
        fp_unit = st.fp.get_submodule(name) if name else st.fp
        stats[name] = reconstruct_unit(unit, fp_unit, st.q_fn(), st.fp_fn(), st.batches(), layers, settings, gen)
    set_current_timesteps(None)
    st.log["reconstruction"] = {"iters_per_unit": cfg.recon_iters, "units": stats}


def finish(st: QState, ctx: Context, pass_name: str) -> ModelHandle:
    """Step 5: pack the integer weights, record the log, return the quantized model."""
    surgery.freeze_all(st.q)
    set_current_timesteps(None)
    st.log["quantization_seconds"] = round(time.perf_counter() - st.t0, 2)
    st.log["settings"] = st.cfg.model_dump()
    ctx.record(pass_name, **st.log)
    out = st.handle.replace_module(st.q.eval())
    out.extras["quantization"] = pass_name
    return out


#: the diffusion PTQ passes' models do not go to ExecuTorch (the reason is the exporter's)
NO_PTE = {"pte": PTE_REFUSAL}


@register_pass
class MinMaxPTQ(Pass):
    """``ptq``: the plain baseline — per-channel min-max weights, per-tensor min-max activations (same
    quantized layers, split skip inputs and attention matmuls as the other methods), no range search,
    no reconstruction."""

    name = "ptq"
    kinds = ("unet", "unet-cond")
    refuses_export = NO_PTE

    class Config(DiffusionPTQConfig):
        metric: Literal["lp", "mse", "cosine", "kl", "minmax"] = "minmax"

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        st = prepare(model, ctx, self.config, self.name)
        with on_run_device(st, ctx):
            init_weight_ranges(st)
            calibrate_activations(st)
            reconstruct_blocks(st, ctx)
        return finish(st, ctx, self.name)

