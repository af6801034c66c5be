"""DDIM sampling for the diffusion kinds (``unet``, ``unet-cond``), written once for metrics, calibration and
reports.

DDIM (Song, Meng & Ermon, 2021, "Denoising Diffusion Implicit Models", eq. 12) with classifier-free guidance
(Ho & Salimans, 2022, "Classifier-Free Diffusion Guidance", eq. 6). The model is a *canonical callable*
(``model(sample, timestep)`` or ``model(sample, timestep, encoder_hidden_states)`` -> predicted noise, see
:mod:`modelpress.model`), so a torch module, an ONNX-runtime wrapper or a quantized model all sample the same
way: it is called with plain float32 tensors and ``timestep`` as an int64 tensor ``[B]``.

Timestep mapping (exact; the same as diffusers' ``DDIMScheduler`` with ``timestep_spacing="leading"``,
``steps_offset=0``, ``set_alpha_to_one=True``): with ``T`` training steps and ``S`` sampling steps, the model is
called at ``t_i = i * (T // S)`` for ``i = S-1, ..., 0`` (``S=50``: 980, 960, ..., 20, 0; ``S=25``: 960, 920,
..., 0). The step from ``t_i`` goes to ``t_{i-1}``; the last step (``t_0 = 0``) goes to ``alpha_bar = 1``, the
clean image. ``x_T`` is standard normal noise and is fed to the model at ``t_{S-1}``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

#: diffusers' default DDPM schedule, used when a model carries none
DEFAULT_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear",
                                     "beta_start": 1e-4, "beta_end": 0.02, "clip_sample": True}


#: ``handle.extras["sampler"]`` values: the zoo's DDIM on the model's betas (the default), or the scheduler
#: class named by the scheduler config's ``_class_name`` (a diffusers pipeline's own, see
#: :mod:`modelpress.diffusers_pipeline`)
SAMPLERS = ("ddim", "pipeline")


def scheduler_config(handle: Any) -> dict[str, Any]:
    """The DDPM schedule of a model handle (``handle.extras["scheduler"]``; :data:`DEFAULT_SCHEDULER` if the
    model carries none)."""
    return dict(handle.extras.get("scheduler") or DEFAULT_SCHEDULER)


def sampler_of(handle: Any) -> str:
    """How the handle's model samples: ``"ddim"`` (this module's DDIM) or ``"pipeline"`` (its scheduler class)."""
    return str(handle.extras.get("sampler", "ddim"))


def make_scheduler(scheduler_config: dict[str, Any]) -> Any:
    """The diffusers scheduler of a config with a ``_class_name`` (a pipeline's scheduler)."""
    import diffusers

    cls = getattr(diffusers, str(scheduler_config["_class_name"]))
    return cls.from_config({k: v for k, v in scheduler_config.items() if k != "_class_name"})


def model_timesteps(scheduler_config: dict[str, Any], steps: int, sampler: str = "ddim") -> list[int]:
    """The training-scale timesteps the model is called at, in sampling order, one per model call (a
    pipeline's PNDM repeats one)."""
    if sampler == "ddim":
        return ddim_timesteps(scheduler_config, steps)
    return [int(t) for t in _scheduled(scheduler_config, steps).timesteps]


def _scheduled(scheduler_config: dict[str, Any], steps: int) -> Any:
    """The config's scheduler set to ``steps`` steps; a one-line error when it would call the model at
    fractional timesteps (the canonical call takes int64 timesteps; an Euler scheduler with ``linspace``
    spacing does)."""
    from .errors import UserError

    sched = make_scheduler(scheduler_config)
    try:
        sched.set_timesteps(steps)
    except Exception as exc:  # diffusers' own limits (PNDM's Runge-Kutta warm-up needs more steps than 3)
        raise UserError(f"{scheduler_config['_class_name']} cannot sample in {steps} steps "
                        f"({str(exc).splitlines()[0]})") from None
    t = sched.timesteps
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise UserError(f"{scheduler_config['_class_name']} calls the UNet at fractional timesteps with {steps} "
                        "steps; choose an integer-timestep scheduler or spacing (model.scheduler)")
    return sched


def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """``alpha_bar_t`` (float64, ``[T]``) of a DDPM scheduler config (``linear`` or ``scaled_linear`` betas)."""
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    b0, b1 = float(scheduler_config.get("beta_start", 1e-4)), float(scheduler_config.get("beta_end", 0.02))
    schedule = scheduler_config.get("beta_schedule", "linear")
    if schedule == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r}")
    return torch.cumprod(1.0 - betas, 0)


