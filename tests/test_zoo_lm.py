"""The zoo's causal LMs: pydocs-lm (trained from scratch on the pydocs corpus) and its two domain fine-tunes
(a large delta and a small one), and the pydocs-choice questions."""
from __future__ import annotations

import collections
import math

import pytest
import torch

from modelpress import zoo
from modelpress.metrics import EvalContext, evaluate
from modelpress.metrics.causal import token_stream
from modelpress.sources import load_dataset
from modelpress.zoo import lm


@pytest.fixture(scope="module")
def base():
    return zoo.load("pydocs-lm")


@pytest.fixture(scope="module")
def finetune():
    return zoo.load("pydocs-lm-net")


@pytest.fixture(scope="module")
def small_finetune():
    return zoo.load("pydocs-lm-conc")


#: tokens scored per perplexity (the first of the dataset's stream): bf16 matmuls are slow on CPUs without
#: bf16 arithmetic, and 16 windows of 128 tokens tell these models apart by far more than their noise
TOKENS = 2048


def _perplexity(handle, dataset: str) -> float:
    ctx = EvalContext(dataset=load_dataset(dataset), samples=TOKENS, show_progress=False)
    return evaluate(handle.canonical(), handle, ["perplexity"], ctx)["perplexity"].value


def _unigram_perplexity(handle, train: str, test: str) -> float:
    """Perplexity of the add-one unigram model of the train texts' tokens on the test texts: what a model
    that learnt only token frequencies would score."""
    counts = collections.Counter(token_stream(handle, load_dataset(train).all().texts))
    vocab = handle.module.config.vocab_size
    total = sum(counts.values()) + vocab
    ids = token_stream(handle, load_dataset(test).all().texts)[:TOKENS]
    return math.exp(-sum(math.log((counts[i] + 1) / total) for i in ids) / len(ids))


def test_shipped_llama_checkpoint_in_bfloat16_with_its_tokenizer(base, finetune, small_finetune) -> None:
    for h in (base, finetune, small_finetune):
        assert h.kind == "causal-lm" and h.architecture["class"] == "LlamaForCausalLM"
        assert {p.dtype for p in h.module.parameters()} == {torch.bfloat16}
        m = h.module
        assert m.lm_head.weight is m.model.embed_tokens.weight  # tied, as in Llama-3.2-1B / Qwen2-0.5B
        assert 0.9e6 < sum(p.numel() for p in m.parameters()) < 1.2e6
        assert str(lm.WEIGHTS_DIR) in h.extras["tokenizer_dir"]
    assert finetune.extras["base"] == "pydocs-lm" and small_finetune.extras["base"] == "pydocs-lm"
    assert zoo.get("pydocs-lm-net").datasets["evaluation"] == "pydocs-internet/test"
    assert zoo.get("pydocs-lm-conc").datasets["evaluation"] == "pydocs-concurrency/test"


def test_pydocs_lm_learnt_more_than_token_frequencies(base) -> None:
    ppl = _perplexity(base, "pydocs-10/test")
    unigram = _unigram_perplexity(base, "pydocs-10/train", "pydocs-10/test")
    assert ppl < 0.5 * unigram, (ppl, unigram)


def test_domain_finetune_gains_on_its_domain(base, finetune) -> None:
    """The fine-tune is a real delta: clearly better than its base on the held-out internet texts."""
    assert _perplexity(finetune, "pydocs-internet/test") < 0.9 * _perplexity(base, "pydocs-internet/test")
    deltas = [(a.float() - b.float()).norm() / b.float().norm()
              for a, b in zip(finetune.module.parameters(), base.module.parameters())]
    assert all(d > 0 for d in deltas) and max(deltas) < 0.5


def test_bitdelta_size_report_counts_the_tied_embedding_once(base) -> None:
    """pydocs-lm-net's delta keeps its (tied) embedding: stored once in the artifact, so counted once."""
    import modelpress
    from modelpress.codecs.delta import delta_size_report

    result = modelpress.compress("pydocs-lm-net", [{"type": "bitdelta", "steps": 0}], base="pydocs-lm",
                                 show_progress=False)
    report = delta_size_report(result.model, base.module)
    emb = result.model.get_input_embeddings().weight
    assert result.model.get_output_embeddings().weight is emb
    assert emb.numel() * emb.element_size() <= report["other_bytes"] < 2 * emb.numel() * emb.element_size()


