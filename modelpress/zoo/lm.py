"""Causal language models of the zoo: ``pydocs-lm`` and its fine-tunes ``pydocs-lm-net`` and ``pydocs-lm-conc``.

Five of the methods (DFloat11, BitDelta, Delta-CoMe, DARE / DAREx, EvoPress) were published on decoder-only
LLMs. These two are the smallest real ones we can ship: Llama-architecture models (grouped-query attention,
RoPE, SwiGLU, RMSNorm, tied embeddings as in Llama-3.2-1B and Qwen2-0.5B; 1.0M parameters, stored in
bfloat16 as LLM checkpoints are) trained from scratch here on the pydocs corpus (the Python standard library's
own documentation, :mod:`modelpress.zoo.text`) with a byte-level BPE tokenizer trained on the same text.

* ``pydocs-lm``: trained on every area's ``train`` texts.
* ``pydocs-lm-net``: ``pydocs-lm`` (as shipped, in bfloat16) fine-tuned on the ``internet`` area's ``train``
  texts (sockets, HTTP, email, URLs): a domain fine-tune whose delta the delta methods compress; its gain is
  measured as perplexity on the area's ``test`` texts (dataset ``pydocs-internet/test``). Its delta is
  *large*: 10.7% of the base's weight norm.
* ``pydocs-lm-conc``: ``pydocs-lm`` fine-tuned briefly, at a tenth of the learning rate, on the
  ``concurrency`` area (threads, processes, asyncio, queues): a *small* delta (about 1% of the weight norm, the
  order of a chat or instruction fine-tune of a 7B model) with a smaller gain on its area.

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
SMALL_DOMAIN = "concurrency"
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
    "pydocs-lm-conc": LMSettings(lr=1e-4, epochs=2, area=SMALL_DOMAIN, init="pydocs-lm"),
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


def _area_split(area: str, split: str):  # noqa: ANN202 - a Dataset loader
    def load():  # noqa: ANN202
        return finite(f"pydocs-{area}/{split}", {"text"}, texts=area_texts(split, area))
    return load


for _area in (DOMAIN, SMALL_DOMAIN):
    for _split in DOCS_SPLITS:
        register_dataset(f"pydocs-{_area}/{_split}", _area_split(_area, _split))

LM_DATASETS = {"calibration": "pydocs-10/train", "evaluation": "pydocs-10/test", "validation": "pydocs-10/val"}

#: words of a docs text in a question's context, and in each choice (the next words of a text)
CHOICE_WORDS = 12
CHOICES = 4


def continuation_questions(split: str) -> list[dict]:
    """Multiple-choice continuation questions (``choice_accuracy``'s rows) from the pydocs ``split`` texts: the
    context is a text's first :data:`CHOICE_WORDS` words; the choices are its own next :data:`CHOICE_WORDS`
    words and the same words of three texts *of three other docs areas* (the next text of each of the next
    three areas, cyclically), the right one at position ``i % 4`` of the question's index ``i``: every choice
    has as many words, and a model that follows the context's topic and wording finds the right one. Texts of
    fewer than twice :data:`CHOICE_WORDS` words are left out. Deterministic (the split's own order)."""
    texts, labels = docs_dataset(split)
    by_area: dict[int, list[list[str]]] = {}
    for t, lab in zip(texts, labels):
        words = t.split()
        if len(words) >= 2 * CHOICE_WORDS:
            by_area.setdefault(lab, []).append(words)
    areas = sorted(by_area)
    rows: list[dict] = []
    for a, lab in enumerate(areas):
        for j, words in enumerate(by_area[lab]):
            others = [by_area[areas[(a + k) % len(areas)]] for k in range(1, CHOICES)]
            ends = [" ".join(o[j % len(o)][CHOICE_WORDS:2 * CHOICE_WORDS]) for o in others]
            answer = len(rows) % CHOICES
            ends.insert(answer, " ".join(words[CHOICE_WORDS:2 * CHOICE_WORDS]))
            rows.append({"context": " ".join(words[:CHOICE_WORDS]), "choices": ends, "answer": answer})
    return rows


def _choice_split(split: str):  # noqa: ANN202 - a Dataset loader
    def load():  # noqa: ANN202
        return finite(f"pydocs-choice/{split}", {"choices"}, choices=continuation_questions(split))
    return load


for _split in ("val", "test"):
    register_dataset(f"pydocs-choice/{_split}", _choice_split(_split))


def area_datasets(area: str) -> dict[str, str]:
    """The datasets of a fine-tune on one docs area, by role."""
    return {"calibration": f"pydocs-{area}/train", "evaluation": f"pydocs-{area}/test",
            "validation": f"pydocs-{area}/val"}


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


@torch.no_grad()
def delta_relative_norm(model: torch.nn.Module, base: torch.nn.Module) -> float:
    """``||theta_ft - theta_base|| / ||theta_base||`` over all parameters (fp32): how far a fine-tune moved."""
    num = den = 0.0
    for p, q in zip(model.parameters(), base.parameters()):
        num += float((p.float() - q.float()).pow(2).sum())
        den += float(q.float().pow(2).sum())
    return math.sqrt(num / den)


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
            init_model = load_checkpoint(init_dir, kind="causal-lm").module
        else:
            init_model = None
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
        areas = [DOMAIN] + ([s.area] if s.area and s.area != DOMAIN else [])
        test_areas = {a: token_windows(tmp, area_texts("test", a), s.window) for a in areas}
        record = {"name": name, "settings": asdict(s), "architecture": ARCHITECTURE, "dataset": docs_fingerprint(),
                  "parameters": sum(p.numel() for p in model.parameters()), "train_windows": len(windows["train"]),
                  "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
                  "torch": torch.__version__, "threads": TRAIN_THREADS,
                  "bf16_perplexity": {"val": round(perplexity(model, windows["val"]), 3),
                                      "test": round(perplexity(model, test_all), 3),
                                      **{f"test_{a}": round(perplexity(model, w), 3)
                                         for a, w in test_areas.items()}}}
        if init_model is not None:
            record["delta_relative_norm"] = round(delta_relative_norm(model, init_model), 5)
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
                  f"pydocs-lm fine-tuned on the docs' '{DOMAIN}' area (a large domain delta; base: pydocs-lm)",
                  lambda: load("pydocs-lm-net"), lambda force=False: build("pydocs-lm-net", force),
                  area_datasets(DOMAIN)))
register(ZooEntry("pydocs-lm-conc", "causal-lm",
                  f"pydocs-lm fine-tuned briefly on the docs' '{SMALL_DOMAIN}' area (a small delta; base: pydocs-lm)",
                  lambda: load("pydocs-lm-conc"), lambda force=False: build("pydocs-lm-conc", force),
                  area_datasets(SMALL_DOMAIN)))
