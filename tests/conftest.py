"""Shared fixtures: tiny real-architecture models written as ordinary checkpoints."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _tiny_bert_classifier():
    import transformers

    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BertForSequenceClassification checkpoint directory (config.json + model.safetensors)."""
    from modelpress.model import ModelHandle, describe_architecture, save_checkpoint

    m = _tiny_bert_classifier()
    d = tmp_path_factory.mktemp("tiny-classifier")
    save_checkpoint(ModelHandle(m, "classifier", "tiny", describe_architecture(m)), d)
    return d


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------
# A person's own text classifier, its base, its tokenizer and labelled JSON Lines files

ANIMALS = {"cat": ["purrs", "meows", "naps in the sun", "chases a mouse", "licks its paw"],
           "dog": ["barks", "fetches the ball", "wags its tail", "digs in the yard", "howls at night"]}
SUBJECTS = ["my pet", "the neighbour's animal", "our friend", "a small one", "that creature", "the old one"]


def _examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "cat" if i % 2 == 0 else "dog"
        rows.append({"text": f"{rng.choice(SUBJECTS)} {rng.choice(ANIMALS[label])} and "
                             f"{rng.choice(ANIMALS[label])}", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the task's words, saved as tokenizer.json (what a user's checkpoint has)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for v in ANIMALS.values() for p in v for w in p.split()} |
                   {w for s in SUBJECTS for w in s.split()} | {"and"})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(str(directory))


def _train(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, steps: int,
           lr: float) -> None:
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        sl = slice((step * 16) % len(ids), (step * 16) % len(ids) + 16)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids[sl], attention_mask=mask[sl]).logits, labels[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def user_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user's own base classifier, its fine-tune on train.jsonl (both with their tokenizer) and the files."""
    import transformers

    from modelpress.data.inputs import class_indices, tokenize
    from modelpress.model import ModelHandle, describe_architecture, load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("user-task")
    train = write_jsonl(root / "train.jsonl", _examples(160, seed=0))
    test = write_jsonl(root / "test.jsonl", _examples(60, seed=1))
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                  id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).eval()
    save_checkpoint(ModelHandle(base, "classifier", "base", describe_architecture(base)), root / "base")
    _tokenizer(root / "base")
    handle = load_checkpoint(root / "base")
    rows = _examples(160, seed=0)
    ids, mask = tokenize(handle, [r["text"] for r in rows], 16)
    # "pretraining": which subject the sentence has; then the fine-tune: cat or dog, with a small learning rate
    # (it moves the word embeddings too, so the delta recipes keep the fine-tune's embeddings)
    subject = torch.tensor([int(r["text"].startswith(("my", "our", "a "))) for r in rows])
    _train(handle.module, ids, mask, subject, steps=60, lr=3e-3)
    save_checkpoint(handle, root / "base")
    ft = handle.module
    _train(ft, ids, mask, class_indices(handle, [r["label"] for r in rows], "train"), steps=150, lr=1e-3)
    save_checkpoint(ModelHandle(ft, "classifier", "ft", describe_architecture(ft)), root / "ft")
    _tokenizer(root / "ft")
    return {"root": root, "train": train, "test": test, "base": root / "base", "ft": root / "ft"}
