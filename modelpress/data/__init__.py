"""The data layer: named data sources, resolved once per run and handed to every pass and metric.

A *dataset* is what a recipe's ``calibration: {dataset: ...}`` or ``evaluate: [{metric: ..., dataset: ...}]``
names:

* a zoo dataset (``pydocs-10/train``, ``digits/train``, ``digits-prompts/eval``, ...), registered by the zoo
  modules that own the data (each zoo entry also declares its default calibration and evaluation datasets);
* a user's file or folder (see :mod:`modelpress.data.files`): plain text (``.txt``, one document per line,
  or a folder of ``.txt`` files, one document each), JSON Lines (``{"text": ..., "label": ...}``,
  ``{"prompt": ...}`` or multiple-choice questions ``{"context": ..., "choices": [...], "answer": i}``), a
  folder of images;
* ``random``: seeded random model inputs, for models without data. It is never chosen silently: a recipe
  says so, the manifest records it and the report shows a warning.

A dataset holds examples (texts, labels, prompts, images); :mod:`modelpress.data.inputs` turns a draw of
them into the canonical inputs of a model (tokenized with the model's tokenizer, forward-noised images,
prompt embeddings). Activation capture and Hessian accumulation live in :mod:`modelpress.data.capture`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError
from ..registry import Registry

RANDOM = "random"


@dataclass(frozen=True)
class Examples:
    """A draw of examples: each field is ``None`` when the dataset does not have it.

    ``images`` are ``[N, C, H, W]`` floats in ``[-1, 1]``; ``labels`` are ints or class names as given;
    ``ids`` are the examples' indices in their dataset (recorded in manifests)."""

    ids: list[int]
    texts: list[str] | None = None
    labels: list[int | str] | None = None
    prompts: list[str] | None = None
    images: torch.Tensor | None = None
    #: multiple-choice questions ``{"context": str, "choices": [str, ...], "answer": int}``
    choices: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.ids)


#: ``draw(n, seed)`` of a generated dataset
Drawer = Callable[[int, int], Examples]


