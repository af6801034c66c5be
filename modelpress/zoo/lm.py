"""Causal language models of the zoo: ``pydocs-lm`` and its fine-tune ``pydocs-lm-net``.

Five of the methods (DFloat11, BitDelta, Delta-CoMe, DARE / DAREx, EvoPress) were published on decoder-only
LLMs. These two are the smallest real ones we can ship: Llama-architecture models (grouped-query attention,
RoPE, SwiGLU, RMSNorm, tied embeddings as in Llama-3.2-1B and Qwen2-0.5B; 1.0M parameters, stored in
bfloat16 as LLM checkpoints are) trained from scratch here on the pydocs corpus (the Python standard library's
own documentation, :mod:`modelpress.zoo.text`) with a byte-level BPE tokenizer trained on the same text.

* ``pydocs-lm``: trained on every area's ``train`` texts.
* ``pydocs-lm-net``: ``pydocs-lm`` (as shipped, in bfloat16) fine-tuned on the ``internet`` area's ``train``
  texts (sockets, HTTP, email, URLs): a domain fine-tune whose delta the delta methods compress; its gain is
  measured as perplexity on the area's ``test`` texts (dataset ``pydocs-internet/test``).

Both are committed under ``zoo/weights/`` (``modelpress zoo build pydocs-lm`` retrains them into the cache;
training records, the perplexities included, are in each directory's ``zoo.json`` and docs/zoo-lm.md). They
are tiny: their perplexities say how a method changes *this* model, not what it does to a 7B one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data import finite, register_dataset
from ..model import ModelHandle, load_checkpoint
from . import WEIGHTS_DIR, ZooEntry, cache_dir, register, training_step
from .text import DOCS_LABELS, DOCS_SPLITS, docs_dataset, docs_fingerprint

EOS = "<|endoftext|>"
DOMAIN = "internet"
TRAIN_THREADS = 1


@dataclass(frozen=True)
class LMSettings:
    """How a zoo LM is trained. Everything here is recorded in its ``zoo.json``."""

    lr: float
    epochs: int
    area: str | None = None      # train on one docs area only (a domain fine-tune)
    init: str | None = None      # start from this zoo LM's shipped weights
    batch_size: int = 16
    window: int = 128
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    seed: int = 0


LMS: dict[str, LMSettings] = {
    "pydocs-lm": LMSettings(lr=3e-3, epochs=6),
    "pydocs-lm-net": LMSettings(lr=1e-3, epochs=4, area=DOMAIN, init="pydocs-lm"),
}

#: Llama-architecture shape: 4 layers, hidden 128, 4 query / 2 key-value heads, tied embeddings
ARCHITECTURE = dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


# ---------------------------------------------------------------------------------------------------
# Data

def area_texts(split: str, area: str | None = None) -> list[str]:
    """The pydocs texts of ``split``, of one docs area when ``area`` is given."""
    texts, labels = docs_dataset(split)
    if area is None:
        return texts
    want = DOCS_LABELS.index(area)
    return [t for t, lab in zip(texts, labels) if lab == want]


def _area_split(split: str):  # noqa: ANN202 - a Dataset loader
    def load():  # noqa: ANN202
        return finite(f"pydocs-{DOMAIN}/{split}", {"text"}, texts=area_texts(split, DOMAIN))
    return load


for _split in DOCS_SPLITS:
    register_dataset(f"pydocs-{DOMAIN}/{_split}", _area_split(_split))

LM_DATASETS = {"calibration": "pydocs-10/train", "evaluation": "pydocs-10/test", "validation": "pydocs-10/val"}
DOMAIN_DATASETS = {"calibration": f"pydocs-{DOMAIN}/train", "evaluation": f"pydocs-{DOMAIN}/test",
                   "validation": f"pydocs-{DOMAIN}/val"}


def train_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2's kind) of :data:`ARCHITECTURE`'s vocabulary size, trained on the
    pydocs ``train`` texts; ``<|endoftext|>`` is its one special token (beginning, end and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=ARCHITECTURE["vocab_size"], special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(area_texts("train"), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                            model_max_length=ARCHITECTURE["max_position_embeddings"]).save_pretrained(str(directory))


def token_windows(tokenizer_dir: Path, texts: list[str], window: int) -> torch.Tensor:
    """``[n, window]``: the texts' tokens joined by ``<|endoftext|>`` (the perplexity metric's stream, see
    :func:`modelpress.metrics.causal.token_stream`), cut into whole windows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids: list[int] = []
    for row in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend([*row, tok.eos_token_id])
    n = len(ids) // window
    return torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)


