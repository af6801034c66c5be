"""Where block reconstruction keeps a unit's captured inputs and full-precision targets: in memory, or spooled
to disk and read back one minibatch at a time.

BRECQ-style reconstruction (:mod:`.reconstruction`) needs, for the unit being reconstructed, its inputs and
its full-precision output on the *whole* calibration set, because every iteration draws a random minibatch
from it. At Stable Diffusion scale (64x64 latents, the papers' hundreds to thousands of calibration samples)
a single block's inputs take gigabytes. With ``storage="disk"`` each captured batch is appended to a raw
file per tensor (row-major, so the file *is* the ``[N, ...]`` concatenation) and minibatch rows are read
back with ``pread``; nothing of the set stays resident, and the bytes read are the bytes written, so the
reconstruction is bit-identical to the in-memory one. ``auto`` takes memory when the estimated size of the
capture (first batch's bytes scaled to the whole set) fits :data:`MEMORY_FRACTION` of ``MemAvailable``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..devices import memory_available

STORAGES = ("auto", "memory", "disk")
#: share of the machine's available memory one capture (a unit's inputs, or its targets) may hold under ``auto``
MEMORY_FRACTION = 0.25


def _tensors(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """Every tensor inside nested tuples / lists / dicts, with its path of indices / keys."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensors(v, path + (i,))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, path + (k,))


def _replace(value: Any, new: dict[tuple, Any], path: tuple = ()) -> Any:
    if path in new:
        return new[path]
    if isinstance(value, (tuple, list)):
        return type(value)(_replace(v, new, path + (i,)) for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: _replace(v, new, path + (k,)) for k, v in value.items()}
    return value


def concat_batches(items: list[Any], sizes: list[int]) -> Any:
    """Concatenate per-batch captured values along the batch dimension (tensors whose first dim is the batch
    size in every batch); other values are taken from the first batch."""
    first = items[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and all(
            isinstance(v, torch.Tensor) and v.shape[0] == s for v, s in zip(items, sizes)):
        return torch.cat(items)
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([v[i] for v in items], sizes) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_batches([v[k] for v in items], sizes) for k in first}
    return first


def take_rows(value: Any, idx: torch.Tensor, n: int, device: torch.device | None = None) -> Any:
    """Rows ``idx`` of every ``[n, ...]`` tensor (in memory or :class:`DiskRows`) inside ``value``, moved to
    ``device`` (None: left where they are); other values as they are."""
    if isinstance(value, DiskRows):
        out = value.rows(idx)
        return out if device is None else out.to(device)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        out = value[idx]
        return out if device is None else out.to(device)
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, idx, n, device) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, idx, n, device) for k, v in value.items()}
    return value


def nbytes(value: Any) -> int:
    """Bytes of every tensor inside ``value``."""
    return sum(t.numel() * t.element_size() for _, t in _tensors(value))


class DiskRows:
    """An ``[n, *row_shape]`` tensor whose rows live in a raw file; :meth:`rows` reads the rows asked for."""

    def __init__(self, path: Path, dtype: torch.dtype, row_shape: tuple[int, ...], n: int) -> None:
        self.path, self.dtype, self.row_shape, self.n = path, dtype, tuple(row_shape), int(n)
        self.row_bytes = torch.Size(self.row_shape).numel() * torch.empty((), dtype=dtype).element_size()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, *self.row_shape))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (in that order, repeats allowed) as a fresh in-memory tensor."""
        idx = idx.reshape(-1).tolist()
        buf = torch.empty((len(idx), self.row_bytes), dtype=torch.uint8)
        if self.row_bytes == 0:
            return buf.view(self.dtype).reshape(len(idx), *self.row_shape)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, j in enumerate(idx):
                if not 0 <= j < self.n:
                    raise IndexError(f"row {j} of {self.n}")
                view = memoryview(buf[i].numpy())
                if os.preadv(fd, [view], j * self.row_bytes) != self.row_bytes:
                    raise OSError(f"short read from {self.path}")
        finally:
            os.close(fd)
        return buf.view(self.dtype).reshape(len(idx), *self.row_shape)


class Spool:
    """Collects per-batch captured values (tensors in nested tuples / lists / dicts) and gives back their
    concatenation over the batches: in memory (one tensor per leaf), or, on disk, :class:`DiskRows` leaves.

    As :func:`concat_batches`: a leaf is concatenated when it is a tensor whose first
    dimension is the batch size in every batch; any other value is taken from the first batch. Tensors are
    kept on the CPU whatever device they were captured on.
    """

    def __init__(self, storage: str, rows: int, directory: Path | str | None = None,
                 budget: int | None = None) -> None:
        if storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}; one of {STORAGES}")
        self.storage, self.total_rows, self.directory, self.budget = storage, int(rows), directory, budget
        self.items: list[Any] = []
        self.sizes: list[int] = []
        self.first: Any = None
        self.leaves: dict[tuple, list[tuple[torch.dtype, tuple[int, ...]]]] = {}  # per batch written to disk
        self.files: dict[tuple, Path] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        #: bytes of the batched tensors captured (what the storage holds)
        self.bytes = 0

    def _choose(self, value: Any, size: int) -> str:
        if self.storage != "auto":
            return self.storage
        budget = self.budget
        if budget is None:
            budget = int(MEMORY_FRACTION * memory_available())
        estimate = nbytes(value) * self.total_rows / max(1, size)
        return "memory" if estimate <= budget else "disk"

    def add(self, value: Any, size: int) -> None:
        """One batch's captured value (``size`` rows)."""
        value = map_leaves(torch.Tensor.cpu, value)
        if not self.sizes:
            self.storage = self._choose(value, size)
        self.sizes.append(int(size))
        self.bytes += sum(t.numel() * t.element_size() for _, t in _tensors(value) if t.dim() and t.shape[0] == size)
        if self.storage == "memory":
            self.items.append(value)
            return
        if self.first is None:
            self.first = value
            self._tmp = tempfile.TemporaryDirectory(prefix="recon-", dir=self.directory)
        for path, t in _tensors(value):
            if t.dim() == 0 or t.shape[0] != size:
                continue  # not batched: the first batch's value is kept
            self.leaves.setdefault(path, []).append((t.dtype, tuple(t.shape)))
            file = self.files.setdefault(path, Path(self._tmp.name) / f"{len(self.files)}.bin")
            if t.numel():
                with open(file, "ab") as f:
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())

    def result(self) -> Any:
        """The concatenated value (tensors, or :class:`DiskRows` on disk); call it once (in memory, the
        per-batch values are let go once concatenated)."""
        if self.storage == "memory":
            out = concat_batches(self.items, self.sizes)
            self.items = []
            return out
        n = sum(self.sizes)
        new: dict[tuple, Any] = {}
        for path, seen in self.leaves.items():
            if len(seen) != len(self.sizes):
                continue  # not batched in every batch
            dtype, shape = seen[0]
            if any(d != dtype or s[1:] != shape[1:] for d, s in seen):
                raise RuntimeError(f"captured tensor {path} changes dtype or shape between batches")
            new[path] = DiskRows(self.files[path], dtype, shape[1:], n)
        return _replace(self.first, new)

    def close(self) -> None:
        """Remove the files (the values from :meth:`result` must not be read after)."""
        self.items = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def map_leaves(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor inside its nested tuples / lists / dicts (their types
    kept; other values as they are)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_leaves(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_leaves(fn, v) for k, v in value.items()}
    return value
