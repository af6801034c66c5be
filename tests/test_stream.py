"""Streamed compression (issue 20): tiny Llama / GPT-2 bf16 checkpoints, sharded with an index, compressed one
decoder block at a time give the same artifact bytes and manifest as the in-memory path; the artifact loads;
bad shards and bases are one-line errors with nothing written; ``stream: auto`` and ``device:`` choose."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from modelpress import stream
from modelpress.artifact import WEIGHTS_METADATA, WeightsSpool, load_artifact
from modelpress.cli import main
from modelpress.devices import resolve_device
from modelpress.errors import UserError
from modelpress.model import example_inputs, load_checkpoint, state_bytes
from modelpress.pipeline import run
from modelpress.recipe import load_recipe
from modelpress.shards import INDEX, ShardedCheckpoint


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread, as tests/test_delta.py: on 2 shared cores two OpenMP threads make the tiny SVDs and
    Cholesky factorisations of delta_come up to 800x slower (spin waits; measured 0.73 s vs 0.9 ms CPU for one
    64 x 256 SVD). Both paths of every comparison run at the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _llm(kind: str, tied: bool):
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    return transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bf16 base + "fine-tune" (the base plus small noise) pairs, saved in 60 KB shards with an index: a Llama
    with tied embeddings, one without, and a GPT-2 (Conv1D layers, tied head); the fine-tunes with a tokenizer,
    and calibration texts of 3 to 30 words (padded or cut to the calibration's 16 tokens)."""
    import transformers

    root = tmp_path_factory.mktemp("stream")
    out: dict[str, Path] = {"root": root, "texts": root / "texts.txt"}
    out["texts"].write_text("\n".join(" ".join(random.Random(i).choice("abcdefgh")
                                                for _ in range(random.Random(i).randint(3, 30))) for i in range(16)))
    for name, kind, tied in (("llama-tied", "llama", True), ("llama", "llama", False), ("gpt2", "gpt2", True)):
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(_llm(kind, tied)).to(torch.bfloat16).eval()
        m.save_pretrained(root / f"{name}-base", max_shard_size="60KB")
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        m.save_pretrained(root / name, max_shard_size="60KB")
        _tokenizer(root / name)
        out[name], out[f"{name}-base"] = root / name, root / f"{name}-base"
    return out


def _recipe(path: Path, model: Path, passes: list, output: Path, base: Path | None = None, **extra) -> Path:
    data = {"model": str(model), "passes": passes, "output": str(output), **extra}
    if base is not None:
        data["base"] = str(base)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _manifest(out: Path) -> dict:
    """The manifest without what differs between any two runs (time stamps, timings) or says how it was made."""
    m = json.loads((out / "modelpress.json").read_text())
    for key in ("created", "stream"):
        m.pop(key, None)
    m["recipe"].pop("stream", None)
    m["recipe"].pop("output", None)
    for entry in m["passes"].values():
        entry.pop("seconds", None)
    return m


PASSES = {
    "dfloat11": [{"type": "dfloat11"}],
    "cast+dfloat11": [{"type": "cast", "dtype": "float32"}, {"type": "dfloat11", "dtype": "float32"}],
    "bitdelta": [{"type": "bitdelta", "steps": 0}],
    "dare": [{"type": "dare", "p": 0.9}],
    "delta_come": [{"type": "delta_come", "samples": 8, "batch_size": 4, "seq_len": 16}],
    "delta_come-rtn": [{"type": "delta_come", "quantizer": "rtn"}],
    "bnb": [{"type": "bnb"}],
    "bnb-int8": [{"type": "bnb", "mode": "int8"}],
    "gptq": [{"type": "gptq", "bits": 3, "group_size": 32, "samples": 8, "batch_size": 4, "seq_len": 16,
              "lm_head": True}],
    "gptq-dense": [{"type": "gptq", "bits": 4, "group_size": 32, "samples": 8, "batch_size": 4, "seq_len": 16,
                    "sequential": False, "act_order": True}],
    "gptq-rtn": [{"type": "gptq", "method": "rtn", "lm_head": True}],
    "darex-analytic": [{"type": "darex", "p": 0.9, "q_mode": "analytic", "samples": 8, "batch_size": 4,
                        "seq_len": 16}],
}
DELTA = ("bitdelta", "dare", "delta_come", "delta_come-rtn", "darex-analytic")


