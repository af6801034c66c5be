"""Metrics of the text models (``encoder`` and ``classifier`` kinds) on the pydocs-10 task.

* ``accuracy``: top-1 accuracy of a docs classifier on the test split of
  :func:`modelpress.zoo.text.docs_dataset`.
* ``logit_kl``: mean KL(reference || model) of the class distributions over the test split.
* ``embedding_cosine``: mean cosine similarity between the model's and the reference's outputs on the test
  texts: mean-pooled last hidden states for an encoder, logits for a classifier.

All three run on the first ``ctx.samples`` test examples (all 1,000 when None), in batches of
``ctx.options["batch_size"]`` (default 64), padded to ``ctx.options["max_length"]`` tokens (default 64,
what the fine-tunes were trained with). The model is any callable with the canonical signature
``(input_ids, attention_mask) -> tensor`` (torch module or an exported model's runner).

A torch model's outputs on the test split are kept in memory, keyed by the module and the storage and
version counter of every tensor in its state dict (any in-place change invalidates them), so the reference,
which every relative metric runs again, is run once per setting.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model import ModelHandle
from ..zoo import text as zoo_text
from . import EvalContext, MetricResult, register_metric

Canonical = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _settings(ctx: EvalContext) -> tuple[int, int]:
    return int(ctx.options.get("batch_size", 64)), int(ctx.options.get("max_length", 64))


def _test_batches(ctx: EvalContext) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    batch_size, max_length = _settings(ctx)
    ids, mask, labels = zoo_text.docs_tensors("test", ctx.samples, max_length)
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        yield ids[sl], mask[sl], labels[sl]


def _run(model: Canonical, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(model(ids, mask)).float()


_OUTPUTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _state_key(module: torch.nn.Module) -> tuple | None:
    try:
        return tuple((k, t.data_ptr(), t._version) for k, t in module.state_dict(keep_vars=True).items())
    except (RuntimeError, AttributeError, NotImplementedError):  # tensor subclasses without storage
        return None


@torch.no_grad()
def _outputs(model: Canonical, ctx: EvalContext, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, labels)`` of ``model`` on the test examples: logits, or mean-pooled hidden states when
    ``pool``. Torch modules' outputs are cached (see the module docstring)."""
    owner = getattr(model, "inner", model)
    state = _state_key(owner) if isinstance(owner, torch.nn.Module) else None
    key = (ctx.samples, *_settings(ctx), pool)
    if state is not None:
        hit = _OUTPUTS.get(owner, {}).get(key)
        if hit is not None and hit[0] == state:
            return hit[1], hit[2]
    outs, labels = [], []
    for ids, mask, lab in _test_batches(ctx):
        out = _run(model, ids, mask)
        outs.append(zoo_text.mean_pool(out, mask) if pool else out)
        labels.append(lab)
    result = torch.cat(outs), torch.cat(labels)
    if state is not None:
        _OUTPUTS.setdefault(owner, {})[key] = (state, *result)
    return result


def _reference(ctx: EvalContext, metric: str) -> Canonical:
    if ctx.reference is None:
        raise UserError(f"metric {metric!r} compares against a reference model, and none was given")
    return ctx.reference.canonical().eval()


def _check_classes(logits: torch.Tensor) -> None:
    if logits.shape[-1] != len(zoo_text.DOCS_LABELS):
        raise UserError(f"the docs task has {len(zoo_text.DOCS_LABELS)} classes but the model gives "
                        f"{logits.shape[-1]} logits: accuracy is defined for the minilm-docs classifiers")


def _details(ctx: EvalContext, n: int) -> dict:
    batch_size, max_length = _settings(ctx)
    return {"split": "test", "examples": n, "max_length": max_length, "batch_size": batch_size,
            "dataset": "pydocs-10", "dataset_sha256": zoo_text.docs_fingerprint()}


@register_metric("accuracy", ("classifier",), "top-1 accuracy on the pydocs-10 test split")
def accuracy(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    logits, labels = _outputs(model, ctx, pool=False)
    _check_classes(logits)
    hit = logits.argmax(-1) == labels
    classes = len(zoo_text.DOCS_LABELS)
    correct = torch.bincount(labels[hit], minlength=classes)
    total = torch.bincount(labels, minlength=classes)
    details = _details(ctx, len(labels))
    details["per_class"] = {lab: round(int(c) / max(1, int(t)), 4)
                            for lab, c, t in zip(zoo_text.DOCS_LABELS, correct.tolist(), total.tolist())}
    return MetricResult(float(hit.double().mean()), True, details)


@register_metric("logit_kl", ("classifier",), "mean KL(reference || model) of the class distributions",
                 relative=True)
def logit_kl(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    log_p = F.log_softmax(_outputs(_reference(ctx, "logit_kl"), ctx, pool=False)[0].double(), -1)
    log_q = F.log_softmax(_outputs(model, ctx, pool=False)[0].double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return MetricResult(max(0.0, float(kl.mean())), False, _details(ctx, len(kl)))


@register_metric("embedding_cosine", ("encoder", "classifier"),
                 "mean cosine similarity of the outputs (mean-pooled hidden states or logits) to the reference's",
                 relative=True)
def embedding_cosine(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    pool = handle.kind == "encoder"
    a = _outputs(model, ctx, pool)[0].double()
    b = _outputs(_reference(ctx, "embedding_cosine"), ctx, pool)[0].double()
    details = _details(ctx, len(a))
    details["pooling"] = "mean over real tokens" if pool else "none (logits)"
    return MetricResult(float(F.cosine_similarity(a, b, dim=-1).mean()), True, details)
