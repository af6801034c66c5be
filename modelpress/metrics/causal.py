"""Metrics of causal language models (kind ``causal-lm``) on held-out text and multiple-choice questions.

**Token windows** (``perplexity``, ``token_kl``, ``top1_agreement``). The dataset's texts (``evaluate[i].dataset``:
a ``.txt`` file, one document per line, a folder of ``.txt`` files or a ``.jsonl`` with ``text``) are tokenized
one by one with the model's own tokenizer *without* special tokens, in the dataset's order, and concatenated
with the tokenizer's end-of-sequence token between consecutive documents. The first ``samples`` tokens of that
stream are used (all when ``samples`` is not set), cut into non-overlapping windows of ``options.window``
tokens (default 128, at most the model's ``max_position_embeddings``); a last partial window is dropped. Each
window is one row of the canonical call ``(input_ids, attention_mask=1) -> logits [B, L, V]``, run in
batches of ``options.batch_size`` rows (default 8). Inside a window the token at position ``t >= 1`` is
*predicted* from positions ``< t`` (the first token of a window is context only): ``N = windows * (window - 1)``
predicted tokens in all.

* ``perplexity``: ``exp(-1/N * sum log p(x_t | x_<t))`` over the ``N`` predicted tokens (natural log);
* ``token_kl``: ``1/N * sum KL(p_ref(. | x_<t) || p(. | x_<t))`` over the same positions, in nats, against the
  uncompressed reference model (relative metric);
* ``top1_agreement``: the share of the ``N`` positions where the model's most likely next token equals the
  reference's (relative metric).

**Multiple choice** (``choice_accuracy``), scored as EleutherAI's lm-evaluation-harness scores log-likelihood
tasks (``loglikelihood`` requests of a ``multiple_choice`` task): JSON Lines rows
``{"context": ..., "choices": [...], "answer": i}``; each choice is the continuation ``" " + choice`` (the
harness' default ``target_delimiter``), encoded as the harness' ``_encode_pair`` does (the pair is tokenized
whole and the context's tokens split off; an empty context gets the end-of-sequence token as prefix); the
input is the last ``max_position_embeddings`` tokens of context + continuation. A choice's score is
``sum log p(continuation tokens | context)``; the prediction is the highest-scoring choice, and
``acc`` = the share of questions predicted right (reported; ``acc_norm``, scores divided by the choice's
length in bytes, goes in the details). ``samples`` takes the first questions.

The model is any callable with the canonical signature (torch module or an exported model's runner). The
relative metrics run the reference on each batch beside the model (nothing of size ``[tokens, V]`` is kept).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..data import Dataset
from ..data.inputs import tokenizer_for
from ..errors import UserError
from ..model import ModelHandle, max_positions
from ..sources import load_dataset
from . import EvalContext, MetricResult, register_metric

Canonical = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KINDS = ("causal-lm",)


def _dataset(handle: ModelHandle, ctx: EvalContext, metric: str, needed: str) -> Dataset:
    data = ctx.dataset or load_dataset(None, handle, "evaluation")
    if data is None:
        example = "test.txt" if needed == "text" else "questions.jsonl"
        raise UserError(f"metric {metric!r} needs a dataset: evaluate: [{{metric: {metric}, dataset: {example}}}]")
    data.require(needed, f"metric {metric!r}")
    return data


def token_stream(handle: ModelHandle, texts: list[str]) -> list[int]:
    """The documents' token ids (no special tokens) joined by the tokenizer's end-of-sequence token."""
    tok = tokenizer_for(handle)
    if tok.eos_token_id is None:
        raise UserError("the model's tokenizer has no end-of-sequence token to separate documents with",
                        str(handle.extras.get("tokenizer_dir")))
    ids: list[int] = []
    for i, row in enumerate(tok(list(texts), add_special_tokens=False)["input_ids"]):
        if i:
            ids.append(int(tok.eos_token_id))
        ids.extend(int(t) for t in row)
    return ids


def text_windows(handle: ModelHandle, ctx: EvalContext, metric: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[windows, window]`` token ids of the metric's dataset (see the module docstring) and the details
    that say what was computed."""
    data = _dataset(handle, ctx, metric, "text")
    window = int(ctx.options.get("window", 128))
    longest = max_positions(handle)
    window = min(window, longest) if longest else window
    if window < 2:
        raise UserError(f"metric {metric!r}: options.window must be at least 2 tokens, got {window}")
    ids = token_stream(handle, data.all().texts)
    total = len(ids)
    if ctx.samples is not None:
        ids = ids[:ctx.samples]
    n = len(ids) // window
    if n == 0:
        raise UserError(f"metric {metric!r}: the text has {len(ids)} tokens, fewer than one window of {window} "
                        "(give more text, or a smaller options.window)", data.name)
    rows = torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)
    details = {"dataset": data.name, "dataset_sha256": data.fingerprint(), "dataset_tokens": total,
               "tokens": n * window, "windows": n, "window": window, "predicted_tokens": n * (window - 1)}
    return rows, details


