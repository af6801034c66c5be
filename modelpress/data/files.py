"""A user's data files: read once, checked line by line, turned into a :class:`~modelpress.data.Dataset`.

=======================  ==============================================================================
what                     examples
=======================  ==============================================================================
``notes.txt``            one document per non-empty line (``text``; also ``prompt`` for diffusion models)
folder of ``.txt``       one document per file, in name order
``data.jsonl``           one JSON object per line with ``text`` and/or ``prompt``, optionally ``label``
                         (an int, or a class name of the model's ``label2id``) and ``image`` (a path
                         relative to the file); or multiple-choice questions ``{"context": str,
                         "choices": [str, ...], "answer": index of the right choice}``
folder of images         ``.png`` / ``.jpg`` / ``.jpeg`` / ``.bmp`` / ``.webp``; subfolders name their
                         images' labels (``cats/1.png`` has label ``cats``)
=======================  ==============================================================================

Every problem is a one-line :class:`~modelpress.errors.UserError` naming the file and, for JSON Lines, the
line: an empty file, a line that is not a JSON object, a line without the fields the others have.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from . import Dataset, finite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: the fields a JSON Lines example may have; one of ``text`` / ``prompt`` / ``image`` is required, or all the
#: multiple-choice fields
JSONL_FIELDS = ("text", "prompt", "label", "image", "context", "choices", "answer")
CHOICE_FIELDS = ("context", "choices", "answer")


def read_path(path: Path) -> Dataset:
    """The dataset in the file or folder ``path``."""
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_lines(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    raise UserError("unsupported data file: give a .txt or .jsonl file, or a folder of .txt files or images",
                    str(path))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (byte {exc.start})", str(path)) from None


def _read_lines(path: Path) -> Dataset:
    lines = [line.strip() for line in _text(path).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError("the file is empty (one document per line expected)", str(path))
    return finite(str(path), {"text", "prompt"}, texts=lines, prompts=lines)


def _read_jsonl(path: Path) -> Dataset:
    rows: list[dict] = []
    for n, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"line {n}: not valid JSON ({exc.msg})", str(path)) from None
        if not isinstance(row, dict):
            raise UserError(f"line {n}: expected a JSON object like {{\"text\": ..., \"label\": ...}}", str(path))
        rows.append((n, row))
    if not rows:
        raise UserError("the file is empty (one JSON object per line expected)", str(path))
    fields = [f for f in JSONL_FIELDS if f in rows[0][1]]
    if set(fields) & set(CHOICE_FIELDS):
        return _choice_dataset(path, rows)
    if not set(fields) & {"text", "prompt", "image"}:
        raise UserError(f"line {rows[0][0]}: no 'text', 'prompt' or 'image' field", str(path))
    for n, row in rows:
        for f in fields:
            if f not in row:
                raise UserError(f"line {n}: no {f!r} field (line {rows[0][0]} has one)", str(path))
            if f in ("text", "prompt", "image") and not isinstance(row[f], str):
                raise UserError(f"line {n}: {f!r} must be a string, got {type(row[f]).__name__}", str(path))
            if f == "label" and not isinstance(row[f], (int, str)) or isinstance(row.get("label"), bool):
                raise UserError(f"line {n}: 'label' must be an integer or a class name", str(path))
    column = {f: [row[f] for _, row in rows] for f in fields}
    images = None
    if "image" in column:
        images = _load_images([_image_path(path, p, n) for (n, _), p in zip(rows, column["image"])])
    texts = column.get("text")
    prompts = column.get("prompt")
    return finite(str(path), set(fields), texts=texts, labels=column.get("label"), prompts=prompts, images=images)


def _choice_dataset(path: Path, rows: list[tuple[int, dict]]) -> Dataset:
    """Multiple-choice questions: every line needs a string ``context``, a list of at least two strings
    ``choices`` and an integer ``answer`` indexing them."""
    questions = []
    for n, row in rows:
        missing = [f for f in CHOICE_FIELDS if f not in row]
        if missing:
            raise UserError(f"line {n}: no {missing[0]!r} field (a question needs context, choices and answer)",
                            str(path))
        context, choices, answer = row["context"], row["choices"], row["answer"]
        if not isinstance(context, str):
            raise UserError(f"line {n}: 'context' must be a string, got {type(context).__name__}", str(path))
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"line {n}: 'choices' must be a list of at least two non-empty strings", str(path))
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(f"line {n}: 'answer' must be the index of the right choice (0..{len(choices) - 1}), "
                            f"got {answer!r}", str(path))
        questions.append({"context": context, "choices": list(choices), "answer": answer})
    return finite(str(path), set(CHOICE_FIELDS), choices=questions)


def _image_path(jsonl: Path, rel: str, line: int) -> Path:
    p = Path(rel) if Path(rel).is_absolute() else jsonl.parent / rel
    if not p.is_file():
        raise UserError(f"line {line}: no image file {rel!r}", str(jsonl))
    return p


def _read_folder(path: Path) -> Dataset:
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    texts = [f for f in files if f.suffix.lower() == ".txt"]
    if images:
        labels = [f.parent.relative_to(path).as_posix() for f in images]
        has_labels = any(lab != "." for lab in labels)
        names = tuple(sorted(set(labels))) if has_labels else None
        return finite(str(path), {"image", "label"} if has_labels else {"image"}, images=_load_images(images),
                      labels=labels if has_labels else None, label_names=names)
    if texts:
        docs = [_text(f).strip() for f in texts]
        empty = [f for f, d in zip(texts, docs) if not d]
        if empty:
            raise UserError("the file is empty", str(empty[0]))
        return finite(str(path), {"text", "prompt"}, texts=docs, prompts=docs)
    raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) and no .txt files in this folder", str(path))


def _load_images(files: list[Path]) -> torch.Tensor:
    """``[N, C, H, W]`` in ``[-1, 1]``: grayscale stays one channel, anything else becomes RGB; every image is
    resized (bilinear, antialiased) to the first one's size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out, size, mode = [], None, None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode = mode or ("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
                im = im.convert(mode)
                size = size or im.size
                if im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"not a readable image ({str(exc).splitlines()[0]})", str(f)) from None
        out.append(torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()))
    return torch.stack(out)
