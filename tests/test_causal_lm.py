"""Kind ``causal-lm``: a user's own tiny Llama / Qwen2 / Mistral / GPT-2 checkpoints (each with its own
tokenizer, built here offline) loaded by path, the text metrics, and every LLM method run from a recipe with
``model: PATH`` on ``train.txt`` calibration text, its artifact loaded back; bad input is a one-line error."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from modelpress.artifact import load_artifact
from modelpress.cli import main
from modelpress.data import open_dataset
from modelpress.data.inputs import tokenize, tokenizer_for
from modelpress.errors import UserError
from modelpress.exporters import ExportSpec, export_model, exported_info, load_exported
from modelpress.exporters.kv import greedy_tokens, kv_input_names
from modelpress.metrics import EvalContext, evaluate
from modelpress.metrics.report import build_report
from modelpress.model import cast_weights, example_inputs, load_checkpoint
from modelpress.pipeline import compress
from modelpress.recipe import load_recipe
from modelpress.sources import load_model

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
NOUNS = ["cat", "dog", "bird", "fox", "horse", "child", "teacher", "farmer"]
VERBS = ["sees", "chases", "likes", "finds", "follows", "helps", "watches"]
PLACES = ["in the park", "near the river", "on the hill", "at the farm", "by the house", "under the tree"]
ADJ = ["small", "big", "red", "old", "quick", "quiet"]


def _sentence(rng: random.Random) -> str:
    return (f"the {rng.choice(ADJ)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} "
            f"{rng.choice(PLACES)} .")


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def _word_tokenizer(directory: Path) -> None:
    """A word-level tokenizer without a pad token (as Llama's and GPT-2's have none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in _corpus(200, 0) + _corpus(60, 1) for w in s.split()})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


def _bpe_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer trained on the corpus (GPT-2's kind), no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(200, 0), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(str(directory))


def _config(arch: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**common)
    return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)