@dataclass(frozen=True)
class Dataset:
    """A named source of examples.

    ``size`` is the number of examples (``None`` for a generator without end, like templated prompts);
    ``fields`` names what each example has (``text``, ``label``, ``prompt``, ``image``). ``draw(n, seed)``
    returns ``n`` examples in a seeded order: a seeded permutation of a finite dataset (cycled when ``n``
    exceeds its size), or ``n`` generated ones."""

    name: str
    fields: frozenset[str]
    size: int | None
    _take: Callable[[list[int]], Examples] | None = None
    _generate: Drawer | None = None
    #: class names in label order, when the source gives them (``label`` fields that are strings)
    label_names: tuple[str, ...] | None = None
    is_random: bool = False
    extras: dict = field(default_factory=dict)

    def draw(self, n: int, generator: torch.Generator | int) -> Examples:
        """``n`` examples. ``generator`` (or a seed) picks them: the first ``n`` of a seeded permutation, or
        ``n`` generated with that seed."""
        if self._generate is not None:
            seed = generator if isinstance(generator, int) else int(torch.randint(0, 2**31 - 1, (1,),
                                                                                  generator=generator))
            return self._generate(n, seed)
        g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        assert self._take is not None and self.size
        perm = torch.randperm(self.size, generator=g)
        reps = -(-n // self.size)
        idx = perm.repeat(reps)[:n] if reps > 1 else perm[:n]
        return self._take(idx.tolist())

    def all(self) -> Examples:
        """Every example in the dataset's own order (evaluation sets)."""
        if self._take is None or self.size is None:
            raise UserError(f"dataset {self.name!r} has no fixed size; give a number of samples")
        return self._take(list(range(self.size)))

    def first(self, n: int | None) -> Examples:
        """The first ``n`` examples in the dataset's own order (all when ``None``)."""
        if n is None:
            return self.all()
        if self._take is None or self.size is None:
            return self.draw(n, 0)
        return self._take(list(range(min(n, self.size))))

    def fingerprint(self) -> str:
        """sha256 of the dataset's texts, prompts and labels in order (images: their bytes); generated
        datasets are identified by their name."""
        import hashlib

        if self._take is None or self.size is None:
            return hashlib.sha256(self.name.encode()).hexdigest()
        ex = self.all()
        h = hashlib.sha256()
        for name in ("texts", "prompts", "labels", "choices"):
            for v in getattr(ex, name) or []:
                h.update(f"{name}\t{v}\n".encode())
        if ex.images is not None:
            h.update(ex.images.contiguous().numpy().tobytes())
        return h.hexdigest()

    def require(self, needed: str, purpose: str) -> None:
        """A one-line error when the examples lack the field ``needed`` for ``purpose``."""
        if needed not in self.fields:
            have = ", ".join(sorted(self.fields)) or "nothing"
            raise UserError(f"{purpose} needs examples with a {needed!r} field; this dataset has {have}",
                            self.name)


def finite(name: str, fields: set[str], *, texts: list[str] | None = None, labels: list | None = None,
           prompts: list[str] | None = None, images: torch.Tensor | None = None,
           label_names: tuple[str, ...] | None = None, choices: list[dict] | None = None) -> Dataset:
    """A dataset of the given lists (all of one length)."""
    sizes = {len(v) for v in (texts, labels, prompts, images, choices) if v is not None}
    if len(sizes) != 1:
        raise ValueError(f"dataset {name}: fields of different lengths {sizes}")
    size = sizes.pop()
    if size == 0:
        raise UserError("the dataset is empty", name)

    def take(idx: list[int]) -> Examples:
        return Examples(ids=idx, texts=None if texts is None else [texts[i] for i in idx],
                        labels=None if labels is None else [labels[i] for i in idx],
                        prompts=None if prompts is None else [prompts[i] for i in idx],
                        images=None if images is None else images[torch.as_tensor(idx, dtype=torch.long)],
                        choices=None if choices is None else [choices[i] for i in idx])

    return Dataset(name, frozenset(fields), size, _take=take, label_names=label_names)


def generated(name: str, fields: set[str], draw: Drawer) -> Dataset:
    """A dataset whose examples are generated for each draw (templated prompts)."""
    return Dataset(name, frozenset(fields), None, _generate=draw)


def random_dataset() -> Dataset:
    """The ``random`` source: no examples; :func:`modelpress.data.inputs.model_inputs` makes seeded random
    canonical inputs for it."""
    return Dataset(RANDOM, frozenset(), None, _generate=lambda n, g: Examples(ids=list(range(n))), is_random=True)


# ---------------------------------------------------------------------------------------------------
# The registry of named datasets (filled by the zoo modules that own the data)

def _discover_zoo() -> None:
    """The zoo modules register their datasets and prompt encoders when imported (by name, as the method
    packages are: the zoo imports this module, not the reverse)."""
    import importlib

    importlib.import_module("modelpress.zoo").entries()


#: named datasets (filled by the zoo modules that own the data) and prompt encoders
DATASETS: Registry[Callable[[], Dataset]] = Registry("dataset", _discover_zoo)
PROMPT_ENCODERS: Registry[Callable[[list[str]], torch.Tensor]] = Registry("prompt encoder", _discover_zoo)


def register_dataset(name: str, load: Callable[[], Dataset]) -> None:
    """Make ``name`` usable as ``dataset: <name>`` (``load`` runs when a recipe uses it)."""
    DATASETS.add(name, load)


def register_prompt_encoder(name: str, encode: Callable[[list[str]], torch.Tensor]) -> None:
    """A text encoder turning prompts into the ``encoder_hidden_states [B, L, D]`` of ``unet-cond`` models
    that name it in ``extras["prompt_encoder"]``."""
    PROMPT_ENCODERS.add(name, encode)


def prompt_encoder(name: str) -> Callable[[list[str]], torch.Tensor]:
    return PROMPT_ENCODERS.get(name)


def named_datasets() -> list[str]:
    return sorted(DATASETS.all())


def open_dataset(ref: str, base_dir: str | None = None) -> Dataset:
    """The dataset a recipe names: ``random``, a registered name, or a file / folder path (relative paths
    are tried as given, then beside the recipe, ``base_dir``)."""
    from pathlib import Path

    from .files import read_path

    if ref == RANDOM:
        return random_dataset()
    if ref in DATASETS:
        return DATASETS.get(ref)()
    p = Path(ref)
    if not p.exists() and base_dir is not None and (Path(base_dir) / p).exists():
        p = Path(base_dir) / p
    if p.exists():
        return read_path(p)
    known = ", ".join(named_datasets())
    raise UserError(f"no dataset file or folder, and no named dataset (named: {known}, random)", ref)


__all__ = ["Dataset", "Examples", "RANDOM", "finite", "generated", "random_dataset", "register_dataset",
           "register_prompt_encoder", "prompt_encoder", "named_datasets", "open_dataset"]
