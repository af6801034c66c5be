"""The text half of the zoo: the pydocs-10 dataset, minilm, the docs fine-tunes and the text metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelpress import zoo
from modelpress.errors import UserError
from modelpress.metrics import EvalContext, evaluate, get_metric
from modelpress.sources import load_dataset
from modelpress.model import ModelHandle, describe_architecture
from modelpress.zoo import text as zt


# ---------------------------------------------------------------------------------------------------
# dataset

def test_docs_dataset_shape_and_classes():
    splits = {s: zt.docs_dataset(s) for s in zt.DOCS_SPLITS}
    total = sum(len(x) for x, _ in splits.values())
    assert len(zt.DOCS_LABELS) >= 8 and len(set(zt.DOCS_LABELS)) == len(zt.DOCS_LABELS)
    assert total >= 3000
    for texts, labels in splits.values():
        assert len(texts) == len(labels)
        assert set(labels) == set(range(len(zt.DOCS_LABELS)))  # every class in every split
        assert all(zt.MIN_CHUNK_WORDS <= len(t.split()) <= zt.CHUNK_WORDS for t in texts)
    # the largest class is at most ~3x the smallest (balanced enough for accuracy to mean something)
    counts = torch.bincount(torch.tensor([lab for _, ls in splits.values() for lab in ls]))
    assert counts.max() <= 3 * counts.min()
    train, val, test = (set(splits[s][0]) for s in zt.DOCS_SPLITS)
    assert not (train & val) and not (train & test) and not (val & test)
    assert 500 <= len(test) <= 1000


def test_docs_dataset_rejects_unknown_split():
    with pytest.raises(UserError, match="unknown docs split"):
        zt.docs_dataset("dev")


def test_docs_dataset_is_deterministic_across_processes(tmp_path):
    """Built from scratch (no cache) in a process with another hash seed: the same examples, same order."""
    code = ("from modelpress.zoo import text as t, cache_dir; import hashlib, json; "
            "print(hashlib.sha256(json.dumps(t._build_examples()).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345", MODELPRESS_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import hashlib

    here = hashlib.sha256(json.dumps([list(e) for e in zt._docs_examples()]).encode()).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == here


def test_calibration_draws_are_the_seeded_permutation_of_the_train_split():
    """The data layer's draw of a zoo dataset: the first n of a permutation seeded by the seed (what the
    methods drew before the data layer existed), tokenized by the model's own (MiniLM) tokenizer."""
    from modelpress.data.inputs import model_inputs

    texts, _ = zt.docs_dataset("train")
    data = load_dataset("pydocs-10/train")
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(3))[:40].tolist()
    drawn = data.draw(40, 3)
    assert drawn.ids == perm and drawn.texts == [texts[i] for i in perm]
    assert data.draw(40, 4).ids != perm
    (ids, mask), _ = model_inputs(zoo.load("minilm"), data, 40, 3, seq_len=64)
    want_ids, want_mask = zt.tokenize(drawn.texts, 64)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask) and int(ids[0, 0]) == 101  # [CLS]


# ---------------------------------------------------------------------------------------------------
# minilm

def test_minilm_gives_the_sentence_transformers_embedding():
    from sentence_transformers import SentenceTransformer

    handle = zoo.load("minilm")
    assert handle.kind == "encoder" and handle.extras["zoo"] == "minilm"
    assert Path(handle.extras["tokenizer_dir"], "tokenizer.json").exists()
    assert sum(p.numel() for p in handle.module.parameters()) == 22_713_216
    texts = load_dataset("pydocs-10/train").draw(4, 0).texts
    ids, mask = zt.tokenize(texts, 128)
    with torch.no_grad():
        ours = zt.sentence_embedding(handle.canonical()(ids, mask), mask)
    st = SentenceTransformer(str(zt.minilm_dir()), device="cpu", local_files_only=True)
    theirs = st.encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# metrics, on tiny stand-ins with the MiniLM vocabulary

def _tiny(cls_name: str) -> ModelHandle:
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64,
                                  num_labels=len(zt.DOCS_LABELS))
    torch.manual_seed(0)
    module = getattr(transformers, cls_name)(cfg).eval()
    if hasattr(module, "classifier"):
        with torch.no_grad():
            module.classifier.weight.mul_(100.0)  # confident logits, so that perturbations show in the KL
    kind = "classifier" if cls_name.endswith("Classification") else "encoder"
    # a MiniLM-vocabulary model: MiniLM's tokenizer, and the docs task as its own data
    return ModelHandle(module, kind, "tiny", describe_architecture(module),
                       {"tokenizer_dir": str(zt.minilm_dir()), "datasets": zt.TEXT_DATASETS})


