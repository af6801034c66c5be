"""Streamed evaluation: the token-window metrics of a causal-LM checkpoint or artifact (``perplexity``; ``token_kl`` and
``top1_agreement`` against the reference, both models streamed in lockstep) and ``choice_accuracy`` (its padded
batches of context + choice), computed one decoder block at a time.

Issue 20, item 1 ("loading an artifact for evaluation can also stream: decode one block at a time"). The
evaluation windows (:func:`modelpress.metrics.causal.text_windows`, in the metric's batches) are the
calibration batches of :class:`~modelpress.activations.BlockActivations`, the mechanism streamed GPTQ uses:

1. the model without its blocks (embeddings, final norm, head) is read and runs every batch up to block 0's
   inputs, then is dropped;
2. each decoder block is read (a checkpoint's: its tensors from the shards, :class:`~modelpress.stream.LazyModel`;
   an artifact's: its compressed modules built from the manifest and only its tensors read from
   ``model.safetensors``, a delta's base tensors from the base's shards, :class:`LazyArtifact`), decoded, run on
   every batch (:meth:`~modelpress.activations.BlockActivations.propagate`) and freed;
3. the model without its blocks is read again and gives each batch's logits from the last block's outputs
   (:meth:`~modelpress.activations.BlockActivations.outputs_of_rest`), scored as the in-memory ``perplexity``
   scores them (:func:`~modelpress.metrics.causal.perplexity_of`).

Every block sees the same inputs, in the same batches, as in the whole model's forward, so the result is the
in-memory metric's bit for bit (``tests/test_stream.py``). Peak memory: one unit's weights (an artifact's
decoded too) plus every batch's hidden states and block arguments; docs/scale.md has the measurement.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
from torch import nn

from .activations import BlockActivations
from .artifact import WEIGHTS, check_base_sha256, compressed_module, load_tensors, read_manifest
from .devices import release_free_memory
from .errors import UserError
from .metrics import EvalContext, MetricResult
from .metrics.causal import (choice_accuracy_of, choice_batches, choice_loglikelihoods_of, choice_requests, compare_of,
                             perplexity_of, text_windows, token_kl_of, top1_agreement_of, window_batches)
from .model import ModelHandle, build_architecture, find_blocks
from .modules import set_submodule
from .shards import ShardedCheckpoint
from .stream import LazyModel, Unit, cut_units, parameters_on_meta

#: the metrics a streamed run evaluates block by block (the others load the models whole); ``size`` is read from
#: the files and the models' structures, and needs no weights
STREAMED_METRICS = ("perplexity", "token_kl", "top1_agreement", "choice_accuracy", "size")


class LazyArtifact:
    """A causal-LM artifact opened without reading its weights: the manifest, the model's structure with its
    parameters on the meta device, ``model.safetensors``' header, and for a delta the base opened lazily (its
    sha256 checked against the manifest's). :meth:`materialize` builds one unit as :func:`~modelpress.artifact.
    load_artifact` builds the whole model."""

    def __init__(self, path: str | Path, base: str | None = None) -> None:
        p = Path(path)
        manifest = read_manifest(p)
        self.source, self.where = manifest["source"], str(p)
        if manifest["kind"] != "causal-lm":
            raise UserError(f"streamed evaluation takes causal-lm artifacts; this one is {manifest['kind']}", str(p))
        self.kind, self.architecture = manifest["kind"], manifest["architecture"]
        self.extras = dict(manifest.get("extras", {}))
        self.entries: list[dict[str, Any]] = manifest["compressed_modules"]
        if any(e["path"] == "" for e in self.entries):
            raise UserError("streamed evaluation: the artifact's whole model is one compressed module", str(p))
        with parameters_on_meta():
            self.skeleton = build_architecture(self.architecture)
        self.blocks_path = find_blocks(self.skeleton)
        self.weights = ShardedCheckpoint([p / WEIGHTS])
        self.aliases: dict[str, str] = manifest["aliases"]
        self.from_base: dict[str, str] = manifest["from_base"]
        self.base: LazyModel | None = None
        if self.from_base:
            info = manifest["inputs"].get("base") or {}
            source = base or info.get("source")
            if not source:
                raise UserError("this delta artifact needs its base model, and the manifest names none", str(p))
            self.base = LazyModel(source, what="base")
            check_base_sha256(manifest, self.base.sha256(), str(p))

    def units(self) -> list[Unit]:
        """Each decoder block, then the model without its blocks, on the meta device and uncompressed."""
        return cut_units(self.skeleton, self.blocks_path)

    def handle(self, module: nn.Module) -> ModelHandle:
        return ModelHandle(module, self.kind, self.source, self.architecture, dict(self.extras))

    def _tensor(self, key: str) -> torch.Tensor:
        stored = self.aliases.get(key, key)
        if stored in self.from_base:
            assert self.base is not None
            name = self.base.stored.get(self.from_base[stored])
            if name is None:
                raise UserError(f"wrong base model: it has no tensor {self.from_base[stored]!r}", self.where)
            return self.base.checkpoint.read([name])[name]
        if stored not in self.weights.tensors:
            raise UserError(f"artifact does not match its manifest: tensor {key!r} is not stored", self.where)
        return self.weights.read([stored])[stored]

    def materialize(self, module: nn.Module) -> nn.Module:
        """Give ``module`` (a unit of :meth:`units`) the artifact's compressed modules under it (built from
        their manifest entries) and its tensors, read from ``model.safetensors`` (a delta's base tensors from
        the base), as :func:`~modelpress.artifact.load_tensors` gives a whole model its tensors."""
        paths = {name for name, _ in module.named_modules()}
        with parameters_on_meta():
            for entry in self.entries:
                if entry["path"] not in paths:
                    continue
                set_submodule(module, entry["path"], compressed_module(entry, self.where))
        load_tensors(module, {k: self._tensor(k) for k in module.state_dict()}, self.where)
        return module.eval()


Streamable = Union[LazyModel, LazyArtifact]


def streamed_outputs(models: Sequence[Streamable], batches: list[tuple[torch.Tensor, ...]]
                     ) -> Iterator[tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]]:
    """Every batch (canonical inputs) with each model's whole-model output on it, the models read and run one
    unit at a time, in lockstep (see the module docstring; ``models`` of the same architecture: a reference and
    its artifact side by side for the relative metrics). Each unit is freed, and the memory given back, before
    the next is read; at the end the models' embeddings-and-head units are held together."""
    cuts = [model.units() for model in models]
    acts = []
    for model, units in zip(models, cuts):
        head = model.handle(model.materialize(copy.deepcopy(units[-1].module)))
        acts.append(BlockActivations(head, model.blocks_path, batches))
        del head
    for step in zip(*(units[:-1] for units in cuts)):
        for model, unit, act in zip(models, step, acts):
            release_free_memory()
            module, unit.module = model.materialize(unit.module), None
            act.propagate(module.get_submodule(unit.block_path))
            del module
    release_free_memory()
    heads = [act.outputs_of_rest(model.handle(model.materialize(units[-1].module)))
             for model, units, act in zip(models, cuts, acts)]
    for pairs in zip(*heads):
        yield pairs[0][0], [output for _, output in pairs]


def _windows(model: Streamable, ctx: EvalContext, metric: str) -> tuple[list[tuple[torch.Tensor, ...]], dict[str, Any]]:
    """The metric's windows in its batches (canonical inputs), and the details, as the in-memory metric makes them."""
    rows, details = text_windows(model.handle(model.skeleton), ctx, metric)
    details["streamed"] = True
    return [(b, torch.ones_like(b)) for b in window_batches(rows, ctx)], details


def streamed_perplexity(model: Streamable, ctx: EvalContext) -> MetricResult:
    """The ``perplexity`` metric (:mod:`modelpress.metrics.causal`) of ``model``, streamed: the same windows,
    batches and scoring, so the same value as the model evaluated whole."""
    batches, details = _windows(model, ctx, "perplexity")
    return perplexity_of(((batch[0], out) for batch, (out,) in streamed_outputs([model], batches)), details)


def streamed_choice_accuracy(model: Streamable, ctx: EvalContext) -> MetricResult:
    """The ``choice_accuracy`` metric of ``model``, streamed: the same requests, padded batches and scoring as the
    in-memory metric (the padding masked as the whole model's forward masks it), so the same value."""
    handle = model.handle(model.skeleton)
    data, questions, requests = choice_requests(handle, ctx)
    batches = choice_batches(handle, requests, int(ctx.options.get("batch_size", 8)))
    scores = choice_loglikelihoods_of(((b, out) for b, (out,) in streamed_outputs([model], batches)), requests)
    result = choice_accuracy_of(data, questions, scores)
    result.details["streamed"] = True
    return result


def streamed_comparison(reference: Streamable, model: Streamable, ctx: EvalContext,
                        metrics: Sequence[str]) -> dict[str, MetricResult]:
    """``token_kl`` and / or ``top1_agreement`` of ``model`` against ``reference`` (``metrics``: those sharing
    ``ctx``'s windows), both models streamed in lockstep once for all of them: the same windows, batches and
    scoring as the in-memory metrics, so the same values."""
    windows = {metric: _windows(model, ctx, metric) for metric in metrics}
    batches = windows[metrics[0]][0]  # the metric's name changes only the messages, not the windows
    kl, agree, n = compare_of(outs for _, outs in streamed_outputs([reference, model], batches))
    return {metric: token_kl_of(kl, n, details) if metric == "token_kl" else top1_agreement_of(agree, n, details)
            for metric, (_, details) in windows.items()}


def self_comparison(model: Streamable, ctx: EvalContext, metric: str) -> MetricResult:
    """A relative metric of the reference against itself, as the report lists it: ``KL(p || p)`` sums exact
    zeros (``log p - log p``) and every argmax agrees with itself, so the in-memory path's values are 0.0 and 1.0
    whatever the logits; only the details (the windows) are computed."""
    _, details = _windows(model, ctx, metric)
    details["streamed"] = "not run: the reference against itself"
    n = details["predicted_tokens"]
    return token_kl_of(0.0, n, details) if metric == "token_kl" else top1_agreement_of(float(n), n, details)
