"""Shared fixtures: tiny real-architecture models written as ordinary checkpoints."""
from __future__ import annotations

import os
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