def ddim_timesteps(scheduler_config: dict[str, Any], steps: int) -> list[int]:
    """The timesteps the model is called at, in sampling order (see the module docstring)."""
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    ratio = T // steps
    return [i * ratio for i in range(steps - 1, -1, -1)]


def _predict_eps(model: Callable[..., torch.Tensor], x: torch.Tensor, t: int, cond: torch.Tensor | None,
                 uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """eps_theta(x_t, t[, c]); with ``cond`` and guidance, ``eps_u + w (eps_c - eps_u)`` from one batched call."""
    b = x.shape[0]
    if cond is None:
        return model(x, torch.full((b,), t, dtype=torch.int64))
    if uncond is None or guidance_scale == 1.0:
        return model(x, torch.full((b,), t, dtype=torch.int64), cond)
    u = uncond.expand(b, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
    both = model(torch.cat([x, x]), torch.full((2 * b,), t, dtype=torch.int64), torch.cat([u, cond]))
    eps_u, eps_c = both[:b], both[b:]
    return eps_u + guidance_scale * (eps_c - eps_u)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, eta: float,
              noise: torch.Tensor | None, clip: float | None) -> torch.Tensor:
    """One DDIM update ``x_t -> x_{t_prev}`` (Song et al., 2021, eq. 12; sigma from eq. 16 scaled by ``eta``)."""
    x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)) ** 0.5 * (1.0 - a_t / a_prev) ** 0.5
    x_prev = a_prev ** 0.5 * x0 + max(1.0 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def ddim_sample(model: Callable[..., torch.Tensor], scheduler_config: dict[str, Any], n: int, steps: int = 50,
                seed: int = 0, cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                guidance_scale: float = 2.0, eta: float = 0.0, return_trajectory: bool = False,
                progress: bool | Callable[..., Iterable] = False, sample_shape: tuple[int, ...] = (1, 16, 16),
                batch_size: int = 250):
    """Draw ``n`` samples with DDIM in ``steps`` steps.

    Args:
        model: canonical callable ``(sample, timestep[, encoder_hidden_states]) -> eps``.
        scheduler_config: the DDPM schedule the model was trained on (``handle.extras["scheduler"]``).
        cond: ``[n, L, D]`` prompt embeddings for a ``unet-cond`` model (None for ``unet``).
        uncond: ``[1 or n, L, D]`` embeddings of the empty prompt; with ``cond`` and ``guidance_scale != 1``
            the noise prediction is guided, ``eps_u + w (eps_c - eps_u)``, in one batched call of ``2B``.
        eta: 0 gives deterministic DDIM; 1 gives DDPM-like ancestral noise.
        return_trajectory: also return ``[(t, x_t), ...]``: every timestep the model was called at and the
            exact (unguided, float32) sample it was called with, in sampling order (``x_T`` first).
        progress: ``True`` for a tqdm bar, or a callable like :meth:`modelpress.passes.Context.progress`.
        sample_shape: ``(C, H, W)`` of one sample.
        batch_size: samples per model call (``2 * batch_size`` rows under guidance).

    Returns:
        samples ``[n, C, H, W]`` (float32, model range [-1, 1]), or ``(samples, trajectory)``.
    The same ``seed`` gives the same samples whatever ``batch_size`` is.
    """
    if cond is not None and cond.shape[0] != n:
        raise ValueError(f"cond has {cond.shape[0]} rows for {n} samples")
    ab = alphas_cumprod(scheduler_config)
    ts = ddim_timesteps(scheduler_config, steps)
    clip = float(scheduler_config.get("clip_sample_range", 1.0)) if scheduler_config.get("clip_sample", False) else None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *sample_shape), generator=g)
    trajectory: list[tuple[int, torch.Tensor]] = []
    it: Iterable[int] = range(len(ts))
    if progress is True:
        from . import console

        it = console.progress(it, total=len(ts), desc="DDIM", nested=True)
    elif callable(progress):
        it = progress(it, total=len(ts), desc="DDIM")
    for i in it:
        t = ts[i]
        a_t = float(ab[t])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        if return_trajectory:
            trajectory.append((t, x.clone()))
        noise = torch.randn(x.shape, generator=g) if eta > 0 else None
        out = torch.empty_like(x)
        for s in range(0, n, batch_size):
            sl = slice(s, min(n, s + batch_size))
            c = cond[sl] if cond is not None else None
            u = uncond if uncond is None or uncond.shape[0] == 1 else uncond[sl]
            eps = _predict_eps(model, x[sl], t, c, u, guidance_scale).float()
            out[sl] = ddim_step(x[sl], eps, a_t, a_prev, eta, noise[sl] if noise is not None else None, clip)
        x = out
    return (x, trajectory) if return_trajectory else x


