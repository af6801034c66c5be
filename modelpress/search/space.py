"""The search space of EvoPress and of the baselines it is compared with: the calibration pool the
candidates are scored on (fitness: divergence from the dense model's outputs) and the level maps with their
exact budget and the level-switch mutation (EvoPress Sec. 3.2). Shared by :mod:`.evopress` and
:mod:`.baselines`, which import it and not each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..errors import UserError
from ..data import Dataset
from ..data.inputs import TRAJECTORY_STEPS, model_inputs
from ..model import TEXT_KINDS, ModelHandle
from ..sampling import sampler_of, scheduler_config
from .levels import LevelSpec

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
    #: per-token outputs (a causal LM's logits ``[B, L, V]``): the divergence is averaged over each sample's
    #: real tokens (attention mask 1); padding positions are left out
    token_outputs: bool = False

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
        """The dense model's outputs on the whole pool (:meth:`outputs`); with several ranks each computes a
        share of the same batches (:func:`modelpress.distributed.map_tensors`: the same bits) and all get all."""
        self.targets = torch.cat(distributed.map_tensors(lambda b: model(*b).float(),
                                                         self.batches(np.arange(len(self)))))

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
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        mask = self.inputs[1][idx_t] if self.token_outputs else None
        return float(sample_divergence(out, self.targets[idx_t], self.distance, mask).mean())


def sample_divergence(out: torch.Tensor, target: torch.Tensor, distance: str,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample divergence of ``out`` from ``target`` (first dim = samples).

    ``kl``: KL(softmax(target) || softmax(out)) over the last dim, summed over any middle dims, or, with a
    ``token_mask [N, L]`` for per-token outputs ``[N, L, V]``, averaged over each sample's real tokens (the
    token-level KL of EvoPress' language-model fitness, Sec. 4); ``mse``: mean squared difference;
    ``rel_mse``: mse divided by the target's mean square.
    """
    out, target = out.double(), target.double()  # KLs near 0 need the precision
    if distance == "kl":
        lp_t = F.log_softmax(target, dim=-1)
        lp_o = F.log_softmax(out, dim=-1)
        kl = (lp_t.exp() * (lp_t - lp_o)).sum(-1)
        if token_mask is not None:
            m = token_mask.to(kl.dtype)
            return (kl * m).sum(1) / m.sum(1).clamp_min(1.0)
        return kl.reshape(kl.shape[0], -1).sum(1)
    d = (out - target).pow(2).reshape(out.shape[0], -1).mean(1)
    if distance == "rel_mse":
        d = d / target.pow(2).reshape(target.shape[0], -1).mean(1).clamp_min(1e-12)
    return d


def calibration_pool(handle: ModelHandle, dataset: Dataset, n: int, seed: int, batch_size: int = 32,
                     max_length: int = 64) -> CalibrationPool:
    """``n`` samples of ``dataset`` drawn with ``seed`` as the model's inputs (texts tokenized to
    ``max_length``; UNets: images noised at uniform random timesteps, see :mod:`modelpress.data.inputs`),
    with the kind's divergence: KL of the class distributions for a classifier, per-token KL of the next-token
    distributions over real tokens for a causal LM, relative MSE of the hidden states for an encoder, MSE of
    the predicted noise for a UNet. Targets are set later."""
    inputs, examples = model_inputs(handle, dataset, n, seed, max_length)
    if handle.kind in TEXT_KINDS:
        dist, source = ("rel_mse" if handle.kind == "encoder" else "kl"), dataset.name
    elif sampler_of(handle) == "pipeline" and "image" not in dataset.fields:
        dist, source = "mse", (f"{dataset.name}, states of {scheduler_config(handle)['_class_name']} trajectories "
                               f"({TRAJECTORY_STEPS} steps, guided), one per prompt at a uniform step")
    else:
        dist, source = "mse", f"{dataset.name}, t~U[0,{int(scheduler_config(handle)['num_train_timesteps'])})"
    return CalibrationPool(inputs, examples.ids, source, dist, batch_size=batch_size,
                           trim_padding=handle.kind == "classifier", token_outputs=handle.kind == "causal-lm")


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