@pytest.mark.parametrize("method,arch", [("dfloat11", "llama-tied"), ("cast+dfloat11", "gpt2"), ("bitdelta", "llama"),
                                         ("bitdelta", "gpt2"), ("dare", "llama-tied"), ("delta_come", "llama"),
                                         ("delta_come", "gpt2"),
                                         ("delta_come-rtn", "llama"), ("bnb", "llama-tied"), ("bnb-int8", "gpt2"),
                                         ("gptq", "llama"), ("gptq", "llama-tied"), ("gptq-dense", "gpt2"),
                                         ("gptq-rtn", "llama"), ("darex-analytic", "llama"),
                                         ("darex-analytic", "gpt2")])
def test_streamed_artifact_is_byte_identical_to_in_memory(ckpts: dict[str, Path], arch: str, method: str) -> None:
    """delta_come (GPTQ) calibrates on texts, some padded: its streamed Hessians come from activations propagated
    block by block (modelpress.activations) and must equal the whole model's forward's to the bit; on the untied
    Llama the head is a compressed delta too (its Hessian from the replayed last block's outputs). gptq's
    sequential mode propagates each block as quantized (in memory and streamed alike); with lm_head: true the
    untied head is quantized on the last block's outputs, a tied one left in float with a warning."""
    root = ckpts["root"]
    base = ckpts[f"{arch}-base"] if method in DELTA else None
    outs = {}
    for flag in (False, True):
        out = root / "runs" / f"{arch}-{method}-{flag}"
        recipe = _recipe(root / f"{arch}-{method}-{flag}.yaml", ckpts[arch], PASSES[method], out, base, stream=flag,
                         calibration={"dataset": str(ckpts["texts"])})
        outs[flag] = run(load_recipe(recipe), export=False, evaluate=False, show_progress=False)
    assert (outs[True] / "model.safetensors").read_bytes() == (outs[False] / "model.safetensors").read_bytes()
    assert _manifest(outs[True]) == _manifest(outs[False])
    manifest = json.loads((outs[True] / "modelpress.json").read_text())
    streamed = manifest["stream"]
    assert streamed["units"] == 4 and streamed["largest_unit_bytes"] > 0  # 3 blocks + embeddings and head
    if method in DELTA:  # the base's weights are not stored: the bf16 base layers come from the base
        assert manifest["from_base"]
    if method == "delta_come":  # 8 texts x 16 tokens x 64 wide in bf16 between blocks, and the blocks' arguments
        assert streamed["activation_bytes"] >= 8 * 16 * 64 * 2
        assert manifest["passes"]["delta_come"]["calibration"]["samples"] == 8
        assert ("lm_head" in manifest["passes"]["delta_come"]["ranks"]) == (arch == "llama")
    if method == "darex-analytic":  # one q per compressed layer, the untied head's too
        qs = manifest["passes"]["darex"]["q"]
        assert len(qs) == manifest["passes"]["darex"]["layers"] and ("lm_head" in qs) == (arch == "llama")
        assert all(0.1 <= q <= 1.0 for q in qs.values())
    if method.startswith("gptq"):
        entry = manifest["passes"]["gptq"]
        per_block = 7 if arch.startswith("llama") else 4  # q k v o gate up down; GPT-2: c_attn c_proj c_fc c_proj
        assert entry["layers"] == 3 * per_block + (arch == "llama" and "lm_head" in str(PASSES[method]))
        assert ("lm_head.qweight" in json.dumps(manifest["tensors"])) == (entry["layers"] % per_block == 1)
        assert bool(entry.get("warnings")) == (arch == "llama-tied")
        assert (streamed.get("activation_bytes", 0) > 0) == (method != "gptq-rtn")
    # the streamed artifact loads (a delta: its base from the manifest) and runs like the in-memory one
    a, b = load_artifact(outs[True]), load_artifact(outs[False])
    ids, mask = example_inputs(a, batch=2, seq_len=12)
    with torch.no_grad():
        assert torch.equal(a.canonical()(ids, mask), b.canonical()(ids, mask))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_propagated_hessians_equal_the_whole_models(ckpts: dict[str, Path], arch: str) -> None:
    """The shared mechanism alone: block 0's inputs caught from the model's forward, each block run on every
    batch in turn, the head fed the last block's outputs; every linear layer's input Hessian (padding rows left
    out) equals, bit for bit, the one hooks collect in the whole model's forward (data.capture.model_hessians)."""
    import copy

    from modelpress.activations import BlockActivations
    from modelpress.codecs.delta import find_linear_layers
    from modelpress.data.capture import model_hessians

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids, mask = torch.randint(0, 300, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long)
        mask[1, int(torch.randint(3, 12, (1,), generator=g)):] = 0  # right padding, as the tokenizer pads
        batches.append((ids, mask))
    whole = load_checkpoint(ckpts[arch])
    names = [n for n, _ in find_linear_layers(whole.module)]
    expected = model_hessians(whole, names, batches)
    lazy = stream.LazyModel(str(ckpts[arch]))
    *blocks, rest = lazy.units()
    acts = BlockActivations(lazy.handle(lazy.materialize(copy.deepcopy(rest.module))), lazy.blocks_path, batches)
    got: dict[str, torch.Tensor] = {}
    for unit in blocks:
        module = lazy.materialize(unit.module)
        got.update(acts.through_block(module, unit.block_path, [n for n, _ in find_linear_layers(module)], 2.0))
    module = lazy.materialize(rest.module)
    got.update(acts.through_rest(lazy.handle(module), [n for n, _ in find_linear_layers(module)], 2.0))
    assert list(got) == names and "lm_head" in got
    assert all(torch.equal(got[n], expected[n]) for n in names)


