"""Lazy, validated reading of a (sharded) safetensors checkpoint, for streamed compression.

A checkpoint directory holds one ``model.safetensors`` or several shards named by
``model.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file), as transformers writes them.
:class:`ShardedCheckpoint` reads only the headers when it opens (8-byte length + JSON: names, dtypes, shapes and
byte ranges) and checks them all before any work starts, so that a bad checkpoint is a one-line error naming the
file and the tensor, even when the bad tensor is in the last block:

* a shard the index names that is not there;
* a tensor the index places in a shard that does not hold it;
* a shard shorter than its header says (truncated), or whose byte ranges overlap or leave gaps.

Tensors are then read a few at a time (:meth:`ShardedCheckpoint.read`), each with plain reads of its byte range
into a fresh tensor. Not memory-mapped: a mapped shard's pages count in the process's resident memory (measured
on a 7B-shaped checkpoint in 1 GB shards: up to 1.1 GB of mapped shard pages at the peak), read ones do not.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

INDEX = "model.safetensors.index.json"
#: safetensors' dtype names -> torch dtypes and their sizes in bytes
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
#: headers larger than this are not a safetensors file (safetensors' own limit is 100 MB)
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its shard, dtype, shape and byte range in the shard's data section, which starts
    at byte ``data_start`` of the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header (one-line errors naming the file, and the tensor whose
    bytes are missing when the file is truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError("not a safetensors file (shorter than its 8-byte header length)", str(path))
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise UserError(f"not a safetensors file or truncated (header of {n} bytes, file of {size})", str(path))
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"corrupt safetensors header ({exc})", str(path)) from None
    if not isinstance(header, dict):
        raise UserError("corrupt safetensors header (not a JSON object)", str(path))
    data_bytes = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"corrupt safetensors header entry for tensor {name!r}", str(path)) from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise UserError(f"corrupt safetensors header: tensor {name!r} has {end - begin} bytes for shape "
                            f"{list(shape)} {entry['dtype']}", str(path))
        out[name] = TensorInfo(path, dtype, shape, begin, end, 8 + n)
    ranges = sorted((t.begin, t.end, k) for k, t in out.items())
    expected = 0
    for begin, end, name in ranges:
        if begin != expected:
            raise UserError(f"corrupt safetensors file: tensor {name!r} starts at byte {begin}, expected "
                            f"{expected}", str(path))
        if end > data_bytes:
            raise UserError(f"truncated: tensor {name!r} needs bytes up to {end} of the data section, the file "
                            f"holds {data_bytes}", str(path))
        expected = end
    return out


def read_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    """One tensor's bytes read (not mapped) into a new tensor; a file that changed since its header was
    checked is still a one-line error."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if info.nbytes else memoryview(b"")
    done = 0
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.data_start + info.begin)
        while done < info.nbytes:  # one read returns at most ~2 GiB on Linux
            got = f.readinto(view[done:])
            if not got:
                raise UserError(f"cannot read tensor {name!r} (the file ends at byte {info.data_start + info.begin + done})",
                                str(info.file))
            done += got
    return buf.view(info.dtype).reshape(info.shape)


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The checkpoint's weight files and, when it has an index, its ``weight_map`` (tensor -> shard name)."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"not a valid safetensors index ({exc})", str(index)) from None
        return sorted({directory / f for f in weight_map.values()}), weight_map
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError("no .safetensors weights in this directory", str(directory))
    return files, None


class ShardedCheckpoint:
    """The tensors of a checkpoint's weight files, by name; read on demand (see the module docstring)."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None = None) -> None:
        self.files = list(files)
        self.tensors: dict[str, TensorInfo] = {}
        if weight_map is not None:
            for name, shard in weight_map.items():
                if not (files[0].parent / shard).exists():
                    raise UserError(f"shard {shard} (holding tensor {name!r}) named by {INDEX} is missing",
                                    str(files[0].parent / shard))
        for f in self.files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise UserError(f"tensor {name!r} is in two weight files ({self.tensors[name].file.name})", str(f))
                self.tensors[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != Path(shard).name:
                    raise UserError(f"{INDEX} places tensor {name!r} in {shard}, which does not hold it",
                                    str(files[0].parent / shard))

    @classmethod
    def open(cls, path: str | Path) -> "ShardedCheckpoint":
        """A checkpoint directory (single file or sharded with an index) or one ``.safetensors`` file."""
        p = Path(path)
        if p.is_dir():
            return cls(*weight_files(p))
        return cls([p])

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each a fresh tensor of the stored dtype."""
        return {n: read_tensor(self.tensors[n], n) for n in names}