def test_bitdelta_distils_in_float32_where_bf16_is_emulated_and_stores_bf16(base, finetune, monkeypatch) -> None:
    """On a CPU without bf16 arithmetic the scale distillation holds the bf16 weights in float32: the artifact's
    tensors keep their dtype and the fine-tune used as teacher (the report's reference) comes back bit for bit."""
    import modelpress
    from modelpress import devices

    asked = []
    monkeypatch.setattr(devices, "half_is_slow", lambda device: asked.append(device) or True)
    result = modelpress.compress("pydocs-lm-net", [{"type": "bitdelta", "steps": 2, "batch_size": 2, "seq_len": 16}],
                                 base=base, show_progress=False)
    assert asked, "the distillation did not ask whether half precision is slow"
    before, after = finetune.module.state_dict(), result.reference.module.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    dtypes = {k: v.dtype for k, v in result.model.state_dict().items() if v.is_floating_point()}
    assert {dtypes[k] for k in dtypes if not k.endswith("alpha")} == {torch.bfloat16}
    assert {dtypes[k] for k in dtypes if k.endswith("alpha")} == {torch.float32}
    # the base weights inside the delta layers are the base's, bit for bit
    layer = next(n for n, m in result.model.named_modules() if hasattr(m, "alpha"))
    assert torch.equal(result.model.get_submodule(layer).weight, base.module.get_submodule(layer).weight)


def test_the_two_finetunes_are_a_large_and_a_small_delta(base, finetune, small_finetune) -> None:
    """||theta_ft - theta_base|| / ||theta_base||: 10.7% for the internet fine-tune, under 1% for the short,
    low learning-rate concurrency one (as recorded in its zoo.json at build)."""
    large = lm.delta_relative_norm(finetune.module, base.module)
    small = lm.delta_relative_norm(small_finetune.module, base.module)
    assert large > 0.05 and small < 0.01 and large > 10 * small, (large, small)
    assert small_finetune.extras["build"]["delta_relative_norm"] == pytest.approx(small, abs=1e-5)


def test_small_delta_finetune_gains_on_its_domain(base, small_finetune) -> None:
    """Small, but a real fine-tune: better than its base on the held-out concurrency texts."""
    data = "pydocs-concurrency/test"
    assert _perplexity(small_finetune, data) < 0.97 * _perplexity(base, data)


def test_choice_questions_continue_their_own_text() -> None:
    """pydocs-choice: each question's right choice is the next words of the context's own text, the others the
    same words of texts of other areas; answers balanced over the four positions; deterministic."""
    from modelpress.zoo.text import docs_dataset

    rows = lm.continuation_questions("test")
    assert rows == lm.continuation_questions("test") and len(rows) > 500
    texts = set(docs_dataset("test")[0])
    for row in rows[:50]:
        right = row["context"] + " " + row["choices"][row["answer"]]
        assert any(" ".join(t.split()).startswith(right) for t in texts)
        assert len(row["choices"]) == 4 and all(len(c.split()) == lm.CHOICE_WORDS for c in row["choices"])
    counts = collections.Counter(r["answer"] for r in rows)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert load_dataset("pydocs-choice/test").first(3).choices == rows[:3]


def test_zoo_lm_recipes_validate() -> None:
    """recipes/zoo-lm/*.yaml (one per LLM method, what benchmarks/causal_lm.py runs) are complete recipes on
    the zoo LMs: schema, passes, metrics and datasets."""
    from pathlib import Path

    import yaml

    from modelpress.recipe import parse_recipe

    files = sorted((Path(__file__).parent.parent / "recipes" / "zoo-lm").glob("*.yaml"))
    methods = set()
    for f in files:
        loaded = parse_recipe(yaml.safe_load(f.read_text()), str(f))
        assert loaded.recipe.model.source in lm.LMS, f
        methods |= {p["type"] if isinstance(p, dict) else p.type for p in loaded.recipe.passes}
        for m in loaded.recipe.evaluate:
            if getattr(m, "dataset", None):
                load_dataset(m.dataset)
    assert methods >= {"dfloat11", "bitdelta", "delta_come", "dare", "darex", "evopress", "bnb"}