def test_dfloat11_streamed_logits_equal_the_checkpoint(ckpts: dict[str, Path]) -> None:
    out = ckpts["root"] / "runs" / "df11-logits"
    recipe = _recipe(ckpts["root"] / "df11-logits.yaml", ckpts["llama"], [{"type": "dfloat11"}], out, stream=True)
    run(load_recipe(recipe), export=False, evaluate=False, show_progress=False)
    art, ref = load_artifact(out), load_checkpoint(ckpts["llama"])
    ids, mask = example_inputs(ref, batch=2, seq_len=12)
    with torch.no_grad():
        assert torch.equal(art.canonical()(ids, mask), ref.canonical()(ids, mask))


def test_each_unit_is_freed_and_given_back_before_the_next(ckpts: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps a streamed run's memory flat (docs/scale.md): when the next unit is about to be read, nothing
    holds the previous unit (its module, weights or coded tensors), and the allocator is asked to give the freed
    memory back (:func:`modelpress.devices.release_free_memory`) before every unit."""
    import weakref

    done: list[weakref.ref] = []  # the units compressed so far: their modules and artifact tensors
    checks: list[int] = []
    compress_unit = stream._compress_unit

    def traced(ft, base, unit, *args):
        module = weakref.ref(unit.module)
        result = compress_unit(ft, base, unit, *args)
        done.extend([module, *(weakref.ref(t) for t in result.state.values())])
        return result

    def release() -> None:
        checks.append(sum(r() is not None for r in done))

    monkeypatch.setattr(stream, "_compress_unit", traced)
    monkeypatch.setattr(stream, "release_free_memory", release)
    out = ckpts["root"] / "runs" / "df11-freed"
    recipe = _recipe(ckpts["root"] / "df11-freed.yaml", ckpts["llama"], [{"type": "dfloat11"}], out, stream=True)
    run(load_recipe(recipe), export=False, evaluate=False, show_progress=False)
    assert checks == [0, 0, 0, 0] and len(done) > 4  # 3 blocks + embeddings and head, each released before


def test_streamed_run_evaluates_the_artifact(ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("\n".join(" ".join(random.Random(i).choice("abcdefgh") for _ in range(40))
                                              for i in range(8)))
    out = tmp_path / "eval"
    ft = _copy(ckpts["llama"], tmp_path / "ft")
    _tokenizer(ft)
    recipe = _recipe(tmp_path / "eval.yaml", ft, [{"type": "bitdelta", "steps": 0}], out, ckpts["llama-base"],
                     stream=True,
                     evaluate=[{"metric": "token_kl", "dataset": str(tmp_path / "t.txt"), "options": {"window": 16}}])
    run(load_recipe(recipe), export=False, show_progress=False)
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["metrics"]["token_kl"]["compressed"] < 1 and report["metrics"]["token_kl"]["reference"] == 0


def _eval_text(path: Path) -> Path:
    path.write_text("\n".join(" ".join(random.Random(i).choice("abcdefgh") for _ in range(40)) for i in range(8)))
    return path


@pytest.mark.parametrize("arch,method", [("llama-tied", "dfloat11"), ("llama", "bitdelta"), ("gpt2", "bnb")])
def test_streamed_perplexity_equals_the_whole_models(ckpts: dict[str, Path], tmp_path: Path, arch: str,
                                                     method: str) -> None:
    """The reference checkpoint (LazyModel) and the artifact (LazyArtifact: coded DFloat11 blocks with a tied head,
    a BitDelta delta whose dense tensors come from the base's shards, bnb 4-bit GPT-2), read and run one unit at
    a time, give the in-memory perplexity metric's value bit for bit (same windows, batches of 3 with a last
    partial one, same scoring); each unit is materialized once, the embeddings and head twice."""
    from modelpress.metrics import EvalContext
    from modelpress.metrics.causal import perplexity
    from modelpress.sources import load_dataset
    from modelpress.stream_eval import LazyArtifact, streamed_perplexity

    ft = _copy(ckpts[arch], tmp_path / "ft")
    _tokenizer(ft)
    out = tmp_path / "art"
    base = ckpts[f"{arch}-base"] if method in DELTA else None
    run(load_recipe(_recipe(tmp_path / "r.yaml", ft, PASSES[method], out, base, stream=True)), export=False,
        evaluate=False, show_progress=False)
    ctx = EvalContext(dataset=load_dataset(str(_eval_text(tmp_path / "t.txt"))), options={"window": 16, "batch_size": 3})
    for lazy, whole in ((stream.LazyModel(str(ft)), load_checkpoint(ft)), (LazyArtifact(out), load_artifact(out))):
        read = []
        materialize = lazy.materialize
        lazy.materialize = lambda m: read.append(1) or materialize(m)
        got = streamed_perplexity(lazy, ctx)
        with torch.no_grad():
            expected = perplexity(whole.canonical(), whole, ctx)
        assert got.value == expected.value and got.details["windows"] == expected.details["windows"] == 20
        assert len(read) == 3 + 2


def test_streamed_run_evaluates_block_by_block(ckpts: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed run with evaluate: [size, perplexity, token_kl, top1_agreement] loads neither the input model nor
    the artifact whole (the relative metrics stream both side by side, batches of 3 with a last partial one), and
    its report holds the values of the in-memory metrics on both (and the sizes: they need no weights); so does
    re-evaluating the artifact (``modelpress evaluate``)."""
    import modelpress.pipeline as pipeline
    from modelpress.metrics import EvalContext
    from modelpress.metrics.causal import perplexity, token_kl, top1_agreement
    from modelpress.sources import load_dataset

    ft = _copy(ckpts["llama"], tmp_path / "ft")
    _tokenizer(ft)
    text = _eval_text(tmp_path / "t.txt")
    out = tmp_path / "eval"
    options = {"window": 16, "batch_size": 3}
    metrics = {"perplexity": perplexity, "token_kl": token_kl, "top1_agreement": top1_agreement}
    recipe = _recipe(tmp_path / "eval.yaml", ft, PASSES["bitdelta"], out, ckpts["llama-base"], stream=True,
                     evaluate=["size", *({"metric": m, "dataset": str(text), "options": options} for m in metrics)])

    def whole(*args, **kwargs):
        raise AssertionError("a model was loaded whole")

    import modelpress.stream_eval as stream_eval

    passes = []  # each streamed pass over the models (token_kl and top1_agreement share one)
    outputs = stream_eval.streamed_outputs
    monkeypatch.setattr(stream_eval, "streamed_outputs", lambda models, batches: passes.append(len(models)) or
                        outputs(models, batches))
    monkeypatch.setattr(pipeline, "load_model", whole)
    monkeypatch.setattr(pipeline, "load_artifact", whole)
    run(load_recipe(recipe), export=False, show_progress=False)
    assert sorted(passes) == [1, 1, 2]  # perplexity of each model; both side by side for the relative two
    first = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()
    pipeline.evaluate_artifact(out, show_progress=False)  # `modelpress evaluate`: streamed as the run was
    monkeypatch.undo()
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == first["metrics"]
    assert report["evaluation"] == "streamed"
    reference = load_checkpoint(ft)
    ctx = EvalContext(dataset=load_dataset(str(text)), options=options, reference=reference)
    with torch.no_grad():
        for key, model in (("reference", reference), ("compressed", load_artifact(out))):
            for name, metric in metrics.items():
                assert report["metrics"][name][key] == metric(model.canonical(), model, ctx).value, (name, key)
    got = report["metrics"]
    assert got["perplexity"]["compressed"] != got["perplexity"]["reference"]
    assert got["token_kl"]["compressed"] > 0 and got["top1_agreement"]["compressed"] <= 1
    assert report["size_bytes"]["reference_in_memory"] == state_bytes(load_checkpoint(ft).module)  # bf16, not fp32


def test_streamed_choice_accuracy_equals_the_whole_models(ckpts: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """choice_accuracy streams too: contexts and choices of different lengths in padded batches of 3, neither
    model loaded whole, the same scores (acc and acc_norm) as the in-memory metric on both models."""
    import modelpress.pipeline as pipeline
    from modelpress.metrics import EvalContext
    import modelpress.stream_eval as stream_eval
    from modelpress.metrics.causal import (choice_accuracy, choice_batches, choice_loglikelihoods,
                                           choice_loglikelihoods_of, choice_requests)
    from modelpress.sources import load_dataset
    from modelpress.stream import LazyModel

    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice("abcdefgh") for _ in range(n))  # noqa: E731
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"context": words(rng.randint(3, 12)),
                                               "choices": [words(rng.randint(1, 4)) for _ in range(3)],
                                               "answer": rng.randint(0, 2)}) for _ in range(6)))
    ft = _copy(ckpts["llama"], tmp_path / "ft")
    _tokenizer(ft)
    out = tmp_path / "choice"
    options = {"batch_size": 3}
    recipe = _recipe(tmp_path / "choice.yaml", ft, PASSES["bitdelta"], out, ckpts["llama-base"], stream=True,
                     evaluate=[{"metric": "choice_accuracy", "dataset": str(questions), "options": options}])

    def whole(*args, **kwargs):
        raise AssertionError("a model was loaded whole")

    monkeypatch.setattr(pipeline, "load_model", whole)
    monkeypatch.setattr(pipeline, "load_artifact", whole)
    run(load_recipe(recipe), export=False, show_progress=False)
    monkeypatch.undo()
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"] == "streamed"
    ctx = EvalContext(dataset=load_dataset(str(questions)), options=options)
    got = report["metrics"]["choice_accuracy"]
    with torch.no_grad():
        for key, model in (("reference", load_checkpoint(ft)), ("compressed", load_artifact(out))):
            want = choice_accuracy(model.canonical(), model, ctx)
            assert got[key] == want.value
            assert got["details" if key == "compressed" else "reference_details"]["acc_norm"] == want.details["acc_norm"]
        # every choice's log-likelihood, not only the argmax: streamed equals whole, bit for bit
        lazy, whole_model = LazyModel(str(ft)), load_checkpoint(ft)
        _, _, requests = choice_requests(whole_model, ctx)
        batches = choice_batches(whole_model, requests, 3)
        assert any(int(m.sum()) < m.numel() for _, m in batches)  # padded
        streamed = choice_loglikelihoods_of(((b, o) for b, (o,) in stream_eval.streamed_outputs([lazy], batches)),
                                            requests)
        assert streamed == choice_loglikelihoods(whole_model.canonical(), whole_model, requests, 3)