def _save(model: torch.nn.Module, tok_dir: Path, out: Path) -> Path:
    model.save_pretrained(str(out))  # safetensors; a tied lm_head.weight is not saved
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per architecture a base checkpoint and a "fine-tune" (the base trained a few steps on train.txt), plus
    the text files."""
    import transformers

    root = tmp_path_factory.mktemp("llm")
    (root / "train.txt").write_text("\n".join(_corpus(200, 0)) + "\n")
    (root / "test.txt").write_text("\n".join(_corpus(60, 1)) + "\n")
    (root / "short.txt").write_text("the cat .\n")
    rng = random.Random(2)
    rows = []
    for _ in range(12):
        a, b = rng.sample(NOUNS, 2)
        rows.append({"context": f"the {a} sees the", "choices": [b, "park", "."], "answer": 0})
    (root / "choices.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths: dict[str, Path] = dict(root=root)
    for arch in ARCHS:
        tok_dir = root / f"tok-{arch}"
        (_bpe_tokenizer if arch == "gpt2" else _word_tokenizer)(tok_dir)
        tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(_config(arch, len(tok))).eval()
        paths[arch] = _save(base, tok_dir, root / arch)
        ft = transformers.AutoModelForCausalLM.from_pretrained(str(paths[arch]))
        opt = torch.optim.AdamW(ft.parameters(), lr=3e-3)
        texts = _corpus(64, 3)
        ft.train()
        for step in range(4):
            enc = tok([" ".join(texts[8 * step:8 * step + 8])], return_tensors="pt")
            loss = ft(input_ids=enc["input_ids"][:, :64], labels=enc["input_ids"][:, :64]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        paths[f"{arch}-ft"] = _save(ft.eval(), tok_dir, root / f"{arch}-ft")
    return paths


def _recipe(root: Path, name: str, model: Path, passes: list[dict], base: Path | None = None,
            evaluate: list | None = None, **extra) -> Path:
    data = {"model": str(model), "calibration": {"dataset": str(root / "train.txt"), "samples": 8, "seq_len": 32},
            "passes": passes, "output": str(root / "runs" / name),
            "evaluate": evaluate if evaluate is not None else
            [{"metric": "perplexity", "dataset": str(root / "test.txt"), "options": {"window": 32}},
             {"metric": "token_kl", "dataset": str(root / "test.txt"), "options": {"window": 32}}], **extra}
    if base is not None:
        data["base"] = str(base)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _logits(handle, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return handle.canonical()(ids, mask)


def _run(recipe: Path) -> tuple:
    """Compress, save, load the artifact back and report, as ``modelpress run`` does (keeping the in-memory
    model): returns (in-memory handle, artifact handle, reference handle, pass log, report)."""
    loaded = load_recipe(recipe)
    staging = loaded.output
    staging.mkdir(parents=True, exist_ok=True)
    result = compress(loaded, staging, show_progress=False)
    art = load_artifact(staging, base=result.base)
    report = build_report(staging, loaded, art, result.reference, exports=[], metrics=loaded.recipe.evaluate,
                          show_progress=False, base=result.base)
    return result.handle, art, result.reference, result.log, report


def _same_logits(a, b, handle) -> None:
    ids, mask = example_inputs(handle, batch=2, seq_len=16)
    mask[1, 10:] = 0
    assert torch.equal(_logits(a, ids, mask), _logits(b, ids, mask))


# ---------------------------------------------------------------------------------------------------
# Loading, tokenizing, metrics


@pytest.mark.parametrize("arch", ARCHS)
def test_load_by_path_guesses_causal_lm_and_matches_transformers(llm: dict[str, Path], arch: str) -> None:
    import transformers

    h = load_checkpoint(llm[arch])
    assert h.kind == "causal-lm" and h.extras["tokenizer_dir"] == str(llm[arch])
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(llm[arch])).eval()
    ids, mask = example_inputs(h, batch=2, seq_len=12)
    out = _logits(h, ids, mask)
    assert out.shape == (2, 12, h.architecture["config"]["vocab_size"])
    with torch.no_grad():
        assert torch.equal(out, ref(input_ids=ids, attention_mask=mask).logits)
    m = h.module
    assert (m.get_output_embeddings().weight is m.get_input_embeddings().weight) == (arch in ("llama", "gpt2"))


def test_bf16_checkpoint_keeps_its_dtype_and_ties(llm: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(llm["llama"])).to(torch.bfloat16)
    d = _save(m, llm["llama"], tmp_path / "bf16")
    h = load_checkpoint(d)
    assert {p.dtype for p in h.module.parameters()} == {torch.bfloat16}
    assert h.extras["checkpoint"]["dtype"] == "bfloat16"
    assert h.module.lm_head.weight is h.module.model.embed_tokens.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    ids, mask = example_inputs(h, batch=1, seq_len=8)
    with torch.no_grad():
        assert torch.equal(_logits(h, ids, mask), hf(input_ids=ids, attention_mask=mask).logits)


def test_save_checkpoint_writes_a_tied_lm_head_once_and_loads_back(llm: dict[str, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    from modelpress.model import save_checkpoint

    h = load_checkpoint(llm["llama"])
    assert h.module.lm_head.weight is h.module.model.embed_tokens.weight
    save_checkpoint(h, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    again = load_checkpoint(tmp_path / "saved")
    assert again.module.lm_head.weight is again.module.model.embed_tokens.weight
    ids, mask = example_inputs(h, batch=1, seq_len=8)
    with torch.no_grad():
        assert torch.equal(_logits(again, ids, mask), _logits(h, ids, mask))


def test_tokenize_pads_with_eos_when_the_tokenizer_has_no_pad(llm: dict[str, Path]) -> None:
    for arch in ("llama", "gpt2"):
        h = load_checkpoint(llm[arch])
        tok = tokenizer_for(h)
        ids, mask = tokenize(h, ["the cat sees the dog .", "the fox ."], 12)
        n = len(tok("the fox .")["input_ids"])
        assert ids.shape == (2, 12) and mask[1].tolist() == [1] * n + [0] * (12 - n)
        assert (ids[1, n:] == tok.eos_token_id).all()  # right padding with end-of-sequence


def test_tokenize_keeps_a_tokenizer_pad_token(tiny_text_encoder: Path) -> None:
    from transformers import AutoTokenizer

    h = load_checkpoint(tiny_text_encoder)
    ids, mask = tokenize(h, ["cat dog", "dog"], 6)
    ref = AutoTokenizer.from_pretrained(str(tiny_text_encoder))(["cat dog", "dog"], padding="max_length",
                                                                max_length=6, truncation=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


@pytest.fixture(scope="module")
def tiny_text_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT encoder whose word-level tokenizer has a [PAD] token."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "cat": 2, "dog": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(str(d))
    return d


def test_metric_definitions(llm: dict[str, Path]) -> None:
    """perplexity, token_kl, top1_agreement and choice_accuracy compute exactly what docs/causal_lm.md says."""
    h = load_checkpoint(llm["gpt2"])
    ft = load_checkpoint(llm["gpt2-ft"])
    tok = tokenizer_for(h)
    test = open_dataset(str(llm["root"] / "test.txt"))
    ctx = EvalContext(samples=200, options={"window": 20}, reference=h, dataset=test)
    res = evaluate(ft.canonical(), ft, ["perplexity", "token_kl", "top1_agreement"], ctx)
    stream: list[int] = []
    for i, t in enumerate(test.all().texts):
        stream += ([tok.eos_token_id] if i else []) + tok(t, add_special_tokens=False)["input_ids"]
    rows = torch.tensor(stream[:200 // 20 * 20]).view(-1, 20)
    with torch.no_grad():
        lq = F.log_softmax(ft.module(rows).logits.double()[:, :-1], -1)
        lp = F.log_softmax(h.module(rows).logits.double()[:, :-1], -1)
    nll = -lq.gather(-1, rows[:, 1:, None]).mean()
    assert res["perplexity"].value == pytest.approx(math.exp(float(nll)), rel=1e-9)
    assert res["perplexity"].details["predicted_tokens"] == 10 * 19
    assert res["token_kl"].value == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-9)
    assert res["top1_agreement"].value == pytest.approx(float((lp.argmax(-1) == lq.argmax(-1)).double().mean()))
    same = evaluate(h.canonical(), h, ["token_kl", "top1_agreement"], ctx)
    assert same["token_kl"].value == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"].value == 1.0

    questions = open_dataset(str(llm["root"] / "choices.jsonl"))
    acc = evaluate(ft.canonical(), ft, ["choice_accuracy"], EvalContext(dataset=questions, options={"batch_size": 5}))
    hits = 0
    for q in questions.all().choices:
        scores = []
        for c in q["choices"]:
            ctx_ids = tok(q["context"], add_special_tokens=False)["input_ids"]
            whole = tok(q["context"] + " " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = F.log_softmax(ft.module(torch.tensor([whole[:-1]])).logits.double()[0], -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx_ids), len(whole))))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == q["answer"])
    assert acc["choice_accuracy"].value == pytest.approx(hits / 12)
    assert acc["choice_accuracy"].details["questions"] == 12


def test_choice_rows_missing_fields_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0}) + "\n"
                   + json.dumps({"context": "a", "choices": ["b", "c"]}) + "\n")
    with pytest.raises(UserError, match="line 2: no 'answer' field"):
        open_dataset(str(bad))
    bad.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 2}) + "\n")
    with pytest.raises(UserError, match="'answer' must be the index"):
        open_dataset(str(bad))


# ---------------------------------------------------------------------------------------------------
# The methods, each from a recipe with model: PATH


@pytest.mark.parametrize("arch", ARCHS)
def test_dfloat11_codes_every_matrix_once_and_is_bit_identical(llm: dict[str, Path], arch: str) -> None:
    from modelpress.codecs.lossless import LosslessConv1D, LosslessEmbedding, LosslessLinear

    recipe = _recipe(llm["root"], f"df11-{arch}", llm[arch], [{"type": "dfloat11", "min_elements": 0}])
    model, art, reference, log, report = _run(recipe)
    cast = reference.replace_module(cast_weights(reference.module, torch.bfloat16))
    _same_logits(model, cast, model)
    _same_logits(art, cast, model)
    coded = (LosslessLinear, LosslessConv1D, LosslessEmbedding)
    matrices = [n for n, m in cast.module.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) or type(m).__name__ == "Conv1D"]
    assert matrices and all(isinstance(art.module.get_submodule(n), coded) for n in matrices)
    tied = arch in ("llama", "gpt2")
    assert bool(log["dfloat11"]["tied_shared"]) == tied and log["dfloat11"]["tied_skipped"] == []
    head, emb = art.module.get_output_embeddings(), art.module.get_input_embeddings()
    assert (head.df11_stream is emb.df11_stream) == tied
    assert log["dfloat11"]["modules"] == len(matrices) - int(tied)  # a tied pair is coded once
    manifest = json.loads((Path(recipe.parent / "runs" / f"df11-{arch}") / "modelpress.json").read_text())
    assert sum(k.endswith("df11_stream") for k in manifest["tensors"]) == len(matrices) - int(tied)
    assert report["metrics"]["perplexity"]["compressed"] == pytest.approx(report["metrics"]["perplexity"]["reference"],
                                                                          rel=1e-2)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_bitdelta_keeps_embeddings_and_lm_head_by_default(llm: dict[str, Path], arch: str) -> None:
    from modelpress.codecs.bitdelta import BitDeltaLinear

    recipe = _recipe(llm["root"], f"bitdelta-{arch}", llm[f"{arch}-ft"],
                     [{"type": "bitdelta", "steps": 3, "batch_size": 2}], base=llm[arch])
    model, art, reference, log, report = _run(recipe)
    _same_logits(model, art, model)
    ft = load_checkpoint(llm[f"{arch}-ft"]).module
    m = art.module
    assert torch.equal(m.get_input_embeddings().weight, ft.get_input_embeddings().weight)
    assert type(m.get_output_embeddings()) is torch.nn.Linear
    assert torch.equal(m.get_output_embeddings().weight, ft.get_output_embeddings().weight)
    blocks = [n for n, x in m.named_modules() if isinstance(x, BitDeltaLinear)]
    assert blocks and all(".h." in n or ".layers." in n for n in blocks)
    assert log["bitdelta"]["embeddings"] == "keep" and log["bitdelta"]["layers"] == len(blocks)
    assert report["metrics"]["token_kl"]["compressed"] >= 0


@pytest.mark.parametrize("method", [{"type": "delta_come", "samples": 4, "batch_size": 2},
                                    {"type": "dare", "p": 0.5},
                                    {"type": "darex", "p": 0.9, "q_mode": "unlabelled", "samples": 4,
                                     "batch_size": 2, "grid": 3}],
                         ids=["delta_come", "dare", "darex"])
def test_delta_passes_run_on_a_causal_lm(llm: dict[str, Path], method: dict) -> None:
    recipe = _recipe(llm["root"], f"{method['type']}-llama", llm["llama-ft"], [method], base=llm["llama"])
    model, art, reference, log, report = _run(recipe)
    _same_logits(model, art, model)
    assert report["metrics"]["perplexity"]["compressed"] > 1
    assert "delta" in report
    # what the method does not compress stays the fine-tune's (as BitDelta): the embeddings by default
    ft, base = load_checkpoint(llm["llama-ft"]).module, load_checkpoint(llm["llama"]).module
    assert not torch.equal(ft.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert torch.equal(art.module.get_input_embeddings().weight, ft.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_evopress_drop_on_every_architecture(llm: dict[str, Path], arch: str, tmp_path: Path) -> None:
    from modelpress.search.levels import DroppedBlock

    recipe = _recipe(llm["root"], f"evo-drop-{arch}", llm[arch],
                     [{"type": "evopress", "family": "drop", "budget": 1, "generations": 2, "offspring": 2,
                       "survivors": [1], "stage_samples": [4], "calibration_samples": 8, "batch_size": 4,
                       "max_length": 16}])
    model, art, reference, log, report = _run(recipe)
    _same_logits(model, art, model)
    assert sum(isinstance(m, DroppedBlock) for m in art.module.modules()) == 1
    assert log["evopress"]["fitness"] == "kl"


@pytest.mark.parametrize("family", ["sparsity", "bits"])
def test_evopress_layers_on_llama(llm: dict[str, Path], family: str, tmp_path: Path) -> None:
    levels = [0.0, 0.25, 0.5] if family == "sparsity" else [2, 4, 6]
    recipe = _recipe(llm["root"], f"evo-{family}", llm["llama"],
                     [{"type": "evopress", "family": family, "levels": levels, "budget": levels[1],
                       "generations": 2, "offspring": 2, "survivors": [1], "stage_samples": [4],
                       "calibration_samples": 8, "hessian_samples": 8, "batch_size": 4, "max_length": 16,
                       "group_size": 16, "database": str(tmp_path / "db")}])
    model, art, reference, log, report = _run(recipe)
    _same_logits(model, art, model)
    assert log["evopress"]["achieved_budget"] == pytest.approx(levels[1])


def test_evopress_refuses_gpt2_conv1d_layers(llm: dict[str, Path]) -> None:
    recipe = _recipe(llm["root"], "evo-gpt2-bits", llm["gpt2"],
                     [{"type": "evopress", "family": "bits", "budget": 4, "calibration_samples": 8}])
    with pytest.raises(UserError, match="Conv1D .* use family: drop"):
        _run(recipe)


@pytest.mark.parametrize("arch,mode", [("llama", "nf4"), ("gpt2", "int8")])
def test_bnb_baseline(llm: dict[str, Path], arch: str, mode: str) -> None:
    from modelpress.quant.bnb import BnbWeightOnly

    recipe = _recipe(llm["root"], f"bnb-{arch}", llm[arch], [{"type": "bnb", "mode": mode}])
    model, art, reference, log, report = _run(recipe)
    _same_logits(model, art, model)
    quantized = [n for n, m in art.module.named_modules() if isinstance(m, BnbWeightOnly)]
    assert len(quantized) == 7 * 2 if arch == "llama" else len(quantized) == 4 * 2
    assert not isinstance(art.module.get_output_embeddings(), BnbWeightOnly)
    assert report["metrics"]["token_kl"]["compressed"] < 0.5


def test_cli_run_writes_the_report(llm: dict[str, Path]) -> None:
    recipe = _recipe(llm["root"], "cli-df11", llm["mistral"], [{"type": "dfloat11", "dtype": "float32"}],
                     evaluate=[{"metric": "perplexity", "dataset": str(llm["root"] / "test.txt")},
                               {"metric": "top1_agreement", "dataset": str(llm["root"] / "test.txt")},
                               {"metric": "choice_accuracy", "dataset": str(llm["root"] / "choices.jsonl")}],
                     export=["onnx"])
    assert main(["run", str(recipe)]) == 0
    report = json.loads((llm["root"] / "runs" / "cli-df11" / "report.json").read_text())
    assert report["metrics"]["top1_agreement"]["compressed"] == 1.0  # float32 coded: exactly lossless
    assert report["metrics"]["perplexity"]["compressed"] == report["metrics"]["perplexity"]["reference"]
    # the ONNX graph (the KV-cache graph, called with an empty cache) scores like the torch model
    onnx = report["exports"]["onnx"]
    assert onnx["kv_cache"] and onnx["max_abs_err"] < 1e-4 and onnx["metrics"]["top1_agreement"] == 1.0
    assert onnx["metrics"]["perplexity"] == pytest.approx(report["metrics"]["perplexity"]["reference"], rel=1e-5)
    assert report["metrics"]["perplexity"]["details"]["window"] == 64  # 128 capped at max_position_embeddings


# ---------------------------------------------------------------------------------------------------
# Exports with a KV cache: scored and generating in ONNX Runtime like torch

NEW_TOKENS = 16


def _prompts(handle, n: int = 3, length: int = 8) -> torch.Tensor:
    vocab = handle.architecture["config"]["vocab_size"]
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(5))


def _generates_like_torch(runtime, torch_handle) -> None:
    """Greedy generation through the export's cache = torch's greedy generation (whole sequence per token)."""
    prompts = _prompts(torch_handle)
    want = greedy_tokens(torch_handle.canonical(), prompts, NEW_TOKENS)
    assert torch.equal(runtime.generate(prompts, NEW_TOKENS), want)


def test_onnx_default_is_the_kv_cache_graph_and_generates_like_torch(llm: dict[str, Path], tmp_path: Path) -> None:
    h = load_checkpoint(llm["llama"])
    path = export_model(h, ExportSpec(format="onnx"), tmp_path)
    info = exported_info(path)
    assert info["kv_cache"] and info["input_names"] == kv_input_names(2)
    runtime = load_exported(path, h)
    assert runtime.names == ["input_ids", "attention_mask"] and len(runtime.feeds.past) == 4
    # with an empty cache it is the canonical call, right padding included (compared at the real tokens)
    ids, mask = example_inputs(h, batch=2, seq_len=20)
    mask[1, 12:] = 0
    real = mask.bool()
    assert float((runtime(ids, mask) - _logits(h, ids, mask))[real].abs().max()) < 1e-4
    _generates_like_torch(runtime, h)


def test_pydocs_lm_through_optimum_generates_like_torch(tmp_path: Path) -> None:
    """The zoo LM (bf16) as optimum-onnx's text-generation-with-past graph (it takes position_ids too): greedy
    generation matches torch on the weights the file holds (bf16 -> fp32 is exact)."""
    h = load_model("pydocs-lm")
    path = export_model(h, ExportSpec(format="onnx", exporter="optimum"), tmp_path)
    runtime = load_exported(path, h)
    assert "position_ids" in runtime.feeds.all and runtime.feeds.past
    _generates_like_torch(runtime, h.replace_module(h.module.float()))


def test_gpt2_optimum_kv_graph_generates_like_torch(llm: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2 (Conv1D layers, learned positions) through optimum-onnx's text-generation-with-past graph."""
    h = load_checkpoint(llm["gpt2"])
    runtime = load_exported(export_model(h, ExportSpec(format="onnx", exporter="optimum"), tmp_path), h)
    assert runtime.feeds.past
    _generates_like_torch(runtime, h)