def _accepts_generator(scheduler: Any) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


@torch.no_grad()
def scheduler_sample(model: Callable[..., torch.Tensor], scheduler_config: dict[str, Any], n: int, steps: int = 50,
                     seed: int = 0, cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                     guidance_scale: float = 7.5, return_trajectory: bool = False,
                     progress: bool | Callable[..., Iterable] = False, sample_shape: tuple[int, ...] = (4, 64, 64),
                     batch_size: int = 250):
    """Draw ``n`` samples with the diffusers scheduler of ``scheduler_config`` (its ``_class_name``), the loop
    of diffusers' text-to-image pipelines: ``x_T ~ N(0, I) * init_noise_sigma``, then for each of the
    scheduler's timesteps ``eps = model(scale_model_input(x, t), t[, c])`` (guided as in :func:`ddim_sample`)
    and ``x = step(eps, t, x)``. Arguments and return value as :func:`ddim_sample`; the trajectory holds the
    scaled inputs the model was called with. ``x_T`` is drawn for all ``n`` at once from ``seed``, so a
    deterministic scheduler gives the same samples whatever ``batch_size`` is; each batch gets its own
    scheduler (multistep schedulers keep state) and, for stochastic ones, its own seeded noise."""
    if cond is not None and cond.shape[0] != n:
        raise ValueError(f"cond has {cond.shape[0]} rows for {n} samples")
    x_T = torch.randn((n, *sample_shape), generator=torch.Generator().manual_seed(seed))
    out, chunks = [], []
    for s in range(0, n, batch_size):
        sl = slice(s, min(n, s + batch_size))
        sched = _scheduled(scheduler_config, steps)
        noise = {"generator": torch.Generator().manual_seed(seed + 1 + s)} if _accepts_generator(sched) else {}
        x = x_T[sl] * sched.init_noise_sigma
        c = cond[sl] if cond is not None else None
        u = uncond if uncond is None or uncond.shape[0] == 1 else uncond[sl]
        it: Iterable[Any] = sched.timesteps
        if progress is True:
            from . import console

            it = console.progress(it, total=len(sched.timesteps), desc="sampling", nested=True)
        elif callable(progress):
            it = progress(it, total=len(sched.timesteps), desc="sampling")
        states = []
        for t in it:
            inp = sched.scale_model_input(x, t)
            if return_trajectory:
                states.append((int(t), inp.float().clone()))
            eps = _predict_eps(model, inp, int(t), c, u, guidance_scale).float()
            x = sched.step(eps, t, x, **noise).prev_sample
        out.append(x.float())
        chunks.append(states)
    x = torch.cat(out)
    if not return_trajectory:
        return x
    trajectory = [(chunks[0][i][0], torch.cat([c[i][1] for c in chunks])) for i in range(len(chunks[0]))]
    return x, trajectory


def sample(model: Callable[..., torch.Tensor], scheduler_config: dict[str, Any], n: int, *, sampler: str = "ddim",
           **kwargs: Any):
    """:func:`ddim_sample` or, for ``sampler="pipeline"``, :func:`scheduler_sample` (``eta`` is DDIM's alone)."""
    if sampler == "ddim":
        return ddim_sample(model, scheduler_config, n, **kwargs)
    if sampler != "pipeline":
        raise ValueError(f"unknown sampler {sampler!r}; one of {SAMPLERS}")
    if float(kwargs.pop("eta", 0.0)) != 0.0:
        raise ValueError("eta is an option of the DDIM sampler; a pipeline samples with its own scheduler")
    return scheduler_sample(model, scheduler_config, n, **kwargs)


def to_unit_range(samples: torch.Tensor) -> torch.Tensor:
    """Model-range samples [-1, 1] to images in [0, 1] (for sample grids)."""
    return ((samples.float() + 1.0) / 2.0).clamp(0.0, 1.0)