def _logits(model: Canonical, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(model(ids, mask)).double()


def _window_batches(rows: torch.Tensor, ctx: EvalContext) -> Iterator[torch.Tensor]:
    size = int(ctx.options.get("batch_size", 8))
    for s in range(0, len(rows), size):
        yield rows[s:s + size]


def _reference(ctx: EvalContext, metric: str) -> Canonical:
    if ctx.reference is None:
        raise UserError(f"metric {metric!r} compares against a reference model, and none was given")
    return ctx.reference.canonical().eval()


@register_metric("perplexity", KINDS, "exp of the mean next-token negative log-likelihood over fixed "
                 "non-overlapping token windows of held-out text")
def perplexity(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    rows, details = text_windows(handle, ctx, "perplexity")
    batches = window_batches(rows, ctx)
    return perplexity_of(((b, model(b, torch.ones_like(b))) for b in batches), details)


def window_batches(rows: torch.Tensor, ctx: EvalContext) -> list[torch.Tensor]:
    """The windows in the batches the token-window metrics run them in (``options.batch_size`` rows)."""
    return list(_window_batches(rows, ctx))


def perplexity_of(outputs: Iterable[tuple[torch.Tensor, Any]], details: dict[str, Any]) -> MetricResult:
    """``perplexity`` from each batch of windows with the model's logits on it (the whole model's forward, or
    the streamed one's: :mod:`modelpress.stream_eval`); every position but a window's last predicts the next."""
    nll, n = 0.0, 0
    for b, logits in outputs:
        logp = F.log_softmax(torch.as_tensor(logits).double()[:, :-1], -1)
        nll -= float(logp.gather(-1, b[:, 1:].unsqueeze(-1)).sum())
        n += b[:, 1:].numel()
    details["mean_nll"] = nll / n
    return MetricResult(math.exp(nll / n), False, details)


def _compare(model: Canonical, ctx: EvalContext, rows: torch.Tensor, metric: str) -> tuple[float, float, int]:
    """``(sum of KL(ref || model), positions where the argmaxes agree, positions)`` over the predicting
    positions of every window."""
    ref = _reference(ctx, metric)

    def logits() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in _window_batches(rows, ctx):
            mask = torch.ones_like(b)
            yield _logits(ref, b, mask), _logits(model, b, mask)

    return compare_of(logits())


def compare_of(logits: Iterable[tuple[Any, Any]]) -> tuple[float, float, int]:
    """:func:`_compare`'s sums from each batch's ``(reference logits, model logits)`` (the whole models'
    forwards, or the streamed ones': :mod:`modelpress.stream_eval`)."""
    kl = agree = 0.0
    n = 0
    for ref_logits, model_logits in logits:
        lp = F.log_softmax(torch.as_tensor(ref_logits).double()[:, :-1], -1)
        lq = F.log_softmax(torch.as_tensor(model_logits).double()[:, :-1], -1)
        kl += float((lp.exp() * (lp - lq)).sum())
        agree += float((lp.argmax(-1) == lq.argmax(-1)).sum())
        n += lp.shape[0] * lp.shape[1]
    return kl, agree, n


def token_kl_of(kl: float, n: int, details: dict[str, Any]) -> MetricResult:
    return MetricResult(max(0.0, kl / n), False, details)


def top1_agreement_of(agree: float, n: int, details: dict[str, Any]) -> MetricResult:
    return MetricResult(agree / n, True, details)


@register_metric("token_kl", KINDS, "mean per-token KL(reference || model) of the next-token distributions on "
                 "the perplexity windows", relative=True)
def token_kl(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    rows, details = text_windows(handle, ctx, "token_kl")
    kl, _, n = _compare(model, ctx, rows, "token_kl")
    return token_kl_of(kl, n, details)


@register_metric("top1_agreement", KINDS, "share of the perplexity windows' positions where the most likely "
                 "next token equals the reference's", relative=True)
def top1_agreement(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    rows, details = text_windows(handle, ctx, "top1_agreement")
    _, agree, n = _compare(model, ctx, rows, "top1_agreement")
    return top1_agreement_of(agree, n, details)


# ---------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood (lm-evaluation-harness)


def encode_pair(handle: ModelHandle, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness' ``_encode_pair``: trailing spaces of the context move to the continuation, the
    pair is tokenized whole and the context's own tokens split off the front (so a continuation's first token
    is the one the tokenizer makes in context). An empty context is the end-of-sequence token."""
    tok = tokenizer_for(handle)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [int(tok.eos_token_id)], tok(continuation, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    return whole[:len(ctx_ids)], whole[len(ctx_ids):]


def choice_batches(handle: ModelHandle, requests: list[tuple[list[int], list[int]]],
                   batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The canonical input batches of ``(context ids, continuation ids)`` requests: each input is the last
    ``max_position_embeddings`` tokens of ``context + continuation`` minus the final one, padded on the right
    (the attention mask marks the real tokens)."""
    longest = max_positions(handle) or 1 << 30
    pad = tokenizer_for(handle).eos_token_id or 0
    out = []
    for s in range(0, len(requests), batch_size):
        inputs = [(c + t)[-(longest + 1):][:-1] for c, t in requests[s:s + batch_size]]
        ids = torch.full((len(inputs), max(len(i) for i in inputs)), int(pad), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, inp in enumerate(inputs):
            ids[r, :len(inp)] = torch.tensor(inp)
            mask[r, :len(inp)] = 1
        out.append((ids, mask))
    return out


def choice_loglikelihoods_of(outputs: Iterable[tuple[tuple[torch.Tensor, torch.Tensor], Any]],
                             requests: list[tuple[list[int], list[int]]]) -> list[float]:
    """``sum log p(continuation | context)`` of each request, from each of its :func:`choice_batches` with the
    model's logits on it (the whole model's forward, or the streamed one's: :mod:`modelpress.stream_eval`)."""
    out: list[float] = []
    for (_, mask), logits in outputs:
        logp = F.log_softmax(torch.as_tensor(logits).double(), -1)
        for r, (_, cont) in enumerate(requests[len(out):len(out) + len(mask)]):
            end = int(mask[r].sum())
            out.append(float(logp[r, torch.arange(end - len(cont), end), torch.tensor(cont)].sum()))
    return out


def choice_loglikelihoods(model: Canonical, handle: ModelHandle, requests: list[tuple[list[int], list[int]]],
                          batch_size: int) -> list[float]:
    """``sum log p(continuation | context)`` of each ``(context ids, continuation ids)`` request
    (:func:`choice_batches`, :func:`choice_loglikelihoods_of`)."""
    batches = choice_batches(handle, requests, batch_size)
    return choice_loglikelihoods_of(((b, _logits(model, *b)) for b in batches), requests)


def choice_requests(handle: ModelHandle, ctx: EvalContext) -> tuple[Any, list[dict], list[tuple[list[int], list[int]]]]:
    """The ``choice_accuracy`` dataset, its first ``samples`` questions and one ``(context ids, continuation
    ids)`` request per choice."""
    data = _dataset(handle, ctx, "choice_accuracy", "choices")
    questions = data.first(ctx.samples).choices
    requests = []
    for q, row in enumerate(questions):
        for choice in row["choices"]:
            ctx_ids, cont = encode_pair(handle, row["context"], " " + choice)
            if not cont:
                raise UserError(f"question {q + 1}: choice {choice!r} has no tokens", data.name)
            requests.append((ctx_ids, cont))
    return data, questions, requests


@register_metric("choice_accuracy", KINDS, "multiple-choice accuracy by summed log-likelihood of each choice "
                 "given the context (lm-evaluation-harness acc)")
def choice_accuracy(model: Canonical, handle: ModelHandle, ctx: EvalContext) -> MetricResult:
    data, questions, requests = choice_requests(handle, ctx)
    scores = choice_loglikelihoods(model, handle, requests, int(ctx.options.get("batch_size", 8)))
    return choice_accuracy_of(data, questions, scores)


def choice_accuracy_of(data: Any, questions: list[dict], scores: list[float]) -> MetricResult:
    """``choice_accuracy`` from each choice's summed log-likelihood (in question order)."""
    hits = hits_norm = 0
    k = 0
    for row in questions:
        n = len(row["choices"])
        ll = scores[k:k + n]
        norm = [v / max(1, len((" " + c).encode())) for v, c in zip(ll, row["choices"])]
        hits += int(max(range(n), key=ll.__getitem__) == row["answer"])
        hits_norm += int(max(range(n), key=norm.__getitem__) == row["answer"])
        k += n
    details = {"dataset": data.name, "dataset_sha256": data.fingerprint(), "questions": len(questions),
               "acc_norm": hits_norm / len(questions), "scoring": "sum log p(' ' + choice | context)"}
    return MetricResult(hits / len(questions), True, details)