def test_int4_weight_kv_graph_is_smaller_and_its_cache_is_exact(llm: dict[str, Path], tmp_path: Path) -> None:
    """MatMulNBits on the KV-cache graph: integer weights, a smaller file, and generating through the cache
    gives what the same file gives recomputing the whole sequence per token."""
    h = load_checkpoint(llm["llama"])
    fp32 = export_model(h, ExportSpec(format="onnx", exporter="optimum"), tmp_path)
    int4 = export_model(h, ExportSpec(format="onnx", exporter="optimum", quantize="int4-weight"), tmp_path)
    assert exported_info(int4)["op_counts"].get("MatMulNBits", 0) == 7 * 2 + 1  # + lm_head
    assert int4.stat().st_size < fp32.stat().st_size
    runtime, prompts = load_exported(int4, h), _prompts(h)
    assert torch.equal(runtime.generate(prompts, NEW_TOKENS), greedy_tokens(runtime, prompts, NEW_TOKENS))


@pytest.mark.slow
def test_pte_static_kv_cache_scores_and_generates_like_torch(llm: dict[str, Path], tmp_path: Path) -> None:
    """ExecuTorch's static-cache program (~1-3 minutes of lowering): the canonical call row by row from
    position 0, and greedy generation one token per call, as torch."""
    h = load_checkpoint(llm["llama"])
    path = export_model(h, ExportSpec(format="pte", kv_cache=True), tmp_path)
    info = exported_info(path)
    assert path.name == "model-kv.pte" and info["kv_cache"] and info["max_cache_len"] == 64
    runtime = load_exported(path, h)
    ids, mask = example_inputs(h, batch=2, seq_len=20)
    assert float((runtime(ids, mask) - _logits(h, ids, mask)).abs().max()) < 1e-4
    _generates_like_torch(runtime, h)