# ---------------------------------------------------------------------------------------------------
# Training

def _new_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**ARCHITECTURE, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                      architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """exp of the mean next-token NLL over the windows (the ``perplexity`` metric's definition)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                        reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def _train(model: torch.nn.Module, windows: torch.Tensor, s: LMSettings, label: str) -> None:
    """AdamW with linear warm-up and cosine decay over ``s.epochs`` shuffled passes over the windows."""
    from .. import console

    steps_per_epoch = math.ceil(len(windows) / s.batch_size)
    total = steps_per_epoch * s.epochs
    warmup = max(1, int(s.warmup_fraction * total))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, k / total)))))
    g = torch.Generator().manual_seed(s.seed)
    model.train()
    bar = console.progress(total=total, desc=f"training {label}", mininterval=5.0)
    for _ in range(s.epochs):
        for b in torch.randperm(len(windows), generator=g).split(s.batch_size):
            training_step(model, model(input_ids=windows[b], labels=windows[b]).loss, opt, sched, bar, clip=1.0)
    bar.close()
    model.eval()


def build(name: str, force: bool = False, directory: Path | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Train zoo LM ``name`` (deterministic given its settings) and write it as a transformers checkpoint
    directory in bfloat16 with its tokenizer and ``zoo.json``; returns the directory. Without ``force`` an
    existing build is kept."""
    s = LMS[name]
    out = (directory or cache_dir()) / name
    if (out / "model.safetensors").exists() and not force:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        if s.init:
            init_dir = find(s.init) or build(s.init, directory=directory, log=log)
            for f in init_dir.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens")):
                    shutil.copy2(f, tmp / f.name)
            model = load_checkpoint(init_dir, kind="causal-lm").module.float()
        else:
            train_tokenizer(tmp)
            model = _new_model(s.seed)
        windows = {split: token_windows(tmp, area_texts(split, s.area), s.window) for split in DOCS_SPLITS}
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            _train(model, windows["train"], s, name)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        model = model.to(torch.bfloat16)
        model.save_pretrained(str(tmp), safe_serialization=True)
        test_all = token_windows(tmp, area_texts("test"), s.window)
        test_domain = token_windows(tmp, area_texts("test", DOMAIN), s.window)
        record = {"name": name, "settings": asdict(s), "architecture": ARCHITECTURE, "dataset": docs_fingerprint(),
                  "parameters": sum(p.numel() for p in model.parameters()), "train_windows": len(windows["train"]),
                  "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
                  "torch": torch.__version__, "threads": TRAIN_THREADS,
                  "bf16_perplexity": {"val": round(perplexity(model, windows["val"]), 3),
                                      "test": round(perplexity(model, test_all), 3),
                                      f"test_{DOMAIN}": round(perplexity(model, test_domain), 3)}}
        (tmp / "zoo.json").write_text(json.dumps(record, indent=2))
        log(f"{name}: {json.dumps(record['bf16_perplexity'])} in {seconds:.0f} s")
    finally:
        torch.set_num_threads(prev)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def find(name: str) -> Path | None:
    """The shipped checkpoint directory of ``name`` (else a build in the cache), ``None`` when neither exists."""
    for d in (WEIGHTS_DIR / name, cache_dir() / name):
        if (d / "model.safetensors").exists() and (d / "zoo.json").exists():
            return d
    return None


def load(name: str) -> ModelHandle:
    """Load zoo LM ``name`` from its checkpoint directory (built first when neither shipped nor cached)."""
    d = find(name) or build(name)
    handle = load_checkpoint(d, kind="causal-lm")
    handle.extras["build"] = json.loads((d / "zoo.json").read_text())
    if LMS[name].init:
        handle.extras["base"] = LMS[name].init
    return handle


register(ZooEntry("pydocs-lm", "causal-lm",
                  "Llama-architecture LM (1.0M parameters, bf16) trained from scratch on the pydocs corpus",
                  lambda: load("pydocs-lm"), lambda force=False: build("pydocs-lm", force), LM_DATASETS))
register(ZooEntry("pydocs-lm-net", "causal-lm",
                  f"pydocs-lm fine-tuned on the docs' '{DOMAIN}' area (a domain delta; base: pydocs-lm)",
                  lambda: load("pydocs-lm-net"), lambda force=False: build("pydocs-lm-net", force),
                  DOMAIN_DATASETS))