def _tokenizer(directory: Path) -> None:
    """A character-level tokenizer for the evaluation test (vocabulary below the models' 300)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *"abcdefgh"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------------
# The weights file written a tensor at a time


def test_weights_spool_writes_what_save_file_writes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    rng = random.Random(0)
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int32, torch.int64, torch.uint8, torch.bool,
              torch.int16, torch.float8_e4m3fn]
    for trial in range(10):
        state = {}
        for i in range(rng.randint(1, 25)):
            shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
            name = f"{rng.choice('abXY_')}{i}{rng.choice(['', '.weight', '.df11_stream'])}"
            state[name] = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 9).to(rng.choice(dtypes))
        save_file(state, str(tmp_path / "a"), metadata=WEIGHTS_METADATA)
        spool = WeightsSpool(tmp_path / "b")
        for k in rng.sample(list(state), len(state)):
            spool.add(k, state[k])
        spool.finish(WEIGHTS_METADATA)
        assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes(), trial
        assert not spool.spool_path.exists()


# ---------------------------------------------------------------------------------------------------
# Choosing: stream true / false / auto


def test_auto_streams_when_the_model_would_not_fit(ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root = ckpts["root"]
    recipe = load_recipe(_recipe(root / "auto.yaml", ckpts["llama"], [{"type": "dfloat11"}], root / "runs" / "auto"))
    assert recipe.recipe.stream == "auto"
    args = (recipe.recipe.model, None, recipe.passes, "recipe")
    assert not stream.use_streaming("auto", *args)  # a few hundred KB fit
    monkeypatch.setattr(stream, "memory_available", lambda: 100_000)
    assert stream.use_streaming("auto", *args) and not stream.use_streaming(False, *args)
    out = run(recipe, export=False, evaluate=False, show_progress=False)
    assert "stream" in json.loads((out / "modelpress.json").read_text())
    # a pass that needs the whole model stays in memory under auto, and is a one-line error under true
    distil = load_recipe(_recipe(root / "distil.yaml", ckpts["llama"], [{"type": "bitdelta", "steps": 2}],
                                 root / "runs" / "distil", ckpts["llama-base"]))
    assert not stream.use_streaming("auto", distil.recipe.model, distil.recipe.base, distil.passes, "r")
    with pytest.raises(UserError, match="stream: true, but pass 'bitdelta' with these options needs the whole"):
        load_recipe(_recipe(root / "distil2.yaml", ckpts["llama"], [{"type": "bitdelta", "steps": 2}],
                            root / "runs" / "distil2", ckpts["llama-base"], stream=True))
    # a pass calibrating on activations streams only first: they are the input model's
    late = [{"type": "cast", "dtype": "bfloat16"}, {"type": "delta_come"}]
    with pytest.raises(UserError, match="pass 'delta_come' calibrates on the activations of the model as given"):
        load_recipe(_recipe(root / "late.yaml", ckpts["llama"], late, root / "runs" / "late", ckpts["llama-base"],
                            stream=True))
    delta_come = ("delta_come", stream.get_pass("delta_come").Config())
    cast = ("cast", stream.get_pass("cast").Config())
    assert stream.use_streaming("auto", distil.recipe.model, distil.recipe.base, [delta_come], "r")
    assert not stream.use_streaming("auto", distil.recipe.model, distil.recipe.base, [cast, delta_come], "r")
    # Delta-CoMe in memory also holds every matrix's float64 input Hessian: the estimate counts them
    model, base = distil.recipe.model, distil.recipe.base
    ckpt = stream.ShardedCheckpoint.open(Path(model.source))
    hessians = sum(8 * t.shape[1] ** 2 for t in ckpt.tensors.values() if len(t.shape) == 2)
    assert stream.in_memory_bytes(model, base, [delta_come]) == stream.in_memory_bytes(model, base) + hessians
    rtn = ("delta_come", stream.get_pass("delta_come").Config(quantizer="rtn"))
    assert stream.in_memory_bytes(model, base, [rtn]) == stream.in_memory_bytes(model, base)
    monkeypatch.setattr(stream, "memory_available", lambda: stream.in_memory_bytes(model, base) + hessians // 2)
    assert stream.use_streaming("auto", model, base, [delta_come], "r") and not stream.use_streaming(
        "auto", model, base, [rtn], "r")
    with pytest.raises(UserError, match="stream: true, but 'minilm' is a zoo model"):
        load_recipe(_recipe(root / "zoo.yaml", Path("minilm"), [{"type": "dfloat11"}], root / "runs" / "zoo",
                            stream=True))


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the tensor, exit 2, nothing written


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _last_shard(d: Path) -> tuple[Path, str]:
    """The shard holding the last block's down projection (read last), and that tensor's name."""
    weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    name = max((k for k in weight_map if "mlp.down_proj" in k or "mlp.c_proj" in k),
               key=lambda k: int(k.split(".")[-4]))
    return d / weight_map[name], name


def _fails(recipe: Path, capsys: pytest.CaptureFixture, *needles: str) -> None:
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and all(n in errors[0] for n in needles) and "Traceback" not in err, err
    out = Path(yaml.safe_load(recipe.read_text())["output"])
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_missing_shard_is_one_line(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = _copy(ckpts["llama"], tmp_path / "ft")
    shard, name = _last_shard(d)
    shard.unlink()
    _fails(_recipe(tmp_path / "r.yaml", d, [{"type": "dfloat11"}], tmp_path / "out", stream=True), capsys,
           shard.name, "is missing", str(shard))


def test_truncated_shard_is_one_line(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = _copy(ckpts["llama"], tmp_path / "ft")
    shard, _ = _last_shard(d)
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    last = max(ShardedCheckpoint([_copy_file(data, tmp_path / "whole.safetensors")]).tensors.items(),
               key=lambda kv: kv[1].end)[0]
    _fails(_recipe(tmp_path / "r.yaml", d, [{"type": "dfloat11"}], tmp_path / "out", stream=True), capsys,
           "truncated", last, str(shard))


def _copy_file(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def test_base_of_other_shapes_at_the_last_block_is_one_line(ckpts: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The base's last block has a down projection of another shape (its header says so): a one-line error
    naming the base's shard and the tensor, before any block is compressed."""
    from safetensors.torch import load_file, save_file

    base = _copy(ckpts["llama-base"], tmp_path / "base")
    shard, name = _last_shard(base)
    state = load_file(str(shard))
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(shard), metadata={"format": "pt"})
    _fails(_recipe(tmp_path / "r.yaml", ckpts["llama"], [{"type": "bitdelta", "steps": 0}], tmp_path / "out",
                   base, stream=True), capsys, name, str(shard), "has shape")


