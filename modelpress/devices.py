"""Where passes, calibration and evaluation run: the recipe's ``device: auto | cpu | cuda``.

``auto`` takes the first CUDA GPU when torch sees one, else the CPU; ``cuda`` without a GPU is a one-line error.
The CPU path always works and is the one the tests run; methods that compute on a device move what they compute
with there and return the model on the CPU (the artifact is written from the CPU).
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(option: str | torch.device | None = "auto", where: str = "device") -> torch.device:
    """The torch device ``option`` names (``None`` is ``auto``)."""
    if isinstance(option, torch.device):
        option = option.type
    option = option or "auto"
    if option not in DEVICES:
        raise UserError(f"unknown device {option!r}; choose one of {', '.join(DEVICES)}", where)
    if option == "cuda" or (option == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device: cuda, but torch sees no CUDA GPU on this machine (use auto or cpu)", where)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def on_device(device: torch.device | None, *modules: nn.Module) -> Iterator[None]:
    """Run the block with ``modules`` on ``device`` and bring them back to the CPU after (a no-op on the CPU).
    Parameters keep their identity (``Module.to`` swaps their data), so optimizers made inside see them."""
    if device is None or device.type == "cpu":
        yield
        return
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


#: x86 CPU flags (``/proc/cpuinfo``) of native bf16 matrix arithmetic
HALF_ARITHMETIC_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])


def half_is_slow(device: torch.device | None) -> bool:
    """Whether bf16 / fp16 arithmetic is emulated on ``device``: a CPU without AVX512-BF16 or AMX, where torch's
    bf16 matrix products run about 6x slower than float32 (measured on AVX2 CPUs; with AVX512-BF16 they run
    about 4x faster). Decided from the CPU's flags, so the same machine always takes the same path."""
    if device is not None and device.type != "cpu":
        return False
    return not any(flag in _cpu_flags() for flag in HALF_ARITHMETIC_FLAGS)


@contextmanager
def float32_arithmetic(device: torch.device | None, *modules: nn.Module) -> Iterator[None]:
    """Run the block with the bf16 / fp16 tensors of ``modules`` held in float32 when half precision is slow on
    ``device`` (:func:`half_is_slow`); they get their own dtype back after. Tensors the block does not change come
    back bit for bit (half -> float32 -> half is exact); what the block trains keeps its own dtype throughout
    only if it is float32 already (the caller's business). Parameters keep their identity (their data is swapped),
    so optimizers made inside see them."""
    if not half_is_slow(device):
        yield
        return
    halves: list[tuple[torch.Tensor, torch.dtype]] = []
    seen: set[int] = set()
    for m in modules:
        for t in itertools.chain(m.parameters(), m.buffers()):
            if id(t) not in seen and t.dtype in (torch.bfloat16, torch.float16):
                seen.add(id(t))
                halves.append((t, t.dtype))
                t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in halves:
            t.data = t.data.to(dtype)


def memory_available() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable`` of /proc/meminfo, else all RAM)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (``None`` with another C library: musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the memory that the C allocator holds free back to the system (glibc's ``malloc_trim(0)``; nothing
    elsewhere).

    Why: glibc raises its mmap threshold to the size of every mmapped block freed (up to 32 MiB), so after the
    first large tensor is freed the next ones of up to 32 MiB (weights read from the shards, encoder outputs)
    come from the heap, whose free holes are not given back. A streamed run that frees one unit's tensors
    before reading the next kept them resident: +0.4-0.6 GB over the first blocks of a 1.5B model
    (benchmarks/stream_memory.py, docs/scale.md). Called between units, it keeps resident memory at what
    is live."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
