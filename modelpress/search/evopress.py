"""EvoPress: evolutionary search for per-layer compression levels under an exact global budget.

Sieberling, Kuznedelev, Kurtic, Alistarh, 2024, "EvoPress: Towards Optimal Dynamic Model Compression via
Evolutionary Search" (Algorithm 1 and Sec. 3-4). Each searched unit (a linear layer, or a whole block for
dropping) takes one level from a precomputed database (:mod:`modelpress.search.levels`). The search is a
(1 + lambda) evolutionary algorithm:

* **Mutation by level switches** (Sec. 3.2): an offspring is the parent with ``min(U{1,3}, U{1,3})`` switches;
  a switch raises one unit's level by one step and lowers another's by one step *within a group of units of
  equal size* (EvoPress' default ``--group_rule size``), so with evenly spaced levels the budget stays exact.
  ``grouping="none"`` (for models whose layers all differ in size, e.g. UNets) raises random units and then
  lowers random units until the budget holds again (the reference's ungrouped mutation; budget <= target).
* **Multi-step selection** (Sec. 3.3): the offspring are ranked on a small *fresh* random calibration batch,
  the best ``survivors[0]`` are re-ranked on a larger fresh batch, and so on; the parent joins before the
  last stage (elitism), whose single survivor is the next parent.
* **Fitness**: divergence of the compressed model's outputs from the dense model's on the same inputs.
  Classifiers: KL(p_dense || p_compressed) of the class distributions (the paper uses the token-level KL of a
  language model's next-token distribution; a classifier's class distribution is the analogue). Encoders:
  mean squared error of the last hidden state relative to its mean square. UNets: mean squared error between
  the compressed and the dense noise prediction at sampled timesteps (``x_t`` made by forward noising real
  training images).

Deterministic given the context seed; the dataset ids of the calibration pool and the pool indices drawn at
every selection stage are recorded in the manifest.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import UserError
from ..model import ModelHandle, example_inputs
from ..passes import Context, Pass, PassConfig, register_pass
from .levels import LevelDatabase, LevelSpec, LevelSwitcher, build_database, search_units, weights_fingerprint

# ---------------------------------------------------------------------------------------------------
# Calibration pool and fitness


@dataclass
class CalibrationPool:
    """Calibration inputs (stacked over samples) and the dense model's outputs on them.

    ``ids`` are the dataset indices of the samples (recorded in the manifest); ``source`` names the data.
    """

    inputs: tuple[torch.Tensor, ...]
    ids: list[int]
    source: str
    distance: Literal["kl", "mse", "rel_mse"]
    targets: torch.Tensor | None = None
    batch_size: int = 32

    def __len__(self) -> int:
        return len(self.ids)

    #: text inputs whose output does not depend on the padded length (class logits): cut each batch's
    #: padding columns beyond its longest sequence (exactly the same outputs, less compute)
    trim_padding: bool = False

    def batches(self, idx: list[int] | np.ndarray) -> list[tuple[torch.Tensor, ...]]:
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        out = []
        for s in range(0, len(idx_t), self.batch_size):
            b = tuple(x[idx_t[s:s + self.batch_size]] for x in self.inputs)
            if self.trim_padding:
                n = int(b[1].sum(1).max())
                b = (b[0][:, :n], b[1][:, :n]) + b[2:]
            out.append(b)
        return out

    @torch.no_grad()
    def outputs(self, model: nn.Module, idx: list[int] | np.ndarray) -> torch.Tensor:
        return torch.cat([model(*b).float() for b in self.batches(idx)])

    @torch.no_grad()
    def set_targets(self, model: nn.Module) -> None:
        self.targets = self.outputs(model, np.arange(len(self)))

    def length_sorted(self, idx: list[int] | np.ndarray) -> np.ndarray:
        """``idx`` ordered by sequence length when padding is trimmed (batches of similar lengths)."""
        idx = np.asarray(idx, dtype=np.int64)
        if not self.trim_padding:
            return idx
        lengths = self.inputs[1][torch.as_tensor(idx)].sum(1).numpy()
        return idx[np.argsort(lengths, kind="stable")]

    @torch.no_grad()
    def fitness(self, model: nn.Module, idx: list[int] | np.ndarray) -> float:
        """Mean per-sample divergence from the dense outputs on pool samples ``idx`` (lower is better)."""
        idx = self.length_sorted(idx)
        out = self.outputs(model, idx)
        return float(sample_divergence(out, self.targets[torch.as_tensor(np.asarray(idx, dtype=np.int64))],
                                       self.distance).mean())


def sample_divergence(out: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-sample divergence of ``out`` from ``target`` (first dim = samples).

    ``kl``: KL(softmax(target) || softmax(out)) over the last dim, summed over any middle dims;
    ``mse``: mean squared difference; ``rel_mse``: mse divided by the target's mean square.
    """
    out, target = out.double(), target.double()  # KLs near 0 need the precision
    if distance == "kl":
        lp_t = F.log_softmax(target, dim=-1)
        lp_o = F.log_softmax(out, dim=-1)
        kl = (lp_t.exp() * (lp_t - lp_o)).sum(-1)
        return kl.reshape(kl.shape[0], -1).sum(1)
    d = (out - target).pow(2).reshape(out.shape[0], -1).mean(1)
    if distance == "rel_mse":
        d = d / target.pow(2).reshape(target.shape[0], -1).mean(1).clamp_min(1e-12)
    return d