@pytest.mark.slow
def test_pydocs_lm_default_onnx_generates_like_torch(tmp_path: Path) -> None:
    h = load_model("pydocs-lm")
    runtime = load_exported(export_model(h, ExportSpec(format="onnx"), tmp_path), h)
    _generates_like_torch(runtime, h.replace_module(h.module.float()))


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _fails(recipe: Path, capsys: pytest.CaptureFixture, needle: str) -> None:
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]  # the rest: stage progress lines
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    out = Path(yaml.safe_load(recipe.read_text())["output"])
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_kind_causal_lm_on_an_encoder_is_one_line(llm: dict[str, Path], tiny_text_encoder: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(llm["root"], "bad-kind", tiny_text_encoder, [{"type": "dfloat11"}], evaluate=[])
    data = yaml.safe_load(recipe.read_text())
    data["model"] = {"source": str(tiny_text_encoder), "kind": "causal-lm"}
    recipe.write_text(yaml.safe_dump(data))
    _fails(recipe, capsys, "a BertModel is not a causal-lm model")
    data["model"] = {"source": str(llm["qwen2"]), "kind": "encoder"}
    recipe.write_text(yaml.safe_dump(data))
    _fails(recipe, capsys, "a Qwen2ForCausalLM is not an encoder model")


def test_missing_tokenizer_is_one_line(llm: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(llm["llama"] / f, bare / f)
    recipe = _recipe(tmp_path, "no-tok", bare, [{"type": "bnb"}])
    shutil.copy(llm["root"] / "train.txt", tmp_path / "train.txt")
    shutil.copy(llm["root"] / "test.txt", tmp_path / "test.txt")
    _fails(recipe, capsys, "put tokenizer.json")


def test_text_too_short_for_one_window_is_one_line(llm: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(llm["root"], "short", llm["llama"], [{"type": "bnb"}],
                     evaluate=[{"metric": "perplexity", "dataset": str(llm["root"] / "short.txt")}])
    _fails(recipe, capsys, "fewer than one window of 64")


def test_recipes_in_recipes_llm_validate_on_a_path_loaded_model(llm: dict[str, Path]) -> None:
    """The shipped recipes/llm/*.yaml, their placeholder paths pointed at this test's models and files."""
    from modelpress.recipe import parse_recipe

    files = sorted((Path(__file__).parent.parent / "recipes" / "llm").glob("*.yaml"))
    assert len(files) >= 9
    swap = {"path/to/your/llama-finetune": str(llm["llama-ft"]), "path/to/your/llama": str(llm["llama"]),
            "path/to/train.txt": str(llm["root"] / "train.txt"), "path/to/test.txt": str(llm["root"] / "test.txt"),
            "path/to/questions.jsonl": str(llm["root"] / "choices.jsonl")}
    for f in files:
        text = f.read_text()
        for k, v in swap.items():
            text = text.replace(k, v)
        loaded = parse_recipe(yaml.safe_load(text), str(f))
        assert loaded.recipe.model.source.startswith(str(llm["root"])), f