def _perturbed(handle: ModelHandle, scale: float = 0.5) -> ModelHandle:
    import copy

    module = copy.deepcopy(handle.module)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return handle.replace_module(module)


def test_text_metrics_against_themselves_and_a_perturbed_model():
    ref = _tiny("BertForSequenceClassification")
    ctx = EvalContext(samples=96, reference=ref)
    same = evaluate(ref.canonical(), ref, ["accuracy", "logit_kl", "embedding_cosine"], ctx)
    assert same["accuracy"].value == pytest.approx(zt.docs_accuracy(ref.canonical(), "test", 96))
    assert same["accuracy"].details["examples"] == 96
    assert same["logit_kl"].value == pytest.approx(0.0, abs=1e-7)
    assert same["embedding_cosine"].value == pytest.approx(1.0, abs=1e-6)
    assert get_metric("logit_kl").relative and get_metric("embedding_cosine").relative

    bad = _perturbed(ref)
    other = evaluate(bad.canonical(), bad, ["logit_kl", "embedding_cosine"], ctx)
    assert other["logit_kl"].value > 1e-4
    assert other["embedding_cosine"].value < 0.9999

    # KL(p || q) by hand on the same examples
    ids, mask, _ = zt.docs_tensors("test", 96)
    with torch.no_grad():
        p = torch.softmax(ref.canonical()(ids, mask), -1).double()
        q = torch.softmax(bad.canonical()(ids, mask), -1).double()
    assert other["logit_kl"].value == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-4)


def test_cached_outputs_follow_in_place_changes():
    from modelpress.metrics import text as et

    ref = _tiny("BertForSequenceClassification")
    ctx = EvalContext(samples=32, reference=ref)
    data = load_dataset("pydocs-10/test")
    first = et._outputs(ref.canonical(), ref, ctx, data, pool=False)[0]
    assert et._outputs(ref.canonical(), ref, ctx, data, pool=False)[0] is first  # the reference runs once
    with torch.no_grad():
        ref.module.classifier.bias.add_(1.0)
    second = et._outputs(ref.canonical(), ref, ctx, data, pool=False)[0]
    assert torch.allclose(second, first + 1.0, atol=1e-5)


def test_embedding_cosine_on_an_encoder_and_errors():
    ref = _tiny("BertModel")
    ctx = EvalContext(samples=64, reference=ref)
    assert evaluate(ref.canonical(), ref, ["embedding_cosine"], ctx)["embedding_cosine"].value == pytest.approx(1.0)
    bad = _perturbed(ref)
    assert evaluate(bad.canonical(), bad, ["embedding_cosine"], ctx)["embedding_cosine"].value < 0.9999
    with pytest.raises(UserError, match="reference"):
        evaluate(ref.canonical(), ref, ["embedding_cosine"], EvalContext(samples=8))
    with pytest.raises(UserError, match="applies to classifier"):
        evaluate(ref.canonical(), ref, ["accuracy"], ctx)


# ---------------------------------------------------------------------------------------------------
# the fine-tunes (built on first use: about two minutes each on two free cores)

def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path))

    def boom(name, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(zt, "_build_finetune", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        zt.build_finetune("minilm-docs")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left in ([".minilm-docs.lock"], [".minilm-docs.lock", "datasets"])


@pytest.mark.parametrize("name", ["minilm-docs", "minilm-docs-large"])
def test_docs_finetunes_are_far_above_chance(name):
    handle = zoo.load(name)
    assert handle.kind == "classifier" and handle.extras["base"] == "minilm"
    assert handle.extras["build"]["test_accuracy"] > 0.6  # on all 1,000 test examples, at build time
    result = get_metric("accuracy").fn(handle.canonical(), handle, EvalContext(samples=200))
    assert result.details["examples"] == 200
    assert result.value > 0.55  # chance is 0.1, the largest class 0.14
    assert result.value == pytest.approx(zt.docs_accuracy(handle.canonical(), "test", 200), abs=1e-9)


def test_large_finetune_has_much_larger_deltas():
    small = zoo.load("minilm-docs").extras["build"]["mean_relative_delta_norm"]
    large = zoo.load("minilm-docs-large").extras["build"]["mean_relative_delta_norm"]
    assert 0 < small and large > 4 * small