def test_failure_in_the_last_unit_leaves_nothing(ckpts: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A failure after every block was compressed and spooled (in the last unit) removes the staging directory
    with its spool; an earlier artifact at the output stays as it was."""
    from modelpress.codecs import lossless

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier artifact")
    real = lossless.DFloat11.apply_unit

    def fail_on_head(self, unit, ctx, base, first_layer):
        if hasattr(unit.module, "lm_head"):
            raise UserError("the head is bad", "lm_head")
        return real(self, unit, ctx, base, first_layer)

    monkeypatch.setattr(lossless.DFloat11, "apply_unit", fail_on_head)
    recipe = _recipe(tmp_path / "r.yaml", ckpts["llama"], [{"type": "dfloat11"}], out, stream=True)
    assert main(["run", str(recipe)]) == 2
    assert "the head is bad" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------------------------------
# Devices


def test_device_option() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device: cuda, but torch sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_cuda_without_gpu_is_one_line(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    _fails(_recipe(tmp_path / "r.yaml", ckpts["llama"], [{"type": "dfloat11"}], tmp_path / "out", device="cuda"),
           capsys, "device: cuda, but torch sees no CUDA GPU")
    import modelpress

    with pytest.raises(UserError, match="device: cuda"):
        modelpress.compress(str(ckpts["llama"]), [{"type": "cast"}], device="cuda")
