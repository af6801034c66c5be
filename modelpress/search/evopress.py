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
* **Parallel evaluation**: with several ranks (:mod:`modelpress.distributed`) every rank draws the same
  offspring and stage samples from the same seed, evaluates a fixed share of each stage's candidates (balanced
  by sample count; the parent's last-stage score is computed with the first stage) and all-gathers the
  fitnesses, so the search takes the same path as in one process.
* **Fitness**: divergence of the compressed model's outputs from the dense model's on the same inputs.
  Classifiers: KL(p_dense || p_compressed) of the class distributions (the paper uses the token-level KL of a
  language model's next-token distribution, which is what causal LMs get here: the KL of every real token's
  next-token distribution, averaged per sample over its real tokens, padding left out; a classifier's class
  distribution is the analogue). Encoders:
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from .. import distributed
from ..errors import UserError
from ..model import TEXT_KINDS, ModelHandle
from ..passes import Context, Pass, PassConfig, register_pass
from . import baselines
from .levels import LevelDatabase, LevelSpec, LevelSwitcher, build_database, search_units, weights_fingerprint
from .space import CalibrationPool, SearchSpace, calibration_pool, target_size


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

    def draw(m: int, stage_log: list[list[int]]) -> np.ndarray:
        idx = rng.choice(len(pool), size=min(m, len(pool)), replace=False)
        stage_log.append(sorted(int(i) for i in idx))
        return idx

    def fitnesses(jobs: list[tuple[list[int], np.ndarray]]) -> list[float]:
        """The fitness of each (candidate, samples); several ranks each evaluate a share balanced by sample
        count (:func:`modelpress.distributed.map_shared`) and all get all."""
        nonlocal evals

        def fitness(job: tuple[list[int], np.ndarray]) -> float:
            switcher.apply(job[0])
            return pool.fitness(model, job[1])

        evals += len(jobs)
        return distributed.map_shared(fitness, jobs, [len(idx) for _, idx in jobs])

    def best(cands: list[list[int]], fits: list[float], keep: int) -> tuple[list[list[int]], list[float]]:
        order = np.argsort(fits, kind="stable")[:keep]
        return [cands[i] for i in order], [fits[i] for i in order]

    if start is not None:
        parent = list(start)
    elif _is_on_grid(space, budget):
        parent = space.uniform(budget)
    else:  # random starting points, the best on the largest stage
        starts = [space.random_start(rng) for _ in range(max(offspring, 2))]
        log: list[list[int]] = []
        idx = draw(stage_samples[-1], log)
        parent = best(starts, fitnesses([(c, idx) for c in starts]), 1)[0][0]
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
        # Every stage's samples are drawn now, in stage order: the draws do not depend on fitnesses, so this is
        # the random sequence of drawing each before its stage. The parent (never a kid) joins only the last
        # stage (elitism), but its samples are known, so it is scored with the first stage's kids: with several
        # ranks it fills the time a rank would otherwise wait in the last stage (same fitnesses, same path).
        stage_idx = [draw(m, log) for m in stage_samples]
        fits = fitnesses([(c, stage_idx[0]) for c in kids] + [(parent, stage_idx[-1])])
        fits, elder = fits[:-1], fits[-1]
        cands = kids
        for stage, keep in enumerate(survivors):
            if stage:
                fits = fitnesses([(c, stage_idx[stage]) for c in cands])
            if stage == len(survivors) - 1:  # elitism: the parent competes in the last stage
                cands, fits = cands + [parent], fits + [elder]
            cands, fits = best(cands, fits, keep)
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
        handle = model  # changed in place: the chosen units are swapped for their levels
        module = handle.module.eval()
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
            pool = calibration_pool(handle, ctx.calibration_data(self.name, handle), n_pool, ctx.seed, cfg.batch_size,
                                    cfg.max_length)
        db = self._database(handle, spec, units, pool, cfg, ctx) if spec.family != "drop" else None
        switcher = LevelSwitcher(module, spec, units, db)

        log: dict[str, Any] = {"family": spec.family, "method": spec.method, "levels": list(spec.values),
                               "budget": cfg.budget, "strategy": cfg.strategy, "units": len(units),
                               "database": str(db.root) if db else None,
                               "database_storage": None if db is None else "float16 weights + packed codes"
                               if spec.family == "bits" else "float16 weights"}
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
        if ctx.result_on_main_only() and not distributed.is_main():
            return handle  # only rank 0 stores the searched layers (its log is the manifest's)
        stored = switcher.store_compressed(levels)
        if spec.family != "drop":  # the searched layers' stored bytes against their fp16 weights
            log.update(searched_layers_bytes=stored["stored_bytes"], searched_layers_fp16_bytes=stored["fp16_bytes"],
                       max_abs_diff_vs_database=stored["max_abs_diff_vs_database"])
        log.update(level_map=space.level_map(levels), achieved_budget=space.average(levels),
                   seconds=round(time.perf_counter() - t0, 2))
        ctx.record(self.name, **log)
        return handle

    def _database(self, handle: ModelHandle, spec: LevelSpec, units: list[str], pool: CalibrationPool | None,
                  cfg: "EvoPressPass.Config", ctx: Context) -> LevelDatabase:
        from ..activations import hessians_block_by_block
        from ..data.capture import collect_hessians

        n_h = min(cfg.hessian_samples, len(pool)) if pool is not None else 0
        by_block = handle.kind in TEXT_KINDS
        calib = {"source": pool.source if pool else None, "seed": ctx.seed, "samples": n_h,
                 "max_length": cfg.max_length,
                 "hessians": "block by block, padding left out" if by_block else "one forward"}
        root = Path(cfg.database) if cfg.database else default_database_dir(handle, spec, units, calib)
        canon = handle.canonical()

        def hessians() -> Iterator[dict[str, torch.Tensor]]:
            """The dense model's input Hessians: a transformer's one block at a time, from the calibration texts'
            activations propagated through its blocks (real tokens only); a UNet's in one forward."""
            batches = list(pool.batches(np.arange(n_h)))
            if by_block:
                yield from hessians_block_by_block(handle, units, batches)
                return

            def run() -> None:
                for b in batches:
                    canon(*b)
            yield collect_hessians(handle.module, units, run)

        with distributed.main_first():  # rank 0 fills the cache; the others find it (or, not shared, build)
            return build_database(root, handle.module, spec, units, hessians if pool is not None else None, calib,
                                  progress=ctx.progress)

    def _search(self, space: SearchSpace, switcher: LevelSwitcher, canon: nn.Module, pool: CalibrationPool,
                cfg: "EvoPressPass.Config", ctx: Context) -> tuple[list[int], dict[str, Any]]:
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
