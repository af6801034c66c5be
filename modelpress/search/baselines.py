"""The baselines EvoPress is compared with, run on the same level database and budget.

* **Uniform**: every unit at the budget's level.
* **DP on summed per-unit errors** (the additive model EvoPress argues against, Sec. 2 "error monotonicity"
  and the DP baselines of SPDY-style / OWL-style allocation): each unit's error at each level is measured
  with *only that unit* compressed (all others dense) as the same divergence the search uses; a dynamic
  program then picks the level per unit minimising the summed error under the budget.
* **Block influence** (ShortGPT; Men et al., 2024, "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect", eq. 1): ``BI_i = 1 - E_tokens[cos(x_i, x_{i+1})]`` between a block's input
  and output hidden states; the blocks with the lowest influence are dropped.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .space import CalibrationPool, SearchSpace
from .levels import LevelSwitcher

#: largest DP capacity (budget in cost units); beyond it, costs are coarsened (rounded up, so the budget holds)
MAX_DP_STATES = 200_000


@torch.no_grad()
def unit_errors(space: SearchSpace, switcher: LevelSwitcher, model: nn.Module, pool: CalibrationPool,
                ids: np.ndarray, progress: Callable[..., Any] | None = None) -> np.ndarray:
    """``E[i, l]``: the divergence from the dense model with only unit ``i`` at level ``l``."""
    n, L = len(space.units), space.n_levels
    E = np.zeros((n, L))
    switcher.apply([None] * n)
    items = [(i, l) for i in range(n) for l in range(L)]
    for i, l in (progress(items, desc="per-unit errors") if progress else items):
        if space.spec.family == "drop" and space.spec.values[l] == 0.0:
            continue  # kept = dense
        switcher.apply_one(i, l)
        E[i, l] = pool.fitness(model, ids)
        switcher.apply_one(i, None)
    return E


def cached_unit_errors(space: SearchSpace, switcher: LevelSwitcher, model: nn.Module, pool: CalibrationPool,
                       ids: np.ndarray, progress: Callable[..., Any] | None = None) -> np.ndarray:
    """:func:`unit_errors`, kept in the level database directory (keyed by the calibration samples and the
    divergence) so that several budgets over one database measure them once."""
    db = switcher.db
    if db is None:
        return unit_errors(space, switcher, model, pool, ids, progress)
    key = hashlib.sha256(json.dumps([pool.source, [pool.ids[i] for i in ids], pool.distance,
                                     space.units]).encode()).hexdigest()[:16]
    path = db.root / f"unit-errors-{key}.json"
    if path.exists():
        E = np.array(json.loads(path.read_text()))
        if E.shape == (len(space.units), space.n_levels):
            return E
    E = unit_errors(space, switcher, model, pool, ids, progress)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(E.tolist()))
    tmp.replace(path)
    return E


def _integer_costs(space: SearchSpace) -> tuple[np.ndarray, int]:
    """Per-(unit, level) costs and the budget as integers of a common unit (exact when possible)."""
    C = np.array([[w * s for s in space.spec.sizes] for w in space.weights], dtype=np.float64)
    Ci = np.rint(C * 1000).astype(np.int64)
    T = int(np.floor(space.target * 1000 + 1e-6))
    nz = Ci[Ci > 0]
    g = int(np.gcd.reduce(nz)) if nz.size else 1
    Ci, T = Ci // g, T // g
    if T > MAX_DP_STATES:
        f = T / MAX_DP_STATES
        Ci, T = np.ceil(Ci / f).astype(np.int64), int(np.floor(T / f))
    return Ci, T


def dp_levels(space: SearchSpace, errors: np.ndarray) -> list[int]:
    """Minimise ``sum_i errors[i, level_i]`` subject to the budget (dynamic programming over the cost)."""
    Ci, T = _integer_costs(space)
    n, L = errors.shape
    dp = np.full(T + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((n, T + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(T + 1, np.inf)
        for lv in range(L):
            c = int(Ci[i, lv])
            if c > T:
                continue
            cand = np.full(T + 1, np.inf)
            cand[c:] = dp[:T + 1 - c] + errors[i, lv]
            better = cand < new
            new[better] = cand[better]
            choice[i][better] = lv
        dp = new
    if not np.isfinite(dp).any():
        raise ValueError("no level map fits the budget")
    c = int(np.argmin(dp))
    levels = [0] * n
    for i in range(n - 1, -1, -1):
        lv = int(choice[i][c])
        levels[i] = lv
        c -= int(Ci[i, lv])
    return levels


@torch.no_grad()
def cosine_block_scores(module: nn.Module, model: nn.Module, blocks: list[str], pool: CalibrationPool,
                        ids: np.ndarray) -> list[float]:
    """ShortGPT block influence ``1 - mean cos(input, output)`` of each block over calibration tokens
    (padding tokens excluded when the inputs carry an attention mask)."""
    sums = np.zeros(len(blocks))
    count = 0.0
    state: dict[str, Any] = {}

    def make_hook(i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, L]
            m = state["mask"]
            sums[i] += float(((1 - cos) * m).sum()) if m is not None else float((1 - cos).sum())
        return hook

    handles = [module.get_submodule(b).register_forward_hook(make_hook(i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        for batch in pool.batches(ids):
            mask = batch[1].float() if len(batch) > 1 and batch[1].dim() == 2 and pool.distance != "mse" else None
            state["mask"] = mask
            model(*batch)
            count += float(mask.sum()) if mask is not None else float(batch[0].shape[0] * batch[0].shape[1])
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1.0)).tolist()


def drop_lowest(space: SearchSpace, scores: list[float], n_drop: int) -> list[int]:
    """Drop the ``n_drop`` blocks with the lowest influence score; keep the rest."""
    dropped, kept = space.spec.index_of(1.0), space.spec.index_of(0.0)
    order = np.argsort(scores, kind="stable")[:n_drop]
    levels = [kept] * len(space.units)
    for i in order:
        levels[int(i)] = dropped
    return levels
