"""Metrics of the text models (``encoder`` and ``classifier`` kinds) on the user's labelled texts.

* ``accuracy``: top-1 accuracy of a classifier on a labelled text dataset (``evaluate: [{metric: accuracy,
  dataset: test.jsonl}]``; a zoo model's own evaluation split, pydocs-10/test, when none is named);
* ``logit_kl``: mean KL(reference || model) of the class distributions over the same texts;
* ``embedding_cosine``: mean cosine similarity between the model's and the reference's outputs on the texts:
  mean-pooled last hidden states for an encoder, logits for a classifier.

All three run on the first ``ctx.samples`` examples of the dataset (all when None), in batches of
``ctx.options["batch_size"]`` (default 64), tokenized with the model's own tokenizer and padded to
``ctx.options["max_length"]`` tokens (default 64, what the zoo fine-tunes were trained with). The model is
any callable with the canonical signature ``(input_ids, attention_mask) -> tensor`` (torch module or an
exported model's runner).

A torch model's outputs are kept in memory, keyed by the module, the data and the storage and version
counter of every tensor in its state dict (any in-place change invalidates them), so the reference, which
every relative metric runs again, is run once per setting.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model import ModelHandle
from ..data import Dataset
from ..data.inputs import labelled_text, mean_pool, tokenize
from ..sources import load_dataset
from . import EvalContext, MetricResult, register_metric

Canonical = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _settings(ctx: EvalContext) -> tuple[int, int]:
    return int(ctx.options.get("batch_size", 64)), int(ctx.options.get("max_length", 64))


def _dataset(handle: ModelHandle, ctx: EvalContext, metric: str) -> Dataset:
    data = ctx.dataset or load_dataset(None, handle, "evaluation")
    if data is None:
        raise UserError(f"metric {metric!r} needs texts: give it a dataset (evaluate: [{{metric: {metric}, "
                        "dataset: test.jsonl}])")
    return data


def _test_batches(handle: ModelHandle, ctx: EvalContext, data: Dataset, labelled: bool
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    batch_size, max_length = _settings(ctx)
    if labelled:
        ids, mask, labels = labelled_text(handle, data, ctx.samples, max_length)
    else:
        data.require("text", "a text metric")
        ids, mask = tokenize(handle, data.first(ctx.samples).texts, max_length)
        labels = None
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        yield ids[sl], mask[sl], None if labels is None else labels[sl]


def _run(model: Canonical, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(model(ids, mask)).float()


_OUTPUTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _state_key(module: torch.nn.Module) -> tuple | None:
    try:
        return tuple((k, t.data_ptr(), t._version) for k, t in module.state_dict(keep_vars=True).items())
    except (RuntimeError, AttributeError, NotImplementedError):  # tensor subclasses without storage
        return None


@torch.no_grad()
def _outputs(model: Canonical, handle: ModelHandle, ctx: EvalContext, data: Dataset, pool: bool,
             labelled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(outputs, labels)`` of ``model`` on the dataset's first examples: logits, or mean-pooled hidden
    states when ``pool``. Torch modules' outputs are cached (see the module docstring)."""
    owner = getattr(model, "inner", model)
    state = _state_key(owner) if isinstance(owner, torch.nn.Module) else None
    key = (data.name, ctx.samples, *_settings(ctx), pool, labelled)
    if state is not None:
        hit = _OUTPUTS.get(owner, {}).get(key)
        if hit is not None and hit[0] == state:
            return hit[1], hit[2]
    outs, labels = [], []
    for ids, mask, lab in _test_batches(handle, ctx, data, labelled):
        out = _run(model, ids, mask)
        outs.append(mean_pool(out, mask) if pool else out)
        labels.append(lab)
    result = torch.cat(outs), (torch.cat(labels) if labelled else None)
    if state is not None:
        _OUTPUTS.setdefault(owner, {})[key] = (state, *result)
    return result


def _reference(ctx: EvalContext, metric: str) -> Canonical:
    if ctx.reference is None:
        raise UserError(f"metric {metric!r} compares against a reference model, and none was given")
    return ctx.reference.canonical().eval()


def _details(ctx: EvalContext, data: Dataset, n: int) -> dict:
    batch_size, max_length = _settings(ctx)
    return {"dataset": data.name, "examples": n, "max_length": max_length, "batch_size": batch_size,
            "dataset_sha256": data.fingerprint()}


def class_names(handle: ModelHandle, n: int) -> list[str]:
    """The classifier's class names (its ``id2label``), ``0..n-1`` when it names none."""
    id2label = {int(k): str(v) for k, v in (handle.architecture.get("config", {}).get("id2label") or {}).items()}
    return [id2label.get(i, str(i)) for i in range(n)]


@register_metric("accuracy", ("classifier",), "top-1 accuracy on labelled texts")
def accuracy(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    data = _dataset(handle, ctx, "accuracy")
    logits, labels = _outputs(model, handle, ctx, data, pool=False, labelled=True)
    hit = logits.argmax(-1) == labels
    classes = logits.shape[-1]
    correct = torch.bincount(labels[hit], minlength=classes)
    total = torch.bincount(labels, minlength=classes)
    details = _details(ctx, data, len(labels))
    details["per_class"] = {lab: round(int(c) / max(1, int(t)), 4)
                            for lab, c, t in zip(class_names(handle, classes), correct.tolist(), total.tolist())
                            if t}
    return MetricResult(float(hit.double().mean()), True, details)


@register_metric("logit_kl", ("classifier",), "mean KL(reference || model) of the class distributions",
                 relative=True)
def logit_kl(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    data = _dataset(handle, ctx, "logit_kl")
    log_p = F.log_softmax(_outputs(_reference(ctx, "logit_kl"), handle, ctx, data, pool=False)[0].double(), -1)
    log_q = F.log_softmax(_outputs(model, handle, ctx, data, pool=False)[0].double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return MetricResult(max(0.0, float(kl.mean())), False, _details(ctx, data, len(kl)))


@register_metric("embedding_cosine", ("encoder", "classifier"),
                 "mean cosine similarity of the outputs (mean-pooled hidden states or logits) to the reference's",
                 relative=True)
def embedding_cosine(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    data = _dataset(handle, ctx, "embedding_cosine")
    pool = handle.kind == "encoder"
    a = _outputs(model, handle, ctx, data, pool)[0].double()
    b = _outputs(_reference(ctx, "embedding_cosine"), handle, ctx, data, pool)[0].double()
    details = _details(ctx, data, len(a))
    details["pooling"] = "mean over real tokens" if pool else "none (logits)"
    return MetricResult(float(F.cosine_similarity(a, b, dim=-1).mean()), True, details)
