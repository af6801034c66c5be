"""Calibration sets for diffusion PTQ: inputs ``(x_t, t[, c])`` taken from the full-precision sampler.

Samplers (``sampler:`` in the ``ptq`` / ``ptq4dm`` / ``tfmq`` passes):

* ``ndtc`` — PTQ4DM's Normally Distributed Time-step Calibration (Shang et al., CVPR 2023, Sec. 4.2):
  each calibration sample draws its own ``t ~ N(mu, sigma)`` (``mu = 0.4 T``, ``sigma = 0.4 T``, the
  defaults of the authors' scripts), clipped to ``[0, T)``; ``x_t`` is the state of a full-precision DDIM
  trajectory when the model is called at that timestep (generated from noise, never forward-noised data).
* ``every_k`` — Q-Diffusion's time-step-aware calibration (Li et al., ICCV 2023, Sec. 4.1): the states of
  every k-th sampler step, the same number from each selected step.
* ``uniform`` and ``single_t`` — the PTQ4DM ablation's uniform ``t`` and one fixed ``t``.

Timestep mapping under DDIM respacing: a DDIM sampler of ``S`` steps calls the model only at ``S`` of the
``T`` training timesteps (:func:`modelpress.sampling.ddim_timesteps`). A drawn ``t`` (on the training scale)
is snapped to the nearest visited timestep, and the model input is that *training-scale* timestep together
with the trajectory state at that call. (The PTQ4DM reference code matches the drawn index against the
sampler's loop counter, which runs in the opposite direction of ``t``; we do not reproduce that.)

Every calibration sample is identified by ``(trajectory, step)``; the ids, timesteps and seed are recorded in
the manifest through ``ctx.record``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.inputs import encode_prompts
from ..errors import UserError
from ..model import ModelHandle, sample_shape
from ..passes import Context
from ..sampling import model_timesteps, sample, sampler_of, scheduler_config

SAMPLERS = ("ndtc", "every_k", "uniform", "single_t")



@dataclass
class CalibrationSet:
    """``x [N, C, H, W]``, ``t [N]`` (int64, training scale), ``cond [N, L, D]`` or None, and for each row
    its ``(trajectory, step)`` id."""

    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | None
    ids: list[tuple[int, int]]
    sampler: str
    seed: int
    steps: int

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
        """The set in order, as canonical-input tuples ``(x, t[, cond])``."""
        out = []
        for s in range(0, len(self), batch_size):
            sl = slice(s, s + batch_size)
            out.append((self.x[sl], self.t[sl]) if self.cond is None else (self.x[sl], self.t[sl], self.cond[sl]))
        return out

    def record(self) -> dict[str, Any]:
        """What goes into the manifest."""
        return {"sampler": self.sampler, "seed": self.seed, "sampling_steps": self.steps, "samples": len(self),
                "sample_ids": [list(i) for i in self.ids], "timesteps": self.t.tolist()}


def conditions(handle: ModelHandle, ctx: Context, pass_name: str, n: int) -> torch.Tensor | None:
    """Prompt embeddings ``[n, L, D]`` for ``unet-cond`` calibration: ``n`` prompts of the calibration
    dataset (the zoo model's own templated prompts when the recipe names none) drawn with the recipe seed,
    encoded by the model's prompt encoder. Random embeddings would calibrate the cross-attention on inputs it
    never sees, so there is no fallback to them."""
    if handle.kind != "unet-cond":
        return None
    data = ctx.calibration_data(pass_name, handle)
    data.require("prompt", "calibrating a unet-cond model")
    prompts = data.draw(n, ctx.seed).prompts
    return encode_prompts(handle, prompts)


def unconditional(handle: ModelHandle) -> torch.Tensor | None:
    """The empty-prompt embedding ``[1, L, D]`` for classifier-free guidance (``unet-cond`` only)."""
    if handle.kind != "unet-cond":
        return None
    return encode_prompts(handle, [""])


def _draw_timesteps(sampler: str, n: int, T: int, gen: torch.Generator, mean: float, std: float,
                    single_t: float) -> torch.Tensor:
    """Training-scale timesteps (float) for ``ndtc`` / ``uniform`` / ``single_t``."""
    if sampler == "ndtc":
        t = torch.randn(n, generator=gen, dtype=torch.float64) * (std * T) + mean * T
    elif sampler == "uniform":
        t = torch.rand(n, generator=gen, dtype=torch.float64) * T
    elif sampler == "single_t":
        t = torch.full((n,), single_t * T, dtype=torch.float64)
    else:
        raise ValueError(sampler)
    return t.clamp(0, T - 1)


def snap_to_schedule(t: torch.Tensor, visited: list[int]) -> torch.Tensor:
    """Index (sampling step) of the visited timestep nearest to each ``t`` (ties go to the smaller t)."""
    v = torch.tensor(visited, dtype=torch.float64)
    return (t.double()[:, None] - v[None, :]).abs().argmin(dim=1)


def build_calibration_set(handle: ModelHandle, ctx: Context, pass_name: str, sampler: str, n: int, steps: int,
                          ndtc_mean: float = 0.4, ndtc_std: float = 0.4, interval: int = 2,
                          single_t: float = 0.5, batch_size: int = 128, guidance_scale: float = 3.0
                          ) -> CalibrationSet:
    """Run the full-precision DDIM sampler and pick ``n`` calibration inputs with ``sampler``.

    ``ndtc`` / ``uniform`` / ``single_t`` run ``n`` trajectories and take one state from each;
    ``every_k`` takes the states at every ``interval``-th step (starting with the first, ``x_T``) from
    ``ceil(n / #steps taken)`` trajectories, then keeps ``n`` of them in a seeded order. For ``unet-cond``
    the trajectories are classifier-free guided and every other calibration row carries the empty prompt,
    since guided sampling calls the model on both. The sampler is the model's (:func:`~modelpress.sampling.sample`:
    the zoo's DDIM, or a diffusers pipeline's own scheduler with its guidance scale, ``extras``), so the
    trajectories are those the model meets when it samples (in latent space for a latent pipeline).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown calibration sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    sched, how = scheduler_config(handle), sampler_of(handle)
    T = int(sched.get("num_train_timesteps", 1000))
    visited = model_timesteps(sched, steps, how)
    gen = ctx.generator(offset=501)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    if sampler == "every_k":
        picked = list(range(0, len(visited), interval))
        n_traj = -(-n // len(picked))
    else:
        n_traj = n
        step_of = snap_to_schedule(_draw_timesteps(sampler, n, T, gen, ndtc_mean, ndtc_std, single_t), visited)
    cond = conditions(handle, ctx, pass_name, n_traj)
    uncond = unconditional(handle)
    model = handle.canonical().eval()
    guidance_scale = float(handle.extras.get("guidance_scale", guidance_scale))
    _, traj = sample(model, sched, n_traj, sampler=how, steps=steps, seed=seed, cond=cond, uncond=uncond,
                     guidance_scale=guidance_scale if uncond is not None else 1.0,
                     return_trajectory=True, progress=ctx.progress,
                     sample_shape=sample_shape(handle), batch_size=batch_size)
    if sampler == "every_k":
        ids = [(i, s) for s in picked for i in range(n_traj)]
        order = torch.randperm(len(ids), generator=gen)[:n].sort().values.tolist()
        ids = [ids[j] for j in order]
    else:
        ids = [(i, int(step_of[i])) for i in range(n)]
    x = torch.stack([traj[s][1][i] for i, s in ids])
    t = torch.tensor([visited[s] for _, s in ids], dtype=torch.int64)
    c = None if cond is None else torch.stack([cond[i] for i, _ in ids])
    if c is not None and uncond is not None:  # guided sampling also calls the model on the empty prompt
        c[1::2] = uncond[0]
    return CalibrationSet(x, t, c, ids, sampler, seed, steps)