def _text_inputs(handle: ModelHandle, n: int, seed: int, max_length: int, split: str) -> tuple[tuple[torch.Tensor, ...], list[int], str]:
    """Docs-task texts for MiniLM-vocabulary models, random tokens for stand-ins with their own vocabulary."""
    vocab = int(handle.architecture["config"].get("vocab_size", 0))
    if vocab == 30522:
        from ..zoo.text import docs_tensors

        ids, mask, _ = docs_tensors(split, None, max_length)
        pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n]
        return (ids[pick], mask[pick]), pick.tolist(), f"pydocs-10/{split}"
    x = example_inputs(handle, batch=n, seq_len=min(max_length, 32), seed=seed)
    return x, list(range(n)), f"random-tokens(seed={seed})"


def _unet_inputs(handle: ModelHandle, n: int, seed: int) -> tuple[tuple[torch.Tensor, ...], list[int], str]:
    """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` of real training digits at uniform random timesteps."""
    g = torch.Generator().manual_seed(seed)
    cfg = handle.architecture["config"]
    size = cfg.get("sample_size", 16)
    if handle.extras.get("zoo", "").startswith("digits") or (cfg.get("in_channels") == 1 and size == 16):
        from ..zoo.digits import _alphas_cumprod, digits_data

        x0, _ = digits_data("train")
        pick = torch.randperm(len(x0), generator=g)[:n]
        x0, source = x0[pick], "digits/train"
        ab = _alphas_cumprod()
    else:
        x0 = example_inputs(handle, batch=n, seed=seed)[0]
        pick, source = torch.arange(n), f"gaussian(seed={seed})"
        ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    t = torch.randint(0, len(ab), (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = ab[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    inputs: tuple[torch.Tensor, ...] = (xt, t)
    if handle.kind == "unet-cond":
        cond = example_inputs(handle, batch=len(x0), seed=seed)[2]
        inputs = inputs + (cond,)
    return inputs, pick.tolist(), f"{source}, t~U[0,{len(ab)})"


def calibration_pool(handle: ModelHandle, n: int, seed: int, batch_size: int = 32, max_length: int = 64,
                     split: str = "train") -> CalibrationPool:
    """``n`` calibration samples of the handle's kind with the matching divergence (targets not yet set)."""
    if handle.kind in ("classifier", "encoder"):
        inputs, ids, src = _text_inputs(handle, n, seed, max_length, split)
        dist = "kl" if handle.kind == "classifier" else "rel_mse"
    else:
        inputs, ids, src = _unet_inputs(handle, n, seed)
        dist = "mse"
    return CalibrationPool(inputs, ids, src, dist, batch_size=batch_size, trim_padding=handle.kind == "classifier")


# ---------------------------------------------------------------------------------------------------
# The search space


@dataclass
class SearchSpace:
    """Units, their budget weights and the levels; a level map is one level index per unit."""

    spec: LevelSpec
    units: list[str]
    weights: list[int]
    target: float  # sum of weight * size the map may use
    grouping: Literal["size", "none"] = "size"
    groups: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        by_weight: dict[int, list[int]] = {}
        for i, w in enumerate(self.weights):
            by_weight.setdefault(w, []).append(i)
        self.groups = [g for g in by_weight.values() if len(g) > 1] if self.grouping == "size" else \
            [list(range(len(self.units)))]

    @property
    def n_levels(self) -> int:
        return len(self.spec.values)

    def cost(self, levels: list[int]) -> float:
        sizes = self.spec.sizes
        return float(sum(w * sizes[lv] for w, lv in zip(self.weights, levels)))

    def fits(self, levels: list[int]) -> bool:
        return self.cost(levels) <= self.target * (1 + 1e-9) + 1e-9

    def average(self, levels: list[int]) -> float:
        """The budget measure the user gave: average sparsity / bits, or number of dropped blocks."""
        if self.spec.family == "drop":
            return float(sum(self.spec.values[lv] for lv in levels))
        vals = self.spec.values
        return float(sum(w * vals[lv] for w, lv in zip(self.weights, levels)) / sum(self.weights))

    def level_map(self, levels: list[int]) -> dict[str, float]:
        return {u: self.spec.values[lv] for u, lv in zip(self.units, levels)}

    def from_level_map(self, level_map: dict[str, float]) -> list[int]:
        missing = [u for u in self.units if u not in level_map]
        if missing:
            raise UserError(f"the level map has no level for {len(missing)} units (e.g. {missing[0]})", "level_map")
        return [self.spec.index_of(level_map[u]) for u in self.units]

    # -- mutation -------------------------------------------------------------------------------------

    def _switch(self, child: list[int], rng: np.random.Generator) -> bool:
        """One level switch inside a group chosen with probability proportional to its size."""
        sizes = np.array([len(g) for g in self.groups], dtype=float)
        group = self.groups[rng.choice(len(self.groups), p=sizes / sizes.sum())]
        down = [i for i in group if child[i] > 0]
        if not down:
            return False
        i = down[rng.integers(len(down))]
        up = [j for j in group if j != i and child[j] < self.n_levels - 1]
        if not up:
            return False
        j = up[rng.integers(len(up))]
        child[i] -= 1
        child[j] += 1
        return True

    def _ungrouped(self, child: list[int], n: int, rng: np.random.Generator) -> bool:
        """Raise ``n`` random units one level, then lower random units until the budget holds
        (EvoPress' mutation across layers of different sizes). Rejects mutations of more than 10 changes."""
        changes = 0
        for _ in range(n):
            up = [j for j in range(len(child)) if child[j] < self.n_levels - 1]
            if not up:
                return False
            child[up[rng.integers(len(up))]] += 1
            changes += 1
        while not self.fits(child):
            down = [i for i in range(len(child)) if child[i] > 0]
            if not down or changes >= 10:
                return False
            child[down[rng.integers(len(down))]] -= 1
            changes += 1
        return True

    def mutate(self, parent: list[int], rng: np.random.Generator) -> list[int] | None:
        """An offspring of ``parent`` (``None`` if the drawn mutation is impossible or changes nothing)."""
        n = int(min(rng.integers(1, 4), rng.integers(1, 4)))
        child = list(parent)
        if self.grouping == "none":
            return child if self._ungrouped(child, n, rng) and child != parent else None
        if not self.groups:
            return None
        for _ in range(n):
            if not self._switch(child, rng):
                return None
        return child if child != parent else None  # switches may cancel out

    # -- starting points ------------------------------------------------------------------------------

    def uniform(self, value: float) -> list[int]:
        return [self.spec.index_of(value)] * len(self.units)

    def random_start(self, rng: np.random.Generator) -> list[int]:
        """All units at the least compressed level that is >= the budget on average, then random units one
        level down until the budget holds (EvoPress' initialisation for budgets between two levels)."""
        sizes = self.spec.sizes
        total = sum(self.weights)
        start = next((i for i, s in enumerate(sizes) if s * total >= self.target - 1e-9), self.n_levels - 1)
        child = [start] * len(self.units)
        while not self.fits(child):
            down = [i for i in range(len(child)) if child[i] > 0]
            if not down:
                raise UserError("the budget is below the most compressed level", "budget")
            excess = self.cost(child) - self.target
            sizes_ = self.spec.sizes
            exact = [i for i in down if self.weights[i] * (sizes_[child[i]] - sizes_[child[i] - 1]) <= excess + 1e-9]
            down = exact or down  # land on the budget exactly when the unit sizes allow it
            w = np.array([self.weights[i] for i in down], dtype=float)
            child[down[rng.choice(len(down), p=w / w.sum())]] -= 1
        return child


def target_size(spec: LevelSpec, weights: list[int], budget: float) -> float:
    """The budget as a total size (sum of weight x level size) for the given family."""
    if spec.family == "drop":
        if budget != int(budget) or not 0 <= budget < len(weights):
            raise UserError(f"the number of blocks to drop must be an integer in 0..{len(weights) - 1}", "budget")
        return float(len(weights) - budget)
    vals = spec.values
    if not min(vals) - 1e-9 <= budget <= max(vals) + 1e-9:
        raise UserError(f"budget {budget} lies outside the levels {min(vals)}..{max(vals)}", "budget")
    size = budget if spec.family == "bits" else 1.0 - budget
    return float(size * sum(weights))


# ---------------------------------------------------------------------------------------------------
# The evolutionary search


@dataclass
class SearchResult:
    levels: list[int]
    fitness: float
    history: list[float]
    stage_draws: list[list[list[int]]]
    evaluations: int
    seconds: float


def _is_on_grid(space: SearchSpace, budget: float) -> bool:
    return space.spec.family != "drop" and any(abs(v - budget) < 1e-9 for v in space.spec.values)


def evolve(space: SearchSpace, switcher: LevelSwitcher, model: nn.Module, pool: CalibrationPool, budget: float,
           generations: int, offspring: int, survivors: list[int], stage_samples: list[int],
           rng: np.random.Generator, progress: Callable[..., Any] | None = None,
           start: list[int] | None = None) -> SearchResult:
    """(1 + lambda) evolution with multi-step selection (EvoPress Algorithm 1); ``model`` is the canonical
    callable of the module the ``switcher`` edits."""
    t0 = time.perf_counter()
    evals = 0
    draws: list[list[list[int]]] = []

    def select(cands: list[list[int]], keep: int, m: int, stage_log: list[list[int]]) -> tuple[list[list[int]], list[float]]:
        nonlocal evals
        idx = rng.choice(len(pool), size=min(m, len(pool)), replace=False)
        stage_log.append(sorted(int(i) for i in idx))
        fits = []
        for c in cands:
            switcher.apply(c)
            fits.append(pool.fitness(model, idx))
            evals += 1
        order = np.argsort(fits, kind="stable")[:keep]
        return [cands[i] for i in order], [fits[i] for i in order]

    if start is not None:
        parent = list(start)
    elif _is_on_grid(space, budget):
        parent = space.uniform(budget)
    else:  # random starting points, the best on the largest stage
        starts = [space.random_start(rng) for _ in range(max(offspring, 2))]
        log: list[list[int]] = []
        parent = select(starts, 1, stage_samples[-1], log)[0][0]
        draws.append(log)
    parent_fit = math.inf
    history: list[float] = []
    bar = progress(range(generations), desc="evopress") if progress else range(generations)
    for _ in bar:
        kids: list[list[int]] = []
        for _attempt in range(offspring * 50):
            if len(kids) >= offspring:
                break
            kid = space.mutate(parent, rng)
            if kid is not None and kid != parent and kid not in kids:
                kids.append(kid)
        log = []
        cands = kids
        fits: list[float] = []
        for stage, (keep, m) in enumerate(zip(survivors, stage_samples)):
            if stage == len(survivors) - 1 and parent not in cands:
                cands = cands + [parent]  # elitism: the parent competes in the last stage
            cands, fits = select(cands, keep, m, log)
        draws.append(log)
        parent, parent_fit = cands[0], fits[0]
        history.append(parent_fit)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(best=f"{parent_fit:.4g}")
    return SearchResult(parent, parent_fit, history, draws, evals, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# The pass


def load_level_map(path: str) -> dict[str, float]:
    """A level map from a JSON file: ``{unit: level}``, or a modelpress manifest whose pass log holds one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise UserError(f"cannot read the level map ({exc.strerror})", str(p)) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc.msg} at line {exc.lineno})", str(p)) from None

    def find(obj: Any) -> dict[str, float] | None:
        if isinstance(obj, dict):
            if "level_map" in obj and isinstance(obj["level_map"], dict):
                return obj["level_map"]
            for v in obj.values():
                found = find(v)
                if found is not None:
                    return found
        return None

    lm = find(data)
    if lm is None:
        if isinstance(data, dict) and data and all(isinstance(v, (int, float)) for v in data.values()):
            lm = data
        else:
            raise UserError("no level map in this file (expected {unit: level} or a manifest with level_map)", str(p))
    return {str(k): float(v) for k, v in lm.items()}


def default_database_dir(handle: ModelHandle, spec: LevelSpec, layers: list[str], calib: dict[str, Any]) -> Path:
    from ..zoo import cache_dir

    key = hashlib_short(json.dumps([weights_fingerprint(handle.module, layers), spec.family, spec.method,
                                    list(spec.values), spec.group_size, spec.sym, calib], sort_keys=True))
    return cache_dir() / "evopress-db" / f"{spec.family}-{spec.method}-{key}"


def hashlib_short(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


@register_pass
class EvoPressPass(Pass):
    """``type: evopress``: search per-layer levels under a global budget and build the model from the map."""

    name = "evopress"

    class Config(PassConfig):
        family: Literal["sparsity", "bits", "drop"]
        #: how levels are made: sparsegpt|magnitude (sparsity), gptq|rtn (bits); auto = the first
        method: Literal["auto", "sparsegpt", "magnitude", "gptq", "rtn"] = "auto"
        #: level values; default 0.0..0.9 sparsity, 2..8 bits; must be evenly spaced for an exact budget
        levels: list[float] | None = None
        #: average sparsity (0..1), average bits, or number of blocks dropped
        budget: float
        #: evolution (EvoPress) or a baseline: uniform levels, dp (summed per-unit errors), cosine (ShortGPT)
        strategy: Literal["evolution", "uniform", "dp", "cosine"] = "evolution"
        generations: int = Field(50, ge=0, le=100_000)
        offspring: int = Field(16, ge=1, le=4096)
        #: survivors after each selection stage (the last must be 1) and the samples ranked at each stage
        survivors: list[int] = Field(default_factory=lambda: [4, 2, 1], min_length=1, max_length=8)
        stage_samples: list[int] = Field(default_factory=lambda: [8, 32, 128], min_length=1, max_length=8)
        #: size of the calibration pool the stages draw from
        calibration_samples: int = Field(512, ge=1, le=1_000_000)
        #: calibration samples for the input Hessians of SparseGPT / GPTQ
        hessian_samples: int = Field(128, ge=1, le=1_000_000)
        #: samples for the per-unit errors of the dp baseline and the cosine scores
        baseline_samples: int = Field(64, ge=1, le=1_000_000)
        group_size: int = Field(128, ge=0, le=1_000_000)
        sym: bool = False
        grouping: Literal["size", "none"] = "size"
        batch_size: int = Field(32, ge=1, le=4096)
        max_length: int = Field(64, ge=8, le=512)
        #: where the level database lives (default: the modelpress cache, keyed by weights and settings)
        database: str | None = None
        #: reuse a saved level map (JSON {unit: level} or a manifest); skips the search
        level_map: str | None = None

        @model_validator(mode="after")
        def _stages(self) -> "EvoPressPass.Config":
            if len(self.survivors) != len(self.stage_samples):
                raise ValueError("survivors and stage_samples need one entry per selection stage")
            if self.survivors[-1] != 1:
                raise ValueError("the last selection stage keeps exactly one survivor")
            if any(a < b for a, b in zip(self.survivors, self.survivors[1:])) or min(self.survivors) < 1:
                raise ValueError("survivors must be positive and non-increasing")
            if min(self.stage_samples) < 1:
                raise ValueError("stage_samples must be positive")
            return self

    def apply(self, model: ModelHandle, ctx: Context) -> ModelHandle:
        cfg = self.config
        t0 = time.perf_counter()
        import copy

        handle = model.replace_module(copy.deepcopy(model.module).eval())
        module = handle.module
        spec = LevelSpec.make(cfg.family, cfg.method, cfg.levels, cfg.group_size, cfg.sym)
        units, weights = search_units(module, spec.family)
        space = SearchSpace(spec, units, weights, target_size(spec, weights, cfg.budget), cfg.grouping)
        if cfg.grouping == "size" and spec.family != "drop" and not spec.evenly_spaced:
            raise UserError("levels must be evenly spaced for budget-exact level switches (or set grouping: none)",
                            "levels")
        canon = handle.canonical()

        saved = load_level_map(cfg.level_map) if cfg.level_map else None
        need_pool = saved is None or spec.method in ("gptq", "sparsegpt")
        pool = None
        if need_pool:
            n_pool = max(cfg.calibration_samples, cfg.hessian_samples, cfg.baseline_samples, max(cfg.stage_samples))
            pool = calibration_pool(handle, n_pool, ctx.seed, cfg.batch_size, cfg.max_length)
        db = self._database(handle, spec, units, pool, cfg, ctx) if spec.family != "drop" else None
        switcher = LevelSwitcher(module, spec, units, db)

        log: dict[str, Any] = {"family": spec.family, "method": spec.method, "levels": list(spec.values),
                               "budget": cfg.budget, "strategy": cfg.strategy, "units": len(units),
                               "database": str(db.root) if db else None,
                               "database_storage": "dequantized/masked float16 weights" if db else None}
        if saved is not None:
            levels = space.from_level_map(saved)
            log["level_map_source"] = str(cfg.level_map)
        else:
            with torch.no_grad():
                pool.set_targets(canon)
            log.update(calibration_source=pool.source, calibration_ids=pool.ids, fitness=pool.distance)
            levels, extra = self._search(space, switcher, canon, pool, cfg, ctx)
            log.update(extra)
        if not space.fits(levels):
            raise UserError(f"the level map exceeds the budget ({space.average(levels):.4g} vs {cfg.budget})",
                            "level_map")
        switcher.apply(levels)
        log.update(level_map=space.level_map(levels), achieved_budget=space.average(levels),
                   seconds=round(time.perf_counter() - t0, 2))
        ctx.record(self.name, **log)
        return handle

    def _database(self, handle: ModelHandle, spec: LevelSpec, units: list[str], pool: CalibrationPool | None,
                  cfg: "EvoPressPass.Config", ctx: Context) -> LevelDatabase:
        from ..prune.sparsegpt import collect_hessians

        n_h = min(cfg.hessian_samples, len(pool)) if pool is not None else 0
        calib = {"source": pool.source if pool else None, "seed": ctx.seed, "samples": n_h,
                 "max_length": cfg.max_length}
        root = Path(cfg.database) if cfg.database else default_database_dir(handle, spec, units, calib)
        canon = handle.canonical()

        def hessians() -> dict[str, torch.Tensor]:
            def run() -> None:
                for b in pool.batches(np.arange(n_h)):
                    canon(*b)
            return collect_hessians(handle.module, units, run)

        return build_database(root, handle.module, spec, units, hessians if pool is not None else None, calib,
                              progress=ctx.progress)

    def _search(self, space: SearchSpace, switcher: LevelSwitcher, canon: nn.Module, pool: CalibrationPool,
                cfg: "EvoPressPass.Config", ctx: Context) -> tuple[list[int], dict[str, Any]]:
        from . import baselines

        rng = ctx.numpy_rng(7)
        base_ids = np.arange(min(cfg.baseline_samples, len(pool)))
        if cfg.strategy == "uniform":
            if not _is_on_grid(space, cfg.budget):
                raise UserError(f"uniform levels need a budget equal to one level ({list(space.spec.values)})",
                                "budget")
            return space.uniform(cfg.budget), {}
        if cfg.strategy == "dp":
            t = time.perf_counter()
            errors = baselines.cached_unit_errors(space, switcher, canon, pool, base_ids, ctx.progress)
            levels = baselines.dp_levels(space, errors)
            return levels, {"dp_errors": errors.tolist(), "search_seconds": round(time.perf_counter() - t, 2)}
        if cfg.strategy == "cosine":
            if space.spec.family != "drop":
                raise UserError("the cosine (ShortGPT) baseline ranks blocks: use it with family: drop", "strategy")
            scores = baselines.cosine_block_scores(switcher.module, canon, space.units, pool, base_ids)
            return baselines.drop_lowest(space, scores, int(cfg.budget)), {"block_influence": scores}
        res = evolve(space, switcher, canon, pool, cfg.budget, cfg.generations, cfg.offspring, cfg.survivors,
                     cfg.stage_samples, rng, ctx.progress)
        return res.levels, {"fitness_history": res.history, "selection_draws": res.stage_draws,
                            "evaluations": res.evaluations, "search_seconds": round(res.seconds, 2),
                            "generations": cfg.generations, "offspring": cfg.offspring,
                            "survivors": cfg.survivors, "stage_samples": cfg.stage_samples}
